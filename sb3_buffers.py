"""stable-baselines3 buffers that keep image observations compressed in RAM, losslessly.

    QRDQN("CnnPolicy", env, replay_buffer_class=CompressedReplayBuffer)        # DQN, QR-DQN, SAC, TD3, ...
    DQN("CnnPolicy", env, replay_buffer_class=CompressedNStepReplayBuffer,
        replay_buffer_kwargs={"n_steps": 3, "gamma": 0.99})                    # n-step returns
    SAC("MultiInputPolicy", env, replay_buffer_class=CompressedDictReplayBuffer)  # Dict: camera + proprioception
    PPO("CnnPolicy", env, rollout_buffer_class=CompressedRolloutBuffer)        # PPO, A2C
    PPO("MultiInputPolicy", env, rollout_buffer_class=CompressedDictRolloutBuffer)

Each subclasses SB3's own buffer of its name and changes only where image observations are kept (the
Dict buffers: every image key's; other keys are SB3's to store). Each env streams its frames (per
image key) into one obs_comp frame store (`half`: raw frames, `full`: differentially encoded), and every
slot where SB3 keeps an observation stack holds a 64-bit stack code instead:
  * a stack equal to the env's previous stack (obs_t is next_obs_{t-1} unless an episode ended)
    reuses the previous stack's code;
  * a stack that is the previous one shifted by one frame adds its newest frame to the store;
  * a reset stack, padded with zeros (VecFrameStack) or with its own frame (FrameStackObservation),
    starts a new stream with its one frame;
  * any other stack is kept whole, as SB3 would keep it.
Every rule is checked byte for byte (frame_stacks.py), so every observation comes back exactly.
SB3's code does everything else: positions, actions, rewards, dones, time-outs and the index draws
from numpy's global RNG. It indexes the code arrays exactly where it would index observations, and
the codes are decoded on the way out, so the same add() calls under the same seed give sample() and
get() batches byte-identical to SB3's ReplayBuffer (optimize_memory_usage=False), NStepReplayBuffer,
DictReplayBuffer, RolloutBuffer and DictRolloutBuffer. Note that `.observations` (and
`.next_observations`) therefore hold codes, not images (for Dict buffers: at image keys).

Verified stacks add at most two frames per stored step (a reset obs and a next_obs), so a store of
`2 * buffer_size + frame_stack` frames (plus _SPARE) holds every frame a stored step refers to; the
buffers tell each store which frames no stored step needs any more (a full replay ring every
_RELEASE_EVERY steps), and their memory goes back (obs_comp).
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, Mapping, Optional

import numba
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import (DictReplayBuffer, DictRolloutBuffer, NStepReplayBuffer, ReplayBuffer,
                                              RolloutBuffer)
from stable_baselines3.common.preprocessing import get_obs_shape, is_image_space
from stable_baselines3.common.type_aliases import (DictReplayBufferSamples, DictRolloutBufferSamples,
                                                   ReplayBufferSamples, RolloutBufferSamples)
from stable_baselines3.common.vec_env import VecNormalize

from frame_stacks import (OTHER, RESET_ZEROS, SAME, SHIFTED, StackLayout, decode_stacks, follow_stacks,
                          follow_transition)
from kernels import append_frame
from obs_comp import COMPRESSIONS, DiffScratch, bytes_per_step, make_frame_store

# full's codec on Atari frames (bench/table2.py --sweep on the ten games of Table II): byte runs only, as
# obs_comp's entropy-coded differences (zstd when that sweep ran) saved little on most games and slowed sampling
KEY_INTERVAL, ANCHOR_INTERVAL = 3, 200
FULL_OPTIONS = {"entropy": False}
_RELEASE_EVERY = 16  # steps between releases of a full replay ring's oldest frames
# frames each store holds beyond what stored steps need: those of one add that failed part-way (a
# KeyboardInterrupt, or a MemoryError growing the pool of whole stacks) per pass of the ring
_SPARE = 2
# The space SB3 is shown when it builds its observation arrays: one int64 stack code per slot.
_CODE_SPACE = spaces.Box(low=np.iinfo(np.int64).min, high=np.iinfo(np.int64).max, shape=(1,), dtype=np.int64)
# FrameStreams.state, one record per env
STREAM_STATE = np.dtype([
    ("newest", np.int64),     # the code of the env's newest stack (< 0: none, or kept whole: nothing continues it)
    ("obs_code", np.int64),   # the code of the last transition's obs
    ("obs_kind", np.int64),   # how its obs followed the newest stack (frame_stacks' SAME, SHIFTED, ...)
    ("next_kind", np.int64),  # how its next_obs followed its obs
    ("outcome", np.int64),    # what a kernel's append that stored nothing returned (for the store's finish_append)
])
# Kernels that call into obs_comp or frame_stacks, or use their constants, are compiled in each process
# (a few seconds, when its first buffer is built): numba's disk cache would not notice a change in those files.
_NO_DISK_CACHE = {"cache": False, "nogil": True}
_FRAMES_UP = 8  # calls between an algorithm's _setup_model and the buffer's check of its n_steps (subclasses add some)


@numba.njit(cache=True, nogil=True)
def _stack_code(newest, env, n_envs, frame_stack, real, zero_padded):
    """The code of env's stack that ends at frame id `newest` and has `real` real frames (FrameStreams)."""
    return ((newest * n_envs + env) * frame_stack + real - 1) * 2 + zero_padded


@numba.njit(cache=True, nogil=True)
def _code_parts(code, n_envs, frame_stack):
    """(newest frame id, env, real frames, zero padded) of a stored stack's code."""
    rest, zero_padded = divmod(code, 2)
    rest, older_real = divmod(rest, frame_stack)
    newest, env = divmod(rest, n_envs)
    return newest, env, older_real + 1, zero_padded


@numba.njit(cache=True, nogil=True)
def _parse_codes(codes, n_envs, frame_stack):
    """(newest frame id, first real frame id, zero padded, env; env -1 for stacks kept whole) of each code."""
    n = codes.shape[0]
    newest, first, env = np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64)
    zero_padded = np.zeros(n, np.bool_)
    for i in range(n):
        if codes[i] >= 0:
            newest[i], env[i], real, zero_padded[i] = _code_parts(codes[i], n_envs, frame_stack)
            first[i] = newest[i] - real + 1
    return newest, first, zero_padded, env


