"""Hydra launcher configs for sweeps compose and resolve (needs requirements-sweep.txt, else skipped)."""
import pytest
from hydra import compose, initialize


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
