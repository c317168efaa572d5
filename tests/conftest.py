"""Shared fixtures. Real data and real weights come from ../shared (never copied into the repo).

Where ../shared is missing, tests that need it fail in CI (CI=true) and are skipped elsewhere,
with the reason said.

Tests that interrupt a running process never race it against a time constant: they look at its
observed progress (committed rows, a finished epoch, a line in its log) every ``POLL_SECONDS`` and
act on what they saw, and they size the work from what they measured on this machine. A timeout
only stops a hung test. ``BOTTLECACHE_TEST_POLL_SECONDS`` (default 0.01) sets how often they look:
a larger value lets more work happen between two looks, as on a machine that many times faster
(tests/test_reliability.py, module docstring).
"""

from __future__ import annotations

import os


def _pin_xdist_worker() -> None:
    """Under pytest-xdist, each worker runs on its own share of the cores (on 2 cores with 2
    workers: one each). TensorFlow, tf.data and the LiteRT engine size their thread pools from the
    process's CPU affinity (``config.usable_cores``), so two workers no longer run four busy
    threads on two cores: one engine thread per worker. Done before numpy starts its threads."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    if count <= len(cores):
        os.sched_setaffinity(0, cores[index::count])


_pin_xdist_worker()

import contextlib  # noqa: E402 (after the pinning)
import fcntl  # noqa: E402 (after the pinning)
import html  # noqa: E402 (after the pinning)
import itertools  # noqa: E402 (after the pinning)
import json  # noqa: E402 (after the pinning)
import re  # noqa: E402 (after the pinning)
import shutil  # noqa: E402 (after the pinning)
import subprocess  # noqa: E402 (after the pinning)
import time  # noqa: E402 (after the pinning)
from pathlib import Path  # noqa: E402 (after the pinning)

import numpy as np  # noqa: E402 (after the pinning)
import pytest  # noqa: E402 (after the pinning)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BOTTLECACHE_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
CATS_DOGS = SHARED / "data" / "cats_and_dogs_filtered"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Small slices of the real data keep the suite within CI's budget on 2 CPU cores.
SMALL_SPLITS = ["train=train[:96]", "validation=validation[:48]"]

# How often a test looks at a process it is about to interrupt (see the module docstring).
POLL_SECONDS = float(os.environ.get("BOTTLECACHE_TEST_POLL_SECONDS", "0.01"))


def _missing(message: str):
    """What is missing fails the test in CI and skips it elsewhere, saying so."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message + "; skipped outside CI only")


def _need(path: Path) -> Path:
    if not path.exists():
        _missing(f"{path} is missing (tests need ../shared beside the repository)")
    return path


def need_extra(extra: str, *modules: str) -> None:
    """The optional extra ``extra`` (its ``modules`` importable), or the test fails in CI / skips elsewhere."""
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        _missing(f"{modules[0]} is not installed (pip install 'bottlecache[{extra}]')")


@pytest.fixture(scope="session")
def weights_path() -> Path:
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def cats_dogs() -> Path:
    return _need(CATS_DOGS)


# ---------------------------------------------------------------------------------------------
# Scheduling under pytest-xdist (``--dist loadgroup``, pyproject.toml)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """A test file is one unit of work, so its module fixtures are made once, on one worker,
    unless its tests name a group of their own (``xdist_group``: the backbones' whole paths and
    Xception, the longest tests here, spread over the workers; the contract suite). Those units
    go first, then files by their count of slow tests: the longest work starts early and the
    short tests fill in behind it."""
    def group(item):
        return next(item.iter_markers("xdist_group")).args[0]

    own = set()
    for item in items:
        if any(item.iter_markers("xdist_group")):
            own.add(group(item))
        else:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    n_slow = {}
    for item in items:
        n_slow[group(item)] = n_slow.get(group(item), 0) + (item.get_closest_marker("slow") is not None)
    items[:] = sorted(items, key=lambda item: (group(item) not in own, -n_slow[group(item)]))  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``$BOTTLECACHE_TEST_TIMELINE`` set to a file, each worker appends a line per test (worker,
    start, end, test id): when each worker ran what, to see where a run's wall time goes (idle
    workers at the end, a long test started late). docs/testing.md."""
    target = os.environ.get("BOTTLECACHE_TEST_TIMELINE")
    started = time.time()
    yield
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps([os.environ.get("PYTEST_XDIST_WORKER", "main"), round(started, 2),
                                     round(time.time(), 2), item.nodeid]) + "\n")


# ---------------------------------------------------------------------------------------------
# One shared world: what several test files need is made once per run, keyed by its configuration.
# Under pytest-xdist every worker has its own session; the first worker to ask makes the thing in
# a folder all workers share (the run's base folder), under a lock, and the others wait and reuse it.


