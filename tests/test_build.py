"""The cache build (issue 2): features equal to the Keras model's, cache hits, resume after a
kill, corrupt files, reading, checking and verifying a cache."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    POLL_SECONDS,
    SMALL_SPLITS,
    CommitClock,
    error_line,
    flip_byte_in_chunk,
    invoke,
    wait_until,
    write_images,
)

from bottlecache import build_cache, open_cache, verify_cache
from bottlecache.cache.store import Cache
from bottlecache.core.errors import BottlecacheError, CacheMismatchError
from bottlecache.data.sources import load_image, open_source

ARRAYS = ("features", "pooled", "labels", "keys", "skipped")


def _read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        return {split: {name: f[split][name][:] for name in ARRAYS} for split in f if isinstance(f[split], h5py.Group)}


# ---------------------------------------------------------------------------------------------
# Content


@pytest.mark.slow
def test_features_equal_the_keras_model(small_cache, weights_path, cats_dogs):
    """The stored features are the Keras base's output on the shared preprocessing (float16)."""
    from bottlecache.models.backbone import load_backbone, resolve_weights

    model = load_backbone(resolve_weights(weights_path, 160), 160)
    source = open_source(cats_dogs, SMALL_SPLITS)
    with open_cache(small_cache.path) as cache:
        assert cache.splits == ["train", "validation"]
        assert cache.class_names == ["cats", "dogs"]
        assert cache.config["dtype"] == "float16" and cache.config["image_size"] == 160
        assert cache.build_info["engine"] == "keras"
        for split in cache.splits:
            keys = cache.keys(split)
            assert keys == source.split(split).keys  # the split's fixed order, nothing skipped
            labels = cache.labels(split)
            np.testing.assert_array_equal(labels, [("dogs/" in k) * 1 for k in keys])
            stored = cache.features(split)
            pooled = cache.pooled(split)
            assert stored.dtype == np.float16 and stored.shape == (len(keys), 5, 5, 1280)
            assert pooled.dtype == np.float32 and pooled.shape == (len(keys), 1280)

            images = np.stack([load_image(cats_dogs / key, 160).numpy() for key in keys])
            direct = np.concatenate(
                [model(images[i : i + 32], training=False).numpy() for i in range(0, len(images), 32)]
            )
            assert direct.shape == stored.shape and direct.max() > 1.0  # a real activation map (ReLU6)
            # float16 keeps 11 significant bits: |error| <= 2**-11 * |x| (values are at most 6)
            np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=1e-3, atol=1e-3)
            # pooled is the mean of the float32 features, not of the float16 ones
            np.testing.assert_allclose(pooled, direct.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(pooled, stored.astype(np.float32).mean(axis=(1, 2)), rtol=1e-3, atol=1e-3)


def test_cache_hit_recomputes_nothing(small_cache, weights_path, cats_dogs):
    before = small_cache.path.stat()
    files = sorted(p.name for p in small_cache.path.parent.iterdir())
    # batch size and engine are not part of the fingerprint: still the same cache
    report = build_cache(
        cats_dogs, SMALL_SPLITS, weights=weights_path, cache_dir=small_cache.path.parent, engine="keras", batch_size=7
    )
    assert report.hit and not report.resumed
    assert report.path == small_cache.path and report.fingerprint == small_cache.fingerprint
    assert [s.n_processed for s in report.splits] == [0, 0]
    assert [(s.name, s.n_images, s.n_skipped) for s in report.splits] == [("train", 96, 0), ("validation", 48, 0)]
    assert report.engine == "keras"
    after = small_cache.path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert sorted(p.name for p in small_cache.path.parent.iterdir()) == files  # no partial, nothing new


def test_cache_identity_changes_with_the_content(small_cache, weights_path, cats_dogs):
    """Another slice, dtype or size is another cache (checked without building it)."""
    from bottlecache.cache.settings import CacheSettings

    def resolved(splits=tuple(SMALL_SPLITS), **kw):
        return CacheSettings(str(cats_dogs), splits, weights=str(weights_path), **kw).resolve()

    base = resolved()
    assert base.fingerprint == small_cache.fingerprint and base.path.name == small_cache.path.name
    others = [
        resolved(("train=train[:95]", "validation=validation[:48]")),
        resolved(dtype="float32"),
        resolved(image_size=96),
        resolved(fast_decode=True),
    ]
    assert len({c.fingerprint for c in others} | {base.fingerprint}) == 5


# ---------------------------------------------------------------------------------------------
# Resume after a kill


def _partial_rows(path: Path, errors: list):
    """``{split: (n_done, complete)}`` of a partial file being written by another process (None
    while unreadable)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {name: (int(f[name].attrs["n_done"]), bool(f[name].attrs["complete"]))
                    for name in json.loads(f.attrs["splits"])}
    except Exception as error:  # caught between two writes: try again
        errors.append(f"{type(error).__name__}: {error}")
        return None


def sized_clean_build(tmp_path, weights_path, cats_dogs, errors: list):
    """A clean build large enough that a look at its partial file lands between its first commit
    and its last: as many commits after the first as can land between two looks at the commit rate
    this build measured, plus one in flight and one to spare (a larger build on a machine fast enough
    to need it). At 96 px: the size of the images is not what these tests check. Returns the clean
    build, its splits and the figures it was sized from."""
    train = 96
    for attempt in range(3):
        splits = [f"train=train[:{train}]", "validation=validation[:24]"]
        clean_dir, clock = tmp_path / f"clean{attempt}", CommitClock()
        clean = build_cache(cats_dogs, splits, image_size=96, weights=weights_path, cache_dir=clean_dir,
                            batch_size=8, engine="keras", progress=clock)
        begun = time.monotonic()
        _partial_rows(clean.path, errors)
        look = POLL_SECONDS + time.monotonic() - begun
        rate = clock.commits_per_second()
        need = 3 + math.ceil(rate * look)  # the first commit, those a look can miss, one in flight, one left
        if clock.commits >= need:
            break
        train = min(open_source(cats_dogs, ["train=train"]).split("train").n_examples, 32 * need)
    figures = f"{clock.commits} commits ({splits}) at {rate:.1f} commits/s, a look every {look:.3f} s"
    assert clock.commits >= need, f"not enough photos: {figures}; {need} commits needed"
    return clean, splits, figures


def assert_equal_builds(resumed, clean) -> None:
    assert not clean.resumed and clean.fingerprint == resumed.fingerprint
    a, b = _read_all(resumed.path), _read_all(clean.path)
    assert set(a) == set(b) == {"train", "validation"}
    for split in a:
        for name in ARRAYS:
            assert a[split][name].dtype == b[split][name].dtype, (split, name)
            assert np.array_equal(a[split][name], b[split][name]), (split, name)
    assert verify_cache(resumed.path).ok


@pytest.mark.slow
@pytest.mark.faults
def test_resume_after_kill_equals_clean_build(tmp_path, weights_path, cats_dogs, launcher):
    """A build killed as soon as a look sees its first commit resumes from what it committed and
    equals the clean build. The kill point is observed progress, never a time; the build is sized
    from the commit rate measured here (``sized_clean_build``)."""
    errors = []
    clean, splits, figures = sized_clean_build(tmp_path, weights_path, cats_dogs, errors)

    killed_dir = tmp_path / "killed"
    command = [
        "cache", "build", "--data", cats_dogs, "--weights", weights_path,
        "--cache-dir", killed_dir, "--batch-size", "8", "--engine", "keras", "--image-size", "96",
    ]
    for spec in splits:
        command += ["--split", spec]
    log = tmp_path / "build.log"
    process = launcher.start(command, stdout=log)  # a child of the warm launcher (TensorFlow imported)

    def no_final_name():  # the final name never exists while the partial is incomplete
        assert not list(killed_dir.glob("*.h5")), "a final cache file exists beside an incomplete partial"

    def first_commit():
        partials = list(killed_dir.glob("*.h5.partial"))
        state = _partial_rows(partials[0], errors) if partials else None
        return state is not None and sum(n for n, _ in state.values()) > 0

    try:
        wait_until(first_commit, what=f"a commit of the build before it ended ({figures}); last read error: "
                   f"{errors[-1] if errors else None}", processes=[process], look=no_final_name)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not list(killed_dir.glob("*.h5"))
    (partial,) = killed_dir.glob("*.h5.partial")
    state = _partial_rows(partial, errors)  # the writer is dead: this must read
    n_images = {s.name: s.n_images for s in clean.splits}
    assert state is not None and 0 < sum(n for n, _ in state.values()) < sum(n_images.values()), (state, figures)
    assert not all(complete for _, complete in state.values())

    resumed = build_cache(cats_dogs, splits, weights=weights_path, cache_dir=killed_dir, batch_size=8, engine="keras",
                           image_size=96)
    assert resumed.resumed and not resumed.hit
    assert not partial.exists() and resumed.path.name == partial.name[: -len(".partial")]
    for split in resumed.splits:  # committed rows were kept
        assert split.n_images == n_images[split.name] and split.n_processed == split.n_images - state[split.name][0]

    assert_equal_builds(resumed, clean)


# ---------------------------------------------------------------------------------------------
# Corrupt files


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    root = write_images(tmp_path_factory.mktemp("corrupt") / "pets", {"train/a": 6, "train/b": 6})
    (root / "train/a/empty.jpg").write_bytes(b"")
    data = (root / "train/b/img000.jpg").read_bytes()
    (root / "train/b/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "train/a/text.jpg").write_text("this is not an image\n")
    return root


BROKEN = {"train/a/empty.jpg": "empty", "train/b/truncated.jpg": "Invalid JPEG", "train/a/text.jpg": "Unknown image"}


def test_corrupt_files_are_skipped_and_listed(corrupt_folder, weights_path, tmp_path):
    cache_dir = tmp_path / "cache"
    report = build_cache(corrupt_folder, image_size=96, weights=weights_path, cache_dir=cache_dir, engine="keras",
                         batch_size=8)
    (split,) = report.splits
    assert (split.name, split.n_images, split.n_skipped, split.n_processed) == ("train", 12, 3, 15)
    reasons = dict(split.skipped)
    assert set(reasons) == set(BROKEN)
    for key, expected in BROKEN.items():
        assert expected in reasons[key] and "function_node" not in reasons[key], reasons[key]
    with open_cache(report.path) as cache:
        assert cache.skipped("train") == split.skipped
        assert not set(cache.keys("train")) & set(BROKEN)
        assert sorted(cache.keys("train")) == sorted(f"train/{c}/img{i:03d}.jpg" for c in "ab" for i in range(6))
        assert cache.features("train").shape == (12, 3, 3, 1280)
        np.testing.assert_array_equal(cache.labels("train"), [k.startswith("train/b/") for k in cache.keys("train")])
    assert verify_cache(report.path).ok

    # the command line's summary counts them and names each with its reason (cache hit here)
    result = invoke(["cache", "build", "--data", corrupt_folder, "--image-size", 96, "--weights", weights_path,
                     "--cache-dir", cache_dir, "--engine", "keras"])
    assert result.exit_code == 0, result.output
    assert "cache hit" in result.stdout and "3 skipped" in result.stdout
    for key, expected in BROKEN.items():
        assert any(line.startswith(f"  skipped {key}: ") and expected in line for line in result.stderr.splitlines())

    result = invoke(["cache", "build", "--data", corrupt_folder, "--image-size", 96, "--weights", weights_path,
                     "--cache-dir", cache_dir, "--json"])
    record = json.loads(result.stdout)
    assert record["hit"] and record["splits"][0]["n_skipped"] == 3
    assert {k for k, _ in record["splits"][0]["skipped"]} == set(BROKEN)


# ---------------------------------------------------------------------------------------------
# Reading a cache


def test_cache_dataset_equals_features(small_cache):
    with open_cache(small_cache.path) as cache:
        for split in cache.splits:
            features, pooled, labels = cache.features(split), cache.pooled(split), cache.labels(split)
            rows = list(cache.dataset(split).as_numpy_iterator())
            assert len(rows) == len(labels)
            np.testing.assert_array_equal(np.stack([x for x, _ in rows]), features.astype(np.float32))
            np.testing.assert_array_equal(np.array([y for _, y in rows]), labels)
            batches = list(cache.dataset(split, "pooled", batch_size=20).as_numpy_iterator())
            assert [len(y) for _, y in batches][0] == 20
            np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), pooled)
            np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
            assert int(cache.dataset(split).cardinality()) == len(labels)
            np.testing.assert_array_equal(cache.features(split, slice(10, 20)), features[10:20])
        with pytest.raises(BottlecacheError, match="'what' option"):
            cache.dataset("train", "images")
        with pytest.raises(BottlecacheError, match="no split 'test'"):
            cache.features("test")


def test_cache_check_names_the_mismatched_key(small_cache, weights_path):
    with open_cache(small_cache.path) as cache:
        sha = cache.config["weights_sha256"]
        cache.check(image_size=160, model="mobilenet_v2", weights_sha256=sha, dtype="float16")  # all match
        with pytest.raises(CacheMismatchError, match="image_size: cache has 160, expected 96") as caught:
            cache.check(image_size=96, weights_sha256=sha)
        assert "weights_sha256" not in str(caught.value)
        with pytest.raises(CacheMismatchError) as caught:
            cache.check(weights_sha256="0" * 64, dtype="float32")
        assert "weights_sha256" in str(caught.value) and "dtype" in str(caught.value)
    with pytest.raises(CacheMismatchError, match="image_size"):
        open_cache(small_cache.path, image_size=224)


def test_open_cache_errors(small_cache, tmp_path):
    partial = tmp_path / (small_cache.path.name + ".partial")
    shutil.copy(small_cache.path, partial)
    with pytest.raises(BottlecacheError, match="partial cache"):
        open_cache(partial)
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not hdf5")
    with pytest.raises(BottlecacheError, match="not a readable HDF5 file"):
        open_cache(not_hdf5)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(BottlecacheError, match="not a bottlecache cache"):
        open_cache(other)
    with pytest.raises(BottlecacheError, match="No cache file"):
        open_cache(tmp_path / "missing.h5")
    with pytest.raises(BottlecacheError, match="unique fingerprint prefix"):
        open_cache("0123456789", cache_dir=small_cache.path.parent)
    with open_cache(small_cache.fingerprint[:8], cache_dir=small_cache.path.parent) as cache:  # by prefix
        assert cache.path == small_cache.path
    with open_cache(cache_dir=small_cache.path.parent) as cache:  # the newest
        assert cache.path == small_cache.path


# ---------------------------------------------------------------------------------------------
# Verifying


def test_verify_detects_a_flipped_byte(small_cache, tmp_path):
    assert verify_cache(small_cache.path).ok
    report = verify_cache(small_cache.path)
    assert report.counts == {"train": 96, "validation": 48} and report.bytes_read > 0

    copy = tmp_path / small_cache.path.name
    shutil.copy(small_cache.path, copy)
    first, last = flip_byte_in_chunk(copy, "train", 33)  # one row per features chunk
    assert (first, last) == (33, 33)
    report = verify_cache(copy)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("split 'train': features row 33 fails to read")
    with open_cache(copy) as cache, Cache(small_cache.path) as original:
        np.testing.assert_array_equal(cache.features("train", slice(0, 32)), original.features("train", slice(0, 32)))
        with pytest.raises(BottlecacheError, match="split 'train' features failed to read.*cache verify"):
            cache.features("train")


def test_verify_reports_files_that_are_not_caches(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"\0" * 100)
    report = verify_cache(bad)
    assert not report.ok and "not a readable HDF5 file" in report.problems[0]


@pytest.mark.parametrize("kind, expected", [("text", "is not an HDF5 file"),
                                             ("hdf5", "could not be loaded into MobileNetV2")])
def test_bad_weights_file_leaves_nothing_behind(kind, expected, tmp_path, cats_dogs):
    """A weights file that does not load fails before the cache file is created (exit 2), and leaves
    no partial file and no lock file behind: only the folder's .gitignore."""
    import h5py

    weights = tmp_path / "not-weights.h5"
    if kind == "text":
        weights.write_text("hello")
    else:
        with h5py.File(weights, "w") as f:
            f["kernel"] = np.zeros((3, 3))
    cache_dir = tmp_path / "cache"
    for attempt in range(2):  # the second run must not "resume" anything either
        result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--weights", weights,
                         "--cache-dir", cache_dir, "--engine", "keras"])
        assert result.exit_code == 2
        line = error_line(result)
        assert expected in line and "not-weights.h5" in line
        assert not cache_dir.exists() or sorted(p.name for p in cache_dir.iterdir()) == [".gitignore"]


