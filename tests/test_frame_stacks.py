"""frame_stacks: layouts, stack verification and stacks rebuilt from frame ids, against plain numpy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frame_stacks import (OTHER, RESET_REPEAT, RESET_ZEROS, SAME, SHIFTED, StackLayout, decode_stacks, follow_stacks,
                          follow_transition, reset_padding, same_bytes, shifted, stack_ids)
from obs_comp import make_frame_store


def stack(frames, channels_last):
    """Frames (each C,H,W or H,W,C) stacked the way frame-stacking wrappers do."""
    return np.concatenate(frames, axis=-1 if channels_last else 0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), frame_stack=st.integers(1, 5), channels=st.integers(1, 3),
       channels_last=st.booleans(), lead=st.integers(0, 3))
def test_frames_and_stacks_invert_each_other(seed, frame_stack, channels, channels_last, lead):
    rng = np.random.default_rng(seed)
    frame_shape = (5, 3, channels) if channels_last else (channels, 5, 3)
    frames = [rng.integers(0, 256, frame_shape, dtype=np.uint8) for _ in range(frame_stack)]
    obs = stack(frames, channels_last)
    layout = StackLayout(obs.shape, frame_stack, channels_last)
    assert layout.frame_shape == frame_shape
    split = layout.frames(obs)
    assert split.shape == (frame_stack, layout.frame_size)
    for k in range(frame_stack):
        np.testing.assert_array_equal(split[k], frames[k].reshape(-1))
    np.testing.assert_array_equal(layout.stacks(split), obs)
    batch = np.stack([obs] * lead) if lead else obs[None]
    np.testing.assert_array_equal(layout.stacks(layout.frames(batch)), batch)


def test_layout_rejects_a_stack_axis_frame_stack_does_not_divide():
    with pytest.raises(ValueError, match="frame_stack=4 does not divide the first axis"):
        StackLayout((3, 8, 8), 4)
    with pytest.raises(ValueError, match="last axis"):
        StackLayout((8, 8, 6), 4, channels_last=True)


def test_shift_and_padding_are_checked_byte_for_byte():
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.integers(1, 256, 12, dtype=np.uint8) for _ in range(4))
    previous = np.stack([a, b, c])
    assert shifted(previous, np.stack([b, c, d]))
    changed = c.copy()
    changed[7] ^= 1
    assert not shifted(previous, np.stack([b, changed, d]))
    assert reset_padding(np.stack([d, d, d])) == "repeat"
    assert reset_padding(np.stack([np.zeros_like(d), np.zeros_like(d), d])) == "zeros"
    assert reset_padding(np.zeros((3, 12), np.uint8)) == "repeat"  # both hold; either decodes the same
    assert reset_padding(np.stack([a, np.zeros_like(d), d])) is None
    assert reset_padding(d[None]) == "repeat"  # a single frame pads nothing
    assert same_bytes(a[:5], a[:5].copy()) and not same_bytes(a[:8], b[:8])


def plain_follow(previous, frames, has_previous, shift_first):
    """follow_stacks' kind of one stack (K, F) after another, in plain numpy."""
    same = np.array_equal(frames, previous)
    shift = np.array_equal(frames[:-1], previous[1:])
    order = [(shift, SHIFTED), (same, SAME)] if shift_first else [(same, SAME), (shift, SHIFTED)]
    order += [((frames[:-1] == frames[-1]).all(), RESET_REPEAT), (not frames[:-1].any(), RESET_ZEROS)]
    return next(kind for holds, kind in order[0 if has_previous else 2:] + [(True, OTHER)] if holds)


