"""Numba kernels of the frame stores (obs_comp.py) and of frame stacks (frame_stacks.py), apart from their policy.

They live in one file because numba's disk cache keys a compiled kernel on its own source file only: a
kernel that called into another file would go on running that file's old code after an edit there.

Sections, in reading order:
  1. The `full` format: what a frame's payload holds, byte runs, packed residuals (the spec).
  2. Byte primitives: unaligned words, equal ranges, copies.
  3. A store's state: the named fields of its kernel block, and the views kernels take as one bundle.
  4. The arena: where payloads go, which must stay, which pages may go back.
  5. Appending a frame, and the outcome that hands the rest to Python.
  6. Decoding: batches of byte-run frames, and the general walk along references.
  7. Frame stacks: how a stack follows the previous one, and the frame ids of stacks.
  8. Validation: a saved state checked against the format, one function per payload kind and one for the index.
"""
from __future__ import annotations

import mmap
import platform
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
#   PREV_PACKED    (g > 0) the packed residual of the frame against the previous frame;
#   ANCHOR_PACKED  (keys) the packed residual, taken vertically, of the frame against its anchor;
#   ALONE_PACKED   (keys) the packed residual, taken vertically, of the frame alone;
# where a packed payload must also undercut the runs by the store's min_entropy_saving bytes.
# Per frame the index holds its payload's arena offset, its kind, a param (RAW: frame bytes; RUNS: (skip, length)
# pairs; *_PACKED: payload bytes) and ref_dist, the frames back to its run reference (0 for anchors).
RAW, RUNS, PREV_PACKED, ANCHOR_PACKED, ALONE_PACKED = 0, 1, 2, 3, 4
KINDS = 5


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


# Packed residuals (*_PACKED): what a scrolling floor leaves, a few bits per byte where it moved, none elsewhere.
# A frame of C <= 3 channels of H x W pixels (frame_layout) is C planes of P = H * W pixels, each padded with
# zeros to whole groups of PACKED_GROUP pixels (packed_plane bytes).
# Residual, per channel and pixel: the frame's byte minus the reference's (mod 256; the byte itself without a
# reference); taken vertically, minus the same difference one row up (none on the first row); then for 3
# channels, R and B minus G. Read as signed bytes, most are near 0.
# Block b: pixels 2b and 2b + 1 of every plane, 2C values in the order (c0 p0, c0 p1, c1 p0, ...). Its width w
# (0..8) is the least with every value v in [-2^(w-1), 2^(w-1)); each is stored as (v + 2^(w-1)) mod 2^w (w = 8:
# v's byte), the block's values one after another in 2Cw bits. A group is 8 blocks.
# Widths change little from block to block: each is coded against the one before it in the frame (0 before the
# first), with d = w - previous width, least significant bit first: d = 0 as 0; d = +-1 as 1, 0, sign (1 for
# minus); d = +-2 as 1, 1, 0, sign; otherwise 1, 1, 1 and w in 4 bits.
# Payload: a bitmap of the groups with a block of width > 0 (bit g % 8 of byte g // 8), ceil(groups / 8) bytes;
# then one stream of bits, least significant first: per such group its 8 width codes, then its blocks' bits in
# order (groups without a set bit skipped); then PACKED_TAIL zero bytes, so that a decoder may read a whole word
# at every code and block.
PACKED_GROUP = 16
PACKED_TAIL = 8
PACKED_CHANNELS = 3  # frames with more channels are stored as runs or raw


