"""The one exception type users see, and the one way an exception becomes a one-line reason."""

from __future__ import annotations

import re

# TensorFlow wraps its op errors: "{{function_node __wrapped__DecodeImage…}} Input is empty. [Op:DecodeImage] name:"
_TF_WRAPPING = re.compile(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\].*$", flags=re.DOTALL)


class BottlecacheError(ValueError):
    """A user-facing error: bad input, a missing or mismatched cache, an offline download.

    The command line prints ``str(error)`` on one line and exits with code 2.
    """


class CacheMismatchError(BottlecacheError):
    """A cache (or head) was built with a configuration other than the one the caller expects."""


def note_interrupt(stop: BaseException, kept: str) -> None:
    """Note on an interrupt (Ctrl-C, SIGTERM) what the interrupted work kept and how to go on: the
    command's last line says it instead of its general one. The innermost note, the one that knew
    most, is the one said."""
    if getattr(stop, "kept", None) is None:
        stop.kept = kept


def reason(error: BaseException, limit: int = 200) -> str:
    """``error`` as one short line: its message without TensorFlow's op wrapping, or its type's name.

    Every message that quotes another library's error goes through here.
    """
    if isinstance(error, OSError) and error.strerror and not error.filename:
        text = error.strerror
    else:
        text = getattr(error, "message", None) or str(error)
    text = " ".join(_TF_WRAPPING.sub("", str(text)).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text or type(error).__name__
