"""Unit tests for the DrQ-v2 agent, its augmentation and the schedule helpers."""
import copy

import numpy as np
import pytest
import torch

import utils
from drqv2 import DrQV2Agent, Encoder, RandomShiftsAug

ACTION_SHAPE = (6,)


def make_agent(obs_shape=(9, 84, 84), num_expl_steps=10, stddev_schedule='linear(1.0,0.1,100)',
               update_every_steps=2, tau=0.01):
    torch.manual_seed(0)
    return DrQV2Agent(obs_shape=obs_shape, action_shape=ACTION_SHAPE, device='cpu', lr=1e-3,
                      feature_dim=8, hidden_dim=32, critic_target_tau=tau,
                      num_expl_steps=num_expl_steps, update_every_steps=update_every_steps,
                      stddev_schedule=stddev_schedule, stddev_clip=0.3, use_tb=True)


def numpy_batches(obs_shape, batch_size=4, reward_dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield (rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8),
               rng.uniform(-1, 1, (batch_size, *ACTION_SHAPE)).astype(np.float32),
               rng.uniform(0, 1, (batch_size, 1)).astype(reward_dtype),
               np.full((batch_size, 1), 0.99, dtype=reward_dtype),
               rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8))


def torch_batches(obs_shape, batch_size=4):
    for batch in numpy_batches(obs_shape, batch_size):
        yield tuple(torch.as_tensor(x) for x in batch)


def test_random_shift_is_integer_translation_of_padded_input():
    torch.manual_seed(0)
    n, c, size, pad = 16, 3, 20, 4
    x = torch.rand(n, c, size, size)
    out = RandomShiftsAug(pad)(x)
    assert out.shape == x.shape
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode='edge')
    shifts = set()
    for i in range(n):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if np.allclose(out[i].numpy(), padded[i, :, dy:dy + size, dx:dx + size],
                                  atol=1e-5)]
        assert len(matches) == 1, f'sample {i} is not a single integer shift'
        shifts.add(matches[0])
    assert len(shifts) > 1, 'shifts should differ between samples'


@pytest.mark.parametrize('channels', [3, 9])
def test_encoder_repr_dim(channels):
    encoder = Encoder((channels, 84, 84))
    h = encoder(torch.zeros(2, channels, 84, 84))
    assert encoder.repr_dim == 32 * 35 * 35
    assert h.shape == (2, encoder.repr_dim)


@pytest.mark.parametrize('obs_shape', [(3, 84, 84), (9, 84, 84)])
def test_act_shapes_and_bounds(obs_shape):
    agent = make_agent(obs_shape)
    obs = np.random.default_rng(0).integers(0, 256, obs_shape, dtype=np.uint8)
    for step, eval_mode in [(0, False), (50, False), (50, True)]:
        action = agent.act(obs, step, eval_mode)
        assert action.shape == ACTION_SHAPE
        assert action.dtype == np.float32
        assert np.all(np.abs(action) <= 1.0)


def test_uniform_exploration_before_num_expl_steps():
    # With zero policy noise, anything but the mean must come from uniform exploration.
    agent = make_agent(num_expl_steps=10, stddev_schedule='0.0')
    obs = np.zeros((9, 84, 84), dtype=np.uint8)
    mean = agent.act(obs, 0, eval_mode=True)
    explore = np.stack([agent.act(obs, 5, eval_mode=False) for _ in range(100)])
    assert explore.min() < -0.9 and explore.max() > 0.9
    assert abs(explore.mean()) < 0.1
    np.testing.assert_allclose(agent.act(obs, 10, eval_mode=False), mean, atol=1e-6)


@pytest.mark.parametrize('source', ['numpy', 'numpy_float64', 'torch'])
def test_update_runs_from_numpy_and_torch_batches(source):
    obs_shape = (3, 84, 84)
    agent = make_agent(obs_shape)
    batches = {'numpy': numpy_batches(obs_shape),
               'numpy_float64': numpy_batches(obs_shape, reward_dtype=np.float64),
               'torch': torch_batches(obs_shape)}[source]
    encoder_before = copy.deepcopy(agent.encoder.state_dict())
    metrics = agent.update(batches, step=100)
    expected = {'batch_reward', 'critic_target_q', 'critic_q1', 'critic_q2', 'critic_loss',
                'actor_loss', 'actor_logprob', 'actor_ent'}
    assert expected <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    # The encoder is trained (through the critic loss).
    assert any(not torch.equal(encoder_before[k], v) for k, v in agent.encoder.state_dict().items())
    for p in agent.critic.parameters():
        assert p.dtype == torch.float32


def test_update_skips_off_steps_without_sampling():
    agent = make_agent(update_every_steps=2)

    def exploding():
        raise AssertionError('replay sampled on a skipped step')
        yield

    assert agent.update(exploding(), step=3) == {}


def test_target_critic_moves_by_tau():
    tau = 0.25
    agent = make_agent(tau=tau)
    target_before = [p.detach().clone() for p in agent.critic_target.parameters()]
    agent.update(numpy_batches((9, 84, 84)), step=100)
    for critic_p, target_old, target_new in zip(agent.critic.parameters(), target_before,
                                                 agent.critic_target.parameters()):
        expected = tau * critic_p.detach() + (1 - tau) * target_old
        torch.testing.assert_close(target_new.detach(), expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b.detach())
               for a, b in zip(target_before, agent.critic_target.parameters()))


def test_linear_stddev_schedule():
    spec = 'linear(1.0,0.1,100000)'
    assert utils.schedule(spec, 0) == pytest.approx(1.0)
    assert utils.schedule(spec, 50000) == pytest.approx(0.55)
    assert utils.schedule(spec, 100000) == pytest.approx(0.1)
    assert utils.schedule(spec, 10 ** 7) == pytest.approx(0.1)
    assert utils.schedule(0.2, 123) == pytest.approx(0.2)
    assert utils.schedule('0.3', 123) == pytest.approx(0.3)
    step_spec = 'step_linear(1.0,0.5,100,0.1,100)'
    assert utils.schedule(step_spec, 50) == pytest.approx(0.75)
    assert utils.schedule(step_spec, 150) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        utils.schedule('cosine(1,0,10)', 0)


def test_truncated_normal_respects_bounds_and_clip():
    loc = torch.full((1000, 2), 0.95)
    dist = utils.TruncatedNormal(loc, torch.ones_like(loc))
    sample = dist.sample(clip=0.3)
    assert sample.abs().max() < 1.0
    assert (sample >= 0.65 - 1e-6).all()


def test_to_torch_accepts_numpy_and_tensors():
    xs = (np.zeros((2, 3), np.float32), torch.ones(2, 3))
    out = utils.to_torch(xs, torch.device('cpu'))
    assert all(isinstance(x, torch.Tensor) for x in out)
    assert out[1].sum() == 6
