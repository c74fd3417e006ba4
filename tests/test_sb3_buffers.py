"""sb3_buffers against stable-baselines3's own buffers: the same add() calls and seed give byte-identical batches."""
import contextlib
import copy
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
from stable_baselines3.common.buffers import (DictReplayBuffer, DictRolloutBuffer, NStepReplayBuffer, ReplayBuffer,
                                              RolloutBuffer)

import sb3_buffers
from frame_stacks import follow_transition
from obs_comp import make_frame_store
from sb3_buffers import (CompressedDictReplayBuffer, CompressedDictRolloutBuffer, CompressedNStepReplayBuffer,
                         CompressedReplayBuffer, CompressedRolloutBuffer)

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

    def step(self, events=None):
        """(new obs, obs to store as next_obs, dones, infos) for one step of every env; `events` (episode_events)
        decide the episode ends where given (several streams of one env end together)."""
        dones, infos = np.zeros(self.n_envs, bool), []
        for e in range(self.n_envs):
            frame = self._next_frame(self.frames[e])
            stack = self.stacks[e][1:] + [frame]
            if self.rng.random() < self.odd:
                stack = self._odd_stack()
            info = {}
            if events[e][0] if events else self.rng.random() < self.p_done:
                dones[e] = True
                info["terminal_observation"] = self.observe([stack])[0]
                if self.rng.random() < self.odd:
                    info["terminal_observation"] = self.observe([self._odd_stack()])[0]
                info["TimeLimit.truncated"] = bool(events[e][1] if events else self.rng.random() < 0.3)
                # real reset; otherwise an episodic-life end goes on playing
                if events[e][2] if events else self.rng.random() < 0.5:
                    frame = self._new_scene()
                stack = self._reset_stack(frame)
            self.frames[e], self.stacks[e] = frame, stack
            infos.append(info)
        new_obs = self.observe(self.stacks)
        next_obs = new_obs.copy()
        for e in np.flatnonzero(dones):
            next_obs[e] = infos[e]["terminal_observation"]
        return new_obs, next_obs, dones, infos


def episode_events(rng, n_envs, p_done):
    """Per env: whether its episode ends, is timed out and really resets (StackingEnvs.step)."""
    return [(done, rng.random() < 0.3, rng.random() < 0.5) if done else (False, False, False)
            for done in rng.random(n_envs) < p_done]


class DictEnvs:
    """n_envs envs observing a Dict: each image key a StackingEnvs stream of its own layout and padding, episodes of
    all keys ending together, and the other keys (a float vector, a Discrete, ...) drawn afresh every step."""

    def __init__(self, rng, n_envs, images, others, p_done=0.1, odd=0.0):
        self.rng, self.n_envs, self.p_done = rng, n_envs, p_done
        self.images = {key: StackingEnvs(np.random.default_rng(rng.integers(2**32)), n_envs, *spec, p_done=p_done,
                                         odd=odd) for key, spec in images.items()}
        self.others = copy.deepcopy(others)  # samples are drawn from copies: the spaces buffers hold stay as they are
        for space in self.others.values():
            space.seed(int(rng.integers(2**31)))
        self.observation_space = spaces.Dict({**{key: envs.observation_space for key, envs in self.images.items()},
                                              **others})
        self.action_space = spaces.Box(-1, 1, (2,), np.float32)
        self.latest_others = self._draw_others()

    def _draw_others(self):
        return {key: np.stack([space.sample() for _ in range(self.n_envs)]) for key, space in self.others.items()}

    def observe(self):
        return {**{key: envs.observe(envs.stacks) for key, envs in self.images.items()}, **self.latest_others}

    def step(self):
        """(new obs, obs to store as next_obs, dones, infos), as StackingEnvs.step, of Dict observations."""
        events = episode_events(self.rng, self.n_envs, self.p_done)
        steps = {key: envs.step(events) for key, envs in self.images.items()}
        self.latest_others, terminal_others = self._draw_others(), self._draw_others()
        new_obs = {**{key: step[0] for key, step in steps.items()}, **self.latest_others}
        next_obs = {**{key: step[1] for key, step in steps.items()},
                    **{key: value.copy() for key, value in self.latest_others.items()}}
        dones, infos = np.array([event[0] for event in events]), []
        for e, (done, truncated, _) in enumerate(events):
            info = {}
            if done:
                info["terminal_observation"] = {key: step[3][e]["terminal_observation"] for key, step in steps.items()}
                for key, value in terminal_others.items():
                    info["terminal_observation"][key] = next_obs[key][e] = value[e]
                info["TimeLimit.truncated"] = bool(truncated)
            infos.append(info)
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
    obs = envs.observe() if isinstance(envs, DictEnvs) else envs.observe(envs.stacks)
    for _ in range(steps):
        if isinstance(envs.action_space, spaces.Box):
            action = envs.rng.uniform(-1, 1, (envs.n_envs, *envs.action_space.shape)).astype(np.float32)
        else:
            action = envs.rng.integers(0, N_ACTIONS, envs.n_envs)
        reward = envs.rng.normal(size=envs.n_envs).astype(np.float32)
        new_obs, next_obs, dones, infos = envs.step()
        yield obs, next_obs, action, reward, dones, infos
        obs = new_obs