@numba.njit(**_NO_DISK_CACHE)
def _next_stack(kind, newest_code, n_envs, frame_stack):
    """(episode start, real frames, zero padded) of a stack that follows the newest one as `kind` says (an append)."""
    if kind == SHIFTED:
        _, _, real, zero_padded = _code_parts(newest_code, n_envs, frame_stack)
        return False, min(real + 1, frame_stack), zero_padded
    return True, 1, np.int64(kind == RESET_ZEROS)


@numba.njit(**_NO_DISK_CACHE)
def _follow_in_store(kind, frames, env, state, block, arena, rows):
    """Make env's stack `frames` (K, F), which follows its newest as `kind` (not OTHER) says, its newest: whether
    done (False: the store's own append() must store its frame)."""
    if kind == SAME:
        return True
    n_envs, frame_stack = state.shape[0], frames.shape[0]
    episode_start, real, zero_padded = _next_stack(kind, state[env].newest, n_envs, frame_stack)
    newest = append_frame(frames[frame_stack - 1], episode_start, block, arena, rows)
    if newest < 0:
        state[env].outcome = newest
        return False
    state[env].newest = _stack_code(newest, env, n_envs, frame_stack, real, zero_padded)
    return True


@numba.njit(**_NO_DISK_CACHE)
def _store_transition(latest, obs, next_obs, state, env, block, arena, rows):
    """Make env's stacks obs, then next_obs (n_envs, K, F) its newest, in its store (kernel_args block, arena, rows):
    how many of the two it stored, their kinds in state. The caller stores the rest: from the first stack to be
    kept whole (OTHER) or whose frame the store's own append() must store."""
    obs_kind, next_kind = follow_transition(latest[env], obs[env], next_obs[env], state[env].newest >= 0)
    state[env].obs_kind, state[env].next_kind = obs_kind, next_kind
    if obs_kind == OTHER or not _follow_in_store(obs_kind, obs[env], env, state, block, arena, rows):
        return 0
    state[env].obs_code = state[env].newest
    if next_kind == OTHER or not _follow_in_store(next_kind, next_obs[env], env, state, block, arena, rows):
        return 1
    return 2


def _compile_kernels() -> None:
    """Compile the kernels numba does not cache on disk, for the types FrameStreams calls them with, on a tiny
    store: when the first buffer of a process is built rather than at its first add(), inside a timed run.
    _store_transition compiles the two it calls for the same types Python calls them with."""
    if _store_transition.signatures:
        return
    store = make_frame_store("half", 4, (8,), 1, 1)
    stacks = np.zeros((1, 2, 8), dtype=np.uint8)
    _store_transition(stacks.copy(), stacks, stacks, np.full(1, -1, dtype=STREAM_STATE), 0, *store.kernel_args)


def stack_layout(observation_space: spaces.Space, frame_stack: int, channels_last: Optional[bool],
                 owner: str) -> StackLayout:
    """Check that the space holds uint8 frame stacks and say where the frames lie (the first or last axis)."""
    if not isinstance(observation_space, spaces.Box) or observation_space.dtype != np.uint8 \
            or len(observation_space.shape) < 2:
        dict_space = isinstance(observation_space, spaces.Dict)
        hint = "CompressedDictReplayBuffer or CompressedDictRolloutBuffer" if dict_space else "SB3's own buffer"
        raise ValueError(f"{owner} stores uint8 image observations (a uint8 Box of 2 or more dimensions); "
                         f"got observation space {observation_space}. Use {hint} for this space.")
    shape = observation_space.shape
    if frame_stack < 1:
        raise ValueError(f"{owner}: frame_stack must be >= 1 (1 for observations without frame stacking), "
                         f"got {frame_stack}")
    if channels_last is None:  # whichever end frame_stack divides, the shorter one if both (SB3's channel rule)
        first_fits, last_fits = shape[0] % frame_stack == 0, shape[-1] % frame_stack == 0
        channels_last = last_fits and (not first_fits or shape[-1] < shape[0])
    try:
        return StackLayout(shape, frame_stack, channels_last)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}; pass frame_stack= (1 for observations without frame stacking) "
                         "and channels_last= to match how the observations are stacked") from None


