"""Frame stores decode exactly the frames they were given, whatever the content, wraps and growth."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obs_comp import DiffFrames, RawFrames, make_frame_store


def similar_frames(rng: np.random.Generator, count: int, shape: tuple, change: float) -> np.ndarray:
    """Frames where each differs from the previous in a random fraction of pixels (sometimes all)."""
    frames = np.empty((count, *shape), dtype=np.uint8)
    frame = rng.integers(0, 256, shape, dtype=np.uint8)
    for i in range(count):
        roll = rng.random()
        if roll < 0.1:
            frame = rng.integers(0, 256, shape, dtype=np.uint8)  # scene cut: raw fallback
        elif roll < 0.9:
            mask = rng.random(shape) < change
            frame = np.where(mask, rng.integers(0, 256, shape, dtype=np.uint8), frame)
        frames[i] = frame  # else: identical to the previous frame
    return frames


@st.composite
def frame_streams(draw):
    shape = (draw(st.sampled_from([1, 3])), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    count = draw(st.integers(1, 120))
    starts = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    frames = similar_frames(rng, count, shape, draw(st.sampled_from([0.02, 0.2, 0.6])))
    return shape, frames, starts, rng


@settings(max_examples=150, deadline=None)
@given(stream=frame_streams(), capacity=st.integers(1, 40), key_interval=st.integers(1, 5),
       anchor_interval=st.integers(1, 12))
def test_full_decodes_every_stored_frame_exactly(stream, capacity, key_interval, anchor_interval):
    shape, frames, starts, rng = stream
    store = DiffFrames(capacity, shape, key_interval, anchor_interval)
    for i, (frame, start) in enumerate(zip(frames, starts)):
        store.append(frame, episode_start=start)
        stored = np.arange(max(0, i + 1 - capacity), i + 1)
        # in order (as stacks are read), and shuffled with repeats (no reliance on ordering)
        for ids in (stored, rng.choice(stored, size=2 * len(stored))):
            out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
            store.decode(ids, out)
            np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))


@settings(max_examples=50, deadline=None)
@given(stream=frame_streams(), capacity=st.integers(1, 40))
def test_half_decodes_every_stored_frame_exactly(stream, capacity):
    shape, frames, starts, _ = stream
    store = RawFrames(capacity, shape)
    for frame, start in zip(frames, starts):
        store.append(frame, episode_start=start)
    ids = np.arange(max(0, len(frames) - capacity), len(frames))
    out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
    store.decode(ids, out)
    np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))


def moving_blob_frames(count: int, size: int = 84) -> np.ndarray:
    """A bright square drifting over a fixed gradient, like a tracked body over a floor-free sky."""
    background = np.tile(np.linspace(40, 160, size, dtype=np.uint8)[:, None], (1, size))
    frames = np.repeat(background[None], count, axis=0)
    for i in range(count):
        x = 20 + int(15 * np.sin(i / 7))
        frames[i, 30:50, x:x + 20] = 200 + (i % 50)
    return frames[:, None]


def test_full_is_smaller_than_raw_on_similar_frames_and_reuses_its_arena():
    frames = moving_blob_frames(3000)
    store = DiffFrames(500, frames.shape[1:], key_interval=3, anchor_interval=100)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i % 400 == 0)
        if i == 1000:
            arena_after_first_wraps = store.nbytes
    assert store.nbytes == arena_after_first_wraps  # steady state: old payload space is reused
    assert store.payload_bytes <= store.nbytes
    raw = RawFrames(500, frames.shape[1:]).nbytes
    assert store.nbytes < raw / 5


def test_full_rejects_bad_settings():
    with pytest.raises(ValueError, match="key_interval"):
        DiffFrames(10, (1, 8, 8), key_interval=0, anchor_interval=4)
    store = DiffFrames(4, (1, 8, 8), key_interval=2, anchor_interval=4)
    store.append(np.zeros((1, 8, 8), np.uint8), episode_start=True)
    for bad in (np.zeros(63, np.uint8), np.zeros((1, 8, 8), np.float32)):
        with pytest.raises(ValueError, match="expected 64 uint8"):
            store.append(bad, episode_start=False)
    assert store._count == 1  # nothing stored by the rejected frames
    with pytest.raises(ValueError, match="unknown compression"):
        make_frame_store("zip", 10, (1, 8, 8), 3, 4)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 12), pattern=st.lists(st.integers(0, 12), min_size=50, max_size=300),
       capacity=st.integers(1, 12), key_interval=st.integers(1, 3), anchor_interval=st.integers(1, 6))
def test_full_arena_boundaries_with_tiny_frames(size, pattern, capacity, key_interval, anchor_interval):
    # Payloads of a few bytes make the arena wrap and fill to the exact byte often.
    store = DiffFrames(capacity, (1, 1, size), key_interval, anchor_interval)
    frames = []
    frame = np.zeros(size, dtype=np.uint8)
    for i, change in enumerate(pattern):
        frame = frame.copy()
        frame[:change] += 1 + i % 7
        frames.append(frame)
        store.append(frame.reshape(1, 1, -1), episode_start=change == 12)
        ids = np.arange(max(0, i + 1 - capacity), i + 1)
        out = np.empty((len(ids), frame.size), dtype=np.uint8)
        store.decode(ids, out)
        np.testing.assert_array_equal(out, np.stack(frames)[ids])


def naive_encoded_size(frame: np.ndarray, ref: np.ndarray) -> int:
    """Bytes of the documented run format, computed pixel by pixel: 2 per (skip, length) pair plus run bytes."""
    changed = [i for i in range(frame.size) if frame[i] != ref[i]]
    runs = []
    for i in changed:
        if runs and i - runs[-1][1] <= 2:  # at most two equal bytes in between: same run
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    size, end = 0, 0
    for start, stop in runs:
        skip, length = start - end, stop - start
        pairs = max(0, -(-(skip - 255) // 255)) + -(-length // 255)
        size += 2 * pairs + length
        end = stop
    return size


@st.composite
def segment_frames(draw):
    """A reference frame and a frame that differs from it in segments of any length, incl. > 255."""
    size = draw(st.integers(1, 1500))
    ref = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), dtype=np.uint8)
    frame = ref.copy()
    at = 0
    while at < size:
        at += draw(st.sampled_from([0, 1, 2, 3, 254, 255, 256, 511]))
        length = draw(st.sampled_from([1, 2, 255, 256, 600]))
        frame[at:at + length] += np.uint8(draw(st.integers(1, 255)))
        at += length
    return ref, frame


@settings(max_examples=300, deadline=None)
@given(pair=segment_frames())
def test_full_run_encoding_roundtrips_and_has_the_documented_size(pair):
    ref, frame = pair
    store = DiffFrames(2, (1, 1, ref.size), key_interval=1, anchor_interval=2)
    store.append(ref, episode_start=True)
    before = store.payload_bytes
    store.append(frame, episode_start=False)
    out = np.empty((2, ref.size), dtype=np.uint8)
    store.decode(np.array([1, 0]), out)
    np.testing.assert_array_equal(out, np.stack([frame, ref]))
    # stored as runs when that is smaller than the frame, raw otherwise
    assert store.payload_bytes - before == min(naive_encoded_size(frame, ref), ref.size) or (
        naive_encoded_size(frame, ref) == 0 and store.payload_bytes - before == 1)


def test_full_fallbacks_frame_differing_everywhere_and_all_black_frames():
    rng = np.random.default_rng(0)
    sky = moving_blob_frames(1)[0]
    inverted = 255 - sky  # differs in every byte: stored raw
    black = np.zeros_like(sky)
    frames = np.stack([sky, inverted, black, black, sky, black, inverted, sky])
    store = DiffFrames(len(frames), sky.shape, key_interval=2, anchor_interval=5)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i == 0)
    ids = rng.permutation(np.repeat(np.arange(len(frames)), 2))
    out = np.empty((len(ids), sky.size), dtype=np.uint8)
    store.decode(ids, out)
    np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))
    assert store._num_runs[1] == -1  # the inverted frame fell back to raw
    assert store._num_runs[3] == 0   # black after black: no runs at all


def test_full_frames_decode_after_their_key_and_anchor_left_the_ring():
    frames = moving_blob_frames(60)
    capacity = 3  # far fewer frames kept than the key (8) and anchor (40) intervals span
    store = DiffFrames(capacity, frames.shape[1:], key_interval=8, anchor_interval=40)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i == 0)
        if i >= capacity:
            ids = np.arange(i + 1 - capacity, i + 1)
            out = np.empty((capacity, frames[0].size), dtype=np.uint8)
            store.decode(ids, out)
            np.testing.assert_array_equal(out, frames[ids].reshape(capacity, -1))
