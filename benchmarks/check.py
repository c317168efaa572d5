"""Is a result file well-formed? ``python -m benchmarks.check PATH [--require-pass]``.

``validate(path)`` returns the problems found (an empty list: the file is fine). It checks the
keys and types of the schema, that every case the run asked for is there without an error, and
that every check has a value, a threshold and a verdict. ``--require-pass`` also fails on a
claim that did not hold (off by default: a quick run's slice is too small to judge the claims).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from numbers import Real
from pathlib import Path

TOP = {"schema_version": int, "date": str, "wall_seconds": Real, "machine": dict, "versions": dict,
       "config": dict, "cases": dict, "checks": dict}
MACHINE = {"cpu": str, "cores": int, "platform": str}
CONFIG = {"data": str, "weights_sha256": str, "image_size": int, "epochs": int, "finetune_epochs": int,
          "seed": int, "quick": bool, "cases": list, "splits": dict}
OPTIONAL_CASE_NUMBERS = ("images_per_second", "seconds_per_epoch")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is(value, kind) -> bool:
    if kind is Real or kind is int:  # a bool is not a number here
        return isinstance(value, kind) and not isinstance(value, bool)
    return isinstance(value, kind)


def _keys(where: str, mapping: dict, schema: dict) -> list[str]:
    problems = []
    for key, kind in schema.items():
        if key not in mapping:
            problems.append(f"{where}: missing {key!r}")
        elif not _is(mapping[key], kind):
            problems.append(f"{where}.{key}: expected {kind.__name__}, got {type(mapping[key]).__name__}")
    return problems


def _fraction_or_none(value) -> bool:
    return value is None or (_is(value, Real) and 0.0 <= value <= 1.0)


def _case(name: str, case) -> list[str]:
    where = f"cases.{name}"
    if not isinstance(case, dict):
        return [f"{where}: expected an object"]
    if "error" in case:
        return [f"{where}: the case failed: {case['error']}"]
    problems = []
    if not (_is(case.get("seconds"), Real) and case["seconds"] >= 0):
        problems.append(f"{where}.seconds: expected a number >= 0, got {case.get('seconds')!r}")
    for key in OPTIONAL_CASE_NUMBERS:
        if key in case and not (_is(case[key], Real) and case[key] > 0):
            problems.append(f"{where}.{key}: expected a positive number, got {case[key]!r}")
    if "epochs" in case and not (_is(case["epochs"], int) and case["epochs"] > 0):
        problems.append(f"{where}.epochs: expected a positive integer, got {case['epochs']!r}")
    for key in ("accuracy", "accuracy_before", "sklearn_accuracy"):
        if key not in case:
            continue
        acc = case[key]
        if not isinstance(acc, dict) or set(acc) != {"validation", "test"}:
            problems.append(f"{where}.{key}: expected {{'validation': ..., 'test': ...}}, got {acc!r}")
        elif not all(_fraction_or_none(v) for v in acc.values()):
            problems.append(f"{where}.{key}: accuracies must be in [0, 1] or null, got {acc!r}")
    if "seconds_per_epoch" in case and "epochs" not in case:
        problems.append(f"{where}: has seconds_per_epoch but no epochs")
    return problems


def _check(name: str, check, require_pass: bool) -> list[str]:
    where = f"checks.{name}"
    if not isinstance(check, dict) or not {"value", "threshold", "pass"} <= set(check):
        return [f"{where}: expected an object with value, threshold and pass"]
    problems = []
    if not (check["value"] is None or _is(check["value"], Real)):
        problems.append(f"{where}.value: expected a number or null, got {check['value']!r}")
    if not _is(check["threshold"], Real):
        problems.append(f"{where}.threshold: expected a number, got {check['threshold']!r}")
    if check["pass"] not in (True, False, None):
        problems.append(f"{where}.pass: expected true, false or null, got {check['pass']!r}")
    if (check["value"] is None) != (check["pass"] is None):
        problems.append(f"{where}: value and pass must both be null or both be set")
    if require_pass and check["pass"] is not True:
        problems.append(f"{where}: the claim does not hold ({check.get('claim', name)}: {check['value']} "
                        f"{check.get('comparison', '?')} {check['threshold']} is false or not measured)")
    return problems


def validate(path, require_pass: bool = False) -> list[str]:
    """The problems of the result file at ``path``; an empty list if it is well-formed."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return [f"{path}: not a readable JSON file ({error})"]
    if not isinstance(result, dict):
        return [f"{path}: expected a JSON object at the top"]
    problems = _keys("result", result, TOP)
    if problems:
        return problems
    if not DATE.match(result["date"]):
        problems.append(f"result.date: expected an ISO date and time, got {result['date']!r}")
    problems += _keys("machine", result["machine"], MACHINE)
    problems += [f"versions.{k}: expected a string" for k, v in result["versions"].items() if not isinstance(v, str)]
    if "tensorflow" not in result["versions"]:
        problems.append("versions: missing 'tensorflow'")
    config = result["config"]
    problems += _keys("config", config, CONFIG)
    if isinstance(config.get("weights_sha256"), str) and not SHA256.match(config["weights_sha256"]):
        problems.append(f"config.weights_sha256: expected 64 hex digits, got {config['weights_sha256']!r}")
    asked = config.get("cases") if isinstance(config.get("cases"), list) else []
    problems += [f"cases: missing {name!r}, which the run asked for" for name in asked if name not in result["cases"]]
    for name, case in result["cases"].items():
        problems += _case(name, case)
    if not result["checks"]:
        problems.append("checks: empty")
    for name, check in result["checks"].items():
        problems += _check(name, check, require_pass)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="result JSON file(s)")
    parser.add_argument("--require-pass", action="store_true", help="also fail if a claim does not hold")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        problems = validate(path, args.require_pass)
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        status = status or (1 if problems else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
