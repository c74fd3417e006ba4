"""Replay-buffer benchmark on real rendered frames: size per stored step, add time, sample time.

    python bench/buffer.py                       # walker_walk and quadruped_walk, 2000 steps each
    python bench/buffer.py --tasks walker_walk --steps 4000 --repeats 50

Frames come from floor-free grayscale DMC renders under a uniform random policy (action_repeat 2,
frame_stack 3). Every figure is measured in this run; ratios are taken between runs interleaved
in the same loop, so they hold up better than the absolute times on a shared machine.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from envs import make  # noqa: E402  (sets MUJOCO_GL before dm_control loads)
from obs_comp import DiffFrames  # noqa: E402
from replay_buffer import ReplayBuffer  # noqa: E402

FRAME_STACK, NSTEP, IMAGE = 3, 3, 84
BASE_BYTES_PER_STEP = 3 * FRAME_STACK * IMAGE * IMAGE  # DrQ-v2 base: RGB 3-frame stack per stored step


def render_steps(task: str, steps: int, seed: int) -> list:
    """Time steps of a random policy on the floor-free grayscale task."""
    env = make(name=task, frame_stack=FRAME_STACK, action_repeat=2, seed=seed, grayscale=True, floor=False)
    rng = np.random.default_rng(seed)
    shape = env.action_spec().shape
    out = [env.reset()]
    while len(out) < steps:
        ts = env.step(rng.uniform(-1, 1, shape).astype(np.float32))
        out.append(ts)
        if ts.last() and len(out) < steps:
            out.append(env.reset())
    return out


def paper_format_bytes_per_step(time_steps: list) -> float:
    """Observation bytes per step of the paper's ObsComp (Eq. 3): raw key every f frames, 4 B per changed pixel."""
    f, pixels = FRAME_STACK, IMAGE * IMAGE
    total, key = 0, None
    position = 0
    for ts in time_steps:
        frame = ts.observation[-1].astype(np.int16)
        position = 0 if ts.first() else position + 1
        if position % f == 0:
            key, size = frame, pixels
        else:
            size = min(4 * int(np.count_nonzero(frame - key)), pixels) + 8  # + pointer to the SparseArray
        total += size
    return total / len(time_steps) + 4 * f  # + obs_inds


