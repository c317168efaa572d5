"""Writing files so that a reader never sees half of one: a temporary name, then ``os.replace``.

The cache folder explains itself: it holds a ``.gitignore`` (as joblib's cache folder does), so
that nobody commits gigabytes of features by accident.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .errors import BottlecacheError, reason

GITIGNORE_TEXT = "# Written by bottlecache: this folder holds caches, heads and models, not source.\n*\n"
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def staged_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (same folder: the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    staged = staged_path(path)
    try:
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def atomic_save(path: Path, save) -> None:
    """``save(staged_path)`` writes the file (a Keras ``model.save`` or ``save_weights``), then it is
    renamed into place. Keras picks the format from the suffix, so the staged name keeps it."""
    path = Path(path)
    staged = path.with_name(f"staged-{os.getpid()}-{path.name}")
    try:
        save(staged)
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def write_error(path: Path, error: OSError, advice: str = "") -> BottlecacheError:
    """A failed write as one line that names the path and, for a full disk, what to do."""
    if error.errno in _NO_SPACE:
        text = f"Could not write {path}: no space left; free space in {Path(path).parent}"
    else:
        text = f"Could not write {path} ({reason(error)})"
    return BottlecacheError(f"{text}{'; ' + advice if advice else ''}.")


def ensure_cache_dir(folder: Path) -> Path:
    """Create the cache folder (and its ``.gitignore``) if needed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ignore = folder / ".gitignore"
        if not ignore.exists():
            atomic_write_text(ignore, GITIGNORE_TEXT)
    except OSError as error:
        raise write_error(folder, error, "pass another --cache-dir") from None
    return folder
