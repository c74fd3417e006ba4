"""Replay-buffer benchmark on real rendered frames: size per stored step, add time, sample time.

    python bench/buffer.py                      # walker_walk + quadruped_walk, floor-free gray and RGB + floor
    python bench/buffer.py --settings rgb --tasks walker_walk --steps 2000 --repeats 10 --no-sweep

Frames come from DMC renders under a uniform random policy (action_repeat 2, frame_stack 3) in two
settings: `gray`, the paper's floor-free grayscale frames, and `rgb`, the unmodified benchmark (RGB
with the checkerboard floor). Every figure is measured in this run; sample times are medians of
runs interleaved in a fresh random order, so ratios hold up better than absolute times on a shared
machine. Compression is against DrQ-v2's base of 9x84x84 bytes per stored step.

Per task and setting:
  * main table: `half`, and `full` with its defaults;
  * frontier: `full` with one setting changed from its defaults (key_interval, min_entropy_saving,
    decode_threads), and with byte runs only (entropy=False: no packed residuals): compression
    against sample time;
  * references on the same frames (sizes only, except zstd's decode time): zstd of each frame,
    zstd of the byte difference to the previous frame, lzma over the whole difference stream (no
    random access), x264 in lossless mode with a key frame every 4 and every 250 frames (when the
    ffmpeg of imageio-ffmpeg has libx264), the paper's scheme;
  * with the format sweep (gray only, as the byte-run format was chosen there): format x K x anchor
    codec at several anchor_interval A, sized with the same references as `full`'s byte runs. Only
    `bytes` is a format the store uses, so only its rows have add and sample times, and its model
    size is checked against a runs-only store's real payload. A compressed anchor's sample time is
    the store's plus the measured time to decompress one anchor per transition of a batch.
"""
from __future__ import annotations

import argparse
import lzma
import pathlib
import subprocess
import sys
import tempfile
import time

import lz4.block
import numpy as np
import zstandard

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from envs import make  # noqa: E402  (sets MUJOCO_GL before dm_control loads)
from kernels import KINDS, PREV_PACKED  # noqa: E402
from replay_buffer import ReplayBuffer  # noqa: E402

FRAME_STACK, NSTEP, IMAGE = 3, 3, 84
BASE_BYTES_PER_STEP = 3 * FRAME_STACK * IMAGE * IMAGE  # DrQ-v2 base: RGB 3-frame stack per stored step


SETTINGS = {"gray": dict(grayscale=True, floor=False), "rgb": dict(grayscale=False, floor=True)}


def render_steps(task: str, steps: int, seed: int, setting: str = "gray") -> list:
    """Time steps of a random policy on the task in a SETTINGS setting."""
    env = make(name=task, frame_stack=FRAME_STACK, action_repeat=2, seed=seed, **SETTINGS[setting])
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


def hwc(frames: np.ndarray, channels: int) -> np.ndarray:
    """Frames (N, C*H*W) in pixel-interleaved order (N, H*W*C), as image codecs see them."""
    return frames.reshape(len(frames), channels, -1).transpose(0, 2, 1).reshape(len(frames), -1)


def x264_bytes_per_frame(frames: np.ndarray, channels: int, key_interval: int) -> float | None:
    """Bytes per frame of lossless H.264 (x264, qp 0) with a key frame every `key_interval` frames."""
    try:
        import imageio_ffmpeg
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None
    pix_fmt, codec = ("rgb24", "libx264rgb") if channels == 3 else ("gray", "libx264")
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "frames.mkv"
        cmd = [exe, "-v", "error", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", f"{IMAGE}x{IMAGE}", "-i", "-",
               "-c:v", codec, "-qp", "0", "-preset", "medium", "-g", str(key_interval),
               "-keyint_min", str(key_interval), "-pix_fmt", pix_fmt, str(path)]
        result = subprocess.run(cmd, input=hwc(frames, channels).tobytes(), capture_output=True)
        return path.stat().st_size / len(frames) if result.returncode == 0 else None


def codec_references(frames: np.ndarray, first: np.ndarray, channels: int, cache: dict) -> dict:
    """General-purpose reference points: frame payload bytes per step (and zstd's decode time)."""
    pixels = hwc(frames, channels)
    delta = pixels.copy()
    follows = np.flatnonzero(~first[1:]) + 1  # a frame's difference to the previous one, within an episode
    delta[follows] = pixels[follows] - pixels[follows - 1]
    blobs = [ZSTD.compress(row.tobytes()) for row in delta]
    decompressor = zstandard.ZstdDecompressor()
    decode_us = 1e6 * timed(lambda: [decompressor.decompress(b) for b in blobs], 3) / len(blobs)
    out = {"zstd per frame": sum(len(ZSTD.compress(row.tobytes())) for row in pixels) / len(frames),
           "zstd diff to previous": sum(len(b) for b in blobs) / len(frames),
           "zstd diff decode us": decode_us,
           "lzma diff stream": len(lzma.compress(delta.tobytes())) / len(frames),
           "paper's scheme": model_payload(frames, first, "paper", FRAME_STACK, FRAME_STACK, "raw", cache)}
    for k in (4, 250):
        out[f"x264 lossless K={k}"] = x264_bytes_per_frame(frames, channels, k)
    return out


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