def numpy_decode(store: DiffFrames, ids: np.ndarray) -> np.ndarray:
    """The `full` format decoded with numpy alone (vectorized), to compare against the numba kernel."""
    slots, words, arena = store._slots, store._words, store._arena
    out = np.empty((len(ids), words), dtype=np.uint32)
    ref = ids - store._ref_dist[ids % slots]
    raw_ref = store._num_runs[ref % slots] < 0
    root = np.where(raw_ref, ref, ref - store._ref_dist[ref % slots])
    out[:] = arena[store._offsets[root % slots][:, None] + np.arange(words)]
    flat = out.reshape(-1)
    rows = np.arange(len(ids))
    for frame_ids, apply in ((ref, ~raw_ref), (ids, store._num_runs[ids % slots] >= 0)):
        s = frame_ids[apply] % slots
        n = store._num_runs[s].astype(np.int64)
        frame_of_run = np.repeat(np.arange(len(s)), n)
        run_word = arena[store._offsets[s][frame_of_run] + np.arange(n.sum()) - (np.cumsum(n) - n)[frame_of_run]]
        start, length = (run_word & 0xFFFF).astype(np.int64), (run_word >> 16).astype(np.int64)
        before_run = np.cumsum(length) - length  # values of earlier runs, across all frames
        frame_values = np.bincount(frame_of_run, length, len(s)).astype(np.int64)
        before_frame = (np.cumsum(frame_values) - frame_values)[frame_of_run]
        values_at = (store._offsets[s] + n)[frame_of_run] + before_run - before_frame
        within = np.arange(length.sum()) - np.repeat(before_run, length)
        dest = np.repeat(rows[apply][frame_of_run] * words + start, length) + within
        flat[dest] = arena[np.repeat(values_at, length) + within]
    return out


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_task(task: str, args: argparse.Namespace) -> list[dict]:
    steps = render_steps(task, args.steps, args.seed)
    action_shape = steps[0].action.shape
    rows = []
    buffers = {}
    for mode in ("half", "full"):
        buf = ReplayBuffer(obs_shape=steps[0].observation.shape, action_shape=action_shape, capacity=len(steps),
                           frame_stack=FRAME_STACK, nstep=NSTEP, discount=0.99, batch_size=args.batch,
                           compression=mode, seed=args.seed, anchor_interval=args.anchor_interval)
        warm_up = ReplayBuffer(obs_shape=steps[0].observation.shape, action_shape=action_shape, capacity=64,
                               frame_stack=FRAME_STACK, nstep=NSTEP, discount=0.99, batch_size=4,
                               compression=mode, anchor_interval=args.anchor_interval)
        for ts in steps[:64]:  # compiles (or loads from cache) the numba kernels outside the timing
            warm_up.add(ts)
        warm_up.sample()
        buf.add(steps[0])
        start = time.perf_counter()
        for ts in steps[1:]:
            buf.add(ts)
        add_us = (time.perf_counter() - start) / (len(steps) - 1) * 1e6
        buf.sample()
        buffers[mode] = buf
        rows.append(dict(task=task, mode=mode, bytes_per_step=buf.nbytes / len(buf), add_us=add_us))

    frames = np.stack([ts.observation[-1] for ts in steps])  # (N, 84, 84): the plain-gather bound
    rng = np.random.default_rng(args.seed)
    gather_ids = rng.integers(0, len(frames), 2 * args.batch * FRAME_STACK)
    full = buffers["full"]._frames
    stack_ids = (rng.integers(FRAME_STACK, len(steps) - NSTEP, args.batch)[:, None]
                 + np.arange(-FRAME_STACK, NSTEP)).reshape(-1)
    np.testing.assert_array_equal(numpy_decode(full, stack_ids).view(np.uint8)[:, :IMAGE * IMAGE],
                                  frames[stack_ids].reshape(len(stack_ids), -1))
    calls = {"half": buffers["half"].sample, "full": buffers["full"].sample,
             "gather": lambda: np.take(frames, gather_ids, axis=0),
             "full_numpy_decode": lambda: numpy_decode(full, stack_ids),
             "full_numba_decode": lambda: full.decode(stack_ids, np.empty((len(stack_ids), IMAGE * IMAGE), np.uint8))}
    times = {name: [] for name in calls}
    for _ in range(args.repeats):  # interleaved, so load from elsewhere hits every variant alike
        for name, fn in calls.items():
            times[name].append(timed(fn, 1))
    median = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    for row in rows:
        row["sample_ms"] = median[row["mode"]]
        row["compression"] = BASE_BYTES_PER_STEP / row["bytes_per_step"]
    summary = dict(task=task, steps=len(steps), gather_ms=median["gather"],
                   paper_format_x=BASE_BYTES_PER_STEP / paper_format_bytes_per_step(steps),
                   full_payload_per_step=full.payload_bytes / len(steps),
                   numpy_vs_numba=median["full_numpy_decode"] / median["full_numba_decode"])
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["walker_walk", "quadruped_walk"])
    parser.add_argument("--steps", type=int, default=2000, help="rendered time steps per task (buffer capacity)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--anchor-interval", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"base: {BASE_BYTES_PER_STEP} B per stored step (RGB, {FRAME_STACK}-frame stack); "
          f"batch {args.batch}; medians of {args.repeats} interleaved runs")
    print(f"{'task':16} {'mode':5} {'B/step':>8} {'comp':>6} {'add us':>7} {'sample ms':>10} "
          f"{'vs half':>8} {'vs gather':>9}")
    for task in args.tasks:
        rows, summary = bench_task(task, args)
        half_ms = rows[0]["sample_ms"]
        for row in rows:
            print(f"{task:16} {row['mode']:5} {row['bytes_per_step']:8.0f} {row['compression']:5.1f}x "
                  f"{row['add_us']:7.1f} {row['sample_ms']:10.2f} {row['sample_ms'] / half_ms:8.2f} "
                  f"{row['sample_ms'] / summary['gather_ms']:9.2f}")
        print(f"{task:16} numpy gather of 2x{args.batch}x{FRAME_STACK} frames: {summary['gather_ms']:.2f} ms; "
              f"paper's format on these frames: {summary['paper_format_x']:.1f}x; "
              f"full payload {summary['full_payload_per_step']:.0f} B/step; "
              f"numpy decode / numba decode: {summary['numpy_vs_numba']:.1f}x; {summary['steps']} steps")


if __name__ == "__main__":
    main()
