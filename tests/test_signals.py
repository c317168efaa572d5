"""Ctrl-C (SIGINT) and ``kill`` (SIGTERM) in the middle of every long command with a progress
bar (issue 25): the command ends within 60 s of the signal with exit 130 or 143 and one last
line that starts with ``error: interrupted``, no traceback, its inputs untouched, and nothing left
behind but what that line says is kept (a build's partial file, a fine-tuning run's finished
epochs).

The signal lands at observed progress, never at a time: each command runs in a child of a warm
launcher (tests/launcher.py) whose console renders the progress bars into the child's stderr file
(``TTY_INTERACTIVE``), and the test sends the signal when a look at that file sees a bar with at
least one unit done (an image, an epoch). The work is sized so that it is far from done then
(hundreds of epochs or photos). One signal per command, half of each kind (``SIGNALS``); the
SIGTERM of a build at a commit is tests/test_build.py's.
"""

from __future__ import annotations

import hashlib
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SIZE = 96
SPLITS = ["train=train[:32]", "validation=validation[:16]"]
# a bar with at least one unit done: "12/320" (MofNCompleteColumn), the first number not 0
DONE = re.compile(r"(?<![\d/\[])([1-9]\d*)/(\d+)(?![\d/\]])")  # not "[1/3]", a sweep's configuration


@pytest.fixture(scope="module")
def tty_launcher(tmp_path_factory):
    """A warm launcher whose children draw their progress bars into their stderr file."""
    from launcher import WarmLauncher

    server = WarmLauncher(tmp_path_factory.mktemp("tty-launcher"), env={"TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights_path, cats_dogs):
    """A 96 px cache and a scikit-learn and a Keras head on it, made once for the module."""
    from bottlecache import build_cache, train_head

    root = tmp_path_factory.mktemp("signals")
    cache = build_cache(cats_dogs, SPLITS, image_size=SIZE, weights=weights_path, cache_dir=root / "cache",
                        engine="keras").path
    return {"root": root, "cache": cache,
            "sk_head": train_head(cache, "sklearn", out=root / "sk").path,
            "keras_head": train_head(cache, "keras", epochs=1, out=root / "keras").path}


def _argv(name: str, w: dict, out: Path, weights: Path, cats_dogs: Path) -> list:
    return {
        "cache build": ["cache", "build", "--data", cats_dogs, "--weights", weights, "--cache-dir", out / "cache",
                        "--image-size", SIZE, "--engine", "keras", "--batch-size", 8, "--split", "train=train[:640]"],
        "cache train-head": ["cache", "train-head", w["cache"], "--kind", "keras", "--epochs", 1000,
                             "--out", out / "head"],
        "finetune run": ["finetune", "run", "--head", w["keras_head"], "--split", "train=train[:320]",
                         "--split", "validation=validation[:16]", "--image-size", SIZE, "--epochs", 20,
                         "--batch-size", 8, "--cache-dir", out / "cache", "--out", out / "model"],
        "predict": ["predict", w["sk_head"], cats_dogs / "train", "--csv", out / "rows.csv"],
        "export": ["export", w["sk_head"], "--format", "keras", "--data", cats_dogs, "--out", out / "export"],
        "sweep": ["sweep", "--data", cats_dogs, "--split", "train=train[:640]", "--split", "validation=validation[:16]",
                  "--image-size", SIZE, "--kind", "sklearn", "--weights", weights, "--engine", "keras",
                  "--cache-dir", out / "cache", "--out", out / "sweep"],
    }[name]


# What the interrupted line may leave behind (paths relative to the test's output folder), by
# command: the cache folder with its .gitignore, a build's partial file, a fine-tuning run's
# folder with its checkpoint of finished epochs. Anything else new is a leftover.
KEPT = {
    "cache build": r"cache(/\.gitignore|/[^/]+\.h5\.partial)?",
    "sweep": r"cache(/\.gitignore|/[^/]+\.h5\.partial)?",
    "finetune run": r"cache(/\.gitignore)?|model(/\.checkpoint(/(best\.weights\.h5|last\.keras|state\.json|head_metrics\.json))?)?",
}
COMMANDS = list(KEPT) + ["cache train-head", "predict", "export"]
# Ctrl-C where one was reported swallowed (a Keras head's training) and where a build's partial
# file is kept (its SIGTERM: tests/test_build.py); SIGTERM for the others, half of them
SIGNALS = {"cache build": signal.SIGINT, "cache train-head": signal.SIGINT, "predict": signal.SIGINT,
           "export": signal.SIGTERM, "finetune run": signal.SIGTERM, "sweep": signal.SIGTERM}


def _tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` by content, every folder by name."""
    state = {}
    for root in roots:
        paths = [root] if root.is_file() else [root, *root.rglob("*")]
        for path in paths:
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.mark.parametrize("name", sorted(COMMANDS), ids=[f"{n} ({SIGNALS[n].name})" for n in sorted(COMMANDS)])
def test_a_signal_mid_command_ends_it_in_one_line_leaving_only_what_it_says_it_kept(name, world, tty_launcher,
                                                                                    tmp_path, weights_path, cats_dogs):
    sig = SIGNALS[name]
    out = tmp_path / "out"
    out.mkdir()
    inputs = [world["cache"], world["sk_head"], world["keras_head"], weights_path]
    before = _tree(*inputs)
    log = tmp_path / "stderr.txt"
    process = tty_launcher.start(_argv(name, world, out, weights_path, cats_dogs), stdout=tmp_path / "stdout.txt",
                                 stderr=log, env={"COLUMNS": "200"})
    try:
        seen = wait_until(lambda: DONE.search(log.read_text(errors="replace")), what=f"{name}: a bar with one unit done",
                          processes=[process])
        signalled = time.monotonic()
        process.send_signal(sig)
        process.wait(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colours out; cursor moves (the live bars) end a line
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", plain).splitlines() if line.strip()]
    expected = 130 if sig == signal.SIGINT else 143
    assert process.returncode == expected and "Traceback" not in text, f"exit {process.returncode}: {text[-3000:]}"
    assert lines[-1].startswith("error: interrupted"), text[-3000:]
    assert seconds <= 60, f"{name} took {seconds:.1f} s to end after {sig.name}"
    assert _tree(*inputs) == before, "an input changed"
    kept = re.compile(KEPT.get(name, r"$^"))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert [p for p in left if not kept.fullmatch(p)] == [], f"left behind after {seen.group(0)} done: {left}; {lines[-1]}"
    if name in ("cache build", "sweep"):  # the partial file holds what the line says
        assert re.fullmatch(r"error: interrupted(; \d+ finished images are kept in \S+\.h5\.partial; .*| before .*)",
                            lines[-1]), lines[-1]
