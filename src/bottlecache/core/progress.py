"""The progress protocol long work reports to: cache builds, head training, fine-tuning.

The library calls these methods; the command line passes a rich progress bar
(``cli._common.RichProgress``); ``NullProgress`` reports nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start_split(self, split: str, total: int, done: int) -> None: ...

    def advance(self, split: str, n: int) -> None: ...

    def end_split(self, split: str) -> None: ...

    def message(self, text: str) -> None: ...


class NullProgress:
    """Reports nothing (the default when no progress is passed)."""

    def start_split(self, split: str, total: int, done: int) -> None: ...

    def advance(self, split: str, n: int) -> None: ...

    def end_split(self, split: str) -> None: ...

    def message(self, text: str) -> None: ...
