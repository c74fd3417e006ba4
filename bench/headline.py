"""The README's headline tables, ours beside the paper's, from the committed results files.

    python bench/headline.py                       # reads bench/results, prints markdown
    python bench/headline.py --results bench/results

One table per benchmark: DMC on the paper's modified task (floor-free grayscale) from
table1_cpu.csv, DMC RGB + floor (the unmodified benchmark, which the paper did not measure) from
table1_standard_cpu.csv, and Atari from table2_cpu.csv. Every ratio compares two buffers holding the
same frames, except the paper's Total Comp on DMC, which compares grayscale floor-free buffers with
upstream's RGB + floor one and is labeled so.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.table2 import PAPER as PAPER_TABLE2  # noqa: E402  (the paper's Table II)

# The paper's Table I: FPS base, FPS ours, GB base, GB ours, Total Comp
PAPER_TABLE1 = {
    "Half": {"walker_walk": (119, 142, 63.5, 7.1, 8.9), "quadruped_walk": (184, 243, 63.6, 7.1, 9.0),
             "AVG": (152, 193, 63.6, 7.1, 9.0)},
    "Full": {"walker_walk": (119, 73, 63.5, 3.8, 16.7), "quadruped_walk": (184, 135, 63.6, 4.1, 15.5),
             "AVG": (152, 104, 63.6, 4.0, 15.9)},
}
TASK_LABEL = {"walker_walk": "walker_walk", "quadruped_walk": "quadruped_walk", "AVG": "**AVG**"}


def read_csv(path: pathlib.Path) -> list[dict]:
    """Rows of a results CSV; ValueError naming the file if it has none."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def dmc_gray(rows: list[dict]) -> str:
    """Table I on floor-free grayscale frames: GB, compression against `half` and against upstream's base."""
    half = {row["env"]: float(row["gb_ours"]) for row in rows if row["comp_type"] == "Half"}
    lines = ["| mode | task | GB at 1M steps: ours / paper | vs `half` (same frames): ours / paper "
             "| vs upstream's RGB + floor (paper's Total Comp): ours / paper | FPS / base: ours / paper |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        mode, task = row["comp_type"], row["env"]
        p_fps_base, p_fps, _, p_gb, p_comp = PAPER_TABLE1[mode][task]
        ours_gb = float(row["gb_ours"])
        paper_half = PAPER_TABLE1["Half"][task][3]
        against_half = "–" if mode == "Half" else f"{half[task] / ours_gb:.1f}× / {paper_half / p_gb:.1f}×"
        lines.append(f"| {mode} | {TASK_LABEL.get(task, task)} | {ours_gb:.1f} / {p_gb:.1f} | {against_half} "
                     f"| {float(row['total_comp']):.1f}× / {p_comp:.1f}× "
                     f"| {float(row['fps_ours']) / float(row['fps_base']):.2f} / {p_fps / p_fps_base:.2f} |")
    return "\n".join(lines)


def dmc_standard(rows: list[dict]) -> str:
    """Table I on RGB + floor, the frames upstream stores: GB and compression against `none`."""
    lines = ["| mode | task | GB at 1M steps | vs `none` (same frames) | FPS / `none` |", "|---|---|---:|---:|---:|"]
    for row in rows:
        fps = float(row["fps_ours"]) / float(row["fps_base"])
        lines.append(f"| {row['comp_type']} | {TASK_LABEL.get(row['env'], row['env'])} | {float(row['gb_ours']):.1f} "
                     f"| {float(row['total_comp']):.1f}× | {fps:.2f} |")
    return "\n".join(lines)


def atari(rows: list[dict]) -> str:
    """Table II's averages and per-game ranges: MB, compression against the paper's base, FPS against SB3's buffer."""
    algo_key = {"PPO": "ppo", "QR-DQN": "qrdqn"}
    lines = ["| algorithm | MB (mean of 10 games): ours / paper | vs base, mean: ours / paper "
             "| vs base, range over games: ours / paper | FPS / with SB3's buffer: ours / paper |",
             "|---|---:|---:|---:|---:|"]
    for label, key in algo_key.items():
        games = [row for row in rows if row["alg"] == label and row["env"] != "AVG"]
        avg = next(row for row in rows if row["alg"] == label and row["env"] == "AVG")
        paper = PAPER_TABLE2[key]
        ours = [float(row["total_comp"]) for row in games]
        theirs = [values[4] for game, values in paper.items() if game != "AVG"]
        lines.append(f"| {label} | {float(avg['mb_ours']):.1f} / {paper['AVG'][3]:g} "
                     f"| {float(avg['total_comp']):.1f}× / {paper['AVG'][4]:.1f}× "
                     f"| {min(ours):.1f}–{max(ours):.1f}× / {min(theirs):.1f}–{max(theirs):.1f}× "
                     f"| {float(avg['fps_ratio']):.2f} / {paper['AVG'][1] / paper['AVG'][0]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    print("DMC, floor-free grayscale (the paper's modified task)\n")
    print(dmc_gray(read_csv(args.results / "table1_cpu.csv")))
    print("\nDMC, RGB + floor (the unmodified benchmark; the paper has no figures for it)\n")
    print(dmc_standard(read_csv(args.results / "table1_standard_cpu.csv")))
    print("\nAtari\n")
    print(atari(read_csv(args.results / "table2_cpu.csv")))


if __name__ == "__main__":
    main()
