"""The package's floors (docs/architecture.md): the import-linter contracts hold, and they fail
when a module imports upward or two modules of one floor import each other; imports inside
functions are kept for heavy or optional dependencies; the public API is listed by ``dir``."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "bottlecache"
LIBRARY_FLOORS = ("core", "data", "models", "cache", "train", "serve")
# What a function may import late: heavy or optional dependencies, never a module of the package
# (except the one custom Keras layer, which imports Keras on import).
LATE_INTERNAL_ALLOWED = {"layers"}


def _lint(root: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    return subprocess.run([lint, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True)


def test_the_floors_hold():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.fixture
def copy_of_the_package(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "src" / "bottlecache", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, line, contract", [
    ("core/files.py", "from ..serve import predict", "Each floor imports only the floors below it"),
    ("serve/predictor.py", "from . import export", "No import cycle between the modules or packages of one floor"),
    ("models/engines.py", "from ..cache import store", "Each floor imports only the floors below it"),
])
def test_an_upward_import_or_a_cycle_breaks_a_contract(copy_of_the_package, module, line, contract):
    path = copy_of_the_package / "src" / "bottlecache" / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    done = _lint(copy_of_the_package)
    assert done.returncode != 0
    assert f"{contract} BROKEN" in done.stdout, done.stdout[-3000:]


def _late_internal_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.level > 0:
                    leaf = (inner.module or "").rsplit(".", 1)[-1]
                    names = {a.name for a in inner.names}
                    if leaf not in LATE_INTERNAL_ALLOWED and not names <= LATE_INTERNAL_ALLOWED:
                        found.append(f"{path.relative_to(PACKAGE)}:{inner.lineno} from {'.' * inner.level}"
                                     f"{inner.module or ''} import {', '.join(sorted(names))}")
    return found


def test_library_modules_import_the_package_at_the_top():
    late = [hit for floor in LIBRARY_FLOORS for path in sorted((PACKAGE / floor).glob("*.py"))
            for hit in _late_internal_imports(path)]
    assert not late, "imports of the package inside functions (move them to the top):\n" + "\n".join(late)


def test_dir_lists_the_public_api_without_importing_tensorflow():
    code = ("import sys, bottlecache; names = dir(bottlecache); "
            "missing = [n for n in bottlecache.__all__ if n not in names]; "
            "assert not missing, missing; assert 'tensorflow' not in sys.modules; print(len(bottlecache.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) >= 20


MAX_PARAMETERS = 10


def test_no_public_function_outside_the_cli_takes_more_than_ten_parameters():
    """Settings objects (``CacheSettings``, ``BuildOptions``, ``HeadSettings``, ``FinetuneSettings``,
    ``SweepSettings``, ``ExportSettings``) carry what defines a run, instead of parameter lists."""
    wide = []
    for floor in LIBRARY_FLOORS:
        for path in sorted((PACKAGE / floor).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                    a = node.args
                    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                    n = len(names) - (names[:1] in (["self"], ["cls"])) + bool(a.vararg) + bool(a.kwarg)
                    if n > MAX_PARAMETERS:
                        wide.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} parameters")
    assert not wide, "\n".join(wide)


def test_keywords_override_a_settings_object_and_unknown_ones_are_refused():
    from bottlecache import BuildOptions, CacheSettings, HeadSettings
    from bottlecache.core.options import settings_with

    base = CacheSettings("photos", image_size=128, cache_dir="somewhere")
    settings, options = settings_with("build_cache", {CacheSettings: base, BuildOptions: None},
                                      {"image_size": 224, "engine": "keras", "seed": 3}, aliases={"seed": "view_seed"})
    assert (settings.data, settings.image_size, settings.view_seed, base.image_size) == ("photos", 224, 3, 128)
    assert options == BuildOptions(engine="keras")
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_sise'"):
        settings_with("build_cache", {CacheSettings: base}, {"image_sise": 224})
    with pytest.raises(TypeError, match="takes a HeadSettings"):
        settings_with("train_head", {HeadSettings: base}, {})
    from bottlecache.core.errors import BottlecacheError

    with pytest.raises(BottlecacheError, match="'epochs' option"):  # the override is checked like any value
        settings_with("train_head", {HeadSettings: HeadSettings()}, {"epochs": 0})
