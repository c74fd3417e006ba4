"""sb3_buffers against stable-baselines3's own buffers: the same add() calls and seed give byte-identical batches."""
import contextlib
import json
import mmap
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer

import sb3_buffers
from frame_stacks import follow_transition
from obs_comp import make_frame_store
from sb3_buffers import CompressedReplayBuffer, CompressedRolloutBuffer

N_ACTIONS = 4


class StackingEnvs:
    """n_envs frame streams stacked as SB3's VecFrameStack (zero padding) or FrameStackObservation ('repeat') do.

    Frames change a little from step to step. An episode ends (done) now and then: as a real reset
    (a new scene), as an episodic-life end (the frames go on, only the stack restarts) or as a
    TimeLimit time-out; infos carry the terminal stack as a VecEnv does. With `odd` > 0, some stacks
    are not what the wrappers make (random frames), as a wrapper the buffers do not know might.
    """

    def __init__(self, rng, n_envs, frame_stack, frame_shape, channels_last, padding, p_done=0.1, odd=0.0):
        self.rng, self.n_envs, self.frame_stack = rng, n_envs, frame_stack
        self.frame_shape, self.channels_last, self.padding = frame_shape, channels_last, padding
        self.p_done, self.odd = p_done, odd
        self.frames = [self._new_scene() for _ in range(n_envs)]
        self.stacks = [self._reset_stack(frame) for frame in self.frames]
        channels_axis = -1 if channels_last else 0
        shape = list(frame_shape)
        shape[channels_axis] *= frame_stack
        self.observation_space = spaces.Box(0, 255, tuple(shape), np.uint8)
        self.action_space = spaces.Discrete(N_ACTIONS)

    def _new_scene(self):
        return self.rng.integers(0, 256, self.frame_shape, dtype=np.uint8)

    def _next_frame(self, frame):
        if self.rng.random() < 0.3:
            return frame.copy()
        mask = self.rng.random(self.frame_shape) < 0.15
        return np.where(mask, self.rng.integers(0, 256, self.frame_shape, dtype=np.uint8), frame)

    def _reset_stack(self, frame):
        pad = frame if self.padding == "repeat" else np.zeros_like(frame)
        return [pad] * (self.frame_stack - 1) + [frame]

    def _odd_stack(self):
        return [self._new_scene() for _ in range(self.frame_stack)]

    def observe(self, stacks):
        return np.stack([np.concatenate(s, axis=-1 if self.channels_last else 0) for s in stacks])

    def step(self):
        """(new obs, obs to store as next_obs, dones, infos) for one step of every env."""
        next_stacks, dones, infos = [], np.zeros(self.n_envs, bool), []
        for e in range(self.n_envs):
            frame = self._next_frame(self.frames[e])
            stack = self.stacks[e][1:] + [frame]
            if self.rng.random() < self.odd:
                stack = self._odd_stack()
            info = {}
            if self.rng.random() < self.p_done:
                dones[e] = True
                info["terminal_observation"] = self.observe([stack])[0]
                if self.rng.random() < self.odd:
                    info["terminal_observation"] = self.observe([self._odd_stack()])[0]
                info["TimeLimit.truncated"] = bool(self.rng.random() < 0.3)
                if self.rng.random() < 0.5:  # real reset; otherwise an episodic-life end goes on playing
                    frame = self._new_scene()
                stack = self._reset_stack(frame)
            self.frames[e], self.stacks[e] = frame, stack
            infos.append(info)
        new_obs = self.observe(self.stacks)
        next_obs = new_obs.copy()
        for e in np.flatnonzero(dones):
            next_obs[e] = infos[e]["terminal_observation"]
        return new_obs, next_obs, dones, infos


class StrictStore:
    """A real frame store that fails a test when asked for a frame it was allowed to let go or no longer holds."""

    def __init__(self, store):
        self.store, self.capacity, self.released = store, store.capacity, 0

    nbytes = property(lambda self: self.store.nbytes)
    content_nbytes = property(lambda self: self.store.content_nbytes)
    count = property(lambda self: self.store.count)
    kernel_args = property(lambda self: self.store.kernel_args)  # kernels append to the store itself

    def append(self, frame, episode_start):
        return self.store.append(frame, episode_start)

    def release(self, before):
        assert before <= self.count
        self.released = max(self.released, before)
        self.store.release(before)

    def decode(self, ids, out):
        assert max(self.released, self.count - self.capacity) <= ids.min() and ids.max() < self.count
        self.store.decode(ids, out)


