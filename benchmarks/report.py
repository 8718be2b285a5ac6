"""Results files: JSON with the environment, a markdown table and a PNG plot, one set per device.

Rows merge by what they measure (KEYS): a row measured again replaces the old one, other rows are kept, so
that the stages of one GPU check, each its own process, add up to one file. Speedups and the per-case winner
are computed from the merged rows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .timing import UNSTABLE_SPREAD_PCT


def slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


# The fields that say what a row measured, per suite.
KEYS = {
    "ops": ("name", "mode", "shape", "dtype", "layout", "backend"),
    "train": ("name", "config", "batch"),
    "sample": ("name", "backend", "batch"),
}
EAGER, COMPILE = "original", "compile"  # the baselines of the op and sample suites


def row_key(row: dict) -> tuple:
    values = [row.get("layout", "contiguous") if k == "layout" else row.get(k) for k in KEYS[row["suite"]]]
    return (row["suite"], *(tuple(v) if isinstance(v, list) else v for v in values))


def merge(previous: list[dict], rows: list[dict]) -> list[dict]:
    """previous rows not measured again, then the new rows."""
    measured = {row_key(row) for row in rows}
    return [row for row in previous if row_key(row) not in measured] + rows


def _case_key(row: dict) -> tuple:
    """A row's case: its key without the backend."""
    return row_key(row)[:-1] if row["suite"] == "ops" else row_key(row)[:2] + row_key(row)[3:]


def add_speedups(rows: list[dict]) -> None:
    """Each op and sample row's speedup over the eager original (and op rows' over compile) of the same case."""
    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["suite"] in ("ops", "sample") and row.get("backend") in (EAGER, COMPILE) and "median_ms" in row:
            baselines.setdefault(_case_key(row), {})[row["backend"]] = row["median_ms"]
    for row in rows:
        if row["suite"] not in ("ops", "sample") or "median_ms" not in row:
            continue
        found = baselines.get(_case_key(row), {})
        row["speedup_vs_eager"] = found.get(EAGER, math.nan) / row["median_ms"]
        if row["suite"] == "ops":
            row["speedup_vs_compile"] = found.get(COMPILE, math.nan) / row["median_ms"]


def winners(rows: list[dict]) -> list[dict]:
    """Per (op, layout, dtype): the kernel backends' geometric-mean time over the cases all of them measured,
    the fastest, and what ``auto`` picks."""
    groups: dict[tuple, dict[tuple, dict[str, float]]] = {}
    auto: dict[tuple, str] = {}
    for row in rows:
        if row["suite"] != "ops" or row["backend"] in (EAGER, COMPILE):
            continue
        group = (row["name"], row.get("layout", "contiguous"), row["dtype"])
        if "auto" in row:
            auto[group] = row["auto"]
        if "median_ms" in row:
            case = (tuple(row["shape"]), row["mode"])
            groups.setdefault(group, {}).setdefault(case, {})[row["backend"]] = row["median_ms"]
    found = []
    for group, by_case in groups.items():
        backends = sorted({b for times in by_case.values() for b in times})
        common = [times for times in by_case.values() if len(times) == len(backends)]
        if not common:
            continue
        means = {b: math.exp(sum(math.log(t[b]) for t in common) / len(common)) for b in backends}
        best = min(means, key=means.get)
        found.append(
            {
                "name": group[0],
                "layout": group[1],
                "dtype": group[2],
                "cases": len(common),
                "geomean_ms": means,
                "winner": best,
                "auto": auto.get(group),
            }
        )
    return found


