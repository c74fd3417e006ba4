"""Train stable-baselines3 QR-DQN or PPO on an Atari game, or SAC or TD3 on a pixel DMC task, with SB3's own buffer
(none) or a compressed one (half/full).

    python train_atari.py algo=qrdqn env=PongNoFrameskip-v4 compression=full
    python train_atari.py algo=qrdqn env=PongNoFrameskip-v4 compression=full n_steps=3   # n-step returns
    python train_atari.py algo=ppo env=BreakoutNoFrameskip-v4 compression=none seed=2
    python train_atari.py algo=sac env=walker_walk compression=full       # camera + proprioception (Dict)
    python train_atari.py algo=td3 env=cheetah_run dmc.proprio=false      # camera only
    python train_atari.py -m hydra/launcher=joblib algo=qrdqn,ppo env=PongNoFrameskip-v4,BreakoutNoFrameskip-v4 \
        compression=none,full seed=1,2,3

Hyperparameters are the RL Zoo's for Atari (cfgs_atari/algo), with the paper's 100k-transition buffer for
QR-DQN; SAC and TD3 take SB3's defaults with DrQ-v2's action repeat, 3 stacked frames and seed steps.
n_steps > 1 gives the off-policy algorithms n-step returns (SB3's NStepReplayBuffer, or ours). A run writes
train.csv (a row per finished episode: reward, length, fps, the buffer's bytes and bytes per stored step,
the latest losses) and config.yaml into its directory, SB3's TensorBoard logs into tb/ (use_tb=true) and
model.zip (save_model=true).
"""
from __future__ import annotations

import csv
import inspect
import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import ale_py
import gymnasium as gym
import hydra
import numpy as np
import torch
from gymnasium import spaces
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sb3_contrib import QRDQN
from stable_baselines3 import PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_atari_env, make_vec_env
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack

import utils  # noqa: F401  (registers the sweep_suffix resolver that cfgs_atari/config.yaml uses)
from sb3_buffers import (CompressedDictReplayBuffer, CompressedNStepReplayBuffer, CompressedReplayBuffer,
                         CompressedRolloutBuffer, sb3_nbytes)

gym.register_envs(ale_py)

ALGOS = {"qrdqn": QRDQN, "ppo": PPO, "sac": SAC, "td3": TD3}
CONTINUOUS = ("sac", "td3")  # on DMC tasks; the others on Atari games
COMPRESSION_MODES = ("none", "half", "full")
LOSSES = {"qrdqn": ("loss",), "ppo": ("loss", "policy_gradient_loss", "value_loss", "entropy_loss"),
          "sac": ("actor_loss", "critic_loss", "ent_coef", "ent_coef_loss"), "td3": ("actor_loss", "critic_loss")}
CSV_FIELDS = ("step", "episode", "episode_reward", "episode_length", "fps", "total_time", "buffer_size",
              "buffer_bytes", "buffer_bytes_per_step")


def validate_config(cfg: DictConfig) -> None:
    """Raise ValueError naming every bad setting and what is allowed, before anything is built."""
    problems = []
    if cfg.algo.name not in ALGOS:
        problems.append(f"algo.name={cfg.algo.name!r} is unknown; allowed: {', '.join(ALGOS)}")
    if cfg.compression.mode not in COMPRESSION_MODES:
        problems.append(f"compression.mode={cfg.compression.mode!r} is unknown; allowed: {', '.join(COMPRESSION_MODES)}")
    for key in ("algo.n_envs", "algo.frame_stack", "n_timesteps", "n_steps", "compression.key_interval",
                "compression.anchor_interval", "dmc.action_repeat", "dmc.image_size"):
        value = OmegaConf.select(cfg, key, default=1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}={value!r} is invalid; allowed: an integer >= 1")
    if cfg.algo.name in CONTINUOUS:
        from envs import dmc
        if not dmc.is_task(cfg.env):
            problems.append(f"env={cfg.env!r} is not a DMC task; algo={cfg.algo.name} trains on pixel DMC tasks "
                            "such as env=walker_walk")
    else:
        try:
            gym.spec(cfg.env)
        except gym.error.Error as error:
            problems.append(f"env={cfg.env!r} is not a registered environment ({error}); "
                            "Atari games are named like PongNoFrameskip-v4")
    if isinstance(cfg.n_steps, int) and cfg.n_steps > 1:
        if not issubclass(ALGOS.get(cfg.algo.name, PPO), OffPolicyAlgorithm):
            problems.append(f"n_steps={cfg.n_steps} (n-step returns) is for the off-policy algorithms; "
                            f"{cfg.algo.name}'s rollout length is algo.hyperparams.n_steps")
        elif observes_dict(cfg):
            problems.append(f"n_steps={cfg.n_steps}: SB3 has no n-step buffer for Dict observations "
                            "(camera + proprioception); use dmc.proprio=false for the camera alone")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def hyperparams(cfg: DictConfig) -> dict[str, Any]:
    """The algorithm's keyword arguments: the config's, `lin_<x>` strings as linear schedules from x to 0."""
    params = OmegaConf.to_container(cfg.algo.hyperparams, resolve=True)
    for key, value in params.items():
        if isinstance(value, str) and value.startswith("lin_"):
            params[key] = LinearSchedule(float(value[len("lin_"):]), 0.0, 1.0)
    return params