@numba.njit(cache=True, nogil=True, inline='always')
def packed_plane(layout):
    """Bytes of one residual plane of a frame of this layout (frame_layout): its pixels padded to whole groups."""
    return -(-(layout[1] * layout[2]) // PACKED_GROUP) * PACKED_GROUP


def packed_bound(frame_size: int) -> int:
    """Bytes that hold any packed payload of a frame of frame_size bytes, and its residual planes."""
    # planes pad at most 15 pixels each; a group of 16 pixels per plane costs at most 7 bits per width code
    # besides its 16 bytes per plane (7 of 16 more for one plane); the bitmap takes a bit per group
    planes = frame_size + PACKED_CHANNELS * (PACKED_GROUP - 1)
    return planes + planes * 7 // 16 + planes // 128 + 8 + PACKED_TAIL


@numba.njit(cache=True, nogil=True)
def residual(frame, ref, has_ref, vertical, layout, r):
    """The residual planes of `frame` against `ref` (if has_ref), taken vertically or not, into r."""
    channels, height, width, channel_stride, pixel_stride = layout[0], layout[1], layout[2], layout[3], layout[4]
    pixels, plane = height * width, packed_plane(layout)
    up = width * pixel_stride
    for c in range(channels):
        for p in range(pixels):
            i = c * channel_stride + p * pixel_stride
            d = np.int64(frame[i]) - (np.int64(ref[i]) if has_ref else 0)
            if vertical and p >= width:
                d -= np.int64(frame[i - up]) - (np.int64(ref[i - up]) if has_ref else 0)
            r[c * plane + p] = d & 255
        r[c * plane + pixels:(c + 1) * plane] = 0
    if channels == 3:
        for p in range(pixels):
            green = np.int64(r[plane + p])
            r[p] = (np.int64(r[p]) - green) & 255
            r[2 * plane + p] = (np.int64(r[2 * plane + p]) - green) & 255


@numba.njit(cache=True, nogil=True, inline='always')
def _signed(byte):
    """A residual byte read as a signed value."""
    v = np.int64(byte)
    return v - 256 if v >= 128 else v


@numba.njit(cache=True, nogil=True)
def _block_width(r, plane, channels, b):
    """The width of block b of residual planes r."""
    folded, seen = 0, 0
    for c in range(channels):
        for k in range(2):
            v = _signed(r[c * plane + 2 * b + k])
            folded |= v ^ (v >> 63)  # v >= 0: v, else -v - 1: below 2^(w-1) for w's range
            seen |= v
    if seen == 0:
        return 0
    w = 1
    while folded >> (w - 1):
        w += 1
    return w


@numba.njit(cache=True, nogil=True)
def _block_bits(r, plane, channels, b, w):
    """Block b's values in w bits each, one after another (section 1's offset form)."""
    bias = (1 << (w - 1)) if w < 8 else 0
    mask = (1 << w) - 1
    bits = np.uint64(0)
    lane = 0
    for c in range(channels):
        for k in range(2):
            value = (np.int64(r[c * plane + 2 * b + k]) + bias) & mask
            bits |= np.uint64(value) << np.uint64(w * lane)
            lane += 1
    return bits


@numba.njit(cache=True, nogil=True, inline='always')
def _put_bits(out, bit, value):
    """Or `value` (at most 57 bits) into the bit stream of out at bit `bit`."""
    at = bit >> 3
    put_word(out, at, _word(out, at) | (np.uint64(value) << np.uint64(bit & 7)))


@numba.njit(cache=True, nogil=True, inline='always')
def _width_code(width, previous):
    """(code, bits) of a block's width after the previous one's (section 1)."""
    d = width - previous
    if d == 0:
        return 0, 1
    if d == 1 or d == -1:
        return 1 | (4 if d < 0 else 0), 3
    if d == 2 or d == -2:
        return 3 | (8 if d < 0 else 0), 4
    return 7 | (width << 3), 7


@numba.njit(cache=True, nogil=True)
def pack_residual(r, channels, plane, out):
    """Write the packed payload of residual planes r (channels planes of `plane` bytes) to out; its bytes."""
    groups = plane // PACKED_GROUP
    bitmap = -(-groups // 8)
    out[:] = 0  # bits are or-ed in
    bit, previous = 8 * bitmap, 0
    widths = np.empty(8, np.int64)
    for g in range(groups):
        for j in range(8):
            widths[j] = _block_width(r, plane, channels, 8 * g + j)
        if widths.max() == 0:
            continue
        out[g >> 3] |= 1 << (g & 7)
        for j in range(8):
            code, bits = _width_code(widths[j], previous)
            _put_bits(out, bit, code)
            bit += bits
            previous = widths[j]
        for j in range(8):
            if widths[j]:
                _put_bits(out, bit, _block_bits(r, plane, channels, 8 * g + j, widths[j]))
                bit += 2 * channels * widths[j]
    return ((bit + 7) >> 3) + PACKED_TAIL


def _parse_width_codes(byte: int) -> tuple[list[int], list[int], int]:
    """The width codes whole in the 8 bits `byte` (section 1), up to the first absolute one: their changes d, the
    bits used after each, and that absolute width if it comes first (else -1)."""
    changes, used, bit = [], [], 0
    while True:
        if bit + 1 <= 8 and not (byte >> bit) & 1:
            change, size = 0, 1
        elif bit + 3 <= 8 and not (byte >> (bit + 1)) & 1:
            change, size = -1 if (byte >> (bit + 2)) & 1 else 1, 3
        elif bit + 4 <= 8 and (byte >> (bit + 1)) & 1 and not (byte >> (bit + 2)) & 1:
            change, size = -2 if (byte >> (bit + 3)) & 1 else 2, 4
        else:  # an absolute code (7 bits), or a code that goes on past these 8 bits
            absolute = (byte >> 3) & 15 if bit == 0 and byte & 7 == 7 else -1
            return changes, used, absolute
        bit += size
        changes.append(change)
        used.append(bit)


def _width_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8 bits at a group's width codes: how many codes they hold (0: an absolute one comes first), per code
    16 plus the change in width so far and the bits used so far as byte lanes."""
    counts, changes, used = (np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.uint64),
                             np.zeros(256, dtype=np.uint64))
    for byte in range(256):
        parsed = _parse_width_codes(byte)
        counts[byte] = len(parsed[0])
        changes[byte] = sum((16 + sum(parsed[0][:j + 1])) << (8 * j) for j in range(len(parsed[0])))
        used[byte] = sum(bits << (8 * j) for j, bits in enumerate(parsed[1]))
    return counts, changes, used


WIDTH_CODES, WIDTH_CHANGES, WIDTH_BITS_USED = _width_tables()
_BYTES = np.uint64(0x0101010101010101)


@numba.njit(cache=True, nogil=True, inline='always')
def group_widths(codes, width):
    """(the 8 widths of a group as byte lanes, the last one, bits used) from the 64 bits at its width codes
    (`codes`) after a block of width `width`: several codes per table lookup."""
    lanes, used, j = np.uint64(0), np.uint64(0), 0
    while j < 8:
        byte = codes & np.uint64(255)
        n = min(WIDTH_CODES[byte], 8 - j)
        if n == 0:  # an absolute width: 1, 1, 1 then 4 bits
            width = (codes >> np.uint64(3)) & np.uint64(15)
            lanes |= width << np.uint64(8 * j)
            codes >>= np.uint64(7)
            used += np.uint64(7)
            j += 1
            continue
        top = np.uint64(8 * (n - 1))
        widths = WIDTH_CHANGES[byte] + (width - np.uint64(16)) * _BYTES  # lanes beyond n are dropped below
        width = (widths >> top) & np.uint64(255)
        step = (WIDTH_BITS_USED[byte] >> top) & np.uint64(255)
        lanes |= (widths & (np.uint64(-1) >> np.uint64(64 - 8 * n))) << np.uint64(8 * j)
        codes >>= step
        used += step
        j += n
    return lanes, width, used


def _lane_table(lanes: int, per_lane) -> np.ndarray:
    """Per width 0..15 (above 8 as 8), a uint64 with per_lane(width) in each of `lanes` byte lanes."""
    return np.array([sum(per_lane(min(w, 8)) << (8 * k) for k in range(lanes)) for w in range(16)], dtype=np.uint64)


# per channel count (row), per width: a block's bit field as byte lanes, and what undoes the offset form in them
LANE_MASKS = np.stack([_lane_table(2 * c, lambda w: (1 << w) - 1) for c in range(PACKED_CHANNELS + 1)])
LANE_BIAS = np.stack([_lane_table(2 * c, lambda w: 1 << (w - 1) if 0 < w < 8 else 0)
                      for c in range(PACKED_CHANNELS + 1)])
LANE_HIGH = np.stack([_lane_table(2 * c, lambda w: 0x80 if 0 < w < 8 else 0) for c in range(PACKED_CHANNELS + 1)])


@numba.njit(cache=True, nogil=True, inline='always')
def _popcount8(byte):
    """Set bits of a byte."""
    n = 0
    while byte:
        n += byte & 1
        byte >>= 1
    return n


@numba.njit(cache=True, nogil=True)
def unpack_residual(payload, at, channels, plane, r):
    """The residual planes r (channels planes of `plane` bytes) of the packed payload at payload[at:]."""
    groups = plane // PACKED_GROUP
    bit = (at + -(-groups // 8)) * 8
    values = 2 * channels  # per block
    masks, bias, high = LANE_MASKS[channels], LANE_BIAS[channels], LANE_HIGH[channels]
    words, halves = r.view(np.uint64), r.view(np.uint16)  # a group is 2 words, a block a half word, per plane
    half = plane // 2
    width = np.uint64(0)
    for g in range(groups):
        if not (payload[at + (g >> 3)] >> (g & 7)) & 1:
            for c in range(channels):
                words[c * (plane // 8) + 2 * g] = 0
                words[c * (plane // 8) + 2 * g + 1] = 0
            continue
        widths, width, used = group_widths(_word(payload, bit >> 3) >> np.uint64(bit & 7), width)
        bit += np.int64(used)
        for b in range(8 * g, 8 * g + 8):
            w = widths & np.uint64(15)
            widths >>= np.uint64(8)
            u = spread_bits(_word(payload, bit >> 3) >> np.uint64(bit & 7), masks[w])
            u = ((u | high[w]) - bias[w]) ^ high[w]  # each lane's top bit keeps the subtraction in its lane
            halves[b] = u & np.uint64(0xFFFF)
            if channels > 1:
                halves[half + b] = (u >> np.uint64(16)) & np.uint64(0xFFFF)
            if channels > 2:
                halves[2 * half + b] = (u >> np.uint64(32)) & np.uint64(0xFFFF)
            bit += values * np.int64(w)


@numba.njit(cache=True, nogil=True)
def rebuild(r, ref, has_ref, vertical, layout, dst):
    """The frame whose residual planes against `ref` (if has_ref) are r, into dst: residual's inverse."""
    channels, height, width, channel_stride, pixel_stride = layout[0], layout[1], layout[2], layout[3], layout[4]
    pixels, plane = height * width, packed_plane(layout)
    if pixel_stride == 1:  # planar frames (DMC's): plane views, so that the loops compile to vector code
        for c in range(channels):
            target, change = dst[c * channel_stride:c * channel_stride + pixels], r[c * plane:c * plane + pixels]
            green = r[plane:plane + pixels] if channels == 3 and c != 1 else r[:0]
            before = ref[c * channel_stride:c * channel_stride + pixels]
            if green.size:  # the colour transform undone, then the reference added, in one pass where it can be
                for p in range(pixels):
                    target[p] = (before[p] if has_ref and not vertical else 0) + change[p] + green[p]
            else:
                for p in range(pixels):
                    target[p] = (before[p] if has_ref and not vertical else 0) + change[p]
            if vertical:
                for y in range(1, height):
                    row, above = target[y * width:(y + 1) * width], target[(y - 1) * width:y * width]
                    for x in range(width):
                        row[x] += above[x]
            if has_ref and vertical:
                for p in range(pixels):
                    target[p] += before[p]
        return
    up = width * pixel_stride
    for p in range(pixels):
        green = np.int64(r[plane + p]) if channels == 3 else np.int64(0)
        for c in range(channels):
            i = c * channel_stride + p * pixel_stride
            v = np.int64(r[c * plane + p]) + (green if c != 1 else 0)
            if vertical and p >= width:
                v += np.int64(dst[i - up])  # the row above, still a difference
            dst[i] = v & 255
    if has_ref:
        for i in range(channels * pixels):
            dst[i] = dst[i] + ref[i]


@numba.njit(cache=True, nogil=True)
def packed_payload_error(payload, at, length, channels, plane):
    """Why the `length` bytes at payload[at:] are not a packed payload for these planes, as a code (0: they
    are): 1 too short for its bitmap, 2 a width code outside 0..8, 3 its bits past its end."""
    groups = plane // PACKED_GROUP
    bitmap = -(-groups // 8)
    if length < bitmap + PACKED_TAIL:
        return 1
    end = 8 * (length - PACKED_TAIL)  # bits the stream may use
    bit, width = 8 * bitmap, 0
    for g in range(groups):
        if not (payload[at + (g >> 3)] >> (g & 7)) & 1:
            continue
        data = 0
        for j in range(8):
            if (bit >> 3) + 8 > length:  # a code's word must lie inside the payload
                return 3
            x = np.int64((_word(payload, at + (bit >> 3)) >> np.uint64(bit & 7)) & np.uint64(127))
            if not x & 1:
                bits = 1
            elif not x & 2:
                width, bits = width + (-1 if x & 4 else 1), 3
            elif not x & 4:
                width, bits = width + (-2 if x & 8 else 2), 4
            else:
                width, bits = x >> 3, 7
            if not 0 <= width <= 8:
                return 2
            bit += bits
            data += 2 * channels * width
        bit += data
        if bit > end:
            return 3
    return 0


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


@intrinsic
def put_word(typingctx, array, at, value):
    """Store uint64 `value` as the 8 bytes array[at:at + 8] of a uint8 array, whatever their alignment."""
    signature = types.void(array, types.intp, types.uint64)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(args[2], builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer()), align=1)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _pdep(typingctx, bits, mask):
    """BMI2's parallel bit deposit: the low bits of `bits` moved, in order, to the set bits of `mask`."""
    signature = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)]), "llvm.x86.bmi.pdep.64")
        return builder.call(function, args)

    return signature, codegen


