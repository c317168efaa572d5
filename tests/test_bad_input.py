"""Bad input, generated: every option and argument of every command, and every record on disk.

The contract (issues "one-line errors" and "bad records"): a command given a bad value of any
option or argument, or a bad record on disk, ends with exactly one line on stderr that starts with
``error: ``, a non-zero exit, no traceback, and no change to anything already written (every file
under the watched folders is hashed before and after; no new file or folder may remain, such as a
hidden partial folder or an empty ``.lock`` file). ``cache verify`` may list its ``fault: `` lines
before that one line. The listing commands (``cache ls``, ``cache heads``) show a bad entry as a
row with its reason, still list the good ones, and exit 0. Good records and good values still
work (the controls), so the suite cannot pass by everything failing.

How the cases are made
----------------------
* Options and arguments: the typer app is walked (``typer.main.get_command``) and every parameter
  of every command is looked up in ``BAD_VALUES`` (by ``"<command> <name>"``, then by name).
  Integer and float parameters also get the generic junk of their type (``abc``, ``nan``, ``inf``,
  ``1e309``...); flags get a value they do not take (``--json=abc``). A parameter with no entry
  fails ``test_every_parameter_has_bad_values`` (and gets a failing case of its own), naming it.
  Each bad value replaces the parameter in a command line of good values (``BASE``); the others
  stay good. Where a bad value must be refused before the backbone is loaded, the loaders are
  replaced by stand-ins that raise ``NotRejected``: a case that gets there failed to refuse it
  (and would otherwise have run a whole build or fine-tuning).
* Records: a tiny cache (96 px, 32 + 16 images), a scikit-learn head, a Keras head, a fine-tuned
  model and an interrupted fine-tuning run are made once per module (through the command line:
  those runs are the controls of ``cache build``, ``cache train-head`` and ``finetune run``).
  Each case copies one record and applies one generated mutation: the JSON records (head.json,
  model.json, metrics.json, state.json) from their schema (malformed, wrong top-level type, each
  key deleted, each value null or of a wrong type, plus special values); the cache file's root
  attributes and stored config (edited with h5py; the config re-fingerprinted and the file
  renamed, so that only the content is wrong); its arrays; the weight files. The schema tests
  fail when a writer adds or drops a key, so the generators follow the writers.

Loading is memoised for the prediction cases (the backbone by weights and size, a ``.keras`` file
by its content): the same objects, loaded once, so that a hundred cases take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke, write_images

# Over 1,500 quick cases behind one world: a long unit of work, started early under pytest-xdist
# (tests/conftest.py, pytest_collection_modifyitems)
pytestmark = pytest.mark.xdist_group("bad-input")

SIZE = 96
# A slice of cats_and_dogs_filtered copied into the world (real photos; listing it is quick)
SUBSET = {"train": 16, "validation": 8}  # images per class
CACHE_SPLITS = ["train=train[:32]", "validation=validation[:16]"]
FT_SPLITS = ["train=train[:8]", "validation=validation[:8]"]
OTHER_SPLITS = ["train=train[:8]"]  # the 128 px cache
CASE_SECONDS = 120  # a case that runs longer accepted its bad value and went on working
TF_OP_TEXT = ("{{function_node", "[Op:", "Traceback")


# ---------------------------------------------------------------------------------------------
# Running a case: the outcome, the snapshot of what is on disk, the contract


class NotRejected(BaseException):
    """Raised by a test stand-in at a point a rejected value must never reach (not an Exception,
    so that no ``except Exception`` in the code under test can turn it into a clean error)."""


class CaseTimeout(BaseException):
    pass


_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path, st: os.stat_result) -> str:
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        try:
            h = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    h.update(chunk)
            _DIGESTS[key] = h.hexdigest()
        except OSError:
            _DIGESTS[key] = "unreadable"
    return _DIGESTS[key]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: files by content, links by target, folders by existence."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    state[str(path)] = ("link", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    state[str(path)] = ("dir",)
                else:
                    state[str(path)] = ("file", _digest(path, st))
    return state


def changes(before: dict, after: dict) -> list[str]:
    out = [f"new {p}" for p in sorted(set(after) - set(before))]
    out += [f"removed {p}" for p in sorted(set(before) - set(after))]
    out += [f"modified {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


@dataclass
class Outcome:
    argv: list[str]
    result: object = None
    stopped: BaseException | None = None  # NotRejected / CaseTimeout
    changed: list[str] = field(default_factory=list)
    shorten: Callable[[str], str] = str

    @property
    def command(self) -> str:
        return self.shorten(" ".join(self.argv))

    def first_line(self) -> str:
        if self.stopped is not None:
            return f"{type(self.stopped).__name__}: {self.stopped}"
        r = self.result
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            text = (str(r.exception).strip().splitlines() or [""])[0]
            return self.shorten(f"{type(r.exception).__name__}: {text}"[:300])
        lines = [line for line in (r.stderr + "\n" + r.stdout).splitlines() if line.strip()]
        return self.shorten(lines[0][:300]) if lines else "(no output)"


def _alarm(signum, frame):
    raise CaseTimeout(f"still running after {CASE_SECONDS} s (the bad value was accepted)")


def run(argv, roots, shorten=str) -> Outcome:
    argv = [str(a) for a in argv]
    outcome = Outcome(argv, shorten=shorten)
    before = snapshot(*roots)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        outcome.result = invoke(argv)
    except (NotRejected, CaseTimeout) as stopped:
        outcome.stopped = stopped
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    outcome.changed = changes(before, snapshot(*roots))
    return outcome


def contract_problems(o: Outcome, faults_allowed: bool = False) -> list[str]:
    """The ways ``o`` breaks the one-line-error contract (empty: it keeps it)."""
    problems = []
    if o.stopped is not None:
        kind = "timeout" if isinstance(o.stopped, CaseTimeout) else "accepted"
        problems.append(f"{kind}: {o.stopped}")
    else:
        r = o.result
        clean_exit = r.exception is None or isinstance(r.exception, SystemExit)
        if not clean_exit:
            problems.append("traceback")
        elif "Traceback" in r.output:
            problems.append("traceback (printed)")
        if r.exit_code == 0:
            problems.append("exit 0")
        elif clean_exit:
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            if faults_allowed:
                while lines and lines[0].startswith("fault: ") and len(lines) > 1:
                    lines.pop(0)
            if len(lines) != 1:
                problems.append(f"{len(lines)} lines on stderr")
            elif not lines[0].startswith("error: "):
                problems.append("stderr line does not start with 'error: '")
            elif lines[0].startswith("error: unexpected "):  # the handler's last resort: a bug, not a reason
                problems.append("unexpected error")
    if o.changed:
        problems.append("changed on disk")
    return problems


def report(o: Outcome, problems: list[str], tag: str = "CONTRACT") -> str:
    text = f"{tag}[{', '.join(problems)}] {o.command} :: {o.first_line()}"
    if o.changed:
        text += "\n  " + "\n  ".join(o.shorten(c) for c in o.changed[:12])
    if o.result is not None:
        text += "\n--- stderr ---\n" + o.shorten(o.result.stderr[-1500:])
        if o.result.exception is not None and not isinstance(o.result.exception, SystemExit):
            import traceback

            text += "\n--- exception ---\n" + "".join(traceback.format_exception(*o.result.exc_info)[-6:])
    return text


def fail_unless_none(problems: list[str], o: Outcome, tag: str) -> None:
    """Fail with the report only (no traceback: hundreds of failures stay quick and readable)."""
    if problems:
        pytest.fail(report(o, problems, tag), pytrace=False)


def assert_contract(o: Outcome, faults_allowed: bool = False) -> None:
    fail_unless_none(contract_problems(o, faults_allowed), o, "CONTRACT")


def assert_clean_success(o: Outcome) -> None:
    """A control: exit 0, no exception."""
    r = o.result
    problems = []
    if o.stopped is not None:
        problems.append(f"stopped: {o.stopped}")
    elif r.exception is not None and not isinstance(r.exception, SystemExit):
        problems.append("traceback")
    elif r.exit_code != 0:
        problems.append(f"exit {r.exit_code}")
    fail_unless_none(problems, o, "CONTROL")


# ---------------------------------------------------------------------------------------------
# Test stand-ins: loaders that must not be reached, loaders memoised for speed


_HOLDERS: dict[str, tuple[int, list]] = {}


def _patch_everywhere(monkeypatch, name: str, modules, make) -> None:
    """Replace ``name`` (defined in ``modules[0]``) in every package module that imported it by name.

    The modules holding it are found once, and again only when a module was imported since: a walk
    over ``sys.modules`` (TensorFlow's thousands) costs milliseconds, and the cases run thousands."""
    for module_name in modules:
        importlib.import_module(module_name)  # loaded, so that each of its names is found below
    original = getattr(sys.modules[modules[0]], name)
    if _HOLDERS.get(name, (None,))[0] != len(sys.modules):
        _HOLDERS[name] = (len(sys.modules), [
            module for module_name, module in list(sys.modules.items())
            if module_name.startswith("bottlecache") and getattr(module, name, None) is original])
    replacement = make(original)
    for module in _HOLDERS[name][1]:
        monkeypatch.setattr(module, name, replacement)


# The module defining the loader, then the modules that call it (imported before the patch).
BACKBONE_HOLDERS = ("bottlecache.models.backbone", "bottlecache.cache.build", "bottlecache.cache.ray_build",
                    "bottlecache.train.finetune", "bottlecache.serve.predict", "bottlecache.serve.export",
                    "bottlecache.serve.embeddings")
KERAS_FILE_HOLDERS = ("bottlecache.train.heads", "bottlecache.train.finetune", "bottlecache.serve.predict",
                      "bottlecache.serve.export", "bottlecache.serve.artifacts")


def forbid_backbone(monkeypatch) -> None:
    def make(original):
        def stand_in(*args, **kwargs):
            raise NotRejected("went on to load the backbone (the bad value was not refused up front)")

        return stand_in

    _patch_everywhere(monkeypatch, "load_backbone", BACKBONE_HOLDERS, make)


def forbid_checkpoint_model(monkeypatch) -> None:
    def make(original):
        def stand_in(path, *args, **kwargs):
            if Path(path).name == "last.keras":
                raise NotRejected("went on to load .checkpoint/last.keras (the bad state.json was not refused)")
            return original(path, *args, **kwargs)

        return stand_in

    _patch_everywhere(monkeypatch, "load_keras_file", KERAS_FILE_HOLDERS, make)


_BACKBONES: dict = {}
_KERAS_FILES: dict = {}


def fast_loading(monkeypatch) -> None:
    """The backbone by (weights file, sha256, model, size) and a ``.keras`` file by its content (not
    compiled), each loaded once. Prediction does not change them."""

    def backbone(original):
        def load(weights, image_size, *args, **kwargs):
            key = (getattr(weights, "path", None), getattr(weights, "sha256", None), getattr(weights, "model", None),
                   image_size, args, tuple(sorted(kwargs.items())))
            if key not in _BACKBONES:
                _BACKBONES[key] = original(weights, image_size, *args, **kwargs)
            return _BACKBONES[key]

        return load

    def keras_file(original):
        def load(path, *args, **kwargs):
            compiled = kwargs.get("compile", args[0] if args else False)
            try:
                content = _digest(Path(path), Path(path).stat())  # hashed once: the snapshot did it
            except OSError:
                content = None
            if compiled or content is None:
                return original(path, *args, **kwargs)
            if content not in _KERAS_FILES:
                _KERAS_FILES[content] = original(path, *args, **kwargs)
            return _KERAS_FILES[content]

        return load

    _patch_everywhere(monkeypatch, "load_backbone", BACKBONE_HOLDERS, backbone)
    _patch_everywhere(monkeypatch, "load_keras_file", KERAS_FILE_HOLDERS, keras_file)


# ---------------------------------------------------------------------------------------------
# The records, made once


@dataclass
class World:
    root: Path
    weights: Path
    data: Path
    cache_dir: Path = None
    cache: Path = None
    fingerprint: str = ""
    cache128: Path = None
    sk_head: Path = None
    keras_head: Path = None
    keras_head128: Path = None
    model: Path = None
    checkpoint: Path = None
    model128_keras: Path = None
    images: list = field(default_factory=list)
    controls: dict = field(default_factory=dict)


def _split_args(specs):
    return [token for spec in specs for token in ("--split", spec)]


def finetune_args(w: World, out, *, epochs: int, cache_dir=None) -> list:
    return ["finetune", "run", "--data", w.data, *_split_args(FT_SPLITS), "--image-size", SIZE, "--weights", w.weights,
            "--cache-dir", cache_dir or w.root / "ft-cache", "--head", w.keras_head, "--epochs", epochs,
            "--batch-size", 8, "--out", out]


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights_path, cats_dogs) -> World:
    from bottlecache.cache.build import build_cache
    from bottlecache.core.progress import NullProgress
    from bottlecache.train.finetune import finetune
    from bottlecache.train.heads import train_head

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    for split, n in SUBSET.items():
        for label in ("cats", "dogs"):
            (data / split / label).mkdir(parents=True)
            for image in sorted((cats_dogs / split / label).iterdir())[:n]:
                shutil.copy(image, data / split / label / image.name)
    w = World(root=root, weights=weights_path, data=data)
    w.cache_dir = root / "caches"

    def control(name, argv):
        result = invoke(argv)
        w.controls[name] = Outcome([str(a) for a in argv], result)
        if result.exit_code != 0:
            pytest.fail(f"setting up: {name} failed: {result.output[-3000:]}\n{result.exception!r}")
        return result

    built = control("cache build", ["cache", "build", "--data", data, *_split_args(CACHE_SPLITS), "--image-size",
                                    SIZE, "--weights", weights_path, "--cache-dir", w.cache_dir, "--engine", "keras",
                                    "--json"])
    record = json.loads(built.stdout)
    w.cache, w.fingerprint = Path(record["path"]), record["fingerprint"]
    w.sk_head = w.cache_dir / "heads" / "sklearn-head"
    control("cache train-head (sklearn)", ["cache", "train-head", w.cache, "--out", w.sk_head, "--cache-dir", w.cache_dir,
                                           "--json"])
    w.keras_head = w.cache_dir / "heads" / "keras-head"
    control("cache train-head (keras)", ["cache", "train-head", w.cache, "--kind", "keras", "--epochs", 2, "--out",
                                         w.keras_head, "--cache-dir", w.cache_dir, "--json"])

    # another configuration: 128 px
    other = build_cache(data, OTHER_SPLITS, image_size=128, weights=weights_path, cache_dir=root / "caches128",
                        engine="keras")
    w.cache128 = other.path
    w.keras_head128 = train_head(other.path, "keras", epochs=1, out=root / "other" / "keras-head-128").path

    class StopAfterFirstEpoch(NullProgress):  # Ctrl-C once epoch 1 is checkpointed
        def end_split(self, split):
            if split == "epoch 1":
                raise KeyboardInterrupt

    w.checkpoint = root / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(data, FT_SPLITS, image_size=SIZE, weights=weights_path, cache_dir=root / "ft-cache",
                 head=w.keras_head, epochs=2, batch_size=8, out=w.checkpoint, progress=StopAfterFirstEpoch())
    assert json.loads((w.checkpoint / ".checkpoint" / "state.json").read_text())["epoch"] == 1
    # the same run resumed on the command line (a copy: the interrupted run stays for the mutations)
    # finishes it: the control of `finetune run` with good values, and the model folder
    w.model = root / "model"
    shutil.copytree(w.checkpoint, w.model)
    control("finetune run --resume", finetune_args(w, w.model, epochs=2) + ["--resume", "--json"])
    assert (w.model / "model.keras").is_file() and not (w.model / ".checkpoint").exists()

    # a model.keras of another image size (the same architecture at 128 px, untrained head)
    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.network import attach_head
    from bottlecache.train.heads import build_head_model

    base = load_backbone(resolve_weights(weights_path, 128), 128)
    w.model128_keras = root / "other" / "model128.keras"
    attach_head(base, build_head_model((4, 4, 1280), 2), 128).save(w.model128_keras)

    images = root / "images"
    images.mkdir()
    for name in ("cats/cat.2000.jpg", "dogs/dog.2000.jpg"):
        w.images.append(Path(shutil.copy(cats_dogs / "validation" / name, images / Path(name).name)))
    return w


