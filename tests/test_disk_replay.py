"""Tests for the upstream-style on-disk replay (compression=none)."""
import numpy as np
import pytest
import torch
from dm_env import StepType, specs
from torch.utils.data import DataLoader

from disk_replay import ReplayBuffer, ReplayBufferStorage, _worker_init_fn, load_episode, make_replay_loader
from envs import ExtendedTimeStep

OBS_SHAPE = (3, 4, 4)
ACTION_SHAPE = (2,)
DATA_SPECS = (specs.Array(OBS_SHAPE, np.uint8, 'observation'),
              specs.Array(ACTION_SHAPE, np.float32, 'action'),
              specs.Array((1,), np.float32, 'reward'),
              specs.Array((1,), np.float32, 'discount'))
STEP_BYTES = 3 * 4 * 4 + 2 * 4 + 4 + 4

# Time step t (0 = reset) of the synthetic episode: observation filled with t + offset,
# action filled with t, distinct rewards and discounts.
REWARDS = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
DISCOUNTS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
EPISODE_LEN = len(REWARDS) - 1


def add_episode(storage, offset=0, length=EPISODE_LEN, scalar_dtype=np.float32):
    for t in range(length + 1):
        step_type = StepType.FIRST if t == 0 else StepType.LAST if t == length else StepType.MID
        storage.add(ExtendedTimeStep(
            step_type=step_type,
            reward=scalar_dtype(REWARDS[t]),
            discount=scalar_dtype(DISCOUNTS[t]),
            observation=np.full(OBS_SHAPE, t + offset, np.uint8),
            action=np.full(ACTION_SHAPE, t, np.float32)))


def expected_nstep(idx, nstep, gamma):
    reward, discount = 0.0, 1.0
    for i in range(nstep):
        reward += discount * REWARDS[idx + i]
        discount *= DISCOUNTS[idx + i] * gamma
    return reward, discount


def test_storage_writes_npz_episodes(tmp_path):
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage)
    assert len(storage) == EPISODE_LEN
    assert len(list(tmp_path.glob('*.npz'))) == 1
    add_episode(storage, length=3)
    files = sorted(tmp_path.glob('*.npz'), key=lambda f: int(f.stem.split('_')[1]))
    assert [f.stem.split('_')[1:] for f in files] == [['0', str(EPISODE_LEN)], ['1', '3']]
    assert len(storage) == EPISODE_LEN + 3
    episode = load_episode(files[0])
    assert episode['observation'].shape == (EPISODE_LEN + 1, *OBS_SHAPE)
    assert episode['observation'].dtype == np.uint8
    assert episode['reward'].dtype == np.float32 and episode['reward'].shape == (EPISODE_LEN + 1, 1)
    np.testing.assert_allclose(episode['reward'][:, 0], REWARDS)
    np.testing.assert_allclose(episode['discount'][:, 0], DISCOUNTS, rtol=1e-6)



def test_new_run_deletes_an_earlier_runs_episodes_and_samples_only_its_own(tmp_path, capsys):
    earlier = ReplayBufferStorage(DATA_SPECS, tmp_path)
    for _ in range(3):
        add_episode(earlier, offset=100)
    state = earlier.state_dict()
    # Continuing from a snapshot's state keeps the episodes it lists.
    assert len(ReplayBufferStorage(DATA_SPECS, tmp_path, state=state)) == 3 * EPISODE_LEN
    assert len(list(tmp_path.glob('*.npz'))) == 3

    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)  # a new run: no snapshot resumes those episodes
    assert f'deleting 3 episode files of an earlier run from {tmp_path}' in capsys.readouterr().out
    assert len(storage) == 0 and storage.nbytes == 0 and not list(tmp_path.glob('*.npz'))
    add_episode(storage)
    assert [f.stem.split('_', 1)[1] for f in tmp_path.glob('*.npz')] == [f'0_{EPISODE_LEN}']
    loader = make_replay_loader(tmp_path, max_size=1000, batch_size=64, num_workers=0,
                                save_snapshot=True, nstep=1, discount=0.99)
    obs = next(iter(loader))[0]
    assert int(obs.max()) < 100  # every sample from this run's episode


def test_storage_state_round_trip_drops_episodes_after_the_snapshot(tmp_path):
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage)
    add_episode(storage, length=3)
    state = storage.state_dict()
    add_episode(storage, length=2)  # after the snapshot: written, then the run is killed
    resumed = ReplayBufferStorage(DATA_SPECS, tmp_path, state=state)
    assert len(resumed) == EPISODE_LEN + 3 and resumed.nbytes == (EPISODE_LEN + 3 + 2) * STEP_BYTES
    assert sorted(f.stem.split('_', 1)[1] for f in tmp_path.glob('*.npz')) == [f'0_{EPISODE_LEN}', '1_3']
    add_episode(resumed, length=4)  # collected again under the next index
    assert sorted(f.stem.split('_', 1)[1] for f in tmp_path.glob('*.npz'))[-1] == '2_4'
    with pytest.raises(ValueError, match='lists \\(2,\\) episode lengths for 3 episodes'):
        resumed.load_state_dict({**state, 'next_idx': np.array(3)})


