"""Bytes per stored step against sample time, per benchmark, from the committed results files.

    python bench/frontier_plot.py                                  # bench/results -> docs/frontier.png
    python bench/frontier_plot.py --results bench/results --out /tmp/frontier.png

Three panels: DMC floor-free grayscale (the paper's modified task) and DMC RGB + floor, from
bench/buffer.py's output (`half`, `full` and every other `full` setting measured, per task), and
Atari, from bench/table2.py's buffer comparison (SB3's ReplayBuffer, `half`, `full` and
sb3-extra-buffers, means over the ten games). Sample times are ratios within one run: against `half`
on DMC, against SB3's ReplayBuffer on Atari. Sizes measured without a sample time (the references of
bench/buffer.py, upstream's base) and the paper's sizes are horizontal lines.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.headline import PAPER_TABLE1  # noqa: E402
from bench.table2 import CAPACITY, MIB, PAPER as PAPER_TABLE2  # noqa: E402

# Which results file each panel reads; a re-measured setting that lands in another file changes one line here.
GRAY = ("buffer_gray_cpu.txt", "gray")
RGB = ("buffer_cpu.txt", "rgb")
ATARI = "table2_buffers_cpu.csv"

_SECTION = re.compile(r"^(\w+), (\w+) \((\d+) steps\)")
_ROW = re.compile(r"^(\S.*?)\s+(\d+)\s+[\d.]+x\s+[\d.]+\s+[\d.]+\s+([\d.]+)")
_REFERENCE = re.compile(r"^  (.+): (\d+) B \(")
_BASE = re.compile(r"^base: (\d+) B per stored step")
MARKERS = {"walker_walk": "o", "quadruped_walk": "s", "cheetah_run": "^"}
COLORS = {"half": "tab:blue", "full": "tab:red", "sb3": "black", "sb3x": "tab:green"}


def parse_buffer(path: pathlib.Path, setting: str) -> dict:
    """bench/buffer.py's output for one setting: {'base': B/step, 'tasks': {task: {'rows', 'references'}}}."""
    base, tasks, current = None, {}, None
    for line in path.read_text().splitlines():
        if match := _BASE.match(line):
            base = int(match[1])
        elif match := _SECTION.match(line):
            current = tasks.setdefault(match[1], {"rows": {}, "references": {}}) if match[2] == setting else None
        elif line.startswith("sweep "):  # the format sweep: model sizes, not buffers
            current = None
        elif current is not None and (match := _ROW.match(line)):
            current["rows"][match[1]] = (int(match[2]), float(match[3]))
        elif current is not None and (match := _REFERENCE.match(line)):
            current["references"][match[1]] = int(match[2])
    if base is None or not tasks:
        raise ValueError(f"{path}: no '{setting}' section of bench/buffer.py output found")
    return {"base": base, "tasks": tasks}


