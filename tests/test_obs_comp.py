"""Frame stores decode exactly the frames they were given, whatever the content, wraps and growth."""
import ctypes
import mmap
import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import obs_comp
from obs_comp import DiffFrames, DiffScratch, RawFrames, make_frame_store


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


def scrolling_floor_frames(rng: np.random.Generator, count: int, height: int, width: int, channels: int) -> np.ndarray:
    """(count, height, width, channels) frames of a checkerboard floor under a sky, scrolling by fractions
    of a pixel, with a body moving over it: like DMC's floor under a tracking camera, most floor pixels
    change a little every frame."""
    colours = rng.integers(0, 256, (2, channels))
    square, speed = rng.uniform(2, 6), rng.uniform(0.05, 0.6)
    horizon = height // 3
    y, x = np.mgrid[0:height, 0:width].astype(float)
    frames = np.empty((count, height, width, channels), dtype=np.uint8)
    for i in range(count):
        # anti-aliased edges: the mean of the checker pattern over four sub-pixel samples
        coverage = np.mean([((np.floor((x + dx + i * speed) / square) + np.floor((y + dy) / square)) % 2)
                            for dx in (0.0, 0.5) for dy in (0.0, 0.5)], axis=0)
        image = colours[0] + coverage[..., None] * (colours[1] - colours[0])
        image[:horizon] = 40 + 3 * y[:horizon, :, None]  # sky
        cx = int(width / 2 + width / 4 * np.sin(i / 5))
        image[horizon:horizon + 4, max(cx - 2, 0):cx + 2] = 250  # body
        frames[i] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


@st.composite
def frame_streams(draw):
    channels, height, width = draw(st.sampled_from([1, 3])), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    layout = draw(st.sampled_from(["chw", "hwc", "hw"]))
    shape = {"chw": (channels, height, width), "hwc": (height, width, channels), "hw": (height, width)}[layout]
    count = draw(st.integers(1, 120))
    starts = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        frames = similar_frames(rng, count, shape, draw(st.sampled_from([0.02, 0.2, 0.6])))
    else:
        frames = scrolling_floor_frames(rng, count, height, width, 1 if layout == "hw" else channels)
        frames = frames.transpose(0, 3, 1, 2) if layout == "chw" else frames
        frames = np.ascontiguousarray(frames).reshape(count, *shape)
    return shape, frames, starts, rng


# every way `full` may store a frame: its own choice with the default threshold (byte runs on frames
# this small), the cheapest of all, byte runs only, entropy-coded wherever allowed
REPRESENTATIONS = {"default": {}, "cheapest": {"min_entropy_saving": 0}, "runs": {"entropy": False},
                   "entropy": {"min_entropy_saving": -(1 << 30)}}


@settings(max_examples=150, deadline=None)
@given(stream=frame_streams(), capacity=st.integers(1, 40), key_interval=st.integers(1, 5),
       anchor_interval=st.integers(1, 12), representation=st.sampled_from(sorted(REPRESENTATIONS)))
def test_full_decodes_every_stored_frame_exactly(stream, capacity, key_interval, anchor_interval, representation):
    shape, frames, starts, rng = stream
    store = DiffFrames(capacity, shape, key_interval, anchor_interval, **REPRESENTATIONS[representation])
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


def test_full_is_smaller_than_raw_on_similar_frames():
    frames = moving_blob_frames(3000)
    store = DiffFrames(500, frames.shape[1:], key_interval=3, anchor_interval=100)
    raw = RawFrames(500, frames.shape[1:])
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i % 400 == 0)
        raw.append(frame, episode_start=i % 400 == 0)
    assert store.payload_bytes <= store.nbytes
    assert raw.nbytes == 500 * frames[0].size
    assert store.nbytes < raw.nbytes / 5