class FrameStreams:
    """Each env's stacked observations as frames in its own frame store, a stack addressed by one int64 code.

    A code is ((newest frame id * n_envs + env) * K + real frames - 1) * 2 + zero padded for stacks in
    a store, and -1 - entry for a stack kept whole in the `whole` pool. Frames of a stack older than
    its real frames are padding: copies of its oldest real frame, or zeros.
    """

    def __init__(self, layout: StackLayout, n_envs: int, frames_per_env: int, keep_latest: bool, compression: str,
                 key_interval: int, anchor_interval: int, **full_options: Any):
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}: expected one of {COMPRESSIONS}")
        _compile_kernels()
        self.layout, self.n_envs = layout, n_envs
        self.batch_shape = (n_envs, *layout.obs_shape)
        # the envs' stores are used one at a time: one set of encoder and decoder rows serves them all
        self.scratch = DiffScratch(layout.frame_size, full_options.get("decode_threads", "auto")) \
            if compression == "full" else None
        shared = {} if self.scratch is None else {"scratch": self.scratch}
        self.new_store = functools.partial(make_frame_store, compression, frames_per_env, layout.frame_shape,
                                           key_interval, anchor_interval, **full_options, **shared)
        self.stores = [self.new_store() for _ in range(n_envs)]
        self.state = np.zeros(n_envs, dtype=STREAM_STATE)
        self.state["newest"] = -1
        # a copy of each env's newest stack saves decoding it at every add, for frame_stack frames per env
        self.latest = np.zeros((n_envs, layout.frame_stack, layout.frame_size), dtype=np.uint8) if keep_latest else None
        self.whole = np.zeros((0, layout.frame_stack * layout.frame_size), dtype=np.uint8)
        self.free_whole: list[int] = []

    @property
    def nbytes(self) -> int:
        """Bytes held: the stores and their shared rows, the pool of whole stacks and copies of each env's newest stack."""
        return sum(store.nbytes for store in self.stores) + self.whole.nbytes + \
            (0 if self.latest is None else self.latest.nbytes) + (0 if self.scratch is None else self.scratch.nbytes)

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored: the stores' frames and the pool of whole stacks."""
        return sum(store.content_nbytes for store in self.stores) + self.whole.nbytes

    def check(self, obs: Any, name: str) -> np.ndarray:
        """`obs` as a C-contiguous uint8 array (n_envs, *obs_shape), or ValueError naming what is wrong."""
        obs = np.asarray(obs)
        if obs.shape != self.batch_shape or obs.dtype != np.uint8:
            raise ValueError(f"{name} has shape {obs.shape} and dtype {obs.dtype}; expected {self.batch_shape} uint8")
        # VecTransposeImage hands over transposed views; one copy makes every frame comparison a fast one
        return np.ascontiguousarray(obs)

    def encode(self, obs: np.ndarray) -> np.ndarray:
        """Store the stacks obs (n_envs, *obs_shape) as each env's next stack; their codes (n_envs,).

        Each env's newest stack is decoded to be compared: for streams that keep no copy of it."""
        assert self.latest is None, "streams that keep a copy of the newest stacks store transitions"
        frames = self.layout.frames(obs)
        previous = np.empty_like(frames)
        newest = self.state["newest"]
        for env in np.flatnonzero(newest >= 0):
            previous[env] = self._stack_frames(env, int(newest[env]))
        # a rollout's stack usually is the previous one shifted: tried first
        for env, kind in enumerate(follow_stacks(previous, frames, newest, True).tolist()):
            self._follow(env, kind, frames[env], obs[env])
        return newest.copy()

    def encode_transition(self, obs: np.ndarray, next_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store the stacks obs, then next_obs (n_envs, *obs_shape) of one step; their codes (n_envs,) each, as views
        valid until the next call. For streams that keep a copy of each env's newest stack."""
        frames, next_frames = self.layout.frames(obs), self.layout.frames(next_obs)
        state = self.state
        try:
            # envs are independent streams; per env, one kernel call stores both stacks unless one needs Python
            for env, store in enumerate(self.stores):
                stored = _store_transition(self.latest, frames, next_frames, state, env, *store.kernel_args)
                if stored < 2:
                    self._finish_transition(env, stored, (frames, next_frames), (obs, next_obs))
        except BaseException:  # the copy may not be of the newest stacks now: nothing may continue them
            state["newest"] = -1
            raise
        return state["obs_code"], state["newest"]

    def _finish_transition(self, env: int, stored: int, frames: tuple[np.ndarray, np.ndarray],
                           stacks: tuple[np.ndarray, np.ndarray]) -> None:
        """Store env's stacks of a transition that _store_transition left, from the `stored`-th on."""
        for i in range(stored, 2):  # the stored-th one the kernel could not store: not tried there again
            kind = int(self.state[env][("obs_kind", "next_kind")[i]])
            self._follow(env, kind, frames[i][env], stacks[i][env], i > stored)
            if i == 0:
                self.state[env]["obs_code"] = self.state[env]["newest"]

    def _follow(self, env: int, kind: int, frames: np.ndarray, stack: np.ndarray, kernel_first: bool = True) -> None:
        """Make env's stack `stack` (its frames (K, F)) its newest, stored as its kind (follow_stacks) says: by the
        kernel, or where it cannot by the store's own code: it finishes the append a kernel left (not
        kernel_first), or appends anew."""
        if kind == OTHER:
            self.state[env]["newest"] = self._keep_whole(stack)  # nothing continues it
        elif not (kernel_first and _follow_in_store(kind, frames, env, self.state, *self.stores[env].kernel_args)):
            episode_start, real, zero_padded = _next_stack(kind, self.state[env]["newest"], self.n_envs,
                                                           self.layout.frame_stack)
            outcome = None if kernel_first else int(self.state[env]["outcome"])
            self._append(env, frames[-1], episode_start, real, zero_padded, outcome)

    def _append(self, env: int, frame: np.ndarray, episode_start: bool, real: int, zero_padded: int,
                outcome: Optional[int] = None) -> None:
        """Append `frame` to env's store, or finish the append a kernel left with `outcome`; the stack it ends,
        with `real` real frames, becomes env's newest."""
        store = self.stores[env]
        newest = store.append(frame, episode_start) if outcome is None else \
            store.finish_append(frame, episode_start, outcome)
        self.state[env]["newest"] = _stack_code(newest, env, self.n_envs, self.layout.frame_stack, real, zero_padded)

    def _stack_frames(self, env: int, code: int) -> np.ndarray:
        """The frames (K, frame_size) of one stored stack of env."""
        newest, real, zero_padded = self._unpack(code)
        frames = np.empty((1, self.layout.frame_stack, self.layout.frame_size), dtype=np.uint8)
        decode_stacks(self.stores[env], np.array([newest]), np.array([newest - real + 1]), frames,
                      np.array([zero_padded]))
        return frames[0]

    def _unpack(self, code: int) -> tuple[int, int, bool]:
        """(newest frame id, real frames, zero padded) of a stored stack's code."""
        newest, _, real, zero_padded = _code_parts(code, self.n_envs, self.layout.frame_stack)
        return newest, real, bool(zero_padded)

    def _keep_whole(self, obs: np.ndarray) -> int:
        if not self.free_whole:
            grown = np.zeros((max(2 * len(self.whole), 8), self.whole.shape[1]), dtype=np.uint8)
            grown[:len(self.whole)] = self.whole
            self.free_whole = list(range(len(grown) - 1, len(self.whole) - 1, -1))
            self.whole = grown
        entry = self.free_whole.pop()
        self.whole[entry] = obs.reshape(-1)
        return -1 - entry

    def drop(self, *codes: np.ndarray) -> None:
        """Slots holding `codes` are being overwritten: their whole stacks' entries become free."""
        if len(self.free_whole) < len(self.whole):  # some entry is in use
            self.free_whole.extend(int(-1 - code) for part in codes for code in part.reshape(-1) if code < 0)

    def drop_all(self) -> None:
        """No slot holds a code any more: every whole stack's entry is free."""
        self.free_whole = list(range(len(self.whole) - 1, -1, -1))

    def release_before(self, oldest: np.ndarray) -> None:
        """oldest (n_envs, n) are the codes of the oldest stored step, in the order they were stored.

        Each env's stacks were stored in order, and a stack never reaches back past the real frames of
        a stack stored before it, so no frame before the first stored stack's will be read again.
        """
        for env in range(self.n_envs):
            for code in oldest[env]:
                if code >= 0:
                    newest, real, _ = self._unpack(int(code))
                    self.stores[env].release(newest - real + 1)
                    break

    def release_all(self) -> None:
        """No step is stored: keep only each env's newest stack, which the next stack may continue."""
        self.release_before(self.state["newest"][:, None])
        for env in np.flatnonzero(self.state["newest"] < 0):
            self.stores[env].release(self.stores[env].count)

    def restart(self) -> None:
        """No step is stored: each env's newest stack becomes a new stream of its real frames, in a new store.

        A rollout buffer starts each rollout this way: its first stack usually continues the newest one,
        whose frames would otherwise keep their whole chain of references (back to an anchor frame up to
        anchor_interval frames earlier) resident for another rollout. A new store also gives back every page
        of the old one: release() hands pages back in chunks, which would leave up to a chunk per env
        resident, as much as a short rollout's frames.
        """
        self.drop_all()
        for env in range(self.n_envs):
            code = int(self.state[env]["newest"])
            frames = None if code < 0 else self._stack_frames(env, code)
            self.stores[env] = self.new_store()
            self.state[env]["newest"] = -1
            if frames is None:
                continue
            _, _, real, zero_padded = _code_parts(code, self.n_envs, self.layout.frame_stack)
            for i, frame in enumerate(frames[-real:]):
                self._append(env, frame, i == 0, i + 1, zero_padded)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The stacks (M, *obs_shape) of codes (M, ...)."""
        codes = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
        frames = np.empty((len(codes), self.layout.frame_stack, self.layout.frame_size), dtype=np.uint8)
        newest, first, zero_padded, env = _parse_codes(codes, self.n_envs, self.layout.frame_stack)
        if self.n_envs == 1 and (env == 0).all():  # one store, no stack kept whole: one call, no copies
            decode_stacks(self.stores[0], newest, first, frames, zero_padded)
        else:
            for e in np.unique(env[env >= 0]):
                rows = env == e
                part = np.empty((int(rows.sum()), *frames.shape[1:]), dtype=np.uint8)
                decode_stacks(self.stores[e], newest[rows], first[rows], part, zero_padded[rows])
                frames[rows] = part
        stacks = self.layout.stacks(frames)
        whole = env < 0
        if whole.any():
            stacks[whole] = self.whole[-1 - codes[whole]].reshape(-1, *self.layout.obs_shape)
        return stacks


def dict_layouts(observation_space: spaces.Space, frame_stack: int | Mapping[str, int],
                 channels_last: Optional[bool] | Mapping[str, Optional[bool]], owner: str) -> dict[str, StackLayout]:
    """The StackLayout of each image key (SB3's is_image_space) of a Dict space: the keys whose frames go to stores.

    An int frame_stack holds for every image key whose channel axis it divides, and 1 (single frames) for the others;
    a mapping gives it per key (1 for keys it leaves out). channels_last is guessed by SB3's rule (the smallest axis
    holds the channels) unless given, for all keys or per key."""
    if not isinstance(observation_space, spaces.Dict):
        raise ValueError(f"{owner} stores Dict observations; got observation space {observation_space}. "
                         "Use CompressedReplayBuffer or CompressedRolloutBuffer for a Box of frames.")
    images = {key: space for key, space in observation_space.spaces.items() if is_image_space(space)}
    if not images:
        raise ValueError(f"{owner}: the observation space has no image key (a uint8 Box (C, H, W) or (H, W, C) of "
                         f"0..255) to compress: {observation_space}. Use SB3's DictReplayBuffer / DictRolloutBuffer.")
    for name, setting in (("frame_stack", frame_stack), ("channels_last", channels_last)):
        unknown = sorted(set(setting) - set(images)) if isinstance(setting, Mapping) else []
        if unknown:
            raise ValueError(f"{owner}: {name} names {unknown}, which are not image keys of the observation space "
                             f"(its image keys: {sorted(images)})")
    if not isinstance(frame_stack, Mapping) and (isinstance(frame_stack, bool) or not isinstance(frame_stack, int)
                                                 or frame_stack < 1):
        raise ValueError(f"{owner}: frame_stack must be an integer >= 1 or a dict of them per image key, "
                         f"got {frame_stack!r}")
    layouts = {}
    for key, space in images.items():
        last = channels_last.get(key) if isinstance(channels_last, Mapping) else channels_last
        if last is None:
            last = int(np.argmin(space.shape)) != 0
        channels = space.shape[-1 if last else 0]
        if isinstance(frame_stack, Mapping):
            stack = frame_stack.get(key, 1)
        else:
            stack = frame_stack if channels % frame_stack == 0 else 1
        try:
            layouts[key] = StackLayout(space.shape, stack, last)
        except ValueError as error:
            raise ValueError(f"{owner}: image key {key!r}: {error}; pass frame_stack={{{key!r}: ...}} and "
                             f"channels_last={{{key!r}: ...}} to match how its frames are stacked") from None
    return layouts


def _algorithm_building_buffer() -> Any:
    """The SB3 off-policy algorithm whose _setup_model is building the buffer being built, or None.

    SB3 hands a replay_buffer_class of the user's neither its n_steps nor its gamma (it only warns that n_steps
    is ignored), so the buffer finds the algorithm among the frames that call it."""
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
    frame = sys._getframe(1)
    for _ in range(_FRAMES_UP):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "_setup_model" and isinstance(owner, OffPolicyAlgorithm):
            return owner
    return None


def _check_algorithm_returns(owner: str, n_steps: Optional[int], gamma: Optional[float], hint: str) -> None:
    """Raise ValueError where the algorithm building this buffer asks for other returns than the buffer gives (n_steps
    None: 1-step returns), rather than train silently on them; `hint` says what to use instead."""
    algorithm = _algorithm_building_buffer()
    if algorithm is None:
        return
    asked, name = algorithm.n_steps, type(algorithm).__name__
    if n_steps is None and asked > 1:
        raise ValueError(f"{name}(n_steps={asked}) asks for {asked}-step returns, which {owner} does not compute "
                         f"(stable-baselines3 would only warn and train on 1-step returns): {hint}")
    if n_steps is not None and ((asked > 1 and asked != n_steps) or gamma != algorithm.gamma):
        raise ValueError(f"{name}(n_steps={asked}, gamma={algorithm.gamma}) builds {owner}(n_steps={n_steps}, "
                         f"gamma={gamma}): pass replay_buffer_kwargs={{'n_steps': {max(asked, n_steps)}, "
                         f"'gamma': {algorithm.gamma}}}")


class _Batch:
    """The codes a replay batch will ask to decode, per image key: the first asked for is decoded in one call with the
    others (they share frames), and each decoded array is handed out once (two tensors never share memory)."""

    def __init__(self, together: dict[Any, list[np.ndarray]]):
        self.together = together
        self.ready: dict[Any, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.fresh: list[np.ndarray] = []  # decoded arrays nothing else holds: they become tensors without a copy

    def stacks(self, key: Any, streams: FrameStreams, codes: np.ndarray) -> np.ndarray:
        """The stacks of codes (M, 1) of key's streams."""
        ready = self.ready.setdefault(key, [])
        for i, (decoded_codes, stacks) in enumerate(ready):
            if np.array_equal(decoded_codes, codes):
                return ready.pop(i)[1]
        others = self.together.pop(key, [])
        for i, other in enumerate(others):  # these very codes were foreseen: decoded once
            if np.array_equal(other, codes):
                del others[i]
                break
        if not others:
            return streams.decode(codes)
        stacks = streams.decode(np.concatenate([codes, *others]))
        at = len(codes)
        for other in others:
            ready.append((other, stacks[at:at + len(other)]))
            at += len(other)
        return stacks[:len(codes)]