@contextlib.contextmanager
def strict_stores():
    """Buffers built inside get StrictStores; yields the list of them."""
    stores = []

    def make(*args, **kwargs):
        stores.append(StrictStore(make_frame_store(*args, **kwargs)))
        return stores[-1]

    with mock.patch.object(sb3_buffers, "make_frame_store", make):
        yield stores


def replay_transitions(envs, steps):
    """SB3's off-policy loop (_store_transition): add(last obs, next obs or terminal obs, action, reward, done, infos)."""
    obs = envs.observe(envs.stacks)
    for _ in range(steps):
        action = envs.rng.integers(0, N_ACTIONS, envs.n_envs)
        reward = envs.rng.normal(size=envs.n_envs).astype(np.float32)
        new_obs, next_obs, dones, infos = envs.step()
        yield obs, next_obs, action, reward, dones, infos
        obs = new_obs


def assert_same_samples(a, b):
    assert type(a) is type(b)
    for name, x, y in zip(a._fields, a, b):
        if x is None:
            assert y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, name
        assert torch.equal(x, y), name


def assert_same_replay_samples(ref, ours, seed, batch_size):
    np.random.seed(seed)
    want = ref.sample(batch_size)
    state = np.random.get_state()
    np.random.seed(seed)
    got = ours.sample(batch_size)
    assert_same_samples(want, got)
    after = np.random.get_state()  # the same draws from numpy's global RNG
    assert after[2] == state[2] and np.array_equal(after[1], state[1])


def make_replay_pair(envs, buffer_size, handle_timeout_termination=True, **kwargs):
    args = (buffer_size, envs.observation_space, envs.action_space)
    ref = ReplayBuffer(*args, device="cpu", n_envs=envs.n_envs, handle_timeout_termination=handle_timeout_termination)
    ours = CompressedReplayBuffer(*args, device="cpu", n_envs=envs.n_envs,
                                  handle_timeout_termination=handle_timeout_termination,
                                  frame_stack=envs.frame_stack, **kwargs)
    return ref, ours


def filled_replay_pair(envs, buffer_size, steps):
    """make_replay_pair's buffers, both given the same `steps` transitions of envs."""
    ref, ours = make_replay_pair(envs, buffer_size)
    for transition in replay_transitions(envs, steps):
        ref.add(*transition)
        ours.add(*transition)
    return ref, ours


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), n_envs=st.integers(1, 3), frame_stack=st.integers(1, 4),
       channels=st.sampled_from([1, 2]), channels_last=st.booleans(), padding=st.sampled_from(["zeros", "repeat"]),
       buffer_size=st.integers(1, 24), steps=st.integers(1, 90), p_done=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       odd=st.sampled_from([0.0, 0.0, 0.1]), handle_timeout_termination=st.booleans(),
       compression=st.sampled_from(["half", "full"]), key_interval=st.integers(1, 4),
       anchor_interval=st.integers(1, 9))
def test_replay_samples_equal_sb3s(seed, n_envs, frame_stack, channels, channels_last, padding, buffer_size, steps,
                                   p_done, odd, handle_timeout_termination, compression, key_interval,
                                   anchor_interval):
    frame_shape = (5, 4, channels) if channels_last else (channels, 5, 4)
    envs = StackingEnvs(np.random.default_rng(seed), n_envs, frame_stack, frame_shape, channels_last, padding,
                        p_done, odd)
    with strict_stores() as stores:
        ref, ours = make_replay_pair(envs, buffer_size * n_envs, handle_timeout_termination, compression=compression,
                                     channels_last=channels_last, key_interval=key_interval,
                                     anchor_interval=anchor_interval)
    for t, transition in enumerate(replay_transitions(envs, steps)):
        ref.add(*transition)
        ours.add(*transition)
        assert (ours.pos, ours.full) == (ref.pos, ref.full)
        if t % 5 == 4 or t == steps - 1:
            assert_same_replay_samples(ref, ours, seed + t, batch_size=3 * buffer_size * n_envs)
    if odd == 0:  # every stack verified: none kept whole, and each store lets go of all but the stored steps' frames
        assert len(ours._streams.whole) == 0  # (those of the steps overwritten since the last release, every few steps)
        late = 2 * sb3_buffers._RELEASE_EVERY if steps > buffer_size else 0
        assert all(store.count - store.released <= 2 * buffer_size + frame_stack + late for store in stores)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_envs=st.integers(1, 3), frame_stack=st.integers(1, 4),
       channels_last=st.booleans(), padding=st.sampled_from(["zeros", "repeat"]), n_steps=st.integers(1, 12),
       rollouts=st.integers(1, 4), batch_size=st.sampled_from([None, 1, 5, 16]),
       p_done=st.sampled_from([0.0, 0.1, 0.5]), odd=st.sampled_from([0.0, 0.1]),
       compression=st.sampled_from(["half", "full"]))
