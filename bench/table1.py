"""Table I of the paper: DrQ-v2 training speed (FPS) and replay size (GB) without and with compression.

    python bench/table1.py                                  # walker_walk + quadruped_walk, 3000 frames each
    python bench/table1.py --tasks walker_walk --frames 2000
    python bench/table1.py --frames 100000 --batch-size 256 --torch-threads 0   # closer to the paper, on a GPU
    python bench/table1.py --standard                       # the unmodified benchmark: RGB + floor for all modes
    python bench/table1.py --dry-run                        # print the train.py commands only
    python bench/table1.py --no-train                       # rebuild the table from the runs already in --out

For each task and seed the three configurations (compression=none, half, full) run one after another,
each as its own `python train.py` process with identical overrides. By default half and full train
on the paper's floor-free grayscale frames; with --standard they train on the same RGB frames with
the checkerboard floor as the baseline, so the table shows what compression gains on the unmodified
benchmark. The table is built from each run's
train.csv and config.yaml only, so the arithmetic below is independent of how the runs were launched.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
MODES = ('none', 'half', 'full')
COMP_TYPES = {'half': 'Half', 'full': 'Full'}
EPISODE_FRAMES = 1000  # every DMC task ends after 1000 frames
# train.py writes an episode's train.csv row when the step after its last one starts, so a run must
# go a little past `--frames` for the episode ending there to be logged (one step at action_repeat <= 8).
LOG_SLACK_FRAMES = 8
REQUIRED_COLUMNS = ('frame', 'episode_length', 'fps', 'buffer_size', 'buffer_bytes')
TABLE_HEADER = ('Comp Type', 'Env', 'FPS (base)', 'FPS (ours)', 'GB (base)', 'GB (ours)', 'Total Comp')
CSV_FIELDS = ('comp_type', 'env', 'fps_base', 'fps_ours', 'gb_base', 'gb_ours', 'total_comp')


@dataclass(frozen=True)
class RunRecord:
    """What one training run contributes to the table."""

    task: str
    mode: str
    seed: int
    fps: float  # mean of the per-episode fps of the episodes after the seed frames
    measured_frames: int  # frames of those episodes
    seed_frames: int
    bytes_per_step: float
    bytes_source: str  # the train.csv column(s) bytes_per_step comes from
    stored_steps: int  # replay size when bytes_per_step was measured
    replay_buffer_size: int
    action_repeat: int
    batch_size: int
    device: str

    @property
    def gb(self) -> float:
        """Replay size extrapolated to replay_buffer_size stored steps."""
        return extrapolate_gb(self.bytes_per_step, self.replay_buffer_size)


@dataclass(frozen=True)
class TableRow:
    """One line of Table I; numbers are NaN where a run is missing."""

    comp_type: str
    env: str
    fps_base: float
    fps_ours: float
    gb_base: float
    gb_ours: float
    total_comp: float


def extrapolate_gb(bytes_per_step: float, replay_buffer_size: int) -> float:
    """Gigabytes (1e9 bytes) of a replay buffer holding replay_buffer_size steps."""
    return bytes_per_step * replay_buffer_size / 1e9


def total_comp(gb_base: float, gb_ours: float) -> float:
    """Compression factor of a replay buffer relative to the baseline's."""
    return gb_base / gb_ours if gb_ours > 0 else math.nan


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's composed config: train.py's resolved config.yaml, else Hydra's .hydra/config.yaml."""
    for path in (run_dir / 'config.yaml', run_dir / '.hydra' / 'config.yaml'):
        if path.is_file():
            return OmegaConf.load(path)
    raise FileNotFoundError(f'{run_dir}: neither config.yaml nor .hydra/config.yaml found')


def _number(row: dict, column: str, path: Path) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise ValueError(f'{path}: column {column!r} of the row at frame {row.get("frame")} '
                         f'is not a number: {row[column]!r}') from None


def read_train_csv(path: Path) -> tuple[list, list]:
    """Header and rows of a train.csv, checking the columns Table I needs."""
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: the run logged no finished episode '
                                f'(did it crash, or is num_train_frames below one episode?)')
    with path.open(newline='') as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f'{path} lacks column(s) {", ".join(missing)}; it has {", ".join(header) or "none"}')
    if not rows:
        raise ValueError(f'{path} has a header but no rows: the run finished no episode')
    return header, rows


