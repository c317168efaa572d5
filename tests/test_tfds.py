"""The tfds path of ``cache build`` end to end, offline: a small TensorFlow Datasets builder over
real photos of ../shared, prepared into a temporary data_dir, built through the command line and
checked example by example against a folder build of the same image files.

Nothing here touches the network: the builder generates its examples from local files, and once
prepared, ``tfds_source`` neither downloads nor checks DNS.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke

NAME = "bottlecache_test_pets"
PER_CLASS = 24  # from train/cats and train/dogs: 48 photos
SPLITS = ["train=train[:75%]", "validation=train[75%:]"]
KEY = re.compile(rf"^{NAME}-train\.tfrecord-00000-of-00001__(\d+)$")


@functools.cache
def _builder_class():
    """The builder, defined once per process (tfds registers a builder class by its name)."""
    import tensorflow_datasets as tfds

    class BottlecacheTestPets(tfds.core.GeneratorBasedBuilder):
        """24 cats and 24 dogs of cats_and_dogs_filtered/train, the JPEG bytes stored as they are."""

        VERSION = tfds.core.Version("1.0.0")
        files: list[Path] = []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(),
                    "label": tfds.features.ClassLabel(names=["cats", "dogs"]),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for path in self.files:
                yield path.name, {"image": str(path), "label": path.parent.name, "file_name": path.name}

    assert BottlecacheTestPets.name == NAME
    return BottlecacheTestPets


@contextlib.contextmanager
def _no_network():
    """Any name lookup or connection fails the test: everything here must be local."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("getaddrinfo", "gethostbyname", "create_connection"):
            patch.setattr(socket, name, refuse)
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def pet_files(cats_dogs) -> list[Path]:
    files = [p for c in ("cats", "dogs") for p in sorted((cats_dogs / "train" / c).glob("*.jpg"))[:PER_CLASS]]
    assert len(files) == 2 * PER_CLASS
    return files


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, pet_files) -> Path:
    """A data_dir with the builder prepared in it (no download: the examples are local files)."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    cls = _builder_class()
    cls.files = pet_files
    builder = cls(data_dir=str(data_dir))
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False)
    with _no_network():
        builder.download_and_prepare(download_config=config)
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 2 * PER_CLASS
    return data_dir


def _read_tfds(data_dir: Path, split: str) -> list[tuple[str, str, int]]:
    """``(tfds id, file name, label)`` of a split, straight from tfds, in its reading order."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAME, data_dir=str(data_dir))
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1))
    return [(ex["tfds_id"].decode(), ex["file_name"].decode(), int(ex["label"])) for ex in tfds.as_numpy(ds)]


def _build_args(data_dir: Path, splits, weights: Path, cache_dir: Path) -> list:
    args = ["cache", "build", "--data", f"tfds:{NAME}", "--tfds-data-dir", data_dir]
    for spec in splits:
        args += ["--split", spec]
    return args + ["--weights", weights, "--cache-dir", cache_dir, "--image-size", "96", "--engine", "keras", "--json"]


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(path) -> dict:
    """``{split: (keys, labels, features, pooled)}`` of a cache file."""
    from bottlecache.cache.store import Cache

    with Cache(path) as cache:
        return {s: (cache.keys(s), cache.labels(s), cache.features(s), cache.pooled(s)) for s in cache.splits}