def observes_dict(cfg: DictConfig) -> bool:
    """Whether the env observes a Dict: a DMC task's camera and proprioception."""
    return cfg.algo.name in CONTINUOUS and cfg.dmc.proprio


def gamma(cfg: DictConfig) -> float:
    """The algorithm's discount: the config's, else the algorithm's default."""
    default = inspect.signature(ALGOS[cfg.algo.name]).parameters["gamma"].default
    return cfg.algo.hyperparams.get("gamma", default)


def buffer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """replay_buffer_class/rollout_buffer_class and their kwargs for a compressed mode; {} for none (SB3 picks its own
    buffer, an NStepReplayBuffer for n_steps > 1)."""
    if cfg.compression.mode == "none":
        return {}
    kwargs = {"compression": cfg.compression.mode, "frame_stack": cfg.algo.frame_stack}
    kwargs.update({key: value for key, value in cfg.compression.items() if key != "mode"})
    if cfg.algo.name == "ppo":
        return {"rollout_buffer_class": CompressedRolloutBuffer, "rollout_buffer_kwargs": kwargs}
    if cfg.n_steps > 1:
        kwargs.update(n_steps=cfg.n_steps, gamma=gamma(cfg))
        return {"replay_buffer_class": CompressedNStepReplayBuffer, "replay_buffer_kwargs": kwargs}
    if observes_dict(cfg):
        return {"replay_buffer_class": CompressedDictReplayBuffer, "replay_buffer_kwargs": kwargs}
    return {"replay_buffer_class": CompressedReplayBuffer, "replay_buffer_kwargs": kwargs}


def make_env(cfg: DictConfig) -> VecEnv:
    """The RL Zoo's Atari env: AtariWrapper (no-op starts, frame skip 4, episodic life, 84x84 gray), or a DMC task's
    camera (and proprioception) rendered as DrQ-v2 does (envs.gym_dmc); frames stacked."""
    if cfg.algo.name not in CONTINUOUS:
        venv = make_atari_env(cfg.env, n_envs=cfg.algo.n_envs, seed=cfg.seed)
    else:
        from envs.gym_dmc import DMCPixels
        options = OmegaConf.to_container(cfg.dmc, resolve=True)
        venv = make_vec_env(DMCPixels, n_envs=cfg.algo.n_envs, seed=cfg.seed,
                            env_kwargs={"name": cfg.env, "seed": cfg.seed, **options})
    return VecFrameStack(venv, n_stack=cfg.algo.frame_stack)


def make_model(cfg: DictConfig, env: VecEnv, work_dir: Optional[Path] = None) -> BaseAlgorithm:
    """The algorithm with the configured buffer, seeded, on the configured device."""
    tensorboard_log = str(work_dir / "tb") if cfg.use_tb and work_dir is not None else None
    params = {**hyperparams(cfg), **buffer_kwargs(cfg)}
    noise = params.get("action_noise")
    if isinstance(noise, str) and noise.startswith("normal_"):  # Gaussian exploration noise of this sigma
        size = env.action_space.shape[-1]
        params["action_noise"] = NormalActionNoise(np.zeros(size), np.full(size, float(noise[len("normal_"):])))
    if issubclass(ALGOS[cfg.algo.name], OffPolicyAlgorithm):
        params["n_steps"] = cfg.n_steps
    # SB3's MultiInputPolicy runs the CnnPolicy's CNN on the camera of Dict observations
    policy = "MultiInputPolicy" if isinstance(env.observation_space, spaces.Dict) and cfg.algo.policy == "CnnPolicy" \
        else cfg.algo.policy
    with warnings.catch_warnings():
        # SB3 warns that n_steps is ignored with a buffer class of ours; CompressedNStepReplayBuffer takes it
        warnings.filterwarnings("ignore", message=r"`n_steps=\d+` is ignored because a custom `replay_buffer_class`")
        return ALGOS[cfg.algo.name](policy, env, seed=cfg.seed, device=cfg.device, verbose=0,
                                    tensorboard_log=tensorboard_log, **params)


