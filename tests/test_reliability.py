"""Reliability and safety: injected faults, hostile inputs, tampered caches — nothing lost, nothing
executed.

Real TensorFlow, the real weights and small slices of the real photos (or tiny generated images);
no mocks. The figures each test measures (kills injected and survived, how each hostile input was
handled, which tampering was detected) are appended as JSON lines to the file named by
``$BOTTLECACHE_RELIABILITY_REPORT`` when it is set (README, "Reliability").

No test here races a process against a time constant. Faults are injected at observed progress:
a build is killed when a look at its partial file sees the commit count it was given (or right
after its log says it resumed), and the amount of work is sized from the commit rate measured on
this machine, so that the same test holds on a machine 10x faster or 3x slower. Timeouts are
generous upper bounds that only stop a hung test.

``BOTTLECACHE_TEST_POLL_SECONDS`` (default 0.01) sets how long a test sleeps between two looks at a
process. Raising it emulates a machine that many times faster relative to the observer: with 0.2,
a build committing 32 rows every 0.2 s lands about one commit between two looks, as a build ten
times faster would against the default. The kill test then plans more work (and fails, naming the
measured figures, only if all 3,000 photos cannot supply it). To check both ends:

    taskset -c 0 python -m pytest tests/test_reliability.py              # one core: slower
    BOTTLECACHE_TEST_POLL_SECONDS=0.2 python -m pytest tests/test_reliability.py   # "10x faster"

Covered elsewhere, not repeated here: fine-tuning killed mid-epoch resumes from its last finished
epoch (tests/test_finetune.py::test_finetune_killed_mid_run_resumes_from_last_finished_epoch).
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    POLL_SECONDS,
    REPO,
    CommitClock,
    copy_engines,
    error_line,
    flip_byte_in_chunk,
    invoke,
    wait_until,
    write_images,
)

from bottlecache import build_cache, open_cache, verify_cache
from bottlecache.cache.store import COMMIT_ROWS, Cache
from bottlecache.core.errors import BottlecacheError
from bottlecache.data.sources import open_source

SEED = 20240607
IMAGE_SIZE = 96  # the smallest input: the faults do not depend on it, and every forward pass is cheaper
BATCH = 32
COMMIT = COMMIT_ROWS  # a build commits 32 examples at a time
SPLITS = ["train=train[:192]", "validation=validation[:64]"]  # 6 + 2 commits
N_EXAMPLES = {"train": 192, "validation": 64}
N_KILLS = 20
# Where the kills land, in commits of the run being killed: right after it says it resumed (a
# share ON_RESUME of the kills), else after a seeded 1..MAX_EXTRA_COMMITS of its commits. The
# build gets MARGIN times the commits that needs at the measured rate, and RESERVE more.
ON_RESUME = 0.25
MAX_EXTRA_COMMITS = 2
MARGIN = 1.5
RESERVE = 2
ARRAYS = ("features", "pooled", "labels", "keys", "skipped")


def record(test: str, **figures) -> None:
    """Append this test's measured figures to $BOTTLECACHE_RELIABILITY_REPORT (JSON lines), if set."""
    target = os.environ.get("BOTTLECACHE_RELIABILITY_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, **figures}, default=str) + "\n")


def read_arrays(path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return {split: {name: f[split][name][:] for name in ARRAYS} for split in json.loads(f.attrs["splits"])}


def assert_same_arrays(path, reference_path) -> None:
    a, b = read_arrays(path), read_arrays(reference_path)
    assert list(a) == list(b) == ["train", "validation"]
    for split in a:
        for name in ARRAYS:
            assert a[split][name].dtype == b[split][name].dtype, (split, name)
            assert np.array_equal(a[split][name], b[split][name]), (split, name)


def build_command(data, weights, cache_dir, *extra, splits=SPLITS) -> list[str]:
    command = [sys.executable, "-m", "bottlecache", "cache", "build", "--data", data, "--weights", weights,
               "--cache-dir", cache_dir, "--image-size", IMAGE_SIZE, "--batch-size", BATCH, "--engine", "keras"]
    for spec in splits:
        command += ["--split", spec]
    return [str(c) for c in [*command, *extra]]


def committed(partial: Path):
    """``{split: n_done}`` of a partial file another process is writing (None while unreadable)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return {name: int(f[name].attrs["n_done"]) for name in json.loads(f.attrs["splits"])}
    except Exception:  # caught mid-write, or not created yet
        return None


def uncommitted_rows_on_disk(partial: Path):
    """True if a split holds rows beyond its commit record (a batch cut off mid-write); None if unreadable."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return any(f[s]["labels"].shape[0] > int(f[s].attrs["n_rows"]) for s in json.loads(f.attrs["splits"]))
    except Exception:
        return None


class FinalWatcher:
    """Whenever a file exists under the final name, it must open as a complete cache."""

    def __init__(self, final: Path, counts: list[int]):
        self.final, self.counts, self.checks, self.seen = final, counts, 0, False

    def check(self) -> None:
        if self.final.exists():
            self.seen = True
            self.checks += 1
            with Cache(self.final) as cache:  # raises on a partial, incomplete or unreadable file
                assert [cache.n_examples(s) for s in cache.splits] == self.counts


def one_error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command's stderr (beside TensorFlow's start-up noise)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def clean_build(cache_dir, weights_path, cats_dogs, splits, timed=False):
    """The clean, uninterrupted build every faulty build must equal, array for array; with
    ``timed``, ``(report, CommitClock)``: when each of its commits was made."""
    clock = CommitClock()
    report = build_cache(cats_dogs, splits, image_size=IMAGE_SIZE, weights=weights_path, cache_dir=cache_dir,
                         batch_size=BATCH, engine="keras", progress=clock)
    assert not report.hit and not report.resumed and not any(s.n_skipped for s in report.splits)
    return (report, clock) if timed else report


def look_seconds(path: Path, n: int = 5) -> float:
    """What one look at a build costs here: reading a cache's commit record (median of ``n``)."""
    times = []
    for _ in range(n):
        begun = time.monotonic()
        committed(path)
        times.append(time.monotonic() - begun)
    return float(np.median(times))


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory, weights_path, cats_dogs):
    """``(report, CommitClock)``: the clean build of SPLITS, and when it committed."""
    report, clock = clean_build(tmp_path_factory.mktemp("reference"), weights_path, cats_dogs, SPLITS, timed=True)
    assert [s.n_images for s in report.splits] == list(N_EXAMPLES.values())
    return report, clock