def interleaved_sample_ms(calls: dict, repeats: int, rng: np.random.Generator) -> dict:
    """Median ms of each call, timed in a fresh random order every round."""
    times = {name: [] for name in calls}
    names = list(calls)
    for _ in range(repeats):  # interleaved, so load and cache state hit every variant alike
        for n in rng.permutation(len(names)):
            times[names[n]].append(timed(calls[names[n]], 1))
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def frontier_configs(args: argparse.Namespace) -> dict:
    """`full` settings to measure, each changing one default: name -> ReplayBuffer keyword arguments."""
    configs = {"full": {}, "full, byte runs only": dict(entropy=False)}
    configs.update({f"full key_interval={k}": dict(key_interval=k) for k in args.key_intervals})
    configs.update({f"full min_entropy_saving={b}": dict(min_entropy_saving=b) for b in args.min_entropy_savings})
    configs.update({f"full decode_threads={n}": dict(decode_threads=n) for n in args.decode_threads})
    return configs


def format_sweep(steps: list, frames: np.ndarray, first: np.ndarray, args: argparse.Namespace,
                 cache: dict) -> list[dict]:
    """Format x K x anchor codec x A for the byte-run family, sized with `full`'s run references."""
    configs = [(k, a) for a in args.anchor_intervals for k in args.sweep_key_intervals]
    buffers = {(k, a): fill(steps, "full", args.batch, args.seed, key_interval=k, anchor_interval=a, entropy=False)
               for k, a in configs}
    rng = np.random.default_rng(args.seed)
    sample_ms = interleaved_sample_ms({c: buf.sample for c, (buf, _) in buffers.items()}, args.repeats, rng)
    rows = []
    for (k, a), (buf, add_us) in buffers.items():
        store = buf._frames
        # ring arrays and slot index, the same for every format; not the arena's slack left by wrapping and
        # pages not yet returned (it depends on where the wraps happen to fall)
        overhead = (buf.nbytes - store.arena_nbytes) / len(buf)
        assert abs(model_payload(frames, first, "bytes", k, a, "raw", cache) - store.payload_bytes / len(buf)) < 1e-9, \
            "size model disagrees with the store"
        for fmt in FORMATS:
            for codec in ANCHOR_CODECS:
                per_step = model_payload(frames, first, fmt, k, a, codec, cache) + overhead
                row = dict(format=fmt, K=k, A=a, codec=codec, bytes_per_step=per_step,
                           compression=BASE_BYTES_PER_STEP / per_step, add_us=None, sample_ms=None)
                if fmt == "bytes":
                    row["add_us"] = add_us
                    row["sample_ms"] = sample_ms[k, a] + (0.0 if codec == "raw" else anchor_decompress_ms(
                        frames, first, a, codec, args.batch, args.repeats))
                rows.append(row)
    return rows


def bench_task(task: str, setting: str, args: argparse.Namespace) -> dict:
    """Every measurement of one task in one setting."""
    steps = render_steps(task, args.steps, args.seed, setting)
    channels = steps[0].observation.shape[0] // FRAME_STACK
    frames = np.stack([ts.observation[-channels:].reshape(-1) for ts in steps])
    first = np.array([ts.first() for ts in steps])
    fill(steps[:64], "full", 4, 0)[0].sample()  # compiles (or loads from cache) the numba kernels

    buffers = {"half": fill(steps, "half", args.batch, args.seed)}
    for name, kwargs in frontier_configs(args).items():
        buffers[name] = fill(steps, "full", args.batch, args.seed, **kwargs)
    rng = np.random.default_rng(args.seed)
    gather_ids = rng.integers(0, len(frames), 2 * args.batch * FRAME_STACK)
    calls = {name: buf.sample for name, (buf, _) in buffers.items()}
    calls["numpy gather"] = lambda: np.take(frames, gather_ids, axis=0)
    sample_ms = interleaved_sample_ms(calls, args.repeats, rng)
    rows = []
    for name, (buf, add_us) in buffers.items():
        store = buf._frames
        # decode rows (per thread: two work frames, one frame's residual planes): in nbytes, shown on their own
        scratch = store.decode_scratch_nbytes if name != "half" else 0
        kinds = np.bincount(store._kinds[:len(buf)], minlength=KINDS) if name != "half" else None
        rows.append(dict(config=name, bytes_per_step=buf.nbytes / len(buf), scratch_mb=scratch / 1e6,
                         add_us=add_us, sample_ms=sample_ms[name],
                         entropy_share=None if kinds is None else kinds[PREV_PACKED:].sum() / len(buf)))
    cache: dict = {}
    result = dict(task=task, setting=setting, steps=len(steps), rows=rows, gather_ms=sample_ms["numpy gather"],
                  references=codec_references(frames, first, channels, cache))
    if setting == "gray" and not args.no_sweep:
        result["sweep"] = format_sweep(steps, frames, first, args, cache)
    return result


