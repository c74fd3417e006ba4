"""Hydra config composition and short end-to-end training runs of train.py."""
import csv
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import envs  # noqa: F401  (sets MUJOCO_GL before dm_control picks its GL backend)
from dm_control import suite
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CFG_DIR = ROOT / 'cfgs'
DIFFICULTIES = {'easy', 'medium', 'hard'}
MODE_DEFAULTS = {'none': (False, True), 'half': (True, False), 'full': (True, False)}


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CFG_DIR), version_base=None):
        return compose(config_name='config', overrides=list(overrides))


@pytest.mark.parametrize('mode', sorted(MODE_DEFAULTS))
def test_config_composes_with_compression_defaults(mode):
    cfg = compose_cfg([f'compression={mode}'])
    grayscale, floor = MODE_DEFAULTS[mode]
    assert cfg.compression.mode == mode
    assert cfg.grayscale is grayscale and cfg.floor is floor
    assert cfg.task.name == 'walker_walk'
    assert cfg.num_train_frames == 1_100_000
    assert cfg.agent.stddev_schedule == 'linear(1.0,0.1,100000)'
    assert cfg.agent._target_ == 'drqv2.DrQV2Agent'
    if mode != 'none':
        assert dict(cfg.compression.buffer) == {}

    cfg = compose_cfg([f'compression={mode}', 'grayscale=false', 'floor=true'])
    assert cfg.grayscale is False and cfg.floor is True


def test_default_compression_is_full():
    assert compose_cfg().compression.mode == 'full'


def test_task_overrides_follow_upstream():
    cfg = compose_cfg(['task=quadruped_walk'])
    assert (cfg.num_train_frames, cfg.nstep, cfg.batch_size) == (3_100_000, 3, 256)
    cfg = compose_cfg(['task=humanoid_run'])
    assert cfg.agent.lr == pytest.approx(8e-5) and cfg.agent.feature_dim == 100
    assert cfg.agent.stddev_schedule == 'linear(1.0,0.1,2000000)'
    assert compose_cfg(['task=cup_catch']).task.name == 'ball_in_cup_catch'
    assert compose_cfg(['nstep=5']).nstep == 5


@pytest.mark.parametrize('task', sorted(p.stem for p in (CFG_DIR / 'task').glob('*.yaml')
                                        if p.stem not in DIFFICULTIES))
def test_every_task_names_a_dmc_task(task):
    cfg = compose_cfg([f'task={task}'])
    assert cfg.task.name in {f'{domain}_{name}' for domain, name in suite.ALL_TASKS}
    assert cfg.num_train_frames in (1_100_000, 3_100_000, 30_100_000)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_logger_rewrites_csv_on_new_columns_and_continues_after_a_snapshot(tmp_path):
    from logger import Logger

    logger = Logger(tmp_path, use_tb=False)
    for episode in (1, 2, 3):
        if episode >= 2:  # update metrics only exist once training has started
            logger.log('train/critic_loss', 0.5, episode * 10)
            logger.log('train/critic_loss', 1.5, episode * 10)
        with logger.log_and_dump_ctx(episode * 10, ty='train') as log:
            log('episode', episode)
            log('episode_reward', 1.5 * episode)
        if episode == 2:
            state = logger.state_dict()  # as a snapshot after episode 2 would save it
    rows = read_csv(tmp_path / 'train.csv')
    assert [r['frame'] for r in rows] == ['10', '20', '30']
    assert rows[0]['critic_loss'] == '' and float(rows[-1]['critic_loss']) == 1.0
    assert state == {'train_rows': 2, 'eval_rows': 0, 'step': 20}

    # Resuming drops the row logged after the snapshot and appends under the same header.
    logger = Logger(tmp_path, use_tb=False, state=state)
    assert [r['frame'] for r in read_csv(tmp_path / 'train.csv')] == ['10', '20']
    with logger.log_and_dump_ctx(30, ty='train') as log:
        log('episode', 3)
        log('episode_reward', 7.0)
    text = (tmp_path / 'train.csv').read_text()
    assert text.count('episode_reward') == 1
    assert [(r['frame'], r['episode_reward']) for r in read_csv(tmp_path / 'train.csv')] == \
        [('10', '1.5'), ('20', '3.0'), ('30', '7.0')]
    assert not (tmp_path / 'eval.csv').exists()

    # Without a snapshot to continue, a run in the same directory starts new logs.
    with Logger(tmp_path, use_tb=False).log_and_dump_ctx(10, ty='train') as log:
        log('episode', 1)
    assert [r['frame'] for r in read_csv(tmp_path / 'train.csv')] == ['10']