@pytest.fixture(scope="module")
def reference(reference_build):
    return reference_build[0]


# ---------------------------------------------------------------------------------------------
# Faults: kill -9 at random points


@dataclass
class KillPlan:
    """How much work a build gets so that ``N_KILLS`` kills land mid-build, from measured figures."""

    commits_per_second: float  # measured: the fast end of a clean build's commit rate
    first_commit_seconds: float  # measured: from a split's start to its first commit (the model's first call)
    look_seconds: float  # measured: one look at the build (watcher, log and commit record), plus POLL_SECONDS
    overshoot: float  # expected commits that land between the look that decides a kill and the kill
    on_resume: float  # the same for a kill right after a run says it resumed
    least: int  # commits needed if every kill came right after a resume
    commits: dict  # {split: commits} planned
    available: dict  # {split: examples} in the photos

    @classmethod
    def measure(cls, clocks: list[CommitClock], look: float, available: dict) -> KillPlan:
        rate = max(clock.commits_per_second() for clock in clocks)  # the fastest measured
        first = min(clock.first_commit_seconds() for clock in clocks)
        overshoot = rate * look / 2 + 0.5  # the commit that decides lands anywhere in a look's gap; one in flight
        on_resume = rate * max(0.0, look - first) / 2 + 0.5  # a run's first commit waits for its model's first call
        extra = (1 - ON_RESUME) * (1 + MAX_EXTRA_COMMITS) / 2  # mean commits a kill waits for
        need = math.ceil(N_KILLS * (ON_RESUME * on_resume + (1 - ON_RESUME) * overshoot + extra) * MARGIN) + RESERVE
        least = math.ceil(N_KILLS * on_resume * MARGIN) + RESERVE
        room = {name: -(-n // COMMIT) for name, n in available.items()}
        plan = cls(rate, first, look, overshoot, on_resume, least, {}, available)
        if least > sum(room.values()):
            pytest.fail(f"not enough photos for {N_KILLS} kills: {plan.figures()}; all {sum(available.values())} "
                        f"photos make only {sum(room.values())} commits, and {least} are needed")
        need = min(need, sum(room.values()))
        validation = min(room["validation"], max(1, need // 5))  # train 4 : validation 1, as before (640 + 160)
        train = min(room["train"], need - validation)
        plan.commits = {"train": train, "validation": need - train}
        return plan

    @property
    def total(self) -> int:
        return sum(self.commits.values())

    def splits(self) -> list[str]:
        return [f"{name}={name}[:{min(self.available[name], n * COMMIT)}]" for name, n in self.commits.items()]

    def figures(self) -> dict:
        return {"commits_per_second": round(self.commits_per_second, 2),
                "first_commit_seconds": round(self.first_commit_seconds, 2), "look_seconds": round(self.look_seconds, 4),
                "overshoot_commits_per_kill": round(self.overshoot, 2),
                "overshoot_commits_per_kill_on_resume": round(self.on_resume, 2), "least_commits": self.least,
                "poll_seconds": POLL_SECONDS}


@pytest.mark.slow
@pytest.mark.faults
def test_build_killed_at_random_points_resumes_to_the_clean_build(reference_build, weights_path, cats_dogs,
                                                                   launcher, tmp_path):
    """SIGKILL the build at 20 seeded random points of its observed progress (each resume is
    killed again), then let it finish: the result equals the clean build array for array, and no
    file under the final name is ever incomplete.

    A kill lands right after a run reports that it resumed (before its first commit), or as soon
    as a look sees that run's seeded number of commits: never at a time. The work is sized from
    the commit rate measured on this machine (the module's reference build, then this test's own
    clean build) and the time one look takes; as the kills go, each next one waits for fewer
    commits if the kills so far overshot more than planned.

    Each run is a child forked by the session's warm launcher (tests/launcher.py): TensorFlow is
    imported once, not 21 times, and a run starts when the one before it has been killed."""
    started = time.monotonic()
    rng = np.random.default_rng(SEED)
    available = {name: split.n_examples
                 for name, split in open_source(cats_dogs, ["train=train", "validation=validation"]).splits.items()}
    calibration, clock = reference_build  # the module's clean build of SPLITS, timed
    look = POLL_SECONDS + look_seconds(calibration.path)
    clocks = [clock]
    plan = KillPlan.measure(clocks, look, available)
    for attempt in range(3):  # a clean build of the planned size; larger if it measured a faster machine
        reference, clock = clean_build(tmp_path / f"clean{attempt}", weights_path, cats_dogs, plan.splits(),
                                       timed=True)
        clocks.append(clock)
        again = KillPlan.measure(clocks, look, available)
        if plan.total >= again.least or attempt == 2:
            break
        plan = again
    rates = {name: {"commits_per_second": round(c.commits_per_second(), 2),
                    "first_commit_seconds": round(c.first_commit_seconds(), 2)}
             for name, c in zip(["reference", *(f"clean build {i}" for i in range(3))], clocks)}
    planned = {**again.figures(), "commits": plan.total}
    splits = [f"{s.name}={s.name}[:{s.n_images}]" for s in reference.splits]
    counts = [s.n_images for s in reference.splits]
    calibrated = time.monotonic()

    cache_dir = tmp_path / "killed"
    final = cache_dir / reference.path.name
    partial = final.with_name(final.name + ".partial")
    watcher = FinalWatcher(final, counts)
    argv = build_command(cats_dogs, weights_path, cache_dir, "--json", splits=splits)[3:]
    kills, logs, runs, looks = [], [], [], []

    def start(run):  # a child of the warm launcher: TensorFlow is imported already
        logs.append(tmp_path / f"run{run}.log")
        runs.append(launcher.start(argv, stdout=tmp_path / f"run{run}.json", stderr=logs[-1]))

    last = {"key": None, "commits": None, "reused": 0}

    def progress() -> int | None:
        """Commits of the partial file, as a look sees them (None while unreadable). Opening the
        file costs the observer milliseconds of CPU the build could use: a look whose stat finds
        the file as the last read left it reuses that read (at most 10 looks in a row)."""
        try:
            stat = partial.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key == last["key"] and last["commits"] is not None and last["reused"] < 10:
            last["reused"] += 1
            return last["commits"]
        state = committed(partial)
        commits = None if state is None else sum(-(-n // COMMIT) for n in state.values())
        last.update(key=key, commits=commits, reused=0)
        return commits

    def note():  # at every look
        looks.append(time.monotonic())
        watcher.check()

    def measured() -> str:  # for a failure: the figures the work was sized from, and those since
        overshoots = [k["overshoot"] for k in kills]
        return (f"{len(kills)} of {N_KILLS} kills done; {plan.total} commits planned from {planned}; the kills "
                f"overshot by {np.mean(overshoots) if overshoots else 0:.2f} commits on average (at most "
                f"{max(overshoots, default=0)}); the looks came every "
                f"{np.median(np.diff(looks)) if len(looks) > 1 else 0:.4f} s")

    try:
        start(0)
        resumed_at = 0
        for run in range(N_KILLS):
            process, log = runs[run], logs[run]

            def ready():  # this run holds the lock and has opened (resumed or re-created) the partial file
                text = log.read_text(errors="replace")
                if "resuming the partial build" in text or "starting over" in text:
                    return text
                return run == 0 and partial.exists() and "created"

            text = wait_until(ready, what=f"run {run} starting ({measured()})", processes=[process], look=note)
            t_ready = time.monotonic() - calibrated
            at_start = 0 if run == 0 or "starting over" in text else resumed_at
            # how many commits this run makes before its kill: none (killed right after it said it
            # resumed) or a seeded 1..MAX_EXTRA_COMMITS, fewer if the kills so far overshot
            # (the overshoot of such a kill: planned, then the mean of the planned and the measured)
            overshoot = np.mean([again.overshoot, *(k["overshoot"] for k in kills if k["kind"] == "after a commit")])
            per_kill = (plan.total - at_start - RESERVE) / (N_KILLS - run)
            cap = min(MAX_EXTRA_COMMITS, math.floor(per_kill / 1.2 - overshoot))
            on_resume, drawn = rng.random() < ON_RESUME, int(rng.integers(1, MAX_EXTRA_COMMITS + 1))
            extra = 0 if on_resume or cap < 1 else min(drawn, cap)
            target = at_start + extra

            def reached():  # a one-tuple, true even at 0 commits
                commits = progress()
                return (commits,) if commits is not None and commits >= target else None

            (seen,) = wait_until(reached, what=f"run {run} reaching {target} commits ({measured()})",
                                 processes=[process], look=note)
            alive = process.poll() is None
            process.send_signal(signal.SIGKILL)
            process.wait()
            t_kill = time.monotonic() - calibrated
            watcher.check()
            assert not watcher.seen, f"the build finished before all kills were injected: {measured()}"
            last["key"] = None  # the writer is dead: read what it left
            after = progress()
            rows_after = committed(partial)
            resumed_at = after or 0
            kills.append({
                "run": run, "kind": "after a commit" if extra else "right after starting", "alive": alive,
                "mid_build": alive and partial.exists() and not final.exists(), "committed_at_start": at_start,
                "target": target, "seen": seen, "committed_after": after, "overshoot": (after or seen) - target,
                "rows_after": sum(rows_after.values()) if rows_after else None,
                "uncommitted_rows_on_disk": uncommitted_rows_on_disk(partial),
                "ready_s": round(t_ready, 2), "killed_s": round(t_kill, 2),
            })
            start(run + 1)
        process = runs[N_KILLS]
        wait_until(lambda: process.poll() is not None, what="the last run finishing", timeout=600, look=note)
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    assert process.returncode == 0, texts[-1][-3000:]
    report = json.loads((tmp_path / f"run{N_KILLS}.json").read_text())

    resumed = sum("resuming the partial build" in text for text in texts[1:])
    started_over = sum("starting over" in text for text in texts[1:])
    lost = [k["rows_after"] for k, text in zip(kills, texts[1:]) if "starting over" in text]
    committing = [(k["committed_after"] or 0) - k["committed_at_start"] for k in kills]
    gaps = np.diff(looks)
    figures = {
        "kills": len(kills), "mid_build": sum(k["mid_build"] for k in kills),
        "kills_right_after_starting": sum(k["kind"] == "right after starting" for k in kills),
        "kills_after_a_commit_of_that_run": sum(n > 0 for n in committing),
        "kills_leaving_uncommitted_rows": sum(bool(k["uncommitted_rows_on_disk"]) for k in kills),
        "partial_unreadable_after_kill": sum(k["committed_after"] is None for k in kills),
        "overshoot_commits": {"mean": round(float(np.mean([k["overshoot"] for k in kills])), 2),
                              "max": max(k["overshoot"] for k in kills)},
        "runs": len(texts), "resumed": resumed, "started_over": started_over,
        "runs_that_waited_on_the_lock": sum("waiting for it to finish" in text for text in texts),
        "examples_lost_to_restarts": sum(x or 0 for x in lost),
        "commits": plan.total, "splits": splits, "plan": planned, "commits_per_second_measured": rates,
        "look_gap_seconds": {"median": round(float(np.median(gaps)), 4), "p90": round(float(np.quantile(gaps, 0.9)), 4)},
        "final_run_processed": {s["name"]: s["n_processed"] for s in report["splits"]},
        "final_bytes": final.stat().st_size, "clean_build_bytes": reference.path.stat().st_size,
        "final_checks": watcher.checks, "seconds_measuring": round(calibrated - started, 1),
        "seconds": round(time.monotonic() - started, 1), "detail": kills,
    }
    record("kill -9 at random points", **figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "detail"}))

    watcher.check()
    assert watcher.seen and not report["hit"] and report["resumed"] == ("resuming the partial build" in texts[-1])
    assert Path(report["path"]) == final and not partial.exists()
    assert_same_arrays(final, reference.path)
    assert verify_cache(final).ok
    assert figures["kills"] >= N_KILLS and figures["mid_build"] == figures["kills"]
    assert resumed + started_over == N_KILLS  # every run after the first said which it did
    assert resumed >= 1


def test_the_warm_launcher_runs_each_command_as_a_process_of_its_own(launcher, tmp_path):
    """The launcher (tests/launcher.py) the fault tests run their commands with: each command is a
    process of its own with its own exit status and output files. That a SIGKILL ends one with
    -9 (tests/test_build.py) and that what a forked child builds equals an in-process build, array
    for array, the fault tests check."""
    listed = launcher.start(["models", "--json"], stdout=tmp_path / "models.json", stderr=tmp_path / "models.err")
    assert listed.wait(timeout=120) == 0, (tmp_path / "models.err").read_text()
    assert json.loads((tmp_path / "models.json").read_text())[0]["model"] == "mobilenet_v2"
    refused = launcher.start(["cache", "build", "--image-size", "150"], stdout=tmp_path / "out",
                             stderr=tmp_path / "err", cwd=tmp_path)
    assert refused.wait(timeout=120) == 2
    assert one_error_line((tmp_path / "err").read_text()).startswith("error: The 'image_size' option")
    assert listed.pid != refused.pid != os.getpid()


# ---------------------------------------------------------------------------------------------
# Faults: the disk fills up


def _limited_disk(kind: str, tmp_path: Path, limit: int):
    """``(cache_dir, fsize, release)``: a cache folder that holds at most ``limit`` bytes; ``fsize``
    the file-size limit the build runs under (SIGXFSZ ignored, so that write() fails with EFBIG)."""
    if kind == "rlimit":  # any user: the process may not grow a file beyond `limit` (EFBIG)
        return tmp_path / "cache", limit, lambda: None
    folder = tmp_path / "tmpfs"  # a real full file system (ENOSPC); needs root
    folder.mkdir()
    size = f"size={-(-limit // 4096) * 4}k"
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the rlimit case covers a full disk")

    def release():  # "space is back": the same file system, made larger
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    return folder, None, release


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("kind", ["rlimit", "tmpfs"])
def test_disk_full_keeps_the_partial_and_resumes(kind, reference, weights_path, cats_dogs, launcher, tmp_path):
    # A build claims the space of its next batch before writing any of it: the raw size of each
    # chunk the batch touches plus 1 MiB (about 7 MB here). With the limit one such claim above
    # half the finished cache, the disk fills about half-way through the build.
    with h5py.File(reference.path, "r") as f:
        group = f["train"]
        itemsize = {k: 16 if group[k].dtype.kind == "O" else group[k].dtype.itemsize for k in group}
        claim = 2**20 + sum(int(np.prod(group[k].chunks)) * itemsize[k]
                            for k in ("features", "pooled", "labels", "keys"))
    limit = reference.file_size // 2 + claim
    cache_dir, fsize, release = _limited_disk(kind, tmp_path, limit)
    try:
        failed = launcher.start(build_command(cats_dogs, weights_path, cache_dir)[3:], stdout=tmp_path / "out",
                                stderr=tmp_path / "err", fsize=fsize)
        failed.wait(timeout=300)
        stderr = (tmp_path / "err").read_text(errors="replace")
        line = one_error_line(stderr)
        assert failed.returncode == 2, stderr[-3000:]
        assert "partial file is kept" in line and "free space in" in line and "run the same command" in line
        final = cache_dir / reference.path.name
        partial = final.with_name(final.name + ".partial")
        assert partial.exists() and not final.exists()
        state = committed(partial)
        assert state is not None and 0 < sum(state.values()) < sum(N_EXAMPLES.values()), state
        with h5py.File(partial, "r") as f:  # every committed row reads back and passes its checksums
            for split, n_done in state.items():
                rows = int(f[split].attrs["n_rows"])
                assert rows == n_done and f[split]["features"][:rows].shape[0] == rows

        release()
        report = build_cache(cats_dogs, SPLITS, image_size=IMAGE_SIZE, weights=weights_path, cache_dir=cache_dir,
                             batch_size=BATCH, engine="keras")
        assert report.resumed and not report.hit and report.path == final and not partial.exists()
        processed = {s.name: s.n_processed for s in report.splits}
        assert processed == {s: N_EXAMPLES[s] - state[s] for s in N_EXAMPLES}  # nothing committed was redone
        assert_same_arrays(final, reference.path)
        assert verify_cache(final).ok
        assert final.stat().st_size < reference.path.stat().st_size + 2**20  # no claimed space left in it
        record(f"disk full ({kind})", limit_bytes=limit, exit_code=failed.returncode, message=line,
               committed_at_failure=state, resumed=report.resumed, processed_on_resume=processed,
               equal_to_clean_build=True, final_bytes=final.stat().st_size,
               clean_build_bytes=reference.path.stat().st_size)
    finally:
        if kind == "tmpfs":
            subprocess.run(["umount", str(cache_dir)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Faults: two builds of the same cache at once


@pytest.mark.slow
@pytest.mark.faults
def test_two_builds_of_the_same_cache_one_writes(reference, weights_path, cats_dogs, launcher, tmp_path):
    cache_dir = tmp_path / "cache"
    final = cache_dir / reference.path.name
    lock = final.with_name("." + final.name + ".lock")
    argv = build_command(cats_dogs, weights_path, cache_dir, "--json")[3:]
    processes, logs = [], []
    for i in range(2):  # started together
        logs.append(tmp_path / f"build{i}.log")
        processes.append(launcher.start(argv, stdout=tmp_path / f"build{i}.json", stderr=logs[-1]))
    pids = {p.pid for p in processes}

    def lock_holder():
        text = lock.read_text().strip() if lock.exists() else ""
        return int(text) if text.isdigit() and int(text) in pids else None

    # The writer is stopped (SIGSTOP) as soon as a look sees it holding the lock, and continued
    # after the checks: they never race its work, however fast it is.
    holder = wait_until(lock_holder, what="one of the two builds taking the lock", processes=processes,
                        timeout=180)
    os.kill(holder, signal.SIGSTOP)
    try:
        (waiter,) = pids - {holder}
        waiter_log = logs[[p.pid for p in processes].index(waiter)]
        wait_until(lambda: "waiting for it to finish" in waiter_log.read_text(errors="replace"),
                   what="the other build waiting on the lock", processes=processes, timeout=180)

        # a third build that may not wait stops at once, naming the writer
        result = invoke(["cache", "build", "--data", cats_dogs, "--weights", weights_path, "--cache-dir", cache_dir,
                         "--image-size", IMAGE_SIZE, "--engine", "keras", *sum((["--split", s] for s in SPLITS), []),
                         "--no-wait"])
        assert result.exit_code == 2
        no_wait = error_line(result)
        assert f"Another build of this cache is running (pid {holder})" in no_wait
        assert all(p.poll() is None for p in processes), "the --no-wait build disturbed the others"
    finally:
        os.kill(holder, signal.SIGCONT)

    for p in processes:
        p.wait(timeout=300)
    assert [p.returncode for p in processes] == [0, 0], [log.read_text()[-2000:] for log in logs]
    reports = {p.pid: json.loads((tmp_path / f"build{i}.json").read_text()) for i, p in enumerate(processes)}
    writers = [pid for pid, r in reports.items() if not r["hit"]]
    assert writers == [holder]  # exactly one wrote
    assert reports[waiter]["hit"] and all(s["n_processed"] == 0 for s in reports[waiter]["splits"])
    assert f"another build of this cache is running (pid {holder}); waiting for it to finish" in waiter_log.read_text()
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == [final.name]
    assert_same_arrays(final, reference.path)
    record("two builds at once", writers=1, waiter="waited, then reported a cache hit", no_wait=no_wait)


# ---------------------------------------------------------------------------------------------
# Faults: the default engine (LiteRT) interrupted and resumed


@pytest.mark.slow
@pytest.mark.faults
def test_litert_build_interrupted_and_resumed_is_bit_identical(weights_path, cats_dogs, converted, tmp_path):
    """A resumed build with the default engine (auto → LiteRT) equals its uninterrupted build bit
    for bit: the engine is deterministic for the same batches."""
    from bottlecache.core.progress import NullProgress
    from bottlecache.models.engines import litert_available

    if not litert_available():
        pytest.skip("ai-edge-litert is not installed (auto is Keras then, covered above)")
    splits = ["train=train[:96]", "validation=validation[:32]"]  # 3 + 1 commits
    # the defaults: engine auto, the engine's batch size; the run's flatbuffer (converted once)
    for name in ("clean", "resumed"):
        copy_engines(converted(IMAGE_SIZE), tmp_path / name)
    clean = build_cache(cats_dogs, splits, image_size=IMAGE_SIZE, weights=weights_path, cache_dir=tmp_path / "clean")
    assert clean.engine == "litert"

    class StopAfter(NullProgress):  # Ctrl-C after a seeded number of commits
        def __init__(self, n):
            self.n = n

        def advance(self, split, n):
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt

    stop_after = int(np.random.default_rng(SEED).integers(1, 4))
    with pytest.raises(KeyboardInterrupt):
        build_cache(cats_dogs, splits, image_size=IMAGE_SIZE, weights=weights_path, cache_dir=tmp_path / "resumed",
                    progress=StopAfter(stop_after))
    resumed = build_cache(cats_dogs, splits, image_size=IMAGE_SIZE, weights=weights_path,
                          cache_dir=tmp_path / "resumed")
    assert resumed.resumed and resumed.engine == "litert" and resumed.fingerprint == clean.fingerprint
    assert sum(s.n_processed for s in resumed.splits) == 128 - COMMIT * stop_after
    a, b = read_arrays(resumed.path), read_arrays(clean.path)
    for split in a:
        for name in ARRAYS:
            assert np.array_equal(a[split][name], b[split][name]), (split, name)
    with Cache(clean.path) as cache:
        diff = cache.build_info["engine_max_abs_diff"]
    record("LiteRT interrupted and resumed", commits_before_interrupt=stop_after, bit_identical=True,
           engine_max_abs_diff_vs_keras=diff)


# ---------------------------------------------------------------------------------------------
# Hostile inputs


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG, written byte by byte (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One folder with every hostile file: ``(root, expected, deep)``; expected[key] is
    ("cached", note) or ("skipped", words of the reason); ``deep`` the 16-bit PNG's pixels."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    root = write_images(tmp_path_factory.mktemp("hostile") / "pets",
                        {"train/cats": 2, "train/dogs": 2, "validation/cats": 2, "validation/dogs": 2})
    cats, dogs = root / "train" / "cats", root / "train" / "dogs"
    expected = {}

    def noise(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    good = (cats / "img000.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(good[: len(good) // 2])
    expected["truncated.jpg"] = ("skipped", "Invalid JPEG data")
    (cats / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = ("skipped", "empty file")
    (cats / "text.jpg").write_text("this is a text file, not a photo\n")
    expected["text.jpg"] = ("skipped", "Unknown image file format")
    Image.fromarray(noise(32, 48, 4), "RGBA").save(cats / "alpha.png")
    expected["alpha.png"] = ("cached", "RGBA: alpha dropped, RGB kept exactly")
    deep = rng.integers(0, 65536, (24, 36, 3), dtype=np.uint16)
    _png16(cats / "deep16.png", deep)
    expected["deep16.png"] = ("cached", "16-bit: each value's high byte")
    Image.fromarray(noise(30, 40), "L").save(cats / "gray.jpg", quality=95)
    expected["gray.jpg"] = ("cached", "grayscale: three equal channels")
    Image.fromarray(noise(30, 40, 3)).convert("CMYK").save(cats / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = ("cached", "CMYK JPEG: converted to RGB like Pillow's conversion")
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (30, 200, 90)]
    frames[0].save(dogs / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["animated.gif"] = ("cached", "animated GIF: its first frame")
    Image.fromarray(np.array([[[10, 200, 30]]], np.uint8)).save(dogs / "one-pixel.png")
    expected["one-pixel.png"] = ("cached", "1x1: resized up")
    y, x = np.mgrid[0:6000, 0:6000]
    big = np.stack([x * 255 // 5999, y * 255 // 5999, (x + y) * 255 // 11998], axis=-1).astype(np.uint8)
    Image.fromarray(big).save(dogs / "huge.jpg", quality=80)
    del big, x, y
    expected["huge.jpg"] = ("cached", "6000x6000: decoded whole, resized down")
    for name in ("with space.jpg", "chat_été_猫.jpg", "new\nline.jpg"):
        Image.fromarray(noise(30, 40, 3)).save(dogs / name)
        expected[name] = ("cached", "the key is the name, unchanged")
    (dogs / "a-folder.jpg").mkdir()  # a directory named like an image: not a file, not listed
    os.symlink(dogs, dogs / "link-to-a-folder.jpg")  # unreadable even for root: read() fails, EISDIR
    expected["link-to-a-folder.jpg"] = ("skipped", "Is a directory")
    os.symlink("no-such-file.jpg", dogs / "dangling.jpg")
    expected["dangling.jpg"] = ("skipped", "No such file or directory")
    os.symlink("loop.jpg", dogs / "loop.jpg")
    expected["loop.jpg"] = ("skipped", "Too many levels of symbolic links")
    keyed = {}
    for name, value in expected.items():
        folder = "cats" if (cats / name).exists() or (cats / name).is_symlink() else "dogs"
        keyed[f"train/{folder}/{name}"] = value
    return root, keyed, deep


@pytest.mark.slow
def test_hostile_files_are_cached_correctly_or_skipped_with_a_reason(hostile, weights_path, tmp_path):
    from PIL import Image

    from bottlecache.data.sources import decode_image, load_image
    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.engines import KerasEngine

    root, expected, deep = hostile
    cache_dir = tmp_path / "cache"
    report = build_cache(root, image_size=IMAGE_SIZE, weights=weights_path, cache_dir=cache_dir, engine="keras",
                         batch_size=8)
    train = next(s for s in report.splits if s.name == "train")
    skipped = dict(train.skipped)
    wanted_skips = {k: v[1] for k, v in expected.items() if v[0] == "skipped"}
    assert set(skipped) == set(wanted_skips), skipped
    for key, words in wanted_skips.items():
        assert words in skipped[key] and "\n" not in skipped[key], (key, skipped[key])

    with open_cache(report.path) as cache:
        keys = cache.keys("train")
        cached = [k for k, v in expected.items() if v[0] == "cached"]
        assert set(cached) <= set(keys) and not set(wanted_skips) & set(keys)
        assert "train/dogs/a-folder.jpg" not in keys + list(skipped)
        assert len(keys) == 4 + len(cached)
        rows = [keys.index(k) for k in cached]
        stored = cache.features("train")[rows].astype(np.float32)
        labels = cache.labels("train")[rows]
    np.testing.assert_array_equal(labels, [k.startswith("train/dogs/") for k in cached])

    # each cached row is the Keras model's output on that file, decoded the one way
    engine = KerasEngine(load_backbone(resolve_weights(weights_path, IMAGE_SIZE), IMAGE_SIZE))
    images = np.stack([load_image(str(root / k), IMAGE_SIZE).numpy() for k in cached])
    np.testing.assert_allclose(stored, engine(images), rtol=1e-3, atol=1e-3)

    # and the decoding is sensible
    def decoded(key):
        return decode_image((root / key).read_bytes()).numpy()

    cats, dogs = "train/cats/", "train/dogs/"
    assert np.array_equal(decoded(cats + "alpha.png"), np.asarray(Image.open(root / cats / "alpha.png"))[..., :3])
    assert np.array_equal(decoded(cats + "deep16.png"), (deep >> 8).astype(np.uint8))
    gray = decoded(cats + "gray.jpg").astype(int)
    assert gray.shape == (30, 40, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # TensorFlow's JPEG decoder uses a faster inverse DCT than Pillow's: a few levels apart on noise
    assert np.abs(gray[..., 0] - np.asarray(Image.open(root / cats / "gray.jpg"), int)).mean() < 3
    cmyk = decoded(cats + "cmyk.jpg").astype(int)
    assert np.abs(cmyk - np.asarray(Image.open(root / cats / "cmyk.jpg").convert("RGB"), int)).mean() < 2
    assert (decoded(dogs + "animated.gif") == 30).all()
    assert decoded(dogs + "one-pixel.png").tolist() == [[[10, 200, 30]]]

    # the command line reports the same (a cache hit now), one line per skipped file
    result = invoke(["cache", "build", "--data", root, "--image-size", IMAGE_SIZE, "--weights", weights_path,
                     "--cache-dir", cache_dir, "--engine", "keras"])
    assert result.exit_code == 0 and "cache hit" in result.stdout, result.output
    for key, words in wanted_skips.items():
        assert any(line.startswith(f"  skipped {key}: ") and words in line for line in result.stderr.splitlines())
    outcomes = {k: ("cached: " + v[1]) if v[0] == "cached" else f"skipped: {skipped[k]}" for k, v in expected.items()}
    outcomes["train/dogs/a-folder.jpg"] = "not listed (a directory, not a file)"
    record("hostile files", outcomes=outcomes)


@pytest.mark.parametrize("case", ["empty class folder", "one class", "file name not UTF-8"])
def test_hostile_folders_are_refused_with_one_line(case, weights_path, tmp_path):
    root = tmp_path / "pets"
    if case == "empty class folder":
        write_images(root, {"train/cats": 2, "validation/cats": 2, "validation/dogs": 2})
        (root / "train" / "dogs").mkdir()
        words = "has no images"
    elif case == "one class":
        write_images(root, {"train/cats": 3, "validation/cats": 2})
        words = "one class (cats); a classifier needs at least two"
    else:
        write_images(root, {"train/cats": 2, "train/dogs": 2})
        try:
            shutil.copy(root / "train" / "cats" / "img000.jpg", os.fsencode(root / "train" / "cats") + b"/chat\xe9.jpg")
        except OSError:
            pytest.skip("this file system refuses file names that are not UTF-8")
        words = "is not valid UTF-8; rename it"
    result = invoke(["cache", "build", "--data", root, "--weights", weights_path, "--cache-dir", tmp_path / "cache",
                     "--image-size", IMAGE_SIZE, "--engine", "keras"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert words in line, line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.h5*"))
    record("hostile folder", case=case, exit_code=result.exit_code, message=line)


# ---------------------------------------------------------------------------------------------
# Tampered caches


def _verify_cli(path):
    result = invoke(["cache", "verify", path])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    faults = [line for line in result.stdout.splitlines() if line.startswith("fault: ")]  # every fault listed
    line = error_line(result)  # and one line on stderr: the first fault and what to do
    assert faults and faults[0][len("fault: "):].split(" (")[0] in line, (faults, line)
    return faults


def _copy_into(folder: Path, original: Path) -> Path:
    folder.mkdir()
    return Path(shutil.copy(original, folder / original.name))


def test_tampered_caches_are_detected(reference, tmp_path):
    figures = {}
    original = reference.path
    assert verify_cache(original).ok

    # a flipped byte in a features chunk: verify names split and rows; a head on the features stops
    flipped = _copy_into(tmp_path / "features", original)
    first, last = flip_byte_in_chunk(flipped, "train", 1)
    assert first == last == 1  # one row per features chunk
    faults = _verify_cli(flipped)
    assert len(faults) == 1 and faults[0].startswith("fault: split 'train': features row 1 fails to read")
    result = invoke(["cache", "train-head", flipped, "--kind", "keras", "--epochs", 1, "--out", tmp_path / "h1"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "split 'train' features failed to read" in line and "cache verify" in line
    assert not (tmp_path / "h1").exists()
    figures["flipped byte in a features chunk"] = {"verify": faults[0], "train-head --kind keras": line}

    # a flipped byte in the pooled features: the default (scikit-learn) head stops too
    pooled = _copy_into(tmp_path / "pooled", original)
    first, last = flip_byte_in_chunk(pooled, "validation", 0, "pooled")
    faults = _verify_cli(pooled)
    assert len(faults) == 1
    assert faults[0].startswith(f"fault: split 'validation': pooled rows {first}-{last} fail to read")
    result = invoke(["cache", "train-head", pooled, "--out", tmp_path / "h2"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "split 'validation' pooled failed to read" in line
    figures["flipped byte in a pooled chunk"] = {"verify": faults[0], "train-head (sklearn)": line}

    # a flipped byte in the labels
    labels = _copy_into(tmp_path / "labels", original)
    first, last = flip_byte_in_chunk(labels, "train", 0, "labels")
    faults = _verify_cli(labels)
    assert len(faults) == 1 and faults[0].startswith(f"fault: split 'train': labels rows {first}-{last} fail to read")
    figures["flipped byte in the labels"] = {"verify": faults[0]}

    # a truncated file and a file that is not HDF5 at all
    truncated = tmp_path / "truncated" / original.name
    truncated.parent.mkdir()
    truncated.write_bytes(original.read_bytes()[: original.stat().st_size * 2 // 3])
    not_hdf5 = tmp_path / "not-hdf5" / original.name
    not_hdf5.parent.mkdir()
    not_hdf5.write_bytes(np.random.default_rng(SEED).bytes(4096))
    for name, path in (("truncated file", truncated), ("not an HDF5 file", not_hdf5)):
        faults = _verify_cli(path)
        assert len(faults) == 1 and "is not a readable HDF5 file" in faults[0]
        with pytest.raises(BottlecacheError, match="not a readable HDF5 file"):
            open_cache(path)
        result = invoke(["cache", "info", path])
        assert result.exit_code == 2
        line = error_line(result)
        assert "not a readable HDF5 file" in line
        figures[name] = {"verify": faults[0], "open (cache info)": line}

    # the stored config rewritten (here: the class names swapped), the fingerprint left alone
    swapped = tmp_path / "config" / original.name
    swapped.parent.mkdir()
    shutil.copy(original, swapped)
    with h5py.File(swapped, "r+") as f:
        config = json.loads(f.attrs["config"])
        config["class_names"] = config["class_names"][::-1]
        f.attrs["config"] = json.dumps(config, sort_keys=True, separators=(",", ":"))
    faults = _verify_cli(swapped)
    assert len(faults) == 1 and "the stored config does not match the stored fingerprint" in faults[0]
    with pytest.raises(BottlecacheError, match="does not match the stored fingerprint"):
        open_cache(swapped)
    result = invoke(["cache", "train-head", swapped, "--out", tmp_path / "h3"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "does not match the stored fingerprint" in line
    figures["config rewritten"] = {"verify": faults[0], "open (train-head)": line}

    # config and fingerprint both rewritten to match: the file name still carries the old one
    forged = tmp_path / "forged" / original.name
    forged.parent.mkdir()
    shutil.copy(swapped, forged)
    from bottlecache.core.fingerprint import fingerprint

    with h5py.File(forged, "r+") as f:
        f.attrs["fingerprint"] = fingerprint(json.loads(f.attrs["config"]))
    faults = _verify_cli(forged)  # the root class_names no longer agree with the config's
    assert len(faults) == 1 and "'class_names' differs from config.class_names" in faults[0]
    figures["config and fingerprint rewritten, class names not"] = {"verify": faults[0]}
    with h5py.File(forged, "r+") as f:
        f.attrs["class_names"] = json.dumps(json.loads(f.attrs["config"])["class_names"])
    faults = _verify_cli(forged)
    assert faults == ["fault: the file name does not carry the cache's fingerprint"]
    figures["config and fingerprint rewritten together"] = {"verify": faults[0],
                                                           "open": "opens (file names are not checked)"}
    record("tampered caches", cases=figures)


# ---------------------------------------------------------------------------------------------
# Nothing executed


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve", "marshal", "torch"}


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """Every way ``source`` could load code-carrying data: pickle-family imports and loads,
    ``np.load`` without ``allow_pickle=False``, ``allow_pickle=True``, Keras outside safe mode,
    ``eval`` / ``exec``."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            dotted = ast.unparse(func)
            keywords = {k.arg: k.value for k in node.keywords}
            if dotted.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where} {dotted}(")
            if dotted in ("eval", "exec", "builtins.eval", "builtins.exec", "yaml.load", "yaml.unsafe_load"):
                found.append(f"{where} {dotted}(")
            if dotted in ("np.load", "numpy.load"):
                flag = keywords.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where} {dotted}( without allow_pickle=False")
            if "enable_unsafe_deserialization" in dotted:
                found.append(f"{where} {dotted}(")
            for key in ("allow_pickle", "safe_mode"):
                value = keywords.get(key)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is (key == "safe_mode")):
                    found.append(f"{where} {key}={ast.unparse(value)}")
    return found


def test_unsafe_call_scanner_finds_each_pattern():
    sample = "\n".join([
        "import pickle", "import joblib", "from dill import loads", "import torch", "pickle.loads(b)",
        "joblib.load(p)", "torch.load(p)", "np.load(p)", "np.load(p, allow_pickle=True)", "eval(s)",
        "keras.saving.load_model(p, safe_mode=False)", "keras.config.enable_unsafe_deserialization()",
        "np.load(p, allow_pickle=False)", "keras.saving.load_model(p, safe_mode=True)",
    ])
    found = unsafe_calls(sample)
    assert [int(f.split(":")[1].split()[0]) for f in found] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12]


def test_no_pickle_no_unsafe_loading_in_the_package():
    package = REPO / "src" / "bottlecache"
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 10
    found = [hit for path in files
             for hit in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == []
    record("source scan", files=len(files), unsafe_calls=found)


@pytest.fixture(scope="module")
def lambda_head(reference, tmp_path_factory):
    """A real head folder whose head.keras was replaced by a model with a Lambda layer that writes
    a marker file whenever it runs; ``(head folder, model folder, marker)``."""
    import keras

    from bottlecache.train.heads import train_head

    base = tmp_path_factory.mktemp("lambda")
    head = train_head(reference.path, "keras", epochs=1, out=base / "real-head").path
    marker = base / "EXECUTED"
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('pwned'), x)[1]")
    inputs = keras.Input(shape=(3, 3, 1280))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Lambda(payload, name="payload")(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    assert marker.exists()  # building it ran the payload: it is live
    marker.unlink()
    evil_head = base / "evil-head"
    shutil.copytree(head, evil_head)
    (evil_head / "head.keras").unlink()
    model.save(evil_head / "head.keras")
    evil_model = base / "evil-model"
    evil_model.mkdir()
    shutil.copy(evil_head / "head.keras", evil_model / "model.keras")
    record_json = json.loads((head / "head.json").read_text())
    (evil_model / "model.json").write_text(json.dumps({  # a valid record: the .keras file is what is refused
        "format": "bottlecache-model", "format_version": 1, "class_names": record_json["class_names"],
        "backbone": record_json["backbone"], "weights": "imagenet", "head": str(head),
        "params": {"fine_tune_at": 100, "epochs": 1, "learning_rate": 1e-5, "batch_size": 32, "seed": 0,
                   "augment": False, "early_stopping": None}, "created": "2026-11-28T00:00:00Z"}))
    assert not marker.exists()
    return evil_head, evil_model, marker


def test_keras_files_with_code_are_refused(lambda_head, weights_path, cats_dogs):
    import keras

    from bottlecache.train.heads import load_head

    evil_head, evil_model, marker = lambda_head
    with pytest.raises(BottlecacheError, match="refused in safe mode") as caught:
        load_head(evil_head)
    assert "\n" not in str(caught.value) and not marker.exists()
    image = next((cats_dogs / "validation" / "cats").glob("*.jpg"))
    lines = {}
    for folder, weights in ((evil_head, ["--weights", weights_path]), (evil_model, [])):
        result = invoke(["predict", folder, image, *weights])
        assert result.exit_code == 2, result.output
        lines[folder.name] = error_line(result)
        assert "refused in safe mode" in lines[folder.name] and "Lambda" in lines[folder.name]
        assert not marker.exists()
    # the control: outside safe mode the same file does run its code
    keras.saving.load_model(evil_head / "head.keras", safe_mode=False)
    assert marker.read_text() == "pwned"
    record("Keras file with a Lambda layer", load_head="refused", predict=lines, marker_written_in_safe_mode=False)
