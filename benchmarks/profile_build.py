"""Where a cache build's time goes: ``python -m benchmarks.profile_build``.

Two measurements, both rerunnable on any machine (figures in docs/benchmarks.md):

``--py-spy`` (default): one real ``bottlecache cache build`` of the data in a fresh folder, sampled
by py-spy (``pip install py-spy``; a developer tool, not a dependency) with idle samples kept, so
waiting shows up as well as work. Writes ``profile.svg`` (a flame graph) and ``profile.txt``
(collapsed stacks) to ``--out``, and prints, per thread, the share of samples in each phase of
the build: the engine's forward pass, waiting for decoded images, waiting for the previous
commit, encoding chunks, HDF5 writes, fsync. ``--native`` adds C/C++ frames.

``--timing``: one real build in this process with its parts timed: the engine's calls, the
waits for decoded images, the commits (their wall and CPU seconds, in the commit thread) and the
main thread's waits for them; then, in the same process, the forward pass alone on random input
and decoding alone, and the bound they allow together (as ``python -m benchmarks`` computes it).
Without sampling, so the build runs at full speed; ``--repeat`` builds again for the spread.

``--engine-grid``: the LiteRT forward rate on random input for each batch size and thread count
(``--batch-sizes``, ``--threads``), the best of three rounds each; how the engine's default batch
size and threads were chosen.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .suite import default_data, default_weights

# (phase, the frames that mark it, first match wins; order matters)
PHASES = (
    ("forward pass (engine)", ("invoke", "__call__ (bottlecache/models/engines.py")),
    ("encode chunks (deflate, fletcher32)", ("encode_chunk", "fletcher32", "encode_rows")),
    ("fsync / flush", ("_sync", "fsync")),
    ("HDF5 writes", ("write_chunks", "append (bottlecache/cache/store.py")),
    ("wait for the previous commit", ("wait (bottlecache/cache/writer.py",)),
    ("wait for decoded images", ("_windows", "as_numpy_iterator", "__next__")),
    ("start-up (imports, resolve, engine)", ("<module>", "resolve", "make_engine", "checked_engine", "load_backbone")),
)


def phase_of(stack: str) -> str:
    for phase, marks in PHASES:
        if any(mark in stack for mark in marks):
            return phase
    return "other"


def summarize(collapsed: Path) -> str:
    """Per thread: samples and the share of each phase, from py-spy's collapsed stacks."""
    threads: dict[str, Counter] = {}
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread = stack.split(";", 1)[0]
        threads.setdefault(thread, Counter())[phase_of(stack)] += int(count)
    lines = []
    for thread, phases in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        total = sum(phases.values())
        lines.append(f"{thread}: {total} samples")
        for phase, n in phases.most_common():
            lines.append(f"  {100 * n / total:5.1f} %  {phase}")
    return "\n".join(lines)


def profile(args) -> int:
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("error: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bottlecache-profile-") as cache_dir:
        if args.engines_from:  # a folder's converted, checked flatbuffers: profile the build, not the conversion
            shutil.copytree(args.engines_from, Path(cache_dir) / "engines")
        build = [sys.executable, "-m", "bottlecache", "cache", "build", "--data", args.data, "--weights",
                 args.weights, "--engine", args.engine, "--cache-dir", cache_dir, "--image-size", str(args.image_size)]
        for kind, name in (("flamegraph", "profile.svg"), ("raw", "profile.txt")):
            if kind == "raw" or args.flamegraph:
                command = [py_spy, "record", "--idle", "--threads", "--rate", str(args.rate), "--format", kind,
                           "-o", str(args.out / name), *(["--native"] if args.native else []), "--", *build]
                started = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                print(f"{name}: {time.perf_counter() - started:.1f} s build under py-spy", file=sys.stderr)
                for cache in Path(cache_dir).glob("*.h5"):
                    cache.unlink()  # the second recording builds again, not a hit
    print(summarize(args.out / "profile.txt"))
    return 0


