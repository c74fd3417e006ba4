"""The in-RAM buffer against a naive reference that stores every stack raw and loops like upstream."""
import gc
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs import ExtendedTimeStep
from replay_buffer import Prefetcher, ReplayBuffer

FIRST, MID, LAST = 0, 1, 2


def time_step(step_type, obs, action, reward=0.0, discount=1.0):
    import dm_env
    return ExtendedTimeStep(step_type=dm_env.StepType(step_type), reward=np.float32(reward),
                            discount=np.float32(discount), observation=obs, action=action)


def make_episodes(rng, lengths, frame_stack, frame_shape, action_dim, close_last=True):
    """Time steps of episodes with DrQ-v2 frame stacking; frames change a little step to step."""
    steps = []
    frame = rng.integers(0, 256, frame_shape, dtype=np.uint8)
    for e, length in enumerate(lengths):
        stack = None
        for i in range(length):
            if rng.random() < 0.7:
                mask = rng.random(frame_shape) < 0.2
                frame = np.where(mask, rng.integers(0, 256, frame_shape, dtype=np.uint8), frame)
            stack = [frame] * frame_stack if i == 0 else stack[1:] + [frame]
            last = i == length - 1 and (close_last or e < len(lengths) - 1)
            kind = FIRST if i == 0 else (LAST if last else MID)
            action = np.zeros(action_dim, np.float32) if i == 0 else rng.uniform(-1, 1, action_dim).astype(np.float32)
            reward = 0.0 if i == 0 else rng.uniform(0, 1)
            discount = 1.0 if i == 0 else float(rng.choice([1.0, 1.0, 0.5, 0.0]))
            steps.append(time_step(kind, np.concatenate(stack, axis=0), action, reward, discount))
    return steps


class NaiveReplay:
    """Every observation stack stored whole; the buffer contract spelled out with plain loops."""

    def __init__(self, capacity, frame_stack, nstep, discount):
        self.capacity, self.frame_stack, self.nstep = capacity, frame_stack, nstep
        self.discount = np.float32(discount)
        self.steps = []  # (time_step, episode index, position in episode)

    def add(self, ts):
        if ts.first():
            episode, pos = (self.steps[-1][1] + 1 if self.steps else 0), 0
        else:
            episode, pos = self.steps[-1][1], self.steps[-1][2] + 1
        self.steps.append((ts, episode, pos))

    def valid_steps(self):
        total = len(self.steps)
        first_stored = max(total - self.capacity, 0)
        valid = []
        for t in range(first_stored, total - self.nstep + 1):
            _, episode, pos = self.steps[t]
            if pos == 0 or any(self.steps[t + i][1] != episode for i in range(self.nstep)):
                continue
            oldest_frame = max(t - self.frame_stack, t - pos)  # the stack of obs_{t-1} reaches back to it
            if oldest_frame >= first_stored:
                valid.append(t)
        return valid

    def transition(self, t):
        reward, discount = np.zeros(1, np.float32), np.ones(1, np.float32)
        for i in range(self.nstep):
            ts = self.steps[t + i][0]
            reward += discount * np.float32(ts.reward)
            discount *= np.float32(ts.discount) * self.discount
        return (self.steps[t - 1][0].observation, self.steps[t][0].action, reward, discount,
                self.steps[t + self.nstep - 1][0].observation)


def check_against_reference(buf, ref):
    valid = ref.valid_steps()
    assert buf.can_sample == bool(valid)
    if not valid:
        with pytest.raises(RuntimeError, match="no complete transition"):
            buf.sample()
        return
    stored = np.arange(max(len(ref.steps) - ref.capacity, 0), len(ref.steps))
    np.testing.assert_array_equal(stored[buf._valid(stored)], valid)
    got = buf._gather(np.array(valid))
    for j, t in enumerate(valid):
        for have, want in zip(got, ref.transition(t)):
            np.testing.assert_array_equal(have[j], want)
    # every sampled transition is one of the valid ones
    obs, action, reward, discount, next_obs = buf.sample()
    expected = {ref.transition(t)[0].tobytes() + ref.transition(t)[1].tobytes() + ref.transition(t)[4].tobytes()
                for t in valid}
    for j in range(len(obs)):
        assert obs[j].tobytes() + action[j].tobytes() + next_obs[j].tobytes() in expected


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), frame_stack=st.integers(1, 4), nstep=st.integers(1, 3),
       channels=st.sampled_from([1, 3]), lengths=st.lists(st.integers(1, 14), min_size=1, max_size=14),
       extra_capacity=st.integers(0, 30), compression=st.sampled_from(["half", "full"]),
       close_last=st.booleans(), anchor_interval=st.integers(1, 9))
