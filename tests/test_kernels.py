"""The packed-residual format (kernels.py, section 1) against its definition: every mode round trips, the width
codes decode to the widths they code, and the payload check refuses what a decoder must not read."""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kernels
from obs_comp import frame_layout


@st.composite
def frame_pairs(draw):
    """(layout, frame, reference) of up to 3 channels, odd sizes, as CHW, HWC or HW; changes small or any."""
    channels, height, width = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 19)), draw(st.integers(1, 19))
    shape = draw(st.sampled_from([(channels, height, width), (height, width, channels), (height, width)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reference = rng.integers(0, 256, shape, dtype=np.uint8)
    spread = draw(st.sampled_from([0, 1, 3, 40, 128]))
    change = rng.integers(-spread, spread + 1, shape) * (rng.random(shape) < draw(st.sampled_from([0.05, 0.5, 1.0])))
    frame = ((reference.astype(np.int64) + change) % 256).astype(np.uint8)
    return frame_layout(shape), frame.reshape(-1), reference.reshape(-1)


def packed(frame, reference, has_ref, vertical, layout, offset=0):
    """The payload of `frame` in a buffer at `offset`, its size, and the residual planes it came from."""
    channels, plane = int(layout[0]), int(kernels.packed_plane(layout))
    planes = np.empty(channels * plane, np.uint8)
    kernels.residual(frame, reference, has_ref, vertical, layout, planes)
    out = np.empty(kernels.packed_bound(frame.size), np.uint8)
    size = kernels.pack_residual(planes, channels, plane, out)
    payload = np.zeros(offset + size, np.uint8)
    payload[offset:] = out[:size]
    return payload, size, planes


@settings(max_examples=300, deadline=None)
@given(pair=frame_pairs(), has_ref=st.booleans(), vertical=st.booleans(), offset=st.integers(0, 9))
def test_every_residual_mode_round_trips_at_any_offset(pair, has_ref, vertical, offset):
    layout, frame, reference = pair
    assume(layout[0] <= kernels.PACKED_CHANNELS)  # (1, 1, 4) reads as 4 channels: stores do not pack those
    payload, size, planes = packed(frame, reference, has_ref, vertical, layout, offset)
    channels, plane = int(layout[0]), int(kernels.packed_plane(layout))
    assert kernels.packed_payload_error(payload, offset, size, channels, plane) == 0
    unpacked = np.full(channels * plane, 77, np.uint8)
    kernels.unpack_residual(payload, offset, channels, plane, unpacked)
    np.testing.assert_array_equal(unpacked, planes)
    rebuilt = np.empty_like(frame)
    kernels.rebuild(unpacked, reference, has_ref, vertical, layout, rebuilt)
    np.testing.assert_array_equal(rebuilt, frame)


@given(widths=st.lists(st.integers(0, 8), min_size=8, max_size=8), previous=st.integers(0, 8))
def test_a_groups_width_codes_decode_to_its_widths(widths, previous):
    bits, used, last = 0, 0, previous
    for width in widths:
        code, length = kernels._width_code(width, last)
        bits, used, last = bits | (code << used), used + length, width
    lanes, decoded_last, decoded_used = kernels.group_widths(np.uint64(bits), np.uint64(previous))
    assert [(int(lanes) >> (8 * j)) & 255 for j in range(8)] == widths
    assert (int(decoded_last), int(decoded_used)) == (widths[-1], used)


def test_the_payload_check_refuses_truncated_and_impossible_payloads():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8).reshape(-1)
    frame = ((reference.astype(np.int64) + rng.integers(-20, 21, reference.size)) % 256).astype(np.uint8)
    layout = frame_layout((3, 16, 16))
    payload, size, _ = packed(frame, reference, True, False, layout)
    plane = int(kernels.packed_plane(layout))
    assert kernels.packed_payload_error(payload, 0, size, 3, plane) == 0
    assert kernels.packed_payload_error(payload, 0, size - 1, 3, plane) == 3  # its bits run past its end
    assert kernels.packed_payload_error(payload, 0, 2, 3, plane) == 1
    absolute_nine = payload.copy()
    absolute_nine[2] = 7 | (9 << 3)  # the first group's first width code: absolute, 9
    assert kernels.packed_payload_error(absolute_nine, 0, size, 3, plane) == 2
