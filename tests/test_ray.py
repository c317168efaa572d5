"""``cache build --executor ray``: a local Ray (this machine's cores), real photos, real weights.

One Ray session serves the module (its start-up is the slow part on a small machine); the driver
kill test runs the command line in a process of its own, with a Ray of its own. Faults are driven
by observed progress: a worker is killed once its shard's partial file shows a committed window
and the shard is not finished (the worker's pid is the one it wrote there); the driver is killed
once a shard file is complete. Ray is an extra (``bottlecache[ray]``): these tests fail in CI
without it and are skipped elsewhere.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import POLL_SECONDS, REPO, error_line, invoke, need_extra, wait_until

from bottlecache import build_cache
from bottlecache.cache.settings import CacheSettings
from bottlecache.cache.store import open_cache, verify_cache
from bottlecache.core.errors import BottlecacheError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZE = 96
SPLITS = ["train=train[:64]", "validation=validation[:32]"]
SHARD = 32  # three shards: train 0-31, train 32-63, validation 0-31 (one commit window each)


def _need_ray():
    need_extra("ray", "ray", "ray.data")


@pytest.fixture(scope="module")
def ray_session():
    _need_ray()
    import ray

    from bottlecache.cache.ray_build import start_ray

    seconds, stop = start_ray(ray, None)
    yield ray
    stop()


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, weights_path, cats_dogs):
    return build_cache(cats_dogs, SPLITS, image_size=SIZE, weights=weights_path, engine="keras",
                       cache_dir=tmp_path_factory.mktemp("local"))


def _resolved(cats_dogs, weights_path, cache_dir, splits=SPLITS):
    return CacheSettings(str(cats_dogs), tuple(splits), SIZE, str(weights_path), cache_dir=cache_dir).resolve()


def _ray_build(cats_dogs, weights_path, cache_dir, splits=SPLITS, **options):
    from bottlecache.cache.ray_build import build_ray

    options.setdefault("shard_size", SHARD)
    return build_ray(_resolved(cats_dogs, weights_path, cache_dir, splits), engine="keras", **options)


@pytest.fixture(scope="module")
def ray_build(ray_session, tmp_path_factory, weights_path, cats_dogs):
    return _ray_build(cats_dogs, weights_path, tmp_path_factory.mktemp("ray"))


def assert_same_cache(path, reference):
    with open_cache(path) as got, open_cache(reference) as want:
        assert got.splits == want.splits and got.fingerprint == want.fingerprint
        for split in want.splits:
            for what in ("features", "pooled", "labels"):
                a, b = getattr(got, what)(split), getattr(want, what)(split)
                assert a.dtype == b.dtype and np.array_equal(a, b), f"{split}/{what} differ"
            assert got.keys(split) == want.keys(split) and got.skipped(split) == want.skipped(split)


def test_ray_build_equals_the_single_process_build(ray_build, local_build):
    assert ray_build.path.name == local_build.path.name  # same name, same fingerprint
    assert ray_build.n_shards == 3 and ray_build.n_reused == 0
    assert_same_cache(ray_build.path, local_build.path)
    with h5py.File(ray_build.path, "r") as f:
        assert f["train/features"].is_virtual and f["train/pooled"].is_virtual
        sources = [s.file_name for s in f["train/features"].virtual_sources()]
        assert sources == [f"{ray_build.path.stem}.shards/shard-00000.h5", f"{ray_build.path.stem}.shards/shard-00001.h5"]
    assert verify_cache(ray_build.path).ok
    rows = {row["shard"]: row for row in ray_build.shard_rows}
    assert sorted(rows) == [0, 1, 2] and all(r["attempts"] == 1 and r["error"] == "" for r in rows.values())
    # start-up reported apart from the steady rate: each worker's first shard carries its start-up once
    firsts = [r for r in rows.values() if r["worker_first"]]
    assert sorted(r["pid"] for r in firsts) == sorted({r["pid"] for r in rows.values()})
    assert all(r["worker_startup_seconds"] > 0 for r in firsts)
    assert all(r["worker_startup_seconds"] == 0 for r in rows.values() if not r["worker_first"])
    assert ray_build.join_seconds > 0


def test_heads_read_a_ray_cache_unchanged(ray_build, local_build, tmp_path):
    from bottlecache.train.heads import train_head

    got = train_head(ray_build.path, "sklearn", out=tmp_path / "ray-head")
    want = train_head(local_build.path, "sklearn", out=tmp_path / "local-head")
    assert got.to_dict()["metrics"] == want.to_dict()["metrics"]


def test_an_int8_ray_build_equals_the_local_int8_build(ray_session, weights_path, cats_dogs, tmp_path):
    """``--precision int8`` on Ray: the driver converts (here: finds) and checks the int8 flatbuffer,
    every worker loads that one as it is (none converts or calibrates), and the rows equal a
    single-process int8 build's."""
    from conftest import copy_engines

    from bottlecache.cache.ray_build import build_ray

    options = dict(image_size=SIZE, weights=str(weights_path), precision="int8", calibration_images=16)
    local = build_cache(cats_dogs, SPLITS, cache_dir=tmp_path / "local", **options)
    resolved = CacheSettings(str(cats_dogs), tuple(SPLITS), cache_dir=copy_engines(tmp_path / "local", tmp_path / "ray"),
                             **options).resolve()
    report = build_ray(resolved, shard_size=SHARD)
    assert report.path.name == local.path.name and report.n_shards == 3
    assert_same_cache(report.path, local.path)
    with open_cache(report.path) as cache:
        assert cache.build_info["engine"] == "litert-int8"