def run_folder(tmp_path_factory) -> Path:
    """The folder this whole test run shares: under xdist, the parent of every worker's base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
    """``(folder, done)``: ``folder`` is this run's shared folder for ``name``, held under a lock
    for the block; ``done`` is True when a worker already made it (it wrote ``folder/.done``)."""
    root = run_folder(tmp_path_factory) / "shared-world"
    root.mkdir(exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder = root / name
        done = (folder / ".done").exists()
        if not done and folder.exists():  # a worker failed half-way: start clean
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        yield folder, done
        (folder / ".done").touch()


def shared_json(tmp_path_factory, name: str, make):
    """``make(folder)`` once per run (any worker), its JSON-able result for every caller."""
    with made_once(tmp_path_factory, name) as (folder, done):
        if not done:
            (folder / "result.json").write_text(json.dumps(make(folder)))
        return json.loads((folder / "result.json").read_text())


def copy_engines(source: Path, cache_dir: Path) -> Path:
    """Copy the converted flatbuffers of cache folder ``source`` into ``cache_dir/engines``, as a
    user's second build finds them (a conversion costs 10-20 s; the tests of conversion convert)."""
    target = Path(cache_dir) / "engines"
    target.mkdir(parents=True, exist_ok=True)
    for path in (Path(source) / "engines").iterdir():
        shutil.copy2(path, target / path.name)
    return Path(cache_dir)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, weights_path):
    """``converted(image_size)``: a cache folder holding MobileNetV2's LiteRT flatbuffer (the real
    weights) for that size, converted once per run; copy it with ``copy_engines``."""

    def get(image_size: int) -> Path:
        def make(folder):
            from bottlecache.models.backbone import load_backbone, resolve_weights
            from bottlecache.models.engines import convert_to_flatbuffer, flatbuffer_path

            weights = resolve_weights(weights_path, image_size)
            path = convert_to_flatbuffer(load_backbone(weights, image_size),
                                         flatbuffer_path(folder, weights.sha256, image_size))
            return str(path)

        return Path(shared_json(tmp_path_factory, f"mobilenet_v2-{image_size}-litert", make)).parent.parent

    return get


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's environment or writes to ./cache."""
    monkeypatch.delenv("BOTTLECACHE_WEIGHTS", raising=False)
    monkeypatch.setenv("BOTTLECACHE_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, weights_path, cats_dogs):
    """One float16 cache of a slice of cats_and_dogs_filtered, built once per session (Keras engine)."""
    from bottlecache import build_cache

    cache_dir = tmp_path_factory.mktemp("small-cache")
    report = build_cache(cats_dogs, SMALL_SPLITS, weights=weights_path, cache_dir=cache_dir, engine="keras")
    return report


def write_images(root: Path, layout: dict[str, int], size=(40, 30), seed: int = 0) -> Path:
    """Tiny generated JPEGs: ``{"cats": 5, "dogs": 5}`` or ``{"train/cats": 5, ...}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def float32_train_cache(tmp_path_factory, weights_path, cats_dogs):
    """A float32 cache with only a train split (48 images; Keras engine), built once per session."""
    from bottlecache import build_cache

    cache_dir = tmp_path_factory.mktemp("float32-train-cache")
    return build_cache(
        cats_dogs, ["train=train[:48]"], weights=weights_path, cache_dir=cache_dir, dtype="float32", engine="keras"
    )


def _command_built_once():
    """typer's CliRunner turns the Typer app into a click command on every ``invoke``, reading each
    command's signature and evaluating its annotations: about 35 ms a call here, a third of the
    contract suite's time (tests/test_bad_input.py runs over 1,500 commands). The app does not
    change within a run, so the command is built once per app; each invoke still parses, runs and
    captures as before."""
    import typer.main
    import typer.testing

    build, built = typer.main.get_command, {}

    def get_command(app):
        if id(app) not in built:
            built[id(app)] = (app, build(app))  # the app is kept, so its id is not reused
        return built[id(app)][1]

    typer.testing._get_command = get_command


_command_built_once()


def invoke(args, **kwargs):
    """Run the command line in-process (typer's CliRunner); ``result.stdout`` / ``result.stderr`` apart."""
    from typer.testing import CliRunner

    from bottlecache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def error_line(result) -> str:
    """The one line a failed command printed on stderr (it must be exactly one, and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def flip_byte_in_chunk(path: Path, split: str, chunk: int, dataset: str = "features") -> tuple[int, int]:
    """Flip one byte in the middle of a stored chunk of ``split/dataset``; return its row range."""
    import h5py

    with h5py.File(path, "r") as f:
        data = f[split][dataset]
        info = data.id.get_chunk_info(chunk)
        first = info.chunk_offset[0]
        last = min(first + data.chunks[0], data.shape[0]) - 1
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        value = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([value ^ 0xFF]))
    return first, last


def wait_until(condition, *, what: str, processes=(), timeout: float = 240.0, look=None):
    """Look every ``POLL_SECONDS`` until ``condition()`` returns something true, and return it.

    ``look`` (optional) runs at every look first. Fails naming ``what`` if one of ``processes``
    (those that must still run) ends first, or after ``timeout`` seconds: an upper bound that only
    stops a hung test, never a point where something is done to a process.
    """
    deadline = time.monotonic() + timeout
    while True:
        if look is not None:
            look()
        value = condition()
        if value:
            return value
        ended = [p for p in processes if p.poll() is not None]
        if ended:
            pytest.fail(f"{what}: process {ended[0].pid} ended first (exit {ended[0].returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still waiting after {timeout:.0f} s (a hung process?)")
        time.sleep(POLL_SECONDS)


class CommitClock:
    """A ``build_cache`` progress that notes when each commit (a window of rows) is handed over,
    to measure how fast this machine commits right now."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.starts: dict[str, float] = {}

    def start_split(self, split: str, total: int, done: int) -> None:
        self.times[split], self.starts[split] = [], time.monotonic()

    def advance(self, split: str, n: int) -> None:
        self.times[split].append(time.monotonic())

    def end_split(self, split: str) -> None: ...

    def message(self, text: str) -> None: ...

    def intervals(self) -> list[float]:
        """Seconds between consecutive commits of a split (the first of each split, which waits on
        the input pipeline and the model's first call, starts no interval)."""
        return [b - a for times in self.times.values() for a, b in itertools.pairwise(times)]

    @property
    def commits(self) -> int:
        return sum(len(times) for times in self.times.values())

    def first_commit_seconds(self) -> float:
        """From the first split's start to its first commit: a new process's model's first call."""
        split = next(iter(self.times))
        return self.times[split][0] - self.starts[split]

    def commits_per_second(self) -> float:
        """The fast end of the measured rate (the quarter of intervals that were shortest): kill
        points and work sizes planned on it err on the side of a faster machine."""
        intervals = self.intervals()
        assert intervals, "too few commits to measure a rate"
        return 1.0 / max(float(np.quantile(intervals, 0.25)), 1e-6)


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    """The session's warm interpreter: ``launcher.start(argv, stdout=, stderr=)`` runs ``bottlecache
    ARGV`` in a child forked from a process with TensorFlow imported (tests/launcher.py)."""
    from launcher import WarmLauncher

    server = WarmLauncher(tmp_path_factory.mktemp("launcher"))
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------
# Pages opened in headless Chromium (the error report, the audit)

CHROMIUM_SECONDS = 120  # a hung browser fails the test instead of hanging the suite
CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(e.target && e.target.tagName ? 'failed to load ' + e.target.tagName : String(e.message));
  }, true);
  window.addEventListener('load', function () {
    var images = Array.prototype.map.call(document.images, function (i) {
      return {alt: i.alt, loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth};
    });
    var out = document.createElement('pre');
    out.id = 'bottlecache-check';
    out.textContent = JSON.stringify({images: images, errors: errors,
      headings: Array.prototype.map.call(document.querySelectorAll('h1, h2'), function (h) { return h.textContent; }),
      height: document.body.scrollHeight});
    document.body.appendChild(out);
  });
})();
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "headless Chromium is missing (Debian: apt-get install chromium; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; skipped outside CI only")
    return path


def _run_chromium(browser: str, profile: Path, *args) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_SECONDS)


def open_in_browser(page: Path, work: Path, name: str = "report") -> tuple[dict, list[str], Path]:
    """The page's check (images loaded, load errors, headings), its console lines and a screenshot
    (``<name>-screenshot.png``, in ``$BOTTLECACHE_ARTIFACTS`` when set)."""
    browser = _chromium()
    checked = work / "checked.html"  # the page with the check script first in <head>: it sees every load
    checked.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    dom = _run_chromium(browser, work / "profile-dom", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="bottlecache-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the check script did not run (the page did not finish loading):\n" + dom.stdout[-2000:]
    check = json.loads(html.unescape(found.group(1)))
    screenshot = Path(os.environ.get("BOTTLECACHE_ARTIFACTS") or work) / f"{name}-screenshot.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = _run_chromium(browser, work / "profile-shot", "--window-size=1200,2400", f"--screenshot={screenshot}",
                         page.as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    console = [line for text in (dom.stderr, shot.stderr) for line in text.splitlines() if ":CONSOLE" in line]
    return check, console, screenshot
