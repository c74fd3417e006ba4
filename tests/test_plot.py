"""plot.py on a synthetic multirun dir (no training)."""
import numpy as np
import pytest

import plot

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def make_multirun(root, tasks=('walker_walk', 'quadruped_walk'), modes=('none', 'half', 'full'), seeds=(1, 2)):
    """Run dirs as a Hydra multirun leaves them: .hydra/config.yaml plus eval.csv."""
    for task in tasks:
        for mode in modes:
            for seed in seeds:
                run_dir = root / f'{task}_{mode}_s{seed}'
                (run_dir / '.hydra').mkdir(parents=True)
                (run_dir / '.hydra' / 'config.yaml').write_text(
                    f'task:\n  name: {task}\ncompression:\n  mode: {mode}\nseed: {seed}\n')
                rows = [f'{f},{f // 2},1,1000,{f / 100 + 10 * seed},5.0' for f in range(0, 10_001, 2000)]
                (run_dir / 'eval.csv').write_text(
                    'frame,step,episode,episode_length,episode_reward,total_time\n' + '\n'.join(rows) + '\n')
    return root


def test_plot_writes_png(tmp_path):
    out = tmp_path / 'fig3.png'
    plot.main([str(make_multirun(tmp_path / 'multirun')), '--out', str(out)])
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_find_runs_reads_task_mode_seed(tmp_path):
    runs = plot.find_runs([make_multirun(tmp_path)])
    assert len(runs) == 12
    assert {(r.task, r.mode, r.seed) for r in runs} >= {('walker_walk', 'half', 2), ('quadruped_walk', 'none', 1)}
    assert runs[0].frames.tolist() == [0, 2000, 4000, 6000, 8000, 10000]


def test_mean_std_interpolates_on_the_shared_frame_range():
    a = plot.Run('t', 'half', 1, np.array([0.0, 10.0, 20.0]), np.array([0.0, 10.0, 20.0]))
    b = plot.Run('t', 'half', 2, np.array([0.0, 20.0, 30.0]), np.array([0.0, 40.0, 60.0]))
    frames, mean, std = plot.mean_std([a, b])
    # b stops being covered by a after frame 20; a's frame 10 is interpolated on b.
    assert frames.tolist() == [0.0, 10.0, 20.0]
    assert mean.tolist() == [0.0, 15.0, 30.0]
    assert std.tolist() == [0.0, 5.0, 10.0]


def test_table_png(tmp_path):
    make_multirun(tmp_path / 'm', tasks=('walker_walk',), seeds=(1,))
    table = tmp_path / 'table1.csv'
    table.write_text('comp_type,env,fps_base,fps_ours,gb_base,gb_ours,total_comp\n'
                     'Half,walker_walk,119,142,63.5,7.1,8.94\nHalf,AVG,119,142,63.5,7.1,8.94\n'
                     'Full,walker_walk,119,,63.5,,\nFull,AVG,119,,63.5,,\n')
    out = tmp_path / 'fig.png'
    plot.main([str(tmp_path / 'm'), '--table', str(table), '--out', str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / 'fig_table1.png').read_bytes().startswith(PNG_MAGIC)


def test_no_eval_csv_is_a_clear_error(tmp_path):
    (tmp_path / 'empty_sweep' / 'run').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no eval.csv found below'):
        plot.main([str(tmp_path / 'empty_sweep'), '--out', str(tmp_path / 'x.png')])
    assert not (tmp_path / 'x.png').exists()


def test_eval_csv_without_config_is_a_clear_error(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'eval.csv').write_text('frame,episode_reward\n0,1.0\n')
    with pytest.raises(FileNotFoundError, match='without config.yaml'):
        plot.find_runs([tmp_path])