def test_rollout_batches_equal_sb3s(seed, n_envs, frame_stack, channels_last, padding, n_steps, rollouts, batch_size,
                                    p_done, odd, compression):
    rng = np.random.default_rng(seed)
    frame_shape = (4, 3, 1) if channels_last else (1, 4, 3)
    envs = StackingEnvs(rng, n_envs, frame_stack, frame_shape, channels_last, padding, p_done, odd)
    args = (n_steps, envs.observation_space, envs.action_space)
    ref = RolloutBuffer(*args, device="cpu", gae_lambda=0.95, gamma=0.99, n_envs=n_envs)
    with strict_stores() as stores:
        ours = CompressedRolloutBuffer(*args, device="cpu", gae_lambda=0.95, gamma=0.99, n_envs=n_envs,
                                       compression=compression, frame_stack=frame_stack,
                                       channels_last=channels_last, anchor_interval=3)
    obs, episode_starts = envs.observe(envs.stacks), np.ones(n_envs, bool)
    for r in range(rollouts):
        ref.reset()
        ours.reset()
        for _ in range(n_steps):  # as OnPolicyAlgorithm.collect_rollouts
            action = rng.integers(0, N_ACTIONS, (n_envs, 1))
            reward = rng.normal(size=n_envs).astype(np.float32)
            value = torch.as_tensor(rng.normal(size=(n_envs, 1)), dtype=torch.float32)
            log_prob = torch.as_tensor(rng.normal(size=n_envs), dtype=torch.float32)
            for buf in (ref, ours):
                buf.add(obs, action, reward, episode_starts, value, log_prob)
            obs, _, episode_starts, _ = envs.step()
        last_values = torch.as_tensor(rng.normal(size=(n_envs, 1)), dtype=torch.float32)
        for buf in (ref, ours):
            buf.compute_returns_and_advantage(last_values, episode_starts)
        for epoch in range(2):
            np.random.seed(seed + r + epoch)
            want = list(ref.get(batch_size))
            np.random.seed(seed + r + epoch)
            got = list(ours.get(batch_size))
            assert len(want) == len(got)
            for a, b in zip(want, got):
                assert_same_samples(a, b)
    if odd == 0:  # a store holds at most the last rollout's frames and the stack before it
        assert all(store.count - store.released <= n_steps + frame_stack for store in stores)


def rollouts_measured(seed, p_done, rollouts, measure, **kwargs):
    """measure(buffer) after each of `rollouts` rollouts of 2 envs x 16 steps of 24x24 frames into one buffer."""
    n_envs, n_steps = 2, 16
    envs = StackingEnvs(np.random.default_rng(seed), n_envs, 4, (1, 24, 24), False, "zeros", p_done=p_done)
    buffer = CompressedRolloutBuffer(n_steps, envs.observation_space, envs.action_space, device="cpu",
                                     n_envs=n_envs, **kwargs)
    obs, measured = envs.observe(envs.stacks), []
    for _ in range(rollouts):
        buffer.reset()
        for _ in range(n_steps):
            buffer.add(obs, np.zeros((n_envs, 1)), np.zeros(n_envs, np.float32), np.zeros(n_envs, np.float32),
                       torch.zeros(n_envs, 1), torch.zeros(n_envs))
            obs = envs.step()[0]
        measured.append(measure(buffer))
    return measured