@pytest.fixture(scope="module")
def tfds_build(tfds_dir, weights_path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("tfds-cache")
    args = _build_args(tfds_dir, SPLITS, weights_path, cache_dir)
    with _no_network():  # prepared: no download and no DNS check
        result = invoke(args)
    return args, _json(result), cache_dir


@pytest.fixture(scope="module")
def folder_build(pet_files, weights_path, tmp_path_factory):
    """The same 48 files as a folder source (train/<class>/<file> links), one split, same options."""
    root = tmp_path_factory.mktemp("pets-folder")
    for path in pet_files:
        link = root / "train" / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    cache_dir = tmp_path_factory.mktemp("folder-cache")
    result = invoke(["cache", "build", "--data", root, "--split", "train", "--weights", weights_path,
                     "--cache-dir", cache_dir, "--image-size", "96", "--engine", "keras", "--json"])
    return _json(result)


def test_tfds_build_matches_a_folder_build(tfds_build, folder_build, tfds_dir, pet_files):
    _, record, _ = tfds_build
    assert not record["hit"] and not record["resumed"] and record["engine"] == "keras"
    assert [(s["name"], s["n_images"], s["n_skipped"], s["n_processed"]) for s in record["splits"]] == [
        ("train", 36, 0, 36), ("validation", 12, 0, 12)
    ]
    assert record["config"]["data"] == {"kind": "tfds", "name": NAME, "version": "1.0.0"}
    assert record["config"]["splits"] == {"train": "train=train[:75%]", "validation": "validation=train[75%:]"}
    assert record["config"]["class_names"] == ["cats", "dogs"]
    assert Path(record["path"]).name.startswith(NAME)

    cached = _rows(record["path"])
    assert list(cached) == ["train", "validation"]
    folder = {Path(key).name: (label, features, pooled)
              for key, label, features, pooled in zip(*_rows(folder_build["path"])["train"])}
    assert len(folder) == 2 * PER_CLASS
    class_of = {p.name: ["cats", "dogs"].index(p.parent.name) for p in pet_files}

    seen = []
    for split, tfds_spec in [("train", "train[:75%]"), ("validation", "train[75%:]")]:
        keys, labels, features, pooled = cached[split]
        expected = _read_tfds(tfds_dir, tfds_spec)
        # The keys are tfds ids, in the order tfds reads the slice.
        assert keys == [tfds_id for tfds_id, _, _ in expected]
        assert all(KEY.match(k) for k in keys), keys[:3]
        assert labels.tolist() == [label for _, _, label in expected]
        for row, (_, file_name, label) in enumerate(expected):
            seen.append(file_name)
            assert label == class_of[file_name]
            folder_label, folder_features, folder_pooled = folder[file_name]
            assert labels[row] == folder_label, file_name
            # Same bytes, same decode, same preprocessing, same model: the same values, exactly
            # (although the batches differ: 32 + 4 and 12 here, 32 + 16 in the folder build).
            assert features[row].dtype == folder_features.dtype == np.float16
            assert np.array_equal(features[row], folder_features), file_name
            assert np.array_equal(pooled[row], folder_pooled), file_name
    # The two slices cover every photo once.
    assert sorted(seen) == sorted(p.name for p in pet_files)
    # tfds shuffled the examples at prepare time (the comparison above does not rely on order).
    assert seen != [p.name for p in pet_files]
    assert {label for label in cached["validation"][1]} == {0, 1}


def test_tfds_second_build_is_a_cache_hit(tfds_build):
    args, first, _ = tfds_build
    again = _json(invoke(args))
    assert again["hit"] and again["path"] == first["path"] and again["fingerprint"] == first["fingerprint"]
    assert [(s["name"], s["n_images"], s["n_processed"]) for s in again["splits"]] == [
        ("train", 36, 0), ("validation", 12, 0)
    ]


def test_tfds_another_split_spec_is_another_cache(tfds_build, tfds_dir, weights_path):
    _, first, cache_dir = tfds_build
    record = _json(invoke(_build_args(tfds_dir, ["train=train[:8]"], weights_path, cache_dir)))
    assert not record["hit"]
    assert record["fingerprint"] != first["fingerprint"] and record["path"] != first["path"]
    assert [(s["name"], s["n_images"], s["n_processed"]) for s in record["splits"]] == [("train", 8, 8)]
    # The first 8 of train[:75%] are train[:8]: same keys, labels and features.
    small, full = _rows(record["path"])["train"], _rows(first["path"])["train"]
    assert small[0] == full[0][:8]
    assert np.array_equal(small[1], full[1][:8])
    assert np.array_equal(small[2], full[2][:8]) and np.array_equal(small[3], full[3][:8])


def test_tfds_unknown_split(tfds_dir, weights_path, tmp_path):
    result = invoke(_build_args(tfds_dir, ["test=test"], weights_path, tmp_path / "cache"))
    assert result.exit_code == 2
    line = error_line(result)
    assert f"The split 'test' is not in {NAME}. It has train." in line
    assert not (tmp_path / "cache").exists()
