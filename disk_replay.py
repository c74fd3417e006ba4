"""Upstream DrQ-v2 replay (the compression=none baseline): episodes saved to disk as .npz files,
loaded into the memory of DataLoader workers and sampled as n-step transitions."""
import datetime
import io
import random
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset


def episode_len(episode: dict) -> int:
    """Number of transitions in an episode (the first time step only carries the reset observation)."""
    return next(iter(episode.values())).shape[0] - 1


def save_episode(episode: dict, fn: Path) -> None:
    """Write an episode as a compressed .npz in a single write so readers never see half a file."""
    with io.BytesIO() as bs:
        np.savez_compressed(bs, **episode)
        bs.seek(0)
        with fn.open('wb') as f:
            f.write(bs.read())


def load_episode(fn: Path) -> dict:
    """Read an episode written by save_episode."""
    with fn.open('rb') as f:
        data = np.load(f)
        return {k: data[k] for k in data.keys()}


def _parse_fn(fn: Path) -> tuple:
    """(episode index, episode length) from '<timestamp>_<idx>_<len>.npz'."""
    _, eps_idx, eps_len = fn.stem.split('_')
    return int(eps_idx), int(eps_len)


class ReplayBufferStorage:
    """Collects the time steps of the running episode and saves each finished episode to replay_dir.

    The replay dir holds this run's episodes only: a new storage deletes the episode files an earlier run
    left there, unless it continues that run from a snapshot's state (then only the episodes written
    after the snapshot are deleted). An episode with fewer than nstep transitions holds no n-step
    transition to sample (as in the in-RAM buffer), so it is not written.
    """

    def __init__(self, data_specs: Sequence[Any], replay_dir: Union[str, Path], max_size: Optional[int] = None,
                 nstep: int = 1, state: Optional[dict[str, np.ndarray]] = None) -> None:
        self._data_specs = data_specs
        self._replay_dir = Path(replay_dir)
        self._replay_dir.mkdir(parents=True, exist_ok=True)
        self._max_size = max_size
        self._nstep = nstep
        self._step_nbytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in data_specs)
        self._current_episode = defaultdict(list)
        if state is None:
            state = {'episode_lens': np.zeros(0, dtype=np.int64), 'next_idx': np.array(0, dtype=np.int64)}
            leftovers = len(list(self._replay_dir.glob('*.npz')))
            if leftovers:
                print(f'deleting {leftovers} episode files of an earlier run from {self._replay_dir} '
                      '(no snapshot.pt resumes them)', flush=True)
        self.load_state_dict(state)

    def __len__(self) -> int:
        return self._num_transitions

    @property
    def nbytes(self) -> int:
        """Bytes the loader workers hold in RAM: the newest stored episodes that fit in max_size."""
        total, size = 0, 0
        for eps_len in reversed(self._episode_lens):
            if self._max_size is not None and size + eps_len > self._max_size:
                break
            size += eps_len
            total += (eps_len + 1) * self._step_nbytes
        return total

    @property
    def bytes_per_step(self) -> float:
        """RAM per stored transition held by the loader workers."""
        return self.nbytes / max(len(self), 1)

    def add(self, time_step: Any) -> None:
        """Append one time step; on the episode's last step write the episode to disk."""
        for spec in self._data_specs:
            value = getattr(time_step, spec.name)
            # Cast instead of asserting dtypes: envs hand out float32/float64 scalars interchangeably.
            value = np.asarray(value, dtype=spec.dtype)
            if value.ndim == 0:
                value = np.full(spec.shape, value, spec.dtype)
            assert value.shape == spec.shape, (spec.name, value.shape, spec.shape)
            self._current_episode[spec.name].append(value)
        if time_step.last():
            episode = {spec.name: np.array(self._current_episode[spec.name], spec.dtype)
                       for spec in self._data_specs}
            self._current_episode = defaultdict(list)
            if episode_len(episode) >= self._nstep:
                self._store_episode(episode)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Counters of the stored episodes (the episodes themselves stay in replay_dir)."""
        return {'episode_lens': np.array(self._episode_lens, dtype=np.int64),
                'next_idx': np.array(self._next_idx, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Continue from state_dict's counters; episode files written after it are deleted."""
        episode_lens, next_idx = np.asarray(state['episode_lens']), int(state['next_idx'])
        if episode_lens.shape != (next_idx,):
            raise ValueError(f'saved storage lists {episode_lens.shape} episode lengths for {next_idx} episodes')
        # Episodes after the snapshot are collected again, and those of an earlier run were never this
        # run's: kept, the loader would sample them.
        for fn in self._replay_dir.glob('*.npz'):
            if _parse_fn(fn)[0] >= next_idx:
                fn.unlink()
        self._episode_lens = episode_lens.tolist()
        self._num_transitions = sum(self._episode_lens)
        self._next_idx = next_idx

    def _store_episode(self, episode: dict) -> None:
        eps_idx = self._next_idx
        eps_len = episode_len(episode)
        ts = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
        save_episode(episode, self._replay_dir / f'{ts}_{eps_idx}_{eps_len}.npz')
        self._next_idx += 1
        self._episode_lens.append(eps_len)
        self._num_transitions += eps_len