def test_matches_naive_reference(seed, frame_stack, nstep, channels, lengths, extra_capacity, compression,
                                 close_last, anchor_interval):
    rng = np.random.default_rng(seed)
    frame_shape = (channels, 5, 7)
    capacity = frame_stack + nstep + extra_capacity
    buf = ReplayBuffer(obs_shape=(channels * frame_stack, 5, 7), action_shape=(2,), capacity=capacity,
                       frame_stack=frame_stack, nstep=nstep, discount=0.9, batch_size=8,
                       compression=compression, seed=seed, anchor_interval=anchor_interval)
    ref = NaiveReplay(capacity, frame_stack, nstep, 0.9)
    for i, ts in enumerate(make_episodes(rng, lengths, frame_stack, frame_shape, 2, close_last)):
        buf.add(ts)
        ref.add(ts)
        assert len(buf) == min(i + 1, capacity)
        if ts.last() or i % 7 == 0:
            check_against_reference(buf, ref)
    check_against_reference(buf, ref)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lengths=st.lists(st.integers(1, 20), min_size=1, max_size=10),
       capacity=st.integers(6, 40))
def test_half_and_full_sample_identical_batches(seed, lengths, capacity):
    steps = make_episodes(np.random.default_rng(seed), lengths, 3, (1, 6, 6), 3)
    bufs = [ReplayBuffer(obs_shape=(3, 6, 6), action_shape=(3,), capacity=capacity, frame_stack=3, nstep=3,
                         discount=0.99, batch_size=16, compression=mode, seed=seed) for mode in ("half", "full")]
    for ts in steps:
        for buf in bufs:
            buf.add(ts)
        if bufs[0].can_sample:
            for a, b in zip(bufs[0].sample(), next(iter(bufs[1]))):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_sampling_is_uniform_over_valid_transitions():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(obs_shape=(2, 4, 4), action_shape=(1,), capacity=60, frame_stack=2, nstep=2,
                       discount=0.99, batch_size=500, compression="full", seed=1)
    ref = NaiveReplay(60, 2, 2, 0.99)
    for ts in make_episodes(rng, [3, 9, 2, 30, 40], 2, (1, 4, 4), 1):  # wraps; includes too-short episodes
        buf.add(ts)
        ref.add(ts)
    valid = ref.valid_steps()
    action_of = {float(ref.steps[t][0].action[0]): t for t in valid}
    counts = dict.fromkeys(valid, 0)
    for _ in range(40):
        for a in buf.sample()[1][:, 0]:
            counts[action_of[float(a)]] += 1
    expected = 40 * 500 / len(valid)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert min(counts.values()) > 0
    assert chi2 < 2 * len(valid)  # chi-square with len(valid)-1 dof; a biased sampler lands far above


def test_episode_start_repeats_first_frame_in_stack():
    steps = make_episodes(np.random.default_rng(3), [6], 3, (1, 4, 4), 1)
    buf = ReplayBuffer(obs_shape=(3, 4, 4), action_shape=(1,), capacity=10, frame_stack=3, nstep=1,
                       discount=0.99, batch_size=4, compression="half", seed=0)
    for ts in steps:
        buf.add(ts)
    obs, action, reward, discount, next_obs = buf._gather(np.array([1]))
    first = steps[0].observation[-1]
    np.testing.assert_array_equal(obs[0], np.stack([first] * 3))
    np.testing.assert_array_equal(next_obs[0], steps[1].observation)