def assert_same_samples(a, b):
    assert type(a) is type(b)
    for name, x, y in zip(a._fields, a, b):
        if isinstance(x, dict):  # Dict observations: the same keys in the same order, each the same tensor
            assert list(x) == list(y), name
            for key in x:
                assert_same_tensor(x[key], y[key], f"{name}[{key!r}]")
        else:
            assert_same_tensor(x, y, name)


def assert_same_tensor(x, y, name):
    if x is None:
        assert y is None, name
        return
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


def assert_same_rollout_batches(rng, envs, ref, ours, obs, rollouts, n_steps, batch_size, seed, random_action,
                                epochs=1):
    """Rollouts added to both buffers as OnPolicyAlgorithm.collect_rollouts adds them; each epoch's get() batches of
    ours equal SB3's."""
    n_envs, episode_starts = envs.n_envs, np.ones(envs.n_envs, bool)
    for r in range(rollouts):
        ref.reset()
        ours.reset()
        for _ in range(n_steps):
            action = random_action()
            reward = rng.normal(size=n_envs).astype(np.float32)
            value = torch.as_tensor(rng.normal(size=(n_envs, 1)), dtype=torch.float32)
            log_prob = torch.as_tensor(rng.normal(size=n_envs), dtype=torch.float32)
            for buf in (ref, ours):
                buf.add(obs, action, reward, episode_starts, value, log_prob)
            obs, _, episode_starts, _ = envs.step()
        last_values = torch.as_tensor(rng.normal(size=(n_envs, 1)), dtype=torch.float32)
        for buf in (ref, ours):
            buf.compute_returns_and_advantage(last_values, episode_starts)
        for epoch in range(epochs):
            np.random.seed(seed + r + epoch)
            want = list(ref.get(batch_size))
            np.random.seed(seed + r + epoch)
            got = list(ours.get(batch_size))
            assert len(want) == len(got)
            for a, b in zip(want, got):
                assert_same_samples(a, b)


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
    assert_same_rollout_batches(rng, envs, ref, ours, envs.observe(envs.stacks), rollouts, n_steps, batch_size, seed,
                                lambda: rng.integers(0, N_ACTIONS, (n_envs, 1)), epochs=2)
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