def parse_atari(path: pathlib.Path) -> dict[str, tuple[float, float]]:
    """bench/table2.py's buffer CSV: {buffer: (mean B/step over games, mean sample time / SB3's)}."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    names = sorted({key.split(":")[0] for key in rows[0] if key.endswith(":bytes_per_step")})
    means = {}
    for name in names:
        sizes = [float(row[f"{name}:bytes_per_step"]) for row in rows]
        ratios = [float(row[f"{name}:sample_ms"]) / float(row["sb3:sample_ms"]) for row in rows]
        means[name] = (sum(sizes) / len(sizes), sum(ratios) / len(ratios))
    return means


def draw_dmc(ax, parsed: dict, title: str, paper: dict[str, float]) -> None:
    """One DMC panel: every measured configuration per task, references, the base and the paper's sizes as lines."""
    labeled = set()
    for task, data in parsed["tasks"].items():
        marker = MARKERS.get(task, "D")
        for config, (size, ratio) in data["rows"].items():
            main = config in ("half", "full")
            ax.scatter(ratio, size, marker=marker, s=50 if main else 18, color=COLORS[config.split()[0].rstrip(",")],
                       alpha=1.0 if main else 0.45, zorder=3)
            label = config.replace("full, ", "")
            key = (label, round(math.log10(size), 2))  # half's tasks differ by a few bytes: one label
            if (main or config == "full, byte runs only") and key not in labeled:
                labeled.add(key)
                ax.annotate(label, (ratio, size), textcoords="offset points", xytext=(5, 3), fontsize=7)
    first = next(iter(parsed["tasks"].values()))["references"]
    lines = {"none (upstream's base)": parsed["base"]}
    # References are per task; the line is their mean over the panel's tasks.
    for name in first:
        values = [t["references"][name] for t in parsed["tasks"].values() if name in t["references"]]
        lines[name] = sum(values) / len(values)
    draw_lines(ax, lines, paper)
    handles = [plt.Line2D([], [], marker=MARKERS.get(t, "D"), ls="", color="dimgray", label=t)
               for t in parsed["tasks"]]
    handles.append(plt.Line2D([], [], marker="o", ls="", ms=4, alpha=0.45, color=COLORS["full"],
                              label="full, one setting changed"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set(title=title, yscale="log", xlabel="sample time / half's (batch 256)", ylabel="bytes per stored step")
    set_x_scale(ax)


def draw_lines(ax, sizes: dict[str, float], paper: dict[str, float]) -> None:
    """Lines for sizes without a sample time, the paper's dashed; lines closer than 8% share one label."""
    groups: list[list[tuple[str, float]]] = []
    for name, size in sorted({**sizes, **paper}.items(), key=lambda item: item[1]):
        if groups and size < groups[-1][0][1] * 1.08:
            groups[-1].append((name, size))
        else:
            groups.append([(name, size)])
    for group in groups:
        for name, size in group:
            style = dict(color="tab:purple", ls="--") if name in paper else dict(color="gray", ls=":")
            ax.axhline(size, lw=0.8, **style)
        ax.text(1.0, group[0][1], " " + "; ".join(name for name, _ in group), transform=ax.get_yaxis_transform(),
                fontsize=6, va="center", ha="left")


def set_x_scale(ax) -> None:
    """Log x, with plain tick labels, where the ratios span a factor of 6 or more."""
    low, high = ax.get_xlim()
    if high / max(low, 1e-9) >= 6:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def draw_atari(ax, means: dict, paper_size: float) -> None:
    """The Atari panel: each buffer's means over the ten games, the paper's Full size as a line."""
    for i, (name, (size, ratio)) in enumerate(sorted(means.items(), key=lambda item: item[1][0])):
        color = COLORS["sb3x"] if name.startswith("sb3x") else COLORS.get(name, "gray")
        ax.scatter(ratio, size, s=40, color=color, zorder=3)
        label = "SB3 ReplayBuffer" if name == "sb3" else name
        # Neighbours by size alternate above and below their point, so close ones stay legible.
        ax.annotate(label, (ratio, size), textcoords="offset points", xytext=(5, 3 if i % 2 else -9), fontsize=7)
    draw_lines(ax, {}, {"paper's Full (QR-DQN mean)": paper_size})
    ax.set(title="Atari, QR-DQN replay (mean of 10 games)", yscale="log", xlabel="sample time / SB3's (batch 32)",
           ylabel="bytes per stored transition")
    set_x_scale(ax)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "frontier.png")
    args = parser.parse_args(argv)
    # The paper's Table I GB are 1e9 bytes at a 1M-step buffer, so GB x 1000 is bytes per step.
    paper_gray = {f"paper's {mode} (mean of 2 tasks)": PAPER_TABLE1[mode]["AVG"][3] * 1000 for mode in ("Half", "Full")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    draw_dmc(axes[0], parse_buffer(args.results / GRAY[0], GRAY[1]), "DMC, floor-free grayscale (paper's task)",
             paper_gray)
    draw_dmc(axes[1], parse_buffer(args.results / RGB[0], RGB[1]), "DMC, RGB + floor (standard)", {})
    # The paper's Table II MB are MiB at QR-DQN's 100k-transition buffer.
    paper_atari = PAPER_TABLE2["qrdqn"]["AVG"][3] * MIB / CAPACITY["qrdqn"]
    draw_atari(axes[2], parse_atari(args.results / ATARI), paper_atari)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