def _small_buffer(**overrides):
    kwargs = dict(obs_shape=(3, 4, 4), action_shape=(2,), capacity=8, frame_stack=3, nstep=2, discount=0.99,
                  batch_size=4, compression="full", seed=0)
    kwargs.update(overrides)
    return ReplayBuffer(**kwargs)


@pytest.mark.parametrize("overrides, message", [
    (dict(compression="zip"), "unknown compression"),
    (dict(capacity=4), "capacity 4 is smaller than frame_stack \\+ nstep"),
    (dict(obs_shape=(4, 4, 4)), "obs_shape"),
    (dict(frame_stack=0), "frame_stack"),
])
def test_bad_construction_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        _small_buffer(**overrides)


@pytest.mark.parametrize("compression", ["half", "full"])
def test_rejected_add_leaves_buffer_unchanged(compression):
    rng = np.random.default_rng(0)
    buf = _small_buffer(compression=compression)
    steps = make_episodes(rng, [5], 3, (1, 4, 4), 2, close_last=False)
    for ts in steps:
        buf.add(ts)
    good = steps[-1].observation
    shifted = np.concatenate([good[1:], good[-1:] + 1])
    bad = [
        (time_step(MID, good[:, :3], np.zeros(2, np.float32)), "observation has shape"),
        (time_step(MID, good.astype(np.float32), np.zeros(2, np.float32)), "dtype"),
        (time_step(MID, shifted, np.zeros(3, np.float32)), "action has shape"),
        (time_step(MID, rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), np.zeros(2, np.float32)), "shifted"),
        (time_step(FIRST, rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), np.zeros(2, np.float32)), "repeat"),
    ]
    before = (len(buf), buf.nbytes, buf._gather(np.arange(1, 4)))
    for ts, message in bad:
        with pytest.raises(ValueError, match=message):
            buf.add(ts)
    after = (len(buf), buf.nbytes, buf._gather(np.arange(1, 4)))
    assert before[:2] == after[:2]
    for a, b in zip(before[2], after[2]):
        np.testing.assert_array_equal(a, b)
    buf.add(time_step(MID, shifted, np.zeros(2, np.float32)))  # the correct next step is still accepted
    assert len(buf) == 6


def test_mid_step_after_last_is_rejected():
    buf = _small_buffer()
    for ts in make_episodes(np.random.default_rng(0), [3], 3, (1, 4, 4), 2):
        buf.add(ts)
    obs = buf._last_obs.copy()
    with pytest.raises(ValueError, match="without a first"):
        buf.add(time_step(MID, np.concatenate([obs[1:], obs[-1:]]), np.zeros(2, np.float32)))


def test_prefetch_yields_tensors_and_reraises_errors():
    buf = _small_buffer(batch_size=5)
    it = Prefetcher(buf, "cpu")
    with pytest.raises(RuntimeError, match="no complete transition"):
        next(it)
    it.close()
    for ts in make_episodes(np.random.default_rng(0), [6], 3, (1, 4, 4), 2):  # would block if the lock were kept
        buf.add(ts)
    it = Prefetcher(buf, "cpu")
    obs, action, reward, discount, next_obs = next(it)
    assert obs.shape == (5, 3, 4, 4) and obs.dtype.is_floating_point is False
    assert reward.shape == (5, 1) and action.shape == (5, 2)
    it.close()  # stops the background thread, which holds the buffer's lock while it samples
    assert not [t for t in threading.enumerate() if t.name.startswith("replay-prefetch") and t.is_alive()]


def _train_on(buf, prefetcher, steps, start=0, snapshot_at=None):
    """Add steps[start:] and draw a batch at every second step from the 4th on, like the trainer; the batches
    drawn and, at step snapshot_at, (copy of the buffer's state, drawn-ahead batch) as a snapshot holds them."""
    batches, saved = [], None
    for i, ts in enumerate(steps[start:], start):
        if i == snapshot_at:
            pending = prefetcher.state_dict()  # first, as the trainer does
            saved = ({k: np.array(v) for k, v in buf.state_dict().items()}, pending)
        if i >= 4 and i % 2 == 0:
            batches.append([x.numpy().copy() for x in next(prefetcher)])
        buf.add(ts)
    prefetcher.close()
    return batches, saved