def test_rollouts_do_not_keep_earlier_rollouts_frames():
    # Anchors far apart: a stack continued into the next rollout would keep its whole chain of
    # references resident (back to its anchor), unless the rollout restarts the stream.
    payload = rollouts_measured(0, 0.0, 6, lambda buffer: sum(store.payload_bytes for store in buffer._streams.stores),
                                compression="full", anchor_interval=1000)
    assert max(payload[1:]) <= 2 * (16 + 4) * 24 * 24  # per env, one rollout and the stack it continues
    assert max(payload[1:]) < 2 * min(payload)


@pytest.mark.parametrize("compression", ["half", "full"])
def test_rollouts_hand_back_every_page_of_earlier_rollouts(compression):
    # A rollout's frames are far fewer than a release chunk: every page the last rollout wrote must still go back.
    resident = rollouts_measured(1, 0.1, 8, lambda buffer: buffer._streams.content_nbytes, compression=compression)
    # per env: at most this rollout's frames and the stack it continued, their index entries, a page at either end
    assert max(resident) <= 2 * ((16 + 4) * (24 * 24 + 17) + 2 * mmap.PAGESIZE), resident


def test_samples_of_steps_whose_stack_did_not_change_do_not_share_memory():
    # next_obs equal to obs (not shifted) reuses obs's code: the two tensors must still be independent, as SB3's are
    rng = np.random.default_rng(6)
    space = spaces.Box(0, 255, (4, 6, 6), np.uint8)
    ref = ReplayBuffer(8, space, spaces.Discrete(N_ACTIONS), device="cpu")
    ours = CompressedReplayBuffer(8, space, spaces.Discrete(N_ACTIONS), device="cpu")
    for step in range(5):
        obs = np.zeros((1, 4, 6, 6), np.uint8)  # a reset stack (stored as its one frame), then the same stack again
        obs[0, -1] = rng.integers(1, 256, (6, 6))
        for buffer in (ref, ours):
            buffer.add(obs, obs.copy(), np.array([step % N_ACTIONS]), np.zeros(1, np.float32), np.zeros(1), [{}])
    assert np.array_equal(ours.observations[:5], ours.next_observations[:5])
    for batch_size in (0, 1, 3):
        assert_same_replay_samples(ref, ours, batch_size, batch_size)
        np.random.seed(batch_size)
        got = ours.sample(batch_size)
        got.observations.add_(1)
        np.random.seed(batch_size)
        assert torch.equal(got.next_observations, ref.sample(batch_size).next_observations)


def test_sampled_observations_are_not_tied_to_the_buffer():
    # Samples hand their decoded arrays to torch without a copy: changing one batch must change nothing stored.
    envs = StackingEnvs(np.random.default_rng(5), 1, 4, (1, 8, 8), False, "zeros", p_done=0.1)
    ref, ours = filled_replay_pair(envs, 40, 60)
    for seed in range(3):
        np.random.seed(seed)
        batch = ours.sample(16)
        batch.observations.add_(1)
        batch.next_observations.zero_()
        assert_same_replay_samples(ref, ours, seed, 16)


def atari_envs(wrapping, n_envs=2, seed=0):
    """Breakout with SB3's Atari wrappers, frames stacked as named."""
    import ale_py
    from stable_baselines3.common.atari_wrappers import AtariWrapper
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack, VecTransposeImage

    gym.register_envs(ale_py)
    if wrapping == "FrameStackObservation":  # gymnasium's stacking: a new leading axis, the reset frame repeated
        def wrapper(env):
            env = gym.wrappers.ReshapeObservation(AtariWrapper(env), (84, 84))
            return gym.wrappers.FrameStackObservation(env, 4, padding_type="reset")
        return make_vec_env("BreakoutNoFrameskip-v4", n_envs=n_envs, seed=seed, wrapper_class=wrapper)
    venv = VecFrameStack(make_atari_env("BreakoutNoFrameskip-v4", n_envs=n_envs, seed=seed), 4)
    return VecTransposeImage(venv) if wrapping == "VecFrameStack+VecTransposeImage" else venv


