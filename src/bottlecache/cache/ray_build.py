"""``cache build --executor ray``: the same cache, built shard by shard by a Ray Data actor pool.

The driver plans the shards (``bottlecache.cache.shards``), skips those an earlier run finished, and
ships only shard descriptors through Ray: a pool of actors (``map_batches`` with a callable class,
one shard per call) each loads the engine once, reads its images itself (paths on a shared file
system), writes its shard file and returns one manifest row. No features pass through Ray's
object store. The driver then checks every shard and joins them into the cache file.

Faults: Ray restarts an actor whose process or node died and runs its shard again (the shard's
partial file resumes); a Python exception in a shard is retried ``retries`` times by the actor,
then reported in the shard's row, and the build stops with one line naming the shard, keeping
every finished shard. A rerun skips complete shards.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import BottlecacheError, reason
from ..core.files import ensure_cache_dir
from ..core.options import DEFAULT_ENGINE, usable_cores
from ..core.progress import NullProgress
from ..core.tf import import_tf
from ..models.backbone import load_backbone
from ..models.engines import checked_engine, make_engine
from .settings import CacheSettings, ResolvedCache
from .shards import (
    DEFAULT_SHARD_SIZE,
    ShardSpec,
    check_manifest,
    check_shard_size,
    clean_orphans,
    complete_shard_row,
    join_shards,
    plan_shards,
    shard_folder,
    write_shard,
)
from .store import COMMIT_ROWS, Cache, build_lock
from .writer import BuildReport, check_build_options, hit_report, library_versions, split_reports, window_rows

INSTALL_HINT = "The ray executor needs Ray Data: pip install 'bottlecache[ray]' (or pip install 'ray[data]')."
# An actor asks for a little less than a CPU: actors holding every whole CPU can leave none for
# Ray Data's own tasks and hang the pipeline (ray-project/ray#44687).
ACTOR_CPUS = 0.9
# per actor, its engine's and so its decoding's (cache/writer.py): one actor per core; the features
# do not depend on it (docs/scaling-out.md)
ENGINE_THREADS = 1
DEFAULT_RETRIES = 2  # a Python exception in a shard: tries after the first


@dataclass
class RayBuildReport(BuildReport):
    n_shards: int = 0
    n_reused: int = 0  # shards an earlier run finished
    ray_startup_seconds: float = 0.0
    join_seconds: float = 0.0  # checking every shard and writing the cache file over them
    workers: int = 0
    shard_rows: list = field(default_factory=list)  # the manifest rows of the shards this run wrote


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BottlecacheError(INSTALL_HINT) from None
    return ray


def build_ray(resolved: ResolvedCache, *, batch_size: int | None = None, engine: str = DEFAULT_ENGINE,
              shard_size: int = DEFAULT_SHARD_SIZE, address: str | None = None, wait: bool = True,
              retries: int = DEFAULT_RETRIES, progress=None, inject_failures: dict[int, int] | None = None
              ) -> BuildReport:
    """Build the cache of ``resolved`` on Ray (see the module docstring); same file, same name.

    ``address``: None starts a local Ray on the usable cores (or uses the one this process already
    started); ``"auto"`` or ``HOST:PORT`` joins a running cluster. ``inject_failures``
    (``{shard id: n}``) makes the first ``n`` tries of a shard raise before it starts, for tests.
    """
    check_build_options(engine, batch_size)
    ray = import_ray()
    check_ray_address(address)
    check_ray_answers(address)  # before the weights load and anything is written
    # The engines' own batches (Keras 32, LiteRT 8) commit windows of 32 rows.
    check_shard_size(shard_size, window_rows(batch_size or COMMIT_ROWS))
    progress = progress or NullProgress()
    final_path = resolved.path
    if final_path.exists():
        return hit_report(resolved, final_path)
    engine_name, engine_size, max_abs_diff = resolve_engine(resolved, engine)
    ensure_cache_dir(final_path.parent)
    with build_lock(final_path, wait=wait, on_wait=lambda pid: progress.message(
        f"another build of this cache is running (pid {pid}); waiting for it to finish"
    )):
        if final_path.exists():
            return hit_report(resolved, final_path)
        folder = shard_folder(final_path)
        folder.mkdir(exist_ok=True)
        specs = plan_shards(resolved.source, shard_size)
        clean_orphans(folder, specs)
        rows = {s.id: row for s in specs if (row := complete_shard_row(folder, s, resolved.fingerprint))}
        todo = [s for s in specs if s.id not in rows]
        if rows:
            progress.message(f"{len(rows)} of {len(specs)} shards are complete from an earlier run; skipping them")
        started = time.perf_counter()
        startup, workers, written = 0.0, 0, []
        if todo:
            startup, stop_ray = start_ray(ray, address)
            try:
                workers = pool_size(ray, len(todo))
                written = run_shards(ray, resolved, todo, folder, engine_name, batch_size, workers, retries,
                                     inject_failures or {}, progress)
            finally:
                stop_ray()
        failed = [r for r in written if r["error"]]
        rows.update({r["shard"]: r for r in written if not r["error"]})
        if failed:
            raise shard_failure(failed[0], specs, len(rows), folder)
        joining = time.perf_counter()
        check_manifest(folder, specs, rows, resolved)
        seconds = time.perf_counter() - started
        build_info = {
            "engine": engine_name, "engine_max_abs_diff": max_abs_diff, "batch_size": batch_size or engine_size,
            "weights": resolved.weights.spec, "machine": os.uname().machine, "executor": "ray",
            "shard_size": shard_size, "shards": len(specs), **resolved.locations(),
        }
        path = join_shards(resolved, specs, folder, library_versions(), build_info,
                           {name: seconds for name in resolved.source.splits})
        join_seconds = time.perf_counter() - joining
    processed = {name: (sum(s.hi - s.lo for s in todo if s.split == name), seconds) for name in resolved.source.splits}
    with Cache(path) as cache:
        reports = split_reports(cache.file, processed)
    return RayBuildReport(path, resolved.fingerprint, False, bool(rows) and len(todo) < len(specs), reports,
                          engine_name, path.stat().st_size, resolved.config, n_shards=len(specs),
                          n_reused=len(specs) - len(todo), ray_startup_seconds=startup, join_seconds=join_seconds,
                          workers=workers, shard_rows=written)


_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9._\[\]:-]+:\d{1,5}")


def check_ray_address(address) -> None:
    if address is None or address == "auto":
        return
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise BottlecacheError(f"The 'ray_address' option must be auto, HOST:PORT or ray://HOST:PORT. Got {address!r} "
                               "instead.")
    port = int(address.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise BottlecacheError(f"The 'ray_address' option's port must be 1 to 65535. Got {port} in {address!r}.")


CONNECT_SECONDS = 10.0  # Ray retries an address that does not answer for minutes, deaf to Ctrl-C


def check_ray_answers(address: str | None) -> None:
    """A cluster at ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a connection within
    ``CONNECT_SECONDS``, else one line: Ray itself would retry for minutes without a word."""
    if address is None or address == "auto":
        return
    import socket

    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as error:
        raise BottlecacheError(f"No Ray cluster answers at {address} ({reason(error, 120) or 'no answer'} within "
                               f"{CONNECT_SECONDS:g} s); start one with `ray start --head`, or leave out "
                               "--ray-address.") from None


def resolve_engine(resolved: ResolvedCache, engine: str) -> tuple[str, int, float]:
    """Pick the engine once on the driver (``auto``: LiteRT if it passes the check against Keras),
    converting the LiteRT flatbuffer once, so that every actor runs the same engine."""

    base = load_backbone(resolved.weights, resolved.settings.image_size)
    chosen = make_engine(engine, base, resolved.weights, resolved.settings.image_size,
                         cache_dir=resolved.path.parent, probe=(resolved.source, next(iter(resolved.source.splits))),
                         int8=resolved.int8())
    return chosen.name, chosen.batch_size, float(getattr(chosen, "max_abs_diff", 0.0))


def start_ray(ray, address: str | None):
    """Connect to (or start) Ray; return the seconds it took and how to let go of it."""
    started = time.perf_counter()
    if ray.is_initialized():
        return 0.0, lambda: None
    options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                   configure_logging=True)
    try:
        if address is None:
            # a new one, even beside a cluster; its workers at normal priority (Ray nices them to 15 by
            # default, which on a machine shared with other work starves the actors)
            ray.init(address="local", num_cpus=usable_cores(), _system_config={"worker_niceness": 0}, **options)
        else:
            check_ray_answers(address)
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise BottlecacheError(f"Could not connect to Ray at {address or 'a new local Ray'} ({reason(error, 160)}); "
                               "start one with `ray start --head`, or leave out --ray-address.") from None
    quiet_ray()
    return time.perf_counter() - started, ray.shutdown


def quiet_ray() -> None:
    """No progress bars or INFO lines from Ray Data: the build shows its own progress."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def pool_size(ray, n_shards: int) -> int:
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(n_shards, math.floor(cpus / ACTOR_CPUS) if cpus >= 1 else 1))


