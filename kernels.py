"""Numba kernels of the frame stores (obs_comp.py) and of frame stacks (frame_stacks.py), apart from their policy.

They live in one file because numba's disk cache keys a compiled kernel on its own source file only: a
kernel that called into another file would go on running that file's old code after an edit there.

Sections, in reading order:
  1. The `full` format: what a frame's payload holds, byte runs, the delta transform (the spec).
  2. Byte primitives: unaligned words, equal ranges, copies.
  3. A store's state: the named fields of its kernel block, and the views kernels take as one bundle.
  4. The arena: where payloads go, which must stay, which pages may go back.
  5. Appending a frame, and the outcomes that hand the rest to Python.
  6. Decoding: batches of byte-run frames, and the general walk along references.
  7. Frame stacks: how a stack follows the previous one, and the frame ids of stacks.
  8. Validation: a saved state checked against the format, one function per payload kind and one for the index.
"""
from __future__ import annotations

import mmap
import sys
from collections import namedtuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros
from numba.extending import intrinsic

_LITTLE_ENDIAN = sys.byteorder == "little"
PAGE = mmap.PAGESIZE

# ---------------------------------------------------------------------------------------------------------------
# 1. The `full` format
#
# Frames are numbered by id (frames appended before them). A frame's position in its episode p counts from 0 at
# an episode start; its position in its anchor's span is s = p % anchor_interval, in its key's group g = s %
# key_interval. An anchor (s == 0) is stored raw. Every other frame has a run reference: its key (g > 0, g frames
# back) or, for a key (g == 0), its anchor (s frames back); it is stored as the smallest of
#   RAW     the frame's bytes;
#   RUNS    byte runs against the run reference (encode_runs);
#   ZPREV   (g > 0) zstd of the delta transform of the frame against the previous frame;
#   ZINTRA  (keys) zstd of the delta transform of the frame alone;
# where an entropy-coded payload must also undercut the runs by the store's min_entropy_saving bytes.
# Per frame the index holds its payload's arena offset, its kind, a param (RAW: frame bytes; RUNS: (skip, length)
# pairs; Z*: payload bytes) and ref_dist, the frames back to its run reference (0 for anchors).
RAW, RUNS, ZPREV, ZINTRA = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True)
def encode_runs(frame, ref, headers, values):
    """Byte runs of `frame` against `ref` into headers and values: (pairs, value bytes), or (-1, -1) where the
    runs would not be smaller than the frame.

    A run is a stretch of bytes that differ from ref, merged across gaps of at most two equal bytes (a
    new run would cost as much). Each run is written as uint8 (skip, length) pairs in `headers`: bytes
    skipped since the previous run ended, then the run's length, skips and lengths above 255 continued
    in extra pairs ((255, 0) for skips); its bytes go to `values`. A payload is the pairs, then the values."""
    size = frame.shape[0]
    pairs = 0
    used = 0
    end = 0  # where the previous run ended
    i = 0
    while i < size:
        if frame[i] == ref[i]:  # most bytes are unchanged
            i = first_difference(frame, ref, i)
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


@numba.njit(cache=True, nogil=True)
def apply_runs(dst, dst_at, size, pairs, header, arena):
    """Overwrite the frame dst[dst_at:dst_at + size] (the run reference) with the `pairs` runs whose payload
    starts at arena[header]."""
    value = header + 2 * pairs
    position = dst_at
    frame_end = dst_at + size
    for _ in range(pairs):
        position += arena[header]
        length = np.int64(arena[header + 1])
        copy_short(dst, position, arena, value, length, frame_end)
        position += length
        value += length
        header += 2


@numba.njit(cache=True, nogil=True)
def delta_transform(frame, ref, has_ref, layout, out):
    """out, pixel by pixel with channels interleaved: each byte's difference to `ref` (or the byte itself, without
    a ref) minus the same difference at the pixel to its left; for 3 channels, R and B then minus G (mod 256).

    Scrolling textures such as DMC's checkerboard floor change most pixels a little from frame to frame;
    this leaves mostly small, repetitive values for zstd. `layout`: frame_layout()."""
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
def undo_delta_transform(t, ref, has_ref, dst, layout):
    """The inverse of delta_transform: dst = ref + prefix sums along each row; dst may be ref itself."""
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


# ---------------------------------------------------------------------------------------------------------------
# 2. Byte primitives: every comparison reads unaligned 8-byte words, every copy is LLVM's memcpy or a short patch.

@intrinsic
def _word(typingctx, array, at):
    """The 8 bytes array[at:at + 8] of a uint8 array as one uint64, whatever their alignment."""
    signature = types.uint64(array, types.intp)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load(builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer()), align=1)

    return signature, codegen


@numba.njit(cache=True, nogil=True, inline='always')
def first_difference(a, b, i):
    """The first index from i on where uint8 arrays a and b (of one size) differ, or their size."""
    size = a.shape[0]
    while i + 8 <= size:
        diff = _word(a, i) ^ _word(b, i)
        if diff:  # the first byte in memory is the lowest on little-endian machines, the highest otherwise
            return i + (trailing_zeros(diff) if _LITTLE_ENDIAN else leading_zeros(diff)) // 8
        i += 8
    while i < size and a[i] == b[i]:
        i += 1
    return i


_BLOCK = 512  # bytes equal_range and all_zero compare before they look at the result


