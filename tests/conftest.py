"""Shared fixtures. Real data and real weights come from ../shared (never copied into the repo).

Where ../shared is missing, tests that need it fail in CI (CI=true) and are skipped elsewhere,
with the reason said.
"""

from __future__ import annotations

import os
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