class _StreamBytes:
    """nbytes and bytes_per_step of an SB3 buffer whose observations live in FrameStreams (_frame_streams())."""

    _streams: FrameStreams

    def _frame_streams(self) -> list[FrameStreams]:
        return [self._streams]

    @property
    def nbytes(self) -> int:
        """Every byte the buffer holds: SB3's arrays (codes, actions, rewards, ...) and the frames."""
        return sb3_nbytes(self) + sum(streams.nbytes for streams in self._frame_streams())

    @property
    def bytes_per_step(self) -> float:
        """RAM per stored step when full: capacity-sized arrays over capacity, stored frames over steps stored."""
        content = sum(streams.content_nbytes for streams in self._frame_streams())
        return bytes_per_step(self.nbytes, content, self.buffer_size * self.n_envs, self.size() * self.n_envs)


def sb3_nbytes(buffer: Any) -> int:
    """Bytes of an SB3 buffer's numpy arrays, those in dicts (Dict observations) included."""
    values = [v for value in vars(buffer).values() for v in (value.values() if isinstance(value, dict) else (value,))]
    return sum(v.nbytes for v in values if isinstance(v, np.ndarray))


class _CompressedReplay(_StreamBytes):
    """What the Box and Dict replay buffers share: add()'s checks of plain values, the frames of the oldest steps let
    go, and batches decoded from the codes SB3 indexes."""

    _plain_signature: Optional[tuple] = None  # (type, dtype, shape) of plain action, reward and done
    _batch: Optional[_Batch] = None  # while _get_samples runs

    def _check_step(self, action: Any, reward: Any, done: Any, infos: Any) -> None:
        """Raise ValueError unless SB3's add() stores these values; values of a signature found plain pass at once."""
        try:  # what _plain() decides on, for numpy arrays
            signature = (type(action), action.dtype, action.shape, type(reward), reward.dtype, reward.shape,
                         type(done), done.dtype, done.shape)
        except AttributeError:  # not arrays: never plain
            signature = ()
        if signature != self._plain_signature or not _plain_infos(infos, self.n_envs):
            self._check_values(action, reward, done, infos, signature)

    def _check_values(self, action: Any, reward: Any, done: Any, infos: Any, signature: tuple) -> None:
        """Raise ValueError unless SB3's add() stores these values: before any frame is stored. Values of a
        signature found plain are not checked again."""
        if _plain(action, self.actions[0], reshaped=True) and _plain(reward, self.rewards[0]) \
                and _plain(done, self.dones[0]) and _plain_infos(infos, self.n_envs):
            self._plain_signature = signature
            return
        _check_per_env(self, action=(action, self.n_envs * self.action_dim), reward=(reward, None),
                       done=(done, None), infos=(infos, self.n_envs))
        timeouts = {"infos": (self.timeouts[0], lambda: np.array([info.get("TimeLimit.truncated", False)
                                                                   for info in infos]))}
        _check_sb3_can_store(action=(self.actions[0], lambda: np.array(action.reshape((self.n_envs, self.action_dim)))),
                             reward=(self.rewards[0], lambda: np.array(reward)),
                             done=(self.dones[0], lambda: np.array(done)),
                             **(timeouts if self.handle_timeout_termination else {}))

    def _free_overwritten(self, streams: FrameStreams, observations: np.ndarray, next_observations: np.ndarray) -> None:
        """Before SB3's add() overwrites slot pos: the stacks it kept whole are free. Only once the new step's frames
        are stored: an add that failed part-way leaves them in use."""
        if self.full:
            streams.drop(observations[self.pos], next_observations[self.pos])

    def _release_oldest(self, streams: FrameStreams, observations: np.ndarray, next_observations: np.ndarray) -> None:
        """After SB3's add(): the oldest stored step changes only when the ring is full (its frames go back every few
        steps) or was empty."""
        if self.full and self.pos % _RELEASE_EVERY == 0 or self.pos == 1:
            oldest = self.pos if self.full else 0
            streams.release_before(np.concatenate([observations[oldest], next_observations[oldest]], axis=1))

    def reset(self) -> None:
        """Forget every stored transition (SB3's reset) and the frames they held."""
        super().reset()
        for streams in self._frame_streams():
            streams.drop_all()
            streams.release_all()

    def _decoded(self, key: Any, streams: FrameStreams, codes: np.ndarray) -> np.ndarray:
        """The stacks of codes: decoded with the batch's others if a batch is being made."""
        if self._batch is None:
            return streams.decode(codes)
        stacks = self._batch.stacks(key, streams, codes)
        self._batch.fresh.append(stacks)
        return stacks

    def _sample_with(self, together: dict[Any, list[np.ndarray]], batch_inds: np.ndarray,
                     env: Optional[VecNormalize]) -> Any:
        """SB3's _get_samples, the codes `together` (per image key) decoded in one call when first asked for."""
        self._batch = _Batch(together)
        try:
            return super()._get_samples(batch_inds, env)
        finally:
            self._batch = None

    def to_torch(self, array: np.ndarray, copy: bool = True) -> th.Tensor:
        """SB3's to_torch; observations decoded for the batch being made are arrays nothing else holds, and become
        tensors without another copy."""
        return super().to_torch(array, copy and not (self._batch is not None
                                                     and any(array is a for a in self._batch.fresh)))


