"""``python -m benchmarks``'s options that are not cases: ``--load``, ``--jobs``, the quick image size.
Needs nothing but the repository."""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.suite import background_load, lanes, parse_args


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    assert fields[0] != "Z", f"spinner {pid} exited"
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_load_spins_while_the_cases_run_and_stops_after():
    with background_load(2) as pids:
        assert len(pids) == 2
        while min(_cpu_ticks(pid) for pid in pids) < 10:  # each has spun for 0.1 s of CPU (its progress, not a clock)
            time.sleep(0.05)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped


def test_load_is_recorded_and_checked():
    assert parse_args(["--cases", "decode-only"]).load == 0
    assert parse_args(["--cases", "decode-only", "--load", "2"]).load == 2
    with pytest.raises(SystemExit):
        parse_args(["--load", "-1"])


def test_jobs_needs_quick_and_a_positive_count():
    assert parse_args(["--quick", "--jobs", "2"]).jobs == 2
    assert parse_args([]).jobs == 1
    for bad in (["--jobs", "2"], ["--quick", "--jobs", "0"]):  # a full run's figures are taken alone
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_quick_runs_small_images_unless_told():
    assert parse_args(["--quick"]).image_size == 96
    assert parse_args([]).image_size == 160
    assert parse_args(["--quick", "--image-size", "128"]).image_size == 128


def test_lanes_keep_each_group_whole_and_every_case_once():
    from benchmarks.cases import CASES, GROUPS

    assert sorted(n for g in GROUPS for n in g) == sorted(CASES)  # every case in exactly one group
    group_of = {n: i for i, g in enumerate(GROUPS) for n in g}
    for jobs in (1, 2, 3, 8):
        split = lanes(list(CASES), jobs)
        assert len(split) == min(jobs, len(GROUPS))
        assert sorted(n for lane in split for n in lane) == sorted(CASES)
        # the run's own builds and heads first, in the suite's order
        assert split[0] == (list(CASES) if jobs == 1 else list(GROUPS[0]))
        lane_of = {n: i for i, lane in enumerate(split) for n in lane}
        for name, group in group_of.items():
            assert {lane_of[n] for n in GROUPS[group]} == {lane_of[name]}
    assert lanes(["sweep", "finetune"], 2) == [["finetune"], ["sweep"]]
    assert lanes(["sweep", "backbones"], 2) == [["sweep"], ["backbones"]]