@numba.njit(cache=True, nogil=True)
def equal_range(a, a_at, b, b_at, count):
    """Whether uint8 arrays a[a_at:a_at + count] and b[b_at:b_at + count] hold the same bytes."""
    # blocks of 64 words without an early exit inside compile to vector code, several times faster than a word
    # at a time
    i = 0
    while i + _BLOCK <= count:
        differ = _word(a, a_at + i) ^ _word(b, b_at + i)
        for j in range(8, _BLOCK, 8):
            differ |= _word(a, a_at + i + j) ^ _word(b, b_at + i + j)
        if differ != 0:
            return False
        i += _BLOCK
    while i + 8 <= count:
        if _word(a, a_at + i) != _word(b, b_at + i):
            return False
        i += 8
    for j in range(i, count):
        if a[a_at + j] != b[b_at + j]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def all_zero(a, at, count):
    """Whether the uint8 array a[at:at + count] is all zeros."""
    i = 0
    while i + _BLOCK <= count:  # blocks, as in equal_range
        seen = _word(a, at + i)
        for j in range(8, _BLOCK, 8):
            seen |= _word(a, at + i + j)
        if seen != 0:
            return False
        i += _BLOCK
    for j in range(i, count):
        if a[at + j] != 0:
            return False
    return True


@intrinsic
def memcpy(typingctx, dst, dst_at, src, src_at, count):
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


_PATCH = 32  # bytes a short run is copied as (copy_short)


@intrinsic
def _patch(typingctx, dst, dst_at, length, src, src_at):
    """Copy `length` <= _PATCH bytes from src[src_at:] to dst[dst_at:] as fixed _PATCH-byte moves: reads _PATCH
    bytes of src and writes dst[dst_at:dst_at + length + _PATCH], putting back the bytes after the copied ones.
    Only copy_short calls it, where both arrays have that much room."""
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


@numba.njit(cache=True, nogil=True, inline='always')
def copy_short(dst, dst_at, src, src_at, length, dst_end):
    """Copy src[src_at:src_at + length] to dst[dst_at:], writing nothing at or past dst_end (uint8 arrays)."""
    # a run is ~8 bytes on median: a call into libc's memcpy per run costs more than the patch's four moves,
    # which may only touch bytes of the same frame in dst and of the same arena in src
    if length <= _PATCH and dst_at + length + _PATCH <= dst_end and src_at + _PATCH <= src.shape[0]:
        _patch(dst, dst_at, length, src, src_at)
    else:
        memcpy(dst, dst_at, src, src_at, length)


# ---------------------------------------------------------------------------------------------------------------
# 3. A store's state
#
# Each store keeps what its kernels read and write in one uint8 kernel block, so that a kernel call passes one
# array for all of it: the STATE record, then for `full` stores the reference rows and the index. Kernels see it
# through store_views() as one Store bundle; Python sees the same memory through numpy views.
STATE = np.dtype([
    ("count", np.int64),           # frames appended: the next frame's id
    ("episode_pos", np.int64),     # the last frame's position in its episode
    ("first_needed", np.int64),    # release(before)'s promise: no frame below this id is decoded again
    ("head", np.int64),            # arena offset where the next payload goes
    ("wrap_end", np.int64),        # arena offset where the last payload before the head went back to 0 ends
    ("freed", np.int64),           # arena offset where the pages handed back end (they run back to the head's)
    ("entropy_frames", np.int64),  # slots holding an entropy-coded frame
    ("runs_pairs", np.int64),      # runs left in the encoder rows by an append that asked for an entropy trial
    ("runs_values", np.int64),     # (their value bytes; pairs -1: the frame is not smaller as runs)
    # fixed at construction
    ("store", np.int64),           # RAW_STORE or DIFF_STORE
    ("slots", np.int64),           # index slots (RawFrames: ring slots)
    ("frame_size", np.int64),      # bytes of a frame
    ("key_interval", np.int64),
    ("anchor_interval", np.int64),
    ("entropy_from", np.int64),    # runs of this many bytes are worth an entropy trial
    ("release_chunk", np.int64),   # pages go back in steps of at least this many bytes
    ("ref_row", np.int64),         # bytes of a reference row
    ("ref_rows", np.int64),        # reference rows: copies of the key and of the last frame (entropy coding)
])
STATE_BYTES = STATE.itemsize
RAW_STORE, DIFF_STORE = 0, 1

# The kernels' view of a store: its STATE record, reference rows (ref_rows, ref_row), per slot the payload's
# offset, kind, param and ref_dist (section 1), and the arena.
Store = namedtuple("Store", "state refs offsets kinds params ref_dist arena")