# ---------------------------------------------------------------------------------------------
# Per-case helpers: scratch values, the roots to watch


class Ctx:
    """What a value generator may use: the world, and a scratch folder of this case's own."""

    def __init__(self, w: World, tmp: Path):
        self.w, self.tmp = w, tmp
        self.scratch = tmp / "values"
        self.scratch.mkdir(exist_ok=True)

    def shorten(self, text: str) -> str:
        return text.replace(str(self.tmp), "<tmp>").replace(str(self.w.root), "<world>")

    # -- paths ------------------------------------------------------------------------------
    def missing(self, name: str) -> Path:
        return self.scratch / f"no-such-{name}"

    def file(self, name: str, data: bytes = b"this is not what the option expects\n") -> Path:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def folder(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dangling(self, name: str) -> Path:
        path = self.scratch / name
        path.symlink_to(self.scratch / f"nothing-behind-{name}")
        return path

    def under_file(self, name: str) -> Path:
        return self.file(f"plain-file-{name}") / "inside"

    def unreadable(self, name: str, folder: bool = False) -> Path:
        path = self.folder(name) if folder else self.file(name, b"secret")
        if folder:
            (path / "a").mkdir()
        path.chmod(0)
        try:
            os.listdir(path) if folder else path.read_bytes()
        except PermissionError:
            return path
        path.chmod(0o755)
        pytest.skip("running as root: permissions do not stop reading, so 'unreadable' cannot be made")

    def copy(self, source: Path, name: str | None = None) -> Path:
        target = self.tmp / "records" / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        return target


@pytest.fixture
def ctx(world, tmp_path, monkeypatch) -> Ctx:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a stray relative write lands where the snapshot sees it
    return Ctx(world, tmp_path)


def run_case(ctx: Ctx, argv) -> Outcome:
    return run(argv, [ctx.w.root, ctx.tmp], ctx.shorten)


# ---------------------------------------------------------------------------------------------
# 1. Options and arguments


@dataclass(frozen=True)
class Bad:
    id: str
    make: Callable[[Ctx], list]  # the value(s) of the parameter; several for a repeated option
    backbone_needed: bool = False  # the value can only be found bad by loading the backbone


def const(*values, id=None) -> Bad:
    return Bad(id or " ".join(map(str, values)) or "empty", lambda c, v=values: list(v))


INT_JUNK = [const("abc"), const("1.5"), const("nan"), const("inf"), const("-inf"), const("1e309"), const("")]
FLOAT_JUNK = [const("abc"), const("nan"), const("inf"), const("-inf"), const("1e309"), const("-1e309"), const("")]


def below(lowest: int) -> list[Bad]:
    values = {lowest - 1, -1} if lowest - 1 >= -1 else {lowest - 1}
    return [const(str(v)) for v in sorted(values)]


def paths(*kinds: str, suffix: str = "") -> list[Bad]:
    """Bad paths: missing, file (where a folder is expected), folder (where a file is), empty file,
    dangling symlink, path under a file, unreadable file / folder."""
    makers = {
        "missing": lambda c: [c.missing("path" + suffix)],
        "file": lambda c: [c.file("plain" + suffix)],
        "empty file": lambda c: [c.file("empty" + suffix, b"")],
        "folder": lambda c: [c.folder("a-folder" + suffix)],
        "empty folder": lambda c: [c.folder("empty-folder")],
        "dangling symlink": lambda c: [c.dangling("dangling" + suffix)],
        "under a file": lambda c: [c.under_file("x")],
        "unreadable file": lambda c: [c.unreadable("unreadable" + suffix)],
        "unreadable folder": lambda c: [c.unreadable("unreadable-folder", folder=True)],
    }
    return [Bad(kind, makers[kind]) for kind in kinds]


def _data_folder(layout: dict[str, int], extra_files: dict[str, bytes] | None = None):
    def make(c: Ctx):
        root = c.folder("data")
        write_images(root, layout)
        for name, data in (extra_files or {}).items():
            c.file(f"data/{name}", data)
        return [root]

    return make


def _classes_without_images(c: Ctx):
    root = c.folder("data")
    for name in ("a", "b"):
        c.file(f"data/{name}/notes.txt", b"no image here")
    return [root]


DATA_BAD = paths("missing", "empty file", "dangling symlink", "empty folder", "unreadable folder") + [
    Bad("one class", _data_folder({"only": 3})),
    Bad("class folders without images", _classes_without_images),
    Bad("split folders without train", _data_folder({"validation/a": 2, "validation/b": 2})),
    const("tfds:", id="tfds: (no name)"),
    const("tfds:no_such_dataset_xyz"),
]

SPLIT_BAD = [
    const("train[a:b]"), const("train[:"), const("=train"), const("train="), const("a=b=c"), const("train[1:2:3]"),
    const("tr ain"), const(""), const("trâin"), const("train=nosuch", id="unknown base split"),
    const("train=train[5:5]", id="selects nothing"),
    const("train=train[:8]", "train=train[8:16]", id="the same name twice"),
]


def _weights_text(c):
    return [c.file("notes.weights.h5", b"these are not weights\n")]


def _weights_other_hdf5(c):
    return [shutil.copy(c.w.cache, c.scratch / "not-mobilenet.weights.h5")]


WEIGHTS_BAD = [Bad(b.id, b.make, backbone_needed=True) for b in (
    paths("missing", "folder", "empty file", "dangling symlink", "unreadable file", suffix=".weights.h5")
    + [Bad("a text file", _weights_text), Bad("an HDF5 file of something else", _weights_other_hdf5)]
)]

CACHE_ARG_BAD = paths("missing", "folder", "empty file", "dangling symlink", "unreadable file", suffix=".h5") + [
    Bad("not HDF5", lambda c: [c.file("random.h5", np.random.default_rng(0).bytes(4096))]),
    Bad("HDF5 but not a cache", lambda c: [_plain_hdf5(c.scratch / "plain.h5")]),
    Bad("partial cache", lambda c: [shutil.copy(c.w.cache, c.scratch / (c.w.cache.name + ".partial"))]),
    const("zzzz", id="unknown fingerprint prefix"),
    const("no-such-cache.h5", id="missing relative .h5"),
]


def _plain_hdf5(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    return path


def _finished_model_copy(c: Ctx):
    return [c.copy(c.w.model, "finished-model")]


def _nonempty_folder(c: Ctx):
    return [c.copy(c.w.sk_head, "existing-head")]


HEAD_OPTION_BAD = paths("missing", "file", "empty folder", "dangling symlink", "unreadable folder") + [
    Bad("a scikit-learn head", lambda c: [c.w.sk_head]),
    Bad("a head for 128 px (this run is 96)", lambda c: [c.w.keras_head128]),
    Bad("a fine-tuned model folder", lambda c: [c.w.model]),
    Bad("a cache file", lambda c: [c.w.cache]),
]

MODEL_ARG_BAD = paths("missing", "file", "empty folder", "dangling symlink", "unreadable folder") + [
    Bad("a cache folder", lambda c: [c.w.root / "caches128"]),
    Bad("a cache file", lambda c: [c.w.cache]),
]


def _no_images_folder(c: Ctx):
    folder = c.folder("no-images")
    (folder / "readme.txt").write_text("no images here")
    return [folder]


def _unreadable_images_folder(c: Ctx):
    folder = c.folder("broken-images")
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a png either")
    return [folder]


# --model (cache build, finetune run): not a registered name, or a model the weights are not for
MODEL_OPTION_BAD = [const("resnet9000"), const(""), const("MobileNetV2", id="the Keras class name"),
                    Bad("a model the weights are not for", lambda c: ["xception"], backbone_needed=True)]

IMAGES_BAD = paths("missing", "dangling symlink", "empty folder", "unreadable file", suffix=".jpg") + [
    Bad("folder without images", _no_images_folder),
    Bad("folder of unreadable images only", _unreadable_images_folder),
]

# name (or "<command> <name>") → generated bad values; int / float parameters also get INT_JUNK /
# FLOAT_JUNK, flags get a value they do not take.
BAD_VALUES: dict[str, list[Bad]] = {
    "data": DATA_BAD,
    "finetune run data": DATA_BAD + [
        Bad("classes other than the head's", _data_folder({"train/birds": 2, "train/fish": 2, "validation/birds": 2,
                                                           "validation/fish": 2}))],
    "split": SPLIT_BAD,
    "finetune run split": SPLIT_BAD + [const("train=train[:16]", id="no validation split")],
    "image_size": [const("0"), const("-96"), const("150"), const(str(2**64), id="2**64"), const("natve"),
                   const("299", id="299 (Xception's native size, not MobileNetV2's)")],
    "finetune run image_size": [const("0"), const("-96"), const("150"), const(str(2**64), id="2**64"),
                                const("128", id="128 (the head is for 96)")],
    "weights": WEIGHTS_BAD,
    "cache_dir": paths("file", "under a file", "dangling symlink"),
    "cache ls cache_dir": paths("file", "unreadable folder"),
    "cache heads cache_dir": paths("file", "unreadable folder"),
    "cache info cache_dir": paths("file", "unreadable folder"),
    "cache verify cache_dir": paths("file", "unreadable folder"),
    "dtype": [const("float64"), const("int8"), const("")],
    "batch_size": below(1),
    "engine": [const("gpu"), const("")],
    "executor": [const("spark"), const("")],
    "ray_address": [const(""), const("headnode", id="no port"), const("headnode:port", id="port not a number")],
    "shard_size": below(1) + [const("48", id="48 (not a multiple of 32)"), const(str(2**64), id="2**64")],
    "cache consolidate cache_dir": paths("file", "unreadable folder"),
    "tfds_data_dir": paths("file", "under a file"),
    "cache": CACHE_ARG_BAD,
    "kind": [const("forest"), const("")],
    "c": [const("0"), const("-1"), const("1", "-1", id="1 then -1")],
    "epochs": below(1),
    "head_epochs": below(1),
    "learning_rate": [const("0"), const("-0.001")],
    "optimizer": [const("sgd"), const("")],
    "dropout": [const("-0.1"), const("1"), const("1.5")],
    "seed": below(0) + [const(str(2**32), id="2**32"), const(str(2**64), id="2**64")],
    "early_stopping": below(1),
    "cache train-head out_dir": paths("file", "under a file", "dangling symlink") + [
        Bad("an existing non-empty folder", _nonempty_folder)],
    "finetune run out_dir": paths("file", "under a file", "dangling symlink") + [
        Bad("a folder holding a finished model", _finished_model_copy)],
    "head": HEAD_OPTION_BAD,
    "fine_tune_at": below(0) + [const("100000"), const(str(2**64), id="2**64")],
    "model": MODEL_ARG_BAD,
    "cache build model": MODEL_OPTION_BAD,
    "finetune run model": MODEL_OPTION_BAD + [const("list", id="list (cache build's only)")],
    "images": IMAGES_BAD,
    "cut": below(1) + [const("155"), const(str(2**64), id="2**64")],
    "views": below(0) + [const("65")],
    "precision": [const("int4"), const("float16"), const("")],
    # (the control line is float32: a calibration is refused there whatever its value)
    "calibration_images": below(1) + [const("4097"), const("64", id="64 without --precision int8")],
    "sweep precision": [const("int4"), const(""), const("float32,"), const("float32,int4")],
    "augment": [const(""), const("shear=0.1"), const("rotate=0"), const("zoom=2"), const("flip,flip"),
                const("rotate=abc")],
    "cut_cache": CACHE_ARG_BAD,
    "class_weight": [const("auto"), const("")],
    "report split": [const("test", id="no such split"), const(""), const("train=train[:8]", id="a split spec")],
    "report out_file": paths("folder", "under a file") + [Bad("in a missing folder", lambda c: [c.missing("gone") / "r.html"])],
    "top": below(1) + [const("1001")],
    "bins": [const("1"), const("0"), const("101")],
    "query": paths("missing", "folder", "empty file", suffix=".jpg") + [
        const("no/such/key.jpg", id="unknown key"),
        Bad("text named .jpg", lambda c: [c.file("text.jpg", b"not an image at all")]),
    ],
    "k": below(1) + [const("10001")],
    "search": [const("faiss"), const("")],
    "threshold": [const("-0.1"), const("1.5")],
    # sweep: comma-separated lists; what every configuration shares is refused before any work
    "sweep image_size": [const("0"), const("-96"), const("150"), const(str(2**64), id="2**64"), const("96,abc"),
                         const("96,,128"), const("")],
    "sweep model": [const("resnet9000"), const(""), const("mobilenet_v2,")],
    "sweep views": [const("-1"), const("abc"), const("1.5"), const("")],
    "sweep c": [const("0"), const("-1"), const("1,-1"), const("1,abc"), const("nan"), const("inf"), const("")],
    "sweep kind": [const("forest"), const(""), const("sklearn,forest")],
    "sweep budget": [const("0"), const("-1m"), const("ten minutes"), const("1e400"), const("m")],
    "sweep weights": [Bad(b.id, b.make) for b in WEIGHTS_BAD if b.id != "an HDF5 file of something else"] + [
        const("=path", id="MODEL=PATH without a model")],
    "sweep out_dir": paths("file", "under a file", "dangling symlink"),
    "format": [const("onnx"), const("tflite"), const("")],
    "quantize": [const("int4"), const("float64"), const("")],
    "tolerance": [const("-1"), const("100.5")],
    "calibration": below(1) + [const("10001")],
    "export out_dir": paths("file", "under a file", "dangling symlink") + [
        Bad("an existing non-empty folder", _nonempty_folder)],
    "csv_path": paths("folder", "under a file", suffix=".csv"),
    # cache audit
    "folds": [const("1"), const("101"), const("0")],
    "cache audit c": [const("0"), const("-1"), const("nan")],
    "neighbors": below(1) + [const("10001")],
    "cache audit top": below(1) + [const("10001")],
    "cache audit data": paths("missing", "file", "empty folder"),
    "cache audit out_dir": paths("file", "under a file", "dangling symlink") + [
        Bad("an existing non-empty folder", _nonempty_folder)],
    # --tta (cache build, train-head, predict, report, export, sweep) and sweep --stack (issue 27)
    "tta": [const("mirror"), const(""), const("flip,none")],
    "cache train-head tta": [const("mirror"), const(""), const("flip", id="flip on a cache without mirrors")],
    "report tta": [const("mirror"), const(""), const("flip", id="flip on a head whose cache has no mirrors")],
    "max_memory": [const("0"), const("-1G"), const("lots"), const("16Q"), const(""), const("2P", id="over a pebibyte")],
    "stack": [const("1"), const("5"), const("-1"), const("2", id="2 with one configuration")],
    "cache train-head cache": CACHE_ARG_BAD + [
        Bad("the same cache twice", lambda c: [c.w.cache, c.w.cache]),
        Bad("a stack with a missing cache", lambda c: [c.w.cache, c.missing("gone.h5")]),
    ],
    # --exclude FILE (cache train-head, finetune run, sweep): a file of keys of the cache
    "exclude": paths("missing", "folder", "empty file", "unreadable file", suffix=".txt") + [
        Bad("binary file", lambda c: [c.file("keys.txt", bytes(range(256)))]),
        Bad("keys of another cache", lambda c: [c.file("keys.txt", b"train/cats/no-such-photo.jpg\n")]),
        Bad("comments only", lambda c: [c.file("keys.txt", b"# nothing\n\n")]),
    ],
}


def _annotation(param):
    descriptor = getattr(param, "type_descriptor", None)
    return getattr(descriptor, "annotation", None) or getattr(param, "type", None)


def _kind(param) -> str:
    annotation = _annotation(param)
    text = str(annotation)
    if getattr(param, "is_flag", False):
        return "flag"
    if annotation is int or "[int]" in text or text.endswith("int'>"):
        return "int"
    if annotation is float or "float" in text.lower():
        return "float"
    return "other"


@functools.cache
def cli_params():
    """(command path, click parameter) for every parameter of every command (walked once per run:
    the app does not change, and building its click command takes tens of milliseconds)."""
    import typer.main

    from bottlecache.cli import app

    found = []

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, path + (name,))
        else:
            found.extend((path, p) for p in command.params)

    walk(typer.main.get_command(app), ())
    return found


def _is_argument(param) -> bool:
    return getattr(param, "param_type_name", "") == "argument" or type(param).__name__.endswith("Argument")


@dataclass(frozen=True)
class OptionCase:
    command: tuple
    param: str
    flag: str | None  # None for a positional argument
    bad: Bad | None  # None: no generator for this parameter
    is_flag: bool = False

    @property
    def id(self) -> str:
        where = " ".join(self.command) + " " + (self.flag or f"<{self.param}>")
        return f"{where}={self.bad.id}" if self.bad else f"{where}=NO-GENERATOR"


# Parameters that take a path as text (a path, a tfds name or "imagenet"; a path or a fingerprint)
TEXT_PATHS = {"data", "weights", "tfds_data_dir", "cache", "cut_cache", "query"}
EMPTY_PATH = const("", id="empty path")  # typer reads "" as ".": the current folder


def _takes_paths(param) -> bool:
    import typing

    annotation = _annotation(param)
    return param.name in TEXT_PATHS or annotation is Path or Path in typing.get_args(annotation)


def _generated(command: tuple, param) -> list[Bad] | None:
    name = param.name
    specific = BAD_VALUES.get(" ".join(command) + " " + name)
    generic = BAD_VALUES.get(name)
    kind = _kind(param)
    if kind == "flag":
        return []  # handled as flags
    values = specific if specific is not None else generic
    if values is None:
        return None
    junk = INT_JUNK if kind == "int" else FLOAT_JUNK if kind == "float" else []
    empty = [EMPTY_PATH] if _takes_paths(param) and not any(b.id == "empty" for b in values) else []  # const("")
    return junk + list(values) + empty


def option_cases() -> list[OptionCase]:
    cases = []
    for command, param in cli_params():
        if getattr(param, "is_flag", False):
            for flag in list(param.opts) + list(getattr(param, "secondary_opts", [])):
                cases.append(OptionCase(command, param.name, flag, const(f"{flag}=abc", id="a value for a flag"), True))
            continue
        flag = None if _is_argument(param) else param.opts[0]
        values = _generated(command, param)
        if values is None:
            cases.append(OptionCase(command, param.name, flag, None))
            continue
        cases += [OptionCase(command, param.name, flag, bad) for bad in values]
    return cases


OPTION_CASES = option_cases()
KERAS_ONLY = {"epochs", "batch_size", "learning_rate", "optimizer", "dropout", "early_stopping"}


def base_values(command: tuple, param: str, c: Ctx) -> dict[str, list]:
    """Good values for every parameter a command needs (flag or positional → values)."""
    w = c.w
    name = " ".join(command)
    if name == "cache build":
        values = {"data": [w.data], "split": ["train=train[:8]"], "image_size": [SIZE], "weights": [w.weights],
                  "cache_dir": [c.folder("cache-dir")], "engine": ["keras"]}
        if param in ("ray_address", "shard_size"):  # options of the ray executor
            values["executor"] = ["ray"]
        return values
    if name in ("cache ls", "cache heads"):
        return {"cache_dir": [w.cache_dir]}
    if name == "models":
        return {}
    if name in ("cache info", "cache verify", "cache consolidate"):
        return {"cache": [w.fingerprint[:12]], "cache_dir": [w.cache_dir]}
    if name == "cache train-head":
        values = {"cache": [w.cache], "out_dir": [c.tmp / "head-out"], "cache_dir": [c.folder("cache-dir")]}
        if param in KERAS_ONLY:
            values |= {"kind": ["keras"], "epochs": [1]}
        return values
    if name == "finetune run":
        return {"data": [w.data], "split": FT_SPLITS, "image_size": [SIZE], "weights": [w.weights],
                "cache_dir": [c.folder("cache-dir")], "head": [w.keras_head], "epochs": [1], "batch_size": [8],
                "out_dir": [c.tmp / "ft-out"]}
    if name == "predict":
        return {"model": [w.sk_head], "images": [w.images[0]]}
    if name == "report":  # the --bins cases (refused up front) run on the fine-tuned model: its control too
        model = w.model if param == "bins" else w.sk_head
        return {"model": [model], "data": [w.data], "out_file": [c.tmp / "report.html"]}
    if name == "cache neighbors":
        return {"cache": [w.cache], "query": [w.images[0]], "cache_dir": [c.folder("cache-dir")]}
    if name == "cache duplicates":
        return {"cache": [w.cache], "cache_dir": [c.folder("cache-dir")]}
    if name == "cache audit":
        return {"cache": [w.cache], "cache_dir": [c.folder("cache-dir")], "out_dir": [c.tmp / "audit-out"],
                "folds": [2]}
    if name == "sweep":
        return {"data": [w.data], "image_size": [SIZE], "weights": [w.weights], "cache_dir": [c.folder("cache-dir")],
                "engine": ["keras"], "kind": ["sklearn"]}
    if name == "export":
        return {"model": [w.sk_head], "data": [w.data], "out_dir": [c.tmp / "export-out"],
                "cache_dir": [c.folder("cache-dir")], "calibration": [8]}
    raise AssertionError(f"no good values (BASE) for the command {name!r}: add them to base_values")


def build_argv(case: OptionCase, c: Ctx) -> list:
    """The command line of good values (``base_values``) with ``case``'s parameter made bad (with
    ``case.bad`` None: the good command line itself)."""
    params = {p.name: p for path, p in cli_params() if path == case.command}
    values = base_values(case.command, case.param, c)
    positional, options = [], []
    for name, param in params.items():
        if name == case.param and case.bad is not None:
            if case.is_flag:
                options.append(case.bad.make(c)[0])
                continue
            chosen = case.bad.make(c)
        elif name in values:
            chosen = values[name]
        else:
            continue
        if _is_argument(param):
            positional += chosen
        else:
            for value in chosen:
                options += [param.opts[0], value]
    return list(case.command) + positional + options


BASE_CONTROLS = [OptionCase(command, param, None, None) for command, param in [
    (("cache", "build"), ""), (("cache", "ls"), ""), (("cache", "info"), ""), (("cache", "verify"), ""),
    (("cache", "train-head"), ""), (("cache", "train-head"), "dropout"), (("cache", "heads"), ""),
    (("finetune", "run"), ""), (("predict",), ""), (("sweep",), ""), (("report",), ""), (("report",), "bins"),
    (("cache", "neighbors"), ""), (("cache", "duplicates"), ""), (("cache", "build"), "shard_size"),
    (("cache", "consolidate"), "")]]  # export's good line: tests/test_export.py (a real export
# of every format outlasts CASE_SECONDS on a loaded 2-core machine)


CONTROL_VARIANTS = {"dropout": " (keras)", "bins": " (fine-tuned model)", "shard_size": " (ray)"}


@pytest.mark.parametrize("case", BASE_CONTROLS, ids=[" ".join(c.command) + CONTROL_VARIANTS.get(c.param, "")
                                                     for c in BASE_CONTROLS])
def test_control_base_command_lines(case: OptionCase, ctx: Ctx, monkeypatch):
    """The good command lines every bad value is put into work: else every case could pass by them."""
    argv = build_argv(case, ctx)
    if case.command in (("finetune", "run"), ("cache", "build"), ("sweep",)):
        forbid_backbone(monkeypatch)  # a whole build and fine-tuning run are the world's controls
        outcome = run_case(ctx, argv)
        assert isinstance(outcome.stopped, NotRejected), report(outcome, ["refused the good values"], "CONTROL")
        return
    if case.command == ("predict",):
        fast_loading(monkeypatch)
    assert_clean_success(run_case(ctx, argv))


def test_every_parameter_has_bad_values():
    missing = [f"{' '.join(case.command)} {case.flag or case.param}" for case in OPTION_CASES if case.bad is None]
    assert not missing, "parameters without a bad-value generator (add them to BAD_VALUES): " + ", ".join(missing)
    commands = {case.command for case in OPTION_CASES}
    assert {("cache", "build"), ("cache", "ls"), ("cache", "info"), ("cache", "verify"), ("cache", "train-head"),
            ("cache", "heads"), ("finetune", "run"), ("predict",), ("sweep",), ("export",)} <= commands


@pytest.mark.parametrize("case", OPTION_CASES, ids=[case.id for case in OPTION_CASES])
def test_bad_option_value(case: OptionCase, request, monkeypatch):
    if case.bad is None:
        pytest.fail(f"no bad-value generator for {' '.join(case.command)} {case.flag or case.param}: add it to BAD_VALUES")
    ctx = request.getfixturevalue("ctx")
    argv = build_argv(case, ctx)
    fast_loading(monkeypatch)  # nothing here trains a loaded model: the stand-in below stops before
    if case.command[0] != "predict" and not case.bad.backbone_needed:
        forbid_backbone(monkeypatch)
    assert_contract(run_case(ctx, argv), faults_allowed=case.command == ("cache", "verify"))


# ---------------------------------------------------------------------------------------------
# 2. Records: mutations


@dataclass(frozen=True)
class Mutation:
    id: str
    apply: Callable[[Path], Path | None]  # gets the copied record; returns the path to use (or None: the same)


UNMODIFIED = Mutation("unmodified", lambda path: None)
NULL = object()  # in a mutation table: JSON null
DELETE = object()


def _wrong_type(expected):
    """A value of another type than ``expected`` (a type or a tuple of allowed types)."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    if str in expected:
        return 123
    return "abc"


def _json_set(record: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        record = record[key]
    if value is DELETE:
        del record[last]
    else:
        record[last] = None if value is NULL else value


def json_file_mutations(filename: str, schema: dict, specials: list[tuple[str, object]] = ()) -> list[Mutation]:
    """Mutations of one JSON record ``filename`` inside a folder: the whole file broken, each key
    deleted, each value null or of a wrong type, and the special (key, value) pairs given."""

    def write(text: bytes):
        def apply(folder: Path):
            (folder / filename).write_bytes(text)

        return apply

    def edit(dotted: str, value):
        def apply(folder: Path):
            path = folder / filename
            record = json.loads(path.read_text())
            _json_set(record, dotted, value)
            path.write_text(json.dumps(record, indent=2))

        return apply

    def remove(folder: Path):
        (folder / filename).unlink()

    out = [
        Mutation(f"{filename} malformed", write(b'{"format": "bottle')),
        Mutation(f"{filename} empty", write(b"")),
        Mutation(f"{filename} not UTF-8", write(b"\xff\xfe\x00{}")),
        Mutation(f"{filename} a list", write(b"[]")),
        Mutation(f"{filename} a string", write(b'"record"')),
        Mutation(f"{filename} a number", write(b"5")),
        Mutation(f"{filename} null", write(b"null")),
        Mutation(f"{filename} deleted", remove),
    ]
    for key, expected in schema.items():
        out.append(Mutation(f"{filename} {key} deleted", edit(key, DELETE)))
        if not (isinstance(expected, tuple) and type(None) in expected):
            out.append(Mutation(f"{filename} {key}=null", edit(key, NULL)))
        wrong = _wrong_type(expected)
        out.append(Mutation(f"{filename} {key}={json.dumps(wrong)}", edit(key, wrong)))
    for key, value in specials:
        shown = "null" if value is NULL else "deleted" if value is DELETE else json.dumps(value)
        out.append(Mutation(f"{filename} {key}={shown}" if value is not DELETE else f"{filename} {key} deleted",
                            edit(key, value)))
    return out


BACKBONE_SCHEMA = {"model": str, "alpha": float, "image_size": int, "weights_sha256": str, "preprocess_version": int}
HEAD_SCHEMA = {"format": str, "format_version": int, "kind": str, "class_names": list, "feature_shape": list,
               "params": dict, "backbone": dict, "weights": str, "cache": dict, "created": str}
# Keys a head.json may lack (written from the version that added them; older records are read as they are):
# each gets its wrong-type mutations as specials, but no "deleted" case.
HEAD_OPTIONAL = {"data": (dict, type(None))}
MODEL_SCHEMA = {"format": str, "format_version": int, "class_names": list, "backbone": dict, "weights": str,
                "head": str, "params": dict, "created": str}
METRICS_SCHEMA = {"kind": str, "path": (str, type(None)), "train_seconds": float, "params": dict, "selection": list,
                  "metrics": dict, "history": dict}
STATE_SCHEMA = {"epoch": int, "history": dict, "best": float, "best_epoch": int, "config": str}
MODEL_BACKBONE_SCHEMA = BACKBONE_SCHEMA  # a fine-tuned model's backbone record names its preprocessing too
NESTED_BACKBONE = {f"backbone.{k}": v for k, v in BACKBONE_SCHEMA.items()}
NESTED_MODEL_BACKBONE = {f"backbone.{k}": v for k, v in MODEL_BACKBONE_SCHEMA.items()}
COMMON_SPECIALS = [
    ("format", "bottlecache-other"), ("format_version", "one"), ("format_version", 99), ("format_version", 0),
    ("class_names", ["cats"]), ("class_names", ["cats", "dogs", "birds"]), ("class_names", ["cats", "cats"]),
    ("class_names", [1, 2]), ("class_names", []), ("backbone.image_size", 150), ("backbone.image_size", 128),
]


def head_mutations(kind: str) -> list[Mutation]:
    other_kind = "keras" if kind == "sklearn" else "sklearn"
    specials = COMMON_SPECIALS + [("kind", "forest"), ("kind", other_kind), ("feature_shape", [4, 4, 1280]),
                                  ("feature_shape", ["a"]), ("data", 5), ("data", "elsewhere"), ("data", [])]
    out = [UNMODIFIED] + json_file_mutations("head.json", HEAD_SCHEMA | NESTED_BACKBONE, specials)
    return out + (npz_mutations() if kind == "sklearn" else keras_file_mutations("head.keras"))


def _npz(folder: Path, **arrays) -> None:
    with open(folder / "head.npz", "wb") as handle:  # np.savez on a path would append .npz
        np.savez(handle, **arrays)


def _npz_edit(**changes):
    def apply(folder: Path):
        with np.load(folder / "head.npz", allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
        for key, value in changes.items():
            if value is DELETE:
                del arrays[key]
            else:
                arrays[key] = value
        _npz(folder, **arrays)

    return apply


def _truncate(name: str, keep: float = 0.5):
    def apply(folder: Path):
        path = folder / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return apply


def _write(name: str, data: bytes):
    def apply(folder: Path):
        (folder / name).write_bytes(data)

    return apply


def _unlink(name: str):
    def apply(folder: Path):
        (folder / name).unlink()

    return apply


def npz_mutations() -> list[Mutation]:
    return [
        Mutation("head.npz zero bytes", _write("head.npz", b"")),
        Mutation("head.npz truncated", _truncate("head.npz")),
        Mutation("head.npz random bytes", _write("head.npz", np.random.default_rng(1).bytes(2048))),
        Mutation("head.npz deleted", _unlink("head.npz")),
        Mutation("head.npz wrong array keys", lambda f: _npz(f, weights=np.zeros((1, 1280)), bias=np.zeros(1))),
        Mutation("head.npz object array (a dict)", _npz_edit(coef=np.array({"a": 1}, dtype=object))),
        Mutation("head.npz coef wrong shape", _npz_edit(coef=np.zeros((1, 10)))),
        Mutation("head.npz coef NaN", _npz_edit(coef=np.full((1, 1280), np.nan))),
        Mutation("head.npz coef strings", _npz_edit(coef=np.array([["a"] * 1280]))),
        Mutation("head.npz classes out of range", _npz_edit(classes=np.array([0, 5]))),
        Mutation("head.npz C a string", _npz_edit(C=np.array("abc"))),
        Mutation("head.npz n_classes 0", _npz_edit(n_classes=np.array(0))),
        Mutation("head.npz coef deleted", _npz_edit(coef=DELETE)),
    ]


def keras_file_mutations(name: str) -> list[Mutation]:
    """``name`` is head.keras or model.keras; the swaps take the other kind of file from the world."""
    return [
        Mutation(f"{name} zero bytes", _write(name, b"")),
        Mutation(f"{name} truncated zip", _truncate(name)),
        Mutation(f"{name} random bytes", _write(name, np.random.default_rng(2).bytes(4096))),
        Mutation(f"{name} deleted", _unlink(name)),
        # the swaps are filled in by the test from the world (they need its files)
        Mutation(f"{name} swapped with {'model.keras' if name == 'head.keras' else 'head.keras'}", None),
        Mutation(f"{name} of another image size (128)", None),
    ]


def model_mutations() -> list[Mutation]:
    specials = COMMON_SPECIALS
    return [UNMODIFIED] + json_file_mutations("model.json", MODEL_SCHEMA | NESTED_MODEL_BACKBONE, specials) + \
        keras_file_mutations("model.keras")


HEAD_CASES = [("sklearn", m) for m in head_mutations("sklearn")] + [("keras", m) for m in head_mutations("keras")]
MODEL_CASES = model_mutations()


def _apply(mutation: Mutation, folder: Path, w: World) -> None:
    if mutation.apply is not None:
        mutation.apply(folder)
        return
    name = "head.keras" if (folder / "head.keras").exists() else "model.keras"
    if "swapped" in mutation.id:
        source = w.model / "model.keras" if name == "head.keras" else w.keras_head / "head.keras"
    else:  # another image size
        source = w.keras_head128 / "head.keras" if name == "head.keras" else w.model128_keras
    shutil.copy(source, folder / name)


@pytest.mark.parametrize("kind, mutation", HEAD_CASES, ids=[f"{k} head: {m.id}" for k, m in HEAD_CASES])
def test_bad_head_record(kind, mutation, ctx, monkeypatch):
    _predict_with_mutated_record(ctx, ctx.w.sk_head if kind == "sklearn" else ctx.w.keras_head, mutation, monkeypatch)


def _predict_with_mutated_record(ctx, source: Path, mutation, monkeypatch) -> None:
    """``predict`` from a copy of the ``source`` folder with ``mutation`` applied: the unmodified
    copy predicts (the control), every mutation keeps the contract."""
    fast_loading(monkeypatch)
    folder = ctx.copy(source, "record")
    _apply(mutation, folder, ctx.w)
    outcome = run_case(ctx, ["predict", folder, ctx.w.images[0]])
    if mutation is UNMODIFIED:
        assert_clean_success(outcome)
    else:
        assert_contract(outcome)


# The model file cut at other places than the record cases above, through each command that
# loads a head (predict, export, report): one line, exit 2, nothing written.
DAMAGED_HEAD_FILES = [(kind, name, damage) for kind, name in (("sklearn", "head.npz"), ("keras", "head.keras"))
                      for damage in ("truncated to 5 %", "truncated to 70 %")]


def _damage(name: str, damage: str):
    return _truncate(name, int(damage.split()[2]) / 100)


@pytest.mark.parametrize("command", ["predict", "export", "report"])
@pytest.mark.parametrize("kind, name, damage", DAMAGED_HEAD_FILES,
                         ids=[f"{name} {damage}" for _, name, damage in DAMAGED_HEAD_FILES])
def test_a_damaged_head_file_is_one_line_in_every_command_that_loads_it(command, kind, name, damage, ctx, monkeypatch):
    fast_loading(monkeypatch)
    folder = ctx.copy(ctx.w.sk_head if kind == "sklearn" else ctx.w.keras_head, "head")
    _damage(name, damage)(folder)
    argv = {"predict": ["predict", folder, ctx.w.images[0]],
            "export": ["export", folder, "--format", "keras", "--data", ctx.w.data, "--out", ctx.tmp / "export-out"],
            "report": ["report", folder, "--data", ctx.w.data, "--out", ctx.tmp / "report.html"]}[command]
    assert_contract(run_case(ctx, argv))


def _edit_cache_ref(edit):
    def apply(folder: Path) -> None:
        record = json.loads((folder / "head.json").read_text())
        edit(record["cache"])
        (folder / "head.json").write_text(json.dumps(record))
    return apply


# A head.json whose cache fingerprint is not the hash of the config beside it (each still of a
# valid form): every command that reads the head refuses it in the same words.
FORGED_CACHE_REFS = {
    "another fingerprint": lambda ref: ref.update(fingerprint="0" * 64),
    "config edited, fingerprint kept": lambda ref: ref["config"].update(dtype="float32" if ref["config"]["dtype"] ==
                                                                        "float16" else "float16"),
}


@pytest.mark.parametrize("command", ["predict", "export", "report"])
@pytest.mark.parametrize("forgery", list(FORGED_CACHE_REFS))
def test_a_head_whose_fingerprint_is_not_its_configs_is_refused_by_every_command(command, forgery, ctx, monkeypatch):
    fast_loading(monkeypatch)
    folder = ctx.copy(ctx.w.sk_head, "head")
    _edit_cache_ref(FORGED_CACHE_REFS[forgery])(folder)
    argv = {"predict": ["predict", folder, ctx.w.images[0]],
            "export": ["export", folder, "--format", "keras", "--data", ctx.w.data, "--out", ctx.tmp / "export-out"],
            "report": ["report", folder, "--data", ctx.w.data, "--out", ctx.tmp / "report.html"]}[command]
    outcome = run_case(ctx, argv)
    assert_contract(outcome)
    assert "'fingerprint' is not the hash of 'config'" in outcome.result.stderr, outcome.result.stderr


@pytest.mark.parametrize("mutation", MODEL_CASES, ids=[f"model: {m.id}" for m in MODEL_CASES])
def test_bad_model_record(mutation, ctx, monkeypatch):
    _predict_with_mutated_record(ctx, ctx.w.model, mutation, monkeypatch)


# -- the cache file ----------------------------------------------------------------------------

ROOT_ATTRS = {"format": str, "format_version": int, "fingerprint": str, "config": "json", "class_names": "json",
              "versions": "json", "created": str, "complete": bool, "build": "json", "splits": "json"}
CONFIG_SCHEMA = {"decode": str, "data": dict, "splits": dict, "class_names": list, "model": str, "alpha": float,
                 "image_size": int, "weights_sha256": str, "preprocess_version": int, "dtype": str}
OPTIONAL_CONFIG_KEYS = {"decode"}  # read with a default: a cache from before it existed


def _h5_attr(name, value, group="/"):
    def apply(path: Path):
        import h5py

        with h5py.File(path, "r+") as f:
            if value is DELETE:
                del f[group].attrs[name]
            else:
                f[group].attrs[name] = value

    return apply


def _empty_attr():
    import h5py

    return h5py.Empty("f4")


def _forged_config(key, value):
    """Edit the stored config, store its fingerprint and rename the file to it: only the content is wrong."""

    def apply(path: Path):
        import h5py

        from bottlecache.core.fingerprint import canonical_json, fingerprint

        with h5py.File(path, "r+") as f:
            config = json.loads(f.attrs["config"])
            _json_set(config, key, value)
            fp = fingerprint(config)
            f.attrs["config"] = canonical_json(config)
            f.attrs["fingerprint"] = fp
        renamed = path.with_name(path.name[: -len("0123456789ab.h5")] + fp[:12] + ".h5")
        path.rename(renamed)
        return renamed

    return apply


def _h5_data(edit):
    def apply(path: Path):
        import h5py

        with h5py.File(path, "r+") as f:
            edit(f)

    return apply


def _set_label(split, value):
    def edit(f):
        f[split]["labels"][0] = value

    return edit


def _replace_dataset(name, shape, dtype):
    def edit(f):
        split, dataset = name.split("/")
        del f[split][dataset]
        f[split].create_dataset(dataset, data=np.zeros(shape, dtype=dtype))

    return edit


def _delete(name):
    def edit(f):
        del f[name]

    return edit


def cache_metadata_mutations() -> list[Mutation]:
    out = []
    junk = {
        "format": [DELETE, "empty", 123, "bottlecache-other"],
        "format_version": [DELETE, "empty", "one", "abc", 99, 0, -1, 1.5, "array"],
        "fingerprint": [DELETE, "empty", 123, ""],
        "config": [DELETE, "empty", 123, "{", "[]", '"text"', "5", "null"],
        "splits": [DELETE, "empty", 123, "[", '"train"', '{"train": 1}', "[]", "[1]", "null",
                   '["train", "validation", "nosuch"]'],
        "complete": [DELETE, "empty", "abc", 2],
        "build": ["empty", 123, "{", "[]", "5"],
        "versions": ["empty", 123, "{", "[]", "5"],
    }
    for name, values in junk.items():
        for value in values:
            if value is DELETE:
                out.append(Mutation(f"attr {name} deleted", _h5_attr(name, DELETE)))
            elif value == "empty":
                out.append(Mutation(f"attr {name}=<HDF5 empty>", lambda p, n=name: _h5_attr(n, _empty_attr())(p)))
            elif value == "array":
                out.append(Mutation(f"attr {name}=[1, 1]", _h5_attr(name, np.array([1, 1]))))
            else:
                out.append(Mutation(f"attr {name}={value!r}", _h5_attr(name, value)))
    for key, expected in CONFIG_SCHEMA.items():
        if key not in OPTIONAL_CONFIG_KEYS:
            out.append(Mutation(f"config {key} deleted", _forged_config(key, DELETE)))
        out.append(Mutation(f"config {key}=null", _forged_config(key, NULL)))
        wrong = _wrong_type(expected)
        out.append(Mutation(f"config {key}={json.dumps(wrong)}", _forged_config(key, wrong)))
    for key, value in [("class_names", ["cats"]), ("class_names", []), ("class_names", ["cats", "cats"]),
                       ("image_size", 128), ("image_size", 150), ("dtype", "float64")]:
        out.append(Mutation(f"config {key}={json.dumps(value)}", _forged_config(key, value)))
    return out


def cache_data_mutations() -> list[Mutation]:
    return [
        Mutation("train label = number of classes", _h5_data(_set_label("train", 2))),
        Mutation("train label = -1", _h5_data(_set_label("train", -1))),
        Mutation("validation label = 7", _h5_data(_set_label("validation", 7))),
        Mutation("validation group deleted (named in metadata)", _h5_data(_delete("validation"))),
        Mutation("train/labels deleted", _h5_data(_delete("train/labels"))),
        Mutation("train/pooled deleted", _h5_data(_delete("train/pooled"))),
        Mutation("train/features deleted", _h5_data(_delete("train/features"))),
        Mutation("train/pooled 10 wide", _h5_data(_replace_dataset("train/pooled", (32, 10), "float32"))),
        Mutation("train/features wrong shape", _h5_data(_replace_dataset("train/features", (32, 2, 2, 1280),
                                                                           "float16"))),
        Mutation("train/labels fewer rows", _h5_data(_replace_dataset("train/labels", (10,), "int64"))),
        Mutation("train attr n_rows='abc'", _h5_attr("n_rows", "abc", "train")),
        Mutation("train attr n_rows deleted", _h5_attr("n_rows", DELETE, "train")),
        Mutation("train attr n_examples='abc'", _h5_attr("n_examples", "abc", "train")),
    ]


META_MUTATIONS = cache_metadata_mutations()
DATA_MUTATIONS = cache_data_mutations()
CACHE_CASES = [(cmd, m) for m in [UNMODIFIED] + META_MUTATIONS for cmd in ("info", "verify", "train-head")]
CACHE_CASES += [(cmd, m) for m in DATA_MUTATIONS for cmd in ("verify", "train-head")]


def _mutated_cache(ctx: Ctx, mutation: Mutation, folder: str = "bad-cache") -> Path:
    path = ctx.copy(ctx.w.cache, f"{folder}/{ctx.w.cache.name}")
    return mutation.apply(path) or path


@pytest.mark.parametrize("command, mutation", CACHE_CASES, ids=[f"cache {c}: {m.id}" for c, m in CACHE_CASES])
def test_bad_cache_record(command, mutation, ctx):
    path = _mutated_cache(ctx, mutation)
    argv = ["cache", command, path]
    if command == "train-head":
        argv += ["--out", ctx.tmp / "head-out", "--cache-dir", ctx.folder("cache-dir")]
    outcome = run_case(ctx, argv)
    if mutation is UNMODIFIED:
        assert_clean_success(outcome)
    else:
        assert_contract(outcome, faults_allowed=command == "verify")


# -- the listing commands: a bad entry is a row with its reason, the good ones are still listed --


def listing_problems(o: Outcome, good: Path, bad: Path | None) -> list[str]:
    problems = []
    r = o.result
    if o.stopped is not None:
        return [f"stopped: {o.stopped}"]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return ["traceback"]
    if r.exit_code != 0:
        return [f"exit {r.exit_code}"]
    if "--json" in o.argv:
        try:
            rows = {row["path"]: row for row in json.loads(r.stdout)}
        except (ValueError, TypeError, KeyError) as error:
            return [f"--json output unreadable ({error})"]
        if str(good) not in rows:
            problems.append("the good entry is missing")
        elif rows[str(good)].get("error"):
            problems.append(f"the good entry has an error: {rows[str(good)]['error']}")
        if bad is not None:
            row = rows.get(str(bad))
            if row is None:
                problems.append("the bad entry is not listed")
            else:
                reason = row.get("error")
                if not isinstance(reason, str) or not reason.strip():
                    problems.append("the bad entry has no reason ('error')")
                elif "\n" in reason or any(t in reason for t in TF_OP_TEXT):
                    problems.append(f"the reason is not one clean line: {reason[:100]!r}")
    if o.changed:
        problems.append("changed on disk")
    return problems


# the table form for the mutations whose values reach the table; --json for all
LS_CASES = [(m, True) for m in [UNMODIFIED] + META_MUTATIONS] + [
    (m, False) for m in [UNMODIFIED] + META_MUTATIONS if m.id.startswith(("config", "attr splits"))]


@pytest.mark.parametrize("mutation, json_output", LS_CASES,
                         ids=[f"cache ls{'' if j else ' (table)'}: {m.id}" for m, j in LS_CASES])
def test_cache_ls_lists_bad_caches_as_rows(mutation, json_output, ctx):
    folder = ctx.tmp / "records" / "listing"
    good = ctx.copy(ctx.w.cache128, f"listing/{ctx.w.cache128.name}")
    bad = _mutated_cache(ctx, mutation, "listing")
    outcome = run_case(ctx, ["cache", "ls", "--cache-dir", folder] + (["--json"] if json_output else []))
    problems = listing_problems(outcome, good, None if mutation is UNMODIFIED else bad)
    fail_unless_none(problems, outcome, "LISTING")


METRICS_SPECIALS = [("metrics.validation", "abc"), ("metrics.validation.accuracy", "abc"),
                    ("metrics.validation.accuracy", NULL), ("metrics.validation.log_loss", "abc"),
                    ("metrics.validation", DELETE)]
HEADS_MUTATIONS = [UNMODIFIED] + json_file_mutations("metrics.json", METRICS_SCHEMA, METRICS_SPECIALS) + [
    m for m in json_file_mutations("head.json", {}) if not m.id.endswith("deleted")
]


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "table"])
@pytest.mark.parametrize("mutation", HEADS_MUTATIONS, ids=[f"cache heads: {m.id}" for m in HEADS_MUTATIONS])
def test_cache_heads_lists_bad_heads_as_rows(mutation, json_output, ctx):
    folder = ctx.tmp / "records" / "listing"
    good = ctx.copy(ctx.w.keras_head, "listing/heads/good")
    bad = ctx.copy(ctx.w.sk_head, "listing/heads/bad")
    mutation.apply(bad)
    outcome = run_case(ctx, ["cache", "heads", "--cache-dir", folder] + (["--json"] if json_output else []))
    problems = listing_problems(outcome, good, None if mutation is UNMODIFIED else bad)
    fail_unless_none(problems, outcome, "LISTING")


# -- an interrupted fine-tuning run: state.json and the checkpoint files --------------------------

STATE_SPECIALS = [("epoch", -1), ("epoch", 1.5), ("epoch", True), ("best_epoch", -1), ("best", float("nan")),
                  ("history", []), ("history.loss", "abc"), ("config", "{}")]
CHECKPOINT_FILE_MUTATIONS = [
    Mutation("last.keras zero bytes", _write("last.keras", b"")),
    Mutation("last.keras deleted", _unlink("last.keras")),
    Mutation("head_metrics.json malformed", _write("head_metrics.json", b"{")),
]


def _other_run_config(folder: Path) -> None:
    """state.json of another run (other epochs, other head) in this run's folder."""
    path = folder / "state.json"
    state = json.loads(path.read_text())
    config = json.loads(state["config"])
    config["params"]["epochs"] = 7
    config["head"]["path"] = "/somewhere/else"
    state["config"] = json.dumps(config, sort_keys=True, separators=(",", ":"))
    path.write_text(json.dumps(state))


STATE_MUTATIONS = [UNMODIFIED] + [m for m in json_file_mutations("state.json", STATE_SCHEMA, STATE_SPECIALS)
                                  if not m.id.endswith("state.json deleted")] + [
    Mutation("state.json of another run (other epochs and head)", _other_run_config)]


@pytest.mark.parametrize("mutation", STATE_MUTATIONS + CHECKPOINT_FILE_MUTATIONS,
                         ids=[f"finetune run --resume: {m.id}" for m in STATE_MUTATIONS + CHECKPOINT_FILE_MUTATIONS])
def test_bad_checkpoint(mutation, ctx, monkeypatch):
    run_folder = ctx.copy(ctx.w.checkpoint, "run")
    checkpoint = run_folder / ".checkpoint"
    mutation.apply(checkpoint)
    fast_loading(monkeypatch)  # the head (a resumed run trains last.keras, loaded compiled: never memoised)
    if mutation in STATE_MUTATIONS:
        forbid_checkpoint_model(monkeypatch)
    forbid_backbone(monkeypatch)  # resuming never needs a fresh backbone
    outcome = run_case(ctx, finetune_args(ctx.w, run_folder, epochs=2) + ["--resume"])
    if mutation is UNMODIFIED:
        # the control: a good state.json is accepted and the run goes on to load its model (the
        # whole resumed run is the world's "finetune run --resume" control)
        assert isinstance(outcome.stopped, NotRejected) and "last.keras" in str(outcome.stopped), \
            report(outcome, ["the good checkpoint did not get to loading last.keras"], "CONTROL")
    else:
        assert_contract(outcome)


# -- the schemas the generators use are the ones written ---------------------------------------


def _types_match(value, expected) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, expected)


