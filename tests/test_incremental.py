"""Incremental caches (issue 14): a build copies the rows of unchanged files from the newest
compatible cache and computes only new or changed files; the result equals a clean build.

Real photos (a few dozen of cats_and_dogs_filtered, copied into tmp_path) at 96 px, built with
the LiteRT engine, whose rows do not depend on which other images share their batch (measured in
docs/cache-format.md, "Incremental builds"): an incremental build must then equal a clean build
array for array. The flatbuffer is converted once per run (conftest.converted) and copied into each cache folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import flip_byte_in_chunk, invoke, write_images

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is a dependency; install the project")

pytestmark = pytest.mark.slow  # every test builds with the run's converted flatbuffer

SIZE = 96
LAYOUT = {"train/cats": 8, "train/dogs": 8, "validation/cats": 4, "validation/dogs": 4}
EXTRA = 3  # photos per folder held back, to be added later


class Messages:
    """A build progress that keeps the messages (and can stop the build at a chosen commit)."""

    def __init__(self, stop_at_advance: int | None = None):
        self.lines: list[str] = []
        self.advances = 0
        self.stop_at_advance = stop_at_advance

    def start_split(self, split, total, done): ...

    def advance(self, split, n):
        self.advances += 1
        if self.advances == self.stop_at_advance:
            raise KeyboardInterrupt  # after an observed commit hand-over, never after a time

    def end_split(self, split): ...

    def message(self, text):
        self.lines.append(text)


@pytest.fixture(scope="module")
def photo_pool(tmp_path_factory, cats_dogs) -> Path:
    """Real photos laid out as ``LAYOUT`` plus ``EXTRA`` more per folder in ``held/``."""
    pool = tmp_path_factory.mktemp("photos")
    for folder, n in LAYOUT.items():
        split, cls = folder.split("/")
        files = sorted((cats_dogs / split / cls).iterdir())[: n + EXTRA]
        for target, chosen in (("data", files[:n]), ("held", files[n:])):
            (pool / target / folder).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, pool / target / folder / f.name)
    return pool


@pytest.fixture(scope="module")
def flatbuffer(converted) -> Path:
    """The run's converted flatbuffer at SIZE (conftest.converted), copied into each cache folder."""
    (path,) = (converted(SIZE) / "engines").glob("*.tflite")
    return path


@pytest.fixture
def world(tmp_path, photo_pool, flatbuffer):
    data = tmp_path / "photos"
    shutil.copytree(photo_pool / "data", data)
    return World(tmp_path, data, photo_pool / "held", flatbuffer)


class World:
    def __init__(self, root: Path, data: Path, held: Path, flatbuffer: Path):
        self.root, self.data, self.held, self.flatbuffer = root, data, held, flatbuffer
        self.cache_dir = self.folder("cache")

    def folder(self, name: str) -> Path:
        """A cache folder holding the converted flatbuffer, as a user's second build finds it."""
        folder = self.root / name
        target = folder / "engines" / self.flatbuffer.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.flatbuffer, target)
        shutil.copy2(self.flatbuffer.with_suffix(".json"), target.with_suffix(".json"))
        return folder

    def build(self, data=None, cache_dir=None, **options):
        from bottlecache import build_cache

        return build_cache(data or self.data, image_size=SIZE, weights=_weights(), cache_dir=cache_dir or self.cache_dir,
                           engine="litert", **options)

    def assert_equals_clean_build(self, report, data=None):
        """The cache equals, array for array, a clean build of the same folder in a fresh cache dir."""
        clean = self.build(data, cache_dir=self.folder(f"clean-{report.fingerprint[:8]}"), reuse=False)
        assert clean.fingerprint == report.fingerprint and not clean.hit
        assert clean.reuse.source is None and clean.reuse.reused == 0
        with h5py.File(report.path, "r") as a, h5py.File(clean.path, "r") as b:
            assert a.attrs["class_names"] == b.attrs["class_names"] and a.attrs["config"] == b.attrs["config"]
            assert sorted(a) == sorted(b)
            for split in a:
                assert sorted(a[split]) == sorted(b[split]) and "content" in a[split]
                for name in a[split]:
                    assert np.array_equal(a[split][name][:], b[split][name][:]), f"{split}/{name} differs"


