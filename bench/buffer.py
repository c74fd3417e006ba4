"""Replay-buffer benchmark on real rendered frames: size per stored step, add time, sample time.

    python bench/buffer.py                       # walker_walk and quadruped_walk, 3000 steps each
    python bench/buffer.py --tasks walker_walk --steps 2000 --repeats 20 --no-sweep

Frames come from floor-free grayscale DMC renders under a uniform random policy (action_repeat 2,
frame_stack 3). Every figure is measured in this run; ratios are taken between runs interleaved
in the same loop, so they hold up better than the absolute times on a shared machine.

The sweep (format x key_interval K x anchor codec, at several anchor_interval A) sizes every
format on the same frames with the same anchor/key/frame references as `full`. Only `bytes` is
the format `obs_comp.DiffFrames` stores, so only its rows have add and sample times; its model
size is checked against the store's real payload. A compressed anchor's sample time is the
store's plus the measured time to decompress one anchor per transition of a batch (as in a
large buffer, where sampled transitions rarely share an anchor).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import lz4.block
import numpy as np
import zstandard

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from envs import make  # noqa: E402  (sets MUJOCO_GL before dm_control loads)
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


def bytes_runs_size(frame: np.ndarray, ref: np.ndarray) -> int:
    """obs_comp's run format: uint8 (skip, length) pairs, runs merged over gaps of <= 2 equal bytes."""
    changed = np.flatnonzero(frame != ref)
    if len(changed) == 0:
        return 0
    breaks = np.flatnonzero(np.diff(changed) > 3)
    starts = changed[np.r_[0, breaks + 1]]
    stops = changed[np.r_[breaks, len(changed) - 1]] + 1
    skips = starts - np.r_[0, stops[:-1]]
    lengths = stops - starts
    pairs = np.maximum(skips - 1, 0) // 255 + (lengths + 254) // 255
    return int(2 * pairs.sum() + lengths.sum())


def word_runs_size(frame: np.ndarray, ref: np.ndarray) -> int:
    """Runs of differing 32-bit words, one uint16 (start, length) word per run (this repo's first format)."""
    changed = np.pad(frame, (0, -frame.size % 4)).view(np.uint32) != np.pad(ref, (0, -ref.size % 4)).view(np.uint32)
    runs = np.count_nonzero(np.diff(changed.astype(np.int8), prepend=0) == 1)
    return 4 * (runs + int(changed.sum()))


FORMATS = {
    "bytes": bytes_runs_size,
    "words": word_runs_size,
    "pos3": lambda frame, ref: 3 * int(np.count_nonzero(frame != ref)),   # uint16 position + uint8 difference
    "paper": lambda frame, ref: 4 * int(np.count_nonzero(frame != ref)),  # the paper's 4 B per changed pixel
}
ZSTD = zstandard.ZstdCompressor(level=3)
# (compress, decompress) of an anchor frame's bytes
ANCHOR_CODECS = {
    "raw": (bytes, lambda blob, size: blob),
    "lz4": (lambda data: lz4.block.compress(data, store_size=False),
            lambda blob, size: lz4.block.decompress(blob, uncompressed_size=size)),
    "zstd": (ZSTD.compress, lambda blob, size, d=zstandard.ZstdDecompressor(): d.decompress(blob)),
}


