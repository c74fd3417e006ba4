"""Sweep configs: the job directory name, and Hydra launcher configs (those need requirements-sweep.txt,
else they are skipped)."""
import pytest
from hydra import compose, initialize
from omegaconf import open_dict

import utils


def launcher(overrides):
    with initialize(config_path='../cfgs', version_base=None):
        cfg = compose('config', overrides=overrides, return_hydra_config=True)
    return cfg.hydra.launcher, cfg.hydra.sweep.dir


def test_slurm_launcher_resources():
    pytest.importorskip('hydra_plugins.hydra_submitit_launcher')
    cfg, sweep_dir = launcher(['hydra/launcher=slurm', 'hydra.launcher.partition=learnfair',
                               'task=quadruped_walk', 'compression=half'])
    assert cfg._target_ == 'hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher'
    assert (cfg.timeout_min, cfg.cpus_per_task, cfg.gpus_per_node, cfg.tasks_per_node, cfg.mem_gb, cfg.nodes) == \
        (4300, 10, 1, 1, 160, 1)
    assert cfg.partition == 'learnfair'
    assert cfg.submitit_folder == f'{sweep_dir}/.slurm'


def test_slurm_resources_are_overridable():
    pytest.importorskip('hydra_plugins.hydra_submitit_launcher')
    cfg, _ = launcher(['hydra/launcher=slurm', 'hydra.launcher.timeout_min=60', 'hydra.launcher.gpus_per_node=0'])
    assert (cfg.timeout_min, cfg.gpus_per_node, cfg.mem_gb) == (60, 0, 160)
    assert cfg.partition is None


def test_joblib_launcher():
    pytest.importorskip('hydra_plugins.hydra_joblib_launcher')
    cfg, _ = launcher(['hydra/launcher=joblib', 'hydra.launcher.n_jobs=4'])
    assert cfg._target_ == 'hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher'
    assert cfg.n_jobs == 4


def test_sweep_job_dir_name_is_unique_safe_and_bounded():
    overrides = ['compression.key_interval=8', 'seed=3', 'num_train_frames=5000', '+note=' + 'x/' * 200]
    with initialize(config_path='../cfgs', version_base=None):
        cfg = compose('config', overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 7
    name = cfg.hydra.sweep.subdir
    # the job number, task, mode and seed, then the other overrides (sorted, num_train_frames left out),
    # '/' replaced and cut to 150 characters
    assert name == '7_walker_walk_full_s3_' + ('+note=' + 'x_' * 200)[:150]
    assert utils.sweep_suffix("compression.key_interval=2,lr=1e-4,x='a b'") == \
        "_compression.key_interval=2,lr=1e-4,x=_a_b_"
    assert utils.sweep_suffix('') == ''
