"""Frame stores for the in-RAM replay buffer: raw frames (`half`) and lossless differential runs (`full`).

A frame store keeps the most recent `capacity` frames appended to it and decodes any of them by
global frame id (the number of frames appended before it). It knows nothing about transitions,
stacks or sampling; `replay_buffer.py` builds those on top.

`full` format. Within an episode:
  * anchor frames (the episode's first frame, then every `anchor_interval` frames) are raw;
  * key frames (every `key_interval` frames after an anchor) are runs of bytes that differ from
    their anchor;
  * every other frame is runs of bytes that differ from its key frame.
Runs closer than three equal bytes are merged (a new run would cost as much). A run is a pair of
uint8 (bytes skipped since the previous run, run length), pairs first and then the frame's bytes
over all its runs, so decoding is a raw copy plus at most two passes of memcpys. Skips and lengths
above 255 continue in extra pairs. An encoding that is not smaller than the raw frame is stored raw.
Payloads live in one circular byte arena, written in frame order and reused as old frames
expire; it grows (compacting the live payload) only when the live payload no longer fits.
"""
from __future__ import annotations

import math
import mmap
from typing import Protocol

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_GROWTH = 1.125  # small steps: nbytes counts the whole arena, so slack costs compression


class FrameStore(Protocol):
    """Keeps the newest `capacity` frames and decodes them by global frame id."""

    capacity: int

    @property
    def nbytes(self) -> int: ...

    @property
    def content_nbytes(self) -> int: ...

    def append(self, frame: np.ndarray, episode_start: bool) -> None: ...

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class RawFrames:
    """`half`: every frame stored once, uncompressed, in a ring of `capacity` frames."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...]):
        self.capacity = capacity
        self._frames = np.zeros((capacity, math.prod(frame_shape)), dtype=np.uint8)
        self._count = 0

    @property
    def nbytes(self) -> int:
        return self._frames.nbytes

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: none here."""
        return 0

    def append(self, frame: np.ndarray, episode_start: bool) -> None:
        """Store `frame` as the next frame id."""
        self._frames[self._count % self.capacity] = frame.reshape(-1)
        self._count += 1

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8."""
        # mode='wrap' maps ids to ring slots, and unlike the default mode it writes `out` unbuffered
        np.take(self._frames, ids, axis=0, out=out, mode="wrap")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) that restore this store through load_state_dict."""
        return {"config": np.array([self.capacity, self._frames.shape[1]], dtype=np.int64),
                "count": np.int64(self._count),
                "frames": self._frames[:min(self._count, self.capacity)]}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into this (empty or not) store of the same configuration."""
        _check_config("half", state, [self.capacity, self._frames.shape[1]])
        frames = np.asarray(state["frames"])
        count = int(state["count"])
        if frames.shape != (min(count, self.capacity), self._frames.shape[1]) or frames.dtype != np.uint8:
            raise ValueError(f"saved frames have shape {frames.shape} and dtype {frames.dtype}; expected "
                             f"{(min(count, self.capacity), self._frames.shape[1])} uint8")
        self._frames[:len(frames)] = frames
        self._count = count


@numba.njit(cache=True, nogil=True)
def _encode_runs(frame, ref, headers, values):
    # Runs of bytes that differ from `ref`, merged across gaps of at most _MERGE_GAP equal bytes (a
    # new run would cost as much). Each run is (skip, length) uint8 pairs in `headers`, its bytes in
    # `values`; skips and lengths over 255 continue in extra pairs. Returns (pairs, value bytes),
    # or (-1, -1) as soon as the encoding would not be smaller than the raw frame.
    size = frame.shape[0]
    pairs = 0
    used = 0
    end = 0  # where the previous run ended
    i = 0
    while i < size:
        if frame[i] == ref[i]:
            i += 1
            continue
        j = i + 1
        while j < size:
            if frame[j] != ref[j]:
                j += 1
            elif j + 1 < size and frame[j + 1] != ref[j + 1]:
                j += 2
            elif j + 2 < size and frame[j + 2] != ref[j + 2]:
                j += 3
            else:
                break
        skip = i - end
        length = j - i
        new_pairs = max(skip - 1, 0) // 255 + (length + 254) // 255
        if 2 * (pairs + new_pairs) + used + length >= size:
            return -1, -1
        while skip > 255:
            headers[2 * pairs] = 255
            headers[2 * pairs + 1] = 0
            pairs += 1
            skip -= 255
        while True:
            part = min(length, 255)
            headers[2 * pairs] = skip
            headers[2 * pairs + 1] = part
            pairs += 1
            skip = 0
            length -= part
            if length == 0:
                break
        values[used:used + j - i] = frame[i:j]
        used += j - i
        end = j
        i = j
    return pairs, used


@intrinsic
def _memcpy(typingctx, dst, dst_at, src, src_at, count):
    """Copy `count` items from src[src_at:] to dst[dst_at:] (1-d arrays) with LLVM's memcpy."""
    # numba's own slice copies move an element at a time, several times slower than memcpy
    signature = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        dst_value, dst_at_value, src_value, src_at_value, count_value = args
        dst_array = context.make_array(sig.args[0])(context, builder, dst_value)
        src_array = context.make_array(sig.args[2])(context, builder, src_value)
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        cgutils.raw_memcpy(builder, builder.gep(dst_array.data, [dst_at_value]),
                           builder.gep(src_array.data, [src_at_value]), count_value, itemsize)
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def _apply_runs(dst, dst_at, slot, offsets, num_runs, arena):
    header = offsets[slot]
    value = header + 2 * np.int64(num_runs[slot])
    position = dst_at
    for _ in range(num_runs[slot]):
        position += arena[header]
        length = np.int64(arena[header + 1])
        _memcpy(dst, position, arena, value, length)
        position += length
        value += length
        header += 2


