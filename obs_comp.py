"""Frame stores for the in-RAM replay buffer: raw frames (`half`) and lossless differential runs (`full`).

A frame store keeps the most recent `capacity` frames appended to it and decodes any of them by
global frame id (the number of frames appended before it). It knows nothing about transitions,
stacks or sampling; `replay_buffer.py` and `sb3_buffers.py` build those on top. A front end that
keeps fewer frames than `capacity` says so with `release(before)`, and their memory goes back.
A front end's own numba kernel appends with `append_frame(frame, episode_start, *store.kernel_args)`
where it returns an id (>= 0); otherwise the store's append() finishes the job in Python.

`full` format. Within an episode, anchors (the episode's first frame, then every `anchor_interval`
frames) are raw. Key frames (every `key_interval` frames after an anchor) and the frames between
them are stored in the smallest of these representations:
  * byte runs against a reference (key frames: their anchor; the others: their key frame). Runs
    closer than three equal bytes are merged (a new run would cost as much). A run is a pair of
    uint8 (bytes skipped since the previous run, run length), pairs first and then the frame's
    bytes over all its runs; skips and lengths above 255 continue in extra pairs. Decoding is a
    copy of the reference plus one short move per run.
  * entropy-coded differences (zstd): key frames alone, the others against the previous frame.
    Before zstd, each byte's difference to the reference (none for a key) has the difference of
    the pixel to its left subtracted, channels are interleaved per pixel and, for three channels,
    red and blue have green subtracted: scrolling textures such as DMC's checkerboard floor change
    most pixels a little, and this leaves mostly small, repetitive values. Decoding walks the chain
    from the key frame; a stack's consecutive frames share that walk.
  * raw, when neither is smaller.
An entropy-coded frame must undercut the byte runs by `min_entropy_saving` of a raw frame, because
its decompression costs time in proportion to the frame where runs cost a few memcpys; on
floor-free frames the runs nearly always win, on frames with the floor the entropy-coded
differences do.

Memory. Each store reserves address space for its worst case (every frame raw) up front, as one
anonymous mapping: a page becomes resident when a payload is first written to it, and pages that
only old frames used are handed back to the OS (madvise) as the oldest kept frame moves on. So a
store never copies its payload to grow, and `nbytes` counts the bytes actually resident. Besides its
payload and index, a store with entropy coding keeps copies of its current key frame and of the last
frame; without entropy coding the encoder reads the anchor from the arena and rebuilds the key there
into a row shared by the stores of one DiffScratch, so a store costs next to nothing before its frames.
"""
from __future__ import annotations

import math
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numba
import numpy as np
import zstandard
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros
from numba.extending import intrinsic

_RAW, _RUNS, _ZPREV, _ZINTRA = 0, 1, 2, 3  # how a `full` frame's payload encodes it (module docstring)
# A store's state, int64 words at the start of its kernel block (one uint8 array, so that a kernel call
# passes one array for all of it; DiffFrames' index and reference rows follow in the same block):
# frames appended, position in the episode, release(before)'s promise, arena offsets (the head, where the
# next payload goes; the end of the last payload before the head went back to 0; where the pages handed
# back end, from there back to the head's end of the ring), slots holding an entropy-coded frame, then
# settings fixed at construction (runs this large try zstd; pages go back in steps this large; index
# slots; bytes of a reference row and their number; which store the block belongs to)
_COUNT, _EPISODE_POS, _FIRST_NEEDED, _HEAD, _WRAP_END, _FREED, _ENTROPY_FRAMES = range(7)
_KEY_INTERVAL, _ANCHOR_INTERVAL, _ENTROPY_FROM, _CHUNK, _SLOTS, _REF_ROW, _REF_ROWS, _STORE = range(7, 15)
_STATE_BYTES = 16 * 8
_RAW_STORE, _DIFF_STORE = 0, 1  # state[_STORE]
_FREE_FIRST, _TRY_ENTROPY = -1, -2  # append_frame stored nothing: the store's append() finishes in Python
_CACHE = 8  # frames a decode walk remembers as references for the frames after them
_IN_OUT, _IN_WORK, _IN_ARENA = 0, 1, 2  # where a decode walk finds a decoded frame
_PATCH = 32  # bytes a short run is copied as (_patch)
_UINT8 = np.dtype(np.uint8)
_LITTLE_ENDIAN = sys.byteorder == "little"
_WORK_ROWS = 2  # frames a decode walk can hold besides the requested ones: a reference and the next
_PAGE = mmap.PAGESIZE
_RELEASE_CHUNK = 1 << 16  # pages go back to the OS in steps of at least this many bytes
# Linux's default overcommit heuristic refuses a private mapping larger than RAM + swap unless it
# asks for no reservation; the pages are still allocated (and counted) when written.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


