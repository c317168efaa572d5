"""``python -m benchmarks``'s options that are not cases: ``--load``. Needs nothing but the repository."""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.suite import background_load, parse_args


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