def read_run(run_dir: Path) -> RunRecord:
    """Turn a run dir (train.csv + config) into a RunRecord."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / 'train.csv'
    header, rows = read_train_csv(path)
    seed_frames = int(cfg.num_seed_frames)

    # Only episodes that start after the seed frames include agent updates, and they do for every mode.
    measured = [r for r in rows
                if _number(r, 'frame', path) - _number(r, 'episode_length', path) >= seed_frames]
    if not measured:
        raise ValueError(f'{path}: no episode starts after the {seed_frames} seed frames; '
                         f'train for at least {seed_frames + EPISODE_FRAMES} frames')

    last = rows[-1]
    if 'buffer_bytes_per_step' in header and last['buffer_bytes_per_step'] != '':
        bytes_per_step = _number(last, 'buffer_bytes_per_step', path)
        source = 'buffer_bytes_per_step'
    elif cfg.compression.mode == 'none':
        # The disk replay's buffer_bytes counts stored episodes only, so it divides into bytes per step.
        bytes_per_step = _number(last, 'buffer_bytes', path) / max(_number(last, 'buffer_size', path), 1)
        source = 'buffer_bytes/buffer_size'
    else:
        # The in-RAM buffers' buffer_bytes include arrays preallocated for the whole capacity, so
        # buffer_bytes/buffer_size would be far off; the run still gives its FPS.
        print(f'warning: {path} lacks buffer_bytes_per_step, so compression={cfg.compression.mode} has no GB',
              file=sys.stderr)
        bytes_per_step, source = math.nan, 'buffer_bytes_per_step missing in half/full runs: GB n/a'
    return RunRecord(
        task=str(cfg.task.name), mode=str(cfg.compression.mode), seed=int(cfg.seed),
        fps=mean(_number(r, 'fps', path) for r in measured),
        measured_frames=int(sum(_number(r, 'episode_length', path) for r in measured)),
        seed_frames=seed_frames, bytes_per_step=bytes_per_step, bytes_source=source,
        stored_steps=int(_number(last, 'buffer_size', path)),
        replay_buffer_size=int(cfg.replay_buffer_size), action_repeat=int(cfg.action_repeat),
        batch_size=int(cfg.batch_size), device=str(cfg.device))


def build_table(records: Sequence[RunRecord]) -> list[TableRow]:
    """Half and Full rows per task against the same task's compression=none runs, plus an AVG row each.

    A (task, mode) cell is the mean over its seeds. The AVG row is the mean of the rows above it,
    except Total Comp = mean GB (base) / mean GB (ours), as in the paper's Table I.
    """
    cells = defaultdict(list)
    for r in records:
        cells[r.task, r.mode].append(r)
    tasks = list(dict.fromkeys(r.task for r in records))
    modes = [m for m in COMP_TYPES if any(r.mode == m for r in records)]
    if not modes:
        raise ValueError('no compression=half or compression=full runs to tabulate')

    def cell(task: str, mode: str) -> tuple[float, float]:
        runs = cells.get((task, mode))
        if not runs:
            return math.nan, math.nan
        return mean(r.fps for r in runs), mean(r.gb for r in runs)

    table = []
    for mode in modes:
        rows = []
        for task in tasks:
            (fps_base, gb_base), (fps_ours, gb_ours) = cell(task, 'none'), cell(task, mode)
            rows.append(TableRow(COMP_TYPES[mode], task, fps_base, fps_ours, gb_base, gb_ours,
                                 total_comp(gb_base, gb_ours)))
        avg = {f: mean(getattr(r, f) for r in rows) for f in ('fps_base', 'fps_ours', 'gb_base', 'gb_ours')}
        rows.append(TableRow(COMP_TYPES[mode], 'AVG', **avg, total_comp=total_comp(avg['gb_base'], avg['gb_ours'])))
        table.extend(rows)
    return table


def _span(values: Sequence[float], fmt: str = '{:,.0f}') -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f'{fmt.format(low)}-{fmt.format(high)}'


def build_footer(records: Sequence[RunRecord], note: str = '') -> str:
    """What the numbers rest on: measured frames/steps, replay size, device, seeds."""
    frames = [r.measured_frames for r in records]
    steps = [r.measured_frames / r.action_repeat for r in records]
    sources = sorted({r.bytes_source for r in records})
    lines = [
        f'FPS: frames per second of wall time while training (env steps, acting and agent updates), '
        f'the mean of train.csv\'s per-episode fps over the episodes that start after the '
        f'{_span([r.seed_frames for r in records])} seed frames: {_span(frames)} frames '
        f'({_span(steps)} agent steps) per run.',
        f'GB: replay bytes per stored step measured in the run at its last logged episode '
        f'({_span([r.stored_steps for r in records])} steps stored; train.csv {" / ".join(sources)}) '
        f'x replay_buffer_size {_span([r.replay_buffer_size for r in records])} / 1e9.',
        'Base: compression=none (upstream DrQ-v2: RGB with floor, episodes on disk). Total Comp = '
        'GB (base) / GB (ours); AVG rows are means of the rows above, with Total Comp = mean GB (base) / '
        'mean GB (ours). Each cell is the mean over seeds.',
        f'Device: {", ".join(sorted({r.device for r in records}))}; batch_size: {_span([r.batch_size for r in records])}; '
        f'seeds: {", ".join(str(s) for s in sorted({r.seed for r in records}))}; {len(records)} runs.',
    ]
    if note:
        lines.append(note)
    return '\n'.join(lines)


def _fmt(value: float, suffix: str = '') -> str:
    return 'n/a' if math.isnan(value) else f'{value:.1f}{suffix}'


def render_markdown(table: Sequence[TableRow], footer: str = '') -> str:
    """Table I as a markdown table; Comp Type is named on the first row of its group, as in the paper."""
    lines = ['| ' + ' | '.join(TABLE_HEADER) + ' |', '|' + '---|' * len(TABLE_HEADER)]
    previous = None
    for row in table:
        comp_type = row.comp_type if row.comp_type != previous else ''
        previous = row.comp_type
        env = f'**{row.env}**' if row.env == 'AVG' else row.env
        cells = [comp_type, env, _fmt(row.fps_base), _fmt(row.fps_ours), _fmt(row.gb_base),
                 _fmt(row.gb_ours), _fmt(row.total_comp, '×')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    text = '\n'.join(lines) + '\n'
    if footer:
        text += '\n' + '\n'.join(f'> {line}' for line in footer.splitlines()) + '\n'
    return text


def write_csv(table: Sequence[TableRow], path: Path) -> None:
    """Table I as CSV with unrounded numbers (empty where a run is missing)."""
    with Path(path).open('w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for row in table:
            values = [getattr(row, field) for field in CSV_FIELDS]
            writer.writerow(['' if isinstance(v, float) and math.isnan(v) else v for v in values])


# ---- running the trainings ----

def seed_frames_for(frames: int, batch_size: int, action_repeat: int = 2) -> int:
    """About a quarter of the run, at least two batches of steps, rounded up to whole episodes.

    Whole episodes make the FPS window start at an episode boundary, and the baseline's disk replay
    can only sample finished episodes, so from then on all three modes update at every update step.
    """
    wanted = max(frames / 4, 2 * batch_size * action_repeat)
    return max(1, math.ceil(wanted / EPISODE_FRAMES)) * EPISODE_FRAMES


def common_overrides(args: argparse.Namespace, seed_frames: int, device: str) -> list[str]:
    """Hydra overrides shared by every run of the table."""
    return [f'num_train_frames={args.frames + LOG_SLACK_FRAMES}', f'num_seed_frames={seed_frames}',
            # null disables eval altogether (Every fires at step 0 for any finite interval).
            'eval_every_frames=null', 'num_eval_episodes=0',
            'save_video=false', 'save_train_video=false', 'save_snapshot=false', 'use_tb=false',
            f'replay_buffer_size={args.replay_buffer_size}',
            f'replay_buffer_num_workers={args.workers}', f'batch_size={args.batch_size}',
            f'device={device}', *args.extra]


def run_dir_for(out: Path, task: str, mode: str, seed: int) -> Path:
    """Where a run of the table writes."""
    return out / 'runs' / f'{task}_{mode}_s{seed}'


def resolve_device(spec: str) -> str:
    """'auto' becomes cuda or cpu here, so that every run and the footer name the same device."""
    if spec != 'auto':
        return spec
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def train_one(cmd: Sequence[str], run_dir: Path, env: dict) -> tuple[float, int]:
    """Run one train.py process into a fresh run_dir, logging to run_dir/train.log; (seconds, exit code)."""
    # A stale run dir would leak old episodes into the disk replay and old rows into train.csv.
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    start = time.time()
    with (run_dir / 'train.log').open('w') as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    # The baseline's on-disk episodes (~60 KB per step) are not needed for the table.
    shutil.rmtree(run_dir / 'buffer', ignore_errors=True)
    return seconds, code


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the Table I benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', nargs='+', default=['walker_walk', 'quadruped_walk'])
    p.add_argument('--frames', type=int, default=3000, help='training frames per run (episodes are 1000)')
    p.add_argument('--seeds', type=int, default=1, help='seeds 1..N per configuration')
    p.add_argument('--replay-buffer-size', type=int, default=1_000_000)
    p.add_argument('--batch-size', type=int, default=32,
                   help='for every run; CPU updates at the tasks\' 256/512 would not fit the default time budget')
    p.add_argument('--workers', type=int, default=1, help='replay_buffer_num_workers (compression=none loader)')
    p.add_argument('--torch-threads', type=int, default=1,
                   help='OMP_NUM_THREADS/MKL_NUM_THREADS for every run; 0 leaves them unset')
    p.add_argument('--device', default='auto')
    p.add_argument('--standard', action='store_true',
                   help='half and full on RGB frames with the floor too (grayscale=false floor=true)')
    p.add_argument('--out', type=Path, default=None,
                   help='writes OUT.md, OUT.csv and the runs under OUT/runs/ '
                        '(default results/table1, or results/table1_standard with --standard)')
    p.add_argument('--dry-run', action='store_true', help='print the commands and exit')
    p.add_argument('--no-train', action='store_true', help='only rebuild the table from OUT/runs/')
    p.add_argument('--extra', nargs='*', default=[], help='more Hydra overrides for every run')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train the runs of Table I one after another, then tabulate them."""
    from tqdm import tqdm

    args = parse_args(argv)
    out = (args.out or Path('results/table1_standard' if args.standard else 'results/table1')).resolve()
    device = resolve_device(args.device)
    seed_frames = seed_frames_for(args.frames, args.batch_size)
    if args.frames - seed_frames < EPISODE_FRAMES:
        sys.exit(f'--frames {args.frames} leaves no whole episode after the {seed_frames} seed frames; '
                 f'use at least {seed_frames + EPISODE_FRAMES}')
    overrides = common_overrides(args, seed_frames, device)
    env = dict(os.environ)
    if args.torch_threads > 0:
        # Two torch threads on two shared cores thrash; the same cap applies to every configuration.
        env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
    threads = f'OMP_NUM_THREADS={args.torch_threads} ' if args.torch_threads > 0 else ''
    runs = [(task, mode, seed) for task in args.tasks for seed in range(1, args.seeds + 1) for mode in MODES]
    print(f'overrides for every run: {threads}{" ".join(overrides)}')

    # The baseline always trains on RGB with the floor; --standard gives half and full the same frames.
    standard = ['grayscale=false', 'floor=true'] if args.standard else []
    commands = {run: [sys.executable, 'train.py', f'task={run[0]}', f'compression={run[1]}', f'seed={run[2]}',
                      *overrides, *(standard if run[1] != 'none' else []), f'hydra.run.dir={run_dir_for(out, *run)}']
                for run in runs}
    if args.dry_run:
        for cmd in commands.values():
            print(threads + shlex.join(cmd))
        return 0
    note = ''
    if not args.no_train:
        failed, wall = [], 0.0
        bar = tqdm(runs, unit='run')
        for run in bar:
            run_dir = run_dir_for(out, *run)
            bar.set_description(run_dir.name)
            seconds, code = train_one(commands[run], run_dir, env)
            wall += seconds
            tqdm.write(f'{run_dir.name}: exit {code} after {seconds:.0f} s')
            if code != 0:
                failed.append(run_dir.name)
                tqdm.write((run_dir / 'train.log').read_text()[-2000:])
        note = (f'Runs trained one after another with {threads or "default torch threads "}'
                f'on a host with {os.cpu_count()} CPU cores; wall time of the {len(runs)} runs: {wall / 60:.1f} min.')
        if args.standard:
            note += ' Standard benchmark: half and full trained on RGB frames with the floor, as the baseline.'
        if failed:
            note += f' Failed: {", ".join(failed)}.'

    records = []
    for run in runs:
        try:
            records.append(read_run(run_dir_for(out, *run)))
        except (OSError, ValueError) as e:
            print(f'skipped: {e}', file=sys.stderr)
    if not records:
        sys.exit('no run could be read; nothing to tabulate')
    table = build_table(records)
    markdown = render_markdown(table, build_footer(records, note))
    print(markdown)
    md_path, csv_path = out.parent / f'{out.name}.md', out.parent / f'{out.name}.csv'
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown)
    write_csv(table, csv_path)
    print(f'wrote {md_path} and {csv_path}')
    return 1 if len(records) < len(runs) else 0


if __name__ == '__main__':
    sys.exit(main())