def atari_transitions(venv, steps, seed=0):
    """add() arguments from a random policy, built as OffPolicyAlgorithm._store_transition builds them."""
    rng = np.random.default_rng(seed)
    obs = venv.reset()
    for _ in range(steps):
        action = rng.integers(0, venv.action_space.n, venv.num_envs)
        new_obs, reward, dones, infos = venv.step(action)
        next_obs = new_obs.copy()
        for e in np.flatnonzero(dones):
            next_obs[e] = infos[e]["terminal_observation"]
        yield obs, next_obs, action, reward, dones, infos
        obs = new_obs


@pytest.mark.parametrize("wrapping", ["VecFrameStack", "VecFrameStack+VecTransposeImage", "FrameStackObservation"])
def test_real_atari_rollout_samples_equal_sb3s(wrapping):
    venv = atari_envs(wrapping)
    ref, ours = (cls(300, venv.observation_space, venv.action_space, device="cpu", n_envs=venv.num_envs,
                     **kwargs) for cls, kwargs in ((ReplayBuffer, {}), (CompressedReplayBuffer, {})))
    lives_lost = 0
    for t, transition in enumerate(atari_transitions(venv, 400)):
        ref.add(*transition)
        ours.add(*transition)
        lives_lost += int(transition[4].sum())
        if t % 50 == 49:
            assert_same_replay_samples(ref, ours, t, batch_size=64)
    venv.close()
    assert lives_lost > 0 and ours.full  # episodic-life dones happened and the ring wrapped
    assert len(ours._streams.whole) == 0  # every stack verified
    assert ours.nbytes < ref.observations.nbytes / 10


@pytest.mark.parametrize("compression", ["half", "full"])
def test_pickle_round_trip_keeps_samples(compression, tmp_path):
    from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl

    envs = StackingEnvs(np.random.default_rng(0), 2, 4, (1, 6, 6), False, "zeros", p_done=0.1, odd=0.05)
    ref, ours = make_replay_pair(envs, 40, compression=compression)
    transitions = list(replay_transitions(envs, 60))
    for transition in transitions[:50]:
        ref.add(*transition)
        ours.add(*transition)
    save_to_pkl(tmp_path / "buffer.pkl", ours)  # what model.save_replay_buffer does
    loaded = load_from_pkl(tmp_path / "buffer.pkl")
    assert isinstance(loaded, CompressedReplayBuffer) and loaded.nbytes <= ours.nbytes  # loading compacts
    for transition in transitions[50:]:  # it continues where it left off
        ref.add(*transition)
        loaded.add(*transition)
    assert_same_replay_samples(ref, loaded, 0, batch_size=100)
    assert pickle.loads(pickle.dumps(ours)).size() == ours.size()
    if compression == "full":  # the envs' stores still share one set of work rows
        streams = loaded._streams
        assert all(store._scratch is streams.scratch for store in streams.stores)


def bad_inputs(envs):
    obs, next_obs, action, reward, done, infos = next(replay_transitions(envs, 1))
    yield "obs has shape", (obs[:1], next_obs, action, reward, done, infos)
    yield "next_obs has shape .* and dtype float32", (obs, next_obs.astype(np.float32), action, reward, done, infos)
    yield "obs has shape", (obs[..., :-1], next_obs, action, reward, done, infos)
    yield "action has shape", (obs, next_obs, action[:1], reward, done, infos)
    yield "reward has shape", (obs, next_obs, action, np.zeros(5), done, infos)
    yield "done has shape", (obs, next_obs, action, reward, done[:, None, None], infos)
    yield "infos must be a list", (obs, next_obs, action, reward, done, infos[:1])
    # right sizes, but SB3's own add() would fail on them after our frames were stored
    yield "action cannot be stored.*AttributeError", (obs, next_obs, list(action), reward, done, infos)
    yield "reward cannot be stored.*ValueError", (obs, next_obs, action, np.array(["a", "b"]), done, infos)
    yield "done cannot be stored.*TypeError", (obs, next_obs, action, reward, infos, infos)  # swapped arguments
    yield "infos cannot be stored.*AttributeError", (obs, next_obs, action, reward, done, [None] * len(infos))
    flags = [{"TimeLimit.truncated": np.array([True, False])}] * len(infos)  # not one flag per env
    yield "infos cannot be stored.*ValueError", (obs, next_obs, action, reward, done, flags)


