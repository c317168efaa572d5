"""From the cases' numbers to the files: the checks of the README's claims, the Markdown table,
the plot, and the JSON (a dated file plus a stable ``latest-<kind>`` copy)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

# (name, the claim, how its value is computed from the cases, comparison, threshold)
CLAIMS = (
    ("cached_sklearn_time_fraction",
     "cached-sklearn total seconds (build counted) / tutorial-frozen total seconds",
     lambda c: c["cached-sklearn"]["seconds"] / c["tutorial-frozen"]["seconds"], "<=", 0.2),
    ("cached_sklearn_accuracy_gap_points",
     "cached-sklearn minus tutorial-frozen validation accuracy, in points",
     lambda c: 100 * (c["cached-sklearn"]["accuracy"]["validation"] - c["tutorial-frozen"]["accuracy"]["validation"]),
     ">=", -1.0),
    ("cached_keras_epoch_speedup",
     "tutorial-frozen seconds per epoch / cached-keras head seconds per epoch (medians over the epochs)",
     lambda c: c["tutorial-frozen"]["seconds_per_epoch"] / c["cached-keras"]["seconds_per_epoch"], ">=", 50.0),
    ("litert_build_speedup",
     "cache-build-litert images/s / cache-build-keras images/s",
     lambda c: c["cache-build-litert"]["images_per_second"] / c["cache-build-keras"]["images_per_second"],
     ">=", 1.8),
    ("finetune_cached_epoch_speedup",
     "finetune seconds per epoch / finetune-cached seconds per epoch (medians over the epochs)",
     lambda c: c["finetune"]["seconds_per_epoch"] / c["finetune-cached"]["seconds_per_epoch"], ">=", 1.5),
    ("finetune_cached_accuracy_gap_points",
     "distance between the finetune-cached and finetune validation accuracies, in points",
     lambda c: 100 * abs(c["finetune-cached"]["accuracy"]["validation"] - c["finetune"]["accuracy"]["validation"]),
     "<=", 0.5),
    ("litert_build_vs_forward_limit",
     "cache-build-litert images/s / forward-limit-litert images/s",
     lambda c: c["cache-build-litert"]["images_per_second"] / c["forward-limit-litert"]["images_per_second"],
     ">=", 0.85),
    ("cache_build_vs_forward_plus_decode",
     "cache-build images/s / the bound forward-limit and decode-only allow together (same run)",
     lambda c: c["cache-build"]["bound_ratio"], ">=", 0.85),
    ("litert_sklearn_accuracy_gap_points",
     "distance between the sklearn validation accuracies on the litert- and keras-built caches, in points",
     lambda c: 100 * abs(c["cache-build-litert"]["sklearn_accuracy"]["validation"]
                         - c["cache-build-keras"]["sklearn_accuracy"]["validation"]), "<=", 0.3),
    ("int8_build_speedup",
     "cache-build-int8 images/s / cache-build-litert (float32) images/s",
     lambda c: c["cache-build-int8"]["images_per_second"] / c["cache-build-litert"]["images_per_second"], ">=", 1.5),
    *((f"int8_{kind}_accuracy_drop_points",
       f"int8-heads: {kind} head's validation accuracy on the float32 cache minus on the int8 cache, in points",
       lambda c, k=kind: -c["int8-heads"][f"{k}_gap_points"], "<=", 0.3) for kind in ("sklearn", "keras")),
    ("audit_seconds",
     "audit: seconds of `cache audit` on the run's cache (built)",
     lambda c: c["audit"]["seconds"], "<=", 30.0),
    ("audit_flipped_in_first_60",
     "audit: of 40 train labels flipped (20 each way), how many are among the first 60 label issues",
     lambda c: c["audit"]["flipped_in_top"] if c["audit"]["flipped"] == 40 else None, ">=", 36),
    ("audit_exclusion_accuracy_gap_points",
     "audit: sklearn validation accuracy on the clean photos minus on the flipped copy without the issues, in points",
     lambda c: c["audit"]["exclusion_gap_points"], "<=", 0.3),
    ("cache_update_add_fraction",
     "cache-update: seconds to add 30 photos / seconds of a full build of the folder",
     lambda c: c["cache-update"]["added"]["fraction_of_full"], "<=", 0.10),
    ("cache_update_remove_fraction",
     "cache-update: seconds to remove 30 photos / seconds of a full build of the folder",
     lambda c: c["cache-update"]["removed"]["fraction_of_full"], "<=", 0.05),
    ("cache_update_copy_computed",
     "cache-update: photos computed after a cp -r of the whole folder",
     lambda c: c["cache-update"]["copied"]["computed"], "<=", 0),
    ("cache_update_equal_to_clean",
     "cache-update: results (add, remove, cp -r) equal array for array to a clean build",
     lambda c: sum(c["cache-update"][k]["equal_to_clean_build"] for k in ("added", "removed", "copied")), ">=", 3),
    ("duplicates_approximate_same_pairs",
     "duplicates: the approximate search found exactly the exact search's pairs (run's cache at 0.97 and 0.9, repeated cache)",
     lambda c: int(c["duplicates"]["same_pairs_everywhere"]), ">=", 1),
    ("ray_steady_fraction_of_local_core",
     "cache-build-ray: a worker's steady images/s (start-up apart) / the local build's images/s per core",
     lambda c: c["cache-build-ray"]["steady_ratio_to_local_per_core"], ">=", 0.85),
    *(("heads_at_scale_{0}_peak_growth_mib".format(kind),
       f"heads-at-scale: {kind} head's peak resident memory on the large cache minus on the small one, MiB",
       lambda c, k=kind: c["heads-at-scale"][f"{k}_peak_growth_mib"], "<=", 286.1) for kind in ("sklearn", "keras")),
    *(claim for quantize in ("int8", "dynamic", "float16") for claim in (
        (f"export_{quantize}_accuracy_drop_points",
         f"export-litert-{quantize} validation accuracy below the float model's (the source head), in points",
         lambda c, q=quantize: c[f"export-litert-{q}"]["drop_points"], "<=", 1.0),
        (f"export_{quantize}_size_fraction",
         f"export-litert-{quantize} size / export-litert (float32) size",
         lambda c, q=quantize: c[f"export-litert-{q}"]["size_bytes"] / c["export-litert"]["size_bytes"], "<=",
         0.55 if quantize == "float16" else 0.30),
    )),
)


def machine() -> dict:
    """CPU model, cores, memory and platform of this machine, and its load right now."""
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # not Linux: platform's answer stands
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": memory_gib,
            "platform": platform.platform(), "python": platform.python_version()}


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def checks(cases: dict) -> dict:
    """Each claim as ``{"value", "threshold", "pass"}``; ``None`` where its cases did not run."""
    out = {}
    for name, claim, compute, comparison, threshold in CLAIMS:
        try:
            value = compute(cases)
        except (KeyError, TypeError, ZeroDivisionError):  # a case missing, failed, or without that number
            value = None
        passed = None if value is None else (value <= threshold if comparison == "<=" else value >= threshold)
        out[name] = {"value": value, "threshold": threshold, "comparison": comparison, "pass": passed,
                     "claim": claim}
    return out


def rounded(value, digits: int = 4):
    """Floats rounded (for a readable file); everything else as is."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Markdown