def _fast_pdep() -> bool:
    """Whether numba compiles for an x86-64 host whose pdep takes a cycle or so (BMI2, not AMD's Zen 1 and 2, where
    it is microcoded)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or numba.config.CPU_NAME is not None:
        return False
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("bmi2")) and llvm.get_host_cpu_name() not in ("znver1", "znver2")


FAST_PDEP = _fast_pdep()


@numba.njit(cache=True, nogil=True, inline='always')
def _spread_by_pdep(bits, lane_mask):
    return _pdep(bits, lane_mask)


@numba.njit(cache=True, nogil=True, inline='always')
def _spread_by_shifts(bits, lane_mask):
    width = np.uint64(0)
    low = lane_mask & np.uint64(0xFF)
    while low >> width:
        width += np.uint64(1)
    spread = np.uint64(0)
    lane = np.uint64(0)
    while lane < np.uint64(8) and (lane_mask >> (np.uint64(8) * lane)):
        spread |= (bits >> (width * lane) & low) << (np.uint64(8) * lane)
        lane += np.uint64(1)
    return spread


# spread_bits(bits, lane_mask): consecutive fields of w bits of `bits` into the byte lanes that lane_mask (w low
# bits set per lane) marks; a fixed choice per host, so that numba's cache (kept per CPU) stays right
spread_bits = _spread_by_pdep if FAST_PDEP else _spread_by_shifts


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
    ("entropy_frames", np.int64),  # slots holding a packed frame
    # fixed at construction
    ("store", np.int64),           # RAW_STORE or DIFF_STORE
    ("slots", np.int64),           # index slots (RawFrames: ring slots)
    ("frame_size", np.int64),      # bytes of a frame
    ("key_interval", np.int64),
    ("anchor_interval", np.int64),
    ("entropy_from", np.int64),    # runs of this many bytes are worth packing the residual
    ("min_saving", np.int64),      # bytes a packed payload must save on the runs
    ("channels", np.int64),        # the frame's layout (frame_layout)
    ("height", np.int64),
    ("width", np.int64),
    ("channel_stride", np.int64),
    ("pixel_stride", np.int64),
    ("release_chunk", np.int64),   # pages go back in steps of at least this many bytes
    ("ref_row", np.int64),         # bytes of a reference row
    ("ref_rows", np.int64),        # reference rows: copies of the key and of the last frame (packing)
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


@numba.njit(cache=True, nogil=True, inline='always')
def layout_of(state):
    """The frame layout (frame_layout's five numbers) a store's state holds."""
    return state.channels, state.height, state.width, state.channel_stride, state.pixel_stride


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
# append_frame stores a frame whole in numba, or returns PAGES_BACK_FIRST, storing nothing, for the store's own
# Python code to finish: pages behind the tail must go back first (madvise).
PAGES_BACK_FIRST = -1
# The encoder's rows (DiffScratch.encoder, packed_bound bytes each): what they hold while a frame is encoded.
HEADERS, VALUES, REBUILT_KEY, RESIDUAL, PACKED, PACKED_OTHER = range(6)
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
    in the reference rows (stores that pack) or, rebuilt in `row`, its anchor with its runs applied (or its raw
    payload)."""
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
    # slots no frame was stored in hold RAW: the count stays that of packed kinds among all slots
    state.entropy_frames += np.int64(kind >= PREV_PACKED) - np.int64(store.kinds[slot] >= PREV_PACKED)
    store.offsets[slot], store.kinds[slot], store.params[slot] = offset, kind, param
    store.ref_dist[slot] = position.ref_dist


@numba.njit(cache=True, nogil=True)
def commit(store, frame, position):
    """Count the frame just placed; stores that pack keep a copy of it as the reference it is: a key (anchors are
    keys too), and the previous frame."""
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
        place(store, rows[HEADERS, :2 * pairs], rows[VALUES, :used], RUNS, pairs, position)
    commit(store, frame, position)
    return store.state.count - 1


@numba.njit(cache=True, nogil=True, inline='always')
def _runs_cost(frame, runs):
    """Payload bytes of a frame stored as its runs (pairs, value bytes), or raw where they are (-1, -1)."""
    return frame.size if runs[0] < 0 else 2 * runs[0] + runs[1]


@numba.njit(cache=True, nogil=True)
def pack_frame(store, frame, reference, position, rows):
    """The packed payload of the next frame, in its encoder row: (kind, row, bytes). Frames of a key's group
    against the previous frame; keys against their anchor (`reference`) or alone, whichever is smaller."""
    layout = layout_of(store.state)
    channels, plane = layout[0], packed_plane(layout)
    r = rows[RESIDUAL, :channels * plane]
    if position.in_group:
        residual(frame, store.refs[1, :frame.size], True, False, layout, r)
        return PREV_PACKED, PACKED, pack_residual(r, channels, plane, rows[PACKED])
    residual(frame, reference, True, True, layout, r)
    against_anchor = pack_residual(r, channels, plane, rows[PACKED])
    residual(frame, reference, False, True, layout, r)
    alone = pack_residual(r, channels, plane, rows[PACKED_OTHER])
    if against_anchor <= alone:
        return ANCHOR_PACKED, PACKED, against_anchor
    return ALONE_PACKED, PACKED_OTHER, alone


@numba.njit(cache=True, nogil=True)
def _append_diff(frame, episode_start, store, rows):
    """append_frame for a DIFF_STORE; `rows`: DiffScratch's encoder rows."""
    if _pages_behind(store, live_payload(store, 1)[1]):
        return PAGES_BACK_FIRST
    state = store.state
    position = next_position(state, episode_start)
    if position.in_span == 0:
        place(store, frame, frame[:0], RAW, frame.size, position)
        commit(store, frame, position)
        return state.count - 1
    reference = run_reference(store, position, rows[REBUILT_KEY, :frame.size])
    runs = encode_runs(frame, reference, rows[HEADERS], rows[VALUES])
    cost = _runs_cost(frame, runs)
    if cost >= state.entropy_from:
        kind, row, size = pack_frame(store, frame, reference, position, rows)
        if size <= cost - state.min_saving and size <= frame.size:  # the arena holds a frame per payload
            place(store, rows[row, :size], frame[:0], kind, size, position)
            commit(store, frame, position)
            return state.count - 1
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
    id, or PAGES_BACK_FIRST, storing nothing. For front ends' kernels: frames are not checked."""
    store = store_views(block, arena)
    if store.state.store == RAW_STORE:
        return _append_raw(frame, store)
    return _append_diff(frame, episode_start, store, rows)


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
    if kind == RUNS or kind == ANCHOR_PACKED:
        return fid - store.ref_dist[slot]
    if kind == PREV_PACKED:
        return fid - 1
    return -1


@numba.njit(cache=True, nogil=True)
def needs_entropy(ids, block, arena):
    """Per id, whether decoding it involves a packed payload (its own or a reference's)."""
    store = store_views(block, arena)
    slots = store.offsets.shape[0]
    needs = np.zeros(ids.shape[0], np.bool_)
    for i in range(ids.shape[0]):
        g = ids[i]
        while g >= 0 and not needs[i]:
            needs[i] = store.kinds[g % slots] >= PREV_PACKED
            g = dependency(store, g)
    return needs


@numba.njit(cache=True, nogil=True, inline='always')
def _runs_onto(store, dst, at, size, slot):
    """Apply frame slot `slot`'s runs onto its run reference, already at dst[at:at + size]."""
    apply_runs(dst, at, size, store.params[slot], store.offsets[slot], store.arena)


@numba.njit(cache=True, nogil=True)
def decode_runs(ids, order, block, arena, out):
    """Decode the frames ids[order] (order: positions of ids sorted by id) into rows of `out` (flat), for frames
    whose references are all raw or byte runs (what floor-free tasks mostly store): walk() specialised to chains
    of at most two steps, a key decoded once for the frames of its group that come after it."""
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
# decoded, in `out` or in its work rows (frames no one asked for: references).
_CACHE = 8  # frames a walk remembers as references for the frames after them
IN_OUT, IN_WORK, IN_ARENA = 0, 1, 2  # where a walk finds a decoded frame
WORK_ROWS = 2  # frames a walk holds besides the requested ones: a reference and the next
Rows = namedtuple("Rows", "out work residual")  # a walk's buffers, flat: residual holds one frame's planes
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
def _decode_step(store, rows, g, src, dst):
    """Decode frame g from its reference (location src: (where, at)) to location dst."""
    size, arena = store.state.frame_size, store.arena
    s = g % store.offsets.shape[0]
    kind = store.kinds[s]
    source, target = _buffer(rows, arena, src[0]), _buffer(rows, arena, dst[0])
    if kind == RUNS:
        memcpy(target, dst[1], source, src[1], size)
        _runs_onto(store, target, dst[1], size, s)
        return
    layout = layout_of(store.state)
    residual_planes = rows.residual[:layout[0] * packed_plane(layout)]
    unpack_residual(arena, store.offsets[s], layout[0], packed_plane(layout), residual_planes)
    rebuild(residual_planes, source[src[1]:src[1] + size], kind != ALONE_PACKED, kind != PREV_PACKED, layout,
            target[dst[1]:dst[1] + size])


@numba.njit(cache=True, nogil=True)
def walk(ids, order, block, arena, rows):
    """Decode the frames ids[order] (order: positions of ids sorted by id) into rows.out, row i for ids[i]."""
    store = store_views(block, arena)
    size = store.state.frame_size
    cache = Cache(np.full(_CACHE, -1, np.int64), np.zeros(_CACHE, np.int64), np.zeros(_CACHE, np.int64),
                  np.zeros(2, np.int64))
    work_rows = rows.work.shape[0] // size
    chain = np.empty(store.state.key_interval + 2, np.int64)
    previous_id, previous_at = -1, 0
    for k in range(order.shape[0]):
        i = order[k]
        fid = ids[i]
        at = i * size
        if fid == previous_id:  # stacks that overlap (obs and next_obs when nstep < frame_stack)
            memcpy(rows.out, at, rows.out, previous_at, size)
            continue
        previous_id, previous_at = fid, at
        n, base_where, base_at = _find_base(store, cache, fid, chain)
        if n == 0:
            memcpy(rows.out, at, _buffer(rows, arena, base_where), base_at, size)
        for j in range(n - 1, -1, -1):
            g = chain[j]
            where, target = IN_OUT, at
            if j > 0:  # a reference nobody asked for
                where, target = IN_WORK, _work_row(cache, size, work_rows, base_where, base_at)
            _decode_step(store, rows, g, (base_where, base_at), (where, target))
            _remember(cache, g, where, target)
            base_where, base_at = where, target


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
def packed_payload_bytes(start, end, offset, param, frame_size, layout):
    """Bytes of a *_PACKED payload at `offset`: `param` bytes inside one part of the saved payload, at most a
    frame's (what the arena is sized for), that packed_payload_error accepts for this layout, or -1."""
    if layout[0] > PACKED_CHANNELS or param < 1 or param > frame_size or offset < 0:
        return -1
    payload, at = (start, offset) if offset + param <= start.shape[0] else (end, offset - start.shape[0])
    if at < 0 or at + param > payload.shape[0]:
        return -1
    return param if packed_payload_error(payload, at, param, layout[0], packed_plane(layout)) == 0 else -1


@numba.njit(cache=True, nogil=True)
def payload_bytes(kind, start, end, offset, param, frame_size, layout):
    """Bytes of the payload of a frame of `kind` at `offset` as its kind's function accepts it, or -1."""
    if kind == RAW:
        return raw_payload_bytes(start, end, offset, param, frame_size)
    if kind == RUNS:
        return runs_payload_bytes(start, end, offset, param, frame_size)
    return packed_payload_bytes(start, end, offset, param, frame_size, layout)


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
def check_index(start, end, offsets, kinds, params, ref_dist, counters, config, slots, layout):
    """(INDEX_OK, -1) if a saved `full` index describes frames as the encoder writes them, else (problem, first bad
    entry): each frame's kind allowed at its place in its span (anchors RAW, only keys ANCHOR_PACKED and
    ALONE_PACKED, only other frames PREV_PACKED), ref_dist consistent from frame to frame, every reference of a frame that decode() accepts held, payloads
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
        if kind >= KINDS or (place == 0 and kind != RAW) or (place == 1 and kind == PREV_PACKED) or (
                place == 2 and kind >= ANCHOR_PACKED):
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
        size = payload_bytes(kind, start, end, offsets[i], np.int64(params[i]), frame_size, layout)
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
