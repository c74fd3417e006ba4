"""Cost of decode()'s checks of ids and out: ReplayBuffer.sample() with them and without, interleaved in one run.

    python bench/decode_checks.py --steps 1000 --repeats 200

Frames are walker_walk renders under a random policy (floor-free gray, as bench/buffer.py's `gray`); "without"
replaces obs_comp.check_decode with the int64 conversion decode() did before it. Times are medians per sample().
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import obs_comp  # noqa: E402
from bench.buffer import FRAME_STACK, NSTEP, render_steps  # noqa: E402
from replay_buffer import ReplayBuffer  # noqa: E402


def unchecked(ids: np.ndarray, out: np.ndarray, first: int, count: int, frame_size: int) -> np.ndarray:
    """What decode() did with its ids before it checked them."""
    return np.ascontiguousarray(ids, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    steps = render_steps("walker_walk", args.steps, 0)
    checked = obs_comp.check_decode
    print("| mode | with checks (ms) | without (ms) | ratio |\n|---|---|---|---|")
    for mode in ("half", "full"):
        buffer = ReplayBuffer(obs_shape=steps[0].observation.shape, action_shape=steps[0].action.shape,
                              capacity=args.steps, frame_stack=FRAME_STACK, nstep=NSTEP, discount=0.99,
                              batch_size=args.batch, compression=mode, seed=0)
        for ts in steps:
            buffer.add(ts)
        times = {True: [], False: []}
        for i in range(2 * args.repeats):
            check = bool(i % 2)
            obs_comp.check_decode = checked if check else unchecked
            start = time.perf_counter()
            buffer.sample()
            times[check].append(time.perf_counter() - start)
        obs_comp.check_decode = checked
        with_checks, without = (1e3 * float(np.median(times[c])) for c in (True, False))
        print(f"| {mode} | {with_checks:.3f} | {without:.3f} | {with_checks / without:.3f} |")


if __name__ == "__main__":
    main()
