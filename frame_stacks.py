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

import numpy as np

from kernels import (OTHER, RESET_REPEAT, RESET_ZEROS, SAME, SHIFTED, equal_range, follow_stacks,  # noqa: F401
                     follow_transition, zero_padding)
from kernels import stack_ids as _stack_ids
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
        """Observations (..., *obs_shape) as their frames (..., K, frame_size), oldest first (a view if channels
        first)."""
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


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two uint8 arrays of the same shape hold the same bytes (compared a block at a time, up to the first
    block that differs)."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return equal_range(a.reshape(-1), 0, b.reshape(-1), 0, a.size)
    return bool((a == b).all())


def shifted(previous: np.ndarray, frames: np.ndarray) -> bool:
    """Whether stack `frames` (K, F) is `previous` (K, F) moved one frame older with one new newest frame."""
    return same_bytes(frames[:-1], previous[1:])


def reset_padding(frames: np.ndarray) -> Optional[str]:
    """How a stack (K, F) that starts a stream is padded: 'repeat' (older frames copy the newest), 'zeros', or None."""
    frames = np.ascontiguousarray(frames)[None]
    kind = follow_stacks(frames, frames, np.full(1, -1), False)[0]
    return {RESET_REPEAT: "repeat", RESET_ZEROS: "zeros"}.get(int(kind))


def stack_ids(newest: np.ndarray, first: np.ndarray, frame_stack: int) -> np.ndarray:
    """Frame ids (M, K) of the stacks ending at `newest` in streams starting at `first`, padding clamped to `first`."""
    return _stack_ids(np.asarray(newest, dtype=np.int64), np.asarray(first, dtype=np.int64), frame_stack)


def decode_stacks(store: FrameStore, newest: np.ndarray, first: np.ndarray, out: np.ndarray,
                  zero_padded: Optional[np.ndarray] = None) -> None:
    """Write the stacks (newest, first) of `store` into out (M, K, frame_size); padding repeats the first frame,
    or is zeros where zero_padded."""
    newest, first = np.asarray(newest, dtype=np.int64), np.asarray(first, dtype=np.int64)
    # One decode call for the whole batch: the store shares the work of frames that stacks have in common.
    store.decode(_stack_ids(newest, first, out.shape[1]).reshape(-1), out.reshape(-1, out.shape[2]))
    if zero_padded is not None:
        zero_padding(out, newest, first, np.asarray(zero_padded, dtype=np.bool_))