@pytest.mark.parametrize("compression", ["half", "full"])
def test_prefetcher_restored_from_a_snapshot_hands_out_the_uninterrupted_runs_batches(compression):
    # 12-step episodes in a 20-step ring: the run overwrites steps after the snapshot too
    steps = make_episodes(np.random.default_rng(3), [12] * 8, 3, (1, 4, 4), 2)
    kwargs = dict(capacity=20, batch_size=6, compression=compression, seed=7)
    snapshot_at = 48  # an episode boundary, as in train.py; batches were drawn ahead before it
    buf = _small_buffer(**kwargs)
    uninterrupted, (state, pending) = _train_on(buf, Prefetcher(buf, "cpu"), steps, snapshot_at=snapshot_at)
    assert pending  # a batch was drawn ahead of what was used

    restored = _small_buffer(**kwargs)
    restored.load_state_dict(state)
    resumed, _ = _train_on(restored, Prefetcher(restored, "cpu", pending=pending), steps, start=snapshot_at)
    tail = uninterrupted[-len(resumed):]
    assert len(resumed) == len([i for i in range(snapshot_at, len(steps)) if i % 2 == 0])
    for got, want in zip(resumed, tail, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


NBYTES_SCRIPT = """
import gc, json, sys
import numpy as np, psutil
from tests.test_replay_buffer import FIRST, MID, _small_buffer, make_episodes, time_step
from replay_buffer import ReplayBuffer
compression = sys.argv[1]
# load numba's compiled kernels first: that is code, once per process, not buffer storage
warm_up = _small_buffer(compression=compression)
for ts in make_episodes(np.random.default_rng(0), [6], 3, (1, 4, 4), 2):
    warm_up.add(ts)
warm_up.sample()
# frames like a floor-free render: a fixed gradient with a moving body, so `full` compresses
size, capacity = 84, 6000
background = np.tile(np.linspace(30, 170, size).astype(np.uint8)[:, None], (1, size))
process = psutil.Process()
gc.collect()
rss_before = process.memory_info().rss
buf = ReplayBuffer(obs_shape=(3, size, size), action_shape=(6,), capacity=capacity, frame_stack=3,
                   nstep=3, discount=0.99, batch_size=8, compression=compression, seed=0)
action = np.zeros(6, np.float32)
stack = None
for i in range(capacity + 500):
    frame = background.copy()
    x = 10 + (i * 3) % 50
    frame[30:60, x:x + 20] = 120 + i % 100
    frame = frame[None]
    stack = [frame] * 3 if i % 500 == 0 else stack[1:] + [frame]
    buf.add(time_step(FIRST if i % 500 == 0 else MID, np.concatenate(stack), action))
gc.collect()
print(json.dumps([buf.nbytes, process.memory_info().rss - rss_before]))
"""


@pytest.mark.parametrize("compression", ["half", "full"])
def test_nbytes_matches_resident_memory_growth(compression):
    # a fresh process, so that memory other tests freed cannot hide or inflate the growth
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", NBYTES_SCRIPT, compression], cwd=root, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)})
    nbytes, growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(nbytes - growth) <= 0.1 * nbytes, (nbytes, growth)


@pytest.mark.parametrize("grayscale, floor", [(True, False), (False, False), (False, True)])
def test_lossless_on_rendered_walker(grayscale, floor):
    # floor-free frames (the paper's setting) and the standard benchmark's RGB with the checkerboard floor
    from envs import make
    env = make(name="walker_walk", frame_stack=3, action_repeat=2, seed=0, grayscale=grayscale, floor=floor)
    rng = np.random.default_rng(0)
    steps = []
    for episode_steps in (25, 20):
        ts = env.reset()
        steps.append(ts)
        for _ in range(episode_steps):
            ts = env.step(rng.uniform(-1, 1, env.action_spec().shape).astype(np.float32))
            steps.append(ts)
    obs_shape = env.observation_spec().shape
    capacity = 30  # wraps into the second episode
    ref = NaiveReplay(capacity, 3, 3, 0.99)
    bufs = {mode: ReplayBuffer(obs_shape=obs_shape, action_shape=(6,), capacity=capacity, frame_stack=3, nstep=3,
                               discount=0.99, batch_size=8, compression=mode, seed=0) for mode in ("half", "full")}
    for ts in steps:
        ref.add(ts)
        for buf in bufs.values():
            buf.add(ts)
    for buf in bufs.values():
        check_against_reference(buf, ref)
    if floor:  # the scrolling floor is what entropy-coded differences are for: they must be in play
        assert bufs["full"]._frames.entropy_frames > 0


def _through_npz(state):
    """state written and read back as .npz without pickle: fails unless it is plain numeric arrays."""
    stream = io.BytesIO()
    np.savez(stream, **state)
    stream.seek(0)
    with np.load(stream, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), frame_stack=st.integers(1, 3), nstep=st.integers(1, 3),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=10), extra_capacity=st.integers(0, 25),
       compression=st.sampled_from(["half", "full"]), anchor_interval=st.integers(1, 6), split=st.floats(0, 1))
