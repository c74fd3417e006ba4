"""Snapshots: atomic writes, refusal of damaged or mismatched files, and resuming a SIGKILLed run."""
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import snapshot
from drqv2 import DrQV2Agent
from envs import make
from replay_buffer import ReplayBuffer
from tests.test_train import ROOT, compose_cfg, read_csv
from train import buffer_kwargs

SAMPLER_SEED = 1234
_REPLAY = np.arange(1000, dtype=np.uint32)


def _save(path, cfg, **state):
    snapshot.save(path, cfg, {'replay': snapshot.to_tensors({'x': _REPLAY}), **state})


def _flip(data, at):
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_save_replaces_atomically_and_load_checks_settings(tmp_path):
    cfg, path = compose_cfg(), tmp_path / 'snapshot.pt'
    _save(path, cfg, step=1)
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can't pickle"):
        _save(path, cfg, step=2, unpicklable=lambda: None)  # fails while writing
    assert not (tmp_path / 'snapshot.pt.tmp').exists()
    state = snapshot.load(path, cfg)  # the previous snapshot is intact
    assert state['step'] == 1
    np.testing.assert_array_equal(snapshot.to_arrays(state['replay'])['x'], np.arange(1000))

    with pytest.raises(snapshot.SnapshotError, match=f"cannot resume from {path} with compression=.*'half'.*"
                                                     "snapshot: .*'full'.*frame_stack=4 .*snapshot: 3"):
        snapshot.load(path, compose_cfg(['compression=half', 'frame_stack=4']))
    with pytest.raises(snapshot.SnapshotError, match=r"agent.lr=0.0005 \(snapshot: 0.0001\)"):
        snapshot.load(path, compose_cfg(['lr=5e-4']))  # a restored Adam state would keep the old rate
    with pytest.raises(snapshot.SnapshotError, match=r"seed=2 \(snapshot: 1\)"):
        snapshot.load(path, compose_cfg(['seed=2']))  # another run's snapshot, e.g. of another sweep job
    assert snapshot.load(path, compose_cfg(['num_train_frames=5', 'batch_size=8']))['step'] == 1


