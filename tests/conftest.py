"""Shared fixtures. Real data and real weights come from ../shared (never copied into the repo).

Where ../shared is missing, tests that need it fail in CI (CI=true) and are skipped elsewhere,
with the reason said.

Tests that interrupt a running process never race it against a time constant: they look at its
observed progress (committed rows, a finished epoch, a line in its log) every ``POLL_SECONDS`` and
act on what they saw, and they size the work from what they measured on this machine. A timeout
only stops a hung test. ``BOTTLECACHE_TEST_POLL_SECONDS`` (default 0.01) sets how often they look:
a larger value lets more work happen between two looks, as on a machine that many times faster
(tests/test_reliability.py, module docstring).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOTTLECACHE_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
CATS_DOGS = SHARED / "data" / "cats_and_dogs_filtered"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Small slices of the real data keep the suite within CI's budget on 2 CPU cores.
SMALL_SPLITS = ["train=train[:96]", "validation=validation[:48]"]

# How often a test looks at a process it is about to interrupt (see the module docstring).
POLL_SECONDS = float(os.environ.get("BOTTLECACHE_TEST_POLL_SECONDS", "0.01"))


def _need(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is missing (tests need ../shared beside the repository)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; skipped outside CI only")
    return path


@pytest.fixture(scope="session")
def weights_path() -> Path:
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def cats_dogs() -> Path:
    return _need(CATS_DOGS)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's environment or writes to ./cache."""
    monkeypatch.delenv("BOTTLECACHE_WEIGHTS", raising=False)
    monkeypatch.setenv("BOTTLECACHE_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, weights_path, cats_dogs):
    """One float16 cache of a slice of cats_and_dogs_filtered, built once per session (Keras engine)."""
    from bottlecache import build_cache

    cache_dir = tmp_path_factory.mktemp("small-cache")
    report = build_cache(cats_dogs, SMALL_SPLITS, weights=weights_path, cache_dir=cache_dir, engine="keras")
    return report


def write_images(root: Path, layout: dict[str, int], size=(40, 30), seed: int = 0) -> Path:
    """Tiny generated JPEGs: ``{"cats": 5, "dogs": 5}`` or ``{"train/cats": 5, ...}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def float32_train_cache(tmp_path_factory, weights_path, cats_dogs):
    """A float32 cache with only a train split (48 images; Keras engine), built once per session."""
    from bottlecache import build_cache

    cache_dir = tmp_path_factory.mktemp("float32-train-cache")
    return build_cache(
        cats_dogs, ["train=train[:48]"], weights=weights_path, cache_dir=cache_dir, dtype="float32", engine="keras"
    )


def invoke(args, **kwargs):
    """Run the command line in-process (typer's CliRunner); ``result.stdout`` / ``result.stderr`` apart."""
    from typer.testing import CliRunner

    from bottlecache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def error_line(result) -> str:
    """The one line a failed command printed on stderr (it must be exactly one, and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def flip_byte_in_chunk(path: Path, split: str, chunk: int, dataset: str = "features") -> tuple[int, int]:
    """Flip one byte in the middle of a stored chunk of ``split/dataset``; return its row range."""
    import h5py

    with h5py.File(path, "r") as f:
        data = f[split][dataset]
        info = data.id.get_chunk_info(chunk)
        first = info.chunk_offset[0]
        last = min(first + data.chunks[0], data.shape[0]) - 1
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        value = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([value ^ 0xFF]))
    return first, last


def wait_until(condition, *, what: str, processes=(), timeout: float = 240.0, look=None):
    """Look every ``POLL_SECONDS`` until ``condition()`` returns something true, and return it.

    ``look`` (optional) runs at every look first. Fails naming ``what`` if one of ``processes``
    (those that must still run) ends first, or after ``timeout`` seconds: an upper bound that only
    stops a hung test, never a point where something is done to a process.
    """
    deadline = time.monotonic() + timeout
    while True:
        if look is not None:
            look()
        value = condition()
        if value:
            return value
        ended = [p for p in processes if p.poll() is not None]
        if ended:
            pytest.fail(f"{what}: process {ended[0].pid} ended first (exit {ended[0].returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still waiting after {timeout:.0f} s (a hung process?)")
        time.sleep(POLL_SECONDS)


class CommitClock:
    """A ``build_cache`` progress that notes when each commit (a window of rows) is handed over,
    to measure how fast this machine commits right now."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.starts: dict[str, float] = {}

    def start_split(self, split: str, total: int, done: int) -> None:
        self.times[split], self.starts[split] = [], time.monotonic()

    def advance(self, split: str, n: int) -> None:
        self.times[split].append(time.monotonic())

    def end_split(self, split: str) -> None: ...

    def message(self, text: str) -> None: ...

    def intervals(self) -> list[float]:
        """Seconds between consecutive commits of a split (the first of each split, which waits on
        the input pipeline and the model's first call, starts no interval)."""
        return [b - a for times in self.times.values() for a, b in itertools.pairwise(times)]

    @property
    def commits(self) -> int:
        return sum(len(times) for times in self.times.values())

    def first_commit_seconds(self) -> float:
        """From the first split's start to its first commit: a new process's model's first call."""
        split = next(iter(self.times))
        return self.times[split][0] - self.starts[split]

    def commits_per_second(self) -> float:
        """The fast end of the measured rate (the quarter of intervals that were shortest): kill
        points and work sizes planned on it err on the side of a faster machine."""
        intervals = self.intervals()
        assert intervals, "too few commits to measure a rate"
        return 1.0 / max(float(np.quantile(intervals, 0.25)), 1e-6)
