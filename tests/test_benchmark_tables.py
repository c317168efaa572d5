"""The generated table of augmented views and the cached cut (``benchmarks.report``): its figures
are computed from the cases' numbers, it is left out for results without those cases, and the
README's line links to a heading the docs section has. Needs nothing but the repository."""

from __future__ import annotations

import copy
import json

from test_docs import HEADING, REPO, slug

from benchmarks.readme import readme_section, section
from benchmarks.report import cached_training_line, cached_training_table

CASES = {
    "finetune": {"seconds_per_epoch": 50.0, "accuracy": {"validation": 0.97, "test": None}},
    "finetune-cached": {"seconds_per_epoch": 10.0, "accuracy": {"validation": 0.96, "test": None},
                        "dtype": "float16", "cut_bytes_per_image": 2048.0},
    "finetune-cached-float32": {"seconds_per_epoch": 12.5, "accuracy": {"validation": 0.965, "test": None},
                                "dtype": "float32", "cut_bytes_per_image": 4096.0},
    "tutorial-augmented": {"seconds": 400.0, "accuracy": {"validation": 0.95, "test": 0.94}},
    "cached-keras-views": {"seconds": 100.0, "accuracy": {"validation": 0.96, "test": 0.93}, "views": 8,
                           "bytes_per_image": 20480.0, "view_bytes_per_image_per_view": 10240.0,
                           "build_seconds": 90.0, "train_build_seconds": 80.0, "clean_train_build_seconds": 10.0,
                           "train_build_ratio": 8.0, "views_build_seconds_per_image_per_view": 0.004},
}


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in CASES:
            out[cells[0], cells[1]] = cells[2:]
    return out


def test_table_figures_come_from_the_cases():
    table = cached_training_table(CASES)
    got = rows(table)
    assert got["finetune-cached", "finetune"] == ["5.00× s/epoch", "96.00 % / 97.00 % (-1.00)", "–",
                                                  "cut float16 2.0 KiB"]
    assert got["finetune-cached-float32", "finetune"][:2] == ["4.00× s/epoch", "96.50 % / 97.00 % (-0.50)"]
    assert got["finetune-cached-float32", "finetune-cached"][:2] == ["0.80× s/epoch", "96.50 % / 96.00 % (+0.50)"]
    assert got["cached-keras-views", "tutorial-augmented"] == [
        "4.00× total s", "96.00 % / 95.00 % (+1.00)", "93.00 % / 94.00 % (-1.00)",
        "bottleneck 20.0 KiB + 10.0 KiB per view × 8"]
    assert "finetune-cached-views" not in table  # neither it nor finetune-augment ran
    assert "80.0 s against 10.0 s" in table and "4.0 ms more per image per view" in table


def test_a_failed_or_missing_case_leaves_its_rows_out():
    cases = copy.deepcopy(CASES)
    cases["finetune"] = {"seconds": 1.0, "error": "RuntimeError: boom"}
    got = rows(cached_training_table(cases))
    assert set(got) == {("finetune-cached-float32", "finetune-cached"), ("cached-keras-views", "tutorial-augmented")}
    assert cached_training_table({"finetune": CASES["finetune"]}) is None
    assert cached_training_line({"finetune": CASES["finetune"]}) is None


def test_readme_line_links_to_the_docs_table():
    result = json.loads((REPO / "benchmarks" / "results" / "latest-full.json").read_text())
    result["cases"].update(copy.deepcopy(CASES))
    readme, page = readme_section(result, "x"), section(result, "x")
    line = next(line for line in readme.splitlines() if line.startswith("Augmented views and the cached cut:"))
    assert "finetune-cached 5.00× finetune's s/epoch, validation 96.00 % vs 97.00 %" in line
    assert "test 93.00 % vs 94.00 %" in line
    assert "building K = 8 views: the train split 8.0× the clean build's seconds (4.0 ms more" in line
    anchor = line.rsplit("](docs/benchmarks.md#", 1)[1].rstrip(").")
    assert anchor in {slug(heading) for _, heading in HEADING.findall(page)}


def test_old_results_render_unchanged():
    """A result without these cases gives no table and no README line (the committed sections stay)."""
    result = json.loads((REPO / "benchmarks" / "results" / "latest-full.json").read_text())
    for name in [*CASES, "finetune-cached-views", "finetune-augment"]:
        result["cases"].pop(name, None)
    assert "Augmented views" not in readme_section(result, "x") + section(result, "x")
