"""Sources and split specs (issue 2): tfds-style slicing on folders, the stable hash split, the
shared preprocessing. Nothing here runs the network; only listing and decoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

from bottlecache.core.errors import BottlecacheError
from bottlecache.data.sources import SplitSpec, load_image, open_source, parse_splits, preprocess

# ---------------------------------------------------------------------------------------------
# Split specs


@pytest.mark.parametrize(
    "text, name, base, start, stop",
    [
        ("train", "train", "train", "", ""),
        ("train[:80%]", "train", "train", "", "80%"),
        ("validation=train[80%:90%]", "validation", "train", "80%", "90%"),
        ("test=validation[-5:]", "test", "validation", "-5", ""),
        ("  small=train[10:20] ", "small", "train", "10", "20"),
    ],
)
def test_split_spec_parse(text, name, base, start, stop):
    spec = SplitSpec.parse(text)
    assert (spec.name, spec.base, spec.start, spec.stop) == (name, base, start, stop)


def test_split_spec_tfds_form_round_trips():
    spec = SplitSpec.parse("validation=train[80%:90%]")
    assert spec.tfds_spec == "train[80%:90%]"
    assert str(spec) == "validation=train[80%:90%]"
    assert SplitSpec.parse(str(spec)) == spec
    assert SplitSpec.parse("train").tfds_spec == "train"


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("train", 10, range(0, 10)),
        ("train[:80%]", 10, range(0, 8)),
        ("validation=train[80%:90%]", 10, range(8, 9)),
        ("test=train[90%:]", 10, range(9, 10)),
        ("train[:3]", 10, range(0, 3)),
        ("train[3:7]", 10, range(3, 7)),
        ("train[-3:]", 10, range(7, 10)),
        ("train[:-2]", 10, range(0, 8)),
        ("train[-20%:]", 10, range(8, 10)),
        ("train[:50]", 10, range(0, 10)),  # clipped, like tfds
        ("train[7:3]", 10, range(7, 7)),  # empty, never negative
        ("train[:10%]", 2000, range(0, 200)),
    ],
)
def test_split_spec_select(text, n, expected):
    assert SplitSpec.parse(text).select(n) == expected


def test_split_spec_percentages_partition():
    """The tutorial's 80/10/10 slices cover every index exactly once."""
    for n in (7, 10, 23, 100, 2000):
        parts = [SplitSpec.parse(s).select(n) for s in ("train[:80%]", "train[80%:90%]", "train[90%:]")]
        assert sorted(i for p in parts for i in p) == list(range(n))


@pytest.mark.parametrize("text", ["", "train[", "train[a:b]", "train[1]", "a=b=c", "train[:80%%]", "tr ain", "x=[1:2]"])
def test_split_spec_parse_rejects(text):
    with pytest.raises(BottlecacheError, match="'split' option"):
        SplitSpec.parse(text)


def test_parse_splits_duplicate_names():
    with pytest.raises(BottlecacheError, match="train twice"):
        parse_splits(["train", "train=validation[:10]"])
    with pytest.raises(BottlecacheError, match="at least one split"):
        parse_splits([])
    assert [s.name for s in parse_splits(["train[:10]", "validation=train[10:20]"])] == ["train", "validation"]


# ---------------------------------------------------------------------------------------------
# Folders


def test_open_source_folder_default_splits(cats_dogs):
    source = open_source(cats_dogs)
    assert source.kind == "folder"
    assert source.class_names == ["cats", "dogs"]
    assert {n: s.n_examples for n, s in source.splits.items()} == {"train": 2000, "validation": 1000}
    train = source.split("train")
    assert len(train.keys) == len(train.paths) == len(train.labels) == 2000
    assert train.keys[0].startswith("train/")
    assert sorted(set(train.labels)) == [0, 1]
    assert source.identity["layout"] == "split-folders"
    assert source.identity["n_files"] == 3000


def test_open_source_folder_slicing(cats_dogs):
    specs = ["train=train[:10%]", "validation=train[10%:20%]", "test=validation[-5:]", "rest=train[20%:]"]
    source = open_source(cats_dogs, specs)
    sizes = {n: s.n_examples for n, s in source.splits.items()}
    assert sizes == {"train": 200, "validation": 200, "test": 5, "rest": 1600}
    keys = {n: source.split(n).keys for n in source.splits}
    # slices of the same base are disjoint and together cover it
    from_train = keys["train"] + keys["validation"] + keys["rest"]
    assert len(set(from_train)) == 2000
    assert all(k.startswith("validation/") for k in keys["test"])
    # the order mixes classes, so that a small slice has both
    assert sorted(set(source.split("train").labels)) == [0, 1]
    # the same specs give the same order again
    again = open_source(cats_dogs, specs)
    assert again.split("train").keys == keys["train"]
    assert again.identity == source.identity
    # a prefix slice is a prefix of the whole base's order
    whole = open_source(cats_dogs, ["train"]).split("train").keys
    assert keys["train"] == whole[:200]
    assert keys["rest"] == whole[400:]


def test_open_source_folder_split_errors(cats_dogs, tmp_path):
    with pytest.raises(BottlecacheError, match="train twice"):
        open_source(cats_dogs, ["train=train[:10]", "train=validation[:10]"])
    with pytest.raises(BottlecacheError, match="'test' is not in"):
        open_source(cats_dogs, ["train", "test"])
    with pytest.raises(BottlecacheError, match="selects no images"):
        open_source(cats_dogs, ["train=train[5:5]"])
    with pytest.raises(BottlecacheError, match="does not exist"):
        open_source(tmp_path / "missing")
    with pytest.raises(BottlecacheError, match="Got the file"):
        (tmp_path / "file.txt").write_text("x")
        open_source(tmp_path / "file.txt")


