"""What every command shares: one-line errors, progress bars, tables, JSON output."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import typing
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.segment import Segment
from rich.table import Table
from typer.core import TyperGroup

from ..core.errors import BottlecacheError, reason

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
INTERRUPTED = "interrupted; nothing was written"


def fail(message: str, code: int = 2):
    """One line on stderr, ``error: <message>``, and exit ``code``."""
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", markup=True, highlight=False)
    raise typer.Exit(code=code)


def verbose() -> bool:
    return os.environ.get("BOTTLECACHE_VERBOSE", "") not in ("", "0")


def handle_errors(command=None, *, interrupted: str = INTERRUPTED):
    """User-facing failures end as one line on stderr and a non-zero exit, never a traceback.

    ``interrupted`` is what Ctrl-C leaves behind for this command (what is kept, how to go on),
    unless the work that was interrupted noted what it kept (``core.errors.note_interrupt``).
    An error nobody foresaw is a bug: one line that says so (``--verbose`` shows the traceback).
    """
    if command is None:
        return functools.partial(handle_errors, interrupted=interrupted)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, click_exceptions.ClickException):
            raise
        except BottlecacheError as error:
            fail(str(error), 2)
        except KeyboardInterrupt as stop:
            fail(getattr(stop, "kept", None) or interrupted, 143 if isinstance(stop, Terminated) else 130)
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{reason(error)}", 1)
        except Exception as error:  # noqa: BLE001 - the last line of defence against a traceback
            if verbose():
                raise
            fail(f"unexpected {type(error).__name__}: {reason(error)} (a bug in bottlecache; run with --verbose "
                 "for the traceback and report it)", 1)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be: the same clean-up, the same one line, exit 143."""


def stop_on_sigterm() -> None:
    """A ``kill`` (SIGTERM) ends a command as Ctrl-C does, instead of at once with nothing cleaned."""

    def terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)


def refuse_empty_paths(command) -> None:
    """A path option or argument given an empty string is refused: typer reads ``""`` as ``.``,
    the current folder, so ``--out "$UNSET"`` would write there, and ``cache train-head ""`` would
    look for a cache in it."""

    def process_value(inner, param, ctx, value):
        given = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) and not v.strip() for v in given):
            raise click_exceptions.BadParameter("an empty path is not a path (an unset variable?)", ctx, param)
        return inner(ctx, value)

    for sub in (getattr(command, "commands", None) or {}).values():
        refuse_empty_paths(sub)
    for param in command.params:
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        takes_paths = annotation is Path or Path in typing.get_args(annotation)
        if takes_paths and not getattr(param, "refuses_empty", False):
            param.process_value = functools.partial(process_value, param.process_value, param)
            param.refuses_empty = True


class OneLineGroup(TyperGroup):
    """The root command: a usage error (a value typer cannot parse, an unknown option, a flag given
    a value) ends as one line too, as every other failure does; an empty path is such an error."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        refuse_empty_paths(self)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(2)
        except click_exceptions.UsageError as error:
            hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
            err.print(f"[bold red]error:[/] {escape(' '.join(error.format_message().split()))}{escape(hint)}",
                      markup=True, highlight=False)
            sys.exit(2)
        except click_exceptions.ClickException as error:
            err.print(f"[bold red]error:[/] {escape(' '.join(error.format_message().split()))}", markup=True)
            sys.exit(error.exit_code)
        except (typer.Abort, KeyboardInterrupt, EOFError) as stop:
            err.print("[bold red]error:[/] interrupted", markup=True)
            sys.exit(143 if isinstance(stop, Terminated) else 130)
        sys.exit(code if isinstance(code, int) else 0)


def print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list]):
    """A table for ``out``: on a terminal, boxed, with long cells (paths, reasons) folded onto more
    lines, never cut; piped or redirected, plain lines that ``grep`` and ``cut -f`` can use (the
    title as a ``#`` comment, then tab-separated columns, one row per line, nothing cut)."""
    if not out.is_terminal:
        lines = [f"# {title}", "\t".join(columns)] + ["\t".join(_one_line(v) for v in row) for row in rows]
        return _Plain(lines)
    t = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        t.add_row(*[escape(str(v)) for v in row])
    return t


class _Plain:
    """Lines printed as they are (rich would expand the tabs of a ``Text`` into spaces)."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def __rich_console__(self, console, options):
        for line in self.lines:
            yield Segment(line)
            yield Segment.line()


def _one_line(value) -> str:
    return " ".join(str(value).split()) if ("\t" in str(value) or "\n" in str(value)) else str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def render_metrics(title: str, result: dict) -> None:
    """The metrics table shared by heads and fine-tuning (one row per evaluated split)."""
    rows = []
    for split, m in result["metrics"].items():
        per_class = "; ".join(
            f"{name} {v['precision']:.3f}/{v['recall']:.3f}/{v['f1']:.3f}" for name, v in m["per_class"].items()
        )
        auc = f"{m['roc_auc']:.4f}" if "roc_auc" in m else "-"
        balanced = f"{m['balanced_accuracy']:.4f}" if m.get("balanced_accuracy") is not None else "-"
        ece = f"{m['ece']:.4f}" if m.get("ece") is not None else "-"
        rows.append([split, m["n"], f"{m['accuracy']:.4f}", balanced, f"{m['log_loss']:.4f}", auc, ece, per_class])
    columns = ["split", "n", "accuracy", "balanced acc.", "log loss", "ROC AUC", "ECE", "per class precision/recall/F1"]
    out.print(table(title, columns, rows))
    for split, m in result["metrics"].items():
        out.print(f"{split} confusion matrix (rows: true, columns: predicted): {m['confusion_matrix']}")


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
from typing import Annotated, Optional  # noqa: E402

DataOpt = Annotated[
    str,
    typer.Option("--data", help="Image folder (<class>/<img> or train|validation|test/<class>/<img>), tfds:NAME or a tfds name."),
]
SplitOpt = Annotated[
    Optional[list[str]],
    typer.Option("--split", help="Split spec NAME=BASE[start:stop] (tfds slicing, e.g. validation=train[80%:90%]); repeat for each split."),
]
ImageSizeOpt = Annotated[str, typer.Option("--image-size", help="Input side in pixels: 96, 128, 160, 192, 224, a base's native size (Xception 299, EfficientNet B1-B3 240/260/300), or native.")]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", help="'imagenet' (Keras download) or a weights file. Default: $BOTTLECACHE_WEIGHTS or imagenet."),
]
ModelOpt = Annotated[
    str,
    typer.Option("--model", help="The frozen base: mobilenet_v2 (default), xception, ... (`bottlecache models` lists them)."),
]
CacheDirOpt = Annotated[
    Optional[Path], typer.Option("--cache-dir", help="Cache folder. Default: $BOTTLECACHE_CACHE_DIR or ./cache.")
]
TfdsDirOpt = Annotated[Optional[str], typer.Option("--tfds-data-dir", help="data_dir passed to TensorFlow Datasets.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
