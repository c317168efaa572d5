"""Sources of labelled images (TensorFlow Datasets, local folders), split specs, and the one
preprocessing function that every path of the project uses.

A source resolves to named splits; each split is an ordered list of examples
``(index, key, label, encoded image)``. ``image_dataset`` turns such a list into preprocessed
images with tf.data (parallel decode, prefetch, deterministic order); files that do not decode
are dropped there and reported by ``describe_failure``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BottlecacheError, reason
from ..core.options import DEFAULT_DATA, DEFAULT_MODEL, usable_cores
from ..core.registry import preprocessing_of
from ..core.tf import import_tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_TFDS_SPLITS = ("train=train[:80%]", "validation=train[80%:90%]", "test=train[90%:]")
FOLDER_SPLIT_DIRS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
HASH_SPLIT = (("train", 0.8), ("validation", 0.9), ("test", 1.0))
_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z0-9_-]+)=)?(?P<base>[A-Za-z0-9_-]+)(?:\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")
_BOUND = re.compile(r"^-?\d+%?$")


# ---------------------------------------------------------------------------------------------
# The one preprocessing function


def preprocess(image, image_size: int, model: str = DEFAULT_MODEL):
    """Cast to float32, bilinear resize, then the base's own scaling (for MobileNetV2, the
    tutorial's: to [-1, 1]; each base's is named in ``bottlecache.core.registry``).

    Used by every path: cache build, the end-to-end baselines, fine-tuning and prediction.
    Resizing before scaling gives the values of scaling first (bilinear weights sum to one; the
    two differ by float32 rounding, under 1e-6) and does the scaling on ``image_size`` pixels
    instead of the whole photo: 28% less work per 500x375 JPEG (docs/data.md, "Preprocessing").

    Parameters
    ----------
    image : uint8 tensor or array, (H, W, 3) or (N, H, W, 3)
    image_size : int
        Output side in pixels.
    model : str
        The registered base whose preprocessing applies (default ``mobilenet_v2``).

    Returns
    -------
    float32 tensor, (image_size, image_size, 3) or (N, image_size, image_size, 3)
    """
    import tensorflow as tf  # a plain import: this runs inside tf.data graphs too

    x = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method="bilinear")
    return preprocessing_of(model)(x)


def decode_image(encoded, fast_size: int | None = None):
    """Encoded JPEG / PNG / BMP / GIF bytes → uint8 RGB (H, W, 3); a GIF gives its first frame.

    With ``fast_size``, a JPEG whose short side is at least 2, 4 or 8 times ``fast_size`` is
    decoded directly at 1/2, 1/4 or 1/8 scale in the DCT domain (``--fast-decode``): less work,
    never below the target size, and slightly different pixels (an area-like downscale).
    """
    import tensorflow as tf

    def full():
        return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)

    if not fast_size:
        return full()

    def scaled_jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        short = tf.minimum(shape[0], shape[1])
        index = sum(tf.cast(short >= k * fast_size, tf.int32) for k in (2, 4, 8))
        branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in (1, 2, 4, 8)]
        return tf.switch_case(index, branches)

    return tf.cond(tf.io.is_jpeg(encoded), scaled_jpeg, full)


def load_image(path_or_bytes, image_size: int, fast_decode: bool = False, model: str = DEFAULT_MODEL):
    """Read (if a path), decode and preprocess one image, eagerly. Raises on an unreadable file."""
    tf = import_tf()
    if isinstance(path_or_bytes, (str, os.PathLike)):
        path_or_bytes = tf.io.read_file(str(path_or_bytes))
    return preprocess(decode_image(path_or_bytes, image_size if fast_decode else None), image_size, model)


def describe_failure(path_or_bytes) -> str:
    """Why an image did not load: one line, for the cache's ``skipped`` list."""
    tf = import_tf()
    try:
        data = tf.io.read_file(str(path_or_bytes)) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
        if int(tf.strings.length(data)) == 0:
            return "empty file"
        decode_image(data)
    except Exception as error:  # the decoder's own message is the reason we record
        return reason(error, 300)
    return "could not be decoded"


