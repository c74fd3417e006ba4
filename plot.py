"""Figure 3 of the paper: eval return vs frames per task, mean ± std over seeds for each compression mode.

    python plot.py exp/2026.11.21/120000_exp [more dirs] [--out fig3.png]
    python plot.py exp/... --table results/table1.csv   # also writes fig3_table1.png (Table I as bars)

Every eval.csv below the given dirs is one run; its task, compression mode and seed come from the run's
config.yaml (written by train.py) or .hydra/config.yaml. Seeds of one (task, mode) are averaged on the
union of their eval frames, each seed linearly interpolated there, restricted to the frame range that
every seed covers: seeds logging at the same frames are averaged exactly, and a seed that stopped early
cuts the curve where it stopped. The shaded band is ± one (population) standard deviation over seeds.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

# Colours of the paper's Figure 3: none black, Half light blue, Full dark blue. Half is drawn wider
# because lossless compression can make it coincide with Full, which is then drawn on top of it.
MODES = {'none': ('black', 'None'), 'half': ('#6baed6', 'Half'), 'full': ('#08306b', 'Full')}
LINE_WIDTHS = {'half': 3.5}


@dataclass(frozen=True)
class Run:
    """Eval curve of one training run."""

    task: str
    mode: str
    seed: int
    frames: np.ndarray
    rewards: np.ndarray


def read_run(eval_csv: Path) -> Optional[Run]:
    """The run whose eval.csv this is; None if it logged no evaluation yet."""
    run_dir = eval_csv.parent
    config = next((p for p in (run_dir / 'config.yaml', run_dir / '.hydra' / 'config.yaml') if p.is_file()), None)
    if config is None:
        raise FileNotFoundError(f'{run_dir}: eval.csv without config.yaml or .hydra/config.yaml')
    cfg = OmegaConf.load(config)
    with eval_csv.open(newline='') as f:
        reader = csv.DictReader(f)
        missing = {'frame', 'episode_reward'} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f'{eval_csv} lacks column(s) {", ".join(sorted(missing))}')
        rows = sorted((float(r['frame']), float(r['episode_reward'])) for r in reader)
    if not rows:
        return None
    frames, rewards = np.array(rows).T
    return Run(str(cfg.task.name), str(cfg.compression.mode), int(cfg.seed), frames, rewards)


def find_runs(dirs: Sequence[Path]) -> list[Run]:
    """Every run with at least one evaluation below dirs."""
    paths = sorted(p for d in dirs for p in Path(d).rglob('eval.csv'))
    if not paths:
        raise FileNotFoundError(f'no eval.csv found below {", ".join(str(d) for d in dirs)}')
    runs = []
    for path in paths:
        run = read_run(path)
        if run is None:
            print(f'skipped {path}: no rows yet', file=sys.stderr)
        else:
            runs.append(run)
    if not runs:
        raise ValueError(f'every eval.csv below {", ".join(str(d) for d in dirs)} is empty')
    return runs


def mean_std(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames, mean and std over runs, on the union of their eval frames within the range all cover."""
    low, high = max(r.frames[0] for r in runs), min(r.frames[-1] for r in runs)
    grid = np.unique(np.concatenate([r.frames for r in runs]))
    grid = grid[(grid >= low) & (grid <= high)]
    values = np.stack([np.interp(grid, r.frames, r.rewards) for r in runs])
    return grid, values.mean(axis=0), values.std(axis=0)


def plot_curves(runs: Sequence[Run], out: Path) -> Path:
    """One panel per task, one mean ± std curve per compression mode; writes a PNG."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.task, run.mode].append(run)
    tasks = sorted({run.task for run in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        modes = [m for m in MODES if (task, m) in groups]
        modes += sorted(m for t, m in groups if t == task and m not in MODES)
        for mode in modes:
            color, label = MODES.get(mode, ('grey', mode))
            seeds = groups[task, mode]
            frames, mean, std = mean_std(seeds)
            # Markers keep short curves (a handful of evals) readable.
            ax.plot(frames, mean, color=color, label=f'{label} (n={len(seeds)})',
                    linewidth=LINE_WIDTHS.get(mode, 1.5), marker='.' if len(frames) < 20 else None)
            ax.fill_between(frames, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax.set_title(task.replace('_', ' ').title())
        ax.set_xlabel('Frames')
        ax.set_ylabel('Episode Return')
        ax.grid(alpha=0.3)
        ax.legend(loc='upper left', fontsize='small')
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _number(text: str) -> float:
    # bench/table1.py leaves a cell empty where a run is missing.
    return float(text) if text else np.nan


def plot_table(table_csv: Path, out: Path) -> Path:
    """Table I as grouped bars: replay GB of base, Half and Full per env, labelled with Total Comp."""
    with table_csv.open(newline='') as f:
        reader = csv.DictReader(f)
        missing = {'comp_type', 'env', 'gb_base', 'gb_ours', 'total_comp'} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f'{table_csv} lacks column(s) {", ".join(sorted(missing))}; '
                             f'expected the CSV of bench/table1.py')
        rows = list(reader)
    envs = list(dict.fromkeys(r['env'] for r in rows))
    comp_types = list(dict.fromkeys(r['comp_type'] for r in rows))
    bars = {'Base': {r['env']: _number(r['gb_base']) for r in rows}}
    for comp in comp_types:
        bars[comp] = {r['env']: _number(r['gb_ours']) for r in rows if r['comp_type'] == comp}
    comps = {(r['comp_type'], r['env']): _number(r['total_comp']) for r in rows}
    colors = {'Base': MODES['none'][0], 'Half': MODES['half'][0], 'Full': MODES['full'][0]}

    fig, ax = plt.subplots(figsize=(1.8 * len(envs) + 2, 3.5))
    width = 0.8 / len(bars)
    x = np.arange(len(envs))
    for i, (name, values) in enumerate(bars.items()):
        heights = [values.get(env, np.nan) for env in envs]
        rects = ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, label=name,
                       color=colors.get(name, 'grey'))
        if name != 'Base':
            labels = [comps.get((name, env), np.nan) for env in envs]
            ax.bar_label(rects, ['' if np.isnan(c) else f'{c:.1f}×' for c in labels], fontsize='small')
    ax.set_xticks(x, envs)
    ax.set_ylabel('Replay buffer (GB)')
    ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the command line and write the figure(s)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dirs', nargs='+', type=Path, help='multirun or run dirs to search for eval.csv')
    p.add_argument('--table', type=Path, help="bench/table1.py's CSV, drawn as bars into OUT_table1.png")
    p.add_argument('--out', type=Path, default=Path('fig3.png'))
    args = p.parse_args(argv)
    try:
        print(f'wrote {plot_curves(find_runs(args.dirs), args.out)}')
        if args.table:
            print(f'wrote {plot_table(args.table, args.out.with_name(args.out.stem + "_table1.png"))}')
    except (OSError, ValueError) as e:
        sys.exit(f'plot.py: {e}')


if __name__ == '__main__':
    main()
