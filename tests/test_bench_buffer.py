"""bench/buffer.py's size model: it must size the stored format exactly as obs_comp stores it."""
import numpy as np
import pytest

from bench import buffer as bench
from obs_comp import DiffFrames
from tests.test_obs_comp import moving_blob_frames


@pytest.mark.parametrize("key_interval,anchor_interval", [(1, 1), (3, 3), (4, 100), (6, 25), (12, 50)])
def test_bytes_model_equals_store_payload(key_interval, anchor_interval):
    frames = moving_blob_frames(300).reshape(300, -1)
    frames[::37] = 255 - frames[::37]  # frames that differ everywhere: raw fallback
    frames[5:9] = 0                    # all-black frames, identical in a row: empty payloads
    first = np.zeros(len(frames), dtype=bool)
    first[[0, 120, 121, 200]] = True
    store = DiffFrames(len(frames), (frames.shape[1],), key_interval, anchor_interval, entropy=False)
    for frame, start in zip(frames, first):
        store.append(frame, episode_start=bool(start))
    model = bench.model_payload(frames, first, "bytes", key_interval, anchor_interval, "raw", {})
    assert model * len(frames) == pytest.approx(store.payload_bytes, abs=1e-6)


def test_references_follow_anchor_and_key_intervals():
    first = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0, 0], dtype=bool)
    ref, anchor = bench.references(first, key_interval=2, anchor_interval=5)
    np.testing.assert_array_equal(ref, [0, 0, 0, 2, 0, 5, 5, 7, 7, 7])
    np.testing.assert_array_equal(anchor, [1, 0, 0, 0, 0, 1, 0, 1, 0, 0])


def test_format_sizes_order_on_moving_body():
    frames = moving_blob_frames(2).reshape(2, -1)
    sizes = {fmt: size(frames[1], frames[0]) for fmt, size in bench.FORMATS.items()}
    changed = int(np.count_nonzero(frames[1] != frames[0]))
    assert sizes["paper"] == 4 * changed and sizes["pos3"] == 3 * changed
    assert changed < sizes["bytes"] < sizes["words"] < sizes["pos3"]