@pytest.mark.parametrize("record", ["head.json (sklearn)", "head.json (keras)", "model.json", "metrics.json",
                                    "state.json", "cache attributes", "cache config"])
def test_mutation_schemas_match_the_records_written(record, world):
    import h5py

    if record.startswith("head.json"):
        folder = world.sk_head if "sklearn" in record else world.keras_head
        actual, schema = json.loads((folder / "head.json").read_text()), HEAD_SCHEMA | HEAD_OPTIONAL
        assert set(actual["backbone"]) == set(BACKBONE_SCHEMA)
    elif record == "model.json":
        actual, schema = json.loads((world.model / "model.json").read_text()), MODEL_SCHEMA
        assert set(actual["backbone"]) == set(MODEL_BACKBONE_SCHEMA)
    elif record == "metrics.json":
        actual, schema = json.loads((world.sk_head / "metrics.json").read_text()), METRICS_SCHEMA
    elif record == "state.json":
        actual, schema = json.loads((world.checkpoint / ".checkpoint" / "state.json").read_text()), STATE_SCHEMA
    else:
        with h5py.File(world.cache, "r") as f:
            attrs = dict(f.attrs)
        if record == "cache attributes":
            assert set(attrs) == set(ROOT_ATTRS), "the cache's root attributes changed: update ROOT_ATTRS and the mutations"
            return
        actual, schema = json.loads(attrs["config"]), CONFIG_SCHEMA
    assert set(actual) == set(schema), f"{record}: keys written {sorted(actual)}, generators know {sorted(schema)}"
    wrong = {k: type(v).__name__ for k, v in actual.items() if not _types_match(v, schema[k])}
    assert not wrong, f"{record}: types differ from the schema: {wrong}"