def mapping_rss(array: np.ndarray) -> int:
    """Resident bytes of the pages under `array`, as the kernel's mincore() reports them.

    Counted page by page over the array's own range: /proc/self/smaps reports whole mappings, and the
    kernel merges an arena's mapping with a neighbouring one of the same flags (another store's).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    start = array.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    length = array.ctypes.data + array.nbytes - start
    pages = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int((np.frombuffer(pages, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore() on anonymous memory")


@linux_only
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(20, 400), change=st.sampled_from([0.01, 0.3, 1.0]),
       anchor_interval=st.integers(1, 60), chunk_pages=st.sampled_from([1, 4, 16]))
def test_full_arena_never_moves_and_holds_only_live_pages(seed, capacity, change, anchor_interval, chunk_pages):
    # Frames of 4 KiB, from barely changing to all new (raw), so the live payload rises and falls.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(obs_comp, "_RELEASE_CHUNK", chunk_pages * obs_comp.PAGE)
        check_arena_against_kernel(seed, capacity, change, anchor_interval)


def check_arena_against_kernel(seed, capacity, change, anchor_interval):
    """Fill a `full` store and compare its arena with what the kernel reports resident for it."""
    rng = np.random.default_rng(seed)
    frames = similar_frames(rng, 1500, (1, 64, 64), change)
    store = DiffFrames(capacity, (1, 64, 64), key_interval=4, anchor_interval=anchor_interval)
    arena_address = store._arena.ctypes.data
    slack = obs_comp._RELEASE_CHUNK + 2 * obs_comp.PAGE + frames[0].size  # unreleased chunk, partial pages, wrap
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=rng.random() < 0.01)
        if i % 50 == 0 or i == len(frames) - 1:
            resident = mapping_rss(store._arena)
            assert store._arena.ctypes.data == arena_address  # never copied to grow
            assert resident <= store.payload_bytes + slack
            assert abs(store.content_nbytes - min(i + 1, store._slots) * 16 - resident) <= frames[0].size + obs_comp.PAGE
    ids = np.arange(len(frames) - capacity, len(frames))
    out = np.empty((capacity, frames[0].size), dtype=np.uint8)
    store.decode(ids, out)
    np.testing.assert_array_equal(out, frames[ids].reshape(capacity, -1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([9, 64]), capacity=st.integers(1, 60),
       key_interval=st.integers(1, 5), anchor_interval=st.integers(1, 12), mode=st.sampled_from(["half", "full"]),
       change=st.sampled_from([0.02, 0.6]), data=st.data())
def test_released_stores_still_decode_every_kept_frame(seed, size, capacity, key_interval, anchor_interval, mode,
                                                       change, data):
    # Front ends that keep fewer frames than capacity release the rest, in any pattern of calls; pages
    # go back at every page, so a page released too early reads as zeros.
    rng = np.random.default_rng(seed)
    frames = similar_frames(rng, 150, (1, size, size), change)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(obs_comp, "_RELEASE_CHUNK", obs_comp.PAGE)
        store = make_frame_store(mode, capacity, frames.shape[1:], key_interval, anchor_interval)
        first_needed = 0
        for i, frame in enumerate(frames):
            store.append(frame, episode_start=rng.random() < 0.05)
            if data.draw(st.booleans()):
                first_needed = max(first_needed, data.draw(st.integers(0, i + 1)))
                store.release(first_needed)
            kept = np.arange(max(first_needed, i + 1 - capacity), i + 1)
            out = np.empty((len(kept), frames[0].size), dtype=np.uint8)
            store.decode(kept, out)
            np.testing.assert_array_equal(out, frames[kept].reshape(len(kept), frames[0].size))


@linux_only
@pytest.mark.parametrize("mode", ["half", "full"])
def test_released_frames_hand_their_pages_back(mode):
    frames = np.random.default_rng(0).integers(0, 256, (4000, 1, 64, 64), dtype=np.uint8)  # incompressible
    window = 300
    store = make_frame_store(mode, 2 * window, frames.shape[1:], 4, 100)  # capacity 2x what is kept
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i % 500 == 0)
        store.release(i + 1 - window)
    resident = mapping_rss(store._arena if mode == "full" else store._frames)
    kept_bytes = window * frames[0].size
    assert resident <= kept_bytes + 100 * frames[0].size + obs_comp._RELEASE_CHUNK + 2 * obs_comp.PAGE
    assert abs(store.content_nbytes - resident) <= 0.1 * resident


@pytest.mark.parametrize("mode,options", [("half", {}), ("full", {}), ("full", REPRESENTATIONS["entropy"])])
@pytest.mark.parametrize("released", [True, False])
def test_stores_pickle_and_restore_their_state_exactly(mode, options, released):
    frames = moving_blob_frames(740)
    frames[::50] = 255 - frames[::50]
    store = make_frame_store(mode, 256, frames.shape[1:], 4, 20, **options)
    for i, frame in enumerate(frames[:700]):  # wraps the ring a few times
        store.append(frame, episode_start=i % 90 == 0)
    if released:
        store.release(600)
    restored = make_frame_store(mode, 256, frames.shape[1:], 4, 20, **options)
    for frame in frames[:300]:  # a used store: its old contents must not leak into the restored state
        restored.append(255 - frame, episode_start=False)
    restored.load_state_dict(store.state_dict())
    for copy in (pickle.loads(pickle.dumps(store)), restored):
        for frame in frames[700:]:  # goes on as the original would
            copy.append(frame, episode_start=False)
        ids = np.arange(600, 740)
        out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
        copy.decode(ids, out)
        np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))
    assert len(pickle.dumps(store)) < 2 * 256 * frames[0].size  # the reserved address space is not pickled


def test_full_stores_sharing_scratch_decode_exactly_and_do_not_count_it():
    rng = np.random.default_rng(5)
    shape = (1, 16, 16)
    streams = [similar_frames(rng, 90, shape, 0.05) for _ in range(3)]
    scratch = DiffScratch(256)
    shared = [DiffFrames(40, shape, 3, 20, entropy=False, scratch=scratch) for _ in streams]
    alone = [DiffFrames(40, shape, 3, 20, entropy=False) for _ in streams]
    for i in range(90):  # interleaved, as one buffer's envs add
        for e, frames in enumerate(streams):
            for store in (shared[e], alone[e]):
                store.append(frames[i], episode_start=i % 45 == 0)
    for e, frames in enumerate(streams):
        ids = rng.integers(50, 90, 64)
        out = np.empty((64, 256), np.uint8)
        shared[e].decode(ids, out)
        np.testing.assert_array_equal(out, frames[ids].reshape(64, -1))
        assert shared[e].nbytes == alone[e].nbytes - scratch.nbytes
    copies = pickle.loads(pickle.dumps(shared))  # pickled together, they still share one
    assert copies[0]._scratch is copies[1]._scratch is copies[2]._scratch is not scratch
    with pytest.raises(ValueError, match="scratch is for frames of 256 bytes"):
        DiffFrames(40, (1, 8, 8), 3, 20, scratch=scratch)


@pytest.mark.parametrize("offset", [0, 1, 4])
def test_full_frames_at_any_byte_offset_store_exactly(offset):
    frames = similar_frames(np.random.default_rng(7), 40, (1, 8, 16), 0.1)
    store = DiffFrames(40, (1, 8, 16), 3, 10, entropy=False)
    for i, frame in enumerate(frames):  # each frame a view starting `offset` bytes into a larger array
        moved = np.empty(offset + frame.size, np.uint8)[offset:].reshape(frame.shape)
        moved[...] = frame
        store.append(moved, episode_start=i == 0)
    out = np.empty((40, 128), np.uint8)
    store.decode(np.arange(40), out)
    np.testing.assert_array_equal(out, frames.reshape(40, -1))


def test_full_without_entropy_keeps_no_previous_frame_and_says_so_on_load():
    frames = similar_frames(np.random.default_rng(6), 30, (1, 8, 8), 0.3)
    stores = {entropy: DiffFrames(30, (1, 8, 8), 2, 10, entropy=entropy) for entropy in (False, True)}
    for store in stores.values():
        for i, frame in enumerate(frames):
            store.append(frame, episode_start=i == 0)
    assert stores[False]._previous.size == 0
    with pytest.raises(ValueError, match="saved by a store with entropy=False"):
        DiffFrames(30, (1, 8, 8), 2, 10, entropy=True).load_state_dict(stores[False].state_dict())
    restored = DiffFrames(30, (1, 8, 8), 2, 10, entropy=False)
    restored.load_state_dict(stores[True].state_dict())  # the other way round, nothing is missing
    out = np.empty((30, 64), np.uint8)
    restored.decode(np.arange(30), out)
    np.testing.assert_array_equal(out, frames.reshape(30, -1))


def test_full_rejects_bad_settings():
    with pytest.raises(ValueError, match="key_interval"):
        DiffFrames(10, (1, 8, 8), key_interval=0, anchor_interval=4)
    store = DiffFrames(4, (1, 8, 8), key_interval=2, anchor_interval=4)
    store.append(np.zeros((1, 8, 8), np.uint8), episode_start=True)
    for bad in (np.zeros(63, np.uint8), np.zeros((1, 8, 8), np.float32)):
        with pytest.raises(ValueError, match="expected 64 uint8"):
            store.append(bad, episode_start=False)
    assert store.count == 1  # nothing stored by the rejected frames
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
        at += draw(st.sampled_from([0, 1, 2, 3, 4, 31, 254, 255, 256, 511]))
        length = draw(st.sampled_from([1, 2, 3, 7, 31, 32, 33, 63, 255, 256, 600]))
        frame[at:at + length] += np.uint8(draw(st.integers(1, 255)))
        at += length
    return ref, frame


@settings(max_examples=300, deadline=None)
@given(pair=segment_frames(), earlier=st.integers(0, 3))
def test_full_run_encoding_roundtrips_and_has_the_documented_size(pair, earlier):
    ref, frame = pair
    store = DiffFrames(2 + earlier, (1, 1, ref.size), key_interval=1, anchor_interval=2, entropy=False)
    for _ in range(earlier):  # one-frame episodes before: the anchor `ref` lies at any alignment in the arena
        store.append(frame, episode_start=True)
    store.append(ref, episode_start=True)
    before = store.payload_bytes
    store.append(frame, episode_start=False)
    out = np.empty((2, ref.size), dtype=np.uint8)
    store.decode(np.array([earlier + 1, earlier]), out)
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
    store = DiffFrames(len(frames), sky.shape, key_interval=2, anchor_interval=5, entropy=False)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i == 0)
    ids = rng.permutation(np.repeat(np.arange(len(frames)), 2))
    out = np.empty((len(ids), sky.size), dtype=np.uint8)
    store.decode(ids, out)
    np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))
    assert store._kinds[1] == obs_comp.RAW  # the inverted frame fell back to raw
    assert store._kinds[3] == obs_comp.RUNS and store._params[3] == 0  # black after black: no runs


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


@pytest.fixture(scope="module")
def rendered_floor_frames():
    """Frames of walker_walk as the unmodified benchmark renders them (RGB with the floor), two episodes."""
    from envs import make
    env = make(name="walker_walk", frame_stack=1, action_repeat=2, seed=0, grayscale=False, floor=True)
    rng = np.random.default_rng(0)
    frames, starts = [], []
    for length in (30, 25):
        ts = env.reset()
        frames.append(ts.observation)
        starts.append(True)
        for _ in range(length):
            ts = env.step(rng.uniform(-1, 1, env.action_spec().shape).astype(np.float32))
            frames.append(ts.observation)
            starts.append(False)
    return np.stack(frames), starts


@pytest.mark.parametrize("decode_threads", [1, 3, "auto"])
def test_full_picks_entropy_coded_differences_on_rendered_floor_frames(rendered_floor_frames, decode_threads):
    frames, starts = rendered_floor_frames
    stores = {name: DiffFrames(40, frames.shape[1:], key_interval=4, anchor_interval=100,
                               decode_threads=decode_threads, **options)
              for name, options in (("default", {}), ("runs", {"entropy": False}))}
    for frame, start in zip(frames, starts):
        for store in stores.values():
            store.append(frame, episode_start=start)
    kinds = np.bincount(stores["default"]._kinds[:40], minlength=kernels.KINDS)
    assert kinds[obs_comp.PREV_PACKED] > 0 and kinds[obs_comp.ANCHOR_PACKED] > 0  # the floor makes runs large
    assert stores["default"].payload_bytes < 0.75 * stores["runs"].payload_bytes
    ids = np.random.default_rng(1).choice(np.arange(len(frames) - 40, len(frames)), size=90)
    for store in stores.values():
        out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
        store.decode(ids, out)
        np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))
    # a store that does not pack continues from frames it can rebuild: it refuses packed ones
    with pytest.raises(ValueError, match="include packed ones"):
        stores["runs"].load_state_dict(stores["default"].state_dict())
    out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
    stores["runs"].decode(ids, out)  # and keeps what it held
    np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))


@settings(max_examples=60, deadline=None)
@given(stream=frame_streams(), capacity=st.integers(1, 40), key_interval=st.integers(1, 5),
       anchor_interval=st.integers(1, 12), data=st.data())
def test_decode_runs_decodes_exactly_what_the_general_walk_decodes(stream, capacity, key_interval, anchor_interval,
                                                                    data):
    # decode_runs is walk specialised to stores without packed frames: both must write the same rows
    shape, frames, starts, rng = stream
    store = DiffFrames(capacity, shape, key_interval, anchor_interval, entropy=False)
    for frame, start in zip(frames, starts):
        store.append(frame, episode_start=start)
    held = np.arange(max(0, len(frames) - capacity), len(frames))
    ids = rng.choice(held, size=data.draw(st.integers(1, 3 * len(held))))
    order = np.argsort(ids, kind="stable")
    size = frames[0].size
    by_runs, by_walk = np.empty(len(ids) * size, np.uint8), np.empty(len(ids) * size, np.uint8)
    kernels.decode_runs(ids, order, store._block, store._arena, by_runs)
    work = np.empty(kernels.WORK_ROWS * size, np.uint8)
    kernels.walk(ids, order, store._block, store._arena, kernels.Rows(by_walk, work, work[:0]))
    np.testing.assert_array_equal(by_runs, by_walk)
    np.testing.assert_array_equal(by_runs.reshape(len(ids), -1), frames[ids].reshape(len(ids), -1))


# Validation: saved states from elsewhere, misused decodes, concurrent readers.

def decode_all(store, ids):
    out = np.empty((len(ids), store.frame_size), dtype=np.uint8)
    store.decode(ids, out)
    return out


@settings(max_examples=80, deadline=None)
@given(stream=frame_streams(), capacity=st.integers(1, 40), key_interval=st.integers(1, 5),
       anchor_interval=st.integers(1, 12), representation=st.sampled_from(["default", "cheapest", "runs"]),
       data=st.data())
def test_every_saved_full_state_passes_validation_and_continues_exactly(stream, capacity, key_interval,
                                                                         anchor_interval, representation, data):
    # the validator accepts whatever the encoder writes: any stream, cut, wrap and release (with entropy-coded
    # payloads no larger than frames: "entropy" forces them even where they are larger)
    shape, frames, starts, rng = stream
    options = REPRESENTATIONS[representation]
    store = DiffFrames(capacity, shape, key_interval, anchor_interval, **options)
    cut = data.draw(st.integers(0, len(frames)))
    first_needed = 0
    for i in range(cut):
        store.append(frames[i], episode_start=starts[i])
        if data.draw(st.integers(0, 9)) == 0:
            first_needed = max(first_needed, data.draw(st.integers(0, i + 1)))
            store.release(first_needed)
    restored = DiffFrames(capacity, shape, key_interval, anchor_interval, **options)
    restored.load_state_dict(store.state_dict())
    for i in range(cut, len(frames)):
        for copy in (store, restored):
            copy.append(frames[i], episode_start=starts[i])
    held = np.arange(max(first_needed, len(frames) - capacity), len(frames))
    np.testing.assert_array_equal(decode_all(restored, held), frames[held].reshape(len(held), frames[0].size))


def runs_store(seed=3):
    """A `full` store of byte-run frames (and raw anchors) over two episodes, entropy coding off: frames 10..59
    are saved (as state entries 0..49), 19..59 held."""
    frames = similar_frames(np.random.default_rng(seed), 60, (1, 16, 16), 0.1)
    store = DiffFrames(41, (1, 16, 16), key_interval=3, anchor_interval=10, entropy=False)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i in (0, 33))
    return store, frames


def damaged(state, name, entry, value):
    state = {key: np.array(array) for key, array in state.items()}
    state[name][entry] = value
    return state


@pytest.mark.parametrize("name, entry, value, message", [
    ("kinds", 11, 7, r"kinds\[1\]"),  # 11 - 10 frames before the first saved: index entry 1
    ("kinds", 10, obs_comp.RUNS, r"kinds\[0\]"),  # an anchor must be raw
    ("ref_dist", 14, 9, r"ref_dist\[4\]"),
    ("ref_dist", 15, 1, r"ref_dist\[5\]"),  # a reference that is not its group's key
    ("offsets", 20, 5, r"offsets\[10\]"),
    ("params", 22, 250, r"params\[12\]"),  # more run headers than the payload holds
    ("counters", 1, 7, r"counters\[1\]"),  # episode position
    ("counters", 3, 30, r"counters\[2\]"),  # first needed: the first frame saved would be another
])
def test_full_load_refuses_a_damaged_index_naming_the_entry_and_keeps_its_frames(name, entry, value, message):
    store, frames = runs_store()
    state = store.state_dict()
    assert state["counters"][2] == 10  # frames 10..59 saved
    index = name != "counters"
    bad = damaged(state, name, entry - 10 if index else entry, value)
    target, held = runs_store(seed=4)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(bad)
    np.testing.assert_array_equal(decode_all(target, np.arange(19, 60)), held[19:].reshape(41, -1))


def test_full_load_refuses_run_headers_that_leave_the_frame():
    store, frames = runs_store()
    state = {key: np.array(array) for key, array in store.state_dict().items()}
    runs = np.flatnonzero((state["kinds"] == obs_comp.RUNS) & (state["params"] > 0))
    entry = int(runs[0])
    state["payload_start"][state["offsets"][entry]] = 255  # a skip past the frame's end (256 bytes)
    state["payload_start"][state["offsets"][entry] + 1] = 255
    with pytest.raises(ValueError, match=rf"params\[{entry}\]"):
        runs_store()[0].load_state_dict(state)


def test_half_load_refuses_inconsistent_counters():
    store = RawFrames(4, (8,))
    for i in range(6):
        store.append(np.full(8, i, np.uint8), episode_start=False)
    for counters in ([6, 7], [-1, 0], [6, 0, 0]):
        state = {**store.state_dict(), "counters": np.array(counters, dtype=np.int64)}
        with pytest.raises(ValueError, match="counters"):
            RawFrames(4, (8,)).load_state_dict(state)


@pytest.mark.parametrize("mode", ["half", "full"])
def test_decode_refuses_ids_it_does_not_hold_and_bad_out_arrays(mode):
    frames = similar_frames(np.random.default_rng(4), 30, (1, 8, 8), 0.2)
    store = make_frame_store(mode, 20, (1, 8, 8), 3, 10)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i == 0)
    store.release(13)  # holds 13..29: 10..12 released, 0..9 evicted
    for ids, first_bad in (([13, 29, 12], 2), ([9], 0), ([30], 0), ([15, -1], 1), ([2**62], 0),
                           (np.array([15, 2**63 + 5], np.uint64), 1)):
        with pytest.raises(ValueError, match=rf"ids\[{first_bad}\]"):
            store.decode(np.asarray(ids), np.empty((len(ids), 64), np.uint8))
    good = np.arange(13, 30)
    for out in (np.empty((16, 64), np.uint8), np.empty((17, 64), np.float32), np.empty((17, 65), np.uint8),
                np.empty((64, 17), np.uint8).T, np.empty((17, 1, 64), np.uint8)):
        with pytest.raises(ValueError, match="out must be"):
            store.decode(good, out)
    read_only = np.empty((17, 64), np.uint8)
    read_only.flags.writeable = False
    for ids, out in ((good.astype(np.float64), np.empty((17, 64), np.uint8)), (good, read_only)):
        with pytest.raises(ValueError):
            store.decode(ids, out)
    np.testing.assert_array_equal(decode_all(store, good), frames[good].reshape(17, -1))
    np.testing.assert_array_equal(decode_all(store, good.astype(np.int32)), frames[good].reshape(17, -1))


def test_concurrent_decodes_of_entropy_coded_frames_are_exact(rendered_floor_frames):
    # several threads sample one entropy-coded store (they share its scratch's decoder rows) while one appends
    import threading
    frames, starts = rendered_floor_frames
    store = DiffFrames(len(frames), frames.shape[1:], key_interval=4, anchor_interval=100)
    for frame, start in zip(frames[:20], starts[:20]):
        store.append(frame, episode_start=start)
    failures = []

    def read(seed):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            ids = rng.integers(0, store.count, 48)
            try:
                np.testing.assert_array_equal(decode_all(store, ids), frames[ids].reshape(len(ids), -1))
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                failures.append(error)
                return

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for reader in readers:
        reader.start()
    for frame, start in zip(frames[20:], starts[20:]):
        store.append(frame, episode_start=start)
    for reader in readers:
        reader.join()
    assert store.entropy_frames > 0 and not failures, failures[:1]