def related_stacks(rng, data, n, frame_stack, frame_size):
    """Stacks (n, K, F) and stacks after them that are often the same, shifted, reset stacks or one byte off."""
    previous = rng.integers(0, 3, (n, frame_stack, frame_size), dtype=np.uint8)  # few values: frames often repeat
    frames = np.empty_like(previous)
    for e in range(n):
        relation = data.draw(st.sampled_from(["same", "shifted", "constant", "repeat", "zeros", "other"]))
        if relation == "constant":  # every frame equal: both same and shifted
            previous[e] = frames[e] = previous[e, 0]
        elif relation == "shifted":
            frames[e] = np.concatenate([previous[e, 1:], rng.integers(0, 3, (1, frame_size), dtype=np.uint8)])
        elif relation in ("repeat", "zeros"):
            frames[e] = rng.integers(0, 3, frame_size, dtype=np.uint8) * (relation == "repeat")
            frames[e, -1] = rng.integers(0, 3, frame_size, dtype=np.uint8)
        else:
            frames[e] = previous[e]
        if relation == "other" or data.draw(st.booleans()):  # one byte anywhere may break the relation
            frames[e].reshape(-1)[rng.integers(frames[e].size)] ^= data.draw(st.sampled_from([0, 1]))
    return previous, frames


def at_offset(array, offset):
    """A copy of array starting `offset` bytes into a larger buffer (stacks may start at any byte)."""
    moved = np.empty(offset + array.size, np.uint8)[offset:].reshape(array.shape)
    moved[...] = array
    return moved


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), frame_stack=st.integers(1, 4),
       frame_size=st.sampled_from([1, 7, 8, 64, 100, 520]), shift_first=st.booleans(), data=st.data())
def test_follow_stacks_matches_plain_numpy(seed, n, frame_stack, frame_size, shift_first, data):
    previous, frames = related_stacks(np.random.default_rng(seed), data, n, frame_stack, frame_size)
    previous_code = np.array([data.draw(st.sampled_from([-1, 0, 5])) for _ in range(n)])
    has_previous = previous_code >= 0
    kinds = follow_stacks(previous, at_offset(frames, data.draw(st.sampled_from([0, 0, 3]))), previous_code,
                          shift_first)
    assert kinds.tolist() == [plain_follow(previous[e], frames[e], has_previous[e], shift_first) for e in range(n)]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), frame_stack=st.integers(1, 4),
       frame_size=st.sampled_from([1, 8, 64, 100]), data=st.data())
def test_follow_transition_is_obs_after_latest_then_next_obs_after_obs(seed, n, frame_stack, frame_size, data):
    rng = np.random.default_rng(seed)
    previous, obs = related_stacks(rng, data, n, frame_stack, frame_size)
    _, next_obs = related_stacks(rng, data, n, frame_stack, frame_size)
    for e in range(n):  # mostly the common case: next_obs continues obs
        if data.draw(st.booleans()):
            next_obs[e] = np.concatenate([obs[e, 1:], rng.integers(0, 3, (1, frame_size), dtype=np.uint8)])
    previous_code = np.array([data.draw(st.sampled_from([-1, 0, 5])) for _ in range(n)])
    has_previous = previous_code >= 0
    offset = data.draw(st.sampled_from([0, 0, 5]))
    latest, moved = previous.copy(), at_offset(obs, offset)
    for e in range(n):
        obs_kind, next_kind = follow_transition(latest[e], moved[e], next_obs[e], has_previous[e])
        assert obs_kind == plain_follow(previous[e], obs[e], has_previous[e], False)
        assert next_kind == plain_follow(obs[e], next_obs[e], obs_kind != OTHER, True)
    np.testing.assert_array_equal(latest, next_obs)  # the newest stacks now


@pytest.mark.parametrize("compression", ["half", "full"])
def test_decode_stacks_pads_with_first_frame_or_zeros(compression):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (30, 10), dtype=np.uint8)
    store = make_frame_store(compression, 30, (10,), key_interval=2, anchor_interval=5)
    for i, frame in enumerate(frames):
        store.append(frame, episode_start=i in (0, 12))
    newest = np.array([12, 13, 20, 5, 14])
    first = np.array([12, 12, 12, 0, 12])
    zero_padded = np.array([True, False, True, False, True])
    out = np.empty((5, 4, 10), np.uint8)
    decode_stacks(store, newest, first, out, zero_padded)
    ids = stack_ids(newest, first, 4)
    for m in range(5):
        for k in range(4):
            padding = newest[m] - (3 - k) < first[m]
            want = 0 if padding and zero_padded[m] else frames[ids[m, k]]
            np.testing.assert_array_equal(out[m, k], want)