@pytest.mark.parametrize('overrides, message', [
    (['frame_stack=0'], 'frame_stack=0 is invalid; allowed: an integer >= 1'),
    (['action_repeat=-2'], 'action_repeat=-2 is invalid; allowed: an integer >= 1'),
    (['snapshot_every_frames=0'], 'snapshot_every_frames=0 is invalid'),
    (['compression.mode=zip'], "compression.mode='zip' is unknown; allowed: none, half, full"),
    (['replay_buffer_size=3'], 'replay_buffer_size=3 is too small; allowed: an integer >= frame_stack \\+ nstep = 4'),
    (['compression=full', 'compression.key_interval=0'], 'compression.key_interval=0 is invalid; allowed: an integer >= 1'),
    (['compression=full', 'compression.decode_threads=0'], 'compression.decode_threads=0 is invalid'),
    (['task.name=walker_fly'], "task.name='walker_fly': Unknown task 'walker_fly'; available tasks: .*walker_walk"),
])
def test_bad_config_is_refused_saying_what_is_allowed(overrides, message):
    from train import validate_config

    validate_config(compose_cfg())
    with pytest.raises(ValueError, match=message):
        validate_config(compose_cfg(overrides))


def test_floor_free_request_for_a_floorless_domain_is_refused(monkeypatch):
    from dm_control import mujoco as dm_mujoco

    from envs import dmc
    from train import validate_config

    # Every stock DMC domain has a floor, so stand in a model without one.
    xml = '<mujoco><worldbody><geom type="box" size=".1 .1 .1"/></worldbody></mujoco>'
    monkeypatch.setattr(dmc.suite, 'load', lambda domain, task: SimpleNamespace(
        physics=dm_mujoco.Physics.from_xml_string(xml)))
    validate_config(compose_cfg(['compression=full', 'floor=true']))
    with pytest.raises(ValueError, match="no floor .*floor=false needs a domain with a floor; use floor=true"):
        validate_config(compose_cfg(['compression=full']))


@pytest.mark.parametrize('group, option', [('task', 'walker_walk'), ('compression', 'half')])
def test_unknown_group_option_is_refused_listing_the_options(group, option):
    with pytest.raises(MissingConfigException, match=f"(?s)Could not find '{group}/foo'.*Available.*{option}"):
        compose_cfg([f'{group}=foo'])


