"""Table I arithmetic of bench/table1.py on synthetic run dirs (no training)."""
import csv
import math
from pathlib import Path

import pytest

from bench import table1
from tests.test_train import compose_cfg

SEED_FRAMES = 1000
R = 1_000_000


def make_run(root: Path, task: str, mode: str, seed: int = 1, bytes_per_step: float = 63_500.0,
             fps: tuple = (50.0, 20.0, 30.0), per_step_column: bool = True) -> Path:
    """A run dir as train.py leaves it: config.yaml plus one train.csv row per 1000-frame episode."""
    run_dir = root / f'{task}_{mode}_s{seed}'
    run_dir.mkdir(parents=True)
    (run_dir / 'config.yaml').write_text(
        f'task:\n  name: {task}\ncompression:\n  mode: {mode}\nseed: {seed}\n'
        f'num_seed_frames: {SEED_FRAMES}\nreplay_buffer_size: {R}\naction_repeat: 2\nbatch_size: 32\ndevice: cpu\n')
    fields = ['buffer_bytes', 'buffer_size', 'episode', 'episode_length', 'episode_reward', 'fps', 'frame', 'step',
              'total_time'] + (['buffer_bytes_per_step'] if per_step_column else [])
    with (run_dir / 'train.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i, episode_fps in enumerate(fps, start=1):
            size = 500 * i
            row = dict(buffer_bytes=bytes_per_step * size * 3.0, buffer_size=float(size), episode=float(i),
                       episode_length=1000.0, episode_reward=1.0, fps=episode_fps, frame=1000 * i,
                       step=500.0 * i, total_time=10.0 * i)
            if per_step_column:
                row['buffer_bytes_per_step'] = bytes_per_step
            writer.writerow(row)
    return run_dir


# Two tasks with the paper's Table I numbers for the base and ours GB (bytes per step x 1e6 / 1e9).
PAPER = {('walker_walk', 'none'): 63_500, ('walker_walk', 'half'): 7_100, ('walker_walk', 'full'): 3_800,
         ('quadruped_walk', 'none'): 63_600, ('quadruped_walk', 'half'): 7_100, ('quadruped_walk', 'full'): 4_100}


@pytest.fixture
def paper_runs(tmp_path):
    fps = {'none': (1.0, 100.0, 120.0), 'half': (1.0, 140.0, 160.0), 'full': (1.0, 70.0, 80.0)}
    return [table1.read_run(make_run(tmp_path, task, mode, bytes_per_step=b, fps=fps[mode]))
            for (task, mode), b in PAPER.items()]


def test_read_run_measures_episodes_after_seed_frames(tmp_path):
    record = table1.read_run(make_run(tmp_path, 'walker_walk', 'half', bytes_per_step=7_100.0))
    # The first episode (frames 0-1000) is the seed phase: only episodes 2 and 3 count.
    assert record.fps == pytest.approx(25.0)
    assert record.measured_frames == 2000
    assert (record.task, record.mode, record.seed, record.device) == ('walker_walk', 'half', 1, 'cpu')
    assert record.bytes_source == 'buffer_bytes_per_step'
    assert record.stored_steps == 1500
    assert record.gb == pytest.approx(7.1)


def test_read_run_falls_back_to_buffer_bytes_over_size(tmp_path):
    record = table1.read_run(make_run(tmp_path, 'walker_walk', 'none', per_step_column=False))
    assert record.bytes_source == 'buffer_bytes/buffer_size'
    assert record.bytes_per_step == pytest.approx(3 * 63_500)


def test_in_ram_modes_without_bytes_per_step_have_no_gb(tmp_path, capsys):
    # Their buffer_bytes include capacity-sized arrays: dividing by buffer_size would be wrong.
    base = table1.read_run(make_run(tmp_path, 'walker_walk', 'none', bytes_per_step=63_500))
    full = table1.read_run(make_run(tmp_path, 'walker_walk', 'full', per_step_column=False))
    assert 'lacks buffer_bytes_per_step' in capsys.readouterr().err
    assert math.isnan(full.gb) and full.fps == pytest.approx(25.0)
    text = table1.render_markdown(table1.build_table([base, full]), table1.build_footer([base, full]))
    assert '| Full | walker_walk | 25.0 | 25.0 | 63.5 | n/a | n/a |' in text
    assert 'buffer_bytes_per_step missing in half/full runs: GB n/a' in text


def test_read_run_reads_hydra_config_when_run_config_is_missing(tmp_path):
    run_dir = make_run(tmp_path, 'walker_walk', 'full')
    (run_dir / '.hydra').mkdir()
    (run_dir / 'config.yaml').rename(run_dir / '.hydra' / 'config.yaml')
    assert table1.read_run(run_dir).mode == 'full'


def test_extrapolation_and_total_comp():
    assert table1.extrapolate_gb(63_504, 1_000_000) == pytest.approx(63.504)
    assert table1.extrapolate_gb(7_056, 100_000) == pytest.approx(0.7056)
    assert table1.total_comp(63.5, 7.1) == pytest.approx(8.943, abs=1e-3)
    assert math.isnan(table1.total_comp(63.5, 0.0))


def test_build_table_rows_and_avg(paper_runs):
    rows = {(r.comp_type, r.env): r for r in table1.build_table(paper_runs)}
    assert list(rows) == [('Half', 'walker_walk'), ('Half', 'quadruped_walk'), ('Half', 'AVG'),
                          ('Full', 'walker_walk'), ('Full', 'quadruped_walk'), ('Full', 'AVG')]
    walker = rows['Half', 'walker_walk']
    assert (walker.gb_base, walker.gb_ours) == (pytest.approx(63.5), pytest.approx(7.1))
    assert walker.fps_base == pytest.approx(110.0) and walker.fps_ours == pytest.approx(150.0)
    assert rows['Full', 'walker_walk'].total_comp == pytest.approx(63.5 / 3.8)
    avg = rows['Full', 'AVG']
    assert avg.gb_base == pytest.approx(63.55) and avg.gb_ours == pytest.approx(3.95)
    assert avg.fps_ours == pytest.approx(75.0)
    # Ratio of the means (the paper's 15.9x), not the mean of the ratios (16.1x).
    assert avg.total_comp == pytest.approx(63.55 / 3.95)
    assert avg.total_comp != pytest.approx((63.5 / 3.8 + 63.6 / 4.1) / 2, abs=1e-3)


def test_build_table_averages_seeds(tmp_path):
    records = [table1.read_run(make_run(tmp_path, 'walker_walk', mode, seed=seed, bytes_per_step=b))
               for mode, seed, b in [('none', 1, 60_000), ('none', 2, 70_000), ('half', 1, 7_000), ('half', 2, 8_000)]]
    (row, avg) = table1.build_table(records)
    assert (row.gb_base, row.gb_ours) == (pytest.approx(65.0), pytest.approx(7.5))
    assert avg.total_comp == pytest.approx(65.0 / 7.5)


def test_markdown_and_csv(paper_runs, tmp_path):
    table = table1.build_table(paper_runs)
    footer = table1.build_footer(paper_runs, note='Overrides for every run: batch_size=32.')
    text = table1.render_markdown(table, footer)
    lines = text.splitlines()
    assert lines[0] == '| Comp Type | Env | FPS (base) | FPS (ours) | GB (base) | GB (ours) | Total Comp |'
    assert '| Half | walker_walk | 110.0 | 150.0 | 63.5 | 7.1 | 8.9× |' in lines
    assert '|  | quadruped_walk | 110.0 | 150.0 | 63.6 | 7.1 | 9.0× |' in lines
    assert lines.index('|  | **AVG** | 110.0 | 150.0 | 63.5 | 7.1 | 9.0× |') == 4
    assert lines.index('|  | **AVG** | 110.0 | 75.0 | 63.5 | 3.9 | 16.1× |') == 7
    assert '2,000 frames (1,000 agent steps) per run' in text
    assert 'replay_buffer_size 1,000,000' in text and 'Device: cpu; batch_size: 32; seeds: 1; 6 runs.' in text
    assert '> Overrides for every run: batch_size=32.' in lines

    path = tmp_path / 'table1.csv'
    table1.write_csv(table, path)
    with path.open(newline='') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(table1.CSV_FIELDS)
    assert [(r['comp_type'], r['env']) for r in rows][2] == ('Half', 'AVG')
    assert float(rows[0]['total_comp']) == pytest.approx(63.5 / 7.1)


def test_missing_base_run_is_marked_not_faked(tmp_path):
    record = table1.read_run(make_run(tmp_path, 'walker_walk', 'full', bytes_per_step=3_800))
    table = table1.build_table([record])
    assert math.isnan(table[0].gb_base) and math.isnan(table[0].total_comp)
    assert '| Full | walker_walk | n/a | 25.0 | n/a | 3.8 | n/a |' in table1.render_markdown(table)
    table1.write_csv(table, tmp_path / 'out.csv')
    assert (tmp_path / 'out.csv').read_text().splitlines()[1] == 'Full,walker_walk,,25.0,,3.8,'


def test_base_only_is_an_error(tmp_path):
    with pytest.raises(ValueError, match='no compression=half or compression=full'):
        table1.build_table([table1.read_run(make_run(tmp_path, 'walker_walk', 'none'))])


def _rewrite_csv(run_dir: Path, old: str, new: str) -> None:
    path = run_dir / 'train.csv'
    path.write_text(path.read_text().replace(old, new))


def test_missing_column_is_a_clear_error(tmp_path):
    run_dir = make_run(tmp_path, 'walker_walk', 'half')
    _rewrite_csv(run_dir, 'buffer_size', 'buf_size')
    with pytest.raises(ValueError, match=r'train\.csv lacks column\(s\) buffer_size'):
        table1.read_run(run_dir)


def test_non_numeric_value_is_a_clear_error(tmp_path):
    run_dir = make_run(tmp_path, 'walker_walk', 'half', fps=(1.0, 2.5, 3.0))
    _rewrite_csv(run_dir, ',2.5,', ',fast,')
    with pytest.raises(ValueError, match="column 'fps' of the row at frame 2000 is not a number: 'fast'"):
        table1.read_run(run_dir)


def test_missing_files_and_short_runs_are_clear_errors(tmp_path):
    run_dir = make_run(tmp_path, 'walker_walk', 'half', fps=(10.0,))
    with pytest.raises(ValueError, match='no episode starts after the 1000 seed frames'):
        table1.read_run(run_dir)
    (run_dir / 'train.csv').unlink()
    with pytest.raises(FileNotFoundError, match='logged no finished episode'):
        table1.read_run(run_dir)
    (run_dir / 'config.yaml').unlink()
    with pytest.raises(FileNotFoundError, match='config.yaml'):
        table1.read_run(run_dir)


def test_seed_frames_are_whole_episodes():
    assert table1.seed_frames_for(3000, 32) == 1000
    assert table1.seed_frames_for(2000, 32) == 1000
    assert table1.seed_frames_for(100_000, 256) == 25_000
    assert table1.seed_frames_for(3000, 512) == 3000  # 2 batches of 512 steps = 2048 frames


def test_dry_run_gives_every_mode_the_same_overrides(capsys, tmp_path):
    assert table1.main(['--dry-run', '--tasks', 'walker_walk', '--device', 'cpu', '--out', str(tmp_path / 't'),
                        '--extra', 'nstep=3']) == 0
    commands = [line.split() for line in capsys.readouterr().out.splitlines() if 'train.py' in line]
    assert len(commands) == 3
    assert [c[c.index('train.py') + 2] for c in commands] == ['compression=none', 'compression=half',
                                                              'compression=full']
    shared = [[a for a in c if not a.startswith(('compression=', 'hydra.run.dir='))] for c in commands]
    assert shared[0] == shared[1] == shared[2]
    assert {'num_train_frames=3008', 'num_seed_frames=1000', 'eval_every_frames=null', 'batch_size=32',
            'nstep=3', 'device=cpu', 'OMP_NUM_THREADS=1'} <= set(shared[0])
    assert commands[0][-1] == f'hydra.run.dir={tmp_path / "t" / "runs" / "walker_walk_none_s1"}'


def test_standard_variant_trains_every_mode_on_rgb_with_the_floor(capsys, tmp_path):
    assert table1.main(['--dry-run', '--standard', '--tasks', 'walker_walk', '--device', 'cpu',
                        '--out', str(tmp_path / 't')]) == 0
    commands = [line.split() for line in capsys.readouterr().out.splitlines() if 'train.py' in line]
    by_mode = {next(a for a in c if a.startswith('compression=')): c for c in commands}
    for mode in ('compression=half', 'compression=full'):
        assert {'grayscale=false', 'floor=true'} <= set(by_mode[mode])
    assert 'grayscale=false' not in by_mode['compression=none']  # the baseline is RGB with the floor already
    composed = [compose_cfg([a for a in by_mode[mode] if '=' in a and not a.startswith(('hydra.', 'OMP_'))])
                for mode in by_mode]
    assert {(cfg.grayscale, cfg.floor) for cfg in composed} == {(False, True)}


def test_no_train_tabulates_existing_runs(tmp_path):
    for (task, mode), b in PAPER.items():
        make_run(tmp_path / 't' / 'runs', task, mode, bytes_per_step=b)
    assert table1.main(['--no-train', '--device', 'cpu', '--out', str(tmp_path / 't')]) == 0
    assert '8.9×' in (tmp_path / 't.md').read_text()
    assert len((tmp_path / 't.csv').read_text().splitlines()) == 7