def test_bad_add_raises_and_leaves_replay_unchanged():
    envs = StackingEnvs(np.random.default_rng(2), 2, 3, (1, 5, 5), False, "zeros", p_done=0.2, odd=0.05)
    ref, ours = filled_replay_pair(envs, 10, 15)
    before = pickle.dumps(ours)
    for message, args in bad_inputs(envs):
        with pytest.raises(ValueError, match=message):
            ours.add(*args)
        assert pickle.dumps(ours) == before
    assert_same_replay_samples(ref, ours, 1, batch_size=30)


def assert_same_stored_observations(ref, ours):
    n = ref.buffer_size if ref.full else ref.pos
    for name in ("observations", "next_observations"):
        want = getattr(ref, name)[:n]
        np.testing.assert_array_equal(ours._streams.decode(getattr(ours, name)[:n]).reshape(want.shape), want)


def failing_on_second_env():
    """Patches _store_transition to store env 0's stacks, then raise (say, out of memory) with env 1's compared."""
    store_transition = sb3_buffers._store_transition

    def fail(latest, obs, next_obs, state, env, *store):
        if env == 0:
            return store_transition(latest, obs, next_obs, state, env, *store)
        follow_transition(latest[env], obs[env], next_obs[env], state[env]["newest"] >= 0)
        raise MemoryError

    return mock.patch.object(sb3_buffers, "_store_transition", fail)


def random_transitions(rng, n_envs, frame_shape, steps):
    """Transitions whose obs and next_obs are fresh frames (frame_stack 1): two new frames per env and step."""
    for _ in range(steps):
        obs, next_obs = rng.integers(0, 256, (2, n_envs, *frame_shape), dtype=np.uint8)
        yield obs, next_obs, np.zeros(n_envs, np.int64), np.zeros(n_envs, np.float32), np.zeros(n_envs), \
            [{} for _ in range(n_envs)]


@pytest.mark.parametrize("compression", ["half", "full"])
@pytest.mark.parametrize("case", ["newest stacks", "whole stacks", "ring room"])
def test_replay_stays_exact_after_an_add_failed_midway(compression, case):
    # An add that fails part-way (after some frames were stored) must leave no newest stack whose frames
    # were not stored to compare the next add against, the stacks the overwritten slot kept whole in use,
    # and room in each store's ring for every stored step's frames.
    rng = np.random.default_rng(4)
    if case == "ring room":  # the tightest ring: two new frames per env and step, frame_stack 1
        space = spaces.Box(0, 255, (1, 4, 4), np.uint8)
        ref, ours = (cls(8, space, spaces.Discrete(2), device="cpu", n_envs=2, **kwargs) for cls, kwargs in
                     ((ReplayBuffer, {}), (CompressedReplayBuffer, dict(compression=compression, frame_stack=1,
                                                                           anchor_interval=1))))
        transitions, fail_at, failing = random_transitions(rng, 2, (1, 4, 4), 14), 10, failing_on_second_env()
    else:
        envs = StackingEnvs(rng, *((2, 3, (1, 5, 5), False, "zeros", 0.1) if case == "newest stacks" else
                                   (1, 3, (1, 5, 5), False, "zeros", 0.1, 0.5)))
        ref, ours = make_replay_pair(envs, 40 if case == "newest stacks" else 8, compression=compression)
        transitions, fail_at = replay_transitions(envs, 40), 10 if case == "newest stacks" else 20
        # the overwritten slot holds stacks kept whole; growing the pool of whole stacks fails
        failing = failing_on_second_env() if case == "newest stacks" else \
            mock.patch.object(sb3_buffers.FrameStreams, "_keep_whole", side_effect=MemoryError)
    for t, transition in enumerate(transitions):
        if t == fail_at:
            with failing, pytest.raises(MemoryError):
                ours.add(*transition)
            continue
        ref.add(*transition)
        ours.add(*transition)
        n = ref.buffer_size if ref.full else ref.pos
        for name in ("observations", "next_observations"):
            want = getattr(ref, name)[:n]
            np.testing.assert_array_equal(ours._streams.decode(getattr(ours, name)[:n]).reshape(want.shape), want)
    assert_same_replay_samples(ref, ours, 5, batch_size=30)


class ScrollingEnvs(StackingEnvs):
    """StackingEnvs whose frames change by a few levels in most pixels, as under a scrolling floor: they pack."""

    def _next_frame(self, frame):
        steps = self.rng.integers(-2, 3, self.frame_shape)
        return np.clip(frame.astype(np.int16) + steps, 0, 255).astype(np.uint8)