def test_open_source_folder_layout_errors(tmp_path):
    write_images(tmp_path / "one", {"only": 3})
    with pytest.raises(BottlecacheError, match="one class"):
        open_source(tmp_path / "one")
    write_images(tmp_path / "mismatch", {"train/a": 3, "train/b": 3, "validation/a": 2, "validation/c": 2})
    with pytest.raises(BottlecacheError, match="same classes"):
        open_source(tmp_path / "mismatch")
    write_images(tmp_path / "notrain", {"validation/a": 2, "validation/b": 2})
    with pytest.raises(BottlecacheError, match="no train/ folder"):
        open_source(tmp_path / "notrain")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    write_images(tmp_path / "empty", {"b": 2})
    with pytest.raises(BottlecacheError, match="has no images"):
        open_source(tmp_path / "empty")


def _split_of(source) -> dict[str, str]:
    return {key: name for name, split in source.splits.items() for key in split.keys}


def test_hash_split_is_stable_when_files_are_added(tmp_path):
    root = write_images(tmp_path / "pets", {"cats": 40, "dogs": 40})
    before = open_source(root)
    assert before.identity["layout"] == "hash-split-80-10-10"
    assert set(before.splits) == {"train", "validation", "test"}
    assigned = _split_of(before)
    assert len(assigned) == 80 and all(k.startswith(("cats/", "dogs/")) for k in assigned)
    counts = {n: s.n_examples for n, s in before.splits.items()}
    assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0
    for split in before.splits.values():  # every split has both classes
        assert sorted(set(split.labels)) == [0, 1]

    # Add files (new names) to both classes.
    extra = write_images(tmp_path / "extra", {"cats": 25, "dogs": 25}, seed=1)
    for cls in ("cats", "dogs"):
        for f in sorted((extra / cls).iterdir()):
            shutil.move(f, root / cls / f"new-{f.name}")
    after = open_source(root)
    moved = _split_of(after)
    assert len(moved) == 130
    assert {k: moved[k] for k in assigned} == assigned  # no old file changed split
    assert {v for k, v in moved.items() if k.startswith(("cats/new-", "dogs/new-"))} <= {"train", "validation", "test"}
    # the content identity did change (a cache of the old folder is not reused)
    assert after.identity["files_sha256"] != before.identity["files_sha256"]
    assert after.identity["n_files"] == 130
    # each split's order is stable too: the old keys keep their relative order
    for name in before.splits:
        old = before.split(name).keys
        assert [k for k in after.split(name).keys if k in set(old)] == old


def test_hash_split_with_slices(tmp_path):
    root = write_images(tmp_path / "pets", {"cats": 40, "dogs": 40})
    source = open_source(root, ["train=train[:10]", "holdout=validation"])
    assert source.split("train").n_examples == 10
    full = open_source(root)
    assert source.split("holdout").keys == full.split("validation").keys
    assert source.split("train").keys == full.split("train").keys[:10]


# ---------------------------------------------------------------------------------------------
# The one preprocessing function


def test_preprocess_scales_and_resizes():
    image = np.zeros((30, 40, 3), np.uint8)
    image[..., 0] = 255
    x = preprocess(image, 96).numpy()
    assert x.shape == (96, 96, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], 1.0)
    np.testing.assert_allclose(x[..., 1:], -1.0)
    batch = preprocess(np.stack([image, image]), 128).numpy()
    assert batch.shape == (2, 128, 128, 3)


def test_load_image_matches_preprocess(tmp_path):
    from PIL import Image

    root = write_images(tmp_path, {"a": 1}, size=(50, 20))
    path = root / "a" / "img000.jpg"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    x = load_image(path, 160).numpy()
    assert x.shape == (160, 160, 3)
    assert -1.0 <= x.min() and x.max() <= 1.0
    # the same bytes through the same function (PIL and TF JPEG decoders may differ by a level or two)
    np.testing.assert_allclose(x, preprocess(pixels, 160).numpy(), atol=6 / 127.5)
    np.testing.assert_array_equal(load_image(path.read_bytes(), 160).numpy(), x)
    with pytest.raises(Exception):
        (tmp_path / "bad.jpg").write_text("not an image")
        load_image(tmp_path / "bad.jpg", 160)


def test_a_named_pipe_with_an_image_name_is_not_an_image(tmp_path):
    """A FIFO (or a link to one) named like a photo is left out of the listing: the decoder would wait
    on it forever. A dangling link stays, so that its row is skipped with the reason, as before."""
    import os

    from bottlecache.data.sources import open_source

    root = write_images(tmp_path / "photos", {"train/cats": 3, "train/dogs": 3})
    os.mkfifo(root / "train" / "cats" / "pipe.jpg")
    (root / "train" / "dogs" / "to-pipe.jpg").symlink_to(root / "train" / "cats" / "pipe.jpg")
    (root / "train" / "dogs" / "dangling.jpg").symlink_to(root / "train" / "dogs" / "nothing.jpg")
    source = open_source(root, ["train"])
    paths = {Path(p).relative_to(root / "train").as_posix() for p in source.split("train").paths}
    assert "cats/pipe.jpg" not in paths and "dogs/to-pipe.jpg" not in paths
    assert "dogs/dangling.jpg" in paths and len(paths) == 7