@pytest.mark.parametrize('damage, message', [
    (lambda data: data[:len(data) // 2], 'truncated, corrupt or not a snapshot'),
    (lambda data: _flip(data, 100), 'checksum mismatch in archive/data.pkl'),
    (lambda data: _flip(data, data.index(_REPLAY[500:504].tobytes())), 'checksum mismatch in archive/data/'),
    (lambda data: b'', 'truncated, corrupt or not a snapshot'),
])
def test_damaged_snapshot_is_refused_naming_the_file(tmp_path, damage, message):
    cfg, path = compose_cfg(), tmp_path / 'snapshot.pt'
    _save(path, cfg, step=1)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(snapshot.SnapshotError, match=f'{path}.*{message}'):
        snapshot.load(path, cfg)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


def test_loading_executes_no_code(tmp_path):
    path, marker = tmp_path / 'snapshot.pt', tmp_path / 'code_ran'
    torch.save({'version': snapshot.VERSION, 'agent': _Payload(marker)}, path)
    with pytest.raises(snapshot.SnapshotError, match='truncated, corrupt or not a snapshot'):
        snapshot.load(path, compose_cfg())
    assert not marker.exists()


def _draws(envs):
    return (random.random(), np.random.random(), torch.rand(()).item(), [env.task.random.random() for env in envs])


def test_rng_state_round_trip(tmp_path):
    envs = [make('cartpole_balance', 1, 1, seed) for seed in (0, 1)]
    torch.save(snapshot.rng_state([env.task.random for env in envs]), tmp_path / 'rng.pt')
    expected = _draws(envs)
    _draws(envs)
    snapshot.set_rng_state(torch.load(tmp_path / 'rng.pt', weights_only=True), [env.task.random for env in envs])
    assert _draws(envs) == expected


def _agent(seed):
    torch.manual_seed(seed)
    return DrQV2Agent(obs_shape=(3, 84, 84), action_shape=(2,), device='cpu', lr=1e-3, feature_dim=4,
                      hidden_dim=8, critic_target_tau=0.01, num_expl_steps=0, update_every_steps=1,
                      stddev_schedule=0.2, stddev_clip=0.3, use_tb=False)


def _assert_same(got, want):
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    else:
        assert got == want


def test_agent_state_round_trip(tmp_path):
    trained, fresh = _agent(0), _agent(1)
    batch = (np.zeros((2, 3, 84, 84), np.uint8), np.zeros((2, 2), np.float32), np.ones((2, 1), np.float32),
             np.ones((2, 1), np.float32), np.zeros((2, 3, 84, 84), np.uint8))
    trained.update(iter([batch]), step=0)  # gives the optimizers some state
    torch.save(trained.state_dict(), tmp_path / 'agent.pt')
    fresh.load_state_dict(torch.load(tmp_path / 'agent.pt', weights_only=True))
    _assert_same(fresh.state_dict(), trained.state_dict())
    obs = np.random.default_rng(0).integers(0, 256, (3, 84, 84), dtype=np.uint8)
    assert (trained.act(obs, 0, eval_mode=True) == fresh.act(obs, 0, eval_mode=True)).all()


# Runs train.py's main and appends, at every snapshot and at resume, what the replay buffer holds
# (length, and a digest of a batch drawn with a fixed sampler seed) to the file in PROBE_LOG.
PROBE = f'''
import hashlib, json, os, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
import train


def record(event, workspace):
    storage = workspace.replay_storage
    entry = dict(event=event, frame=workspace.global_frame, length=len(storage))
    if workspace.mode != 'none':
        with storage._lock:  # the prefetch thread must not draw from the swapped-in generator
            own, storage._rng = storage._rng, np.random.default_rng({SAMPLER_SEED})
            batch = storage._gather(storage._draw(storage.batch_size))
            storage._rng = own
        entry['batch'] = hashlib.sha256(b''.join(x.tobytes() for x in batch)).hexdigest()
    with open(os.environ['PROBE_LOG'], 'a') as f:
        f.write(json.dumps(entry) + '\\n')


save, restore = train.Workspace.save_snapshot, train.Workspace.restore
train.Workspace.save_snapshot = lambda self: (save(self), record('saved', self))
train.Workspace.restore = lambda self, state: (restore(self, state), record('resumed', self))
train.main()
'''


def _probe_command(tmp_path, run_dir, mode, num_train_frames):
    # an absolute config path: hydra looks for a relative one next to the script it runs
    return [sys.executable, str(tmp_path / 'probe.py'), f'--config-path={ROOT / "cfgs"}',
            *_overrides(mode, num_train_frames), f'hydra.run.dir={run_dir}']


def _overrides(mode, num_train_frames):
    # 50-step episodes (action_repeat=20), updates from step 10, a snapshot and an eval every episode
    return ['task=walker_walk', f'compression={mode}', f'num_train_frames={num_train_frames}',
            'num_seed_frames=200', 'action_repeat=20', 'eval_every_frames=1000', 'num_eval_episodes=1',
            'batch_size=16', 'replay_buffer_size=5000', 'replay_buffer_num_workers=1', 'save_video=false',
            'save_snapshot=true', 'snapshot_every_frames=1000', 'use_tb=true', 'device=cpu']


def _probe_records(probe_log, event):
    if not probe_log.exists():
        return []
    records = [json.loads(line) for line in probe_log.read_text().splitlines()]
    return [r for r in records if r['event'] == event]


def _kill_after_first_snapshot(tmp_path, run_dir, mode):
    """Start a long run and SIGKILL it once a snapshot exists and the eval after it was logged."""
    probe_log = tmp_path / 'probe.jsonl'
    cmd = _probe_command(tmp_path, run_dir, mode, 100_000)
    with open(tmp_path / 'first.log', 'w') as log:
        # its own process group, so that the kill also takes loader workers, as a preemption would
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, 'PROBE_LOG': str(probe_log)})
    try:
        deadline = time.monotonic() + 240
        while not (_probe_records(probe_log, 'saved') and len(read_csv(run_dir / 'eval.csv')) >= 2):
            assert proc.poll() is None, (tmp_path / 'first.log').read_text()[-3000:]
            assert time.monotonic() < deadline, 'no snapshot within 240 s'
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return probe_log


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['none', 'half', 'full'])
def test_sigkilled_run_resumes_from_its_snapshot(tmp_path, mode):
    (tmp_path / 'probe.py').write_text(PROBE)
    run_dir = tmp_path / 'run'
    probe_log = _kill_after_first_snapshot(tmp_path, run_dir, mode)
    cfg = compose_cfg(_overrides(mode, 100_000))
    state = snapshot.load(run_dir / 'snapshot.pt', cfg)
    frame = state['global_step'] * cfg.action_repeat
    saved = [r for r in _probe_records(probe_log, 'saved') if r['frame'] == frame][-1]
    if mode == 'none':
        assert int(state['replay']['episode_lens'].sum()) == saved['length']
    else:  # the buffer rebuilt from the file, outside train.py, holds what the killed run held
        buf = ReplayBuffer(obs_shape=(3, 84, 84), action_shape=(6,), capacity=cfg.replay_buffer_size,
                           frame_stack=cfg.frame_stack, nstep=cfg.nstep, discount=cfg.discount,
                           batch_size=cfg.batch_size, compression=mode, **buffer_kwargs(cfg))
        buf.load_state_dict(snapshot.to_arrays(state['replay']))
        buf._rng = np.random.default_rng(SAMPLER_SEED)
        assert len(buf) == saved['length']
        assert hashlib.sha256(b''.join(x.tobytes() for x in buf.sample())).hexdigest() == saved['batch']
    train_before, eval_before = read_csv(run_dir / 'train.csv'), read_csv(run_dir / 'eval.csv')

    cmd = _probe_command(tmp_path, run_dir, mode, frame + 1000)  # one more episode
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PROBE_LOG': str(probe_log)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'resuming from {run_dir / "snapshot.pt"} at frame {frame}' in proc.stdout
    resumed = _probe_records(probe_log, 'resumed')
    assert resumed == [{**saved, 'event': 'resumed'}]

    # The eval at the snapshot's frame came after it (and is logged again); training stops at the next
    # episode end, before the eval there.
    for name, before, rows_at_snapshot, last_frame in [
            ('train.csv', train_before, state['logger']['train_rows'], frame + 1000),
            ('eval.csv', eval_before, state['logger']['eval_rows'], frame)]:
        text = (run_dir / name).read_text()
        assert text.count(text.splitlines()[0]) == 1, text  # one header
        rows = read_csv(run_dir / name)
        frames = [int(r['frame']) for r in rows]
        assert frames == sorted(set(frames)), frames  # nothing logged twice, e.g. the eval after the snapshot
        kept = [{k: v for k, v in r.items() if v != ''} for r in rows[:rows_at_snapshot]]
        assert kept == [{k: v for k, v in r.items() if v != ''} for r in before[:rows_at_snapshot]]
        assert frames[-1] == last_frame


