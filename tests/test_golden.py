"""The stored bytes of fixed real frames do not change unless the format is meant to: digests of every array
a frame store saves, for DMC gray floor-free, DMC RGB + floor and Atari frames under several settings."""
import hashlib
import pathlib

import numpy as np
import pytest

from obs_comp import make_frame_store

FRAMES = np.load(pathlib.Path(__file__).parent / "data" / "golden_frames.npz")
# (stream, compression, capacity, key_interval, anchor_interval, options): defaults of each front end, and settings
# that force every representation, wraps and releases
CASES = {
    "gray-full": ("gray", "full", 64, 4, 100, {}),
    "gray-full-wrap": ("gray", "full", 9, 2, 10, {"min_entropy_saving": 0}),
    "rgb-full": ("rgb", "full", 64, 4, 100, {}),
    "rgb-full-runs": ("rgb", "full", 64, 4, 100, {"entropy": False}),
    "rgb-full-wrap": ("rgb", "full", 11, 3, 7, {"min_entropy_saving": 0}),
    "atari-full": ("atari", "full", 64, 3, 200, {"entropy": False}),
    "atari-full-wrap": ("atari", "full", 7, 3, 200, {"entropy": False}),
    "atari-half": ("atari", "half", 16, 3, 200, {}),
}
DIGESTS = {
    "atari-full": "338281428694000be906fc3e43cb5a2540dde20e733689e113de4b624cd2c173",
    "atari-full-wrap": "1a218434d98dc0e1f9464e46d855de90ae31c8504f8a6dd6e925b991f4b033cd",
    "atari-half": "c7824472feed9b04c1498a24d9cd0e6de41514d2604a93ed7513b3cdac32e610",
    "gray-full": "237d7c7289567cd8c27d6a0c66334b56973839a82b6bdade8df5f0dc8878ea7c",
    "gray-full-wrap": "7c1ca940afaa74b5110fbcefa994e83a9ba4d5963e4fd8588f701c3490fa2f39",
    "rgb-full": "1b0ed57ead640e94bcbb74325040bde6e2f93f504f8cfdd84ca3be4be85fd234",
    "rgb-full-runs": "2b36166104c4c809b23db17a02fa2f33aa84826b7ab9d0b64a6f83256fb7e3c3",
    "rgb-full-wrap": "a02483f48ecb54c8c34e1fef4ba597fe30c0ee2adf4ffe03b0488631d3e6d285",
}


def stored_digest(stream: str, compression: str, capacity: int, key_interval: int, anchor_interval: int,
                  options: dict) -> str:
    """sha256 of every array the store's state_dict holds after the stream, with releases along the way."""
    frames, starts = FRAMES[stream], FRAMES[f"{stream}_starts"]
    store = make_frame_store(compression, capacity, frames.shape[1:], key_interval, anchor_interval, **options)
    digest = hashlib.sha256()
    for i, (frame, start) in enumerate(zip(frames, starts)):
        store.append(frame, episode_start=bool(start))
        if i % 13 == 12:
            store.release(i - capacity // 2)
    ids = np.arange(max(len(frames) - capacity // 2, 0), len(frames))
    out = np.empty((len(ids), frames[0].size), dtype=np.uint8)
    store.decode(ids, out)
    np.testing.assert_array_equal(out, frames[ids].reshape(len(ids), -1))
    for name, array in sorted(store.state_dict().items()):
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_bytes_match_the_committed_digests(case):
    assert stored_digest(*CASES[case]) == DIGESTS[case]
