"""The ``bottlecache`` command (and ``python -m bottlecache``).

Ctrl-C and SIGTERM are caught from the first line: importing the command line takes about a
second (typer, rich, pydantic, scikit-learn), and an interrupt then would otherwise end in a
traceback (Ctrl-C) or a silent kill (SIGTERM). The command line installs its own handling next.
"""

import signal
import sys


class _Terminated(KeyboardInterrupt):
    pass


def _terminated(signum, frame):
    raise _Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from .cli import main as run
    except KeyboardInterrupt as stop:
        sys.stderr.write("error: interrupted while starting; nothing was done\n")
        sys.exit(143 if isinstance(stop, _Terminated) else 130)
    run()


if __name__ == "__main__":
    main()
