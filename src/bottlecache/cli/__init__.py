"""``bottlecache``: the command line. Commands are thin: parse, call the library, render."""

import typer

from .cache import app as cache_app
from .finetune import app as finetune_app
from .predict import predict

app = typer.Typer(
    name="bottlecache",
    help="Bottleneck-feature caching for transfer learning: run the frozen MobileNetV2 once, train heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cache_app, name="cache")
app.add_typer(finetune_app, name="finetune")
app.command("predict")(predict)


def main() -> None:
    app()