@pytest.mark.parametrize('scalar_dtype', [np.float32, np.float64, float])
def test_storage_casts_scalars_to_spec_dtype(tmp_path, scalar_dtype):
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage, scalar_dtype=scalar_dtype)
    episode = load_episode(next(tmp_path.glob('*.npz')))
    assert episode['reward'].dtype == np.float32
    assert episode['discount'].dtype == np.float32


@pytest.mark.parametrize('nstep', [1, 3])
@pytest.mark.parametrize('save_snapshot', [True, False])
def test_loader_returns_exact_nstep_transitions(tmp_path, nstep, save_snapshot):
    gamma = 0.99
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage)
    loader = make_replay_loader(tmp_path, max_size=1000, batch_size=32, num_workers=0,
                                save_snapshot=save_snapshot, nstep=nstep, discount=gamma)
    seen = set()
    replay_iter = iter(loader)
    for _ in range(10):
        obs, action, reward, discount, next_obs = next(replay_iter)
        assert obs.dtype == next_obs.dtype == torch.uint8
        assert reward.shape == discount.shape == (32, 1)
        assert reward.dtype == discount.dtype == torch.float32
        for i in range(32):
            idx = int(obs[i, 0, 0, 0]) + 1
            seen.add(idx)
            assert (obs[i] == idx - 1).all()
            assert (action[i] == idx).all()
            assert (next_obs[i] == idx + nstep - 1).all()
            exp_reward, exp_discount = expected_nstep(idx, nstep, gamma)
            assert float(reward[i, 0]) == pytest.approx(exp_reward, rel=1e-6)
            assert float(discount[i, 0]) == pytest.approx(exp_discount, rel=1e-6)
    assert seen == set(range(1, EPISODE_LEN - nstep + 2))
    assert (len(list(tmp_path.glob('*.npz'))) == 1) == save_snapshot


def test_nbytes_counts_newest_episodes_within_max_size(tmp_path):
    episode_bytes = (EPISODE_LEN + 1) * STEP_BYTES
    for max_size, kept in [(None, 3), (3 * EPISODE_LEN, 3), (2 * EPISODE_LEN, 2),
                           (2 * EPISODE_LEN - 1, 1)]:
        storage = ReplayBufferStorage(DATA_SPECS, tmp_path / str(max_size), max_size=max_size)
        assert storage.nbytes == 0
        for k in range(3):
            add_episode(storage, offset=k)
        assert storage.nbytes == kept * episode_bytes
        assert len(storage) == 3 * EPISODE_LEN


def test_worker_with_empty_shard_borrows_an_episode(tmp_path):
    # Two workers but only one episode: without borrowing, worker 1 would never yield a batch.
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage)
    loader = make_replay_loader(tmp_path, max_size=1000, batch_size=4, num_workers=2,
                                save_snapshot=False, nstep=1, discount=0.99)
    loader.timeout = 60
    replay_iter = iter(loader)
    batches = [next(replay_iter) for _ in range(4)]
    assert all(b[0].shape == (4, *OBS_SHAPE) for b in batches)
    del replay_iter


def test_episode_shorter_than_nstep_is_not_written_and_the_loader_skips_one(tmp_path):
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path, nstep=3)
    add_episode(storage, length=2, offset=100)  # holds no 3-step transition
    assert len(storage) == 0 and not list(tmp_path.glob('*.npz'))
    add_episode(storage)
    assert len(storage) == EPISODE_LEN and len(list(tmp_path.glob('*.npz'))) == 1
    # A loader reading a directory written by other means skips such an episode too.
    other = ReplayBufferStorage(DATA_SPECS, tmp_path / 'other', nstep=1)
    add_episode(other, length=2, offset=100)
    add_episode(other)
    loader = make_replay_loader(tmp_path / 'other', max_size=1000, batch_size=64, num_workers=0,
                                save_snapshot=True, nstep=3, discount=0.99)
    replay_iter = iter(loader)
    for _ in range(5):
        obs = next(replay_iter)[0]
        assert int(obs.max()) < 100


def test_files_kept_for_borrowing_are_deleted_once_every_shard_has_an_episode(tmp_path):
    storage = ReplayBufferStorage(DATA_SPECS, tmp_path)
    add_episode(storage)
    # fetch_every=1: every worker looks for new episodes at every sample
    dataset = ReplayBuffer(tmp_path, max_size=1000, num_workers=2, nstep=1, discount=0.99, fetch_every=1,
                           save_snapshot=False)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=_worker_init_fn,
                        multiprocessing_context='fork', timeout=60)
    replay_iter = iter(loader)
    for _ in range(4):  # both workers sample: worker 1 from episode 0, which stays on disk for it
        next(replay_iter)
    assert len(list(tmp_path.glob('*.npz'))) == 1
    for offset in (1, 2, 3):
        add_episode(storage, offset=offset)
    for _ in range(200):
        next(replay_iter)
        if not list(tmp_path.glob('*.npz')):
            break
    # every episode loaded by its worker, and no file left behind
    assert not list(tmp_path.glob('*.npz'))
    del replay_iter