def test_litert_workers_load_the_drivers_checked_flatbuffer(ray_session, weights_path, cats_dogs, converted, tmp_path):
    """The driver checks the LiteRT flatbuffer once; each worker loads it as it is (the check it
    finds recorded beside it: no Keras base, no probe), and the rows equal a local LiteRT build's."""
    import json

    from conftest import copy_engines

    from bottlecache.cache.ray_build import build_ray

    local = build_cache(cats_dogs, SPLITS, image_size=SIZE, weights=weights_path, engine="litert",
                        cache_dir=copy_engines(converted(SIZE), tmp_path / "local"))
    resolved = _resolved(cats_dogs, weights_path, copy_engines(converted(SIZE), tmp_path / "ray"))
    report = build_ray(resolved, engine="litert", shard_size=SHARD)
    assert_same_cache(report.path, local.path)
    shards = sorted(report.path.with_name(f"{report.path.stem}.shards").glob("shard-*.h5"))
    assert len(shards) == 3
    for shard in shards:
        with h5py.File(shard, "r") as f:
            assert json.loads(f.attrs["build"])["engine_check"] == "recorded", shard.name


def _copy(build, tmp_path) -> Path:
    """A copy of a Ray-built cache folder (the cache file and its shard folder)."""
    target = tmp_path / "copy"
    shutil.copytree(build.path.parent, target)
    return target / build.path.name


def test_a_deleted_shard_fails_open_and_verify_with_one_line(ray_build, tmp_path):
    path = _copy(ray_build, tmp_path)
    (path.parent / f"{path.stem}.shards" / "shard-00001.h5").unlink()
    with pytest.raises(BottlecacheError) as raised:
        open_cache(path)
    assert "shard-00001.h5" in str(raised.value) and "missing" in str(raised.value)
    assert "\n" not in str(raised.value)
    result = invoke(["cache", "verify", path])
    assert result.exit_code != 0 and "shard-00001.h5" in error_line(result)


def test_the_cache_folder_moved_elsewhere_still_reads(ray_build, local_build, tmp_path):
    path = _copy(ray_build, tmp_path)
    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(path.parent, moved)
    assert_same_cache(moved / path.name, local_build.path)
    assert verify_cache(moved / path.name).ok


