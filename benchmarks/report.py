"""Results files: JSON with the environment, a markdown table and a PNG plot, one set per device."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


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


COLUMNS = {
    "ops": [
        "name",
        "mode",
        "shape",
        "dtype",
        "backend",
        "median_ms",
        "gbps",
        "pct_bandwidth",
        "speedup_vs_eager",
        "speedup_vs_compile",
        "saved_bytes",
    ],
    "train": [
        "name",
        "config",
        "batch",
        "dtype",
        "median_ms",
        "images_per_s",
        "peak_mem_bytes",
        "saved_bytes",
        "tflops",
        "mfu",
        "speedup_vs_baseline",
        "note",
    ],
    "sample": ["name", "backend", "batch", "dtype", "median_ms", "images_per_s", "speedup_vs_eager"],
}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"commit {env['commit']} · {env['date']}",
        f"Measured bandwidth {results['bandwidth_gbps']:.1f} GB/s; matmul peak {results['peak_tflops']:.1f} TFLOP/s.",
        "",
    ]
    for suite, columns in COLUMNS.items():
        rows = [row for row in results["rows"] if row["suite"] == suite]
        if not rows:
            continue
        lines += [f"### {suite}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_fmt(row.get(column, "")) for column in columns) + " |" for row in rows]
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
    return [r for r in rows if not math.isnan(r.get(column, float("nan")))]


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
    """Write <device>.json, <device>.md and <device>.png under out_dir, merging suites already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(results["environment"]["device"])
    json_path = out_dir / f"{stem}.json"
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        suites = {row["suite"] for row in results["rows"]}
        results["rows"] = [r for r in previous.get("rows", []) if r["suite"] not in suites] + results["rows"]
    json_path.write_text(json.dumps(results, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(results))
    try:
        plot(results, out_dir / f"{stem}.png")
    except ImportError as error:  # matplotlib is optional (the bench extra): the JSON and table are written
        print(f"no plot written: {error}")
    return json_path