def _weights():
    from conftest import WEIGHTS

    return WEIGHTS


def _rows(path: Path, key: str) -> tuple[np.ndarray, int]:
    """The features and label of the row with ``key`` in any split."""
    with h5py.File(path, "r") as f:
        for split in f:
            keys = [k.decode() for k in f[split]["keys"][:]]
            if key in keys:
                i = keys.index(key)
                return f[split]["features"][i], int(f[split]["labels"][i])
    raise KeyError(key)


def test_renamed_and_copied_photos_are_reused(world):
    first = world.build()
    assert first.reuse.source is None and first.reuse.computed == 24
    old = world.data / "train/cats" / sorted(p.name for p in (world.data / "train/cats").iterdir())[0]
    features, label = _rows(first.path, old.relative_to(world.data).as_posix())
    old.rename(old.with_name("renamed.jpg"))

    result = invoke(["cache", "build", "--data", world.data, "--image-size", SIZE, "--weights", _weights(),
                     "--cache-dir", world.cache_dir, "--engine", "litert", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reuse"]["source"] == str(first.path)
    assert (report["reuse"]["reused"], report["reuse"]["computed"], report["reuse"]["dropped"]) == (24, 0, 0)
    assert sum(s["n_reused"] for s in report["splits"]) == 24
    renamed = _rows(Path(report["path"]), "train/cats/renamed.jpg")
    assert np.array_equal(renamed[0], features) and renamed[1] == label

    copy = world.root / "elsewhere" / "photos-copy"
    shutil.copytree(world.data, copy)  # new mtimes, new place: a new fingerprint, every row reused
    copied = world.build(copy)
    assert copied.fingerprint != report["fingerprint"]
    assert (copied.reuse.reused, copied.reuse.computed, copied.reuse.dropped) == (24, 0, 0)
    world.assert_equals_clean_build(copied, copy)


def test_changed_bytes_are_computed_and_old_rows_dropped(world):
    world.build()
    changed = world.data / "validation/dogs" / sorted(p.name for p in (world.data / "validation/dogs").iterdir())[1]
    shutil.copy(next((world.held / "validation/dogs").iterdir()), changed)  # same name, other photo
    added = next((world.held / "train/cats").iterdir())
    shutil.copy(added, world.data / "train/cats" / added.name)
    removed = world.data / "train/dogs" / sorted(p.name for p in (world.data / "train/dogs").iterdir())[2]
    removed.unlink()

    result = invoke(["cache", "build", "--data", world.data, "--image-size", SIZE, "--weights", _weights(),
                     "--cache-dir", world.cache_dir, "--engine", "litert"])
    assert result.exit_code == 0, result.output
    assert "reused 22, computed 2, dropped 2 from " in result.stdout  # the changed and the removed file
    report = world.build()  # the same folder again: a hit of the cache just built
    assert report.hit and report.reuse is None
    world.assert_equals_clean_build(report)

    forced = world.build(cache_dir=world.folder("forced"), reuse=False)
    assert forced.reuse.source is None and forced.reuse.computed == 24


def test_files_listed_as_before_are_not_read_again(world):
    """A file whose relative path, size and modification time match a row's ``file_stat`` takes
    that row's digest; a new file, and one touched (same bytes, new mtime), are hashed."""
    import os

    first = world.build()
    assert first.reuse.hashed == 24
    with h5py.File(first.path, "r") as f:  # each row records its file's listing
        keys = [k.decode() for k in f["train"]["keys"][:]]
        stats = f["train"]["file_stat"][:]
    listed = os.stat(world.data / keys[0])
    assert stats[0].tolist() == [listed.st_size, listed.st_mtime_ns]

    added = next((world.held / "train/cats").iterdir())
    shutil.copy(added, world.data / "train/cats" / added.name)
    touched = world.data / keys[1]
    os.utime(touched, ns=(listed.st_atime_ns, stats[1][1] + 10**9))
    report = world.build()
    assert report.reuse.hashed == 2  # the added file and the touched one
    assert (report.reuse.reused, report.reuse.computed, report.reuse.dropped) == (24, 1, 0)
    world.assert_equals_clean_build(report)


def test_photo_moved_to_another_class_keeps_features_and_takes_new_label(world):
    first = world.build()
    moved = world.data / "train/cats" / sorted(p.name for p in (world.data / "train/cats").iterdir())[3]
    features, label = _rows(first.path, moved.relative_to(world.data).as_posix())
    assert label == 0  # cats
    second = world.data / "train/dogs" / sorted(p.name for p in (world.data / "train/dogs").iterdir())[0]
    second.rename(world.data / "validation/dogs" / second.name)  # to another split folder too
    target = world.data / "train/dogs" / moved.name
    moved.rename(target)

    report = world.build()
    assert (report.reuse.reused, report.reuse.computed, report.reuse.dropped) == (24, 0, 0)
    new_features, new_label = _rows(report.path, target.relative_to(world.data).as_posix())
    assert new_label == 1 and np.array_equal(new_features, features)
    world.assert_equals_clean_build(report)


@pytest.mark.parametrize("dataset,rows", [("features", 1), ("pooled", 16)])
def test_rows_of_a_damaged_source_are_computed_not_copied(world, dataset, rows):
    """A features chunk holds one row (copied as stored, its checksum checked without HDF5); a
    pooled chunk holds 32 rows, so all 16 of train's rows share chunk 0."""
    first = world.build()
    first_row, last_row = flip_byte_in_chunk(first.path, "train", 0, dataset)
    added = next((world.held / "validation/cats").iterdir())
    shutil.copy(added, world.data / "validation/cats" / added.name)

    progress = Messages()
    report = world.build(progress=progress)
    n_damaged = last_row - first_row + 1
    assert report.reuse.unreadable == n_damaged == rows
    assert (report.reuse.reused, report.reuse.computed) == (24 - rows, rows + 1)
    assert any(f"{rows} rows of" in line and "fail their checksums" in line for line in progress.lines), progress.lines
    world.assert_equals_clean_build(report)


def test_interrupted_update_resumes(world):
    world.build()
    for folder in ("train/cats", "validation/dogs"):
        for photo in (world.held / folder).iterdir():
            shutil.copy(photo, world.data / folder / photo.name)

    with pytest.raises(KeyboardInterrupt):
        world.build(progress=Messages(stop_at_advance=1))  # stops once train's first window is handed over
    assert list(world.cache_dir.glob("*.partial"))
    report = world.build()
    assert report.resumed and not report.hit
    assert report.reuse.source is not None and report.reuse.computed == 2 * EXTRA
    world.assert_equals_clean_build(report)


def test_hash_split_keeps_every_file_in_its_split(tmp_path):
    """The 80/10/10 hash split places a file by its relative path: adding or removing files moves
    no other file, and a file whose bytes change stays where it was."""
    from bottlecache.data.sources import open_source

    data = write_images(tmp_path / "flat", {"cats": 40, "dogs": 40})

    def placement():
        source = open_source(data)
        return {key: name for name, split in source.splits.items() for key in split.keys}

    before = placement()
    write_images(tmp_path / "more", {"cats": 12, "dogs": 12}, seed=1)
    for photo in (tmp_path / "more").rglob("*.jpg"):
        shutil.copy(photo, data / photo.parent.name / f"new-{photo.name}")
    for name in ("img001.jpg", "img007.jpg"):
        (data / "dogs" / name).unlink()
    shutil.copy(data / "cats" / "img002.jpg", data / "cats" / "img003.jpg")  # new bytes, same name
    after = placement()
    assert len(after) == len(before) + 24 - 2
    assert all(after[key] == split for key, split in before.items() if key in after)
    assert after["cats/img003.jpg"] == before["cats/img003.jpg"]
