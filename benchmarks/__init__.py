"""bottlecache's benchmark suite: every claim of the README measured in one run, on one machine.

Run it from the repository root::

    python -m benchmarks            # the full suite (~15 minutes on 2 CPU cores)
    python -m benchmarks --quick    # a small slice, for CI (a few minutes)
    python -m benchmarks.check benchmarks/results/latest-quick.json
    python -m benchmarks.readme     # put the latest full run's table into README.md

The flow is linear: ``suite`` parses the options and prepares a ``Run`` (``context``), runs the
chosen cases of ``cases`` in their fixed order, and ``report`` writes the JSON, the Markdown
table, the checks of the claims and (if matplotlib is there) a plot.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1