@numba.njit(cache=True, nogil=True)
def _block_sections(slots, ref_row, ref_rows):
    """Byte offsets in a DIFF_STORE kernel block of its references, offsets, params, ref_dist and kinds, and its
    size: each section 8-byte aligned, after the state."""
    refs = STATE_BYTES
    offsets = refs + ref_row * ref_rows
    params = offsets + 8 * slots
    ref_dist = params + -(-4 * slots // 8) * 8
    kinds = ref_dist + -(-4 * slots // 8) * 8
    return refs, offsets, params, ref_dist, kinds, kinds + -(-slots // 8) * 8


@numba.njit(cache=True, nogil=True)
def index_views(block):
    """(reference rows, offsets, kinds, params, ref_dist) of a kernel block, as views (empty for a RAW_STORE)."""
    state = block[:STATE_BYTES].view(STATE)[0]
    slots, row, rows = state.slots, state.ref_row, state.ref_rows
    if state.store == RAW_STORE:
        slots, row, rows = 0, 0, 0
    refs, offsets, params, ref_dist, kinds, _ = _block_sections(slots, row, rows)
    return (block[refs:offsets].reshape(rows, row), block[offsets:params].view(np.int64), block[kinds:kinds + slots],
            block[params:params + 4 * slots].view(np.int32), block[ref_dist:ref_dist + 4 * slots].view(np.int32))


@numba.njit(cache=True, nogil=True, inline='always')  # inlined: numba cannot return a record inside a tuple
def store_views(block, arena):
    """The Store bundle of a kernel block and its arena."""
    refs, offsets, kinds, params, ref_dist = index_views(block)
    return Store(block[:STATE_BYTES].view(STATE)[0], refs, offsets, kinds, params, ref_dist, arena)


def new_block(store: int, slots: int, frame_size: int, ref_row: int = 0, ref_rows: int = 0) -> np.ndarray:
    """A zeroed kernel block of a store of kind `store` (RAW_STORE or DIFF_STORE) with its fixed fields set."""
    size = STATE_BYTES if store == RAW_STORE else int(_block_sections(slots, ref_row, ref_rows)[-1])
    block = _zeroed_pages(size)
    state = state_record(block)
    for name, value in (("store", store), ("slots", slots), ("frame_size", frame_size), ("ref_row", ref_row),
                        ("ref_rows", ref_rows)):
        state[name] = value
    return block


def _zeroed_pages(size: int) -> np.ndarray:
    """`size` zero bytes in their own anonymous mapping, a page resident once written and never a huge page.

    numpy asks for transparent huge pages for arrays of 4 MiB or more: an index block would then go resident 2 MiB
    per section at its first entries, where nbytes counts the entries used."""
    mapping = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux, also where THP is "always"
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=np.uint8)[:size]


def state_record(block: np.ndarray) -> np.void:
    """The STATE record at the start of a kernel block, as a numpy view (writes go to the block)."""
    return block[:STATE_BYTES].view(STATE)[0]


# ---------------------------------------------------------------------------------------------------------------
# 4. The arena
#
# A `full` store's payloads lie in one arena of reserved address space, placed at the head one after another in
# frame order: offsets increase with the frame id except once, where the head went back to 0 (wrap_end marks
# where the last payload before it ends). The live payload runs from the tail, the payload of the first frame
# that must stay (frames held, and what they are decoded from: back to their anchor), to the head. Behind the
# tail lies dead payload; its pages are handed back to the OS once they make a release_chunk (Python's madvise:
# `freed` says where they end), and always before the head could write into them.
# Invariant: the head never reaches the tail, nor a page about to be handed back. The arena is sized for it: in
# the worst case every held frame is raw (slots frames), one frame more covers the end skipped at a wrap, one the
# payload being placed, and a release chunk plus a page the dead pages not yet handed back.

def arena_size(slots: int, frame_size: int, release_chunk: int, page: int) -> int:
    """Bytes of address space a `full` store reserves: its worst case, with the invariant above."""
    return (slots + 2) * frame_size + release_chunk + page


@numba.njit(cache=True, nogil=True)
def live_payload(store, evicting):
    """(first frame whose payload must stay, its offset: the tail, whether the live payload wraps, live bytes);
    `evicting`: as if the next frame had already taken the oldest slot."""
    state, slots = store.state, store.offsets.shape[0]
    count, first_needed, head = state.count, state.first_needed, state.head
    first = max(count + evicting - slots, 0)
    if first_needed > first:
        # frames from first_needed on, and frames still to come in its span, read back to its anchor
        kept = min(first_needed, count - 1)
        ref = kept - store.ref_dist[kept % slots]
        first = max(first, ref - store.ref_dist[ref % slots])
    if count <= first:
        return first, head, False, 0
    tail = store.offsets[first % slots]
    if head < tail:
        return first, tail, True, state.wrap_end - tail + head
    return first, tail, False, head - tail


@numba.njit(cache=True, nogil=True)
def _pages_behind(store, tail):
    """Bytes of whole pages from the freed offset to the tail's page if they make a release chunk, else 0."""
    length = (tail - tail % PAGE - store.state.freed) % store.arena.shape[0]  # the tail may have gone round
    return length if length >= store.state.release_chunk else 0


@numba.njit(cache=True, nogil=True)
def pages_to_free(block, arena, evicting):
    """(start, length) of the dead pages behind the tail that make a release chunk, counted as handed back from
    here: the caller hands them back (madvise) before anything is written to them; length 0 if none."""
    store = store_views(block, arena)
    tail = live_payload(store, evicting)[1]
    length = _pages_behind(store, tail)
    start = store.state.freed
    if length:
        store.state.freed = tail - tail % PAGE
    return start, length


@numba.njit(cache=True, nogil=True)
def arena_extent(block, arena):
    """(first frame whose payload must stay, the tail, whether it wraps, live bytes) of a store: live_payload."""
    return live_payload(store_views(block, arena), 0)


@numba.njit(cache=True, nogil=True)
def _reserve(store, size):
    """The arena offset of the next payload of `size` bytes (at least 1, so offsets strictly increase), moving the
    head past it: at the head, or at 0 where it would not fit before the arena's end and the live payload does
    not wrap already."""
    state = store.state
    size = max(size, 1)
    offset = state.head
    if not live_payload(store, 1)[2] and offset + size > store.arena.shape[0]:
        state.wrap_end = offset
        offset = 0
    state.head = offset + size
    return offset


def resident_arena(state: np.void, arena_bytes: int, page: int) -> int:
    """Arena bytes in pages written since they were last handed back: from the freed offset to the head's page."""
    top = -(-int(state["head"]) // page) * page  # behind the freed offset only after the head wrapped
    freed = int(state["freed"])
    return top - freed if top >= freed else arena_bytes - freed + top


# ---------------------------------------------------------------------------------------------------------------
# 5. Appending a frame
#
# append_frame stores a frame whole in numba, or returns one of these outcomes, storing nothing, for the store's
# own Python code to finish: pages behind the tail must go back first (madvise), or the frame's byte runs are
# large enough for an entropy trial (zstd). The runs it encoded stay in the encoder rows for that trial.
PAGES_BACK_FIRST, TRY_ENTROPY = -1, -2
Position = namedtuple("Position", "episode_pos in_span in_group ref_dist")


@numba.njit(cache=True, nogil=True)
def next_position(state, episode_start):
    """The Position of the next frame: in its episode, its anchor's span and its key's group, and the frames back
    to its run reference (its key, or for keys the anchor; 0 for anchors)."""
    episode_pos = 0 if episode_start or state.count == 0 else state.episode_pos + 1
    in_span = episode_pos % state.anchor_interval
    in_group = in_span % state.key_interval
    return Position(episode_pos, in_span, in_group, in_group if in_group else in_span)


@numba.njit(cache=True, nogil=True)
def run_reference(store, position, row):
    """The frame the next frame's runs are taken against: the anchor's raw payload for a key; else the key's copy
    in the reference rows (stores with entropy coding) or, rebuilt in `row`, its anchor with its runs applied (or
    its raw payload)."""
    # anchors and keys stay in the arena as long as frames are appended to their span (live_payload)
    offsets, kinds, arena, slots = store.offsets, store.kinds, store.arena, store.offsets.shape[0]
    size = row.shape[0]
    if position.in_group == 0:
        at = offsets[(store.state.count - position.in_span) % slots]
        return arena[at:at + size]
    if store.refs.shape[0]:
        return store.refs[0, :size]
    slot = (store.state.count - position.in_group) % slots
    if kinds[slot] == RAW:
        return arena[offsets[slot]:offsets[slot] + size]
    memcpy(row, 0, arena, offsets[(store.state.count - position.in_group - store.ref_dist[slot]) % slots], size)
    apply_runs(row, 0, size, store.params[slot], offsets[slot], arena)
    return row


@numba.njit(cache=True, nogil=True)
def place(store, first, second, kind, param, position):
    """Write a payload (first, then second) at the arena's head and index it as the next frame."""
    size = first.size + second.size
    offset = _reserve(store, size)
    memcpy(store.arena, offset, first, 0, first.size)
    memcpy(store.arena, offset + first.size, second, 0, second.size)
    state = store.state
    slot = state.count % store.offsets.shape[0]
    # slots no frame was stored in hold RAW: the count stays that of entropy-coded kinds among all slots
    state.entropy_frames += np.int64(kind >= ZPREV) - np.int64(store.kinds[slot] >= ZPREV)
    store.offsets[slot], store.kinds[slot], store.params[slot] = offset, kind, param
    store.ref_dist[slot] = position.ref_dist


@numba.njit(cache=True, nogil=True)
def commit(store, frame, position):
    """Count the frame just placed; stores with entropy coding keep a copy of it as the reference it is: a key
    (anchors are keys too), and the previous frame."""
    state = store.state
    state.count += 1
    state.episode_pos = position.episode_pos
    if store.refs.shape[0]:
        if position.in_group == 0:
            memcpy(store.refs[0], 0, frame, 0, frame.size)
        memcpy(store.refs[1], 0, frame, 0, frame.size)


@numba.njit(cache=True, nogil=True)
def place_runs_or_raw(store, frame, runs, rows, position):
    """Place the frame as its runs (pairs, value bytes) in the encoder rows (headers, values, ...), or raw where
    runs are (-1, -1), and commit it: its id."""
    pairs, used = runs
    if pairs < 0:
        place(store, frame, frame[:0], RAW, frame.size, position)
    else:
        place(store, rows[0, :2 * pairs], rows[1, :used], RUNS, pairs, position)
    commit(store, frame, position)
    return store.state.count - 1


@numba.njit(cache=True, nogil=True, inline='always')
def _runs_cost(frame, runs):
    """Payload bytes of a frame stored as its runs (pairs, value bytes), or raw where they are (-1, -1)."""
    return frame.size if runs[0] < 0 else 2 * runs[0] + runs[1]


@numba.njit(cache=True, nogil=True)
def _append_diff(frame, episode_start, store, rows):
    """append_frame for a DIFF_STORE; `rows`: the encoder's (headers, values, rebuilt key) of DiffScratch."""
    if _pages_behind(store, live_payload(store, 1)[1]):
        return PAGES_BACK_FIRST
    position = next_position(store.state, episode_start)
    if position.in_span == 0:
        place(store, frame, frame[:0], RAW, frame.size, position)
        commit(store, frame, position)
        return store.state.count - 1
    runs = encode_runs(frame, run_reference(store, position, rows[2, :frame.size]), rows[0], rows[1])
    if _runs_cost(frame, runs) >= store.state.entropy_from:
        store.state.runs_pairs, store.state.runs_values = runs
        return TRY_ENTROPY
    return place_runs_or_raw(store, frame, runs, rows, position)


@numba.njit(cache=True, nogil=True)
def _append_raw(frame, store):
    """append_frame for a RAW_STORE: the frame into its ring slot."""
    count = store.state.count
    memcpy(store.arena, (count % store.state.slots) * frame.size, frame, 0, frame.size)
    store.state.count = count + 1
    return count


@numba.njit(cache=True, nogil=True)
def append_frame(frame, episode_start, block, arena, rows):
    """Store `frame` (a row of uint8) as the next id of the store whose kernel_args are (block, arena, rows): that
    id, or PAGES_BACK_FIRST or TRY_ENTROPY, storing nothing. For front ends' kernels: frames are not checked."""
    store = store_views(block, arena)
    if store.state.store == RAW_STORE:
        return _append_raw(frame, store)
    return _append_diff(frame, episode_start, store, rows)


@numba.njit(cache=True, nogil=True)
def entropy_trial_input(frame, episode_start, block, arena, layout, out):
    """The delta transform of the next frame for its entropy trial into `out`: against the last frame (the second
    reference row), unless it is a key."""
    store = store_views(block, arena)
    position = next_position(store.state, episode_start)
    delta_transform(frame, store.refs[1, :frame.size], position.in_group > 0, layout, out)


@numba.njit(cache=True, nogil=True)
def finish_entropy_trial(frame, episode_start, block, arena, rows, blob, min_saving):
    """Store the frame an append left for an entropy trial: as the zstd `blob` if it undercuts the runs the append
    encoded (still in `rows`) by min_saving bytes, else as those runs (or raw); its id."""
    store = store_views(block, arena)
    position = next_position(store.state, episode_start)
    runs = (store.state.runs_pairs, store.state.runs_values)
    if blob.size <= _runs_cost(frame, runs) - min_saving:
        place(store, blob, blob[:0], ZPREV if position.in_group else ZINTRA, blob.size, position)
        commit(store, frame, position)
        return store.state.count - 1
    return place_runs_or_raw(store, frame, runs, rows, position)


# ---------------------------------------------------------------------------------------------------------------
# 6. Decoding
#
# A batch is decoded in the order of its sorted ids, so that the frames of a stack come together and share the
# work of their references; a repeated id is copied from where it was just written.

@numba.njit(cache=True, nogil=True, inline='always')
def dependency(store, fid):
    """The frame that frame `fid` is decoded from, or -1 if none."""
    slot = fid % store.offsets.shape[0]
    kind = store.kinds[slot]
    if kind == RUNS:
        return fid - store.ref_dist[slot]
    if kind == ZPREV:
        return fid - 1
    return -1


@numba.njit(cache=True, nogil=True)
def needs_entropy(ids, block, arena):
    """Per id, whether decoding it involves an entropy-coded payload (its own or a reference's)."""
    store = store_views(block, arena)
    slots = store.offsets.shape[0]
    needs = np.zeros(ids.shape[0], np.bool_)
    for i in range(ids.shape[0]):
        g = ids[i]
        while g >= 0 and not needs[i]:
            needs[i] = store.kinds[g % slots] >= ZPREV
            g = dependency(store, g)
    return needs


@numba.njit(cache=True, nogil=True, inline='always')
def _runs_onto(store, dst, at, size, slot):
    """Apply frame slot `slot`'s runs onto its run reference, already at dst[at:at + size]."""
    apply_runs(dst, at, size, store.params[slot], store.offsets[slot], store.arena)


@numba.njit(cache=True, nogil=True)
def decode_runs(ids, order, block, arena, out):
    """Decode the frames ids[order] (order: positions of ids sorted by id) into rows of `out` (flat), for frames
    whose references are all raw or byte runs (what floor-free tasks store): walk() specialised to chains of at
    most two steps, a key decoded once for the frames of its group that come after it."""
    store = store_views(block, arena)
    slots, offsets, kinds = store.offsets.shape[0], store.offsets, store.kinds
    size = store.state.frame_size
    key = np.empty(size, np.uint8)  # a key decoded for frames whose own rows came first
    key_id, key_at = -1, -1  # which key was decoded last, and where: a row of out, or `key` (-1)
    previous_id, previous_at = -1, 0
    for k in range(order.shape[0]):
        i = order[k]
        fid = ids[i]
        s = fid % slots
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            memcpy(out, at, out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        if kinds[s] == RAW:
            memcpy(out, at, arena, offsets[s], size)
            continue
        rid = fid - store.ref_dist[s]
        rs = rid % slots
        if kinds[rs] == RAW:  # a key or a frame of a raw key's group: one step from raw
            memcpy(out, at, arena, offsets[rs], size)
            _runs_onto(store, out, at, size, s)
            key_id, key_at = fid, at
            continue
        if rid != key_id:
            memcpy(key, 0, arena, offsets[(rid - store.ref_dist[rs]) % slots], size)
            _runs_onto(store, key, 0, size, rs)
            key_id, key_at = rid, -1
        if key_at < 0:
            memcpy(out, at, key, 0, size)
        else:
            memcpy(out, at, out, key_at, size)
        _runs_onto(store, out, at, size, s)


# The general walk: each frame walks back along its dependencies to a raw payload, a frame decoded earlier in
# the call, or a frame with no dependency, then decodes forward from there. It remembers the last _CACHE frames it
# decoded, in `out` or in its work rows (frames no one asked for: references). Entropy-coded payloads are
# decompressed by Python (zstd): a dry run lists them in `jobs` (offset, bytes) in the order the real run then
# reads them from `payloads`, one frame each.
_CACHE = 8  # frames a walk remembers as references for the frames after them
IN_OUT, IN_WORK, IN_ARENA = 0, 1, 2  # where a walk finds a decoded frame
WORK_ROWS = 2  # frames a walk holds besides the requested ones: a reference and the next
Rows = namedtuple("Rows", "out work payloads jobs")  # a walk's buffers: all flat but jobs (n, 2) int64
Cache = namedtuple("Cache", "ids where at cursor")  # cursor: [next entry to replace, next work row]


@numba.njit(cache=True, nogil=True, inline='always')
def _buffer(rows, arena, where):
    """The buffer a walk location names."""
    if where == IN_OUT:
        return rows.out
    return rows.work if where == IN_WORK else arena


@numba.njit(cache=True, nogil=True)
def _find_base(store, cache, fid, chain):
    """Walk back from frame `fid` to where decoding starts: (frames to decode, newest last in chain[:n] reversed;
    the base's location and offset). The base is a raw payload, a remembered frame, or nothing (n > 0 and the
    chain's oldest frame has no dependency)."""
    n = 0
    g = fid
    while g >= 0:
        s = g % store.offsets.shape[0]
        if store.kinds[s] == RAW:  # a raw payload is its decoded frame
            return n, IN_ARENA, store.offsets[s]
        for e in range(_CACHE):
            if cache.ids[e] == g:
                return n, cache.where[e], cache.at[e]
        chain[n] = g
        n += 1
        g = dependency(store, g)
    return n, IN_ARENA, 0


@numba.njit(cache=True, nogil=True)
def _work_row(cache, size, work_rows, base_where, base_at):
    """The offset of the next work row that does not hold the base; frames remembered there are forgotten."""
    cursor = cache.cursor
    if base_where == IN_WORK and base_at // size == cursor[1]:
        cursor[1] = (cursor[1] + 1) % work_rows
    target = cursor[1] * size
    cursor[1] = (cursor[1] + 1) % work_rows
    for e in range(_CACHE):
        if cache.where[e] == IN_WORK and cache.at[e] == target:
            cache.ids[e] = -1
    return target


@numba.njit(cache=True, nogil=True)
def _remember(cache, fid, where, at):
    """Remember that frame `fid` is decoded at (where, at), in place of the oldest remembered frame."""
    e = cache.cursor[0]
    cache.ids[e], cache.where[e], cache.at[e] = fid, where, at
    cache.cursor[0] = (e + 1) % _CACHE


@numba.njit(cache=True, nogil=True)
def _decode_step(store, rows, layout, g, src, dst, job):
    """Decode frame g from its reference (location src) to location dst, each (where, at); its entropy-coded
    payload, if any, is rows.payloads' row `job`."""
    size, arena = store.state.frame_size, store.arena
    s = g % store.offsets.shape[0]
    source, target = _buffer(rows, arena, src[0]), _buffer(rows, arena, dst[0])
    if store.kinds[s] == RUNS:
        memcpy(target, dst[1], source, src[1], size)
        _runs_onto(store, target, dst[1], size, s)
    else:
        undo_delta_transform(rows.payloads[job * size:(job + 1) * size], source[src[1]:src[1] + size],
                             store.kinds[s] == ZPREV, target[dst[1]:dst[1] + size], layout)


@numba.njit(cache=True, nogil=True)
def walk(ids, order, block, arena, layout, rows, dry):
    """Decode the frames ids[order] (order: positions of ids sorted by id) into rows.out, row i for ids[i]; or, if
    dry, only list their entropy-coded payloads in rows.jobs. The number of such payloads."""
    store = store_views(block, arena)
    size = store.state.frame_size
    cache = Cache(np.full(_CACHE, -1, np.int64), np.zeros(_CACHE, np.int64), np.zeros(_CACHE, np.int64),
                  np.zeros(2, np.int64))
    work_rows = rows.work.shape[0] // size
    chain = np.empty(store.state.key_interval + 2, np.int64)
    jobs = 0
    previous_id, previous_at = -1, 0
    for k in range(order.shape[0]):
        i = order[k]
        fid = ids[i]
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            if not dry:
                memcpy(rows.out, at, rows.out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        n, base_where, base_at = _find_base(store, cache, fid, chain)
        if n == 0 and not dry:
            memcpy(rows.out, at, _buffer(rows, arena, base_where), base_at, size)
        for j in range(n - 1, -1, -1):
            g = chain[j]
            where, target = IN_OUT, at
            if j > 0:  # a reference nobody asked for
                where, target = IN_WORK, _work_row(cache, size, work_rows, base_where, base_at)
            entropy = store.kinds[g % store.offsets.shape[0]] >= ZPREV
            if dry and entropy:
                s = g % store.offsets.shape[0]
                rows.jobs[jobs, 0], rows.jobs[jobs, 1] = store.offsets[s], store.params[s]
            elif not dry:
                _decode_step(store, rows, layout, g, (base_where, base_at), (where, target), jobs)
            jobs += np.int64(entropy)
            _remember(cache, g, where, target)
            base_where, base_at = where, target
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# 7. Frame stacks
#
# A stack of K frames as stored is K rows of frame bytes. How a stack follows the previous one of its stream:
SAME, SHIFTED, RESET_REPEAT, RESET_ZEROS, OTHER = range(5)
# SAME: the same stack; SHIFTED: the previous one moved one frame older with one new newest frame; RESET_*: a
# stream's first stack, its older frames copies of the newest (REPEAT) or zeros; OTHER: none of these.


@numba.njit(cache=True, nogil=True)
def follow_one(previous, current, frame, has_previous, shift_first):
    """How stack `current` follows `previous` (rows of K * frame bytes): SHIFTED or SAME (shift_first: tried in
    that order) where has_previous, else or failing that RESET_REPEAT (wins over zeros), RESET_ZEROS or OTHER."""
    size = current.shape[0]
    older = size - frame  # all frames but the newest
    if has_previous:
        if shift_first and equal_range(current, 0, previous, frame, older):
            return SHIFTED
        if equal_range(current, 0, previous, 0, size):
            return SAME
        if not shift_first and equal_range(current, 0, previous, frame, older):
            return SHIFTED
    for at in range(0, older, frame):
        if not equal_range(current, at, current, older, frame):
            return RESET_ZEROS if all_zero(current, 0, older) else OTHER
    return RESET_REPEAT


@numba.njit(cache=True, nogil=True)
def follow_stacks(previous: np.ndarray, frames: np.ndarray, previous_code: np.ndarray,
                  shift_first: bool) -> np.ndarray:
    """How each stack of frames (n, K, F) follows previous (n, K, F) (follow_one; no previous stack where
    previous_code < 0); int8 (n,)."""
    n, frame_stack, frame_size = frames.shape
    p, c = previous.reshape(n, frame_stack * frame_size), frames.reshape(n, frame_stack * frame_size)
    kinds = np.empty(n, dtype=np.int8)
    for e in range(n):
        kinds[e] = follow_one(p[e], c[e], frame_size, previous_code[e] >= 0, shift_first)
    return kinds


@numba.njit(cache=True, nogil=True)
def follow_transition(latest: np.ndarray, obs: np.ndarray, next_obs: np.ndarray,
                      has_previous: bool) -> tuple[int, int]:
    """One env's follow_one of obs after latest (none if not has_previous), then of next_obs after obs (shifted
    first), all (K, F) C-contiguous: (obs's kind, next_obs's kind). latest becomes next_obs."""
    size, frame = obs.size, obs.shape[1]
    p, o, x = latest.reshape(size), obs.reshape(size), next_obs.reshape(size)
    obs_kind = follow_one(p, o, frame, has_previous, False)
    # next_obs follows obs unless obs is OTHER (kept whole: nothing continues it)
    next_kind = follow_one(o, x, frame, obs_kind != OTHER, True)
    if obs_kind != SAME or next_kind != SAME:
        memcpy(p, 0, x, 0, size)
    return obs_kind, next_kind


@numba.njit(cache=True, nogil=True)
def stack_ids(newest, first, frame_stack):
    """Frame ids (M, K) of the stacks ending at `newest` in streams starting at `first`, padding clamped to `first`."""
    ids = np.empty((newest.shape[0], frame_stack), np.int64)
    for m in range(newest.shape[0]):
        for k in range(frame_stack):
            ids[m, k] = max(newest[m] - (frame_stack - 1 - k), first[m])
    return ids


@numba.njit(cache=True, nogil=True)
def zero_padding(out, newest, first, zero_padded):
    """Zero the padding frames (those before the stream's first) of the stacks of out (M, K, F) where zero_padded."""
    frame_stack = out.shape[1]
    for m in range(out.shape[0]):
        if zero_padded[m]:
            for k in range(frame_stack - 1 - (newest[m] - first[m])):
                out[m, k, :] = 0


# ---------------------------------------------------------------------------------------------------------------
# 8. Validation
#
# A saved state (a snapshot or a pickle from elsewhere) is checked against the format before a store takes it:
# every index entry and payload a kernel above would read must be one the encoder could have written, so that no
# decode or append reads or writes outside the arena, the index or a frame. A saved `full` state holds the frames
# from `first` to `count` (index entry i is frame first + i) and their payloads, rebased to start at 0, tiling the
# saved payload (two parts, `start` then `end`) in frame order, each reserving at least one byte as _reserve does.
# One function per payload kind gives the bytes of a payload it accepts, or -1; check_index checks the index and
# calls them. check_index's problems, reported as (problem, entry), name the array at fault and its first bad entry:
INDEX_OK, BAD_KIND, BAD_REF_DIST, BAD_OFFSET, BAD_PAYLOAD, BAD_TILING, BAD_COUNTERS = range(7)


@numba.njit(cache=True, nogil=True, inline='always')
def _saved_byte(start, end, at):
    """Byte `at` of a saved payload held as two parts."""
    return start[at] if at < start.shape[0] else end[at - start.shape[0]]


@numba.njit(cache=True, nogil=True)
def raw_payload_bytes(start, end, offset, param, frame_size):
    """Bytes of a RAW payload at `offset`: a whole frame inside the saved payload (param frame_size), or -1."""
    if param != frame_size or offset < 0 or offset + frame_size > start.shape[0] + end.shape[0]:
        return -1
    return frame_size


@numba.njit(cache=True, nogil=True)
def runs_payload_bytes(start, end, offset, pairs, frame_size):
    """Bytes of a RUNS payload at `offset`: `pairs` run headers and their values inside the saved payload, runs
    ending inside the frame, fewer bytes than the frame (as encode_runs writes them), or -1."""
    live = start.shape[0] + end.shape[0]
    if pairs < 0 or offset < 0 or offset + 2 * pairs > live:
        return -1
    reach = 0  # where apply_runs' last write ends, from the frame's start
    values = 0
    for p in range(pairs):
        length = np.int64(_saved_byte(start, end, offset + 2 * p + 1))
        reach += np.int64(_saved_byte(start, end, offset + 2 * p)) + length
        values += length
    size = 2 * pairs + values
    if reach > frame_size or size >= frame_size or offset + size > live:
        return -1
    return size


@numba.njit(cache=True, nogil=True)
def entropy_payload_bytes(start, end, offset, param, frame_size):
    """Bytes of a ZPREV or ZINTRA payload at `offset`: `param` bytes inside the saved payload, at most a frame's
    (what the arena is sized for; min_entropy_saving >= 0 keeps them so), or -1. What they decompress to is
    checked by the decompressor and the row it fills."""
    if param < 1 or param > frame_size or offset < 0 or offset + param > start.shape[0] + end.shape[0]:
        return -1
    return param


@numba.njit(cache=True, nogil=True)
def payload_bytes(kind, start, end, offset, param, frame_size):
    """Bytes of the payload of a frame of `kind` at `offset` as its kind's function accepts it, or -1."""
    if kind == RAW:
        return raw_payload_bytes(start, end, offset, param, frame_size)
    if kind == RUNS:
        return runs_payload_bytes(start, end, offset, param, frame_size)
    return entropy_payload_bytes(start, end, offset, param, frame_size)


@numba.njit(cache=True, nogil=True)
def _span_place(ref_dist, key_interval, anchor_interval):
    """What a frame's ref_dist says it is: 0 an anchor, 1 a key, 2 another frame of a group, -1 nothing."""
    if ref_dist == 0:
        return 0
    if 0 < ref_dist < min(key_interval, anchor_interval):
        return 2
    if key_interval <= ref_dist < anchor_interval and ref_dist % key_interval == 0:
        return 1
    return -1


@numba.njit(cache=True, nogil=True)
def check_index(start, end, offsets, kinds, params, ref_dist, counters, config, slots):
    """(INDEX_OK, -1) if a saved `full` index describes frames as the encoder writes them, else (problem, first bad
    entry): each frame's kind allowed at its place in its span (anchors RAW, only keys ZINTRA, only other frames
    ZPREV), ref_dist consistent from frame to frame, every reference of a frame that decode() accepts held, payloads
    valid for their kind tiling the saved payload, and counters that make the store keep exactly these frames and
    continue the last one's span. counters: count, episode_pos, first, first_needed; config: capacity, frame bytes,
    key and anchor intervals."""
    count, episode_pos, first, first_needed = counters[0], counters[1], counters[2], counters[3]
    capacity, frame_size, key_interval, anchor_interval = config[0], config[1], config[2], config[3]
    held = count - first
    decodable_from = max(count - capacity, first_needed)  # decode() takes ids from here on
    span = np.full(held, -1, np.int64)  # each frame's position in its anchor's span, -1 where unknown
    whole = np.zeros(held, np.bool_)  # whether every frame it is decoded from is held
    at = 0  # where the next payload must start
    for i in range(held):
        kind, r = kinds[i], np.int64(ref_dist[i])
        place = _span_place(r, key_interval, anchor_interval)
        if place < 0:
            return BAD_REF_DIST, i
        if kind > ZINTRA or (place == 0 and kind != RAW) or (place == 1 and kind == ZPREV) or (
                place == 2 and kind == ZINTRA):
            return BAD_KIND, i
        if place == 0:
            span[i], whole[i] = 0, True
        elif i - r >= 0:  # its run reference is held: the anchor of a key, or the key (or anchor) of a group
            reference = _span_place(np.int64(ref_dist[i - r]), key_interval, anchor_interval)
            if reference == 2 or (place == 1 and reference != 0):
                return BAD_REF_DIST, i
            span[i], whole[i] = span[i - r] + r, whole[i - r]
        elif place == 1:
            span[i] = r
        if span[i] >= anchor_interval or (i > 0 and span[i] > 0 and (span[i - 1] >= 0 or whole[i])
                                          and span[i - 1] != span[i] - 1):
            return BAD_REF_DIST, i
        if not whole[i] and first + i >= decodable_from:
            return BAD_REF_DIST, i
        if offsets[i] != at:
            return BAD_OFFSET, i
        size = payload_bytes(kind, start, end, offsets[i], np.int64(params[i]), frame_size)
        if size < 0:
            return BAD_PAYLOAD, i
        at += max(size, 1)
    if at != start.shape[0] + end.shape[0]:
        return BAD_TILING, held
    if held == 0:
        return (INDEX_OK, -1) if count == 0 else (BAD_COUNTERS, 2)
    # the store keeps the frames it was saved with (live_payload's first), and its next append continues the last
    # frame's span from an anchor and key that are held
    kept_from = max(count - slots, 0)
    if first_needed > kept_from:
        kept = min(first_needed, count - 1) - first
        if kept < 0 or kept - ref_dist[kept] < 0 or kept - ref_dist[kept] - ref_dist[kept - ref_dist[kept]] < 0:
            return BAD_COUNTERS, 3
        reference = kept - ref_dist[kept]
        kept_from = max(kept_from, first + reference - ref_dist[reference])
    if kept_from != first:
        return BAD_COUNTERS, 2
    if not whole[held - 1] or not 0 <= episode_pos < count or episode_pos % anchor_interval != span[held - 1]:
        return BAD_COUNTERS, 1
    return INDEX_OK, -1