def test_replay_stays_exact_with_packed_frames():
    # small changes everywhere make byte runs large: full's stores pack the residuals of these frames
    envs = ScrollingEnvs(np.random.default_rng(5), 2, 4, (1, 64, 64), False, "zeros", p_done=0.2)
    ref, ours = make_replay_pair(envs, 16, entropy=True)
    for t, transition in enumerate(replay_transitions(envs, 200)):
        ref.add(*transition)
        ours.add(*transition)
        if t % 10 == 9:
            assert_same_replay_samples(ref, ours, t, batch_size=40)
    assert all(store.entropy_frames > 0 for store in ours._streams.stores)


def test_bad_rollout_add_raises_and_leaves_buffer_unchanged():
    envs = StackingEnvs(np.random.default_rng(3), 2, 4, (1, 5, 5), False, "zeros")
    ours = CompressedRolloutBuffer(2, envs.observation_space, envs.action_space, device="cpu", n_envs=2)
    obs = envs.observe(envs.stacks)
    good = (np.zeros((2, 1)), np.zeros(2, np.float32), np.ones(2), torch.zeros(2, 1), torch.zeros(2))
    ours.add(obs, *good)
    before = pickle.dumps(ours)
    with pytest.raises(ValueError, match="obs has shape"):
        ours.add(obs.astype(np.int16), *good)
    with pytest.raises(ValueError, match="value has shape"):
        ours.add(obs, *good[:3], torch.zeros(3), good[4])
    # right sizes, but SB3's own add() would fail on them after our frames were stored
    with pytest.raises(ValueError, match="value cannot be stored.*AttributeError"):
        ours.add(obs, *good[:3], np.zeros((2, 1)), good[4])
    with pytest.raises(ValueError, match="log_prob cannot be stored"):
        ours.add(obs, *good[:4], torch.zeros(2, 1))
    with pytest.raises(ValueError, match="action cannot be stored"):
        ours.add(obs, [[0], [0]], *good[1:])
    assert pickle.dumps(ours) == before
    ours.add(obs, *good)
    with pytest.raises(ValueError, match="already holds 2 steps"):
        ours.add(obs, *good)


@pytest.mark.parametrize("space, message", [
    (spaces.Box(0, 1, (4, 8, 8), np.float32), "uint8 image observations"),
    (spaces.Box(0, 255, (16,), np.uint8), "uint8 image observations"),
    (spaces.Dict({"image": spaces.Box(0, 255, (4, 8, 8), np.uint8)}), "Dict"),
    (spaces.Box(0, 255, (3, 8, 7), np.uint8), "frame_stack=4 does not divide"),
])
@pytest.mark.parametrize("cls", [CompressedReplayBuffer, CompressedRolloutBuffer])
def test_unsupported_spaces_are_named_at_construction(cls, space, message):
    with pytest.raises(ValueError, match=message):
        cls(10, space, spaces.Discrete(2), device="cpu")