def test_real_dmc_dict_replay_samples_equal_sb3s():
    """SAC's observations on rendered DMC frames: 3 stacked RGB frames with the floor and the task's state, 2 envs,
    time-outs, a wrapped ring."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from envs.gym_dmc import DMCPixels

    options = dict(name="walker_walk", image_size=48, max_episode_steps=9)
    venv = VecFrameStack(make_vec_env(DMCPixels, n_envs=2, seed=0, env_kwargs=options), 3)
    args = (40, venv.observation_space, venv.action_space)
    ref, ours = DictReplayBuffer(*args, device="cpu", n_envs=2), CompressedDictReplayBuffer(*args, device="cpu",
                                                                                            n_envs=2, frame_stack=3)
    rng, obs, time_outs = np.random.default_rng(0), venv.reset(), 0
    for t in range(60):
        action = rng.uniform(-1, 1, (2, *venv.action_space.shape)).astype(np.float32)
        new_obs, reward, dones, infos = venv.step(action)
        next_obs = {key: value.copy() for key, value in new_obs.items()}
        for e in np.flatnonzero(dones):
            for key in next_obs:
                next_obs[key][e] = infos[e]["terminal_observation"][key]
        time_outs += sum(info.get("TimeLimit.truncated", False) for info in infos)
        for buffer in (ref, ours):
            buffer.add(obs, next_obs, action, reward, dones, infos)
        if t % 20 == 19:
            assert_same_replay_samples(ref, ours, t, batch_size=32)
        obs = new_obs
    venv.close()
    assert time_outs >= 2 and ours.full
    assert len(ours._key_streams["camera"].whole) == 0  # every stack verified
    assert ours.nbytes < sb3_buffers.sb3_nbytes(ref) / 3


def assert_pickled_replay_continues(envs, ref, ours, tmp_path):
    """50 transitions into both buffers; ours pickled as model.save_replay_buffer does and loaded back (compacted)
    takes 10 more and samples what SB3's does. Returns the loaded buffer."""
    from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl

    transitions = list(replay_transitions(envs, 60))
    for transition in transitions[:50]:
        ref.add(*transition)
        ours.add(*transition)
    save_to_pkl(tmp_path / "buffer.pkl", ours)
    loaded = load_from_pkl(tmp_path / "buffer.pkl")
    assert type(loaded) is type(ours) and loaded.nbytes <= ours.nbytes
    for transition in transitions[50:]:
        ref.add(*transition)
        loaded.add(*transition)
    assert_same_replay_samples(ref, loaded, 0, batch_size=100)
    return loaded


@pytest.mark.parametrize("compression", ["half", "full"])
def test_pickle_round_trip_keeps_samples(compression, tmp_path):
    envs = StackingEnvs(np.random.default_rng(0), 2, 4, (1, 6, 6), False, "zeros", p_done=0.1, odd=0.05)
    ref, ours = make_replay_pair(envs, 40, compression=compression)
    loaded = assert_pickled_replay_continues(envs, ref, ours, tmp_path)
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


def assert_refused_unchanged(buffer, cases):
    """Each (message, add() arguments) case raises a ValueError matching message and leaves the buffer as it was."""
    before = pickle.dumps(buffer)
    for message, args in cases:
        with pytest.raises(ValueError, match=message):
            buffer.add(*args)
        assert pickle.dumps(buffer) == before


def test_bad_add_raises_and_leaves_replay_unchanged():
    envs = StackingEnvs(np.random.default_rng(2), 2, 3, (1, 5, 5), False, "zeros", p_done=0.2, odd=0.05)
    ref, ours = filled_replay_pair(envs, 10, 15)
    assert_refused_unchanged(ours, bad_inputs(envs))
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


def dict_envs(rng, n_envs, frame_stack, camera_last, padding, second_last, others, p_done=0.1, odd=0.0):
    """DictEnvs with a stacked camera (1 or 2 channels), a single-frame RGB camera and the named other keys."""
    channels = int(rng.integers(1, 3))
    camera = (channels, 9, 10) if not camera_last else (9, 10, channels)
    second = (3, 6, 7) if not second_last else (6, 7, 3)
    kinds = {"proprio": spaces.Box(-2, 2, (5,), np.float32), "mode": spaces.Discrete(3),
             "flags": spaces.Box(0, 1, (3,), np.uint8), "depth": spaces.Box(0, 1, (2, 3, 4), np.float32)}
    return DictEnvs(rng, n_envs, {"camera": (frame_stack, camera, camera_last, padding),
                                  "second": (1, second, second_last, "zeros")},
                    {key: kinds[key] for key in others}, p_done, odd)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), n_envs=st.integers(1, 3), frame_stack=st.integers(1, 4),
       camera_last=st.booleans(), second_last=st.booleans(), padding=st.sampled_from(["zeros", "repeat"]),
       others=st.sampled_from([(), ("proprio",), ("proprio", "mode"), ("flags", "depth", "mode")]),
       stack_per_key=st.booleans(), buffer_size=st.integers(1, 16), steps=st.integers(1, 60),
       p_done=st.sampled_from([0.0, 0.1, 0.4]), odd=st.sampled_from([0.0, 0.0, 0.1]),
       handle_timeout_termination=st.booleans(), compression=st.sampled_from(["half", "full"]))
