"""Frame-stacked observations kept one frame each: layout, verification, and stacks rebuilt from frame ids.

A stack of K frames is the K newest frames of a stream (an episode). Stored over a frame store
(obs_comp), it is the id of its newest frame plus the id of its stream's first frame: its frames
are ids newest-K+1 .. newest, and the positions before the stream's first frame are padding, filled
with that first frame ('repeat': DrQ-v2, gymnasium's FrameStackObservation(padding_type="reset"))
or with zeros ('zeros': SB3's VecFrameStack, FrameStackObservation(padding_type="zero")).
A front end stores a new stack as one new frame only after checking, byte for byte, that it is the
previous stack shifted by one frame or a freshly padded reset stack. replay_buffer.ReplayBuffer
(DrQ-v2) and sb3_buffers (stable-baselines3) both build on this module.
"""
from __future__ import annotations

import math
from typing import Optional

import numba
import numpy as np

from obs_comp import FrameStore


class StackLayout:
    """Where the K frames of an observation lie: along its first axis, or interleaved along its last (channels last)."""

    def __init__(self, obs_shape: tuple[int, ...], frame_stack: int, channels_last: bool = False):
        obs_shape = tuple(int(n) for n in obs_shape)
        axis = obs_shape[-1] if channels_last else obs_shape[0]
        if frame_stack < 1 or axis % frame_stack:
            raise ValueError(f"frame_stack={frame_stack} does not divide the {'last' if channels_last else 'first'} "
                             f"axis of observations of shape {obs_shape}")
        self.obs_shape = obs_shape
        self.frame_stack = frame_stack
        self.channels_last = channels_last
        self.channels = axis // frame_stack
        self.frame_shape = (*obs_shape[:-1], self.channels) if channels_last else (self.channels, *obs_shape[1:])
        self.frame_size = math.prod(self.frame_shape)

    def frames(self, obs: np.ndarray) -> np.ndarray:
        """Observations (..., *obs_shape) as their frames (..., K, frame_size), oldest first (a view if channels first)."""
        lead = obs.shape[:obs.ndim - len(self.obs_shape)]
        if not self.channels_last:
            return obs.reshape(*lead, self.frame_stack, self.frame_size)
        pixels = self.frame_size // self.channels
        interleaved = obs.reshape(*lead, pixels, self.frame_stack, self.channels)
        return np.ascontiguousarray(np.swapaxes(interleaved, -2, -3)).reshape(*lead, self.frame_stack, self.frame_size)

    def stacks(self, frames: np.ndarray) -> np.ndarray:
        """The inverse of frames(): (..., K, frame_size) back to observations (..., *obs_shape)."""
        lead = frames.shape[:-2]
        if not self.channels_last:
            return frames.reshape(*lead, *self.obs_shape)
        pixels = self.frame_size // self.channels
        grouped = frames.reshape(*lead, self.frame_stack, pixels, self.channels)
        return np.ascontiguousarray(np.swapaxes(grouped, -2, -3)).reshape(*lead, *self.obs_shape)


@numba.njit(cache=True, nogil=True)
def _equal_range(a: np.ndarray, a_at: int, b: np.ndarray, b_at: int, count: int) -> bool:
    """Whether a[a_at:a_at + count] equals b[b_at:b_at + count] (1-d arrays of one unsigned integer type)."""
    # blocks without an early exit inside compile to vector code, several times faster than item by item
    x, y = a[a_at:a_at + count], b[b_at:b_at + count]
    i = 0
    while i + 64 <= count:
        differ = x[i] ^ y[i]
        for j in range(1, 64):
            differ |= x[i + j] ^ y[i + j]
        if differ != 0:
            return False
        i += 64
    for j in range(i, count):
        if x[j] != y[j]:
            return False
    return True


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two uint8 arrays of the same shape hold the same bytes (compared in blocks, up to the first difference)."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        a, b = a.reshape(-1), b.reshape(-1)
        if a.size % 8 == 0:
            a, b = a.view(np.uint64), b.view(np.uint64)
        return _equal_range(a, 0, b, 0, a.size)
    return bool((a == b).all())


def shifted(previous: np.ndarray, frames: np.ndarray) -> bool:
    """Whether stack `frames` (K, F) is `previous` (K, F) moved one frame older with one new newest frame."""
    return same_bytes(frames[:-1], previous[1:])


SAME, SHIFTED, RESET_REPEAT, RESET_ZEROS, OTHER = range(5)  # how a stack follows the previous one (follow_stacks)


@numba.njit(cache=True, nogil=True)
def _all_zero(a: np.ndarray, count: int) -> bool:
    """Whether a[:count] (1-d, unsigned integers) is all zeros."""
    i = 0
    while i + 64 <= count:  # blocks, as in _equal_range
        seen = a[i]
        for j in range(1, 64):
            seen |= a[i + j]
        if seen != 0:
            return False
        i += 64
    for j in range(i, count):
        if a[j] != 0:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _follow_one(previous, current, frame, has_previous, shift_first):
    # follow_stacks of one stack as a row (K * frame) of bytes or of words
    size = current.shape[0]
    older = size - frame  # all frames but the newest
    if has_previous:
        if shift_first and _equal_range(current, 0, previous, frame, older):
            return SHIFTED
        if _equal_range(current, 0, previous, 0, size):
            return SAME
        if not shift_first and _equal_range(current, 0, previous, frame, older):
            return SHIFTED
    for at in range(0, older, frame):
        if not _equal_range(current, at, current, older, frame):
            return RESET_ZEROS if _all_zero(current, older) else OTHER
    return RESET_REPEAT