def test_state_dict_round_trip_restores_contents_and_sampler(seed, frame_stack, nstep, lengths, extra_capacity,
                                                              compression, anchor_interval, split):
    steps = make_episodes(np.random.default_rng(seed), lengths, frame_stack, (1, 5, 4), 2, close_last=False)
    capacity = frame_stack + nstep + extra_capacity
    kwargs = dict(obs_shape=(frame_stack, 5, 4), action_shape=(2,), capacity=capacity, frame_stack=frame_stack,
                  nstep=nstep, discount=0.9, batch_size=8, compression=compression, anchor_interval=anchor_interval)
    original = ReplayBuffer(seed=seed, **kwargs)
    ref = NaiveReplay(capacity, frame_stack, nstep, 0.9)
    cut = int(split * len(steps))
    for ts in steps[:cut]:
        original.add(ts)
        ref.add(ts)
    # another seed: the sampler's state must come from the state dict
    restored = ReplayBuffer(seed=seed + 1, **kwargs)
    restored.load_state_dict(_through_npz(original.state_dict()))
    assert len(restored) == len(original)
    for buf in (original, restored):  # each draws one batch, so their generators stay in step
        check_against_reference(buf, ref)
    # both continue alike: same samples for the same adds (the mid-episode stack check included)
    for ts in steps[cut:] + [None]:
        if original.can_sample:
            for a, b in zip(original.sample(), restored.sample()):
                assert a.tobytes() == b.tobytes()
        if ts is not None:
            original.add(ts)
            restored.add(ts)


@pytest.mark.parametrize("compression", ["half", "full"])
def test_state_dict_shares_memory_and_bad_states_are_refused(compression):
    buf = _small_buffer(compression=compression)
    for ts in make_episodes(np.random.default_rng(0), [6], 3, (1, 4, 4), 2):
        buf.add(ts)
    state = buf.state_dict()
    assert np.shares_memory(state["action"], buf._action)  # a snapshot of GBs must not be copied first
    other = _small_buffer(compression=compression)
    before = other.state_dict()
    bad = [
        ({**state, "config": _small_buffer(capacity=9).state_dict()["config"]}, "configuration .*capacity.* 9"),
        ({key: value for key, value in state.items() if key != "reward"}, "lacks \\['reward'\\]"),
        ({**state, "action": state["action"][:, :1]}, "saved action has shape \\(6, 1\\)"),
        ({**state, "last_obs": state["last_obs"].astype(np.float32)}, "saved last_obs .* float32"),
    ]
    for broken, message in bad:
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(broken)
    after = other.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