class FrameStore(Protocol):
    """Keeps the newest `capacity` frames and decodes them by global frame id."""

    capacity: int
    kernel_args: tuple[np.ndarray, np.ndarray, np.ndarray]  # what append_frame takes to append from a kernel

    @property
    def nbytes(self) -> int: ...

    @property
    def content_nbytes(self) -> int: ...

    @property
    def count(self) -> int: ...

    def append(self, frame: np.ndarray, episode_start: bool) -> int: ...

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None: ...

    def release(self, before: int) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class _AddressSpace:
    """Reserved anonymous memory: a page is resident once written, until handed back with release()."""

    def __init__(self, size: int):
        self.size = -(-max(size, 1) // _PAGE) * _PAGE
        try:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
        except OSError as error:
            raise MemoryError(f"cannot reserve {self.size / 2**30:.1f} GiB of address space for a frame store "
                              f"({error}); a strict vm.overcommit_memory or `ulimit -v` forbids reserving more "
                              "than RAM: lower the buffer capacity or lift the limit") from error
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def release(self, start: int, length: int) -> None:
        """Hand back the whole pages of the circular byte range [start, start + length); they read as zeros."""
        for begin, end in ((start, min(start + length, self.size)), (0, start + length - self.size)):
            begin = -(-begin // _PAGE) * _PAGE
            end -= end % _PAGE
            if end > begin:
                self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class RawFrames:
    """`half`: every frame stored once, uncompressed, in a ring of `capacity` frames."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...]):
        self.capacity = capacity
        self.frame_size = math.prod(frame_shape)
        self._space = _AddressSpace(capacity * self.frame_size)
        self._frames = self._space.array[:capacity * self.frame_size].reshape(capacity, self.frame_size)
        self._block = _new_block(_RAW_STORE, capacity)
        self._state = self._block[:_STATE_BYTES].view(np.int64)  # only _COUNT changes, in append_frame
        self._first_needed = 0  # release(before) promises no decode below this id
        self._freed = 0  # frames below this id had their pages handed back
        self.kernel_args = (self._block, self._space.array, _NO_ROWS)  # what append_frame takes for this store

    @property
    def nbytes(self) -> int:
        return self.content_nbytes

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: the resident frames."""
        count = int(self._state[_COUNT])
        return (count - max(self._freed, count - self.capacity)) * self.frame_size

    @property
    def count(self) -> int:
        """Frames appended so far: the next frame's id."""
        return int(self._state[_COUNT])

    def append(self, frame: np.ndarray, episode_start: bool) -> int:
        """Store `frame` as the next frame id; that id."""
        return append_frame(_as_row(frame, self.frame_size), episode_start, *self.kernel_args)

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8."""
        # mode='wrap' maps ids to ring slots, and unlike the default mode it writes `out` unbuffered
        np.take(self._frames, ids, axis=0, out=out, mode="wrap")

    def release(self, before: int) -> None:
        """Frames with id < `before` will not be decoded again: hand their memory back."""
        count = int(self._state[_COUNT])
        self._first_needed = max(self._first_needed, min(before, count))
        start = max(self._freed, count - self.capacity)  # below, the ring already holds newer frames
        if (self._first_needed - start) * self.frame_size >= _RELEASE_CHUNK:
            self._space.release((start % self.capacity) * self.frame_size,
                                (self._first_needed - start) * self.frame_size)
            self._freed = self._first_needed

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) that restore this store through load_state_dict."""
        count = int(self._state[_COUNT])
        return {"config": np.array([self.capacity, self.frame_size], dtype=np.int64),
                "counters": np.array([count, self._first_needed], dtype=np.int64),
                "frames": self._frames[:min(count, self.capacity)]}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into this (empty or not) store of the same configuration."""
        _check_config("half", state, [self.capacity, self.frame_size])
        frames = np.asarray(state["frames"])
        count, first_needed = (int(x) for x in state["counters"])
        if frames.shape != (min(count, self.capacity), self.frame_size) or frames.dtype != np.uint8:
            raise ValueError(f"saved frames have shape {frames.shape} and dtype {frames.dtype}; expected "
                             f"{(min(count, self.capacity), self.frame_size)} uint8")
        self._frames[:len(frames)] = frames
        self._state[_COUNT], self._first_needed, self._freed = count, first_needed, 0

    def __getstate__(self) -> dict:
        return {"args": (self.capacity, (self.frame_size,)), "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(*pickled["args"])
        self.load_state_dict(pickled["state"])


@numba.njit(cache=True, nogil=True)
def _encode_runs(frame, ref, headers, values):
    # Runs of bytes that differ from `ref`, merged across gaps of at most two equal bytes (a
    # new run would cost as much). Each run is (skip, length) uint8 pairs in `headers`, its bytes in
    # `values`; skips and lengths over 255 continue in extra pairs. Returns (pairs, value bytes),
    # or (-1, -1) as soon as the encoding would not be smaller than the raw frame.
    size = frame.shape[0]
    pairs = 0
    used = 0
    end = 0  # where the previous run ended
    i = 0
    while i < size:
        if frame[i] == ref[i]:  # most bytes are unchanged
            i = _first_difference(frame, ref, i)
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
def _word(typingctx, array, at):
    """The 8 bytes array[at:at + 8] of a uint8 array as one uint64, whatever their alignment."""
    signature = types.uint64(array, types.intp)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load(builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer()), align=1)

    return signature, codegen


@numba.njit(cache=True, nogil=True, inline='always')
def _first_difference(a, b, i):
    """The first index from i on where uint8 arrays a and b (of one size) differ, or their size; 8 bytes at a time."""
    size = a.shape[0]
    while i + 8 <= size:
        diff = _word(a, i) ^ _word(b, i)
        if diff:  # the first byte in memory is the lowest on little-endian machines, the highest otherwise
            return i + (trailing_zeros(diff) if _LITTLE_ENDIAN else leading_zeros(diff)) // 8
        i += 8
    while i < size and a[i] == b[i]:
        i += 1
    return i


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


@intrinsic
def _patch(typingctx, dst, dst_at, length, src, src_at):
    """Copy `length` <= _PATCH items from src[src_at:] to dst[dst_at:] as fixed _PATCH-byte moves (uint8 arrays).

    It reads _PATCH items from src and writes dst[dst_at:dst_at + length + _PATCH], putting back the
    _PATCH items after the copied ones, so both arrays need that much room past the run."""
    # a run is ~8 bytes on median: a call into libc's memcpy per run costs more than these four moves
    signature = types.void(dst, types.intp, types.intp, src, types.intp)

    def codegen(context, builder, sig, args):
        dst_value, dst_at_value, length_value, src_value, src_at_value = args
        dst_data = context.make_array(sig.args[0])(context, builder, dst_value).data
        src_data = context.make_array(sig.args[3])(context, builder, src_value).data
        vector = ir.VectorType(ir.IntType(8), _PATCH).as_pointer()
        after = builder.bitcast(builder.gep(dst_data, [builder.add(dst_at_value, length_value)]), vector)
        kept = builder.load(after, align=1)
        run = builder.load(builder.bitcast(builder.gep(src_data, [src_at_value]), vector), align=1)
        builder.store(run, builder.bitcast(builder.gep(dst_data, [dst_at_value]), vector), align=1)
        builder.store(kept, after, align=1)
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def _apply_runs(dst, dst_at, size, slot, offsets, params, arena):
    """Overwrite the frame at dst[dst_at:dst_at + size] (its reference) with the runs of frame slot `slot`."""
    header = offsets[slot]
    value = header + 2 * np.int64(params[slot])
    position = dst_at
    room = dst_at + size - 2 * _PATCH  # a run starting up to here may be patched without leaving the frame
    last_value = arena.shape[0] - _PATCH
    for _ in range(params[slot]):
        position += arena[header]
        length = np.int64(arena[header + 1])
        if length <= _PATCH and position <= room and value <= last_value:
            _patch(dst, position, length, arena, value)
        else:
            _memcpy(dst, position, arena, value, length)
        position += length
        value += length
        header += 2


@numba.njit(cache=True, nogil=True)
def _live_payload(state, evicting, offsets, ref_dist):
    """(first frame whose payload must stay, its offset: the tail, whether the live payload wraps, live bytes)."""
    # must stay: frames held (or about to be, when evicting the oldest slot) and their references
    count, first_needed, head = state[_COUNT], state[_FIRST_NEEDED], state[_HEAD]
    slots = offsets.shape[0]
    first = max(count + evicting - slots, 0)
    if first_needed > first:
        # frames from first_needed on, and frames still to come in its span, read back to its anchor
        kept = min(first_needed, count - 1)
        ref = kept - ref_dist[kept % slots]
        first = max(first, ref - ref_dist[ref % slots])
    if count <= first:
        return first, head, False, 0
    tail = offsets[first % slots]
    if head < tail:
        return first, tail, True, state[_WRAP_END] - tail + head
    return first, tail, False, head - tail


@numba.njit(cache=True, nogil=True)
def _pages_behind(tail, state, arena_size):
    """Bytes of whole pages from the freed offset to the tail's page: dead payload, worth handing back once a chunk."""
    length = (tail - tail % _PAGE - state[_FREED]) % arena_size  # the tail may have gone round the ring
    return length if length >= state[_CHUNK] else 0


@numba.njit(cache=True, nogil=True)
def _span_position(state, episode_start):
    """(position in the episode, in the anchor's span, in the key's group, frames back to its reference: the
    key, or the anchor for keys; 0 for anchors) of the next frame."""
    episode_pos = 0 if episode_start or state[_COUNT] == 0 else state[_EPISODE_POS] + 1
    in_span = episode_pos % state[_ANCHOR_INTERVAL]
    in_group = in_span % state[_KEY_INTERVAL]
    return episode_pos, in_span, in_group, in_group if in_group else in_span


@numba.njit(cache=True, nogil=True)
def _place_payload(first, second, kind, param, dist, state, offsets, kinds, params, ref_dist, arena):
    """Write a payload (first, then second) in front of the head and index it as the next frame."""
    # the arena is sized so the payload always fits; offsets strictly increase in frame order (_live_payload)
    size = first.size + second.size
    offset = state[_HEAD]
    if not _live_payload(state, 1, offsets, ref_dist)[2] and offset + max(size, 1) > arena.size:
        state[_WRAP_END], offset = offset, 0
    arena[offset:offset + first.size] = first
    arena[offset + first.size:offset + size] = second
    state[_HEAD] = offset + max(size, 1)
    slot = state[_COUNT] % offsets.shape[0]
    # slots no frame was stored in hold _RAW: the count stays that of entropy-coded kinds among all slots
    state[_ENTROPY_FRAMES] += np.int64(kind >= _ZPREV) - np.int64(kinds[slot] >= _ZPREV)
    offsets[slot], kinds[slot], params[slot], ref_dist[slot] = offset, kind, param, dist


@numba.njit(cache=True, nogil=True)
def _frame_stored(frame, episode_pos, in_group, state, refs):
    """Count the frame just placed; stores with entropy coding keep a copy of it as the reference it is: a key
    (anchors are keys too), and the previous frame."""
    state[_COUNT] += 1
    state[_EPISODE_POS] = episode_pos
    if refs.shape[0]:
        if in_group == 0:
            refs[0, :frame.size] = frame
        refs[1, :frame.size] = frame


@numba.njit(cache=True, nogil=True)
def _run_reference(state, refs, offsets, kinds, params, ref_dist, arena, size, in_span, in_group, row):
    """The frame the next frame's runs are taken against, `in_span` (> 0) frames into its anchor's span and
    `in_group` into its key's group: the anchor's raw payload for a key; else the key's copy in `refs` (stores with
    entropy coding) or, rebuilt in `row`, its anchor with its runs applied (or its raw payload)."""
    # anchors and keys stay in the arena as long as frames are appended to their span (_live_payload)
    slots = offsets.shape[0]
    if in_group == 0:
        at = offsets[(state[_COUNT] - in_span) % slots]
        return arena[at:at + size]
    if refs.shape[0]:
        return refs[0, :size]
    key = state[_COUNT] - in_group
    slot = key % slots
    if kinds[slot] == _RAW:
        return arena[offsets[slot]:offsets[slot] + size]
    _memcpy(row, 0, arena, offsets[(key - ref_dist[slot]) % slots], size)
    _apply_runs(row, 0, size, slot, offsets, params, arena)
    return row[:size]


@numba.njit(cache=True, nogil=True)
def _block_sections(slots, ref_row, ref_rows):
    """Byte offsets in a DiffFrames kernel block of its references, offsets, params, ref_dist and kinds, and its
    size; each 8-byte aligned, after the state."""
    refs = _STATE_BYTES
    offsets = refs + ref_row * ref_rows
    params = offsets + 8 * slots
    ref_dist = params + -(-4 * slots // 8) * 8
    kinds = ref_dist + -(-4 * slots // 8) * 8
    return refs, offsets, params, ref_dist, kinds, kinds + -(-slots // 8) * 8


@numba.njit(cache=True, nogil=True)
def _block_views(block):
    """(state, references (rows, row), offsets, kinds, params, ref_dist) of a DiffFrames kernel block, as views."""
    state = block[:_STATE_BYTES].view(np.int64)
    slots, row, rows = state[_SLOTS], state[_REF_ROW], state[_REF_ROWS]
    refs, offsets, params, ref_dist, kinds, _ = _block_sections(slots, row, rows)
    return (state, block[refs:offsets].reshape(rows, row), block[offsets:params].view(np.int64),
            block[kinds:kinds + slots], block[params:params + 4 * slots].view(np.int32),
            block[ref_dist:ref_dist + 4 * slots].view(np.int32))


def _new_block(store: int, slots: int, ref_row: int = 0, ref_rows: int = 0) -> np.ndarray:
    """A zeroed kernel block holding its settings: the state, then for DiffFrames its references and index."""
    block = np.zeros(_STATE_BYTES if store == _RAW_STORE else _block_sections(slots, ref_row, ref_rows)[-1],
                     dtype=np.uint8)
    block[:_STATE_BYTES].view(np.int64)[[_SLOTS, _REF_ROW, _REF_ROWS, _STORE]] = slots, ref_row, ref_rows, store
    return block


@numba.njit(cache=True, nogil=True)
def _append_raw(frame, block, arena):
    """Copy the frame into its ring slot of a RawFrames arena; its id."""
    state = block[:_STATE_BYTES].view(np.int64)
    count = state[_COUNT]
    _memcpy(arena, (count % state[_SLOTS]) * frame.size, frame, 0, frame.size)
    state[_COUNT] = count + 1
    return count


@numba.njit(cache=True, nogil=True)
def _append_diff(frame, episode_start, block, arena, encoder):
    """Store the next frame of a DiffFrames: raw if an anchor, else byte runs against its anchor or key, raw where
    not smaller; its id, or _FREE_FIRST (pages to hand back) or _TRY_ENTROPY (runs of _ENTROPY_FROM bytes or
    more) instead, storing nothing. `encoder`: DiffScratch.encoder."""
    state, refs, offsets, kinds, params, ref_dist = _block_views(block)
    if _pages_behind(_live_payload(state, 1, offsets, ref_dist)[1], state, arena.size):
        return _FREE_FIRST
    episode_pos, in_span, in_group, dist = _span_position(state, episode_start)
    index = (state, offsets, kinds, params, ref_dist, arena)
    headers, values = encoder[0], encoder[1]
    if in_span == 0:
        _place_payload(frame, frame[:0], _RAW, frame.size, 0, *index)
    else:
        ref = _run_reference(state, refs, offsets, kinds, params, ref_dist, arena, frame.size, in_span, in_group,
                             encoder[2])
        runs, used = _encode_runs(frame, ref, headers, values)
        cost = frame.size if runs < 0 else 2 * runs + used
        if cost >= state[_ENTROPY_FROM]:
            return _TRY_ENTROPY
        if runs < 0:
            _place_payload(frame, frame[:0], _RAW, frame.size, dist, *index)
        else:
            _place_payload(headers[:2 * runs], values[:used], _RUNS, runs, dist, *index)
    _frame_stored(frame, episode_pos, in_group, state, refs)
    return state[_COUNT] - 1


@numba.njit(cache=True, nogil=True)
def append_frame(frame, episode_start, block, arena, rows):
    """Store `frame` (a row of uint8) as the next id of the store whose `kernel_args` are (block, arena, encoder rows): that
    id, or a negative value, storing nothing, where the store's own append() must finish the job. For front
    ends' kernels; frames are not checked here."""
    if block[:_STATE_BYTES].view(np.int64)[_STORE] == _RAW_STORE:
        return _append_raw(frame, block, arena)
    return _append_diff(frame, episode_start, block, arena, rows)


def _as_row(frame: np.ndarray, frame_size: int) -> np.ndarray:
    """`frame` as a contiguous row of frame_size uint8, or ValueError."""
    if type(frame) is np.ndarray and frame.dtype is _UINT8 and frame.shape == (frame_size,) and frame.strides == (1,):
        return frame
    frame = np.ascontiguousarray(frame).reshape(-1)
    if frame.size != frame_size or frame.dtype != np.uint8:
        raise ValueError(f"frame has {frame.size} values of dtype {frame.dtype}; expected {frame_size} uint8")
    return frame


_NO_ROWS = np.empty((3, 0), dtype=np.uint8)  # append_frame's encoder rows for stores that encode nothing


@numba.njit(cache=True, nogil=True)
def _decode_runs(ids, order, slots, offsets, kinds, params, ref_dist, arena, size, out):
    # _walk specialised to frames whose references are all raw or byte runs (what floor-free tasks
    # store), so a reference is raw or has a raw reference: `order` visits positions i of ids sorted by
    # id, writing out row i, so the frames of a stack come together and share their key frame, decoded
    # once and found again at `cached_at` in `out` (or in `scratch` at -1); a repeated id is copied.
    scratch = np.empty(size, np.uint8)
    cached_id = -1
    cached_at = -1
    previous_id = -1
    previous_at = 0
    for k in range(order.shape[0]):
        i = order[k]
        fid = ids[i]
        s = fid % slots
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            _memcpy(out, at, out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        if kinds[s] == _RAW:
            _memcpy(out, at, arena, offsets[s], size)
            continue
        rid = fid - ref_dist[s]
        rs = rid % slots
        if kinds[rs] == _RAW:
            _memcpy(out, at, arena, offsets[rs], size)
            _apply_runs(out, at, size, s, offsets, params, arena)
            cached_id, cached_at = fid, at
            continue
        if rid != cached_id:
            _memcpy(scratch, 0, arena, offsets[(rid - ref_dist[rs]) % slots], size)
            _apply_runs(scratch, 0, size, rs, offsets, params, arena)
            cached_id, cached_at = rid, -1
        if cached_at < 0:
            _memcpy(out, at, scratch, 0, size)
        else:
            _memcpy(out, at, out, cached_at, size)
        _apply_runs(out, at, size, s, offsets, params, arena)


@numba.njit(cache=True, nogil=True)
def _delta_transform(frame, ref, has_ref, layout, out):
    # out, pixel by pixel with channels interleaved: each byte's difference to `ref` (or the byte
    # itself) minus the same difference at the pixel to its left; for 3 channels, R and B then minus G.
    channels, height, width, channel_stride, pixel_stride = layout[0], layout[1], layout[2], layout[3], layout[4]
    left = np.zeros(channels, np.int64)
    dd = np.zeros(channels, np.int64)
    for y in range(height):
        left[:] = 0
        for x in range(width):
            pixel = y * width + x
            for c in range(channels):
                i = c * channel_stride + pixel * pixel_stride
                d = np.int64(frame[i]) - (np.int64(ref[i]) if has_ref else 0)
                dd[c] = d - left[c]
                left[c] = d
            if channels == 3:
                dd[0] -= dd[1]
                dd[2] -= dd[1]
            for c in range(channels):
                out[pixel * channels + c] = dd[c] & 255


@numba.njit(cache=True, nogil=True)
def _undo_delta_transform(t, ref, has_ref, dst, layout):
    # The inverse of _delta_transform: dst = ref + prefix sums along each row; dst may be ref itself.
    # Arguments are whole-frame views: indices that start at 0 spare numba's negative-index checks.
    channels, height, width, channel_stride, pixel_stride = layout[0], layout[1], layout[2], layout[3], layout[4]
    if channels == 3 and pixel_stride == 1:  # planar RGB, the DMC layout: three running sums per row
        red = dst[:channel_stride]
        green = dst[channel_stride:2 * channel_stride]
        blue = dst[2 * channel_stride:3 * channel_stride]
        for y in range(height):
            r = np.int64(0)
            g = np.int64(0)
            b = np.int64(0)
            row = y * width
            for x in range(width):
                src = 3 * (row + x)
                dg = np.int64(t[src + 1])
                r += np.int64(t[src]) + dg
                g += dg
                b += np.int64(t[src + 2]) + dg
                red[row + x] = r & 255
                green[row + x] = g & 255
                blue[row + x] = b & 255
    else:
        sums = np.zeros(channels, np.int64)
        for y in range(height):
            sums[:] = 0
            for x in range(width):
                pixel = y * width + x
                green = np.int64(t[pixel * channels + 1]) if channels == 3 else np.int64(0)
                for c in range(channels):
                    step = np.int64(t[pixel * channels + c])
                    sums[c] += step + green if channels == 3 and c != 1 else step
                    dst[c * channel_stride + pixel * pixel_stride] = sums[c] & 255
    if has_ref:
        for i in range(dst.shape[0]):
            dst[i] = (dst[i] + ref[i]) & 255


@numba.njit(cache=True, nogil=True, inline='always')
def _dependency(fid, slots, kinds, ref_dist):
    """The frame that frame `fid` is decoded from, or -1 if none."""
    s = fid % slots
    if kinds[s] == _RUNS:
        return fid - ref_dist[s]
    if kinds[s] == _ZPREV:
        return fid - 1
    return -1


@numba.njit(cache=True, nogil=True)
def _needs_entropy(ids, slots, kinds, ref_dist):
    """Per id, whether decoding it involves an entropy-coded payload (its own or a reference's)."""
    needs = np.zeros(ids.shape[0], np.bool_)
    for i in range(ids.shape[0]):
        g = ids[i]
        while g >= 0 and not needs[i]:
            needs[i] = kinds[g % slots] >= _ZPREV
            g = _dependency(g, slots, kinds, ref_dist)
    return needs


@numba.njit(cache=True, nogil=True, inline='always')
def _pick(where, out, work, arena):
    """The buffer a walk location names: the output, the walk's work rows or the arena."""
    if where == _IN_OUT:
        return out
    return work if where == _IN_WORK else arena


@numba.njit(cache=True, nogil=True)
def _walk(ids, order, slots, offsets, kinds, params, ref_dist, arena, size, layout, max_chain,
          out, work, entropy, jobs, dry):
    # `order` visits positions i of ids sorted by id, writing out row i, so the frames of a stack and
    # their shared references are decoded once. Each frame walks back along its dependencies to a raw payload, a frame decoded earlier in
    # this call (the last _CACHE are remembered, in `out` or in `work`) or a frame with no dependency,
    # then decodes forward from there. Entropy-coded payloads are decompressed by the caller (zstd
    # runs in Python): a dry run lists them in `jobs` (offset, size), in the order in which the real
    # run then reads their decompressed bytes from `entropy`. Returns the number of such payloads.
    cache_id = np.full(_CACHE, -1, np.int64)
    cache_where = np.zeros(_CACHE, np.int64)
    cache_at = np.zeros(_CACHE, np.int64)
    cache_next = 0
    work_rows = work.shape[0] // size
    work_next = 0
    chain = np.empty(max_chain, np.int64)
    n_jobs = 0
    previous_id = -1
    previous_at = 0
    for k in range(order.shape[0]):
        i = order[k]
        fid = ids[i]
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            if not dry:
                _memcpy(out, at, out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        n = 0
        base_where, base_at = _IN_ARENA, 0
        g = fid
        while g >= 0:
            s = g % slots
            if kinds[s] == _RAW:  # a raw payload is its decoded frame
                base_where, base_at = _IN_ARENA, offsets[s]
                break
            hit = -1
            for e in range(_CACHE):
                if cache_id[e] == g:
                    hit = e
                    break
            if hit >= 0:
                base_where, base_at = cache_where[hit], cache_at[hit]
                break
            chain[n] = g
            n += 1
            g = _dependency(g, slots, kinds, ref_dist)
        if n == 0 and not dry:
            _memcpy(out, at, _pick(base_where, out, work, arena), base_at, size)
        for j in range(n - 1, -1, -1):
            g = chain[j]
            where, target = _IN_OUT, at
            if j > 0:  # a reference nobody asked for: into a work row that the base is not in
                if base_where == _IN_WORK and base_at // size == work_next:
                    work_next = (work_next + 1) % work_rows
                where, target = _IN_WORK, work_next * size
                work_next = (work_next + 1) % work_rows
                for e in range(_CACHE):
                    if cache_where[e] == _IN_WORK and cache_at[e] == target:
                        cache_id[e] = -1
            s = g % slots
            kind = kinds[s]
            if kind == _RUNS:
                if not dry:
                    dst = _pick(where, out, work, arena)
                    _memcpy(dst, target, _pick(base_where, out, work, arena), base_at, size)
                    _apply_runs(dst, target, size, s, offsets, params, arena)
            elif dry:
                jobs[n_jobs, 0] = offsets[s]
                jobs[n_jobs, 1] = params[s]
                n_jobs += 1
            else:
                _undo_delta_transform(entropy[n_jobs * size:(n_jobs + 1) * size],
                                      _pick(base_where, out, work, arena)[base_at:base_at + size], kind == _ZPREV,
                                      _pick(where, out, work, arena)[target:target + size], layout)
                n_jobs += 1
            cache_id[cache_next] = g
            cache_where[cache_next] = where
            cache_at[cache_next] = target
            cache_next = (cache_next + 1) % _CACHE
            base_where, base_at = where, target
    return n_jobs


class DiffScratch:
    """Work rows of DiffFrames' encoder and decoder, shared by stores of one frame size used by one thread at a time."""

    def __init__(self, frame_size: int, decode_threads: int = 1):
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        self.frame_size = frame_size
        self.decode_threads = decode_threads
        # encoder rows: a frame's byte runs (headers, values), and a key rebuilt from the arena (stores without entropy
        # coding keep no copy of their key)
        self.encoder = np.empty((3, frame_size), dtype=np.uint8)
        self.headers, self.values = self.encoder[:2]
        self.transformed = np.empty(0, dtype=np.uint8)  # a frame before zstd: allocated by the first entropy coding
        # per decode thread: a zstd context, then its work rows and rows of decompressed payloads, allocated by its
        # first entropy decode (stores that hold no entropy-coded frame never need them)
        self.decoders = [(zstandard.ZstdDecompressor(), [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)])
                         for _ in range(decode_threads)]
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="frame-decode") if decode_threads > 1 else None

    @property
    def nbytes(self) -> int:
        """Bytes of every row: the encoder's, and the decoders' once they decoded entropy-coded frames."""
        return self.encoder.nbytes + self.transformed.nbytes + self.decode_nbytes

    @property
    def decode_nbytes(self) -> int:
        """Bytes of the decoders' rows: work rows and the decompressed payloads of the largest entropy-coded batch so far."""
        return sum(work.nbytes + payloads.nbytes for _, (work, payloads) in self.decoders)

    def transform_row(self) -> np.ndarray:
        """The row for a frame before zstd."""
        if self.transformed.size < self.frame_size:
            self.transformed = np.empty(self.frame_size, dtype=np.uint8)
        return self.transformed

    def __getstate__(self) -> dict:
        return {"frame_size": self.frame_size, "decode_threads": self.decode_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["frame_size"], state["decode_threads"])


class DiffFrames:
    """`full`: anchors raw; every other frame in the cheapest of byte runs or an entropy-coded difference."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], key_interval: int, anchor_interval: int,
                 entropy: bool = True, min_entropy_saving: int = 2048, zstd_level: int = 9, decode_threads: int = 1,
                 scratch: DiffScratch | None = None):
        if key_interval < 1 or anchor_interval < 1:
            raise ValueError(f"key_interval and anchor_interval must be >= 1, got {key_interval} and {anchor_interval}")
        frame_size = math.prod(frame_shape)
        if scratch is not None and (scratch.frame_size, scratch.decode_threads) != (frame_size, decode_threads):
            raise ValueError(f"scratch is for frames of {scratch.frame_size} bytes and {scratch.decode_threads} decode "
                             f"threads, this store has {frame_size} and {decode_threads}")
        self.capacity = capacity
        self.frame_shape = tuple(frame_shape)
        self.key_interval = key_interval
        self.anchor_interval = anchor_interval
        self.entropy = entropy
        self.min_entropy_saving = min_entropy_saving
        self.zstd_level = zstd_level
        self.decode_threads = decode_threads
        self.frame_size = frame_size
        self._owns_scratch = scratch is None  # a shared one is counted by whoever shares it
        self._scratch = DiffScratch(frame_size, decode_threads) if scratch is None else scratch
        self._layout = _layout(self.frame_shape)
        # A frame's references reach back at most anchor_interval - 1 frames, so that many extra
        # slots keep every reference of the newest `capacity` frames decodable.
        self._slots = capacity + anchor_interval - 1
        # One block for the kernels: state, references (with entropy coding, copies of the group's key and of the
        # last frame; without, the key is rebuilt and the anchor read from the arena), then per
        # slot its payload's offset in bytes, its kind (_RAW, _RUNS, _ZPREV or _ZINTRA), its param (_RUNS:
        # (skip, length) pairs; _Z*: payload bytes) and frames back to its run reference (0: anchor).
        self._block = _new_block(_DIFF_STORE, self._slots, -(-self.frame_size // 8) * 8, 2 if entropy else 0)
        self._state, self._refs, self._offsets, self._kinds, self._params, self._ref_dist = _block_views(self._block)
        self._key, self._previous = (self._refs[:, :self.frame_size] if entropy else
                                     (np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8)))
        # Worst case, every held frame is raw. One frame more covers the end skipped when the head
        # wraps, one the payload being placed, and a release chunk the pages not yet handed back
        # behind the tail: the head then never reaches the tail nor a page about to be released.
        self._space = _AddressSpace((self._slots + 2) * self.frame_size + _RELEASE_CHUNK + _PAGE)
        self._arena = self._space.array
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        # byte runs this large are worth a zstd pass if it saves min_entropy_saving bytes: its decompression
        # costs time in proportion to the frame, where runs cost a few memcpys
        entropy_from = 2 * min_entropy_saving if entropy else self.frame_size + 1
        self._state[[_KEY_INTERVAL, _ANCHOR_INTERVAL, _ENTROPY_FROM, _CHUNK]] = \
            key_interval, anchor_interval, entropy_from, _RELEASE_CHUNK  # fixed from here
        self.kernel_args = (self._block, self._arena, self._scratch.encoder)  # what append_frame takes for this store

    @property
    def nbytes(self) -> int:
        return self.content_nbytes + self._refs.nbytes + (self._scratch.nbytes if self._owns_scratch else 0)

    @property
    def decode_scratch_nbytes(self) -> int:
        """Bytes its scratch holds for decoding (decompressed payloads of the largest batch so far): not per frame."""
        return self._scratch.decode_nbytes

    @property
    def content_nbytes(self) -> int:
        """Bytes that grow with what is stored rather than with capacity: resident arena and index entries."""
        touched_slots = min(int(self._state[_COUNT]), self._slots)
        index = touched_slots * sum(a.itemsize for a in (self._offsets, self._kinds, self._params, self._ref_dist))
        return self._resident_arena() + index

    @property
    def payload_bytes(self) -> int:
        """Bytes of the arena that hold stored frames (the rest is slack left by wrapping and pages)."""
        return self._live_payload(evicting=False)[3]

    @property
    def count(self) -> int:
        """Frames appended so far: the next frame's id."""
        return int(self._state[_COUNT])

    @property
    def entropy_frames(self) -> int:
        """Frames held entropy-coded."""
        return int(self._state[_ENTROPY_FRAMES])

    def append(self, frame: np.ndarray, episode_start: bool) -> int:
        """Encode and store `frame` as the next frame id; that id."""
        frame = _as_row(frame, self.frame_size)
        stored = append_frame(frame, episode_start, *self.kernel_args)
        if stored == _FREE_FIRST:  # pages behind the tail go back before a payload can reach them
            self._free_behind(self._live_payload(evicting=True)[1])
            stored = append_frame(frame, episode_start, *self.kernel_args)
            assert stored != _FREE_FIRST, "the pages behind the tail were handed back"
        if stored == _TRY_ENTROPY:
            stored = self._append_entropy(frame, episode_start)
        return stored

    def _append_entropy(self, frame: np.ndarray, episode_start: bool) -> int:
        """Store the next frame as entropy-coded differences if they save min_entropy_saving bytes on its runs; its id."""
        episode_pos, in_span, in_group, dist = _span_position(self._state, episode_start)
        headers, values = self._scratch.headers, self._scratch.values
        ref = _run_reference(self._state, self._refs, self._offsets, self._kinds, self._params, self._ref_dist,
                             self._arena, self.frame_size, in_span, in_group, self._scratch.encoder[2])
        runs, used = _encode_runs(frame, ref, headers, values)
        kind, payload, param = (_RUNS, (headers[:2 * runs], values[:used]), runs) if runs >= 0 \
            else (_RAW, (frame, frame[:0]), self.frame_size)
        # keys stay a short walk from the anchor: they are coded alone, the others against the previous frame
        transformed = self._scratch.transform_row()
        _delta_transform(frame, self._previous, in_group > 0, self._layout, transformed)
        blob = self._compressor.compress(transformed)
        if len(blob) <= (self.frame_size if runs < 0 else 2 * runs + used) - self.min_entropy_saving:
            kind, payload, param = (_ZPREV if in_group else _ZINTRA), (np.frombuffer(blob, np.uint8), frame[:0]), \
                len(blob)
        index = (self._state, self._offsets, self._kinds, self._params, self._ref_dist, self._arena)
        _place_payload(*payload, kind, param, dist, *index)
        _frame_stored(frame, episode_pos, in_group, self._state, self._refs)
        return int(self._state[_COUNT]) - 1

    def decode(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Write the frames `ids` (M,) into `out` (M, C*H*W) uint8."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        flat = out.reshape(-1) if out.flags.c_contiguous else np.empty(out.size, dtype=np.uint8)
        if self._state[_ENTROPY_FRAMES]:
            needs = _needs_entropy(ids, self._slots, self._kinds, self._ref_dist)
            runs_only, entropy = np.flatnonzero(~needs), np.flatnonzero(needs)
            runs_order = runs_only[np.argsort(ids[runs_only])]
        else:
            runs_order, entropy = np.argsort(ids), ids[:0]
        if len(runs_order):
            _decode_runs(ids, runs_order, self._slots, self._offsets, self._kinds, self._params, self._ref_dist,
                         self._arena, self.frame_size, flat)
        if len(entropy):
            # contiguous stretches of the sorted ids, one per thread, each with its own references
            order = entropy[np.argsort(ids[entropy])]
            parts = np.array_split(order, min(self.decode_threads, len(order)))
            if len(parts) == 1:
                self._decode_entropy(ids, parts[0], flat, self._scratch.decoders[0])
            else:
                list(self._scratch.pool.map(self._decode_entropy, [ids] * len(parts), parts, [flat] * len(parts),
                                            self._scratch.decoders))
        if not out.flags.c_contiguous:
            out[:] = flat.reshape(out.shape)

    def release(self, before: int) -> None:
        """Frames with id < `before` will not be decoded again: their payload's memory may go back."""
        state = self._state
        state[_FIRST_NEEDED] = max(state[_FIRST_NEEDED], min(before, state[_COUNT]))
        self._free_behind(self._live_payload(evicting=False)[1])

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects, the payload as views) that restore this store through load_state_dict."""
        first, tail, wrapped, live = self._live_payload(evicting=False)
        count, episode_pos, first_needed, head, wrap_end = (int(x) for x in self._state[:_FREED])
        slots = np.arange(first, count) % self._slots
        offsets = self._offsets[slots]
        if wrapped:  # saved as one run of bytes starting at the tail: [tail, wrap_end) + [0, head)
            parts = (self._arena[tail:wrap_end], self._arena[:head])
            offsets = np.where(offsets >= tail, offsets - tail, offsets + wrap_end - tail)
        else:
            parts = (self._arena[tail:tail + live], self._arena[:0])
            offsets = offsets - tail
        return {"config": np.array(self._config(), dtype=np.int64),
                "counters": np.array([count, episode_pos, first, first_needed], dtype=np.int64),
                "payload_start": parts[0], "payload_end": parts[1], "offsets": offsets, "kinds": self._kinds[slots],
                "params": self._params[slots], "ref_dist": self._ref_dist[slots],
                "key": self._key, "previous": self._previous}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict saved into a store of the same configuration; ValueError leaves it unchanged."""
        _check_config("full", state, self._config())
        count, episode_pos, first, first_needed = (int(x) for x in state["counters"])
        held = count - first
        if not 0 <= held <= min(count, self._slots) or not 0 <= first_needed <= count:
            raise ValueError(f"saved counters {[count, episode_pos, first, first_needed]} are inconsistent")
        live = len(state["payload_start"]) + len(state["payload_end"])
        expected = {"payload_start": (None, np.uint8), "payload_end": (None, np.uint8), "offsets": (held, np.int64),
                    "kinds": (held, np.uint8), "params": (held, np.int32), "ref_dist": (held, np.int32),
                    # entropy coding continues from copies of the key and the last frame, which stores without it
                    # do not keep
                    "key": (self.frame_size if self.entropy else None, np.uint8),
                    "previous": (self.frame_size if self.entropy else None, np.uint8)}
        for name, (length, dtype) in expected.items():
            array = np.asarray(state[name])
            if array.ndim != 1 or array.dtype != dtype or (length is not None and len(array) != length):
                hint = " (saved by a store with entropy=False)" if name in ("key", "previous") and array.size == 0 \
                    else ""
                raise ValueError(f"saved {name} has shape {array.shape} and dtype {array.dtype}; "
                                 f"expected ({length if length is not None else 'n'},) {np.dtype(dtype)}{hint}")
        if not self.entropy and np.any(np.asarray(state["kinds"]) >= _ZPREV):
            raise ValueError("saved frames include entropy-coded ones; load them into a store with entropy=True")
        offsets = np.asarray(state["offsets"])
        if live > self._arena.size or (held and not 0 <= offsets.min() <= offsets.max() <= live):
            raise ValueError(f"saved payload of {live} bytes does not hold the saved offsets")
        self._space.release(0, self._space.size)
        start = len(state["payload_start"])
        self._arena[:start] = state["payload_start"]
        self._arena[start:live] = state["payload_end"]
        slots = np.arange(first, count) % self._slots
        self._kinds[:] = _RAW  # slots of frames not saved hold nothing to count or decode
        for name in ("offsets", "kinds", "params", "ref_dist"):
            getattr(self, "_" + name)[slots] = state[name]
        if self.entropy:
            self._key[:], self._previous[:] = state["key"], state["previous"]
        self._state[:_KEY_INTERVAL] = 0
        self._state[[_COUNT, _EPISODE_POS, _FIRST_NEEDED, _HEAD, _ENTROPY_FRAMES]] = \
            count, episode_pos, first_needed, live, np.count_nonzero(self._kinds >= _ZPREV)

    def __getstate__(self) -> dict:
        args = (self.capacity, self.frame_shape, self.key_interval, self.anchor_interval)
        kwargs = dict(entropy=self.entropy, min_entropy_saving=self.min_entropy_saving, zstd_level=self.zstd_level,
                      decode_threads=self.decode_threads)
        # a shared scratch goes along: pickle restores it shared by the stores pickled together
        return {"args": args, "kwargs": kwargs, "state": self.state_dict(),
                "scratch": None if self._owns_scratch else self._scratch}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(*pickled["args"], **pickled["kwargs"], scratch=pickled.get("scratch"))
        self.load_state_dict(pickled["state"])

    def _decode_entropy(self, ids: np.ndarray, order: np.ndarray, flat: np.ndarray, decoder: tuple) -> None:
        """Decode ids[order] (sorted, some entropy-coded) into `flat` with one thread's zstd context and scratch."""
        decompressor, rows = decoder  # rows: [work rows, decompressed payloads]
        if rows[0].size == 0:
            rows[0] = np.empty(_WORK_ROWS * self.frame_size, dtype=np.uint8)
        max_chain = self.key_interval + 2
        jobs = np.empty((len(order) * max_chain, 2), dtype=np.int64)
        args = (ids, order, self._slots, self._offsets, self._kinds, self._params, self._ref_dist, self._arena,
                self.frame_size, self._layout, max_chain, flat, rows[0])
        count = _walk(*args, rows[1], jobs, True)
        if rows[1].size < count * self.frame_size:
            rows[1] = np.empty(count * self.frame_size, dtype=np.uint8)
        payloads, size = rows[1], self.frame_size
        for j, (offset, length) in enumerate(jobs[:count].tolist()):  # zstd releases the GIL while it works
            payloads[j * size:(j + 1) * size] = np.frombuffer(
                decompressor.decompress(self._arena[offset:offset + length]), dtype=np.uint8)
        _walk(*args, payloads, jobs, False)

    def _config(self) -> list[int]:
        return [self.capacity, self.frame_size, self.key_interval, self.anchor_interval]

    def _live_payload(self, evicting: bool) -> tuple[int, int, bool, int]:
        """(first frame whose payload must stay, the tail offset, whether it wraps, live bytes): _live_payload()."""
        return _live_payload(self._state, int(evicting), self._offsets, self._ref_dist)

    def _free_behind(self, tail: int) -> None:
        """Hand back the pages between the last freed offset and the tail's page: only dead payload lies there."""
        length = _pages_behind(tail, self._state, self._arena.size)
        if length:
            self._space.release(int(self._state[_FREED]), length)
            self._state[_FREED] = tail - tail % _PAGE

    def _resident_arena(self) -> int:
        """Arena bytes in pages written since they were last handed back: from the freed offset to the head's page."""
        top = -(-int(self._state[_HEAD]) // _PAGE) * _PAGE  # behind the freed offset only after the head wrapped
        freed = int(self._state[_FREED])
        return top - freed if top >= freed else self._arena.size - freed + top


def _layout(frame_shape: tuple[int, ...]) -> np.ndarray:
    """(channels, height, width, channel stride, pixel stride) of a frame: CHW or HWC for 3-d shapes with <= 4
    channels on one side, (H, W) for 2-d, otherwise one row of single-channel pixels."""
    if len(frame_shape) == 3 and frame_shape[0] <= 4 < frame_shape[2]:
        channels, height, width = frame_shape
        return np.array([channels, height, width, height * width, 1], dtype=np.int64)
    if len(frame_shape) == 3 and frame_shape[2] <= 4:
        height, width, channels = frame_shape
        return np.array([channels, height, width, 1, channels], dtype=np.int64)
    if len(frame_shape) == 2:
        return np.array([1, frame_shape[0], frame_shape[1], 0, 1], dtype=np.int64)
    return np.array([1, 1, math.prod(frame_shape), 0, 1], dtype=np.int64)


def _check_config(mode: str, state: dict[str, np.ndarray], config: list[int]) -> None:
    """Raise ValueError unless `state` was saved by a store of this mode and configuration."""
    saved = [int(x) for x in np.asarray(state.get("config", []))]
    if saved != config:
        raise ValueError(f"saved frame store has configuration {saved}, this {mode!r} store has {config} "
                         "(capacity, frame bytes[, key_interval, anchor_interval]); load it into a matching buffer")


def make_frame_store(compression: str, capacity: int, frame_shape: tuple[int, ...],
                     key_interval: int, anchor_interval: int, **full_options) -> FrameStore:
    """Build the frame store of a compression mode ('half' or 'full'; `full_options` go to DiffFrames)."""
    if compression == "half":
        return RawFrames(capacity, frame_shape)
    if compression == "full":
        return DiffFrames(capacity, frame_shape, key_interval, anchor_interval, **full_options)
    raise ValueError(f"unknown compression {compression!r}: expected 'half' or 'full'")