@numba.njit(cache=True, nogil=True)
def _follow_rows(previous, current, frame, has_previous, shift_first):
    # follow_stacks on stacks as rows (n, K * frame) of bytes or of words
    kinds = np.empty(current.shape[0], dtype=np.int8)
    for e in range(current.shape[0]):
        kinds[e] = _follow_one(previous[e], current[e], frame, has_previous[e], shift_first)
    return kinds


@numba.njit(cache=True, nogil=True)
def _word_aligned(frame_size, a, b, c):
    """Whether frames of frame_size bytes in all three arrays can be read as aligned uint64 words."""
    return frame_size % 8 == 0 and a.ctypes.data % 8 == 0 and b.ctypes.data % 8 == 0 and c.ctypes.data % 8 == 0


@numba.njit(cache=True, nogil=True)
def follow_stacks(previous: np.ndarray, frames: np.ndarray, previous_code: np.ndarray,
                  shift_first: bool) -> np.ndarray:
    """How each stack of frames (n, K, F) follows previous (n, K, F): SAME, SHIFTED, or failing that (or without
    a previous stack: previous_code < 0) RESET_REPEAT, RESET_ZEROS or OTHER; int8 (n,)."""
    # SHIFTED: previous moved one frame older with one new newest frame; shift_first picks it where both hold.
    # RESET_*: a stream's first stack, its older frames copies of the newest or zeros (repeat wins where both hold).
    n, frame_stack, frame_size = frames.shape
    p, c = previous.reshape(n, frame_stack * frame_size), frames.reshape(n, frame_stack * frame_size)
    has_previous = previous_code >= 0
    if _word_aligned(frame_size, p, c, c):
        return _follow_rows(p.view(np.uint64), c.view(np.uint64), frame_size // 8, has_previous, shift_first)
    return _follow_rows(p, c, frame_size, has_previous, shift_first)


@numba.njit(cache=True, nogil=True)
def _transition_kinds(latest, obs, next_obs, frame, has_previous):
    # follow_transition on stacks as rows; next_obs follows obs unless obs is OTHER (kept whole: nothing continues it)
    obs_kind = _follow_one(latest, obs, frame, has_previous, False)
    next_kind = _follow_one(obs, next_obs, frame, obs_kind != OTHER, True)
    if obs_kind != SAME or next_kind != SAME:
        latest[:] = next_obs
    return obs_kind, next_kind


@numba.njit(cache=True, nogil=True)
def follow_transition(latest: np.ndarray, obs: np.ndarray, next_obs: np.ndarray,
                      has_previous: bool) -> tuple[int, int]:
    """One env's follow_stacks of obs after latest (none if not has_previous), then of next_obs after obs (shifted
    first), all (K, F) C-contiguous: (obs's kind, next_obs's kind). latest becomes next_obs."""
    size, frame_size = obs.size, obs.shape[1]
    p, o, x = latest.reshape(size), obs.reshape(size), next_obs.reshape(size)
    if _word_aligned(frame_size, p, o, x):
        return _transition_kinds(p.view(np.uint64), o.view(np.uint64), x.view(np.uint64), frame_size // 8,
                                 has_previous)
    return _transition_kinds(p, o, x, frame_size, has_previous)


def reset_padding(frames: np.ndarray) -> Optional[str]:
    """How a stack (K, F) that starts a stream is padded: 'repeat' (older frames copy the newest), 'zeros', or None."""
    frames = np.ascontiguousarray(frames)[None]
    kind = follow_stacks(frames, frames, np.full(1, -1), False)[0]
    return {RESET_REPEAT: "repeat", RESET_ZEROS: "zeros"}.get(int(kind))


@numba.njit(cache=True, nogil=True)
def _stack_ids(newest, first, frame_stack):
    """Frame ids (M, K) of the stacks ending at `newest` in streams starting at `first`, padding clamped to `first`."""
    ids = np.empty((newest.shape[0], frame_stack), np.int64)
    for m in range(newest.shape[0]):
        for k in range(frame_stack):
            ids[m, k] = max(newest[m] - (frame_stack - 1 - k), first[m])
    return ids


@numba.njit(cache=True, nogil=True)
def _zero_padding(out, newest, first, zero_padded):
    """Zero the padding frames (those before the stream's first) of the stacks of out (M, K, F) where zero_padded."""
    frame_stack = out.shape[1]
    for m in range(out.shape[0]):
        if zero_padded[m]:
            for k in range(frame_stack - 1 - (newest[m] - first[m])):
                out[m, k, :] = 0


def stack_ids(newest: np.ndarray, first: np.ndarray, frame_stack: int) -> np.ndarray:
    """Frame ids (M, K) of the stacks ending at `newest` in streams starting at `first`, padding clamped to `first`."""
    return _stack_ids(np.asarray(newest, dtype=np.int64), np.asarray(first, dtype=np.int64), frame_stack)


def decode_stacks(store: FrameStore, newest: np.ndarray, first: np.ndarray, out: np.ndarray,
                  zero_padded: Optional[np.ndarray] = None) -> None:
    """Write the stacks (newest, first) of `store` into out (M, K, frame_size); padding repeats the first frame, or is zeros where zero_padded."""
    newest, first = np.asarray(newest, dtype=np.int64), np.asarray(first, dtype=np.int64)
    # One decode call for the whole batch: the store shares the work of frames that stacks have in common.
    store.decode(_stack_ids(newest, first, out.shape[1]).reshape(-1), out.reshape(-1, out.shape[2]))
    if zero_padded is not None:
        _zero_padding(out, newest, first, np.asarray(zero_padded, dtype=np.bool_))
