"""Replay buffers at the scale users run: 1M steps of real frames in `half` and `full`.

    python bench/scale.py                          # walker_walk, 1M steps, batch 256
    python bench/scale.py --steps 200000 --no-snapshot

Rendered floor-free grayscale walker_walk steps of a random policy (a few episodes) are added over
and over until the buffer has seen `--steps` steps, so the ring fills and (with --steps above the
capacity) wraps. Per mode it reports the mean and worst single add(), the process's peak resident
memory growth during the fill (VmHWM, reset before the fill, minus VmRSS before it) against the
buffer's final `nbytes`, the median time to sample a batch (both modes interleaved), and the time
to write the buffer into a snapshot.pt and read it back into a fresh buffer (checked to sample
identical batches). Linux only: it reads /proc/self/status.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import snapshot  # noqa: E402
from bench.buffer import FRAME_STACK, NSTEP, render_steps, timed  # noqa: E402
from replay_buffer import ReplayBuffer  # noqa: E402


def memory_kib() -> dict[str, int]:
    """The process's current (VmRSS) and peak (VmHWM) resident memory in KiB."""
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}


def reset_peak() -> None:
    """Start VmHWM over from the current resident size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def make_buffer(steps: list, mode: str, capacity: int, batch: int, seed: int) -> ReplayBuffer:
    return ReplayBuffer(obs_shape=steps[0].observation.shape, action_shape=steps[0].action.shape,
                        capacity=capacity, frame_stack=FRAME_STACK, nstep=NSTEP, discount=0.99,
                        batch_size=batch, compression=mode, seed=seed)


def fill(buf: ReplayBuffer, steps: list, total: int) -> dict:
    """Add `total` steps (cycling through `steps`), timing every add and tracking peak memory."""
    add_s = np.zeros(total)
    reset_peak()
    before = memory_kib()["VmRSS"]
    for i in range(total):
        ts = steps[i % len(steps)]
        start = time.perf_counter()
        buf.add(ts)
        add_s[i] = time.perf_counter() - start
    after = memory_kib()
    return dict(add_mean_us=add_s.mean() * 1e6, add_p999_ms=np.quantile(add_s, 0.999) * 1e3,
                add_max_ms=add_s.max() * 1e3, slowest_step=int(add_s.argmax()),
                peak_growth=(after["VmHWM"] - before) * 1024, final_growth=(after["VmRSS"] - before) * 1024,
                nbytes=buf.nbytes)


def snapshot_round_trip(buf: ReplayBuffer, steps: list, args: argparse.Namespace, directory: pathlib.Path) -> dict:
    """Seconds to save the buffer through snapshot.save and to load it into a fresh buffer; checks the samples."""
    path = directory / f"{buf.compression}.pt"
    cfg = OmegaConf.create({})
    start = time.perf_counter()
    snapshot.save(path, cfg, {"replay": snapshot.to_tensors(buf.state_dict())})
    save_s = time.perf_counter() - start
    size = path.stat().st_size
    start = time.perf_counter()
    restored = make_buffer(steps, buf.compression, args.capacity, args.batch, args.seed + 1)
    restored.load_state_dict(snapshot.to_arrays(snapshot.load(path, cfg)["replay"]))
    load_s = time.perf_counter() - start
    for _ in range(3):
        for mine, theirs in zip(buf.sample(), restored.sample()):
            assert np.array_equal(mine, theirs), "a restored buffer sampled a different batch"
    path.unlink()
    return dict(save_s=save_s, load_s=load_s, file_bytes=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps added to each buffer")
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--rendered", type=int, default=3006, help="rendered steps, cycled (6 walker episodes)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved sample timings per mode")
    parser.add_argument("--modes", nargs="+", default=["half", "full"])
    parser.add_argument("--no-snapshot", action="store_true")
    parser.add_argument("--snapshot-dir", type=pathlib.Path, default=None, help="default: a temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    steps = render_steps(args.task, args.rendered, args.seed)
    while not steps[-1].last():  # cycle at an episode boundary, so the stream stays a valid episode sequence
        steps.pop()
    warm = make_buffer(steps, "full", 64, 4, 0)  # compiles (or loads from cache) the numba kernels
    for ts in steps[:64]:
        warm.add(ts)
    warm.sample()
    del warm

    print(f"{args.task}: {len(steps)} rendered steps cycled to {args.steps} adds, capacity {args.capacity}, "
          f"batch {args.batch}", flush=True)
    buffers, results = {}, {}
    for mode in args.modes:
        buffers[mode] = make_buffer(steps, mode, args.capacity, args.batch, args.seed)
        results[mode] = fill(buffers[mode], steps, args.steps)
        print(f"filled {mode}: {results[mode]}", flush=True)

    rng = np.random.default_rng(args.seed)
    times = {mode: [] for mode in args.modes}
    for _ in range(args.repeats):
        for n in rng.permutation(len(args.modes)):
            mode = args.modes[n]
            times[mode].append(timed(buffers[mode].sample, 1))
    for mode in args.modes:
        results[mode]["sample_ms"] = float(np.median(times[mode])) * 1e3

    if not args.no_snapshot:
        with tempfile.TemporaryDirectory(dir=args.snapshot_dir) as directory:
            for mode in args.modes:
                results[mode].update(snapshot_round_trip(buffers[mode], steps, args, pathlib.Path(directory)))
                print(f"snapshot {mode}: {results[mode]['save_s']:.1f} s save, {results[mode]['load_s']:.1f} s load",
                      flush=True)

    first = args.modes[0]
    print(f"\n{'mode':5} {'nbytes GB':>9} {'peak RSS growth GB':>18} {'peak/nbytes':>11} {'add mean us':>11} "
          f"{'add p99.9 ms':>12} {'add max ms':>10} {'sample ms':>9} {f'vs {first}':>8} {'save s':>6} {'load s':>6}")
    for mode in args.modes:
        r = results[mode]
        snap = f"{r['save_s']:6.1f} {r['load_s']:6.1f}" if "save_s" in r else f"{'-':>6} {'-':>6}"
        print(f"{mode:5} {r['nbytes'] / 1e9:9.3f} {r['peak_growth'] / 1e9:18.3f} {r['peak_growth'] / r['nbytes']:11.3f} "
              f"{r['add_mean_us']:11.1f} {r['add_p999_ms']:12.3f} {r['add_max_ms']:10.2f} {r['sample_ms']:9.2f} "
              f"{r['sample_ms'] / results[first]['sample_ms']:8.2f} {snap}")


if __name__ == "__main__":
    main()
