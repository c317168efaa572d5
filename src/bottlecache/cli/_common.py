"""What every command shares: one-line errors, progress bars, tables, JSON output."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import BottlecacheError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code=code)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def handle_errors(command):
    """User-facing failures end as one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BottlecacheError as error:
            fail(one_line(error).replace("[", r"\["), 2)
        except KeyboardInterrupt:
            fail("interrupted; what was written is kept; run the same command again to resume", 130)
        except OSError as error:
            fail(one_line(error).replace("[", r"\["), 1)

    return wrapper


def print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(v) for v in row])
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class RichProgress:
    """A progress bar per split (images/s) on stderr, for ``build_cache`` and training loops."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=quiet,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tasks:  # started on the first bar: a run that fails before any prints nothing
            self.progress.stop()

    def start_split(self, split: str, total: int, done: int) -> None:
        if not self.tasks:
            self.progress.start()
        self.tasks[split] = self.progress.add_task(split, total=total, completed=done, rate="")

    def advance(self, split: str, n: int) -> None:
        task_id = self.tasks[split]
        self.progress.advance(task_id, n)
        task = self.progress.tasks[task_id]
        if task.speed:
            self.progress.update(task_id, rate=f"{task.speed:6.1f} img/s")

    def end_split(self, split: str) -> None:
        pass

    def message(self, text: str) -> None:
        if not self.quiet:
            err.print(text)


# Options shared by `cache build` and `finetune run` (one definition, not a copy).
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

DataOpt = Annotated[
    str,
    typer.Option("--data", help="Image folder (<class>/<img> or train|validation|test/<class>/<img>), tfds:NAME or a tfds name."),
]
SplitOpt = Annotated[
    Optional[list[str]],
    typer.Option("--split", help="Split spec NAME=BASE[start:stop] (tfds slicing, e.g. validation=train[80%:90%]); repeat for each split."),
]
ImageSizeOpt = Annotated[int, typer.Option("--image-size", help="Input side in pixels: 96, 128, 160, 192 or 224.")]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", help="'imagenet' (Keras download) or a weights file. Default: $BOTTLECACHE_WEIGHTS or imagenet."),
]
CacheDirOpt = Annotated[
    Optional[Path], typer.Option("--cache-dir", help="Cache folder. Default: $BOTTLECACHE_CACHE_DIR or ./cache.")
]
TfdsDirOpt = Annotated[Optional[str], typer.Option("--tfds-data-dir", help="data_dir passed to TensorFlow Datasets.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