@pytest.mark.parametrize('setup, overrides, message', [
    (None, ['frame_stack=0', 'compression.mode=zip'], "compression.mode='zip' is unknown.*\\n.*frame_stack=0"),
    (b'PK\x03\x04 truncated', [], 'cannot resume from .*snapshot.pt: the file is truncated, corrupt'),
])
def test_train_stops_before_training(tmp_path, setup, overrides, message):
    run_dir = tmp_path / 'run'
    if setup is not None:
        run_dir.mkdir()
        (run_dir / 'snapshot.pt').write_bytes(setup)
    proc = subprocess.run([sys.executable, 'train.py', *overrides, f'hydra.run.dir={run_dir}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert not {'train.csv', 'eval.csv', 'buffer', 'config.yaml'} & {p.name for p in run_dir.iterdir()}


# evaluations at frames 0 and 1500 (mid second episode): one after a resume at frame 1000
TINY_RUN = ['task=walker_walk', 'action_repeat=20', 'eval_every_frames=1500', 'batch_size=16',
            'replay_buffer_num_workers=1', 'device=cpu']


def run_in_terminal(cmd, env, timeout):
    """Run cmd with stdout and stderr on an 80-column pseudo-terminal, as in a shell; (exit code, output)."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 80, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd)
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([main_fd], [], [], 1)[0]:
                try:
                    chunks.append(os.read(main_fd, 1 << 16))
                except OSError:  # EIO: every process holding the terminal has exited
                    break
            elif proc.poll() is not None:
                break
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode, b''.join(chunks).decode(errors='replace')


def run_train(run_dir, mode, num_train_frames, terminal=False):
    """stdout (or, on a terminal, everything printed) of a short run that must succeed."""
    # action_repeat=20 makes a (1000-frame) episode only 50 agent steps, so one train episode,
    # one eval episode and a few updates fit in a few seconds on a small CPU (rendering dominates).
    cmd = [sys.executable, 'train.py', *TINY_RUN, f'compression={mode}', f'num_train_frames={num_train_frames}',
           'num_seed_frames=200', 'num_eval_episodes=1', 'save_video=true', 'save_snapshot=true', 'use_tb=true',
           f'hydra.run.dir={run_dir}']
    # faulthandler puts every thread's Python stack into stderr if the run crashes.
    env = {**os.environ, 'PYTHONFAULTHANDLER': '1'}
    if terminal:
        code, out = run_in_terminal(cmd, env, timeout=300)
        assert code == 0, out[-3000:]
        return out
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '\r' not in proc.stdout + proc.stderr  # no progress bars in logs
    return proc.stdout


def filled(rows):
    return [{k: v for k, v in row.items() if v != ''} for row in rows]


def learning_columns(rows):
    """Rows without time, speed and buffer memory (a buffer restored from a snapshot may hold a few more or
    fewer bytes than the one it was saved from), each without empty cells."""
    skip = {'fps', 'total_time', 'buffer_bytes', 'buffer_bytes_per_step'}
    return [{k: v for k, v in row.items() if k not in skip} for row in filled(rows)]


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['none', 'half', 'full'])
def test_short_training_run_and_resume(tmp_path, mode):
    run_dir = tmp_path / 'run'
    # 900 frames end inside the first 50-step episode: training goes on to its end, at frame 1000.
    out = run_train(run_dir, mode, num_train_frames=900, terminal=mode == 'half')
    # Each phase says what it does before it starts, in order. (none's loader samples finished episodes
    # only, so its updates start with the second episode.)
    phases = ['workspace: ', 'collecting 200 seed frames before the first update', 'evaluating 1 episode at frame 0',
              '| \033[32meval', 'updating the agent from frame 200', '| \033[33mtrain']
    if mode == 'none':
        phases.remove('updating the agent from frame 200')
    assert [out.find(phase) for phase in phases] == sorted({out.find(phase) for phase in phases} - {-1}), out
    if mode == 'half':  # on a terminal, a bar shows the evaluation's progress
        assert re.search(r'eval: 100%\|\S+\| 1/1 ', out), out[-3000:]

    train_rows = read_csv(run_dir / 'train.csv')
    eval_rows = read_csv(run_dir / 'eval.csv')
    assert len(train_rows) == 1 and len(eval_rows) == 1
    for row, keys in [(train_rows[0], ['frame', 'step', 'episode', 'episode_reward',
                                       'episode_length', 'fps', 'total_time', 'buffer_size',
                                       'buffer_bytes']),
                      (eval_rows[0], ['frame', 'step', 'episode', 'episode_reward',
                                      'episode_length', 'total_time'])]:
        values = {k: float(row[k]) for k in keys}
        assert all(v == v for v in values.values()), row  # no NaN
    assert float(train_rows[0]['frame']) == 1000 and float(train_rows[0]['episode']) == 1
    # 50 transitions (none) or 51 stored time steps incl. the reset step (in-RAM buffer)
    assert float(train_rows[0]['buffer_size']) in (50, 51)
    assert float(train_rows[0]['buffer_bytes']) > 0
    assert float(train_rows[0]['fps']) > 0
    assert (run_dir / 'eval_video' / '0.mp4').stat().st_size > 0
    assert list((run_dir / 'tb').iterdir())
    # The final snapshot falls between episodes, after the last one's row.
    snapshot = torch.load(run_dir / 'snapshot.pt', weights_only=True)
    assert (snapshot['global_step'], snapshot['global_episode'], snapshot['logger']['train_rows']) == (50, 1, 1)
    assert not (run_dir / 'snapshot.pt.tmp').exists()

    # Resume: continues at step 50 with the second episode; no step-0 evaluation, nothing logged twice, an
    # evaluation at frame 1500.
    train_rows = read_csv(run_dir / 'train.csv')
    eval_csv = (run_dir / 'eval.csv').read_text()
    out = run_train(run_dir, mode, num_train_frames=1500)
    assert f'resuming from {run_dir / "snapshot.pt"} at frame 1000 (step 50, episode 1)' in out
    assert 'updating the agent from frame 1000' in out and 'seed frames' not in out
    # the first episode's row is kept as it was (new columns of the second leave its cells empty)
    assert filled(read_csv(run_dir / 'train.csv')[:1]) == filled(train_rows)
    assert [(float(r['frame']), float(r['episode'])) for r in read_csv(run_dir / 'train.csv')] == [(1000, 1), (2000, 2)]
    assert (run_dir / 'eval.csv').read_text().startswith(eval_csv)
    assert [float(r['frame']) for r in read_csv(run_dir / 'eval.csv')] == [0, 1500]
    snapshot = torch.load(run_dir / 'snapshot.pt', weights_only=True)
    assert (snapshot['global_step'], snapshot['global_episode']) == (100, 2)
    assert snapshot['timer']['total_time'] > 0

    if mode != 'none':  # the resumed run trained exactly as an uninterrupted one: same rewards, losses and evals
        uninterrupted = tmp_path / 'uninterrupted'
        run_train(uninterrupted, mode, num_train_frames=2000)
        rows = learning_columns(read_csv(run_dir / 'train.csv'))
        assert rows == learning_columns(read_csv(uninterrupted / 'train.csv'))
        assert 'critic_loss' in rows[1]
        evals = [learning_columns(read_csv(d / 'eval.csv')) for d in (run_dir, uninterrupted)]
        assert evals[0] == evals[1]


@pytest.mark.slow
def test_sweep_gives_every_job_its_own_run_dir(tmp_path):
    sweep_dir = tmp_path / 'sweep'
    # one 50-step episode per job, without updates or evaluation
    cmd = [sys.executable, 'train.py', '-m', 'compression.key_interval=2,8', '+note=a/b', *TINY_RUN,
           'num_train_frames=1000', 'num_seed_frames=1000', 'num_eval_episodes=0', 'save_video=false',
           'save_snapshot=true', f'hydra.sweep.dir={sweep_dir}']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'resuming' not in proc.stdout
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    # '/' in an override's value would nest directories: it becomes '_'
    assert names == [f'{job}_walker_walk_full_s1_+note=a_b,action_repeat=20,batch_size=16,'
                     f'compression.key_interval={key_interval},num_seed_frames=1000'
                     for job, key_interval in [(0, 2), (1, 8)]]
    for name, key_interval in zip(names, (2, 8)):
        run_dir = sweep_dir / name
        assert OmegaConf.load(run_dir / 'config.yaml').compression.key_interval == key_interval
        assert [r['frame'] for r in read_csv(run_dir / 'train.csv')] == ['1000']
        assert (run_dir / 'snapshot.pt').exists()

    # Launched again into the same sweep dir, each job continues from its own snapshot (nothing left to train).
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.findall(r'resuming from (\S+)/snapshot.pt', proc.stdout) == [str(sweep_dir / name) for name in names]
