"""train_atari.py: config composition, and compressed buffers training bit-identical agents to SB3's own."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from stable_baselines3.common.buffers import DictReplayBuffer, NStepReplayBuffer, ReplayBuffer, RolloutBuffer
from stable_baselines3.common.utils import LinearSchedule

import train_atari
from sb3_buffers import (CompressedDictReplayBuffer, CompressedNStepReplayBuffer, CompressedReplayBuffer,
                         CompressedRolloutBuffer)
from tests.test_sb3_buffers import assert_same_samples

ROOT = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"fps", "total_time", "buffer_bytes", "buffer_bytes_per_step"}


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "cfgs_atari"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_rl_zoos_with_the_papers_buffer():
    cfg = compose_cfg()
    assert (cfg.algo.name, cfg.compression.mode, cfg.env) == ("qrdqn", "full", "PongNoFrameskip-v4")
    assert cfg.algo.hyperparams.buffer_size == 100_000 and cfg.algo.hyperparams.exploration_fraction == 0.025
    assert (cfg.algo.n_envs, cfg.algo.frame_stack, cfg.n_timesteps) == (1, 4, 10_000_000)
    ppo = compose_cfg(["algo=ppo", "compression=none"])
    assert (ppo.algo.n_envs, ppo.algo.hyperparams.n_steps, ppo.algo.hyperparams.batch_size) == (8, 128, 256)
    params = train_atari.hyperparams(ppo)
    assert isinstance(params["learning_rate"], LinearSchedule)
    assert params["learning_rate"](1.0) == pytest.approx(2.5e-4) and params["clip_range"](0.5) == pytest.approx(0.05)
    assert train_atari.buffer_kwargs(ppo) == {}


@pytest.mark.parametrize("algo, key, cls", [("qrdqn", "replay", CompressedReplayBuffer),
                                            ("ppo", "rollout", CompressedRolloutBuffer)])
@pytest.mark.parametrize("mode", ["half", "full"])
def test_compressed_modes_pick_the_compressed_buffers(algo, key, cls, mode):
    kwargs = train_atari.buffer_kwargs(compose_cfg([f"algo={algo}", f"compression={mode}"]))
    assert kwargs[f"{key}_buffer_class"] is cls
    assert kwargs[f"{key}_buffer_kwargs"]["compression"] == mode and kwargs[f"{key}_buffer_kwargs"]["frame_stack"] == 4


@pytest.mark.parametrize("overrides, cls", [
    (["n_steps=3"], CompressedNStepReplayBuffer), (["algo=sac"], CompressedDictReplayBuffer),
    (["algo=td3", "dmc.proprio=false"], CompressedReplayBuffer),
    (["algo=sac", "dmc.proprio=false", "n_steps=2"], CompressedNStepReplayBuffer)])
def test_off_policy_settings_pick_the_compressed_buffers(overrides, cls):
    cfg = compose_cfg(overrides)
    train_atari.validate_config(cfg)
    kwargs = train_atari.buffer_kwargs(cfg)
    assert kwargs["replay_buffer_class"] is cls
    if cls is CompressedNStepReplayBuffer:
        assert (kwargs["replay_buffer_kwargs"]["n_steps"], kwargs["replay_buffer_kwargs"]["gamma"]) == \
            (cfg.n_steps, 0.99)
    if "algo=sac" in overrides:
        assert cfg.env == "walker_walk" and cfg.algo.frame_stack == 3


def test_bad_settings_are_named_before_anything_is_built():
    with pytest.raises(MissingConfigException):
        compose_cfg(["compression=zip"])
    cfg = compose_cfg(["env=PongNoSuchGame-v4", "compression.key_interval=0", "algo.n_envs=-1", "n_steps=0"])
    with pytest.raises(ValueError) as error:
        train_atari.validate_config(cfg)
    for name in ("env='PongNoSuchGame-v4'", "compression.key_interval=0", "algo.n_envs=-1", "n_steps=0"):
        assert name in str(error.value)
    for overrides, message in [(["algo=sac", "env=PongNoFrameskip-v4"], "env='PongNoFrameskip-v4' is not a DMC task"),
                               (["algo=ppo", "n_steps=3"], "rollout length is algo.hyperparams.n_steps"),
                               (["algo=sac", "n_steps=3"], "no n-step buffer for Dict observations"),
                               (["algo=td3", "env=walker_fly"], "env='walker_fly' is not a DMC task")]:
        with pytest.raises(ValueError, match=message):
            train_atari.validate_config(compose_cfg(overrides))


def short_run(algo, mode, work_dir, overrides, env="BreakoutNoFrameskip-v4"):
    cfg = compose_cfg([f"algo={algo}", f"compression={mode}", f"env={env}", "seed=3", "device=cpu", "torch_threads=1",
                       *overrides])
    train_atari.validate_config(cfg)
    work_dir.mkdir()
    return train_atari.train(cfg, work_dir)


def read_rows(path):
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def assert_same_training(runs):
    (base, base_dir), (ours, ours_dir) = runs
    rows = read_rows(base_dir / "train.csv")
    loss = train_atari.LOSSES[[name for name, cls in train_atari.ALGOS.items() if isinstance(base, cls)][0]][0]
    assert len(rows) >= 3 and any(row[loss] != "nan" for row in rows)
    assert read_rows(ours_dir / "train.csv") == rows  # every game's reward and length, and the losses
    for a, b in zip(base.policy.state_dict().values(), ours.policy.state_dict().values()):
        assert torch.equal(a, b)


def assert_reloaded_buffer_samples_as_sb3s(runs, tmp_path):
    """save_replay_buffer pickles our run's buffer; loaded back, it samples what SB3's buffer of the other run does."""
    (base, _), (model, _) = runs
    model.save_replay_buffer(tmp_path / "replay.pkl")
    model.replay_buffer = None
    model.load_replay_buffer(tmp_path / "replay.pkl")
    np.random.seed(0)
    want = base.replay_buffer.sample(64)
    np.random.seed(0)
    assert_same_samples(want, model.replay_buffer.sample(64))


@pytest.mark.slow
def test_qrdqn_learns_bit_identically_with_full_compression(tmp_path):
    overrides = ["n_timesteps=1500", "algo.hyperparams.buffer_size=600", "algo.hyperparams.learning_starts=300",
                 "algo.hyperparams.batch_size=8", "algo.hyperparams.target_update_interval=200",
                 "algo.hyperparams.exploration_fraction=0.5"]
    runs = [(short_run("qrdqn", mode, tmp_path / mode, overrides), tmp_path / mode) for mode in ("none", "full")]
    assert type(runs[0][0].replay_buffer) is ReplayBuffer and type(runs[1][0].replay_buffer) is CompressedReplayBuffer
    assert_same_training(runs)
    assert_reloaded_buffer_samples_as_sb3s(runs, tmp_path)


@pytest.mark.slow
def test_n_step_qrdqn_learns_bit_identically_with_full_compression(tmp_path):
    overrides = ["n_timesteps=900", "n_steps=3", "algo.hyperparams.buffer_size=400",
                 "algo.hyperparams.learning_starts=300", "algo.hyperparams.batch_size=8",
                 "algo.hyperparams.target_update_interval=200", "algo.hyperparams.exploration_fraction=0.5"]
    runs = [(short_run("qrdqn", mode, tmp_path / mode, overrides), tmp_path / mode) for mode in ("none", "full")]
    assert type(runs[0][0].replay_buffer) is NStepReplayBuffer
    assert type(runs[1][0].replay_buffer) is CompressedNStepReplayBuffer and runs[1][0].replay_buffer.n_steps == 3
    assert_same_training(runs)


def dmc_overrides(steps):
    """A run of `steps` agent steps on 48x48 frames in episodes of 20 steps, updating from half-way on, its buffer
    wrapping."""
    return [f"n_timesteps={steps}", f"algo.hyperparams.learning_starts={steps // 2}", "algo.hyperparams.batch_size=16",
            f"algo.hyperparams.buffer_size={steps * 3 // 4}", "dmc.image_size=48", "dmc.max_episode_steps=20"]


@pytest.mark.slow
def test_sac_learns_bit_identically_from_pixels_and_proprioception_with_full_compression(tmp_path):
    runs = [(short_run("sac", mode, tmp_path / mode, dmc_overrides(80), "walker_walk"), tmp_path / mode)
            for mode in ("none", "full")]
    assert type(runs[0][0].replay_buffer) is DictReplayBuffer
    assert type(runs[1][0].replay_buffer) is CompressedDictReplayBuffer
    assert_same_training(runs)
    assert_reloaded_buffer_samples_as_sb3s(runs, tmp_path)
    model = runs[1][0]
    assert model.replay_buffer.nbytes < train_atari.buffer_bytes(runs[0][0].replay_buffer)[0] / 4


@pytest.mark.slow
def test_td3_learns_bit_identically_from_pixels_with_full_compression(tmp_path):
    overrides = [*dmc_overrides(80), "dmc.proprio=false", "dmc.grayscale=true", "dmc.floor=false"]
    runs = [(short_run("td3", mode, tmp_path / mode, overrides, "walker_walk"), tmp_path / mode)
            for mode in ("none", "full")]
    assert type(runs[0][0].replay_buffer) is ReplayBuffer and type(runs[1][0].replay_buffer) is CompressedReplayBuffer
    assert_same_training(runs)


@pytest.mark.slow
def test_ppo_learns_bit_identically_with_full_compression(tmp_path):
    overrides = ["n_timesteps=1024", "algo.n_envs=2", "algo.hyperparams.n_steps=128", "algo.hyperparams.batch_size=64",
                 "algo.hyperparams.n_epochs=2"]
    runs = [(short_run("ppo", mode, tmp_path / mode, overrides), tmp_path / mode) for mode in ("none", "full")]
    assert type(runs[0][0].rollout_buffer) is RolloutBuffer and type(runs[1][0].rollout_buffer) is CompressedRolloutBuffer
    assert_same_training(runs)


@pytest.mark.slow
def test_multirun_gives_every_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "train_atari.py", "-m", "algo=qrdqn", "env=BreakoutNoFrameskip-v4",
                    "compression=none,full", "algo.hyperparams.exploration_fraction=0.1,0.2", "n_timesteps=50",
                    "algo.hyperparams.learning_starts=1000", "device=cpu", f"hydra.sweep.dir={sweep}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "config.yaml").exists())
    assert len(jobs) == 4 and all((sweep / job / "train.csv").exists() for job in jobs)
    assert ("0_BreakoutNoFrameskip-v4_qrdqn_none_s1_algo.hyperparams.exploration_fraction=0.1,"
            "algo.hyperparams.learning_starts=1000") in jobs