class CompressedReplayBuffer(_CompressedReplay, ReplayBuffer):
    """SB3's ReplayBuffer with each frame stored once, differentially encoded ('full') or raw ('half'); same samples."""

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: th.device | str = "auto", n_envs: int = 1, optimize_memory_usage: bool = False,
                 handle_timeout_termination: bool = True, *, compression: str = "full", frame_stack: int = 4,
                 channels_last: Optional[bool] = None, key_interval: int = KEY_INTERVAL,
                 anchor_interval: int = ANCHOR_INTERVAL, **full_options: Any):
        owner = type(self).__name__
        if optimize_memory_usage:
            raise ValueError(f"{owner} stores each frame once already; optimize_memory_usage=True "
                             "(which also gets next_obs wrong at time-outs) is not supported")
        _refuse_return_options(owner, full_options)
        if not isinstance(self, NStepReplayBuffer):
            _check_algorithm_returns(owner, None, None, "use replay_buffer_class=CompressedNStepReplayBuffer with "
                                     "replay_buffer_kwargs={'n_steps': ..., 'gamma': ...}")
        layout = stack_layout(observation_space, frame_stack, channels_last, owner)
        steps_per_env = max(buffer_size // n_envs, 1)
        self._streams = FrameStreams(layout, n_envs, 2 * steps_per_env + frame_stack + _SPARE, True, compression,
                                     key_interval, anchor_interval, **{**FULL_OPTIONS, **full_options})
        self.compression = compression
        # SB3 builds (and checks free RAM for) observation arrays of the space it is given: codes.
        super().__init__(buffer_size, _CODE_SPACE, action_space, device, n_envs, False, handle_timeout_termination)
        self.observation_space = observation_space
        self.obs_shape = get_obs_shape(observation_space)

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """SB3's add(); observations are stored as frames. ValueError on bad input, with the buffer unchanged."""
        obs = self._streams.check(obs, "obs")
        next_obs = self._streams.check(next_obs, "next_obs")
        self._check_step(action, reward, done, infos)
        obs_codes, next_codes = self._streams.encode_transition(obs, next_obs)
        self._free_overwritten(self._streams, self.observations, self.next_observations)
        super().add(obs_codes[:, None], next_codes[:, None], action, reward, done, infos)
        self._release_oldest(self._streams, self.observations, self.next_observations)

    def _decoded_together(self, batch_inds: np.ndarray) -> list[np.ndarray]:
        """Codes of the batch that SB3's _get_samples will ask to decode, where foreseen: with one env every sampled
        step is env 0's, and its obs and next_obs share frames."""
        return [self.observations[batch_inds, 0], self.next_observations[batch_inds, 0]] if self.n_envs == 1 else []

    def _get_samples(self, batch_inds: np.ndarray, env: Optional[VecNormalize] = None) -> ReplayBufferSamples:
        """SB3's batch, its observations decoded from the codes SB3 indexed."""
        return self._sample_with({None: self._decoded_together(batch_inds)}, batch_inds, env)

    def _normalize_obs(self, obs: np.ndarray, env: Optional[VecNormalize] = None) -> np.ndarray:
        """SB3's _get_samples passes the observations it indexed through here: the stacks of those codes, normalized
        as SB3 does."""
        decoded = self._decoded(None, self._streams, obs)
        return super()._normalize_obs(decoded, env)


class CompressedNStepReplayBuffer(CompressedReplayBuffer, NStepReplayBuffer):
    """SB3's NStepReplayBuffer (n-step returns) with CompressedReplayBuffer's frames; the same samples."""

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: th.device | str = "auto", n_envs: int = 1, optimize_memory_usage: bool = False,
                 handle_timeout_termination: bool = True, n_steps: int = 3, gamma: float = 0.99, **kwargs: Any):
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"{type(self).__name__}: n_steps must be an integer >= 1, got {n_steps!r}")
        _check_algorithm_returns(type(self).__name__, int(n_steps), gamma, "")
        super().__init__(buffer_size, observation_space, action_space, device, n_envs, optimize_memory_usage,
                         handle_timeout_termination, **kwargs)
        # SB3's NStepReplayBuffer.__init__, reached through super(), set its defaults
        self.n_steps, self.gamma = int(n_steps), gamma

    def _decoded_together(self, batch_inds: np.ndarray) -> list[np.ndarray]:
        """SB3 asks for the next_obs at each window's end first, then for obs: both decoded in one call (one env)."""
        return [self.observations[batch_inds, 0]] if self.n_envs == 1 else []


