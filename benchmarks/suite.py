"""``python -m benchmarks``: parse the options, run the cases in order, write and print the results."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

from . import REPO, RESULTS_DIR, SCHEMA_VERSION, report

SHARED = Path(os.environ.get("BOTTLECACHE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data" / "cats_and_dogs_filtered"
QUICK_SPLITS = {"folder": ["train=train[:64]", "validation=validation[:32]"],
                "tfds": ["train=train[:64]", "validation=train[64:96]"]}

FULL_IMAGE_SIZE, QUICK_IMAGE_SIZE = 160, 96


def default_data() -> str:
    return str(SHARED_DATA) if SHARED_DATA.is_dir() else "cats_vs_dogs"


def default_weights(model: str = "mobilenet_v2") -> str:
    from .context import SHARED_WEIGHTS as BY_MODEL

    shared = SHARED / "weights" / BY_MODEL.get(model, "-")
    return os.environ.get("BOTTLECACHE_WEIGHTS") or (str(shared) if shared.is_file() else "imagenet")


def parse_args(argv=None) -> argparse.Namespace:
    from .cases import CASES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time every claim of bottlecache in one run: forward limits, decoding, cache builds, "
                    "cache reads, heads on the cache vs the tutorial's frozen-base training, fine-tuning.",
    )
    parser.add_argument("--data", default=default_data(),
                        help="image folder or tfds name (default: ../shared/data/cats_and_dogs_filtered if present, "
                             "else cats_vs_dogs)")
    parser.add_argument("--model", default="mobilenet_v2",
                        help="the base of every case but 'backbones' (bottlecache models; default mobilenet_v2)")
    parser.add_argument("--weights",
                        help="weights file of --model or 'imagenet' (default: $BOTTLECACHE_WEIGHTS, else the "
                             "../shared weights of --model if present, else imagenet)")
    parser.add_argument("--epochs", type=int, help="head epochs, tutorial and cached-keras (default 10; quick 1)")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 2; quick 1)")
    parser.add_argument("--image-size", type=int,
                        help=f"default {FULL_IMAGE_SIZE}; quick {QUICK_IMAGE_SIZE} (the check of the machinery, not of the size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="auto", choices=("auto", "keras", "litert"),
                        help="engine of the cache-build case and of the builds the cached-* cases count")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small slice (train[:64], validation[:32]) at {QUICK_IMAGE_SIZE} px, 1 epoch each: for CI, "
                             "three minutes with --jobs 2")
    parser.add_argument("--cases", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                        help=f"comma-separated subset of: {', '.join(CASES)} (default all)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="with --quick: run the cases in N processes at once (groups that share no state; "
                             "CI uses 2). Its figures are taken side by side, so a full run always runs alone")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="keep N busy processes running beside the cases (a loaded machine, reproducibly)")
    args = parser.parse_args(argv)
    if args.load < 0:
        parser.error(f"--load must be 0 or more, got {args.load}")
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")
    if args.jobs > 1 and not args.quick:
        parser.error(f"--jobs {args.jobs} needs --quick: the figures of a full run are compared, so it runs alone")
    unknown = [c for c in args.cases or [] if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    from bottlecache.core.registry import BACKBONES

    if args.model not in BACKBONES:
        parser.error(f"unknown --model {args.model}; choose from {', '.join(BACKBONES)}")
    if args.weights is None:
        args.weights = default_weights(args.model)
    if args.image_size is None:
        args.image_size = QUICK_IMAGE_SIZE if args.quick else FULL_IMAGE_SIZE
    if args.epochs is None:
        args.epochs = 1 if args.quick else 10
    if args.finetune_epochs is None:
        args.finetune_epochs = 1 if args.quick else 2
    for option, value in (("--epochs", args.epochs), ("--finetune-epochs", args.finetune_epochs)):
        if value < 1:
            parser.error(f"{option} must be a positive integer, got {value}")
    args.cases = [c for c in CASES if c in (args.cases or CASES)]  # always in the suite's order
    return args


def make_run(args, work_dir: Path):
    from bottlecache.models.backbone import resolve_weights

    from .context import Run

    splits = None
    if args.quick:
        kind = "folder" if Path(args.data).expanduser().is_dir() else "tfds"
        splits = QUICK_SPLITS[kind]
    run = Run(
        data=args.data, splits=splits, weights=resolve_weights(args.weights, args.image_size, args.model),
        image_size=args.image_size, epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed,
        engine=args.engine, quick=args.quick, work_dir=work_dir,
    )
    run.source()  # a bad --data fails here, before any case runs
    return run


def config(args, run) -> dict:
    source = run.source()
    return {
        "data": str(args.data),
        "data_name": source.name,
        "splits": {name: {"spec": str(s.spec), "n_examples": s.n_examples} for name, s in source.splits.items()},
        "model": run.weights.model,
        "weights": args.weights,
        "weights_sha256": run.weights.sha256,
        "image_size": run.image_size,
        "epochs": run.epochs,
        "finetune_epochs": run.finetune_epochs,
        "seed": run.seed,
        "engine": run.engine,
        "quick": run.quick,
        "cases": args.cases,
        "background_load": args.load,
        "jobs": args.jobs,
    }


@contextlib.contextmanager
def background_load(n: int):
    """``n`` processes spinning on the CPU for as long as the block runs (``--load``): the same
    load on any machine, where other people's work is never the same twice."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield [spinner.pid for spinner in spinners]
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def run_cases(run, names: list[str]) -> dict:
    """Run each case, in order; a failing case is recorded with its error and the rest go on."""
    from bottlecache.models.backbone import forget_loaded_backbones

    from .cases import CASES

    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} …", file=sys.stderr, flush=True)
        forget_loaded_backbones()  # each case loads its base as a user's process would
        started, load = time.perf_counter(), report.load_average()
        try:
            result = CASES[name](run)
        except Exception as error:  # recorded in the results and the exit code, never hidden
            traceback.print_exc()
            result = {"seconds": time.perf_counter() - started, "error": f"{type(error).__name__}: {error}"[:500]}
        # the machine's 1-minute load around this case: how busy it was when these figures were taken
        result["load_average"] = {"start": load[0] if load else None, "end": (report.load_average() or [None])[0]}
        run.results[name] = result
        print(f"[{i}/{len(names)}] {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return run.results


def lanes(names: list[str], jobs: int) -> list[list[str]]:
    """``names`` in at most ``jobs`` lanes, each a list of whole groups (``GROUPS``) in the suite's
    order: the first lane holds the first group (the run's own builds and heads), the others share
    the remaining groups in turn."""
    from .cases import GROUPS

    if jobs <= 1:
        return [list(names)] if names else []
    groups = [[n for n in group if n in names] for group in GROUPS]
    groups = [g for g in groups if g]
    out = [groups[0] if groups else []] + [[] for _ in range(min(jobs, len(groups)) - 1)]
    for i, group in enumerate(groups[1:]):
        out[1 + i % (len(out) - 1) if len(out) > 1 else 0] += group
    return [lane for lane in out if lane]


def run_lanes(run, args, argv, work_dir: Path) -> dict:
    """Run the first lane here and each other lane in a ``python -m benchmarks --cases …`` process of
    its own, started first; its cases join the results in the suite's order."""
    from .cases import CASES

    first, *others = lanes(args.cases, args.jobs)
    argv = list(sys.argv[1:] if argv is None else argv)
    children = []
    for i, names in enumerate(others, 2):
        out, log = work_dir / f"lane-{i}", work_dir / f"lane-{i}.log"
        command = [sys.executable, "-m", "benchmarks", *argv, "--cases", ",".join(names), "--out", str(out),
                   "--jobs", "1", "--load", "0"]
        print(f"[lane {i}] {', '.join(names)}: in process of its own (log {log})", file=sys.stderr, flush=True)
        with open(log, "w") as stream:
            children.append((i, names, out, log, subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                                                  cwd=REPO)))
    results = dict(run_cases(run, first))
    for i, names, out, log, child in children:
        code = child.wait()
        found = sorted(out.glob("*.json"))
        lane = json.loads(found[0].read_text())["cases"] if found else {}
        for name in names:
            results[name] = lane.get(name) or {"error": f"lane {i} exited with {code} before {name} ran; its log: "
                                                        + " | ".join(log.read_text().splitlines()[-3:])[:400]}
        print(f"[lane {i}] done (exit {code})", file=sys.stderr, flush=True)
    return {name: results[name] for name in CASES if name in results}