def run_shards(ray, resolved, todo: list[ShardSpec], folder: Path, engine_name: str, batch_size, workers: int,
               retries: int, inject: dict[int, int], progress) -> list[dict]:
    """Hand the shards to a pool of ``workers`` actors; return their manifest rows as they finish."""
    quiet_ray()  # also when this process started Ray itself
    ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        bound_worker(settings=resolved.settings, fingerprint=resolved.fingerprint, folder=str(folder),
                     engine=engine_name, batch_size=batch_size, threads=ENGINE_THREADS, retries=retries, inject=inject),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=ACTOR_CPUS,  # Ray Data restarts a dead actor and retries its call (max_restarts -1 by default)
    )
    total = sum(s.hi - s.lo for s in todo)
    progress.start_split("shards", total, 0)
    rows = []
    try:
        for row in ds.iter_rows():
            row = {key: value.item() if hasattr(value, "item") else value for key, value in row.items()}
            rows.append(row)
            progress.advance("shards", int(row["hi"]) - int(row["lo"]))
    except Exception as error:  # a Ray error (an actor that could not start, a lost cluster)
        raise BottlecacheError(f"The Ray build stopped ({reason(error, 200)}); the finished shards in {folder} are "
                               "kept; run the same command again to redo the rest.") from None
    progress.end_split("shards")
    return rows