def _refuse_return_options(owner: str, options: dict[str, Any]) -> None:
    """ValueError for n_steps/gamma given to a 1-step buffer (half would ignore them, full fail obscurely)."""
    given = sorted({"n_steps", "gamma"} & set(options))
    if given:
        raise ValueError(f"{owner} computes 1-step returns and takes no {' or '.join(given)}: use "
                         "CompressedNStepReplayBuffer for n-step returns")


class _DictObservations:
    """Dict observations of a compressed buffer: image keys in one FrameStreams each (_key_streams), other keys as SB3
    stores them."""

    _key_streams: dict[str, FrameStreams]

    def _frame_streams(self) -> list[FrameStreams]:
        return list(self._key_streams.values())

    def _code_space(self) -> spaces.Dict:
        """The space SB3 is shown when it builds its observation arrays: one int64 code per slot for image keys."""
        return spaces.Dict({key: _CODE_SPACE if key in self._key_streams else space
                            for key, space in self.observation_space.spaces.items()})

    def _checked_obs(self, obs: Any, name: str, rows: dict[str, np.ndarray], array_first: bool) -> dict[str, Any]:
        """obs as a dict of the space's keys, image keys as checked stacks (FrameStreams.check); ValueError naming a key
        that is missing or that SB3's add() could not store in its row (rows: a slot's rows per key). SB3's replay
        add() reshapes Discrete values itself, its rollout add() after np.array (array_first)."""
        if not isinstance(obs, Mapping):
            raise ValueError(f"{name} must be a dict with the observation space's keys "
                             f"{list(self.observation_space.spaces)}; got {type(obs).__name__}")
        checked = {}
        for key, space in self.observation_space.spaces.items():
            label = f"{name}[{key!r}]"
            if key not in obs:
                raise ValueError(f"{name} has no key {key!r}")
            value = obs[key]
            if key in self._key_streams:
                checked[key] = self._key_streams[key].check(value, label)
                continue
            if not _plain(value, rows[key]):
                shape = (self.n_envs, *self.obs_shape[key])
                if not isinstance(space, spaces.Discrete):
                    convert = functools.partial(np.array, value)
                elif array_first:
                    convert = lambda: np.array(value).reshape(shape)  # noqa: E731
                else:
                    convert = lambda: np.array(value.reshape(shape))  # noqa: E731
                _check_sb3_can_store(**{label: (rows[key], convert)})
            checked[key] = value
        return checked


