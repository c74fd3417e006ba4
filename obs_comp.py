"""Frame stores for the in-RAM replay buffer: raw frames (`half`) and lossless differential runs (`full`).

A frame store keeps the most recent `capacity` frames appended to it and decodes any of them by
global frame id (the number of frames appended before it). It knows nothing about transitions,
stacks or sampling; `replay_buffer.py` builds those on top.

`full` format. A frame is handled as 32-bit words (4 pixels). Within an episode:
  * anchor frames (the episode's first frame, then every `anchor_interval` frames) are raw;
  * key frames (every `key_interval` frames after an anchor) are runs of words that differ from
    their anchor;
  * every other frame is runs of words that differ from its key frame.
A run is one word (start and length, in words, as two uint16) followed by the frame's own
words over all its runs, so decoding is a raw copy plus at most two passes of word copies.
Storing whole words costs a little size against pixel-exact runs but lets decode move 4 pixels
per instruction. An encoding that is not smaller than the raw frame is stored raw.
Payloads live in one circular arena of words, written in frame order and reused as old frames
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
_MAX_FRAME_WORDS = 0xFFFF  # run start and length are uint16 word counts


class FrameStore(Protocol):
    """Keeps the newest `capacity` frames and decodes them by global frame id."""

    capacity: int

    @property
    def nbytes(self) -> int: ...

    @property
    def content_nbytes(self) -> int: ...

    def append(self, frame: np.ndarray, episode_start: bool) -> None: ...

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None: ...


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


@numba.njit(cache=True, nogil=True)
def _count_runs(frame, ref):
    runs = 0
    words = 0
    inside = False
    for i in range(frame.shape[0]):
        if frame[i] != ref[i]:
            words += 1
            if not inside:
                runs += 1
                inside = True
        else:
            inside = False
    return runs, words


@numba.njit(cache=True, nogil=True)
def _write_runs(frame, ref, n, arena, at):
    # n run words at arena[at:at+n] (start | length << 16), then the frame's words over the runs
    run = -1
    v = at + n
    inside = False
    for i in range(frame.shape[0]):
        if frame[i] != ref[i]:
            if not inside:
                run += 1
                arena[at + run] = i
                inside = True
            arena[at + run] += 1 << 16
            arena[v] = frame[i]
            v += 1
        else:
            inside = False


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
    n = num_runs[slot]
    at = offsets[slot]
    values = at + n
    for r in range(n):
        length = np.int64(arena[at + r] >> 16)
        _memcpy(dst, dst_at + np.int64(arena[at + r] & 0xFFFF), arena, values, length)
        values += length


@numba.njit(cache=True, nogil=True)
def _decode(ids, order, slots, offsets, num_runs, ref_dist, arena, words, out):
    # `order` visits ids sorted, so the frames of a stack come together and share their key
    # frame: it is decoded once, and found again at `cached_at` in `out` (or in `scratch` at -1).
    scratch = np.empty(words, np.uint32)
    cached_id = -1
    cached_at = -1
    for k in range(ids.shape[0]):
        i = order[k]
        fid = ids[i]
        s = fid % slots
        at = i * words
        if num_runs[s] < 0:
            _memcpy(out, at, arena, offsets[s], words)
            continue
        rid = fid - ref_dist[s]
        rs = rid % slots
        if num_runs[rs] < 0:
            _memcpy(out, at, arena, offsets[rs], words)
            _apply_runs(out, at, s, offsets, num_runs, arena)
            cached_id, cached_at = fid, at
            continue
        if rid != cached_id:
            _memcpy(scratch, 0, arena, offsets[(rid - ref_dist[rs]) % slots], words)
            _apply_runs(scratch, 0, rs, offsets, num_runs, arena)
            cached_id, cached_at = rid, -1
        if cached_at < 0:
            _memcpy(out, at, scratch, 0, words)
        else:
            _memcpy(out, at, out, cached_at, words)
        _apply_runs(out, at, s, offsets, num_runs, arena)


class DiffFrames:
    """`full`: anchors raw, key frames as word runs against their anchor, the rest against their key."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], key_interval: int, anchor_interval: int):
        if key_interval < 1 or anchor_interval < 1:
            raise ValueError(f"key_interval and anchor_interval must be >= 1, got {key_interval} and {anchor_interval}")
        self.capacity = capacity
        self.key_interval = key_interval
        self.anchor_interval = anchor_interval
        self.frame_size = math.prod(frame_shape)
        self._words = -(-self.frame_size // 4)
        if self._words > _MAX_FRAME_WORDS:
            raise ValueError(f"frame of {self.frame_size} bytes is too large for compression='full' "
                             f"(at most {4 * _MAX_FRAME_WORDS} bytes)")
        # A frame's references reach back at most anchor_interval - 1 frames, so that many extra
        # slots keep every reference of the newest `capacity` frames decodable.
        self._slots = capacity + anchor_interval - 1
        self._offsets = np.zeros(self._slots, dtype=np.int64)   # in words
        self._num_runs = np.zeros(self._slots, dtype=np.int32)  # -1: stored raw
        self._ref_dist = np.zeros(self._slots, dtype=np.int32)  # frames back to the reference
        self._arena = _resident_zeros(max(2, min(self._slots, 512) // 8) * self._words)
        self._head = 0      # word where the next payload goes
        self._wrap_end = 0  # end of the last payload written before head went back to 0
        self._count = 0
        self._episode_pos = 0
        self._frame = np.zeros(self._words, dtype=np.uint32)  # incoming frame, padded to whole words
        self._anchor = np.zeros(self._words, dtype=np.uint32)
        self._key = np.zeros(self._words, dtype=np.uint32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._arena, self._offsets, self._num_runs, self._ref_dist,
                                      self._frame, self._anchor, self._key))

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: the arena."""
        return self._arena.nbytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of the arena that hold stored frames (the rest is slack left by growth and wrapping)."""
        return 4 * self._live(max(self._count - self._slots, 0))[2]

    def append(self, frame: np.ndarray, episode_start: bool) -> None:
        """Encode and store `frame` as the next frame id."""
        self._frame.view(np.uint8)[:self.frame_size] = frame.reshape(-1)
        frame = self._frame
        self._episode_pos = 0 if episode_start or self._count == 0 else self._episode_pos + 1
        in_span = self._episode_pos % self.anchor_interval
        if in_span == 0:
            ref, dist = None, 0
        elif in_span % self.key_interval == 0:
            ref, dist = self._anchor, in_span
        else:
            ref, dist = self._key, in_span % self.key_interval

        runs = size = 0
        if ref is not None:
            runs, changed = _count_runs(frame, ref)
            size = runs + changed
        if ref is None or size >= self._words:
            runs, dist, size = -1, 0, self._words

        slot = self._count % self._slots
        offset = self._place(size)
        if runs < 0:
            self._arena[offset:offset + size] = frame
        else:
            _write_runs(frame, ref, runs, self._arena, offset)
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
        in_place = self.frame_size % 4 == 0 and out.flags.c_contiguous
        words = out.view(np.uint32) if in_place else np.empty((len(ids), self._words), dtype=np.uint32)
        _decode(ids, np.argsort(ids, kind="stable"), self._slots, self._offsets, self._num_runs,
                self._ref_dist, self._arena, self._words, words.reshape(-1))
        if not in_place:
            out[:] = words.view(np.uint8)[:, :self.frame_size]

    def _live(self, first_live: int) -> tuple[int, bool, int]:
        """(offset of frame `first_live`, whether the live payload wraps, live payload words)."""
        if self._count <= first_live:
            return 0, False, 0
        tail = int(self._offsets[first_live % self._slots])
        wrapped = self._head < tail
        live = self._wrap_end - tail + self._head if wrapped else self._head - tail
        return tail, wrapped, live

    def _place(self, size: int) -> int:
        """Return an arena offset for a payload of `size` words, growing the arena if it does not fit."""
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


def _resident_zeros(words: int) -> np.ndarray:
    """A zeroed uint32 array in its own anonymous mapping, with every page already resident."""
    # Its own mapping goes back to the OS as soon as the arena is replaced (malloc may keep freed
    # blocks of a few MB), and touching every page now makes nbytes memory actually resident.
    arena = np.frombuffer(mmap.mmap(-1, 4 * words), dtype=np.uint32)
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