def _number(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def summary_line(result: dict) -> str:
    m, c, v = result["machine"], result["config"], result["versions"]
    splits = ", ".join(f"{name} {s['n_examples']}" for name, s in c["splits"].items())
    return (
        f"{result['date'][:16].replace('T', ' ')} · {m['cpu']}, {m['cores']} cores, {m['platform']} · "
        f"data {c['data_name']} ({splits}) · image size {c['image_size']} · epochs {c['epochs']}, "
        f"fine-tune epochs {c['finetune_epochs']} · seed {c['seed']} · weights sha256 {c['weights_sha256'][:12]} · "
        f"TensorFlow {v.get('tensorflow', '?')}, Keras {v.get('keras', '?')}, LiteRT {v.get('ai-edge-litert', '–')} · "
        f"whole run {result['wall_seconds'] / 60:.1f} min, 1-minute load average {_load(result, 'start')} at the "
        f"start, {_load(result, 'end')} at the end (other work on the machine makes timings noisy)"
        + (f" · run with --load {c['background_load']} ({c['background_load']} busy processes beside the cases)"
           if c.get("background_load") else "")
    )


def _load(result: dict, when: str) -> str:
    load = (result.get("load_average") or {}).get(when)
    return "–" if not load else f"{load[0]:.2f}"


def cases_table(cases: dict) -> str:
    rows = ["| case | seconds | images/s | s/epoch (median) | epochs | validation acc. | test acc. | notes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, case in cases.items():
        acc = case.get("accuracy") or {}
        note = case.get("error") and f"**failed:** {case['error']}" or case.get("note", "")
        rows.append(
            f"| {name} | {_number(case.get('seconds'))} | {_number(case.get('images_per_second'))} | "
            f"{_number(case.get('seconds_per_epoch'), 2)} | {case.get('epochs', '–')} | "
            f"{_percent(acc.get('validation'))} | {_percent(acc.get('test'))} | {note.replace('|', '/')} |"
        )
    return "\n".join(rows)


# Augmented views and the cached cut (issue 12): (case, what it is compared with, the time compared)
CACHED_TRAINING = (
    ("finetune-cached", "finetune", "seconds_per_epoch"),
    ("finetune-cached-float32", "finetune", "seconds_per_epoch"),
    ("finetune-cached-float32", "finetune-cached", "seconds_per_epoch"),
    ("cached-keras-views", "tutorial-augmented", "seconds"),
    ("finetune-cached-views", "finetune-augment", "seconds_per_epoch"),
)
CACHED_TRAINING_HEADING = "### Augmented views and the cached cut"
LENT_TEST_NOTE = ("Where the data has no test split (cats_and_dogs_filtered), tutorial-augmented and cached-keras-views "
                  "lend part of validation as one, as *sweep* does (full run: validation `[:50%]`, test `[50%:]`, so "
                  "their validation figures are on half of the other rows' images; quick: validation `[:32]`, test "
                  "`[32:64]`)")


def _kib(value) -> str:
    return "–" if value is None else f"{value / 1024:.1f} KiB"


def _ran(cases: dict, *names: str) -> bool:
    return all(name in cases and "error" not in cases[name] for name in names)


def _side_by_side(case: dict, reference: dict, split: str) -> str:
    mine, theirs = (case.get("accuracy") or {}).get(split), (reference.get("accuracy") or {}).get(split)
    if mine is None and theirs is None:
        return "–"
    gap = f" ({100 * (mine - theirs):+.2f})" if mine is not None and theirs is not None else ""
    return f"{_percent(mine)} / {_percent(theirs)}{gap}"


def cached_training_table(cases: dict) -> str | None:
    """Each case of issue 12 against what it replaces, with the storage and the views' build cost;
    None when none of those pairs ran (older results)."""
    pairs = [(a, b, time) for a, b, time in CACHED_TRAINING if _ran(cases, a, b)]
    if not pairs:
        return None
    rows = ["| case | against | speed-up | validation acc. (case / against, points) | test acc. | stored per image |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, against, time in pairs:
        case, reference = cases[name], cases[against]
        speedup = (f"{reference[time] / case[time]:.2f}× {'s/epoch' if time == 'seconds_per_epoch' else 'total s'}"
                   if case.get(time) and reference.get(time) else "–")
        rows.append(f"| {name} | {against} | {speedup} | {_side_by_side(case, reference, 'validation')} | "
                    f"{_side_by_side(case, reference, 'test')} | {_stored(case)} |")
    lines = [CACHED_TRAINING_HEADING, "", "\n".join(rows), ""]
    views = cases.get("cached-keras-views") or {}
    if "views_build_seconds_per_image_per_view" in views:
        lines += [(f"Building K = {views['views']} views: the views cache took {views['build_seconds']:.1f} s in all; "
                   f"its train split {views['train_build_seconds']:.1f} s against "
                   f"{views['clean_train_build_seconds']:.1f} s for the clean build's ({views['train_build_ratio']:.1f}×), "
                   f"{1000 * views['views_build_seconds_per_image_per_view']:.1f} ms more per image per view."), ""]
    lines.append("*speed-up*: the time of *against* over the case's (s/epoch: medians over the epochs; total s: "
                 "builds counted). *stored per image*: bytes on disk of every split's rows over their images, and "
                 f"each augmented view's per train image. {LENT_TEST_NOTE}.")
    return "\n".join(lines)


def _stored(case: dict) -> str:
    parts = []
    if case.get("cut_bytes_per_image") is not None:
        parts.append(f"cut {case.get('dtype', '?')} {_kib(case['cut_bytes_per_image'])}")
    elif case.get("bytes_per_image") is not None:
        parts.append(f"bottleneck {_kib(case['bytes_per_image'])}")
    if case.get("view_bytes_per_image_per_view") is not None:
        parts.append(f"+ {_kib(case['view_bytes_per_image_per_view'])} per view × {case.get('views', '?')}")
    return " ".join(parts) or "–"


def cached_training_line(cases: dict) -> str | None:
    """The README's one line of the same figures; None when none of them ran."""
    parts = []
    for name, against, time in CACHED_TRAINING:
        if not _ran(cases, name, against) or (name, against) == ("finetune-cached-float32", "finetune"):
            continue
        case, reference = cases[name], cases[against]
        if not (case.get(time) and reference.get(time)):
            continue
        unit = "s/epoch" if time == "seconds_per_epoch" else "total s, build counted"
        tests = ""
        if (case["accuracy"].get("test") is not None) and (reference["accuracy"].get("test") is not None):
            tests = f", test {_percent(case['accuracy']['test'])} vs {_percent(reference['accuracy']['test'])}"
        parts.append(f"{name} {reference[time] / case[time]:.2f}× {against}'s {unit}, validation "
                     f"{_percent(case['accuracy']['validation'])} vs {_percent(reference['accuracy']['validation'])}"
                     f"{tests} ({_stored(case)})")
    views = cases.get("cached-keras-views") or {}
    if parts and "views_build_seconds_per_image_per_view" in views:
        parts.append(f"building K = {views['views']} views: the train split {views['train_build_ratio']:.1f}× the "
                     f"clean build's seconds ({1000 * views['views_build_seconds_per_image_per_view']:.1f} ms more "
                     "per image per view)")
    return "; ".join(parts) + "." if parts else None


def checks_table(result_checks: dict) -> str:
    rows = ["| claim | value | threshold | pass |", "| --- | ---: | ---: | :---: |"]
    for name, check in result_checks.items():
        verdict = {True: "yes", False: "**no**", None: "–"}[check["pass"]]
        rows.append(f"| {check['claim'].replace('|', '/')} | {_number(check['value'], 3)} | {check['comparison']} "
                    f"{check['threshold']:g} | {verdict} |")
    return "\n".join(rows)


def markdown(result: dict, heading: bool = True) -> str:
    kind = "quick" if result["config"]["quick"] else "full"
    parts = [f"## bottlecache benchmarks ({kind} run)\n"] if heading else []
    parts += [summary_line(result), "", cases_table(result["cases"]), "", checks_table(result["checks"])]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Plot (optional: matplotlib is not a dependency)


def plot(result: dict, path: Path) -> Path | None:
    """Seconds vs validation accuracy of the cases that train something; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None
    points = [(name, case["seconds"], case["accuracy"]["validation"]) for name, case in result["cases"].items()
              if (case.get("accuracy") or {}).get("validation") is not None]
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, seconds, acc in points:
        axes.scatter(seconds, 100 * acc, s=40)
        axes.annotate(name, (seconds, 100 * acc), textcoords="offset points", xytext=(6, 4), fontsize=9)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("wall seconds (log scale; cache builds counted)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(f"bottlecache: time vs accuracy ({result['date'][:16]}, {result['machine']['cpu']})", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# Files


def write(result: dict, out_dir: Path, stamp: str, kind: str, latest: bool) -> dict[str, Path]:
    """``<stamp>-<kind>.json`` / ``.md`` (/ ``.png``) in ``out_dir``; copies as ``latest-<kind>.*``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{stamp}-{kind}"
    n = 1
    while (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{stamp}-{kind}-{n}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    png = plot(result, out_dir / f"{stem}.png")
    if png:
        paths["png"] = png
    if latest:
        for suffix, path in list(paths.items()):
            target = out_dir / f"latest-{kind}.{suffix}"
            shutil.copyfile(path, target)
            paths[f"latest-{suffix}"] = target
    return paths