def test_member_spliced_in_from_another_snapshot_of_the_same_settings_is_refused(tmp_path):
    cfg = compose_cfg()
    for seed, name in ((0, 'a.pt'), (1, 'b.pt')):
        _save(tmp_path / name, cfg, agent=_agent(seed).state_dict(), step=seed)
    spliced = 0
    with zipfile.ZipFile(tmp_path / 'a.pt') as a, zipfile.ZipFile(tmp_path / 'b.pt') as b:
        for member in a.namelist():
            if '/data/' not in member or a.read(member) == b.read(member):
                continue
            with zipfile.ZipFile(tmp_path / 'spliced.pt', 'w') as out:  # every CRC right, one member from b
                for info in a.infolist():
                    out.writestr(info.filename, (b if info.filename == member else a).read(info.filename))
            torch.load(tmp_path / 'spliced.pt', weights_only=True)  # torch itself would take it
            with pytest.raises(snapshot.SnapshotError, match='do not belong together'):
                snapshot.load(tmp_path / 'spliced.pt', cfg)
            spliced += 1
    assert spliced > 10  # the agent's weights and Adam states differ between the two


# Fuzzing: saved replay states of `half` and `full` with one integer (or one run header) changed, written as
# snapshots with valid CRCs and digest, loaded and sampled in a subprocess that must not die by a signal. A state
# that loads must decode exactly what a naive decoder of the changed arrays decodes.
FUZZ_MODES = {'half': ('half', {}), 'runs': ('full', {'entropy': False}),
              'entropy': ('full', {'min_entropy_saving': 0})}
