"""Writing files so that a reader never sees half of one: a temporary name, then ``os.replace``.

The cache folder explains itself: it holds a ``.gitignore`` (as joblib's cache folder does), so
that nobody commits gigabytes of features by accident.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .errors import BottlecacheError, reason

GITIGNORE_TEXT = "# Written by bottlecache: this folder holds caches, heads and models, not source.\n*\n"
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def staged_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (same folder: the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# What an output file may never replace, even with --overwrite: bottlecache's own files (caches,
# engines, model files, records) and anything in a head, model or export folder.
PROTECTED_SUFFIXES = (".h5", ".partial", ".keras", ".npz", ".tflite", ".lock")
RECORD_FILES = ("head.json", "model.json", "export.json", "metrics.json")


def check_output_file(option: str, path, *, overwrite: bool = False, inputs=()) -> Path:
    """An output file option: a file in an existing folder that is not one of the command's
    ``inputs`` or a bottlecache file, and, unless ``overwrite``, does not exist yet."""
    text = str(path)
    if not text.strip():
        raise BottlecacheError(f"The '{option}' option must be a file path. Got an empty string.")
    path = Path(text).expanduser()
    if path.is_dir():
        raise BottlecacheError(f"The '{option}' option must be a file to write; {path} is a folder.")
    if not path.parent.is_dir():
        raise BottlecacheError(f"The '{option}' option's folder {path.parent} does not exist; create it or pass "
                               "another path.")
    resolved = path.resolve()
    given = {Path(p).expanduser().resolve() for p in inputs}
    in_model_folder = any((resolved.parent / name).exists() for name in RECORD_FILES)
    inside_input = path.exists() and any(resolved.is_relative_to(p) for p in given if p.is_dir())  # an image found there
    if resolved in given or inside_input:
        raise BottlecacheError(f"The '{option}' option names {path}, one of this command's inputs; pass another path.")
    if resolved.suffix in PROTECTED_SUFFIXES or resolved.name in RECORD_FILES or in_model_folder:
        raise BottlecacheError(f"The '{option}' option names {path}, a bottlecache file or a file in a head, model or "
                               "export folder; it is never replaced. Pass another path.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise BottlecacheError(f"The '{option}' option names {path}, which exists; pass --overwrite to replace it, "
                               "or another path.")
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable: the directory entry is on disk once this returns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(staged: Path, final: Path) -> None:
    """Sync the finished ``staged`` file, rename it to ``final`` (atomic) and sync the folder: after
    a crash the folder holds the old file or the whole new one."""
    with open(staged, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def staged_file(final: Path):
    """A temporary name beside ``final`` to write a whole file under: when the block ends without
    an error the file is synced and renamed to ``final`` (``publish_file``); otherwise removed."""
    staged = staged_path(final)
    try:
        yield staged
        publish_file(staged, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


@contextlib.contextmanager
def staged_folder(out: Path):
    """A temporary sibling of ``out`` (missing or empty) to write a folder's files into; when the
    block ends without an error it becomes ``out`` by one rename, and otherwise it is removed, so a
    reader never sees half a folder."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def newest_first(paths) -> list[Path]:
    """``paths`` by modification time, newest first; one that vanished meanwhile goes last."""

    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return float("-inf")

    return sorted(paths, key=mtime, reverse=True)


def free_file(path: Path) -> Path:
    """``path``, or ``stem-2.suffix``, ``stem-3.suffix``… : the first name not taken yet."""
    path, n, candidate = Path(path), 1, Path(path)
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def free_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``… : the first name not taken yet."""
    path, n, candidate = Path(path), 1, Path(path)
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


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


MAX_KEY_FILE_BYTES = 256 << 20


def read_key_file(option: str, path) -> tuple[str, ...]:
    """The keys of a key file (``exclude.txt`` as ``cache audit`` writes it): UTF-8 text, one key a
    line; blank lines and lines starting with ``#`` are skipped. Sorted, each once."""
    if isinstance(path, str) and not path.strip():
        raise BottlecacheError(f"The '{option}' option must be a file of keys, one a line. Got an empty value.")
    path = Path(path).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise BottlecacheError(f"The '{option}' option must be a file of keys, one a line. Got {str(path)!r}, {what}.")
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise BottlecacheError(f"The '{option}' file {path} is larger than {MAX_KEY_FILE_BYTES >> 20} MB; "
                                   "a file of keys is text, one key a line.")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BottlecacheError(f"The '{option}' file {path} is not UTF-8 text; pass a file of keys, one a line "
                               "(as `cache audit` writes exclude.txt).") from None
    except OSError as error:
        raise BottlecacheError(f"The '{option}' file {path} could not be read ({reason(error)}).") from None
    if "\0" in text:
        raise BottlecacheError(f"The '{option}' file {path} is not text; pass a file of keys, one a line.")
    keys = sorted({line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")})
    if not keys:
        raise BottlecacheError(f"The '{option}' file {path} holds no key; pass a file of keys, one a line.")
    return tuple(keys)
