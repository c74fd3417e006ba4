"""Snapshot size for N steps of walker_walk in `half` and `full`, against upstream's replay directory.

    python bench/snapshot_size.py                # N = 5000 and 10000 (about 6 min on 2 CPU cores)
    python bench/snapshot_size.py --steps 2000

A random policy (action_repeat 2) feeds the same actions to a floor-free grayscale env (for the
in-RAM buffers, 1M capacity, the config's compression settings) and to an RGB env with floor whose
episodes upstream's storage (`compression=none`) writes as compressed .npz files. At each N the
buffers' state is written with snapshot.save, as train.py does, and the files are measured.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
from dm_env import specs
from hydra import compose, initialize_config_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import envs  # noqa: E402  (sets MUJOCO_GL before dm_control loads)
import snapshot  # noqa: E402
from disk_replay import ReplayBufferStorage  # noqa: E402
from replay_buffer import ReplayBuffer  # noqa: E402
from train import buffer_kwargs  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5000, 10000], help="N at which to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot_size_") as tmp:
        measure(sorted(args.steps), pathlib.Path(tmp))


def measure(checkpoints: list[int], out: pathlib.Path) -> None:
    """Fill the buffers and upstream's storage, printing the sizes at the first episode end past each N."""
    with initialize_config_dir(config_dir=str(ROOT / "cfgs"), version_base=None):
        cfgs = {mode: compose(config_name="config", overrides=["task=walker_walk", f"compression={mode}"])
                for mode in ("half", "full")}
    gray = envs.make("walker_walk", 3, 2, seed=1, grayscale=True, floor=False)
    rgb = envs.make("walker_walk", 3, 2, seed=1)
    action_shape = gray.action_spec().shape
    buffers = {mode: ReplayBuffer(obs_shape=gray.observation_spec().shape, action_shape=action_shape,
                                  capacity=1_000_000, frame_stack=3, nstep=3, discount=0.99, batch_size=256,
                                  compression=mode, seed=1, **buffer_kwargs(cfg)) for mode, cfg in cfgs.items()}
    storage = ReplayBufferStorage((rgb.observation_spec(), rgb.action_spec(), specs.Array((1,), np.float32, "reward"),
                                   specs.Array((1,), np.float32, "discount")), out / "buffer")

    rng = np.random.default_rng(0)
    pending, steps = checkpoints, 0
    while pending:
        ts_gray, ts_rgb = gray.reset(), rgb.reset()
        add(buffers, storage, ts_gray, ts_rgb)
        while not ts_gray.last():
            action = rng.uniform(-1, 1, action_shape).astype(np.float32)
            ts_gray, ts_rgb = gray.step(action), rgb.step(action)
            add(buffers, storage, ts_gray, ts_rgb)
            steps += 1
        if steps < pending[0]:  # upstream writes an episode when it ends, so measure at episode ends
            continue
        pending = [n for n in pending if n > steps]
        replay_dir = sum(f.stat().st_size for f in (out / "buffer").glob("*.npz"))
        print(f"N={steps} steps: upstream replay dir {replay_dir / MIB:.1f} MiB ({replay_dir / steps:.0f} B/step)")
        for mode, buf in buffers.items():
            path = out / f"snapshot_{mode}.pt"
            snapshot.save(path, cfgs[mode], {"replay": snapshot.to_tensors(buf.state_dict())})
            size = path.stat().st_size
            print(f"  {mode}: replay part of snapshot.pt {size / MIB:.1f} MiB ({size / steps:.0f} B/step)")


def add(buffers: dict, storage: ReplayBufferStorage, ts_gray, ts_rgb) -> None:
    """One time step into every in-RAM buffer (grayscale) and into upstream's storage (RGB)."""
    for buf in buffers.values():
        buf.add(ts_gray)
    storage.add(ts_rgb)

if __name__ == "__main__":
    main()