def shard_failure(row: dict, specs: list[ShardSpec], n_done: int, folder: Path) -> BottlecacheError:
    return BottlecacheError(
        f"shard {int(row['shard']):05d} ({row['split']} rows {row['lo']}-{int(row['hi']) - 1}) failed "
        f"{row['attempts']} times ({row['error']}); the {n_done} finished shards of {len(specs)} are kept in "
        f"{folder}; run the same command again to redo the rest."
    )


def bound_worker(**arguments):
    """``ShardWorker`` with its arguments bound into the class: Ray ships the class itself, and no
    constructor argument lies in the object store, where losing it would stop an actor's restart."""

    class BoundShardWorker(ShardWorker):
        def __init__(self):
            super().__init__(**arguments)

    return BoundShardWorker


class ShardWorker:
    """One Ray actor: loads the engine once, then writes one shard per call.

    The engine's threads are pinned (TensorFlow's before it starts, LiteRT's per interpreter) so
    that the features equal a single-process build's.
    """

    def __init__(self, settings: CacheSettings, fingerprint: str, folder: str, engine: str, batch_size,
                 threads: int, retries: int, inject: dict[int, int]):
        started = time.perf_counter()
        tf = import_tf()
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.resolved = settings.resolve()
        if self.resolved.fingerprint != fingerprint:
            raise BottlecacheError("this worker sees other data or weights than the driver (fingerprint "
                                   f"{self.resolved.fingerprint[:12]}, driver {fingerprint[:12]}); use a shared file system")
        size = self.resolved.settings.image_size
        int8 = self.resolved.int8()
        if int8 is not None:  # the driver converted and checked it (resolve_engine): load it as it is
            self.engine = checked_engine("litert", self.resolved.weights, size, cache_dir=self.resolved.path.parent,
                                         int8=int8, threads=threads)
            if self.engine is None:
                raise BottlecacheError("this worker does not see the int8 engine the driver converted; "
                                       "use a shared file system")
        else:  # LiteRT: the flatbuffer the driver converted and checked, without a base or a probe of our own
            self.engine = checked_engine(engine, self.resolved.weights, size, cache_dir=self.resolved.path.parent,
                                         threads=threads)
            if self.engine is None:  # Keras, or a check not recorded (an older LiteRT on this worker)
                base = load_backbone(self.resolved.weights, size)
                self.engine = make_engine(engine, base, self.resolved.weights, size, cache_dir=self.resolved.path.parent,
                                          probe=(self.resolved.source, next(iter(self.resolved.source.splits))),
                                          threads=threads)
        self.folder, self.batch_size, self.retries = Path(folder), batch_size, retries
        self.inject = {int(k): int(v) for k, v in inject.items()}
        self.versions = library_versions()
        # reported with this actor's first shard: what a worker pays once, apart from its steady rate
        self.startup_seconds: float | None = time.perf_counter() - started

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {}
        for i in range(len(batch["id"])):
            spec = ShardSpec(int(batch["id"][i]), str(batch["split"][i]), int(batch["lo"][i]), int(batch["hi"][i]))
            for key, value in self.run(spec).items():
                out.setdefault(key, []).append(value)
        return out

    def run(self, spec: ShardSpec) -> dict:
        started = time.perf_counter()
        startup, self.startup_seconds = self.startup_seconds, None
        worker = {"pid": os.getpid(), "worker_first": startup is not None, "worker_startup_seconds": startup or 0.0}
        attempts, error = 0, ""
        while attempts <= self.retries:
            attempts += 1
            try:
                if self.inject.get(spec.id, 0) >= attempts:
                    raise RuntimeError("injected fault")
                row = write_shard(self.resolved, spec, self.engine, self.batch_size, self.folder,
                                  versions=self.versions, progress=NullProgress())
                return {**row, **worker, "attempts": attempts, "error": "", "seconds": time.perf_counter() - started}
            except Exception as failure:  # noqa: BLE001 - reported in the row, the driver stops with it
                error = reason(failure, 200)
        return {"shard": spec.id, "split": spec.split, "lo": spec.lo, "hi": spec.hi, "rows": 0, "skipped": 0,
                "fingerprint": "", "keys_sha256": "", "bytes": 0, **worker, "attempts": attempts,
                "error": error, "seconds": time.perf_counter() - started}