def buffer_of(model: BaseAlgorithm) -> Any:
    """The model's replay or rollout buffer."""
    return model.rollout_buffer if isinstance(model, PPO) else model.replay_buffer


def buffer_bytes(buffer: Any) -> tuple[int, float]:
    """(bytes the buffer holds, bytes per stored transition when full); SB3's own buffers hold only arrays."""
    if hasattr(buffer, "bytes_per_step"):
        return buffer.nbytes, buffer.bytes_per_step
    nbytes = sb3_nbytes(buffer)
    return nbytes, nbytes / (buffer.buffer_size * buffer.n_envs)


class EpisodeLog(BaseCallback):
    """Writes a train.csv row (and, if echo, prints a line) for every finished game, from Monitor's episode infos."""

    def __init__(self, path: Path, losses: tuple[str, ...], echo: bool = True):
        super().__init__()
        self.path, self.losses, self.echo = path, losses, echo
        self.fields = (*CSV_FIELDS, *losses)
        self.episodes = 0
        self.latest_losses: dict[str, float] = {}

    def _on_training_start(self) -> None:
        self.start_time, self.start_step = time.perf_counter(), self.num_timesteps
        with self.path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writeheader()

    def _on_step(self) -> bool:
        # SB3 clears its logger's values when it dumps them: keep the latest of each loss
        for name in self.losses:
            value = self.logger.name_to_value.get(f"train/{name}")
            if value is not None:
                self.latest_losses[name] = value
        for info in self.locals["infos"]:
            if "episode" in info:
                self._write(info["episode"])
        return True

    def _write(self, episode: dict) -> None:
        self.episodes += 1
        elapsed = time.perf_counter() - self.start_time
        buffer = buffer_of(self.model)
        nbytes, per_step = buffer_bytes(buffer)
        row = {"step": self.num_timesteps, "episode": self.episodes, "episode_reward": float(episode["r"]),
               "episode_length": int(episode["l"]), "fps": (self.num_timesteps - self.start_step) / elapsed,
               "total_time": elapsed, "buffer_size": buffer.size() * buffer.n_envs, "buffer_bytes": nbytes,
               "buffer_bytes_per_step": per_step,
               **{name: self.latest_losses.get(name, math.nan) for name in self.losses}}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        self.logger.record("buffer/bytes", nbytes)
        self.logger.record("buffer/bytes_per_step", per_step)
        if self.echo:
            print(f"step {row['step']:>9} | episode {row['episode']:>5} | reward {row['episode_reward']:>8.1f} | "
                  f"fps {row['fps']:>6.0f} | buffer {nbytes / 2**20:>8.1f} MiB ({per_step:,.0f} B/step)", flush=True)


def train(cfg: DictConfig, work_dir: Path) -> BaseAlgorithm:
    """Build env and model from cfg and train for n_timesteps, logging to work_dir."""
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    env = make_env(cfg)
    try:
        model = make_model(cfg, env, work_dir)
        model.learn(total_timesteps=cfg.n_timesteps, callback=EpisodeLog(work_dir / "train.csv", LOSSES[cfg.algo.name]))
        if cfg.save_model:
            model.save(work_dir / "model.zip")
    finally:
        env.close()
    return model


@hydra.main(config_path="cfgs_atari", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Check the config, then train in Hydra's run directory."""
    validate_config(cfg)
    work_dir = Path(HydraConfig.get().runtime.output_dir)
    OmegaConf.save(cfg, work_dir / "config.yaml", resolve=True)
    print(f"workspace: {work_dir}")
    train(cfg, work_dir)


if __name__ == "__main__":
    main()