# ---------------------------------------------------------------------------------------------
# Split specs


@dataclass(frozen=True)
class SplitSpec:
    """``name=base[start:stop]`` in tfds slicing syntax (bounds are counts or percentages)."""

    name: str
    base: str
    start: str = ""
    stop: str = ""

    @classmethod
    def parse(cls, text: str) -> "SplitSpec":
        match = _SPEC.match(text.strip())
        if not match or any(b and not _BOUND.match(b) for b in (match["start"] or "", match["stop"] or "")):
            raise BottlecacheError(
                f"The 'split' option must look like 'train', 'train[:80%]' or 'validation=train[80%:90%]'. "
                f"Got {text!r} instead."
            )
        return cls(match["name"] or match["base"], match["base"], match["start"] or "", match["stop"] or "")

    @property
    def tfds_spec(self) -> str:
        return f"{self.base}[{self.start}:{self.stop}]" if (self.start or self.stop) else self.base

    def __str__(self) -> str:
        return f"{self.name}={self.tfds_spec}"

    def select(self, n: int) -> range:
        """The indices ``[start:stop]`` selects out of ``n`` (percentages round to the nearest)."""

        def bound(text: str, default: int) -> int:
            if not text:
                return default
            value = round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)
            return max(0, min(n, value + n if value < 0 else value))

        return range(bound(self.start, 0), max(bound(self.start, 0), bound(self.stop, n)))