# ---------------------------------------------------------------------------------------------
# 3. Prediction on folders with nothing to predict, and per-image reasons

PREDICTORS = ["sklearn head", "keras head", "model"]


def _predictor(w: World, name: str) -> Path:
    return {"sklearn head": w.sk_head, "keras head": w.keras_head, "model": w.model}[name]


NOTHING_TO_PREDICT = {
    "empty folder": lambda c: c.folder("empty"),
    "folder without images": lambda c: _no_images_folder(c)[0],
    "folder of unreadable images only": lambda c: _unreadable_images_folder(c)[0],
}


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("folder", list(NOTHING_TO_PREDICT))
def test_predict_with_nothing_to_predict(folder, predictor, ctx, monkeypatch):
    fast_loading(monkeypatch)
    images = NOTHING_TO_PREDICT[folder](ctx)
    assert_contract(run_case(ctx, ["predict", _predictor(ctx.w, predictor), images]))


BAD_IMAGES = {
    "text named .jpg": lambda c: c.file("images/text.jpg", b"not an image at all"),
    "zero-byte .jpg": lambda c: c.file("images/empty.jpg", b""),
    "text named .png": lambda c: c.file("images/text.png", b"not a png"),
    "random bytes .bmp": lambda c: c.file("images/noise.bmp", np.random.default_rng(3).bytes(3000)),
    "missing file": lambda c: c.missing("photo.jpg"),
    "dangling symlink": lambda c: c.dangling("link.jpg"),
}