def test_consolidate_writes_a_standalone_file(ray_build, local_build, tmp_path):
    path = _copy(ray_build, tmp_path)
    result = invoke(["cache", "consolidate", path])
    assert result.exit_code == 0, result.output
    with h5py.File(path, "r") as f:
        assert not f["train/features"].is_virtual and not f["validation/pooled"].is_virtual
    assert not (path.parent / f"{path.stem}.shards").exists()
    assert_same_cache(path, local_build.path)
    assert verify_cache(path).ok


@pytest.mark.faults
def test_an_injected_failure_is_retried_then_stops_naming_the_shard_and_a_rerun_finishes(
        ray_session, local_build, weights_path, cats_dogs, tmp_path):
    """Two builds (each starts its actors, the slow part): the first fails shard 1 more often than
    it is tried (1 + 2 retries) and stops naming it, keeping the others; the rerun fails shard 1
    once more, retries it, and finishes equal to the local build, reusing the kept shards."""
    with pytest.raises(BottlecacheError) as raised:
        _ray_build(cats_dogs, weights_path, tmp_path / "exhausted", inject_failures={1: 5})
    message = str(raised.value)
    assert "shard 00001 (train rows 32-63) failed 3 times (injected fault)" in message and "\n" not in message
    folder = tmp_path / "exhausted" / f"{local_build.path.stem}.shards"
    assert (folder / "shard-00000.h5").is_file() and (folder / "shard-00002.h5").is_file()
    assert not (tmp_path / "exhausted" / local_build.path.name).exists()

    rerun = _ray_build(cats_dogs, weights_path, tmp_path / "exhausted", inject_failures={1: 1})
    assert rerun.n_reused == 2 and [row["shard"] for row in rerun.shard_rows] == [1]
    assert rerun.shard_rows[0]["attempts"] == 2  # failed once, retried: the failing shard only
    assert_same_cache(rerun.path, local_build.path)


def _partial_progress(folder: Path):
    """``(pid, committed rows)`` of a shard being written whose first window is committed, else None."""
    for partial in folder.glob("shard-*.h5.partial"):
        try:
            with h5py.File(partial, "r", locking=False) as f:
                rows = int(f["train"].attrs["n_rows"]) if "train" in f else 0
                if rows and not f["train"].attrs["complete"] and "writer_pid" in f.attrs:
                    return int(f.attrs["writer_pid"]), rows, partial.name
        except (OSError, KeyError):  # being written: look again
            continue
    return None


@pytest.mark.faults
def test_a_worker_killed_mid_shard_is_restarted_and_the_build_is_equal(
        ray_session, ray_build, local_build, weights_path, cats_dogs, tmp_path):
    """The train split is one shard of ``windows`` commit windows, sized from this machine: a
    look must land between the shard's first committed window and its end, so the shard lasts two
    looks after its first window at the fastest window time the module's build measured (one
    window per shard there). At the default look that is two windows (train=train[:64])."""
    begun = time.monotonic()
    _partial_progress(ray_build.path.parent / f"{ray_build.path.stem}.shards")
    look = POLL_SECONDS + time.monotonic() - begun
    per_window = min(row["seconds"] for row in ray_build.shard_rows)
    windows = max(2, 1 + math.ceil(2 * look / per_window))
    splits = [f"train=train[:{SHARD * windows}]", SPLITS[1]]
    figures = f"{windows} windows of {per_window:.2f} s measured, a look every {look:.3f} s"
    reference = local_build if splits == SPLITS else build_cache(
        cats_dogs, splits, image_size=SIZE, weights=weights_path, engine="keras", cache_dir=tmp_path / "local")
    cache_dir = tmp_path / "killed-worker"
    folder = cache_dir / f"{reference.path.stem}.shards"
    outcome = {}

    def run():
        try:  # train is one shard of `windows` commit windows
            outcome["report"] = _ray_build(cats_dogs, weights_path, cache_dir, splits, shard_size=SHARD * windows)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    seen = wait_until(lambda: (folder.is_dir() and _partial_progress(folder)) or not thread.is_alive(),
                      what=f"a shard with a committed window ({figures})", timeout=900)
    assert isinstance(seen, tuple), f"the build ended before a look saw its shard mid-way ({figures}): {outcome}"
    pid, rows, name = seen
    assert name == "shard-00000.h5.partial" and SHARD <= rows < SHARD * windows, (rows, figures)  # mid-shard
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    rows_by_shard = {row["shard"]: row for row in report.shard_rows}
    assert rows_by_shard[0]["pid"] != pid  # written by the restarted actor
    assert_same_cache(report.path, reference.path)