def test_dict_replay_samples_equal_sb3s(seed, n_envs, frame_stack, camera_last, second_last, padding, others,
                                        stack_per_key, buffer_size, steps, p_done, odd, handle_timeout_termination,
                                        compression):
    envs = dict_envs(np.random.default_rng(seed), n_envs, frame_stack, camera_last, padding, second_last, others,
                     p_done, odd)
    args = (buffer_size * n_envs, envs.observation_space, envs.action_space)
    ref = DictReplayBuffer(*args, device="cpu", n_envs=n_envs, handle_timeout_termination=handle_timeout_termination)
    # an int frame_stack holds for every image key it divides: 3 makes the RGB camera's stacks fit no rule (kept whole)
    stacks = {"camera": frame_stack} if stack_per_key else frame_stack
    with strict_stores():
        ours = CompressedDictReplayBuffer(*args, device="cpu", n_envs=n_envs, compression=compression,
                                          handle_timeout_termination=handle_timeout_termination, frame_stack=stacks,
                                          anchor_interval=5)
    assert {key: streams.layout.channels_last for key, streams in ours._key_streams.items()} == \
        {"camera": camera_last, "second": second_last}
    for t, transition in enumerate(replay_transitions(envs, steps)):
        ref.add(*transition)
        ours.add(*transition)
        if t % 5 == 4 or t == steps - 1:
            assert_same_replay_samples(ref, ours, seed + t, batch_size=3 * buffer_size * n_envs)
    if odd == 0 and (stack_per_key or frame_stack != 3):  # every stack verified
        assert all(len(streams.whole) == 0 for streams in ours._key_streams.values())


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31), n_envs=st.integers(1, 3), frame_stack=st.integers(1, 4),
       channels_last=st.booleans(), padding=st.sampled_from(["zeros", "repeat"]), n_steps=st.integers(1, 5),
       gamma=st.sampled_from([0.99, 0.5]), buffer_size=st.integers(1, 20), steps=st.integers(1, 70),
       p_done=st.sampled_from([0.0, 0.1, 0.4]), odd=st.sampled_from([0.0, 0.1]),
       handle_timeout_termination=st.booleans(), compression=st.sampled_from(["half", "full"]))
def test_nstep_replay_samples_equal_sb3s(seed, n_envs, frame_stack, channels_last, padding, n_steps, gamma, buffer_size,
                                         steps, p_done, odd, handle_timeout_termination, compression):
    envs = StackingEnvs(np.random.default_rng(seed), n_envs, frame_stack, (5, 4, 1) if channels_last else (1, 5, 4),
                        channels_last, padding, p_done, odd)
    args = (buffer_size * n_envs, envs.observation_space, envs.action_space)
    kwargs = dict(device="cpu", n_envs=n_envs, handle_timeout_termination=handle_timeout_termination,
                  n_steps=n_steps, gamma=gamma)
    ref = NStepReplayBuffer(*args, **kwargs)
    with strict_stores():
        ours = CompressedNStepReplayBuffer(*args, **kwargs, compression=compression, frame_stack=frame_stack,
                                           channels_last=channels_last, anchor_interval=4)
    assert isinstance(ours, NStepReplayBuffer) and (ours.n_steps, ours.gamma) == (n_steps, gamma)
    for t, transition in enumerate(replay_transitions(envs, steps)):
        ref.add(*transition)
        ours.add(*transition)
        if t % 5 == 4 or t == steps - 1:
            assert_same_replay_samples(ref, ours, seed + t, batch_size=3 * buffer_size * n_envs)
    np.random.seed(seed)
    assert ours.sample(4).discounts is not None


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), n_envs=st.integers(1, 3), frame_stack=st.integers(1, 4),
       camera_last=st.booleans(), second_last=st.booleans(), padding=st.sampled_from(["zeros", "repeat"]),
       others=st.sampled_from([(), ("proprio", "mode")]), n_steps=st.integers(1, 10), rollouts=st.integers(1, 3),
       batch_size=st.sampled_from([None, 1, 7]), p_done=st.sampled_from([0.0, 0.2]), odd=st.sampled_from([0.0, 0.1]),
       compression=st.sampled_from(["half", "full"]))