def add_bandwidth(rows: list[dict], bandwidth_gbps: float) -> None:
    """Achieved GB/s of each op row and its share of the device's measured bandwidth."""
    for row in rows:
        if "bytes" in row and row.get("median_ms"):
            row["gbps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
            row["pct_bandwidth"] = 100.0 * row["gbps"] / bandwidth_gbps


def _fmt(value: object) -> str:
    if value is None:  # not measured on this device (peak memory on a CPU) or not counted (batch sweeps)
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return "×".join(str(v) for v in value)
    return str(value)


def _note(row: dict) -> str:
    """What a reader must know before trusting a row: its error, or that its timing was unstable."""
    parts = [row[key] for key in ("error", "note") if row.get(key)]
    if row.get("unstable"):
        parts.append(f"unstable: IQR {row['spread_pct']:.0f}% of the median")
    return "; ".join(parts)


def _cell(row: dict, column: str) -> str:
    if column == "note":
        return _note(row)
    if column == "median_ms" and row.get("unstable"):  # flagged, not printed as a fact
        return f"({_fmt(row['median_ms'])})"
    return _fmt(row.get(column, ""))


COLUMNS = {
    "ops": [
        "name",
        "mode",
        "shape",
        "dtype",
        "layout",
        "backend",
        "median_ms",
        "min_ms",
        "spread_pct",
        "gbps",
        "pct_bandwidth",
        "speedup_vs_eager",
        "speedup_vs_compile",
        "saved_bytes",
        "note",
    ],
    "train": [
        "name",
        "config",
        "batch",
        "dtype",
        "median_ms",
        "min_ms",
        "spread_pct",
        "images_per_s",
        "peak_mem_bytes",
        "saved_bytes",
        "tflops",
        "mfu",
        "speedup_vs_baseline",
        "note",
    ],
    "sample": [
        "name",
        "backend",
        "batch",
        "dtype",
        "median_ms",
        "min_ms",
        "spread_pct",
        "images_per_s",
        "speedup_vs_eager",
        "note",
    ],
}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"commit {env['commit']} · {env['date']}",
        f"Measured bandwidth {results['bandwidth_gbps']:.1f} GB/s (device-to-device copy: pct_bandwidth is of this); "
        f"matmul peak {results['peak_tflops']:.1f} TFLOP/s. Times in ms: median, min, spread_pct = interquartile "
        f"range / median; a median in parentheses had a spread over {UNSTABLE_SPREAD_PCT:.0f}% (unstable).",
        "",
    ]
    for suite, columns in COLUMNS.items():
        rows = [row for row in results["rows"] if row["suite"] == suite]
        if not rows:
            continue
        lines += [f"### {suite}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(row, column) for column in columns) + " |" for row in rows]
        lines.append("")
    found = winners(results["rows"])
    if found:
        lines += [
            "### fastest kernel backend per case (geometric mean over the shapes and modes all of them ran)",
            "",
            "| op | layout | dtype | cases | backends (ms) | fastest | auto picks |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for w in found:
            times = ", ".join(f"{b} {_fmt(ms)}" for b, ms in w["geomean_ms"].items())
            if w["auto"] is None or w["auto"] == w["winner"]:
                agree = _fmt(w["auto"])
            else:
                agree = f"{w['auto']} (not the fastest)"
            lines.append(
                f"| {w['name']} | {w['layout']} | {w['dtype']} | {w['cases']} | {times} | {w['winner']} | {agree} |"
            )
        lines.append("")
    return "\n".join(lines)


# What each suite's panel plots: its speedup column, the rows' label, and which rows are the baseline itself.
PANELS = {
    "ops": ("speedup_vs_eager", "{name} {mode} {shape} {dtype} [{backend}]", "backend", "original"),
    "train": ("speedup_vs_baseline", "{name} batch {batch} [{config}]", "config", "baseline"),
    "sample": ("speedup_vs_eager", "{name} batch {batch} [{backend}]", "backend", "original"),
}


def _panel_rows(results: dict, suite: str) -> list[dict]:
    column, _, key, baseline = PANELS[suite]
    rows = [r for r in results["rows"] if r["suite"] == suite and r.get(key) != baseline and not r.get("sweep")]
    return [r for r in rows if not math.isnan(r.get(column, math.nan)) and not r.get("unstable")]


def plot(results: dict, path: Path) -> None:
    """One panel per suite: the speedup of every row over its suite's baseline (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(suite, _panel_rows(results, suite)) for suite in PANELS]
    panels = [(suite, rows) for suite, rows in panels if rows]
    if not panels:
        return
    heights = [len(rows) + 2 for _, rows in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 0.25 * sum(heights) + 1), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (suite, rows) in zip(axes[:, 0], panels, strict=True):
        column, label, _, baseline = PANELS[suite]
        labels = [label.format(**{k: _fmt(v) for k, v in r.items()}) for r in rows]
        compiled = ["compile" in str(r.get("backend", r.get("config"))) for r in rows]  # torch.compile bars differ
        ax.barh(
            range(len(rows)), [r[column] for r in rows], color=["tab:orange" if c else "tab:blue" for c in compiled]
        )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{suite}: speedup over {baseline} (×)", fontsize=8)
    axes[0, 0].set_title(results["environment"]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> Path:
    """Write <device>.json, <device>.md and <device>.png under out_dir, merged with the rows already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(results["environment"]["device"])
    json_path = out_dir / f"{stem}.json"
    if json_path.exists():
        results["rows"] = merge(json.loads(json_path.read_text()).get("rows", []), results["rows"])
    add_speedups(results["rows"])
    results["winners"] = winners(results["rows"])
    json_path.write_text(json.dumps(results, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(results))
    try:
        plot(results, out_dir / f"{stem}.png")
    except ImportError as error:  # matplotlib missing (a GPU image without network): JSON and table still written
        print(f"no plot written: {error}")
    return json_path