def _one_error_line(stderr: str, needle: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("bad_image", list(BAD_IMAGES))
def test_predict_mixed_images_give_short_reasons(bad_image, predictor, ctx, monkeypatch):
    fast_loading(monkeypatch)
    good = ctx.w.images[0]
    bad = BAD_IMAGES[bad_image](ctx)
    outcome = run_case(ctx, ["predict", _predictor(ctx.w, predictor), good, bad, "--json"])
    problems = []
    r = outcome.result
    if outcome.stopped is not None or r.exception is not None and not isinstance(r.exception, SystemExit):
        problems.append("traceback")
    elif r.exit_code != 1:  # some images predicted, some not: exit 1, rows for all, one line saying so
        problems.append(f"exit {r.exit_code} (one good and one bad image: expected 1)")
    elif not _one_error_line(r.stderr, "1 of 2 image(s) could not be read"):
        problems.append(f"not one line saying what could not be read: {r.stderr!r}")
    else:
        rows = {Path(row["path"]).name: row for row in json.loads(r.stdout)}
        if "label" not in rows.get(good.name, {}):
            problems.append("no prediction for the good image")
        row = rows.get(Path(bad).name)
        if row is None:
            problems.append("no row for the bad image")
        else:
            reason = row.get("error")
            if not isinstance(reason, str) or not reason.strip():
                problems.append(f"the bad image's row has no reason: {row}")
            elif any(t in reason for t in TF_OP_TEXT) or "\n" in reason or len(reason) > 200:
                problems.append(f"the reason is TensorFlow's text, not a short reason: {reason!r}")
    if outcome.changed:
        problems.append("changed on disk")
    fail_unless_none(problems, outcome, "ROWS")


# ---------------------------------------------------------------------------------------------
# 4. Controls: good values work


@pytest.mark.parametrize("name", ["cache build", "cache train-head (sklearn)", "cache train-head (keras)",
                                  "finetune run --resume"])
def test_control_runs_made_the_records(name, world):
    outcome = world.controls[name]
    assert outcome.result.exit_code == 0 and outcome.result.exception is None, outcome.result.output[-2000:]


CONTROLS = {
    "cache ls": lambda w, c: ["cache", "ls", "--cache-dir", w.cache_dir, "--json"],
    "cache ls (table)": lambda w, c: ["cache", "ls", "--cache-dir", w.cache_dir],
    "models": lambda w, c: ["models", "--json"],
    "models (table)": lambda w, c: ["models"],
    "cache build --model list": lambda w, c: ["cache", "build", "--model", "list"],
    "cache info": lambda w, c: ["cache", "info", w.fingerprint[:12], "--cache-dir", w.cache_dir],
    "cache verify": lambda w, c: ["cache", "verify", w.cache],
    "cache heads": lambda w, c: ["cache", "heads", "--cache-dir", w.cache_dir, "--json"],
    "cache heads (table)": lambda w, c: ["cache", "heads", "--cache-dir", w.cache_dir],
    "cache train-head (every option)": lambda w, c: [
        "cache", "train-head", w.cache, "--kind", "keras", "--epochs", 1, "--batch-size", 8, "--learning-rate", 1e-3,
        "--optimizer", "adam", "--dropout", 0.0, "--seed", 2**32 - 1, "--early-stopping", 1, "--out", c.tmp / "h",
        "--cache-dir", c.folder("cd"), "--json"],
    "cache train-head (several C)": lambda w, c: [
        "cache", "train-head", w.cache, "--C", 0.1, "--C", 10, "--out", c.tmp / "h", "--cache-dir", c.folder("cd")],
    "predict (sklearn head)": lambda w, c: ["predict", w.sk_head, *w.images, "--batch-size", 1, "--json"],
    "predict (keras head, weights given)": lambda w, c: ["predict", w.keras_head, w.images[0].parent, "--weights",
                                                         w.weights],
    "predict (model)": lambda w, c: ["predict", w.model, *w.images, "--json"],
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_control_good_values(name, ctx, monkeypatch):
    if name.startswith("predict"):
        fast_loading(monkeypatch)
    outcome = run_case(ctx, CONTROLS[name](ctx.w, ctx))
    assert_clean_success(outcome)
    if "train-head" not in name:
        assert not outcome.changed, outcome.changed
    if name.startswith("predict") and "--json" in outcome.argv:
        rows = json.loads(outcome.result.stdout)
        assert rows and all("label" in row for row in rows), rows


def test_a_fine_tuned_model_missing_its_record_is_told_to_fine_tune_again(ctx, monkeypatch):
    """export and predict of a fine-tuned model folder without model.json: the advice is the
    model's (fine-tune again), not an export's."""
    fast_loading(monkeypatch)
    folder = ctx.copy(ctx.w.model, "model")
    (folder / "model.json").unlink()
    for argv in (["export", folder, "--format", "keras", "--data", ctx.w.data, "--out", ctx.tmp / "out"],
                 ["predict", folder, ctx.w.images[0]]):
        outcome = run_case(ctx, argv)
        assert_contract(outcome)
        line = outcome.first_line()
        assert "fine-tune again" in line and "export it again" not in line, line