def test_a_blocks_windows_are_committed_as_one():
    """``Rows.joined``: the rows, strings and records of consecutive windows in order, the last
    window's ``n_done``, and stored rows at their positions in the joined commit."""
    from bottlecache.cache.store import Rows

    def window(first, n, n_done, stored=None, computed=None):
        computed = n if computed is None else computed
        features = np.full((computed, 2, 2, 3), first, np.float32)
        return Rows("train", features, np.full((n, 3), first, np.float32), np.arange(first, first + n),
                    [f"k{first + i}" for i in range(n)], [(f"bad{first}", "not an image")], n_done, None,
                    np.full((n, 32), first, np.uint8), np.full((n, 2), first, np.int64), stored)

    a, b = window(0, 3, 4), window(10, 2, 8, stored={1: b"row 11"}, computed=1)
    name, features, pooled, labels, keys, skipped, n_done, views, contents, stats, stored = Rows.joined([a, b])
    assert (name, n_done, views) == ("train", 8, None)
    assert features[:, 0, 0, 0].tolist() == [0, 0, 0, 10]  # the stored row is not among them
    assert pooled[:, 0].tolist() == [0, 0, 0, 10, 10] and labels.tolist() == [0, 1, 2, 10, 11]
    assert keys == ["k0", "k1", "k2", "k10", "k11"] and [s[0] for s in skipped] == ["bad0", "bad10"]
    assert contents[:, 0].tolist() == stats[:, 0].tolist() == [0, 0, 0, 10, 10]
    assert stored == {4: b"row 11"}  # row 1 of the second window: row 4 of the commit
    assert Rows.joined([a]) is a


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_ends_a_build_as_ctrl_c_does_and_it_resumes(tmp_path, weights_path, cats_dogs, launcher):
    """`kill PID` (SIGTERM) at the first commit a look sees: exit 143 with the one interrupted line,
    which names the images the partial file holds; no lock held; the same command then resumes it
    to the clean build. Sized like the kill test above, from the commit rate measured here."""
    errors = []
    clean, splits, figures = sized_clean_build(tmp_path, weights_path, cats_dogs, errors)
    cache_dir = tmp_path / "terminated"
    command = ["cache", "build", "--data", cats_dogs, "--weights", weights_path, "--cache-dir", cache_dir,
               "--batch-size", "8", "--engine", "keras", "--image-size", "96", *[t for s in splits for t in ("--split", s)]]
    log = tmp_path / "build.log"
    process = launcher.start(command, stdout=log)

    def first_commit():
        partials = list(cache_dir.glob("*.h5.partial"))
        state = _partial_rows(partials[0], errors) if partials else None
        return state is not None and sum(n for n, _ in state.values()) > 0

    try:
        wait_until(first_commit, what=f"a commit of the build ({figures})", processes=[process])
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)  # the contract: within 60 s of the signal
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert process.returncode == 143 and lines, log.read_text()[-2000:]
    (partial,) = cache_dir.glob("*.h5.partial")
    kept = sum(n for n, _ in _partial_rows(partial, errors).values())
    assert 0 < kept < sum(s.n_images for s in clean.splits), figures
    assert lines[-1] == (f"error: interrupted; {kept} finished images are kept in {partial.name}; run the same "
                         "command again to resume"), log.read_text()[-2000:]
    resumed = build_cache(cats_dogs, splits, image_size=96, weights=weights_path, cache_dir=cache_dir, batch_size=8,
                          engine="keras")
    assert resumed.resumed and not partial.exists()
    assert_equal_builds(resumed, clean)


@pytest.mark.parametrize("where, line", [
    ("load_backbone", "error: interrupted before the first image was stored; nothing was written"),
    ("run_split", "error: interrupted before the first batch was stored; {partial} holds no image yet; run the same "
                  "command again to start over"),
], ids=["while the base loads", "before the first commit"])
def test_an_early_interrupt_says_that_nothing_is_kept(where, line, tmp_path, weights_path, cats_dogs, monkeypatch):
    """Ctrl-C while the base loads, or before the first commit: the last line does not claim
    finished batches that do not exist."""
    from bottlecache.cache import build

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, where, interrupt)
    result = invoke(["cache", "build", "--data", cats_dogs, "--weights", weights_path, "--cache-dir", tmp_path / "c",
                     "--split", "train=train[:8]", "--image-size", "96", "--engine", "keras"])
    partials = list((tmp_path / "c").glob("*.partial"))
    assert result.exit_code == 130 and len(partials) == (where == "run_split"), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [text for text in result.stderr.splitlines() if text.startswith("error: ")]  # after the progress bar
    assert lines == [line.format(partial=partials[0].name if partials else None)], result.stderr