def test_dict_rollout_batches_equal_sb3s(seed, n_envs, frame_stack, camera_last, second_last, padding, others, n_steps,
                                         rollouts, batch_size, p_done, odd, compression):
    rng = np.random.default_rng(seed)
    envs = dict_envs(rng, n_envs, frame_stack, camera_last, padding, second_last, others, p_done, odd)
    args = (n_steps, envs.observation_space, envs.action_space)
    ref = DictRolloutBuffer(*args, device="cpu", gae_lambda=0.95, gamma=0.99, n_envs=n_envs)
    with strict_stores():
        ours = CompressedDictRolloutBuffer(*args, device="cpu", gae_lambda=0.95, gamma=0.99, n_envs=n_envs,
                                           compression=compression, frame_stack={"camera": frame_stack},
                                           anchor_interval=3)
    assert_same_rollout_batches(rng, envs, ref, ours, envs.observe(), rollouts, n_steps, batch_size, seed,
                                lambda: rng.uniform(-1, 1, (n_envs, 2)).astype(np.float32))


def test_dict_layouts_per_key():
    space = spaces.Dict({"stacked": spaces.Box(0, 255, (12, 20, 21), np.uint8),
                         "rgb": spaces.Box(0, 255, (3, 20, 21), np.uint8),
                         "last": spaces.Box(0, 255, (20, 21, 4), np.uint8),
                         "map": spaces.Box(0, 1, (20, 21, 1), np.uint8),  # not 0..255: not an image to SB3
                         "proprio": spaces.Box(-1, 1, (7,), np.float32)})
    layouts = sb3_buffers.dict_layouts(space, 4, None, "owner")
    assert {key: (layout.frame_stack, layout.channels_last, layout.frame_shape) for key, layout in layouts.items()} == \
        {"stacked": (4, False, (3, 20, 21)), "rgb": (1, False, (3, 20, 21)), "last": (4, True, (20, 21, 1))}
    layouts = sb3_buffers.dict_layouts(space, {"stacked": 3}, {"last": False}, "owner")
    assert {key: layout.frame_stack for key, layout in layouts.items()} == {"stacked": 3, "rgb": 1, "last": 1}
    assert layouts["last"].frame_shape == (20, 21, 4)  # channels first, as told: 20 "channels" of 21 x 4