FUZZ_SHAPE = (1, 16, 16)


def _fuzz_buffer(mode):
    compression, options = FUZZ_MODES[mode]
    return ReplayBuffer(obs_shape=(3, *FUZZ_SHAPE[1:]), action_shape=(2,), capacity=60, frame_stack=3, nstep=2,
                        discount=0.99, batch_size=8, compression=compression, key_interval=3, anchor_interval=10,
                        **options)


def _reference_frames(state, ids, capacity):
    """Frames `ids` of a saved frame-store state, decoded naively from its arrays (gray 16x16 frames)."""
    from obs_comp import ALONE_PACKED, PREV_PACKED, RAW, RUNS
    if 'frames' in state:  # half: a ring of raw frames
        return np.stack([state['frames'][i % capacity] for i in ids])
    payload = np.concatenate([state['payload_start'], state['payload_end']])
    first, size = int(state['counters'][2]), int(state['config'][1])
    height, width = FUZZ_SHAPE[1:]

    def unpacked(at, length):
        """The residual of a packed payload of one gray plane, read as kernels.py section 1 defines it."""
        groups = -(-size // 16)
        stream = int.from_bytes(payload[at:at + length].tobytes(), 'little')
        bit, previous, residual = 8 * -(-groups // 8), 0, np.zeros(16 * groups, np.int64)

        def take(n):
            nonlocal bit
            value = (stream >> bit) & ((1 << n) - 1)
            bit += n
            return value

        for g in range(groups):
            if not (payload[at + g // 8] >> (g % 8)) & 1:
                continue
            widths = []
            for _ in range(8):
                if not take(1):
                    pass
                elif not take(1):
                    previous += -1 if take(1) else 1
                elif not take(1):
                    previous += -2 if take(1) else 2
                else:
                    previous = take(4)
                widths.append(previous)
            for j, w in enumerate(widths):
                for k in range(2):
                    value = take(w)
                    residual[16 * g + 2 * j + k] = value if w == 8 else value - (1 << (w - 1)) if w else 0
        return residual[:size]

    def frame(f):
        i = f - first
        kind, at, param, ref = (int(state[name][i]) for name in ('kinds', 'offsets', 'params', 'ref_dist'))
        if kind == RAW:
            return payload[at:at + size].copy()
        if kind == RUNS:
            out, position, values = frame(f - ref), 0, at + 2 * param
            for k in range(param):
                position += int(payload[at + 2 * k])
                length = int(payload[at + 2 * k + 1])
                out[position:position + length] = payload[values:values + length]
                position, values = position + length, values + length
            return out
        residual = unpacked(at, param)
        if kind == PREV_PACKED:
            return ((frame(f - 1) + residual) % 256).astype(np.uint8)
        rows = np.cumsum(residual.reshape(height, width), axis=0).reshape(-1)  # taken vertically
        return ((rows + (0 if kind == ALONE_PACKED else frame(f - ref))) % 256).astype(np.uint8)

    return np.stack([frame(int(f)) for f in ids])


def _perturbations(state, rng):
    """(array name, entry, new value) changes of one saved state: any integer array, or a byte-run header."""
    names = [name for name, array in state.items() if array.dtype.kind in 'iu' and array.dtype != np.uint8
             or name == 'frames.kinds']
    while True:
        if 'frames.kinds' in state and rng.random() < 0.25:  # a byte-run header inside the payload
            runs = np.flatnonzero((state['frames.kinds'] == 1) & (state['frames.params'] > 0))
            i = rng.choice(runs)
            at = int(state['frames.offsets'][i]) + int(rng.integers(0, 2 * state['frames.params'][i]))
            start = len(state['frames.payload_start'])
            name, entry = ('frames.payload_start', at) if at < start else ('frames.payload_end', at - start)
            yield name, entry, int(rng.integers(0, 256))
            continue
        name = names[rng.integers(len(names))]
        entry = int(rng.integers(state[name].size))
        value = int(state[name].reshape(-1)[entry])
        new = int(rng.choice([value + 1, value - 1, value + 2, value - 3, 0, -1, 2**31 - 1, -2**40,
                              int(rng.integers(-5, 2 * abs(value) + 10))]))
        if new != value:
            info = np.iinfo(state[name].dtype)
            yield name, entry, min(max(new, info.min), info.max)


def fuzz_replay_snapshots(work_dir, cases, seed):
    """Run `cases` perturbations per mode; print one line per outcome and a JSON summary of their counts."""
    from tests.test_replay_buffer import make_episodes
    cfg, rng, path = compose_cfg(), np.random.default_rng(seed), os.path.join(work_dir, 'snapshot.pt')
    outcomes = {}
    for mode in FUZZ_MODES:
        source = _fuzz_buffer(mode)
        for step in make_episodes(np.random.default_rng(0), [30, 25, 40], 3, FUZZ_SHAPE, 2):
            source.add(step)
        saved = {key: np.array(value) for key, value in source.state_dict().items()}
        assert mode != 'entropy' or source._frames.entropy_frames > 0
        perturbations = _perturbations(saved, rng)
        for case in range(cases):
            name, entry, value = next(perturbations)
            print(f'{mode} {case}: {name}[{entry}] = {value}', end=' ', flush=True)  # the last line if it crashes
            state = {key: array.copy() for key, array in saved.items()}
            state[name].reshape(-1)[entry] = value
            snapshot.save(Path(path), cfg, {'replay': snapshot.to_tensors(state)})
            buffer = _fuzz_buffer(mode)
            try:
                buffer.load_state_dict(snapshot.to_arrays(snapshot.load(Path(path), cfg)['replay']))
            except (ValueError, snapshot.SnapshotError):
                outcome = 'refused'
            else:
                try:
                    buffer.sample()
                    buffer.sample()
                    outcome = 'sampled'
                except (ValueError, RuntimeError):  # ids the store does not hold, or no transition left
                    outcome = 'refused at sample'
                store = buffer._frames
                held = np.arange(max(store.count - store.capacity, 0), store.count)
                if 'frames.counters' in state and len(state['frames.counters']) == 4:
                    held = held[held >= state['frames.counters'][3]]
                out = np.empty((len(held), store.frame_size), np.uint8)
                store.decode(held, out)
                frames = {key.removeprefix('frames.'): array for key, array in state.items()
                          if key.startswith('frames.')}
                assert np.array_equal(out, _reference_frames(frames, held, store.capacity)), 'decoded other frames'
            print(outcome, flush=True)
            outcomes[f'{mode} {outcome}'] = outcomes.get(f'{mode} {outcome}', 0) + 1
    print(json.dumps(outcomes))


def test_fuzzed_snapshots_are_refused_or_decode_exactly_never_crash(tmp_path):
    code = f'import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_snapshot import fuzz_replay_snapshots; ' \
           f'fuzz_replay_snapshots({str(tmp_path)!r}, 120, 0)'
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'exit {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}'
    outcomes = json.loads(proc.stdout.splitlines()[-1])
    for mode in FUZZ_MODES:  # each mode both refused some changes and took others
        assert outcomes.get(f'{mode} refused', 0) > 0, outcomes
        assert outcomes.get(f'{mode} sampled', 0) > 0, outcomes