class CompressedDictReplayBuffer(_DictObservations, _CompressedReplay, DictReplayBuffer):
    """SB3's DictReplayBuffer with each image key's frames stored once (one stream per key and env); same samples."""

    def __init__(self, buffer_size: int, observation_space: spaces.Dict, action_space: spaces.Space,
                 device: th.device | str = "auto", n_envs: int = 1, optimize_memory_usage: bool = False,
                 handle_timeout_termination: bool = True, *, compression: str = "full",
                 frame_stack: int | Mapping[str, int] = 4,
                 channels_last: Optional[bool] | Mapping[str, Optional[bool]] = None,
                 key_interval: int = KEY_INTERVAL, anchor_interval: int = ANCHOR_INTERVAL, **full_options: Any):
        owner = type(self).__name__
        if optimize_memory_usage:
            raise ValueError(f"{owner} stores each frame once already; optimize_memory_usage=True is not supported "
                             "(nor by SB3's DictReplayBuffer)")
        _refuse_return_options(owner, full_options)
        _check_algorithm_returns(owner, None, None, "neither stable-baselines3 nor sb3_buffers has an n-step buffer "
                                 "for Dict observations; use n_steps=1")
        layouts = dict_layouts(observation_space, frame_stack, channels_last, owner)
        steps_per_env = max(buffer_size // n_envs, 1)
        self._key_streams = {key: FrameStreams(layout, n_envs, 2 * steps_per_env + layout.frame_stack + _SPARE, True,
                                               compression, key_interval, anchor_interval,
                                               **{**FULL_OPTIONS, **full_options})
                             for key, layout in layouts.items()}
        self.compression = compression
        self.observation_space = observation_space
        super().__init__(buffer_size, self._code_space(), action_space, device, n_envs, False,
                         handle_timeout_termination)
        self.observation_space = observation_space
        self.obs_shape = get_obs_shape(observation_space)

    def add(self, obs: dict[str, np.ndarray], next_obs: dict[str, np.ndarray], action: np.ndarray,
            reward: np.ndarray, done: np.ndarray, infos: list[dict[str, Any]]) -> None:
        """SB3's add(); image keys are stored as frames. ValueError naming the key on bad input, buffer unchanged."""
        obs = self._checked_obs(obs, "obs", {key: rows[0] for key, rows in self.observations.items()}, False)
        next_rows = {key: rows[0] for key, rows in self.next_observations.items()}
        next_obs = self._checked_obs(next_obs, "next_obs", next_rows, False)
        self._check_step(action, reward, done, infos)
        codes = {key: streams.encode_transition(obs[key], next_obs[key]) for key, streams in self._key_streams.items()}
        for key, streams in self._key_streams.items():
            self._free_overwritten(streams, self.observations[key], self.next_observations[key])
        super().add({**obs, **{key: c[0][:, None] for key, c in codes.items()}},
                    {**next_obs, **{key: c[1][:, None] for key, c in codes.items()}}, action, reward, done, infos)
        for key, streams in self._key_streams.items():
            self._release_oldest(streams, self.observations[key], self.next_observations[key])

    def _get_samples(self, batch_inds: np.ndarray, env: Optional[VecNormalize] = None) -> DictReplayBufferSamples:
        """SB3's batch, image keys decoded from the codes SB3 indexed (with one env, each key's obs and next_obs
        together)."""
        together = {key: [self.observations[key][batch_inds, 0], self.next_observations[key][batch_inds, 0]]
                    for key in self._key_streams} if self.n_envs == 1 else {}
        return self._sample_with(together, batch_inds, env)

    def _normalize_obs(self, obs: dict[str, np.ndarray],
                       env: Optional[VecNormalize] = None) -> dict[str, np.ndarray]:
        """SB3's _get_samples passes the observations it indexed through here: image keys' stacks of those codes,
        normalized as SB3 does."""
        decoded = dict(obs)
        for key, streams in self._key_streams.items():
            decoded[key] = self._decoded(key, streams, obs[key])
        return super()._normalize_obs(decoded, env)


class _CompressedRollout(_StreamBytes):
    """What the Box and Dict rollout buffers share: add()'s checks of values."""

    def _check_step(self, action: Any, reward: Any, episode_start: Any, value: Any, log_prob: Any) -> None:
        """Raise ValueError unless SB3's add() stores these values: before any frame is stored."""
        if _plain(action, self.actions[0], reshaped=True) and _plain(reward, self.rewards[0]) \
                and _plain(episode_start, self.episode_starts[0]) and _plain(value, self.values[0], True, True) \
                and _plain(log_prob, self.log_probs[0], True):
            return
        _check_per_env(self, action=(action, self.n_envs * self.action_dim), reward=(reward, None),
                       episode_start=(episode_start, None), value=(value, self.n_envs),
                       log_prob=(log_prob, self.n_envs))
        _check_sb3_can_store(action=(self.actions[0], lambda: np.array(action.reshape((self.n_envs, self.action_dim)))),
                             reward=(self.rewards[0], lambda: np.array(reward)),
                             episode_start=(self.episode_starts[0], lambda: np.array(episode_start)),
                             value=(self.values[0], lambda: value.clone().cpu().numpy().flatten()),
                             log_prob=(self.log_probs[0], lambda: (log_prob.reshape(-1, 1) if len(log_prob.shape) == 0
                                                                   else log_prob).clone().cpu().numpy()))

    def _check_room(self) -> None:
        if self.pos >= self.buffer_size:
            raise ValueError(f"the rollout buffer already holds {self.buffer_size} steps; reset() it first")


class CompressedRolloutBuffer(_CompressedRollout, RolloutBuffer):
    """SB3's RolloutBuffer with each frame stored once, differentially encoded ('full') or raw ('half'); same batches."""

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: th.device | str = "auto", gae_lambda: float = 1, gamma: float = 0.99, n_envs: int = 1, *,
                 compression: str = "full", frame_stack: int = 4, channels_last: Optional[bool] = None,
                 key_interval: int = KEY_INTERVAL, anchor_interval: int = ANCHOR_INTERVAL, **full_options: Any):
        layout = stack_layout(observation_space, frame_stack, channels_last, type(self).__name__)
        # A rollout's verified stacks add at most one frame per step to each env's store, after the up
        # to frame_stack frames of the stack it continues (restart()). The envs' newest stacks are
        # decoded when checked rather than copied: copies would cost frame_stack frames per env, a large
        # share of a short rollout's frames.
        self._streams = FrameStreams(layout, n_envs, buffer_size + frame_stack + _SPARE, False, compression,
                                     key_interval, anchor_interval, **{**FULL_OPTIONS, **full_options})
        self.compression = compression
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)

    def reset(self) -> None:
        """SB3's reset, with one int64 code per observation slot; the frames of the last rollout are let go."""
        space, shape = self.observation_space, self.obs_shape
        self.observation_space, self.obs_shape = _CODE_SPACE, (1,)  # what SB3 allocates observations for
        try:
            super().reset()
        finally:
            self.observation_space, self.obs_shape = space, shape
        self._streams.restart()

    def add(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, episode_start: np.ndarray,
            value: th.Tensor, log_prob: th.Tensor) -> None:
        """SB3's add(); observations are stored as frames. ValueError on bad input, with the buffer unchanged."""
        obs = self._streams.check(obs, "obs")
        self._check_room()
        self._check_step(action, reward, episode_start, value, log_prob)
        super().add(self._streams.encode(obs)[:, None], action, reward, episode_start, value, log_prob)

    def _get_samples(self, batch_inds: np.ndarray, env: Optional[VecNormalize] = None) -> RolloutBufferSamples:
        """SB3's minibatch, its observations decoded from the codes SB3 indexed."""
        samples = super()._get_samples(batch_inds, env)
        # decoded into a new array that nothing else holds: it becomes the tensor without another copy
        return samples._replace(observations=self.to_torch(self._streams.decode(self.observations[batch_inds]),
                                                           copy=False))