@pytest.mark.parametrize("space, kwargs, message", [
    (spaces.Dict({"camera": spaces.Box(0, 255, (4, 8, 8), np.uint8), "proprio": spaces.Box(-1, 1, (3,))}),
     dict(frame_stack={"proprio": 2}), r"frame_stack names \['proprio'\], which are not image keys"),
    (spaces.Dict({"camera": spaces.Box(0, 255, (4, 8, 8), np.uint8)}), dict(channels_last={"cam": True}),
     r"channels_last names \['cam'\]"),
    (spaces.Dict({"camera": spaces.Box(0, 255, (6, 8, 8), np.uint8)}), dict(frame_stack={"camera": 4}),
     "image key 'camera': frame_stack=4 does not divide"),
    (spaces.Dict({"proprio": spaces.Box(-1, 1, (3,))}), {}, "no image key"),
    (spaces.Dict({"camera": spaces.Box(0, 255, (4, 8, 8), np.uint8)}), dict(frame_stack=0), "frame_stack must be"),
    (spaces.Box(0, 255, (4, 8, 8), np.uint8), {}, "stores Dict observations.*Use CompressedReplayBuffer"),
])
@pytest.mark.parametrize("cls", [CompressedDictReplayBuffer, CompressedDictRolloutBuffer])
def test_unsupported_dict_spaces_are_named_at_construction(cls, space, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(10, space, spaces.Discrete(2), device="cpu", **kwargs)


def test_dict_nbytes_count_every_key():
    envs = dict_envs(np.random.default_rng(1), 2, 4, False, "zeros", True, ("proprio", "mode"))
    args = (40, envs.observation_space, envs.action_space)
    ref, ours = DictReplayBuffer(*args, device="cpu", n_envs=2), CompressedDictReplayBuffer(*args, device="cpu",
                                                                                             n_envs=2)
    for transition in replay_transitions(envs, 30):
        ref.add(*transition)
        ours.add(*transition)
    arrays = [*ref.observations.values(), *ref.next_observations.values(), ref.actions, ref.rewards, ref.dones,
              ref.timeouts]
    assert sb3_buffers.sb3_nbytes(ref) == sum(a.nbytes for a in arrays)
    assert ours.nbytes == sb3_buffers.sb3_nbytes(ours) + sum(s.nbytes for s in ours._key_streams.values())
    for key in ("proprio", "mode"):  # other keys are stored as SB3 stores them
        assert ours.observations[key].nbytes == ref.observations[key].nbytes
    assert ours.observations["camera"].dtype == np.int64 and ours.observations["camera"].shape == (20, 2, 1)
    assert 0 < ours.bytes_per_step < sb3_buffers.sb3_nbytes(ref) / 40


@pytest.mark.parametrize("cls", [CompressedDictReplayBuffer, CompressedNStepReplayBuffer])
def test_dict_and_nstep_pickle_round_trip_keeps_samples(cls, tmp_path):
    rng = np.random.default_rng(3)
    if cls is CompressedDictReplayBuffer:
        envs = dict_envs(rng, 2, 4, False, "zeros", False, ("proprio",), odd=0.05)
        ref = DictReplayBuffer(40, envs.observation_space, envs.action_space, device="cpu", n_envs=2)
        ours = cls(40, envs.observation_space, envs.action_space, device="cpu", n_envs=2, frame_stack={"camera": 4})
    else:
        envs = StackingEnvs(rng, 2, 4, (1, 6, 6), False, "zeros", p_done=0.1, odd=0.05)
        ref = NStepReplayBuffer(40, envs.observation_space, envs.action_space, device="cpu", n_envs=2, n_steps=4)
        ours = cls(40, envs.observation_space, envs.action_space, device="cpu", n_envs=2, n_steps=4)
    assert_pickled_replay_continues(envs, ref, ours, tmp_path)


def dict_bad_inputs(envs):
    obs, next_obs, action, reward, done, infos = next(replay_transitions(envs, 1))

    def changed(d, key, value):
        return {**d, key: value} if value is not None else {k: v for k, v in d.items() if k != key}

    yield "obs has no key 'proprio'", (changed(obs, "proprio", None), next_obs, action, reward, done, infos)
    yield r"obs\['camera'\] has shape", (changed(obs, "camera", obs["camera"][:, :-1]), next_obs, action, reward, done,
                                         infos)
    yield r"next_obs\['second'\] has shape .* and dtype float32", \
        (obs, changed(next_obs, "second", next_obs["second"].astype(np.float32)), action, reward, done, infos)
    yield r"next_obs\['proprio'\] cannot be stored.*ValueError", \
        (obs, changed(next_obs, "proprio", next_obs["proprio"][:, :3]), action, reward, done, infos)
    yield r"obs\['mode'\] cannot be stored.*AttributeError", (changed(obs, "mode", list(obs["mode"])), next_obs,
                                                              action, reward, done, infos)
    yield "obs must be a dict", (obs["camera"], next_obs, action, reward, done, infos)
    yield "action has shape", (obs, next_obs, action[:1], reward, done, infos)
    yield "infos must be a list", (obs, next_obs, action, reward, done, infos[:1])


def test_bad_dict_add_raises_naming_the_key_and_leaves_buffers_unchanged():
    envs = dict_envs(np.random.default_rng(2), 2, 3, False, "zeros", True, ("proprio", "mode"), p_done=0.2, odd=0.05)
    ref = DictReplayBuffer(10, envs.observation_space, envs.action_space, device="cpu", n_envs=2)
    ours = CompressedDictReplayBuffer(10, envs.observation_space, envs.action_space, device="cpu", n_envs=2,
                                      frame_stack={"camera": 3})
    for transition in replay_transitions(envs, 15):
        ref.add(*transition)
        ours.add(*transition)
    assert_refused_unchanged(ours, dict_bad_inputs(envs))
    assert_same_replay_samples(ref, ours, 1, batch_size=30)
    rollout = CompressedDictRolloutBuffer(2, envs.observation_space, envs.action_space, device="cpu", n_envs=2,
                                          frame_stack={"camera": 3})
    obs = envs.observe()
    good = (np.zeros((2, 2)), np.zeros(2, np.float32), np.ones(2), torch.zeros(2, 1), torch.zeros(2))
    rollout.add(obs, *good)
    before = pickle.dumps(rollout)
    for message, bad in [("obs has no key 'mode'", {k: v for k, v in obs.items() if k != "mode"}),
                         (r"obs\['camera'\] has shape", {**obs, "camera": obs["camera"][:1]}),
                         (r"obs\['proprio'\] cannot be stored", {**obs, "proprio": obs["proprio"][:, :2]})]:
        with pytest.raises(ValueError, match=message):
            rollout.add(bad, *good)
        assert pickle.dumps(rollout) == before
    rollout.add({**obs, "mode": list(obs["mode"])}, *good)  # SB3's rollout add() takes lists for Discrete keys
    with pytest.raises(ValueError, match="already holds 2 steps"):
        rollout.add(obs, *good)


class TinyImageEnv(gym.Env):
    """A gymnasium env of stacked uint8 frames (or a Dict of them and a vector), for building SB3 algorithms."""

    def __init__(self, discrete=True, dict_obs=False):
        image = spaces.Box(0, 255, (4, 8, 8), np.uint8)
        self.observation_space = spaces.Dict({"camera": image, "proprio": spaces.Box(-1, 1, (3,))}) if dict_obs \
            else image
        self.action_space = spaces.Discrete(2) if discrete else spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.mark.filterwarnings("ignore:`n_steps=.*` is ignored")
def test_an_algorithm_asking_for_n_step_returns_gets_them_or_an_error():
    from stable_baselines3 import DQN, SAC

    def dqn(**kwargs):
        return DQN("MlpPolicy", TinyImageEnv(), buffer_size=50, device="cpu", **kwargs)

    with pytest.raises(ValueError, match=r"DQN\(n_steps=3\) asks for 3-step returns, which CompressedReplayBuffer does "
                                         "not compute.*replay_buffer_class=CompressedNStepReplayBuffer"):
        dqn(n_steps=3, replay_buffer_class=CompressedReplayBuffer)
    with pytest.raises(ValueError, match="takes no n_steps"):  # half would ignore them
        dqn(replay_buffer_class=CompressedReplayBuffer, replay_buffer_kwargs={"n_steps": 3, "compression": "half"})
    with pytest.raises(ValueError, match=r"DQN\(n_steps=3, gamma=0.9\) builds CompressedNStepReplayBuffer\(n_steps=3, "
                                         r"gamma=0.99\): pass replay_buffer_kwargs=\{'n_steps': 3, 'gamma': 0.9\}"):
        dqn(n_steps=3, gamma=0.9, replay_buffer_class=CompressedNStepReplayBuffer)
    with pytest.raises(ValueError, match=r"n_steps=5"):
        dqn(n_steps=5, replay_buffer_class=CompressedNStepReplayBuffer, replay_buffer_kwargs={"n_steps": 3})
    model = dqn(n_steps=3, gamma=0.9, replay_buffer_class=CompressedNStepReplayBuffer,
                replay_buffer_kwargs={"n_steps": 3, "gamma": 0.9})
    assert (model.replay_buffer.n_steps, model.replay_buffer.gamma) == (3, 0.9)
    model = dqn(replay_buffer_class=CompressedNStepReplayBuffer, replay_buffer_kwargs={"n_steps": 4})  # SB3's way
    assert model.replay_buffer.n_steps == 4
    assert type(dqn(replay_buffer_class=CompressedReplayBuffer).replay_buffer) is CompressedReplayBuffer
    with pytest.raises(ValueError, match=r"SAC\(n_steps=2\) asks for 2-step returns.*CompressedDictReplayBuffer.*"
                                         "nor sb3_buffers has an n-step buffer for Dict observations"):
        SAC("MultiInputPolicy", TinyImageEnv(False, True), buffer_size=50, device="cpu", n_steps=2,
            replay_buffer_class=CompressedDictReplayBuffer, replay_buffer_kwargs={"frame_stack": 4})
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        CompressedNStepReplayBuffer(10, TinyImageEnv().observation_space, spaces.Discrete(2), n_steps=0)
