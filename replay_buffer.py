"""In-RAM replay buffer for `compression=half|full`: a ring of time steps over a frame store.

Every added time step contributes exactly one new frame (the newest of its stack), so step id
and frame id coincide. A stack is rebuilt from the frame ids [t-k+1, ..., t], each clamped to
the first frame of the episode (which DrQ-v2 repeats to fill the stack at reset); the episode
start pointer kept per step is the index array that makes this a vectorized gather.

A sample follows upstream DrQ-v2 exactly: for an action step t (not an episode's first step)
it returns (obs_{t-1}, a_t, sum_i gamma^i (prod_{j<i} d_{t+j}) r_{t+i}, prod_i gamma d_{t+i},
obs_{t+n-1}), for i < n. It is valid when steps t..t+n-1 belong to one episode and every frame
of both stacks is still stored; transitions are drawn uniformly over the valid ones.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from frame_stacks import StackLayout, decode_stacks, reset_padding, shifted
from obs_comp import COMPRESSIONS, bytes_per_step, check_saved_arrays, make_frame_store

# the arrays of a batch, in the order sample() returns them
BATCH_KEYS = ("obs", "action", "reward", "discount", "next_obs")


class ReplayBuffer:
    """Uniform n-step replay over frame-stacked pixel observations kept in RAM once per frame."""

    def __init__(self, *, obs_shape: tuple[int, ...], action_shape: tuple[int, ...], capacity: int,
                 frame_stack: int, nstep: int, discount: float, batch_size: int, compression: str,
                 seed: int | None = None, key_interval: int = 4, anchor_interval: int = 100, **full_options):
        obs_shape, action_shape = tuple(obs_shape), tuple(action_shape)
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}: expected one of {COMPRESSIONS}")
        if frame_stack < 1 or nstep < 1 or batch_size < 1:
            raise ValueError(f"frame_stack, nstep and batch_size must be >= 1, got {frame_stack}, {nstep}, {batch_size}")
        if len(obs_shape) != 3 or obs_shape[0] % frame_stack:
            raise ValueError(f"obs_shape {obs_shape} is not (frame_stack * C, H, W) for frame_stack={frame_stack}")
        if capacity < frame_stack + nstep:
            raise ValueError(f"capacity {capacity} is smaller than frame_stack + nstep = {frame_stack + nstep}")
        self.obs_shape, self.action_shape = obs_shape, action_shape
        self.capacity, self.frame_stack, self.nstep = capacity, frame_stack, nstep
        self.batch_size, self.compression = batch_size, compression
        self._discount = np.float32(discount)
        self._layout = StackLayout(obs_shape, frame_stack)
        self._frame_shape = self._layout.frame_shape
        # full_options (entropy, min_entropy_saving, decode_threads) tune obs_comp.DiffFrames
        self._frames = make_frame_store(compression, capacity, self._frame_shape,
                                        key_interval, anchor_interval, **full_options)
        self._action = np.zeros((capacity, *action_shape), dtype=np.float32)
        self._reward = np.zeros(capacity, dtype=np.float32)
        self._step_discount = np.zeros(capacity, dtype=np.float32)
        self._episode_start = np.zeros(capacity, dtype=np.int64)  # step id of the episode's first step
        self._last_obs = np.zeros(obs_shape, dtype=np.uint8)  # to check that each stack shifts by one frame
        self._total = 0  # steps ever added; the next step's id
        self._current_start = -1  # first step id of the episode being added; -1 before any
        self._episode_open = False
        self._newest_oldest_frame = -1  # oldest frame read by the newest complete transition
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self._total, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of every array the buffer holds."""
        arrays = (self._action, self._reward, self._step_discount, self._episode_start, self._last_obs)
        return self._frames.nbytes + sum(a.nbytes for a in arrays)

    @property
    def bytes_per_step(self) -> float:
        """RAM per stored step: capacity-sized arrays over capacity, content-sized storage over steps stored."""
        return bytes_per_step(self.nbytes, self._frames.content_nbytes, self.capacity, len(self))

    @property
    def can_sample(self) -> bool:
        """Whether at least one complete transition is stored."""
        return self._newest_oldest_frame >= self._first_stored()

    def add(self, time_step) -> None:
        """Store one ExtendedTimeStep (step_type, observation, action, reward, discount)."""
        obs = np.asarray(time_step.observation)
        if obs.shape != self.obs_shape or obs.dtype != np.uint8:
            raise ValueError(f"observation has shape {obs.shape} and dtype {obs.dtype}; "
                             f"expected {self.obs_shape} uint8")
        action = np.asarray(time_step.action, dtype=np.float32)
        if action.shape != self.action_shape:
            raise ValueError(f"action has shape {action.shape}; expected {self.action_shape}")
        reward = np.float32(0.0 if time_step.reward is None else time_step.reward)
        step_discount = np.float32(1.0 if time_step.discount is None else time_step.discount)
        first = bool(time_step.first())
        frames = self._layout.frames(obs)
        if first:
            if reset_padding(frames) != "repeat":
                raise ValueError("first observation of an episode must repeat its frame across the stack "
                                 "(DrQ-v2 frame stacking); its frames differ")
        else:
            if not self._episode_open:
                raise ValueError("got a mid-episode time step without a first() step before it")
            if not shifted(self._layout.frames(self._last_obs), frames):
                raise ValueError("observation is not the previous stack shifted by one frame; "
                                 "frames must be added in the order the environment produced them")

        with self._lock:
            step = self._total
            slot = step % self.capacity
            if first:
                self._current_start = step
            self._frames.append(frames[-1].reshape(self._frame_shape), episode_start=first)
            self._action[slot] = action
            self._reward[slot] = reward
            self._step_discount[slot] = step_discount
            self._episode_start[slot] = self._current_start
            self._last_obs[...] = obs
            self._episode_open = not time_step.last()
            if step - self._current_start >= self.nstep:  # completes the transition at step - nstep + 1
                self._newest_oldest_frame = max(step - self.nstep + 1 - self.frame_stack, self._current_start)
            self._total = step + 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (views, not copies) that restore contents and sampler via load_state_dict."""
        with self._lock:  # the prefetch thread advances the generator while it samples
            state = {f"frames.{key}": np.asarray(value) for key, value in self._frames.state_dict().items()}
            for name in self._saved_arrays(len(self)):
                state[name] = getattr(self, f"_{name}")[:len(self)]
            state.update(last_obs=self._last_obs, config=_json_array(self._config()),
                         generator=_json_array(self._rng.bit_generator.state),
                         counters=np.array([self._total, self._current_start, self._episode_open,
                                            self._newest_oldest_frame], dtype=np.int64))
            return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into a buffer of the same configuration; ValueError leaves it unchanged."""
        missing = {"config", "generator", "counters", "last_obs", *self._saved_arrays(0)} - set(state)
        if missing:
            raise ValueError(f"saved buffer state lacks {sorted(missing)}")
        saved = json.loads(bytes(state["config"]).decode())
        if saved != self._config():
            raise ValueError(f"saved buffer has configuration {saved}, this buffer {self._config()}; "
                             "load it into a buffer built with the same settings")
        check_saved_arrays(state, {"counters": ((4,), np.int64)})
        total, current_start, episode_open, newest_oldest_frame = (int(x) for x in state["counters"])
        expected = {**self._saved_arrays(min(total, self.capacity)), "last_obs": (self.obs_shape, np.uint8)}
        check_saved_arrays(state, expected)
        # each step added one frame, and a step's episode starts at or before it (the frame store checks the rest)
        steps = np.arange(max(total - self.capacity, 0), total)
        episode_start = np.asarray(state["episode_start"])[steps % self.capacity] if total else steps
        frames_appended = np.asarray(state.get("frames.counters", [])).reshape(-1)[:1].tolist()
        started = current_start == -1 if total == 0 else 0 <= current_start < total
        if frames_appended != [total] or not started or np.any(episode_start > steps) or np.any(episode_start < 0):
            raise ValueError(f"saved counters {[total, current_start, episode_open, newest_oldest_frame]} and "
                             "episode starts do not match the saved frames")
        generator = np.random.default_rng()
        generator.bit_generator.state = json.loads(bytes(state["generator"]).decode())
        with self._lock:
            self._frames.load_state_dict({key.removeprefix("frames."): value for key, value in state.items()
                                          if key.startswith("frames.")})
            for name in expected:
                getattr(self, f"_{name}")[:len(state[name])] = state[name]
            self._total, self._current_start = total, current_start
            self._episode_open, self._newest_oldest_frame = bool(episode_open), newest_oldest_frame
            self._rng = generator

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Draw batch_size transitions: (obs, action, reward (B,1), discount (B,1), next_obs) as numpy."""
        with self._lock:
            return self._sample_locked()

    def _sample_locked(self) -> tuple[np.ndarray, ...]:
        """sample() for a caller that holds the lock."""
        if not self.can_sample:
            raise RuntimeError("the replay buffer holds no complete transition yet "
                               f"(an episode needs at least nstep={self.nstep} steps after its first)")
        return self._gather(self._draw(self.batch_size))

    def _gather(self, steps: np.ndarray) -> tuple[np.ndarray, ...]:
        """The transitions whose action steps are `steps` (all valid)."""
        start = self._episode_start[steps % self.capacity]
        frames = np.empty((2 * len(steps), self.frame_stack, self._layout.frame_size), dtype=np.uint8)
        decode_stacks(self._frames, np.concatenate([steps - 1, steps + self.nstep - 1]),
                      np.concatenate([start, start]), frames)
        obs = self._layout.stacks(frames).reshape(2, len(steps), *self.obs_shape)

        action = self._action[steps % self.capacity]
        reward = np.zeros(len(steps), dtype=np.float32)
        discount = np.ones(len(steps), dtype=np.float32)
        for i in range(self.nstep):  # same float32 arithmetic as upstream's per-sample loop
            slot = (steps + i) % self.capacity
            reward += discount * self._reward[slot]
            discount *= self._step_discount[slot] * self._discount
        return obs[0], action, reward[:, None], discount[:, None], obs[1]

    def __iter__(self) -> "ReplayBuffer":
        return self

    def __next__(self) -> tuple[np.ndarray, ...]:
        return self.sample()

    def _saved_arrays(self, stored: int) -> dict[str, tuple[tuple[int, ...], type]]:
        """Shape and dtype of the per-step arrays state_dict saves when `stored` steps are held."""
        return {"action": ((stored, *self.action_shape), np.float32), "reward": ((stored,), np.float32),
                "step_discount": ((stored,), np.float32), "episode_start": ((stored,), np.int64)}

    def _config(self) -> dict:
        return dict(obs_shape=list(self.obs_shape), action_shape=list(self.action_shape), capacity=self.capacity,
                    frame_stack=self.frame_stack, nstep=self.nstep, compression=self.compression)

    def _first_stored(self) -> int:
        return max(self._total - self.capacity, 0)

    def _oldest_frame(self, steps: np.ndarray) -> np.ndarray:
        """Oldest frame id a transition at `steps` reads: the start of obs_{t-1}'s stack."""
        return np.maximum(steps - self.frame_stack, self._episode_start[steps % self.capacity])

    def _valid(self, steps: np.ndarray) -> np.ndarray:
        start = self._episode_start[steps % self.capacity]
        last = steps + self.nstep - 1
        return ((steps > start) & (last < self._total)
                & (self._episode_start[last % self.capacity] == start)
                & (self._oldest_frame(steps) >= self._first_stored()))

    def _draw(self, count: int) -> np.ndarray:
        """`count` action steps drawn uniformly from the valid ones (rejection sampling)."""
        low, high = self._first_stored() + 1, self._total - self.nstep + 1
        chosen = []
        for _ in range(16):
            candidates = self._rng.integers(low, high, size=count)
            chosen.append(candidates[self._valid(candidates)])
            count -= len(chosen[-1])
            if count == 0:
                return np.concatenate(chosen)
        # valid steps are rare (very short episodes): draw among them directly
        every = np.arange(low, high)
        chosen.append(self._rng.choice(every[self._valid(every)], size=count))
        return np.concatenate(chosen)