class _Clock:
    """Seconds (and calls) spent inside wrapped functions; ``cpu`` also counts the thread's CPU."""

    def __init__(self):
        self.seconds, self.cpu, self.calls = Counter(), Counter(), Counter()

    def wrap(self, name: str, function, cpu: bool = False):
        def timed(*args, **kwargs):
            started, thread_started = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
                if cpu:
                    self.cpu[name] += time.thread_time() - thread_started
        return timed

    def wrap_iterator(self, name: str, function):
        def timed(*args, **kwargs):
            iterator = function(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.seconds[name] += time.perf_counter() - started
                yield item
        return timed


def timing(args) -> int:
    from bottlecache.cache import build as build_module
    from bottlecache.cache import store, writer
    from bottlecache.core.options import usable_cores
    from bottlecache.models import engines
    from bottlecache.models.backbone import resolve_weights

    from .cases import _forward_case, decode_only
    from .context import Run

    clock = _Clock()
    writer._windows = clock.wrap_iterator("waiting for decoded images", writer._windows)
    used = []  # the build's engine, run alone afterwards

    def recorded(call):
        def engine_call(self, images):
            used[:] = [self]
            return call(self, images)
        return engine_call

    for engine_class in (engines.LiteRTEngine, engines.KerasEngine):
        engine_class.__call__ = recorded(clock.wrap("inside the engine", engine_class.__call__))
    store.PartialCache.append = clock.wrap("commits (commit thread)", store.PartialCache.append, cpu=True)
    writer.Committer.wait = clock.wrap("waiting for commits", writer.Committer.wait)
    with tempfile.TemporaryDirectory(prefix="bottlecache-timing-") as cache_dir:
        if args.engines_from:
            shutil.copytree(args.engines_from, Path(cache_dir) / "engines")
        for round_ in range(args.repeat):
            for counter in (clock.seconds, clock.cpu, clock.calls):
                counter.clear()
            started, cpu_started = time.perf_counter(), time.process_time()
            report = build_module.build_cache(args.data, image_size=args.image_size, weights=args.weights,
                                              cache_dir=cache_dir, engine=args.engine, reuse=False,
                                              precision=args.precision, fast_decode=args.fast_decode)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            n = sum(s.n_processed for s in report.splits)
            split_seconds = sum(s.seconds for s in report.splits)
            print(f"build {round_ + 1}: {n} images, {n / split_seconds:.1f} images/s over the splits' "
                  f"{split_seconds:.2f} s ({report.engine}, start-up {report.startup_seconds:.2f} s); "
                  f"CPU use {cpu / wall / usable_cores():.2f} of {usable_cores()} cores")
            main = {k: clock.seconds[k] for k in ("inside the engine", "waiting for decoded images",
                                                   "waiting for commits")}
            for name, seconds in main.items():
                print(f"  {name}: {seconds:.2f} s")
            print(f"  the rest of the main thread: {split_seconds - sum(main.values()):.2f} s")
            name = "commits (commit thread)"
            print(f"  {name}: {clock.calls[name]}, {clock.seconds[name]:.2f} s, {clock.cpu[name]:.2f} s of CPU")
            for path in Path(cache_dir).glob("*.h5"):
                path.unlink()  # the next round builds again
    # the forward pass and decoding alone, measured as the suite's cases measure them
    run = Run(data=args.data, splits=None, weights=resolve_weights(args.weights, args.image_size), epochs=0,
              image_size=args.image_size, finetune_epochs=0, seed=0, engine=args.engine, quick=False,
              work_dir=Path(tempfile.gettempdir()))
    forward = _forward_case(run, used[0])["images_per_second"]
    decode = decode_only(run, fast_decode=args.fast_decode)["images_per_second"]
    bound = 1 / (1 / forward + 1 / decode)
    print(f"forward alone {forward:.1f} images/s (as forward-limit measures it), decoding alone {decode:.1f}: "
          f"bound {bound:.1f}; the last build {n / split_seconds / bound:.3f} of it")
    return 0


def engine_grid(args) -> int:
    import numpy as np

    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.engines import LiteRTEngine, convert_to_flatbuffer, flatbuffer_path

    weights = resolve_weights(args.weights, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = None
        if args.precision == "int8":  # calibrated as `cache build --precision int8` calibrates it on --data
            from bottlecache.cache.settings import CacheSettings

            int8 = CacheSettings(args.data, image_size=args.image_size, weights=args.weights, precision="int8",
                                 cache_dir=tmp).resolve().int8()
        flatbuffer = convert_to_flatbuffer(load_backbone(weights, args.image_size), flatbuffer_path(
            Path(tmp), weights.sha256, args.image_size, weights.model, int8 and int8.identity), int8)
        print(f"{args.precision}: threads  batch  images/s (best of 3)")
        for threads in args.threads:
            engine = LiteRTEngine(flatbuffer, threads=threads)
            for batch in args.batch_sizes:
                images = np.random.default_rng(0).uniform(-1, 1, (batch, args.image_size, args.image_size, 3))
                engine(images)  # allocation and warm-up
                n = max(64, 4 * batch)
                rates = []
                for _ in range(3):
                    started = time.perf_counter()
                    for _ in range(n // batch):
                        engine(images)
                    rates.append((n // batch) * batch / (time.perf_counter() - started))
                print(f"{threads:7d}  {batch:5d}  {max(rates):9.1f}", flush=True)
    return 0


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--weights", default=default_weights())
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--engine", default="auto", choices=("auto", "keras", "litert"))
    parser.add_argument("--out", type=Path, default=Path("profile"))
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C/C++ frames too")
    parser.add_argument("--flamegraph", action="store_true", help="also record a flame graph (a second build)")
    parser.add_argument("--engines-from", type=Path,
                        help="copy this engines/ folder (converted, checked flatbuffers) into the fresh cache folder")
    parser.add_argument("--engine-grid", action="store_true", help="LiteRT images/s per batch size and threads")
    parser.add_argument("--timing", action="store_true", help="a build's parts timed, against the bound")
    parser.add_argument("--repeat", type=int, default=1, help="--timing: builds to run")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--fast-decode", action="store_true", help="--timing: build with --fast-decode")
    parser.add_argument("--precision", default="float32", choices=("float32", "int8"),
                        help="--engine-grid, --timing: the base's precision (int8: calibrated on --data)")
    parser.add_argument("--threads", type=_ints, default=sorted({1, os.cpu_count() or 1}))
    args = parser.parse_args(argv)
    if args.timing:
        from bottlecache.core.errors import BottlecacheError

        try:
            return timing(args)
        except BottlecacheError as error:  # bad --data / --weights: one line, as the CLI says it
            print(f"error: {error}", file=sys.stderr)
            return 2
    return engine_grid(args) if args.engine_grid else profile(args)


if __name__ == "__main__":
    sys.exit(main())