@numba.njit(cache=True, nogil=True)
def _decode(ids, order, slots, offsets, num_runs, ref_dist, arena, size, out):
    # `order` visits ids sorted, so the frames of a stack come together and share their key
    # frame: it is decoded once, and found again at `cached_at` in `out` (or in `scratch` at -1);
    # a repeated id is copied from its first decode.
    scratch = np.empty(size, np.uint8)
    cached_id = -1
    cached_at = -1
    previous_id = -1
    previous_at = 0
    for k in range(ids.shape[0]):
        i = order[k]
        fid = ids[i]
        s = fid % slots
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            _memcpy(out, at, out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        if num_runs[s] < 0:
            _memcpy(out, at, arena, offsets[s], size)
            continue
        rid = fid - ref_dist[s]
        rs = rid % slots
        if num_runs[rs] < 0:
            _memcpy(out, at, arena, offsets[rs], size)
            _apply_runs(out, at, s, offsets, num_runs, arena)
            cached_id, cached_at = fid, at
            continue
        if rid != cached_id:
            _memcpy(scratch, 0, arena, offsets[(rid - ref_dist[rs]) % slots], size)
            _apply_runs(scratch, 0, rs, offsets, num_runs, arena)
            cached_id, cached_at = rid, -1
        if cached_at < 0:
            _memcpy(out, at, scratch, 0, size)
        else:
            _memcpy(out, at, out, cached_at, size)
        _apply_runs(out, at, s, offsets, num_runs, arena)


class DiffFrames:
    """`full`: anchors raw, key frames as byte runs against their anchor, the rest against their key."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], key_interval: int, anchor_interval: int):
        if key_interval < 1 or anchor_interval < 1:
            raise ValueError(f"key_interval and anchor_interval must be >= 1, got {key_interval} and {anchor_interval}")
        self.capacity = capacity
        self.key_interval = key_interval
        self.anchor_interval = anchor_interval
        self.frame_size = math.prod(frame_shape)
        # A frame's references reach back at most anchor_interval - 1 frames, so that many extra
        # slots keep every reference of the newest `capacity` frames decodable.
        self._slots = capacity + anchor_interval - 1
        self._offsets = np.zeros(self._slots, dtype=np.int64)   # in bytes
        self._num_runs = np.zeros(self._slots, dtype=np.int32)  # (skip, length) pairs; -1: stored raw
        self._ref_dist = np.zeros(self._slots, dtype=np.int32)  # frames back to the reference
        self._arena = _resident_zeros(max(2, min(self._slots, 512) // 8) * self.frame_size)
        self._head = 0      # byte where the next payload goes
        self._wrap_end = 0  # end of the last payload written before head went back to 0
        self._count = 0
        self._episode_pos = 0
        self._anchor = np.zeros(self.frame_size, dtype=np.uint8)
        self._key = np.zeros(self.frame_size, dtype=np.uint8)
        self._headers = np.empty(self.frame_size, dtype=np.uint8)  # encoder scratch
        self._values = np.empty(self.frame_size, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._arena, self._offsets, self._num_runs, self._ref_dist,
                                      self._anchor, self._key, self._headers, self._values))

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: the arena."""
        return self._arena.nbytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of the arena that hold stored frames (the rest is slack left by growth and wrapping)."""
        return self._live(max(self._count - self._slots, 0))[2]

    def append(self, frame: np.ndarray, episode_start: bool) -> None:
        """Encode and store `frame` as the next frame id."""
        frame = np.ascontiguousarray(frame).reshape(-1)
        if frame.size != self.frame_size or frame.dtype != np.uint8:
            raise ValueError(f"frame has {frame.size} values of dtype {frame.dtype}; expected {self.frame_size} uint8")
        self._episode_pos = 0 if episode_start or self._count == 0 else self._episode_pos + 1
        in_span = self._episode_pos % self.anchor_interval
        if in_span == 0:
            ref, dist = None, 0
        elif in_span % self.key_interval == 0:
            ref, dist = self._anchor, in_span
        else:
            ref, dist = self._key, in_span % self.key_interval

        runs = -1
        if ref is not None:
            runs, used = _encode_runs(frame, ref, self._headers, self._values)
        slot = self._count % self._slots
        if runs < 0:
            offset = self._place(self.frame_size)
            self._arena[offset:offset + self.frame_size] = frame
            dist = 0
        else:
            offset = self._place(2 * runs + used)
            self._arena[offset:offset + 2 * runs] = self._headers[:2 * runs]
            self._arena[offset + 2 * runs:offset + 2 * runs + used] = self._values[:used]
        self._offsets[slot] = offset
        self._num_runs[slot] = runs
        self._ref_dist[slot] = dist
        self._count += 1

        if in_span == 0:
            self._anchor[:] = frame
        if in_span % self.key_interval == 0:
            self._key[:] = frame

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        flat = out.reshape(-1) if out.flags.c_contiguous else np.empty(out.size, dtype=np.uint8)
        _decode(ids, np.argsort(ids, kind="stable"), self._slots, self._offsets, self._num_runs,
                self._ref_dist, self._arena, self.frame_size, flat)
        if not out.flags.c_contiguous:
            out[:] = flat.reshape(out.shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) that restore this store through load_state_dict."""
        used = min(self._count, self._slots)
        return {"config": np.array(self._config(), dtype=np.int64),
                "counters": np.array([self._count, self._episode_pos, self._head, self._wrap_end], dtype=np.int64),
                "arena": self._arena, "offsets": self._offsets[:used], "num_runs": self._num_runs[:used],
                "ref_dist": self._ref_dist[:used], "anchor": self._anchor, "key": self._key}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into a store of the same configuration."""
        _check_config("full", state, self._config())
        count, episode_pos, head, wrap_end = (int(x) for x in state["counters"])
        used = min(count, self._slots)
        expected = {"arena": (None, np.uint8), "offsets": (used, np.int64), "num_runs": (used, np.int32),
                    "ref_dist": (used, np.int32), "anchor": (self.frame_size, np.uint8), "key": (self.frame_size, np.uint8)}
        for name, (length, dtype) in expected.items():
            array = np.asarray(state[name])
            if array.ndim != 1 or array.dtype != dtype or (length is not None and len(array) != length):
                raise ValueError(f"saved {name} has shape {array.shape} and dtype {array.dtype}; "
                                 f"expected ({length if length is not None else 'n'},) {np.dtype(dtype)}")
        if not 0 <= wrap_end <= len(state["arena"]) or not 0 <= head <= len(state["arena"]):
            raise ValueError(f"saved arena of {len(state['arena'])} bytes does not hold head {head} / end {wrap_end}")
        self._arena = _resident_zeros(max(len(state["arena"]), 2))
        self._arena[:len(state["arena"])] = state["arena"]
        for name in ("offsets", "num_runs", "ref_dist"):
            getattr(self, "_" + name)[:used] = state[name]
        self._anchor[:] = state["anchor"]
        self._key[:] = state["key"]
        self._count, self._episode_pos, self._head, self._wrap_end = count, episode_pos, head, wrap_end

    def _config(self) -> list[int]:
        return [self.capacity, self.frame_size, self.key_interval, self.anchor_interval]

    def _live(self, first_live: int) -> tuple[int, bool, int]:
        """(offset of frame `first_live`, whether the live payload wraps, live payload bytes)."""
        if self._count <= first_live:
            return 0, False, 0
        tail = int(self._offsets[first_live % self._slots])
        wrapped = self._head < tail
        live = self._wrap_end - tail + self._head if wrapped else self._head - tail
        return tail, wrapped, live

    def _place(self, size: int) -> int:
        """Return an arena offset for a payload of `size` bytes, growing the arena if it does not fit."""
        size = max(size, 1)  # offsets then strictly increase in frame order, which _live relies on
        first_live = max(self._count + 1 - self._slots, 0)  # the new frame evicts the one before
        if self._count <= first_live:  # nothing stays stored: start over at the arena's start
            self._head = self._wrap_end = 0
        tail, wrapped, _ = self._live(first_live)
        head = self._head
        if wrapped:
            offset = head if head + size < tail else None
        elif head + size <= self._arena.size:
            offset = head
        elif size < tail:
            self._wrap_end, offset = head, 0
        else:
            offset = None
        if offset is None:
            offset = self._grow(size, first_live)
        self._head = offset + size
        return offset

    def _grow(self, size: int, first_live: int) -> int:
        """Move the live payload to the start of a larger arena; return where the next payload goes."""
        tail, wrapped, live = self._live(first_live)
        arena = _resident_zeros(max(int(self._arena.size * _GROWTH), live + size + 1))
        slots = np.arange(first_live, self._count) % self._slots
        offsets = self._offsets[slots]
        if wrapped:
            before_wrap = self._wrap_end - tail
            arena[:before_wrap] = self._arena[tail:self._wrap_end]
            arena[before_wrap:live] = self._arena[:self._head]
            self._offsets[slots] = np.where(offsets >= tail, offsets - tail, offsets + before_wrap)
        else:
            arena[:live] = self._arena[tail:tail + live]
            self._offsets[slots] = offsets - tail
        self._arena = arena
        self._wrap_end = 0
        return live


def _check_config(mode: str, state: dict[str, np.ndarray], config: list[int]) -> None:
    """Raise ValueError unless `state` was saved by a store of this mode and configuration."""
    saved = [int(x) for x in np.asarray(state.get("config", []))]
    if saved != config:
        raise ValueError(f"saved frame store has configuration {saved}, this {mode!r} store has {config} "
                         "(capacity, frame bytes[, key_interval, anchor_interval]); load it into a matching buffer")


def _resident_zeros(size: int) -> np.ndarray:
    """A zeroed uint8 array in its own anonymous mapping, with every page already resident."""
    # Its own mapping goes back to the OS as soon as the arena is replaced (malloc may keep freed
    # blocks of a few MB), and touching every page now makes nbytes memory actually resident.
    arena = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    arena.fill(0)
    return arena


def make_frame_store(compression: str, capacity: int, frame_shape: tuple[int, ...],
                     key_interval: int, anchor_interval: int) -> FrameStore:
    """Build the frame store of a compression mode ('half' or 'full')."""
    if compression == "half":
        return RawFrames(capacity, frame_shape)
    if compression == "full":
        return DiffFrames(capacity, frame_shape, key_interval, anchor_interval)
    raise ValueError(f"unknown compression {compression!r}: expected 'half' or 'full'")