class CompressedDictRolloutBuffer(_DictObservations, _CompressedRollout, DictRolloutBuffer):
    """SB3's DictRolloutBuffer with each image key's frames stored once (one stream per key and env); same batches."""

    def __init__(self, buffer_size: int, observation_space: spaces.Dict, action_space: spaces.Space,
                 device: th.device | str = "auto", gae_lambda: float = 1, gamma: float = 0.99, n_envs: int = 1, *,
                 compression: str = "full", frame_stack: int | Mapping[str, int] = 4,
                 channels_last: Optional[bool] | Mapping[str, Optional[bool]] = None,
                 key_interval: int = KEY_INTERVAL, anchor_interval: int = ANCHOR_INTERVAL, **full_options: Any):
        layouts = dict_layouts(observation_space, frame_stack, channels_last, type(self).__name__)
        # as CompressedRolloutBuffer's, per image key
        self._key_streams = {key: FrameStreams(layout, n_envs, buffer_size + layout.frame_stack + _SPARE, False,
                                               compression, key_interval, anchor_interval,
                                               **{**FULL_OPTIONS, **full_options})
                             for key, layout in layouts.items()}
        self.compression = compression
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)

    def reset(self) -> None:
        """SB3's reset, with one int64 code per slot of image keys; the frames of the last rollout are let go."""
        space, shape = self.observation_space, self.obs_shape
        # what SB3 allocates observations for
        self.observation_space = self._code_space()
        self.obs_shape = {key: (1,) if key in self._key_streams else s for key, s in shape.items()}
        try:
            super().reset()
        finally:
            self.observation_space, self.obs_shape = space, shape
        for streams in self._key_streams.values():
            streams.restart()

    def add(self, obs: dict[str, np.ndarray], action: np.ndarray, reward: np.ndarray, episode_start: np.ndarray,
            value: th.Tensor, log_prob: th.Tensor) -> None:
        """SB3's add(); image keys are stored as frames. ValueError naming the key on bad input, buffer unchanged."""
        obs = self._checked_obs(obs, "obs", {key: rows[0] for key, rows in self.observations.items()}, True)
        self._check_room()
        self._check_step(action, reward, episode_start, value, log_prob)
        codes = {key: streams.encode(obs[key])[:, None] for key, streams in self._key_streams.items()}
        super().add({**obs, **codes}, action, reward, episode_start, value, log_prob)

    def _get_samples(self, batch_inds: np.ndarray, env: Optional[VecNormalize] = None) -> DictRolloutBufferSamples:
        """SB3's minibatch, image keys decoded from the codes SB3 indexed."""
        samples = super()._get_samples(batch_inds, env)
        observations = dict(samples.observations)
        for key, streams in self._key_streams.items():  # new arrays nothing else holds: tensors without a copy
            observations[key] = self.to_torch(streams.decode(self.observations[key][batch_inds]), copy=False)
        return samples._replace(observations=observations)


def _check_per_env(buffer: Any, **values: tuple[Any, Optional[int]]) -> None:
    """Raise ValueError unless each value has `size` values, or (size None) one per env or one for all."""
    for name, (value, size) in values.items():
        if name == "infos":
            if not isinstance(value, (list, tuple)) or len(value) != size:
                raise ValueError(f"infos must be a list of {size} dicts, one per env")
            continue
        shape = tuple(value.shape) if isinstance(value, (np.ndarray, th.Tensor)) else np.shape(value)
        if size is not None:
            if math.prod(shape) != size:
                raise ValueError(f"{name} has shape {shape}; expected {size} values ({buffer.n_envs} envs)")
        elif shape != (buffer.n_envs,) and shape != ():
            raise ValueError(f"{name} has shape {shape}; expected ({buffer.n_envs},), one per env")


_BOOLS = (bool, np.bool_)
_TENSOR_DTYPES = {th.float16: np.dtype(np.float16), th.float32: np.dtype(np.float32), th.float64: np.dtype(np.float64)}


def _plain(value: Any, row: np.ndarray, tensor: bool = False, reshaped: bool = False) -> bool:
    """Whether SB3's add() certainly stores `value` in `row`: a numpy array (a strided float tensor if `tensor`) of
    the row's shape (of its size if SB3 reshapes it) whose dtype casts safely to the row's."""
    if tensor:
        if not (isinstance(value, th.Tensor) and value.dtype in _TENSOR_DTYPES and value.layout == th.strided
                and value.device.type != "meta" and not value.requires_grad):
            return False
        dtype = _TENSOR_DTYPES[value.dtype]
    elif isinstance(value, np.ndarray):
        dtype = value.dtype
    else:
        return False
    shape = tuple(value.shape)
    # a safe cast cannot warn, so not even warnings turned into errors can make SB3's add() fail
    return (shape == row.shape or (reshaped and math.prod(shape) == row.size)) and \
        (dtype == row.dtype or np.can_cast(dtype, row.dtype, "safe"))


def _plain_infos(infos: Any, n_envs: int) -> bool:
    """Whether infos certainly are what SB3's add() takes: a list of n_envs dicts whose time-out flags are bools."""
    return type(infos) is list and len(infos) == n_envs and all(
        type(info) is dict and type(info.get("TimeLimit.truncated", False)) in _BOOLS for info in infos)


def _check_sb3_can_store(**values: tuple[np.ndarray, Callable[[], Any]]) -> None:
    """Raise ValueError unless each (row, convert) can take what SB3's add() assigns to it, convert()."""
    for name, (row, convert) in values.items():
        try:
            np.empty_like(row)[...] = convert()
        except Exception as error:  # whatever SB3's add() would raise once our frames were stored
            raise ValueError(f"{name} cannot be stored as stable-baselines3 stores it "
                             f"({type(error).__name__}: {error})") from None