def parse_splits(specs) -> list[SplitSpec]:
    parsed = [SplitSpec.parse(s) if isinstance(s, str) else s for s in specs]
    names = [s.name for s in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BottlecacheError(f"The 'split' option names each split once. Got {', '.join(duplicates)} twice.")
    if not parsed:
        raise BottlecacheError("The 'split' option needs at least one split. Got none.")
    return parsed


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class Split:
    """One resolved split: its spec and its examples in their fixed order."""

    spec: SplitSpec
    n_examples: int
    keys: list[str] | None = None  # folder sources know every key up front
    paths: list[str] | None = None
    labels: list[int] | None = None
    stats: list[tuple[int, int]] | None = None  # folders: each file's (size, mtime_ns) as listed

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Source:
    """A resolved data source: class names, splits and an identity for the fingerprint."""

    kind: str  # "folder" or "tfds"
    name: str
    class_names: list[str]
    splits: dict[str, Split]
    identity: dict
    root: Path | None = None
    builder: object = field(default=None, repr=False)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise BottlecacheError(f"The split {name!r} is not in this source. It has {', '.join(self.splits)}.")
        return self.splits[name]

    def examples(self, name: str, start: int = 0, only=None):
        """tf.data.Dataset of ``(index, key, label, encoded)`` for a split, from ``start`` on.

        ``only``: a boolean mask over the split's indices; the others are left out (not read, for
        a folder) — the examples an incremental build computes (reuse.py).
        """
        tf = import_tf()
        split = self.split(name)
        if self.kind == "folder":
            chosen = list(range(start, split.n_examples))
            if only is not None:
                chosen = [i for i in chosen if only[i]]
            ds = tf.data.Dataset.from_tensor_slices(
                (
                    tf.constant(chosen, tf.int64, shape=(len(chosen),)),
                    tf.constant([split.keys[i] for i in chosen], tf.string, shape=(len(chosen),)),
                    tf.constant([split.labels[i] for i in chosen], tf.int64, shape=(len(chosen),)),
                    tf.constant([split.paths[i] for i in chosen], tf.string, shape=(len(chosen),)),
                )
            )
            return ds.map(plain(lambda i, k, y, p: (i, k, y, tf.io.read_file(p))), num_parallel_calls=usable_cores())
        import tensorflow_datasets as tfds

        ds = self.builder.as_dataset(
            split=split.spec.tfds_spec,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
        )
        ds = ds.skip(start).enumerate(start)
        if only is not None:
            mask = tf.constant(list(map(bool, only)), tf.bool, shape=(len(only),))
            ds = ds.filter(lambda i, ex: tf.gather(mask, i))
        return ds.map(lambda i, ex: (i, ex["tfds_id"], tf.cast(ex["label"], tf.int64), ex["image"]))

    def example(self, name: str, index: int):
        """``(key, label, path or encoded bytes)`` of one example, for error reports."""
        split = self.split(name)
        if self.kind == "folder":
            return split.keys[index], split.labels[index], split.paths[index]
        for _, key, label, encoded in self.examples(name, index).take(1):
            return key.numpy().decode(), int(label), encoded
        raise IndexError(index)


def open_source(data: str | os.PathLike = DEFAULT_DATA, splits=None, *, tfds_data_dir=None) -> Source:
    """Resolve ``--data``: a local image folder, ``tfds:NAME`` or a bare TensorFlow Datasets name.

    Parameters
    ----------
    data : str or path
        Folder path, ``tfds:NAME`` or ``NAME``.
    splits : list of str, optional
        Split specs such as ``"validation=train[80%:90%]"``. Defaults: the folder's own splits
        (or its 80/10/10 hash split), or the tutorial's 80/10/10 for tfds.
    tfds_data_dir : str, optional
        Passed to TensorFlow Datasets.
    """
    text = str(data)
    if text.startswith("tfds:"):
        return _open_tfds(text[5:], splits, tfds_data_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return _open_folder(path, splits)
    if path.exists():
        raise BottlecacheError(f"The 'data' option must be an image folder or a tfds name. Got the file {text!r}.")
    if os.sep in text or text.startswith(".") or text.startswith("~"):
        raise BottlecacheError(f"The 'data' option names a folder that does not exist: {text!r}.")
    return _open_tfds(text, splits, tfds_data_dir)


def _hash_fraction(relative: str) -> float:
    return int(hashlib.sha256(relative.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def _list_images(folder: Path) -> list[str]:
    """The image files of ``folder`` by name, as paths (strings: a folder of 100,000 photos is
    listed for every build, and ``Path`` objects cost most of that)."""
    entries = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if entry.is_dir(follow_symlinks=False) or not _regular_or_dangling(entry):
            continue  # a named pipe or a device with an image's name would block the decoder forever
        try:  # keys are stored as UTF-8, and TensorFlow opens files by UTF-8 paths
            entry.path.encode("utf-8")
        except UnicodeEncodeError:
            raise BottlecacheError(f"The path {entry.path!r} is not valid UTF-8; rename it.") from None
        entries.append(entry.path)
    return entries


def _regular_or_dangling(entry) -> bool:
    """Not a named pipe, socket or device, directly or through a link; a link to nothing, to a
    folder or in a loop stays (its row is skipped with the reason)."""
    if not entry.is_symlink() and entry.is_file(follow_symlinks=False):  # d_type: no system call
        return True
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:
        return True
    return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode))


def _class_images(class_dir: Path) -> list[str]:
    files = _list_images(class_dir)
    if not files:
        raise BottlecacheError(f"The class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _class_folders(folder: Path, where: str) -> list[Path]:
    classes = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not classes:
        raise BottlecacheError(f"{where} has no class sub-folders; expected {where}/<class>/<image>.")
    return classes


def _file_identity(path: str, relative: str) -> list:
    try:
        stat = os.stat(path)
        return [relative, stat.st_size, stat.st_mtime_ns]
    except OSError:  # broken link, loop: still listed; it will be skipped with its reason
        return [relative, -1, -1]


def _open_folder(root: Path, splits) -> Source:
    split_dirs = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name in FOLDER_SPLIT_DIRS]
    if {"val", "validation"} <= {p.name for p in split_dirs}:
        raise BottlecacheError(f"The folder {root} has both val/ and validation/; keep one of them.")
    layout = {FOLDER_SPLIT_DIRS[p.name]: p for p in split_dirs}
    base: dict[str, list[tuple[str, str, str]]] = {}  # split → [(relative, path, class)]
    if "train" in layout:
        class_sets = {}
        for split_name, split_dir in layout.items():
            rows = []
            classes = _class_folders(split_dir, f"{root.name}/{split_dir.name}")
            class_sets[split_name] = [c.name for c in classes]
            for class_dir in classes:
                prefix = class_dir.relative_to(root).as_posix() + "/"
                rows += [(prefix + os.path.basename(f), f, class_dir.name) for f in _class_images(class_dir)]
            base[split_name] = rows
        class_names = class_sets["train"]
        for split_name, names in class_sets.items():
            if names != class_names:
                raise BottlecacheError(
                    f"Every split must have the same classes: train has {class_names}, {split_name} has {names}."
                )
        layout_kind = "split-folders"
    elif "validation" in layout or "test" in layout:
        raise BottlecacheError(f"The folder {root} has split folders but no train/ folder; add train/<class>/ images.")
    else:
        classes = _class_folders(root, str(root))
        class_names = [c.name for c in classes]
        base = {name: [] for name, _ in HASH_SPLIT}
        for class_dir in classes:
            prefix = class_dir.relative_to(root).as_posix() + "/"
            for f in _class_images(class_dir):
                relative = prefix + os.path.basename(f)
                fraction = _hash_fraction(relative)
                split_name = next(name for name, upper in HASH_SPLIT if fraction < upper)
                base[split_name].append((relative, f, class_dir.name))
        for split_name, rows in base.items():
            present = sorted({c for _, _, c in rows})
            if rows and present != class_names:
                missing = sorted(set(class_names) - set(present))
                raise BottlecacheError(
                    f"Every split must have the same classes: the {split_name} split of the 80/10/10 hash split has "
                    f"no images of {', '.join(missing)}; add images or lay the folder out as train/validation/test."
                )
        base = {k: v for k, v in base.items() if v}
        layout_kind = "hash-split-80-10-10"
    if len(class_names) < 2:
        raise BottlecacheError(f"The folder {root} has one class ({class_names[0]}); a classifier needs at least two.")

    specs = parse_splits(splits or list(base))
    index = {name: i for i, name in enumerate(class_names)}
    identities = {r: _file_identity(p, r) for rows in base.values() for r, p, _ in rows}
    resolved = {}
    for spec in specs:
        if spec.base not in base:
            raise BottlecacheError(f"The split {spec.base!r} is not in {root}. It has {', '.join(base)}.")
        # A stable pseudo-random order (by a hash of the relative path), so that slices mix classes.
        rows = sorted(base[spec.base], key=lambda r: (_hash_fraction("order:" + r[0]), r[0]))
        rows = [rows[i] for i in spec.select(len(rows))]
        resolved[spec.name] = Split(
            spec, len(rows), [r[0] for r in rows], [r[1] for r in rows], [index[r[2]] for r in rows],
            [tuple(identities[r[0]][1:]) for r in rows],
        )
    empty = [name for name, s in resolved.items() if s.n_examples == 0]
    if empty:
        raise BottlecacheError(f"The split {empty[0]!r} selects no images; check its slice.")
    files = sorted(identities.values())
    identity = {
        "kind": "folder",
        "name": root.name,
        "layout": layout_kind,
        "n_files": len(files),
        "files_sha256": hashlib.sha256(json.dumps(files).encode("utf-8")).hexdigest(),
    }
    return Source("folder", root.resolve().name, class_names, resolved, identity, root=root.resolve())


def _open_tfds(name: str, splits, data_dir) -> Source:
    import_tf()  # first: quietly (see _tf)
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:
        raise BottlecacheError(
            f"The 'data' option {name!r} is neither a local folder nor a TensorFlow Datasets name "
            f"({type(error).__name__}); pass a folder of <class>/<image> files or a tfds name."
        ) from None
    return tfds_source(builder, splits)


def tfds_source(builder, splits=None) -> Source:
    """A source over a TensorFlow Datasets builder (downloads and prepares it if needed)."""
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise BottlecacheError(
            f"The tfds data set {builder.name!r} has no 'image' and 'label' features; "
            "bottlecache needs an image classification data set."
        )
    if not _is_prepared(builder):
        if not _can_resolve("storage.googleapis.com"):  # tfds retries a dead network for minutes
            raise BottlecacheError(
                f"Could not download the tfds data set {builder.name!r} (offline: no DNS); "
                "pass --data PATH to a local folder of <class>/<image> files instead."
            )
        try:
            builder.download_and_prepare()
        except Exception as error:
            raise BottlecacheError(
                f"Could not download the tfds data set {builder.name!r} (offline? {reason(error, 160)}); "
                "pass --data PATH to a local folder of <class>/<image> files instead."
            ) from None
    specs = parse_splits(splits or DEFAULT_TFDS_SPLITS)
    resolved = {}
    for spec in specs:
        try:
            n = builder.info.splits[spec.tfds_spec].num_examples
        except Exception:
            raise BottlecacheError(
                f"The split {spec.tfds_spec!r} is not in {builder.name}. It has {', '.join(builder.info.splits)}."
            ) from None
        resolved[spec.name] = Split(spec, n)
    identity = {"kind": "tfds", "name": builder.name, "version": str(builder.info.version)}
    return Source("tfds", builder.name, list(features["label"].names), resolved, identity, builder=builder)


def _can_resolve(host: str) -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.is_prepared())
    except Exception:
        return False


def split_config(source: Source) -> dict:
    return {name: str(split.spec) for name, split in source.splits.items()}


# ---------------------------------------------------------------------------------------------
# Images


def image_dataset(source: Source, split: str, image_size: int, *, start: int = 0, ordered=None,
                  fast_decode: bool = False, parallel: int | None = None, only=None, model: str = DEFAULT_MODEL):
    """``(index, key, label, image)`` with the shared preprocessing of ``model``; undecodable files dropped.

    ``ordered`` is an optional ``(index, key, label, encoded)`` dataset to use instead of the
    split's own order (a shuffled one, for training). ``fast_decode``: see ``decode_image``.
    ``parallel``: images decoded at once (default: the usable cores). ``only``: see
    ``Source.examples``.

    tf.data's autotuning is off (see ``pipeline_options``).
    """
    ds = ordered if ordered is not None else source.examples(split, start, only)
    fast_size = image_size if fast_decode else None
    ds = ds.map(
        plain(lambda i, k, y, e: (i, k, y, preprocess(decode_image(e, fast_size), image_size, model))),
        num_parallel_calls=parallel or usable_cores(),
        deterministic=True,
    )
    return ds.ignore_errors().with_options(pipeline_options())


def plain(function):
    """``function`` for ``Dataset.map`` as it is, not rewritten by AutoGraph: the decoding and
    preprocessing functions have no Python control flow on tensors (their branches are
    ``tf.cond``), and converting them took about a second per pipeline, most of an incremental
    build that computes a few photos."""
    return import_tf().autograph.experimental.do_not_convert(function)


def pipeline_options():
    """Options of every image pipeline: fixed parallelism, tf.data's autotuning off.

    Measured (960-image LiteRT builds, this 2-core machine): with autotuning on, about half the
    iterators took 3.7–3.9 s to be destroyed at the end of a split, waiting for the autotuner's
    background thread — a quarter of the build's time. With the fixed parallelism below: none.
    """
    tf = import_tf()
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def training_dataset(
    source: Source,
    split: str,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment=None,
    model: str = DEFAULT_MODEL,
    exclude=frozenset(),
):
    """Batches of ``(images, labels)`` for ``model.fit``, decoded every epoch (the tutorial's way).

    Shuffling reorders the file list (seeded, reshuffled each epoch) before any decoding. The
    examples whose key is in ``exclude`` are left out (not read).
    """
    ordered = source.examples(split)
    if exclude:
        tf = import_tf()
        left_out = tf.constant(sorted(exclude), tf.string)
        ordered = ordered.filter(lambda i, k, y, e: tf.logical_not(tf.reduce_any(tf.equal(k, left_out))))
    if shuffle:
        ordered = ordered.shuffle(source.split(split).n_examples, seed=seed, reshuffle_each_iteration=True)
    ds = image_dataset(source, split, image_size, ordered=ordered, model=model).map(lambda i, k, y, x: (x, y))
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=usable_cores())
    return ds.prefetch(2)
