"""``cache audit`` and ``--exclude`` (issue 28): label issues found from the cache by confident
learning (cleanlab, an extra: these tests fail in CI without it and are skipped elsewhere),
outliers, near-duplicates and leakage, class balance; training without the issues.

Real photos (links to a slice of cats_and_dogs_filtered) with 3 train labels flipped each way and
one validation photo copied into train (leakage), a real LiteRT cache at 96 px, real heads.
"""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest
from conftest import copy_engines, error_line, invoke, need_extra, open_in_browser

from bottlecache import build_cache
from bottlecache.cache.store import Cache
from bottlecache.train.heads import train_head

pytestmark = pytest.mark.slow  # a cache build, cross-validated heads

SIZE = 96
N_TRAIN, N_VALIDATION, FLIP = 40, 20, 3  # per class; FLIP train photos of each class filed under the other


@pytest.fixture(scope="module")
def world(tmp_path_factory, cats_dogs, weights_path, converted):
    need_extra("audit", "cleanlab")
    root = tmp_path_factory.mktemp("audit")
    data, flipped = root / "data", []
    for cls, other in (("cats", "dogs"), ("dogs", "cats")):
        for split, n in (("train", N_TRAIN), ("validation", N_VALIDATION)):
            for j, path in enumerate(sorted((cats_dogs / split / cls).iterdir())[:n]):
                label = other if split == "train" and j < FLIP else cls
                (data / split / label).mkdir(parents=True, exist_ok=True)
                (data / split / label / path.name).symlink_to(path)
                if label != cls:
                    flipped.append(f"{split}/{label}/{path.name}")
    leaked = sorted((data / "validation" / "cats").iterdir())[0]
    (data / "train" / "cats" / f"copy-{leaked.name}").symlink_to(leaked.resolve())  # the same photo in both splits
    cache = build_cache(str(data), image_size=SIZE, weights=weights_path, engine="litert",
                        cache_dir=copy_engines(converted(SIZE), root / "cache")).path
    out = root / "audit"
    result = invoke(["cache", "audit", str(cache), "--folds", "5", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, data=data, cache=cache, flipped=flipped, out=out, report=json.loads(result.stdout),
                           leaked=(f"train/cats/copy-{leaked.name}", f"validation/cats/{leaked.name}"))


def test_flipped_labels_are_the_first_label_issues(world):
    issues = world.report["label_issues"]
    with Cache(world.cache) as cache:
        keys = {split: cache.keys(split) for split in cache.splits}
    assert all({"key", "split", "given", "suggested", "score"} <= set(issue) for issue in issues)
    assert all(issue["key"] in keys[issue["split"]] for issue in issues)  # the keys as stored in the cache
    scores = [issue["score"] for issue in issues]
    assert scores == sorted(scores)  # most likely wrong first
    first = [issue["key"] for issue in issues[: 2 * FLIP]]
    assert len(set(first) & set(world.flipped)) >= 2 * FLIP - 2, (first, world.flipped)
    for issue in issues:
        if issue["key"] in world.flipped:  # filed under the other class; the heads say so
            assert issue["given"] == issue["key"].split("/")[1] and issue["suggested"] != issue["given"]

    assert world.report["class_balance"] == {"train": {"cats": N_TRAIN + 1, "dogs": N_TRAIN},
                                             "validation": {"cats": N_VALIDATION, "dogs": N_VALIDATION}}
    leakage = [p for p in world.report["duplicates"]["pairs"] if p["leakage"]]
    assert {(p["a"]["key"], p["b"]["key"]) for p in leakage} == {world.leaked} and leakage[0]["cosine"] > 0.999
    outliers = world.report["outliers"]
    assert len(outliers) == 20 and outliers[0]["percentile"] == 1.0
    assert [o["distance"] for o in outliers] == sorted((o["distance"] for o in outliers), reverse=True)

    # the folder: the same JSON, the keys to leave out, the page
    assert (world.out / "exclude.txt").read_text().splitlines() == [issue["key"] for issue in issues]
    written = json.loads((world.out / "audit.json").read_text())
    assert written["label_issues"] == issues and written["path"] == str(world.out)


def test_the_table_and_a_second_audit_beside_the_first(world, tmp_path):
    result = invoke(["cache", "audit", str(world.cache), "--folds", "5", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# label issues") and lines[1].split("\t") == [
        "#", "split", "key", "given", "suggested", "label quality"]
    audits = world.cache.parent / "audits"
    assert f"wrote {audits / world.cache.stem} " in result.stdout  # the default folder, beside the cache
    again = invoke(["cache", "audit", str(world.cache), "--folds", "5", "--json"])
    assert json.loads(again.stdout)["path"] == str(audits / f"{world.cache.stem}-2")  # never over the first
    assert json.loads(again.stdout)["label_issues"] == json.loads(
        (audits / world.cache.stem / "audit.json").read_text())["label_issues"]  # seeded: the same issues


@pytest.mark.browser
def test_the_audit_page_opens_in_chromium(world, tmp_path, capsys):
    page = world.out / "audit.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"(href|src)=['\"](https?:|file:|/)", text)  # self-contained: nothing fetched
    check, console, screenshot = open_in_browser(page, tmp_path, "audit")
    with capsys.disabled():
        print(f"\naudit screenshot (CI artifact): {screenshot}")
    assert console == [] and check["errors"] == [], (console, check["errors"])
    n_issues = min(len(world.report["label_issues"]), 60)
    n_pairs = min(len(world.report["duplicates"]["pairs"]), 20)
    assert len(check["images"]) == n_issues + len(world.report["outliers"]) + 2 * n_pairs  # every thumbnail found
    assert all(image["loaded"] and image["width"] > 0 for image in check["images"]), check["images"]
    assert check["headings"][0].startswith("Data audit") and any(h.startswith("Label issues") for h in check["headings"])
    assert any(h.startswith("Outliers") for h in check["headings"])


def test_a_head_trained_without_the_issues_records_what_it_left_out(world, tmp_path):
    exclude = world.out / "exclude.txt"
    result = invoke(["cache", "train-head", str(world.cache), "--exclude", str(exclude), "--out", str(tmp_path / "sk"),
                     "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "sk" / "head.json").read_text())["params"]["exclude"]
    train_issues = [i["key"] for i in world.report["label_issues"] if i["split"] == "train"]
    assert sorted(record["excluded"]) == sorted(train_issues) and record["n_excluded"] == len(train_issues)
    assert record["n_keys"] == len(world.report["label_issues"]) and record["file"] == str(exclude)
    with Cache(world.cache) as cache:
        n_validation = cache.n_examples("validation")
    assert json.loads(result.stdout)["metrics"]["validation"]["n"] == n_validation  # evaluated on every image

    # the Keras head, streamed from the file (a memory budget of one byte), leaves out the same rows
    keras = train_head(world.cache, "keras", epochs=2, max_memory=1, exclude=exclude, save=False)
    assert keras.params["in_memory"] is False and keras.params["exclude"]["excluded"] == record["excluded"]
    # a list of keys is as good as a file
    direct = train_head(world.cache, "sklearn", exclude=train_issues, save=False)
    assert direct.params["exclude"]["excluded"] == record["excluded"] and direct.params["exclude"]["file"] is None


def test_a_sweep_and_a_fine_tuning_leave_the_issues_out(world, weights_path, tmp_path):
    from bottlecache.train.finetune import finetune
    from bottlecache.train.sweep import sweep

    exclude = world.out / "exclude.txt"
    cache_dir = copy_engines(world.cache.parent, tmp_path / "cache")
    options = dict(weights=weights_path, cache_dir=cache_dir, image_sizes=(SIZE,), kinds=("sklearn",), plot=False)
    board = sweep(str(world.data), exclude=exclude, **options)
    head = json.loads((board.winner_path / "head.json").read_text())
    assert head["params"]["exclude"]["n_keys"] == len(world.report["label_issues"])
    assert sweep(str(world.data), exclude=exclude, **options).n_trained == 0  # the same list: nothing again
    assert sweep(str(world.data), **options).n_trained == 1  # without it: another head

    keras = train_head(world.cache, "keras", epochs=1, out=tmp_path / "keras")
    result = finetune(str(world.data), head=keras.path, weights=weights_path, image_size=SIZE, epochs=1,
                      from_cache=True, exclude=exclude, cache_dir=cache_dir, out=tmp_path / "model")
    params = json.loads((tmp_path / "model" / "model.json").read_text())["params"]
    assert params["exclude"]["keys"] == sorted(i["key"] for i in world.report["label_issues"])
    assert result.epochs_run == 1


def test_what_the_audit_cannot_do_is_one_line(world, tmp_path, monkeypatch):
    result = invoke(["cache", "audit", str(world.cache), "--folds", "1"])
    assert result.exit_code == 2 and "The 'folds' option must be in [2, 100]" in error_line(result)
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # as on a machine without the extra
    result = invoke(["cache", "audit", str(world.cache), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "pip install 'bottlecache[audit]'" in error_line(result)
    assert not (tmp_path / "a").exists()
    for bad, expected in ((tmp_path / "missing.txt", "missing"), (tmp_path, "a folder")):
        result = invoke(["cache", "train-head", str(world.cache), "--exclude", str(bad)])
        assert result.exit_code != 0 and expected in error_line(result)
    (tmp_path / "other.txt").write_text("train/cats/not-here.jpg\n")
    result = invoke(["cache", "train-head", str(world.cache), "--exclude", str(tmp_path / "other.txt")])
    assert "None of the 1 keys of" in error_line(result) and "is it the list of another cache?" in error_line(result)