def test_replay_rejects_optimize_memory_usage_and_unknown_compression():
    space = spaces.Box(0, 255, (4, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        CompressedReplayBuffer(10, space, spaces.Discrete(2), optimize_memory_usage=True,
                               handle_timeout_termination=False)
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        CompressedReplayBuffer(10, space, spaces.Discrete(2), compression="zip")


def test_large_buffer_allocates_no_observation_arrays():
    """SB3 would allocate (and warn about) 2 x 1M x 28 KB; ours holds codes and frames as they come."""
    space = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf = CompressedReplayBuffer(1_000_000, space, spaces.Discrete(4), device="cpu")
    assert buf.observations.shape == (1_000_000, 1, 1) and buf.observations.dtype == np.int64
    assert buf.nbytes < 100 * 1_000_000


class ScalingNormalizer:
    """Stands in for VecNormalize: sample(batch, env) normalizes observations and rewards through it."""

    def normalize_obs(self, obs):
        return obs.astype(np.float32) / 255.0 - 0.5

    def normalize_reward(self, reward):
        return reward * 3.0


def test_samples_normalized_by_an_env_equal_sb3s():
    envs = StackingEnvs(np.random.default_rng(4), 2, 4, (1, 6, 6), False, "zeros", p_done=0.1)
    ref, ours = filled_replay_pair(envs, 30, 50)
    np.random.seed(7)
    want = ref.sample(40, env=ScalingNormalizer())
    np.random.seed(7)
    got = ours.sample(40, env=ScalingNormalizer())
    assert want.observations.dtype == torch.float32
    assert_same_samples(want, got)


@pytest.mark.parametrize("cls", [CompressedReplayBuffer, CompressedRolloutBuffer])
def test_frame_stack_below_one_is_refused(cls):
    with pytest.raises(ValueError, match="frame_stack must be >= 1"):
        cls(10, spaces.Box(0, 255, (4, 8, 8), np.uint8), spaces.Discrete(2), device="cpu", frame_stack=0)


@pytest.mark.parametrize("compression, name, value, message", [
    ("full", "kinds", 9, r"kinds\[\d+\]"), ("full", "offsets", -4, r"offsets\[\d+\]"),
    ("half", "counters", -1, "counters")])
def test_unpickling_validates_every_store_it_restores(compression, name, value, message):
    # load_replay_buffer unpickles: each frame store's __setstate__ loads, and checks, its saved state
    envs = StackingEnvs(np.random.default_rng(0), 2, 4, (1, 6, 6), False, "zeros", p_done=0.1, odd=0.05)
    _, ours = make_replay_pair(envs, 40, compression=compression)
    for transition in replay_transitions(envs, 50):
        ours.add(*transition)
    store_class = type(ours._streams.stores[1])
    getstate = store_class.__getstate__

    def damaged(store):
        pickled = getstate(store)
        if store is ours._streams.stores[1]:
            pickled["state"] = {key: np.array(array) for key, array in pickled["state"].items()}
            pickled["state"][name][len(pickled["state"][name]) // 2] = value
        return pickled

    with mock.patch.object(store_class, "__getstate__", damaged):
        data = pickle.dumps(ours)
    with pytest.raises(ValueError, match=message):
        pickle.loads(data)
    assert pickle.loads(pickle.dumps(ours)).size() == ours.size()


ROOT = Path(__file__).resolve().parents[1]
RSS_PROBE = """
import json, sys
import numpy as np, psutil
from gymnasium import spaces
from sb3_buffers import CompressedReplayBuffer
from tests.test_obs_comp import mapping_rss
n, space, rng = 8, spaces.Box(0, 255, (4, 84, 84), np.uint8), np.random.default_rng(0)
obs = np.repeat(rng.integers(0, 256, (n, 1, 84, 84), dtype=np.uint8), 4, axis=1)
args = dict(device="cpu", n_envs=n, compression=sys.argv[1])
CompressedReplayBuffer(100, space, spaces.Discrete(6), **args).add(obs, obs, np.zeros((n, 1)), np.zeros(n),
                                                                   np.zeros(n), [{}] * n)  # compiled, warm
before = psutil.Process().memory_info().rss
buffer = CompressedReplayBuffer(10_000_000, space, spaces.Discrete(6), **args)
for _ in range(200):
    next_obs = np.concatenate([obs[:, 1:], obs[:, 3:]], axis=1)
    changed = rng.random(next_obs[:, 3].shape) < 0.02
    next_obs[:, 3][changed] = rng.integers(0, 256, changed.sum())
    buffer.add(obs, next_obs, np.zeros((n, 1)), np.zeros(n), np.zeros(n), [{}] * n)
    obs = next_obs
growth = psutil.Process().memory_info().rss - before
sb3 = sum(mapping_rss(a) for a in vars(buffer).values() if isinstance(a, np.ndarray))  # SB3's own arrays
print(json.dumps(dict(growth=growth, sb3=sb3, frames=buffer._streams.nbytes)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS and mincore() as Linux reports them")
@pytest.mark.parametrize("compression", ["half", "full"])
def test_nbytes_of_a_large_little_used_buffer_is_its_resident_memory(compression):
    # 10M steps over 8 envs: index blocks of 42 MB per env, of which 200 steps use a few KB
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, compression], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.splitlines()[-1])
    frames_resident = measured["growth"] - measured["sb3"]  # everything else the buffer added
    assert abs(frames_resident - measured["frames"]) <= 2 * 2**20 + 0.1 * measured["frames"], measured