def references(first: np.ndarray, key_interval: int, anchor_interval: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: its reference frame id (itself for anchors) and whether it is an anchor, as DiffFrames assigns them."""
    position = np.zeros(len(first), dtype=np.int64)
    for i in range(1, len(first)):
        position[i] = 0 if first[i] else position[i - 1] + 1
    in_span = position % anchor_interval
    ids = np.arange(len(first))
    ref = np.where(in_span % key_interval == 0, ids - in_span, ids - in_span % key_interval)
    return ref, in_span == 0


def model_payload(frames: np.ndarray, first: np.ndarray, fmt: str, key_interval: int, anchor_interval: int,
                  codec: str, cache: dict) -> float:
    """Frame payload bytes per step of `fmt` under `full`'s references (raw fallback; empty frames take 1 byte)."""
    ref, anchor = references(first, key_interval, anchor_interval)
    size = frames.shape[1]
    total = 0
    for i in range(len(frames)):
        if anchor[i]:
            key = (codec, i)
            if key not in cache:
                cache[key] = len(ANCHOR_CODECS[codec][0](frames[i].tobytes()))
        else:
            key = (fmt, i, int(ref[i]))
            if key not in cache:
                cache[key] = max(min(FORMATS[fmt](frames[i], frames[ref[i]]), size), 1)
        total += cache[key]
    return total / len(frames)


def anchor_decompress_ms(frames: np.ndarray, first: np.ndarray, anchor_interval: int, codec: str,
                         batch: int, repeats: int) -> float:
    """Median ms to decompress `batch` anchors: in a 1M-step buffer nearly every sampled transition has its own."""
    anchors = np.flatnonzero(references(first, 1, anchor_interval)[1])
    compress, decompress = ANCHOR_CODECS[codec]
    blobs = [compress(frames[a].tobytes()) for a in anchors]
    blobs = [blobs[i % len(blobs)] for i in range(batch)]
    return 1e3 * timed(lambda: [decompress(b, frames.shape[1]) for b in blobs], repeats)


def zstd_context(frames: np.ndarray, first: np.ndarray) -> dict:
    """General-purpose reference points: zstd per frame, and per group of a key frame and its deltas."""
    per_frame = sum(len(ZSTD.compress(f.tobytes())) for f in frames) / len(frames)
    ref, _ = references(first, FRAME_STACK, FRAME_STACK)
    groups = 0
    for key in np.unique(ref):
        members = np.flatnonzero(ref == key)
        deltas = [frames[key]] + [frames[m] - frames[key] for m in members if m != key]
        groups += len(ZSTD.compress(np.concatenate(deltas).tobytes()))
    return {"zstd per frame": per_frame, "zstd per key group": groups / len(frames)}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def fill(steps: list, compression: str, batch: int, seed: int, **store_kwargs) -> tuple[ReplayBuffer, float]:
    """A buffer holding `steps`, and the mean add time per step in microseconds."""
    buf = ReplayBuffer(obs_shape=steps[0].observation.shape, action_shape=steps[0].action.shape,
                       capacity=len(steps), frame_stack=FRAME_STACK, nstep=NSTEP, discount=0.99,
                       batch_size=batch, compression=compression, seed=seed, **store_kwargs)
    buf.add(steps[0])
    start = time.perf_counter()
    for ts in steps[1:]:
        buf.add(ts)
    return buf, (time.perf_counter() - start) / (len(steps) - 1) * 1e6


def bench_task(task: str, args: argparse.Namespace) -> tuple[list[dict], list[dict], dict]:
    steps = render_steps(task, args.steps, args.seed)
    frames = np.stack([ts.observation[-1].reshape(-1) for ts in steps])
    first = np.array([ts.first() for ts in steps])
    fill(steps[:64], "full", 4, 0)[0].sample()  # compiles (or loads from cache) the numba kernels

    configs = [(k, a) for a in args.anchor_intervals for k in args.key_intervals]
    buffers = {"half": fill(steps, "half", args.batch, args.seed)}
    for k, a in configs:
        buffers[k, a] = fill(steps, "full", args.batch, args.seed, key_interval=k, anchor_interval=a)
    rng = np.random.default_rng(args.seed)
    gather_ids = rng.integers(0, len(frames), 2 * args.batch * FRAME_STACK)
    calls = {name: buf.sample for name, (buf, _) in buffers.items()}
    calls["gather"] = lambda: np.take(frames, gather_ids, axis=0)
    times = {name: [] for name in calls}
    names = list(calls)
    for _ in range(args.repeats):  # interleaved in a fresh order, so load and cache state hit every variant alike
        for n in rng.permutation(len(names)):
            times[names[n]].append(timed(calls[names[n]], 1))
    sample_ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}

    half_buf, half_add = buffers["half"]
    main = [dict(mode="half", bytes_per_step=half_buf.nbytes / len(half_buf), add_us=half_add,
                 sample_ms=sample_ms["half"])]
    default_k, default_a = args.key_intervals[0], args.anchor_intervals[0]
    sweep, cache = [], {}
    for k, a in configs:
        buf, add_us = buffers[k, a]
        store = buf._frames
        # ring arrays and slot index, the same for every format; arena slack left by growth is not
        # (it depends on where the growth steps happen to fall) and only the main table counts it
        overhead = (buf.nbytes - store.content_nbytes) / len(buf)
        assert abs(model_payload(frames, first, "bytes", k, a, "raw", cache) - store.payload_bytes / len(buf)) < 1e-9, \
            "size model disagrees with the store"
        if (k, a) == (default_k, default_a):
            paper = model_payload(frames, first, "paper", FRAME_STACK, FRAME_STACK, "raw", cache) + overhead
            main.append(dict(mode="full", bytes_per_step=buf.nbytes / len(buf), add_us=add_us,
                             sample_ms=sample_ms[k, a]))
        for fmt in FORMATS:
            for codec in ANCHOR_CODECS:
                per_step = model_payload(frames, first, fmt, k, a, codec, cache) + overhead
                row = dict(format=fmt, K=k, A=a, codec=codec, bytes_per_step=per_step,
                           compression=BASE_BYTES_PER_STEP / per_step, add_us=None, sample_ms=None)
                if fmt == "bytes":
                    row["add_us"] = add_us
                    row["sample_ms"] = sample_ms[k, a] + (0.0 if codec == "raw" else anchor_decompress_ms(
                        frames, first, a, codec, args.batch, args.repeats))
                sweep.append(row)
    summary = dict(steps=len(steps), gather_ms=sample_ms["gather"], paper_x=BASE_BYTES_PER_STEP / paper,
                   **zstd_context(frames, first))
    return main, sweep, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["walker_walk", "quadruped_walk"])
    parser.add_argument("--steps", type=int, default=3000, help="rendered time steps per task (buffer capacity)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--key-intervals", type=int, nargs="+", default=[4, 3, 6, 8, 12],
                        help="K values for `full`; the first is the main table's")
    parser.add_argument("--anchor-intervals", type=int, nargs="+", default=[100, 50, 250],
                        help="A values for `full`; the first is the main table's")
    parser.add_argument("--no-sweep", action="store_true", help="only the default K and A")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.no_sweep:
        args.key_intervals, args.anchor_intervals = args.key_intervals[:1], args.anchor_intervals[:1]

    print(f"base: {BASE_BYTES_PER_STEP} B per stored step (RGB, {FRAME_STACK}-frame stack); batch {args.batch}; "
          f"medians of {args.repeats} interleaved runs; full: K={args.key_intervals[0]}, A={args.anchor_intervals[0]}")
    results = []
    for task in args.tasks:
        main_rows, sweep, summary = bench_task(task, args)
        results.append((task, main_rows, sweep, summary))
        half_ms = main_rows[0]["sample_ms"]
        print(f"\n{task} ({summary['steps']} steps)")
        print(f"{'mode':5} {'B/step':>8} {'comp':>6} {'add us':>7} {'sample ms':>10} {'vs half':>8} {'vs gather':>9}")
        for row in main_rows:
            print(f"{row['mode']:5} {row['bytes_per_step']:8.0f} {BASE_BYTES_PER_STEP / row['bytes_per_step']:5.1f}x "
                  f"{row['add_us']:7.1f} {row['sample_ms']:10.2f} {row['sample_ms'] / half_ms:8.2f} "
                  f"{row['sample_ms'] / summary['gather_ms']:9.2f}")
        print(f"numpy gather of 2x{args.batch}x{FRAME_STACK} frames: {summary['gather_ms']:.2f} ms; "
              f"paper's scheme (raw key every {FRAME_STACK} frames, 4 B per changed pixel): {summary['paper_x']:.1f}x")
        print(f"frame bytes per step for reference: zstd per frame {summary['zstd per frame']:.0f}, "
              f"zstd per key group (K={FRAME_STACK}, key + deltas) {summary['zstd per key group']:.0f}")
    for task, _, sweep, _ in results:
        print(f"\nsweep {task}: format x K x anchor codec (A = anchor_interval); frame payload plus ring arrays, "
              "without arena growth slack; time columns only for the stored format")
        print(f"{'format':6} {'A':>4} {'K':>3} {'codec':5} {'B/step':>7} {'comp':>6} {'add us':>7} {'sample ms':>10}")
        for row in sweep:
            timing = (f"{row['add_us']:7.1f} {row['sample_ms']:10.2f}" if row["sample_ms"] is not None
                      else f"{'-':>7} {'-':>10}")
            print(f"{row['format']:6} {row['A']:4} {row['K']:3} {row['codec']:5} {row['bytes_per_step']:7.0f} "
                  f"{row['compression']:5.1f}x {timing}")


if __name__ == "__main__":
    main()