@pytest.mark.faults
def test_a_killed_driver_reruns_and_skips_finished_shards(ray_session, local_build, weights_path, cats_dogs, launcher,
                                                          tmp_path):
    cache_dir = tmp_path / "killed-driver"
    folder = cache_dir / f"{local_build.path.stem}.shards"
    argv = ["cache", "build", "--data", cats_dogs, *sum((["--split", s] for s in SPLITS), []),
            "--image-size", SIZE, "--weights", weights_path, "--cache-dir", cache_dir, "--engine", "keras",
            "--executor", "ray", "--shard-size", SHARD]
    env = {"PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}  # for Ray's workers
    # a child of the warm launcher, in a process group of its own with the local Ray it starts
    driver = launcher.start(argv, stdout=tmp_path / "driver.log", env=env)
    try:
        finished = wait_until(lambda: folder.is_dir() and sorted(p.name for p in folder.glob("shard-*.h5")),
                              what="a finished shard", processes=[driver], timeout=900)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    assert not (cache_dir / local_build.path.name).exists()
    rerun = _ray_build(cats_dogs, weights_path, cache_dir)
    assert rerun.n_reused >= len(finished) >= 1
    assert not {f"shard-{row['shard']:05d}.h5" for row in rerun.shard_rows} & set(finished)
    assert_same_cache(rerun.path, local_build.path)


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch, tmp_path, weights_path, cats_dogs):
    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` raises ImportError, as without the package
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--image-size", SIZE,
                     "--weights", weights_path, "--cache-dir", tmp_path, "--executor", "ray"])
    assert result.exit_code != 0 and "pip install 'bottlecache[ray]'" in error_line(result)
    assert not list(tmp_path.iterdir())


def test_a_shard_size_that_is_not_a_multiple_of_the_commit_window_is_refused(tmp_path, weights_path, cats_dogs):
    _need_ray()
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--image-size", SIZE,
                     "--weights", weights_path, "--cache-dir", tmp_path, "--executor", "ray", "--shard-size", 48])
    assert "multiple of 32" in error_line(result)
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--cache-dir", tmp_path,
                     "--shard-size", 64])
    assert "ray executor only" in error_line(result)


def test_a_ray_address_that_does_not_answer_is_one_line_up_front_and_leaves_nothing(weights_path, cats_dogs, tmp_path):
    """Nothing listens at the port (it was just freed): refused within the connect timeout, before
    the weights load, with no lock, partial file or shard folder left; a port out of range too."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache_dir = tmp_path / "cache"
    common = ["cache", "build", "--data", cats_dogs, "--split", "train=train[:4]", "--image-size", 96,
              "--weights", weights_path, "--cache-dir", cache_dir, "--executor", "ray"]
    started = time.perf_counter()
    result = invoke([*common, "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and f"No Ray cluster answers at 127.0.0.1:{port}" in error_line(result), result.output
    assert time.perf_counter() - started < 60
    assert not cache_dir.exists() or not [p for p in cache_dir.rglob("*") if p.name != ".gitignore"]
    out_of_range = invoke([*common, "--ray-address", "127.0.0.1:70000"])
    assert out_of_range.exit_code == 2 and "port must be 1 to 65535" in error_line(out_of_range)