def _json_array(value: object) -> np.ndarray:
    """A JSON-serialisable value as a uint8 array, so that a state dict holds numeric arrays only."""
    # a bytearray, unlike bytes, gives a writable array, which torch.from_numpy expects
    return np.frombuffer(bytearray(json.dumps(value).encode()), dtype=np.uint8)


class Prefetcher:
    """Batches of a ReplayBuffer as tensors (pinned on CUDA), each sampled in a background thread while the
    previous one is in use.

    The next batch is drawn when the current one is handed out: the buffer's lock is taken right then and
    released by the thread once the batch is gathered, so adds wait for it and what is drawn never depends
    on thread timing. state_dict() is that drawn-ahead batch: saved with the buffer's state_dict (taken
    after it) and given back as `pending`, it makes a restored run hand out the batches the original would.
    """

    def __init__(self, buffer: ReplayBuffer, device: torch.device | str,
                 pending: dict[str, np.ndarray] | None = None):
        self._buffer = buffer
        self._pin = torch.device(device).type == "cuda"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-prefetch")
        self._next: Future | None = None
        if pending:
            self._next = Future()
            self._next.set_result(self._tensors(tuple(np.array(pending[key]) for key in BATCH_KEYS)))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self._next is None:
            self._request()
        batch = self._next.result()  # re-raises what sampling raised
        self._request()
        return batch

    def state_dict(self) -> dict[str, np.ndarray]:
        """The batch drawn ahead and not handed out yet, as numpy arrays by BATCH_KEYS ({} before the first)."""
        if self._next is None:
            return {}
        return {key: x.numpy() for key, x in zip(BATCH_KEYS, self._next.result())}

    def close(self) -> None:
        """Let the batch being drawn finish (it holds the buffer's lock) and stop the thread."""
        self._executor.shutdown(wait=True)

    def _request(self) -> None:
        self._buffer._lock.acquire()
        try:
            self._next = self._executor.submit(self._sample_and_release)
        except BaseException:
            self._buffer._lock.release()
            raise

    def _sample_and_release(self) -> tuple[torch.Tensor, ...]:
        try:
            batch = self._buffer._sample_locked()
        finally:
            self._buffer._lock.release()
        return self._tensors(batch)

    def _tensors(self, batch: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        tensors = tuple(torch.from_numpy(x) for x in batch)
        return tuple(x.pin_memory() for x in tensors) if self._pin else tensors
