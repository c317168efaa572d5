"""The shape of the package's code: ``python -m benchmarks.code_shape [SRC]`` (default ``src``).

Prints the modules, the import edges between them (every import, including those inside
functions, as grimp finds them), the elementary import cycles, the imports that go up a floor
(docs/architecture.md), the longest functions and the widest public signatures outside ``cli``.
Run it on an older checkout's ``src`` to compare: a module of the flat layout before the floors
is given the floor its code went to (``FLAT_FLOORS``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FLOORS = ("core", "data", "models", "cache", "train", "serve", "cli", "__main__")  # bottom to top
# The flat layout (before the floors): where each module's code went. ``config`` held both
# option checks (core) and CacheSettings (cache); it is counted on the cache floor, as it imported it.
FLAT_FLOORS = {
    "errors": "core", "progress": "core", "_tf": "core", "fingerprint": "core", "files": "core", "records": "core",
    "backbones": "core", "data": "data", "content": "data", "augment": "data", "backbone": "models",
    "layers": "models", "engines": "models", "cut": "models", "config": "cache", "store": "cache", "chunks": "cache",
    "reuse": "cache", "shards": "cache", "ray_build": "cache", "build": "cache", "heads": "train", "finetune": "train",
    "views": "train", "sweep": "train", "predict": "serve", "export": "serve", "report": "serve",
    "embeddings": "serve", "cli": "cli", "__main__": "__main__",
}


def import_graph(src: Path) -> dict[str, set[str]]:
    import grimp

    sys.path.insert(0, str(src))
    graph = grimp.build_graph("bottlecache", include_external_packages=False, cache_dir=None)
    modules = set(graph.modules)
    return {m: set(graph.find_modules_directly_imported_by(m)) & modules for m in sorted(modules)}


def elementary_cycles(graph: dict[str, set[str]]) -> int:
    """Simple cycles, each counted once (from its smallest module)."""
    order = {m: i for i, m in enumerate(graph)}
    count = 0

    def walk(start, node, on_path):
        nonlocal count
        for nxt in graph[node]:
            if nxt == start:
                count += 1
            elif order[nxt] > order[start] and nxt not in on_path:
                on_path.add(nxt)
                walk(start, nxt, on_path)
                on_path.discard(nxt)

    for start in graph:
        walk(start, start, {start})
    return count


def floor(module: str, src: Path) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None
    name = parts[1] if (src / "bottlecache" / parts[1]).is_dir() or parts[1] == "__main__" else FLAT_FLOORS.get(parts[1])
    return FLOORS.index(name) if name in FLOORS else None


def functions(src: Path):
    for path in sorted((src / "bottlecache").rglob("*.py")):
        rel = path.relative_to(src / "bottlecache")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                n = len(names) - (names[:1] in (["self"], ["cls"])) + bool(a.vararg) + bool(a.kwarg)
                yield f"{rel}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1, n, (
                    "cli" not in rel.parts and not node.name.startswith("_"))


def main(argv=None) -> int:
    src = Path((argv or sys.argv[1:] or ["src"])[0]).resolve()
    graph = import_graph(src)
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if floor(a, src) is not None and floor(b, src) is not None and floor(b, src) > floor(a, src)]
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, "
          f"{elementary_cycles(graph)} elementary cycles, {len(upward)} upward imports")
    for a, b in upward:
        print(f"  up: {a} -> {b}")
    found = list(functions(src))
    print("longest functions (lines):", "; ".join(f"{name} {n}" for name, n, _, _ in
                                                  sorted(found, key=lambda f: -f[1])[:5]))
    widest = [f for f in sorted(found, key=lambda f: -f[2]) if f[3]][:5]
    print("most parameters (public, outside cli):", "; ".join(f"{name} {k}" for name, _, k, _ in widest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
