"""The error report (issue 15): the numbers it is drawn from, and the page itself opened in headless
Chromium (Debian's ``chromium``): it renders, every image loads, the console stays empty. The
screenshot's path is printed in the test output (a CI artifact; ``$BOTTLECACHE_ARTIFACTS`` names
the folder it is kept in)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke, open_in_browser

from bottlecache.serve.report import calibration, confident_mistakes, threshold_curve, write_report
from bottlecache.train.heads import train_head


@pytest.fixture(scope="module")
def weak_head(small_cache, tmp_path_factory):
    """A scikit-learn head regularised so hard that it makes mistakes on the 48 validation photos
    (at C=1e-5 it calls every photo a cat)."""
    return train_head(small_cache.path, "sklearn", C=1e-5, out=tmp_path_factory.mktemp("heads") / "weak").path


@pytest.mark.browser
def test_report_opens_in_chromium(weak_head, cats_dogs, tmp_path, capsys):
    page = tmp_path / "report.html"
    result = invoke(["report", weak_head, "--data", cats_dogs, "--out", page, "--top", "6", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["split"] == "validation" and summary["n"] == 48  # no test split: validation
    assert summary["n_wrong"] >= 6 and summary["n_thumbnails"] == 6
    text = page.read_text(encoding="utf-8")
    sources = re.findall(r"<img[^>]* src='([^']*)'", text)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r"(href|src)=['\"](https?:|file:|/)", text)  # self-contained: nothing fetched

    check, console, screenshot = open_in_browser(page, tmp_path)
    with capsys.disabled():
        print(f"\nreport screenshot (CI artifact): {screenshot}")
    assert console == [], console
    assert check["errors"] == [], check["errors"]
    assert len(check["images"]) == 3 + 6  # confusion matrix, reliability, threshold; 6 thumbnails
    assert all(image["loaded"] and image["width"] > 0 for image in check["images"]), check["images"]
    assert check["headings"][0].startswith("Error report") and "Per class" in check["headings"]
    assert any(h.startswith("Most confidently wrong (6 of") for h in check["headings"])
    assert check["height"] > 1000  # the page laid out its sections, not an empty body

    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 2400)
        pixels = np.asarray(shot.convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not a blank page: text and plots drawn


def test_report_numbers(weak_head, small_cache, tmp_path):
    """The page's figures agree with the head's own metrics and with hand-computed calibration."""
    result = write_report(weak_head, "validation", tmp_path / "r.html", top=4)
    metrics = json.loads((weak_head / "metrics.json").read_text())["metrics"]["validation"]
    assert result.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert result.metrics["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert result.n_thumbnails == 4  # no --data: the images are where the cache's build found them
    assert f"<td>{result.ece:.4f}</td>" in (tmp_path / "r.html").read_text()
    older = tmp_path / "older-head"  # a head from before heads recorded their data: keys and probabilities only
    shutil.copytree(weak_head, older)
    record = json.loads((older / "head.json").read_text())
    del record["data"]
    (older / "head.json").write_text(json.dumps(record))
    without = write_report(older, "validation", tmp_path / "r2.html", top=4)
    assert without.n_thumbnails == 0 and "pass --data" in (tmp_path / "r2.html").read_text()
    assert without.metrics["accuracy"] == result.metrics["accuracy"]


def test_calibration_and_threshold_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.95, 0.05], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9], [0.55, 0.45]])
    cal = calibration(labels, proba, bins=2)  # bins [0, 0.5], (0.5, 1]: every confidence is in the upper one
    upper = cal["bins"][1]
    assert cal["bins"][0]["count"] == 0 and upper["count"] == 5
    assert upper["confidence"] == pytest.approx((0.95 + 0.7 + 0.6 + 0.9 + 0.55) / 5)
    assert upper["accuracy"] == pytest.approx(3 / 5)
    assert cal["ece"] == pytest.approx(abs(3 / 5 - 0.74))
    curve = threshold_curve(labels, proba)
    at = dict(zip(np.round(curve["thresholds"], 2), curve["accuracy"]))
    assert at[0.5] == pytest.approx(3 / 5) and at[0.0] == pytest.approx(3 / 5) and at[0.95] == pytest.approx(2 / 5)
    assert curve["best_accuracy"] == pytest.approx(4 / 5)  # 0.05 < t <= 0.45: only the 0.7 cat is wrong
    assert confident_mistakes(labels, proba, 5) == [1, 4]  # the 0.7 mistake first, then the 0.55 one


def test_report_bad_input_is_one_line(weak_head, tmp_path):
    assert "'split'" in error_line(invoke(["report", weak_head, "--split", "test", "--out", tmp_path / "a.html"]))
    assert "'top'" in error_line(invoke(["report", weak_head, "--top", "0", "--out", tmp_path / "a.html"]))
    assert "'bins'" in error_line(invoke(["report", weak_head, "--bins", "1", "--out", tmp_path / "a.html"]))
    assert "neither" in error_line(invoke(["report", tmp_path, "--out", tmp_path / "a.html"]))
    assert "folder" in error_line(invoke(["report", weak_head, "--out", tmp_path]))
    assert not (tmp_path / "a.html").exists()


def test_an_output_file_never_replaces_an_input_or_a_record_and_an_existing_one_needs_overwrite(
        weak_head, cats_dogs, tmp_path, monkeypatch):
    """report --out and predict --csv: an existing file is refused in one line unless --overwrite;
    the command's own inputs, the head's records and bottlecache files never, even then; the default
    report name never replaces an earlier report."""
    photos = tmp_path / "photos"
    image = photos / "cats" / "cat.jpg"
    image.parent.mkdir(parents=True)
    shutil.copy(next((cats_dogs / "validation" / "cats").iterdir()), image)
    cache = Path(json.loads((weak_head / "head.json").read_text())["cache"]["path"])
    protected = {p: p.read_bytes() for p in (image, weak_head / "head.json", weak_head / "head.npz", cache)}
    before = {p: p.stat().st_mtime_ns for p in protected}
    for target in protected:
        for overwrite in ([], ["--overwrite"]):
            for argv in (["report", weak_head, "--data", photos, "--out", target],
                         ["predict", weak_head, image, "--csv", target]):
                result = invoke([*argv, *overwrite])
                line = error_line(result)
                assert result.exit_code == 2, (argv, result.output)
                assert "never replaced" in line or "one of this command's inputs" in line, (argv, line)
    assert {p: p.read_bytes() for p in protected} == protected
    assert {p: p.stat().st_mtime_ns for p in protected} == before

    existing = tmp_path / "mine.csv"
    existing.write_text("keep me\n")
    refused = invoke(["predict", weak_head, image, "--csv", existing])
    assert refused.exit_code == 2 and "exists; pass --overwrite" in error_line(refused)
    assert existing.read_text() == "keep me\n"
    assert invoke(["predict", weak_head, image, "--csv", existing, "--overwrite"]).exit_code == 0
    assert existing.read_text().startswith("path,label,probability")

    monkeypatch.chdir(tmp_path)  # the default report name, twice: the second goes beside the first
    first = invoke(["report", weak_head, "--json"])
    second = invoke(["report", weak_head, "--json"])
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    paths = [Path(json.loads(r.stdout)["path"]).name for r in (first, second)]
    assert paths == [f"report-{weak_head.name}-validation.html", f"report-{weak_head.name}-validation-2.html"]


@pytest.mark.slow
def test_a_head_remembers_where_its_data_and_weights_were(weak_head, cats_dogs, tmp_path, monkeypatch):
    """A head of a folder cache: report, export and predict need neither --data nor --weights (from
    another folder, without $BOTTLECACHE_WEIGHTS); data moved away is one line naming --data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BOTTLECACHE_WEIGHTS", raising=False)
    record = json.loads((weak_head / "head.json").read_text())
    assert record["data"]["path"] == str(cats_dogs.resolve()) and Path(record["weights"]).is_absolute()

    reported = invoke(["report", weak_head, "--top", "2", "--json"])
    assert reported.exit_code == 0, reported.output
    assert json.loads(reported.stdout)["n_thumbnails"] == 2  # the images were found where the build found them
    exported = invoke(["export", weak_head, "--format", "keras", "--out", tmp_path / "export", "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["accuracy"] == json.loads(exported.stdout)["source_accuracy"]
    image = next((cats_dogs / "validation" / "dogs").iterdir())
    assert invoke(["predict", weak_head, image]).exit_code == 0

    moved = tmp_path / "moved-head"
    shutil.copytree(weak_head, moved)
    record["data"]["path"] = str(tmp_path / "photos-that-moved")
    (moved / "head.json").write_text(json.dumps(record))
    refused = invoke(["export", moved, "--format", "keras", "--out", tmp_path / "export-2"])
    assert refused.exit_code == 2 and "pass --data" in error_line(refused) and "photos-that-moved" in error_line(refused)
    assert not (tmp_path / "export-2").exists()