def print_task(result: dict) -> None:
    """The main table, frontier and references of one task and setting."""
    rows = result["rows"]
    half_ms = rows[0]["sample_ms"]
    print(f"\n{result['task']}, {result['setting']} ({result['steps']} steps); numpy gather of the batch's frames "
          f"{result['gather_ms']:.2f} ms")
    print(f"{'config':32} {'B/step':>7} {'comp':>6} {'add us':>7} {'sample ms':>9} {'vs half':>7} {'entropy':>7} "
          f"{'scratch MB':>10}")
    for row in rows:
        share = "" if row["entropy_share"] is None else f"{100 * row['entropy_share']:6.0f}%"
        print(f"{row['config']:32} {row['bytes_per_step']:7.0f} {BASE_BYTES_PER_STEP / row['bytes_per_step']:5.1f}x "
              f"{row['add_us']:7.1f} {row['sample_ms']:9.2f} {row['sample_ms'] / half_ms:7.2f} {share:>7} "
              f"{row['scratch_mb']:10.1f}")
    print("B/step: every byte the buffer holds over the steps stored, decode scratch included (scratch MB: its "
          "decode rows, which do not grow with the capacity); entropy: share of frames stored as packed residuals")
    refs = result["references"]
    print("references (frame bytes per step, then the ratio against the base as if nothing else were stored):")
    for name, value in refs.items():
        if name == "zstd diff decode us":
            print(f"  zstd diff to previous: decode {value:.1f} us per frame")
        elif value is None:
            print(f"  {name}: n/a (no ffmpeg with libx264)")
        else:
            print(f"  {name}: {value:.0f} B ({BASE_BYTES_PER_STEP / value:.1f}x)")


def print_sweep(result: dict) -> None:
    print(f"\nsweep {result['task']}, {result['setting']}: format x K x anchor codec (A = anchor_interval); frame "
          "payload plus ring arrays, without arena slack; time columns only for the stored format")
    print(f"{'format':6} {'A':>4} {'K':>3} {'codec':5} {'B/step':>7} {'comp':>6} {'add us':>7} {'sample ms':>10}")
    for row in result["sweep"]:
        timing = (f"{row['add_us']:7.1f} {row['sample_ms']:10.2f}" if row["sample_ms"] is not None
                  else f"{'-':>7} {'-':>10}")
        print(f"{row['format']:6} {row['A']:4} {row['K']:3} {row['codec']:5} {row['bytes_per_step']:7.0f} "
              f"{row['compression']:5.1f}x {timing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["walker_walk", "quadruped_walk"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=3000, help="rendered time steps per task (buffer capacity)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--key-intervals", type=int, nargs="*", default=[2, 8],
                        help="key_interval values of the frontier (default 4)")
    parser.add_argument("--min-entropy-savings", type=int, nargs="*", default=[0, 256, 4096],
                        help="min_entropy_saving values (bytes) of the frontier (default 1024)")
    parser.add_argument("--decode-threads", type=int, nargs="*", default=[1],
                        help="decode_threads values of the frontier (default auto: the cores the process may use)")
    parser.add_argument("--sweep-key-intervals", type=int, nargs="+", default=[4, 3, 6, 8, 12],
                        help="K values of the format sweep")
    parser.add_argument("--anchor-intervals", type=int, nargs="+", default=[100, 50, 250],
                        help="A values of the format sweep")
    parser.add_argument("--no-sweep", action="store_true", help="skip the format sweep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"base: {BASE_BYTES_PER_STEP} B per stored step (RGB, {FRAME_STACK}-frame stack); batch {args.batch}, "
          f"nstep {NSTEP}; sample times are medians of {args.repeats} interleaved runs")
    results = [bench_task(task, setting, args) for setting in args.settings for task in args.tasks]
    for result in results:
        print_task(result)
    for result in results:
        if "sweep" in result:
            print_sweep(result)


if __name__ == "__main__":
    main()