def main(argv=None) -> int:
    from bottlecache.cache.writer import library_versions
    from bottlecache.core.errors import BottlecacheError

    from .cases import CASES

    args = parse_args(argv)
    started = time.perf_counter()
    now = datetime.now().astimezone()
    load_start = report.load_average()
    with tempfile.TemporaryDirectory(prefix="bottlecache-bench-") as tmp:
        try:
            run = make_run(args, Path(tmp))
        except BottlecacheError as error:  # bad --data / --weights: one line, as the CLI says it
            print(f"error: {error}", file=sys.stderr)
            return 2
        with background_load(args.load):
            cases = run_lanes(run, args, argv, Path(tmp))
        result = {
            "schema_version": SCHEMA_VERSION,
            "date": now.isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - started,
            "load_average": {"start": load_start, "end": report.load_average()},
            "machine": report.machine(),
            "versions": library_versions(),
            "config": config(args, run),
            "cases": cases,
            "checks": report.checks(cases),
        }
    result = report.rounded(result)
    kind = "quick" if args.quick else "full"
    complete = len(args.cases) == len(CASES)
    if not complete:
        kind += "-subset"
    paths = report.write(result, args.out, now.strftime("%Y-%m-%dT%H%M"), kind, latest=complete)
    print(report.markdown(result))
    for label, path in paths.items():
        print(f"{label}: {_shown(path)}")
    failed = [name for name, case in cases.items() if "error" in case]
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
