"""DrQ-v2 agent: random-shift augmentation, conv encoder, DDPG-style actor and double-Q critic."""
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


class RandomShiftsAug(nn.Module):
    """Shift each image by a random integer offset in [-pad, pad] pixels, replicating the border."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.size()
        assert h == w, 'random shifts expect square images'
        x = F.pad(x, (self.pad,) * 4, mode='replicate')
        padded = h + 2 * self.pad
        # Normalised coordinates of the pixel centres of the top-left h x h window of the padded image.
        eps = 1.0 / padded
        arange = torch.linspace(-1.0 + eps, 1.0 - eps, padded, device=x.device, dtype=x.dtype)[:h]
        arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
        base_grid = torch.cat([arange, arange.transpose(1, 0)], dim=2)
        base_grid = base_grid.unsqueeze(0).repeat(n, 1, 1, 1)
        # One pixel is 2 / padded in normalised units, so integer shifts sample exact pixel centres.
        shift = torch.randint(0, 2 * self.pad + 1, size=(n, 1, 1, 2), device=x.device, dtype=x.dtype)
        shift *= 2.0 / padded
        return F.grid_sample(x, base_grid + shift, padding_mode='zeros', align_corners=False)


class Encoder(nn.Module):
    """Four-layer conv net mapping uint8-range frames (C, 84, 84) to a flat 32*35*35 feature."""

    def __init__(self, obs_shape: Sequence[int]) -> None:
        super().__init__()
        assert len(obs_shape) == 3
        self.repr_dim = 32 * 35 * 35
        self.convnet = nn.Sequential(
            nn.Conv2d(obs_shape[0], 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU())
        self.apply(utils.weight_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs / 255.0 - 0.5
        h = self.convnet(obs)
        return h.view(h.shape[0], -1)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim))


def _trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


class Actor(nn.Module):
    """Deterministic tanh policy with externally scheduled truncated-normal exploration noise."""

    def __init__(self, repr_dim: int, action_shape: Sequence[int], feature_dim: int,
                 hidden_dim: int) -> None:
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.policy = _mlp(feature_dim, hidden_dim, action_shape[0])
        self.apply(utils.weight_init)

    def forward(self, obs: torch.Tensor, std: float) -> utils.TruncatedNormal:
        mu = torch.tanh(self.policy(self.trunk(obs)))
        return utils.TruncatedNormal(mu, torch.ones_like(mu) * std)


class Critic(nn.Module):
    """Two independent Q heads on a shared trunk (clipped double Q-learning)."""

    def __init__(self, repr_dim: int, action_shape: Sequence[int], feature_dim: int,
                 hidden_dim: int) -> None:
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.Q1 = _mlp(feature_dim + action_shape[0], hidden_dim, 1)
        self.Q2 = _mlp(feature_dim + action_shape[0], hidden_dim, 1)
        self.apply(utils.weight_init)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple:
        h_action = torch.cat([self.trunk(obs), action], dim=-1)
        return self.Q1(h_action), self.Q2(h_action)


class DrQV2Agent:
    """DrQ-v2: n-step DDPG with clipped double Q, augmented pixels and a scheduled exploration std."""

    _PARTS = ('encoder', 'actor', 'critic', 'critic_target', 'encoder_opt', 'actor_opt', 'critic_opt')

    def __init__(self, obs_shape: Sequence[int], action_shape: Sequence[int],
                 device: Union[str, torch.device], lr: float, feature_dim: int, hidden_dim: int,
                 critic_target_tau: float, num_expl_steps: int, update_every_steps: int,
                 stddev_schedule: Union[float, str], stddev_clip: float, use_tb: bool) -> None:
        self.device = torch.device(device)
        self.critic_target_tau = critic_target_tau
        self.update_every_steps = update_every_steps
        self.use_tb = use_tb
        self.num_expl_steps = num_expl_steps
        self.stddev_schedule = stddev_schedule
        self.stddev_clip = stddev_clip

        self.encoder = Encoder(obs_shape).to(self.device)
        repr_dim = self.encoder.repr_dim
        self.actor = Actor(repr_dim, action_shape, feature_dim, hidden_dim).to(self.device)
        self.critic = Critic(repr_dim, action_shape, feature_dim, hidden_dim).to(self.device)
        self.critic_target = Critic(repr_dim, action_shape, feature_dim, hidden_dim).to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())

        self.encoder_opt = torch.optim.Adam(self.encoder.parameters(), lr=lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)

        self.aug = RandomShiftsAug(pad=4)
        self.train()
        self.critic_target.train()

    def state_dict(self) -> dict:
        """Parameters and optimizer states of every learned part (tensors and plain values only)."""
        return {name: getattr(self, name).state_dict() for name in self._PARTS}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict saved into an agent built with the same shapes."""
        for name in self._PARTS:
            getattr(self, name).load_state_dict(state[name])

    def train(self, training: bool = True) -> None:
        """Set train/eval mode of the learned modules (used by utils.eval_mode)."""
        self.training = training
        self.encoder.train(training)
        self.actor.train(training)
        self.critic.train(training)

    def act(self, obs: np.ndarray, step: int, eval_mode: bool) -> np.ndarray:
        """Return the policy mean (eval) or a noisy/uniform exploratory action for one observation."""
        with torch.no_grad():
            obs_t = torch.as_tensor(obs, device=self.device).unsqueeze(0)
            dist = self.actor(self.encoder(obs_t), utils.schedule(self.stddev_schedule, step))
            if eval_mode:
                action = dist.mean
            else:
                action = dist.sample(clip=None)
                if step < self.num_expl_steps:
                    action.uniform_(-1.0, 1.0)
        return action.cpu().numpy()[0]

    def update_critic(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                      discount: torch.Tensor, next_obs: torch.Tensor, step: int) -> dict:
        """One critic + encoder step on the n-step clipped double-Q target."""
        metrics = {}
        with torch.no_grad():
            stddev = utils.schedule(self.stddev_schedule, step)
            next_action = self.actor(next_obs, stddev).sample(clip=self.stddev_clip)
            target_Q1, target_Q2 = self.critic_target(next_obs, next_action)
            target_Q = reward + discount * torch.min(target_Q1, target_Q2)

        Q1, Q2 = self.critic(obs, action)
        critic_loss = F.mse_loss(Q1, target_Q) + F.mse_loss(Q2, target_Q)

        if self.use_tb:
            metrics['critic_target_q'] = target_Q.mean().item()
            metrics['critic_q1'] = Q1.mean().item()
            metrics['critic_q2'] = Q2.mean().item()
            metrics['critic_loss'] = critic_loss.item()

        # The encoder is trained only through the critic loss.
        self.encoder_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.encoder_opt.step()
        return metrics

    def update_actor(self, obs: torch.Tensor, step: int) -> dict:
        """One actor step maximising min(Q1, Q2) on detached encoder features."""
        metrics = {}
        stddev = utils.schedule(self.stddev_schedule, step)
        dist = self.actor(obs, stddev)
        action = dist.sample(clip=self.stddev_clip)
        Q1, Q2 = self.critic(obs, action)
        actor_loss = -torch.min(Q1, Q2).mean()

        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        if self.use_tb:
            metrics['actor_loss'] = actor_loss.item()
            metrics['actor_logprob'] = dist.log_prob(action).sum(-1).mean().item()
            metrics['actor_ent'] = dist.entropy().sum(-1).mean().item()
        return metrics

    def update(self, replay_iter: Iterator, step: int) -> dict:
        """Sample a batch and update critic, encoder, actor and target critic every update_every_steps."""
        metrics = {}
        if step % self.update_every_steps != 0:
            return metrics

        obs, action, reward, discount, next_obs = utils.to_torch(next(replay_iter), self.device)
        action, reward, discount = action.float(), reward.float(), discount.float()

        obs = self.encoder(self.aug(obs.float()))
        with torch.no_grad():
            next_obs = self.encoder(self.aug(next_obs.float()))

        if self.use_tb:
            metrics['batch_reward'] = reward.mean().item()

        metrics.update(self.update_critic(obs, action, reward, discount, next_obs, step))
        metrics.update(self.update_actor(obs.detach(), step))
        utils.soft_update_params(self.critic, self.critic_target, self.critic_target_tau)
        return metrics
