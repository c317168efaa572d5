"""``bottlecache``: the command line. Commands are thin: parse, call the library, render."""

import logging
import os
import warnings
from typing import Annotated

import typer

from ._common import JsonOpt, OneLineGroup, handle_errors, stop_on_sigterm
from .audit import audit
from .cache import app as cache_app
from .cache import print_models
from .embeddings import duplicates, neighbors
from .export import export
from .finetune import app as finetune_app
from .predict import predict
from .report import report
from .sweep import sweep

app = typer.Typer(
    cls=OneLineGroup,
    name="bottlecache",
    help="Bottleneck-feature caching for transfer learning: run a frozen base once, train heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show TensorFlow's own start-up and log lines, and the traceback of an unexpected error.")] = False,
):
    """Bottleneck-feature caching for transfer learning: run a frozen base once, train heads in seconds."""
    from ..core.tf import set_verbose

    if verbose:
        os.environ["BOTTLECACHE_VERBOSE"] = "1"
    else:  # library warnings would come before (or instead of) our one line
        warnings.simplefilter("ignore")
        for name in ("tensorflow", "absl", "keras", "h5py"):
            logging.getLogger(name).setLevel(logging.ERROR)
    set_verbose(verbose)


cache_app.command("neighbors")(neighbors)
cache_app.command("duplicates")(duplicates)
cache_app.command("audit")(audit)
app.add_typer(cache_app, name="cache")
app.add_typer(finetune_app, name="finetune")
app.command("predict")(predict)
app.command("report")(report)
app.command("sweep")(sweep)


@app.command("models")
@handle_errors(interrupted="interrupted")
def models(as_json: JsonOpt = False):
    """List the frozen bases --model takes: preprocessing, bottleneck, layers, fine-tune cut, engines."""
    print_models(as_json)
app.command("export")(export)


def main() -> None:
    stop_on_sigterm()
    app()