class ReplayBuffer(IterableDataset):
    """Loads this worker's shard of episodes (index % num_workers) into memory and yields n-step samples.

    Without save_snapshot a worker deletes an episode's file once it has loaded it, except while some
    shard may still be empty (fewer than num_workers episodes written so far): then the file stays until
    the worker sees a later episode, so that workers with nothing of their own can borrow it.
    """

    def __init__(self, replay_dir: Union[str, Path], max_size: int, num_workers: int, nstep: int,
                 discount: float, fetch_every: int, save_snapshot: bool) -> None:
        self._replay_dir = Path(replay_dir)
        self._size = 0
        self._max_size = max_size
        self._num_workers = max(1, num_workers)
        self._episode_fns: list = []
        self._episodes: dict = {}
        # Episodes of other shards, loaded only while this worker's shard is still empty.
        self._borrowed: set = set()
        # Own episodes loaded but left on disk for borrowers, and the newest episode index seen.
        self._kept_for_borrowers: set = set()
        self._newest_idx = -1
        self._nstep = nstep
        self._discount = discount
        self._fetch_every = fetch_every
        self._samples_since_last_fetch = fetch_every
        self._save_snapshot = save_snapshot

    def _sample_episode(self) -> dict:
        eps_fn = random.choice(self._episode_fns)
        return self._episodes[eps_fn]

    def _drop_episode(self, eps_fn: Path) -> None:
        self._episode_fns.remove(eps_fn)
        episode = self._episodes.pop(eps_fn)
        if eps_fn in self._borrowed:
            self._borrowed.discard(eps_fn)
        else:
            self._size -= episode_len(episode)
            self._kept_for_borrowers.discard(eps_fn)
            eps_fn.unlink(missing_ok=True)

    def _store_episode(self, eps_fn: Path, borrowed: bool = False) -> bool:
        try:
            episode = load_episode(eps_fn)
        except Exception:
            # Deleted by its owner or still being written; try again at the next fetch.
            return False
        eps_len = episode_len(episode)
        if borrowed:
            self._borrowed.add(eps_fn)
        else:
            while self._size + eps_len > self._max_size:
                own = [fn for fn in self._episode_fns if fn not in self._borrowed]
                if not own:
                    break
                self._drop_episode(own[0])
            self._size += eps_len
        self._episode_fns.append(eps_fn)
        self._episode_fns.sort(key=_parse_fn)
        self._episodes[eps_fn] = episode

        if not borrowed and not self._save_snapshot:
            if self._some_shard_may_be_empty():
                self._kept_for_borrowers.add(eps_fn)
            else:
                eps_fn.unlink(missing_ok=True)
        return True

    def _some_shard_may_be_empty(self) -> bool:
        """True until an episode of every shard has been written (seen index >= num_workers - 1)."""
        return self._newest_idx < self._num_workers - 1

    def _release_kept_files(self) -> None:
        if not self._some_shard_may_be_empty():
            for eps_fn in self._kept_for_borrowers:
                eps_fn.unlink(missing_ok=True)
            self._kept_for_borrowers.clear()

    def _try_fetch(self) -> None:
        if self._samples_since_last_fetch < self._fetch_every:
            return
        self._samples_since_last_fetch = 0
        worker_info = torch.utils.data.get_worker_info()
        worker_id = worker_info.id if worker_info is not None else 0
        # Episodes too short for one n-step transition are never sampled (the storage does not write them).
        eps_fns = [fn for fn in sorted(self._replay_dir.glob('*.npz'), key=_parse_fn, reverse=True)
                   if _parse_fn(fn)[1] >= self._nstep]
        if eps_fns:
            self._newest_idx = max(self._newest_idx, _parse_fn(eps_fns[0])[0])
        self._release_kept_files()
        fetched_size = 0
        fetched_own = False
        for eps_fn in eps_fns:
            eps_idx, eps_len = _parse_fn(eps_fn)
            if eps_idx % self._num_workers != worker_id:
                continue
            if eps_fn in self._borrowed:
                self._drop_episode(eps_fn)
            if eps_fn in self._episodes:
                break
            if fetched_size + eps_len > self._max_size:
                break
            fetched_size += eps_len
            if not self._store_episode(eps_fn):
                break
            fetched_own = True
        if fetched_own:
            for eps_fn in list(self._borrowed):
                self._drop_episode(eps_fn)
        elif not self._episode_fns:
            # Nothing in this shard yet (fewer episodes than workers): borrow the newest episode
            # of any shard, otherwise this worker blocks the main process before a second episode
            # can ever be collected.
            for eps_fn in eps_fns:
                if self._store_episode(eps_fn, borrowed=True):
                    break

    def _sample(self) -> tuple:
        try:
            self._try_fetch()
        except Exception:
            traceback.print_exc()
        while not self._episode_fns:
            if torch.utils.data.get_worker_info() is None:
                raise RuntimeError(f'no complete episode in {self._replay_dir} to sample from')
            time.sleep(0.1)
            self._samples_since_last_fetch = self._fetch_every
            self._try_fetch()
        self._samples_since_last_fetch += 1
        episode = self._sample_episode()
        # +1 skips the reset step, which has an observation but no action/reward.
        idx = np.random.randint(0, episode_len(episode) - self._nstep + 1) + 1
        obs = episode['observation'][idx - 1]
        action = episode['action'][idx]
        next_obs = episode['observation'][idx + self._nstep - 1]
        reward = np.zeros_like(episode['reward'][idx])
        discount = np.ones_like(episode['discount'][idx])
        for i in range(self._nstep):
            reward += discount * episode['reward'][idx + i]
            discount *= episode['discount'][idx + i] * self._discount
        return obs, action, reward, discount, next_obs

    def __iter__(self):
        while True:
            yield self._sample()


def _worker_init_fn(worker_id: int) -> None:
    # torch gives every worker a distinct seed derived from the (seeded) main process RNG.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_replay_loader(replay_dir: Union[str, Path], max_size: int, batch_size: int,
                       num_workers: int, save_snapshot: bool, nstep: int,
                       discount: float) -> DataLoader:
    """DataLoader over the on-disk episodes; each worker keeps max_size // num_workers transitions."""
    max_size_per_worker = max_size // max(1, num_workers)
    iterable = ReplayBuffer(replay_dir, max_size_per_worker, num_workers, nstep, discount,
                            fetch_every=1000, save_snapshot=save_snapshot)
    # 'fork' explicitly: under Hydra's joblib launcher the inherited default context is loky's,
    # which cannot start DataLoader workers.
    context = 'fork' if num_workers > 0 else None
    return DataLoader(iterable, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init_fn,
                      multiprocessing_context=context)
