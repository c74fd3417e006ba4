"""Table II of the paper: SB3 PPO and QR-DQN on ten Atari games, FPS and buffer MB with SB3's buffers and ours.

    python bench/table2.py                                   # the ten games (about an hour on 2 CPU cores)
    python bench/table2.py --games Pong Breakout --qrdqn-steps 20000 --ppo-steps 16384 --buffer-steps 20000
    python bench/table2.py --no-train                        # buffers only: bytes, add and sample times
    python bench/table2.py --sb3x rle-jit zstd-3 zstd3 zstd10 zstd22  # more sb3-extra-buffers settings
    python bench/table2.py --sweep                           # full's key_interval x anchor_interval on the ten games

Per game, one after another:
1. Buffers: one random-policy stream of --buffer-steps transitions from QR-DQN's env (AtariWrapper, 4
   stacked frames, 1 env), added as QR-DQN adds them to SB3's ReplayBuffer, to ours (`half`, `full`)
   and to sb3-extra-buffers' CompressedReplayBuffer (--sb3x settings), all with 100k capacity. Adds
   and samples (batch 32, numpy seeds 0..--samples-1, after one untimed warm-up sample each) go
   round-robin over the buffers, so all see the same load; our samples are checked byte-identical to SB3's. Bytes per transition count every byte
   a buffer holds: capacity-sized arrays over the capacity, stored payload over the transitions stored
   (sb3-extra-buffers: its arrays plus sys.getsizeof of every compressed bytes object).
2. QR-DQN and 3. PPO training (train_atari.py's RL Zoo settings, seed 1, --torch-threads threads):
   SB3's own buffer (base) and `full` (ours), in alternating order from game to game. FPS is agent steps
   over the wall time of learn(); FPS (CPU) the same over the process's CPU time, which other programs
   on a shared machine disturb less. Bytes per step are the buffer's at the end of the run.

MB are MiB at the paper's capacities (100k transitions for QR-DQN, 8 x 128 for PPO): base counts one
4x84x84 stack per transition, as the paper does (SB3's ReplayBuffer actually holds two: column MB SB3);
ours is bytes per step measured in the run times the capacity. The AVG row divides average MB, as the
paper's does. Writes --out/table2_<tag>.md and .csv (training), table2_buffers_<tag>.csv (buffers),
and each run's train.csv under --runs.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_atari  # noqa: E402
from sb3_buffers import CompressedReplayBuffer, sb3_nbytes  # noqa: E402

GAMES = ("Asteroids", "BeamRider", "Breakout", "Enduro", "MsPacman", "Pong", "Qbert", "RoadRunner", "Seaquest",
         "SpaceInvaders")
BASE_BYTES = 4 * 84 * 84  # one stacked observation, as the paper counts a stored transition
CAPACITY = {"qrdqn": 100_000, "ppo": 8 * 128}
MIB = 2 ** 20
BATCH = 32  # QR-DQN's batch size
# The paper's Table II: FPS base, FPS ours, MB base, MB ours, Total Comp
PAPER = {
    "ppo": {"Asteroids": (1605, 1535, 27.6, 2.6, 10.8), "BeamRider": (1339, 1267, 27.6, 7.6, 3.6),
            "Breakout": (1437, 1383, 27.6, 2.0, 14.2), "Enduro": (1117, 1062, 27.6, 3.5, 7.9),
            "MsPacman": (1432, 1389, 27.6, 2.3, 12.1), "Pong": (1582, 1512, 27.6, 2.0, 13.9),
            "Qbert": (1507, 1452, 27.6, 3.0, 9.1), "RoadRunner": (1347, 1267, 27.6, 3.0, 9.0),
            "Seaquest": (1466, 1371, 27.6, 2.9, 9.6), "SpaceInvaders": (1468, 1395, 27.6, 2.4, 11.3),
            "AVG": (1430, 1363, 27.6, 3.1, 8.9)},
    "qrdqn": {"Asteroids": (897, 616, 2694, 265, 10.2), "BeamRider": (792, 547, 2694, 552, 4.9),
              "Breakout": (833, 587, 2694, 190, 14.2), "Enduro": (722, 536, 2694, 306, 8.8),
              "MsPacman": (839, 597, 2694, 219, 12.3), "Pong": (881, 627, 2694, 192, 14.0),
              "Qbert": (849, 608, 2694, 213, 12.7), "RoadRunner": (808, 576, 2694, 290, 9.3),
              "Seaquest": (732, 484, 2694, 278, 9.7), "SpaceInvaders": (861, 607, 2694, 227, 11.9),
              "AVG": (821, 579, 2694, 273, 9.9)},
}
ALGO_LABEL = {"ppo": "PPO", "qrdqn": "QR-DQN"}


def compose(overrides: Sequence[str]) -> Any:
    """train_atari's config with Hydra overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "cfgs_atari"), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def record_stream(game: str, steps: int, seed: int) -> tuple[Any, Any, list]:
    """(observation space, action space, add() arguments) of a uniform random policy in QR-DQN's env."""
    from stable_baselines3.common.vec_env import VecTransposeImage
    venv = VecTransposeImage(train_atari.make_env(compose([f"env={game}NoFrameskip-v4", f"seed={seed}"])))
    rng = np.random.default_rng(seed)
    obs, stream = venv.reset(), []
    for _ in range(steps):  # as OffPolicyAlgorithm._store_transition builds them
        action = rng.integers(0, venv.action_space.n, venv.num_envs)
        new_obs, reward, dones, infos = venv.step(action)
        next_obs = new_obs.copy()
        for e in np.flatnonzero(dones):
            next_obs[e] = infos[e]["terminal_observation"]
        stream.append((obs, next_obs, action, reward, dones, infos))
        obs = new_obs
    venv.close()
    return venv.observation_space, venv.action_space, stream


def sb3x_buffer(setting: str, observation_space: Any, action_space: Any) -> Any:
    """sb3-extra-buffers' CompressedReplayBuffer with a compression setting such as 'zstd-3' or 'rle-jit'."""
    from sb3_extra_buffers.compressed import CompressedReplayBuffer as ExtraReplayBuffer, find_buffer_dtypes
    dtypes = find_buffer_dtypes(observation_space.shape, np.uint8, setting)
    return ExtraReplayBuffer(CAPACITY["qrdqn"], observation_space, action_space, device="cpu",
                             compression_method=setting, dtypes=dtypes)


def bytes_per_step(buffer: Any) -> float:
    """Bytes per transition of a buffer at capacity: its arrays over capacity, its stored payload over what it stores
    (sys.getsizeof of every object in observation arrays of objects, sb3-extra-buffers' compressed bytes)."""
    if hasattr(buffer, "bytes_per_step"):
        return buffer.bytes_per_step
    capacity, stored = buffer.buffer_size * buffer.n_envs, max(buffer.size() * buffer.n_envs, 1)
    arrays = [a for obs in (buffer.observations, getattr(buffer, "next_observations", None)) if obs is not None
              for a in (obs.values() if isinstance(obs, dict) else (obs,))]
    payload = sum(sys.getsizeof(item) for a in arrays if a.dtype == object for item in a[:buffer.size()].reshape(-1))
    return sb3_nbytes(buffer) / capacity + payload / stored


def same_samples(a: Any, b: Any) -> bool:
    """Whether two SB3 sample tuples are byte-identical (values, dtypes, shapes; Dict observations key by key)."""
    import torch

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, dict) or isinstance(y, dict):
            return isinstance(x, dict) and isinstance(y, dict) and list(x) == list(y) and all(same(x[k], y[k]) for k in x)
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and x.shape == y.shape and torch.equal(x, y))
    return all(same(x, y) for x, y in zip(a, b))


def measure_replay(buffers: dict[str, Any], transitions: Sequence[tuple], samples: int,
                   batch: int = BATCH) -> dict[str, dict[str, float]]:
    """Bytes per transition, add µs and sample ms of replay buffers given the same transitions, round-robin; whether
    each samples what the first one does under the same numpy seeds."""
    add_time = dict.fromkeys(buffers, 0.0)
    for transition in transitions:
        for name, buffer in buffers.items():
            start = time.perf_counter()
            buffer.add(*transition)
            add_time[name] += time.perf_counter() - start
    for buffer in buffers.values():  # untimed: the first sample of a process pays for torch's and numba's warm-up
        buffer.sample(batch)
    sample_time = dict.fromkeys(buffers, 0.0)
    equal = dict.fromkeys(buffers, True)
    for seed in range(samples):
        reference = None
        for name, buffer in buffers.items():
            np.random.seed(seed)
            start = time.perf_counter()
            sampled = buffer.sample(batch)
            sample_time[name] += time.perf_counter() - start
            reference = sampled if reference is None else reference
            equal[name] &= same_samples(reference, sampled)
    return {name: {"bytes_per_step": bytes_per_step(buffer), "add_us": add_time[name] / len(transitions) * 1e6,
                   "sample_ms": sample_time[name] / samples * 1e3, "equal_to_sb3": float(equal[name])}
            for name, buffer in buffers.items()}


def measure_buffers(game: str, args: argparse.Namespace, codec: dict[str, Any],
                    stream: Optional[tuple] = None) -> dict[str, dict[str, float]]:
    """Bytes per transition, add µs and sample ms of each buffer on one stream, round-robin; equality with SB3's."""
    from stable_baselines3.common.buffers import ReplayBuffer
    observation_space, action_space, transitions = stream or record_stream(game, args.buffer_steps, args.seed)
    buffers = {"sb3": ReplayBuffer(CAPACITY["qrdqn"], observation_space, action_space, device="cpu")}
    for mode in args.modes:
        buffers[mode] = CompressedReplayBuffer(CAPACITY["qrdqn"], observation_space, action_space, device="cpu",
                                               compression=mode, **codec)
    for setting in args.sb3x:
        buffers[f"sb3x {setting}"] = sb3x_buffer(setting, observation_space, action_space)
    return measure_replay(buffers, transitions, args.samples)


def train_run(game: str, algo: str, mode: str, steps: int, args: argparse.Namespace) -> dict[str, float]:
    """Train with train_atari's settings; FPS over wall and CPU time of learn(), bytes per step at the end."""
    cfg = compose([f"algo={algo}", f"env={game}NoFrameskip-v4", f"compression={mode}", f"seed={args.seed}",
                   f"n_timesteps={steps}", f"device={args.device}", f"torch_threads={args.torch_threads}",
                   *args.extra])
    train_atari.validate_config(cfg)
    run_dir = args.runs / f"{game}_{algo}_{mode}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.torch_threads > 0:
        import torch
        torch.set_num_threads(cfg.torch_threads)
    env = train_atari.make_env(cfg)
    try:
        model = train_atari.make_model(cfg, env, run_dir)
        callback = train_atari.EpisodeLog(run_dir / "train.csv", train_atari.LOSSES[algo], echo=False)
        wall, cpu = time.perf_counter(), time.process_time()
        model.learn(total_timesteps=steps, callback=callback)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        env.close()
    _, per_step = train_atari.buffer_bytes(train_atari.buffer_of(model))
    return {"fps": model.num_timesteps / wall, "fps_cpu": model.num_timesteps / cpu, "bytes_per_step": per_step,
            "steps": model.num_timesteps, "episodes": callback.episodes}


def table_rows(runs: dict, games: Sequence[str]) -> list[dict[str, Any]]:
    """Table II rows (one per algorithm and game, then AVG) from the training runs."""
    rows = []
    for algo in ("ppo", "qrdqn"):
        algo_rows = []
        for game in games:
            base, ours = runs.get((game, algo, "none")), runs.get((game, algo, "full"))
            if base is None or ours is None:
                continue
            mb_ours = ours["bytes_per_step"] * CAPACITY[algo] / MIB
            algo_rows.append({"alg": ALGO_LABEL[algo], "env": game, "fps_base": base["fps"], "fps_ours": ours["fps"],
                              "fps_cpu_base": base["fps_cpu"], "fps_cpu_ours": ours["fps_cpu"],
                              "mb_base": BASE_BYTES * CAPACITY[algo] / MIB, "mb_ours": mb_ours,
                              "mb_sb3": base["bytes_per_step"] * CAPACITY[algo] / MIB,
                              "steps": ours["steps"], "paper": PAPER[algo][game]})
        if algo_rows:
            average = {key: float(np.mean([r[key] for r in algo_rows])) for key in
                       ("fps_base", "fps_ours", "fps_cpu_base", "fps_cpu_ours", "mb_base", "mb_ours", "mb_sb3")}
            algo_rows.append({"alg": ALGO_LABEL[algo], "env": "AVG", **average,
                              "steps": algo_rows[0]["steps"], "paper": PAPER[algo]["AVG"]})
        for row in algo_rows:
            row["total_comp"] = row["mb_base"] / row["mb_ours"]
            row["fps_ratio"] = row["fps_ours"] / row["fps_base"]
            row["fps_cpu_ratio"] = row["fps_cpu_ours"] / row["fps_cpu_base"]
        rows += algo_rows
    return rows


def buffer_rows(measured: dict, games: Sequence[str], sb3x: Sequence[str]) -> list[dict[str, Any]]:
    """Side-by-side rows per game: our buffers and sb3-extra-buffers' settings against SB3's ReplayBuffer."""
    rows = []
    for game in games:
        if game not in measured:
            continue
        m = measured[game]
        row = {"env": game}
        for name, values in m.items():
            for key, value in values.items():
                row[f"{name}:{key}"] = value
        if sb3x:
            best = min(sb3x, key=lambda s: m[f"sb3x {s}"]["bytes_per_step"])
            row["sb3x_best"] = best
        rows.append(row)
    return rows


def fmt(value: float, digits: int = 0) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def render_markdown(rows: list, brows: list, args: argparse.Namespace, wall: float) -> str:
    """The two tables and how they were made."""
    out = [f"# Table II, measured by `python bench/table2.py {' '.join(args.argv)}`".rstrip(), ""]
    if rows:
        out += ["| Alg | Env | FPS (base) | FPS (ours) | ours/base | ours/base (CPU time) | MB (base) | MB (ours) | "
                "Total Comp | MB (SB3) | paper: FPS base / ours | paper: MB ours | paper: Total Comp |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            p = r["paper"]
            label = "**AVG**" if r["env"] == "AVG" else r["env"]
            out.append(f"| {r['alg']} | {label} | {fmt(r['fps_base'])} | {fmt(r['fps_ours'])} | {r['fps_ratio']:.2f} | "
                       f"{r['fps_cpu_ratio']:.2f} | {fmt(r['mb_base'], 1)} | {fmt(r['mb_ours'], 1)} | "
                       f"{r['total_comp']:.1f}× | {fmt(r['mb_sb3'], 1)} | {p[0]} / {p[1]} | {p[3]} | {p[4]}× |")
        steps = {r["alg"]: r["steps"] for r in rows}
        out += ["", f"Training runs: {', '.join(f'{a} {s:,} steps' for a, s in steps.items())} per run, seed "
                f"{args.seed}, torch threads {args.torch_threads}, device {args.device}."]
    if brows:
        sb3x = list(args.sb3x)
        out += ["", f"## Buffers on the same {args.buffer_steps:,} random-policy transitions (QR-DQN env, capacity 100k, "
                f"batch {BATCH}, {args.samples} samples)", "",
                "| Env | SB3 B/step | half B/step | full B/step | full comp | sb3x best | sb3x B/step | full / sb3x bytes | "
                "add µs SB3 / full / sb3x | sample ms SB3 / full / sb3x | full sample / SB3 | byte-identical to SB3 |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in brows:
            best = f"sb3x {r['sb3x_best']}" if sb3x else None
            bb = r.get(f"{best}:bytes_per_step") if best else None
            full = r.get("full:bytes_per_step")
            identical = ", ".join(k.split(":")[0] for k, v in r.items() if k.endswith(":equal_to_sb3") and v == 1.0
                                  and not k.startswith("sb3:"))
            out.append(
                f"| {r['env']} | {fmt(r['sb3:bytes_per_step'])} | {fmt(r.get('half:bytes_per_step'))} | {fmt(full)} | "
                f"{BASE_BYTES / full:.1f}× | {r.get('sb3x_best', '–')} | {fmt(bb)} | "
                f"{(full / bb) if bb else math.nan:.2f} | "
                f"{fmt(r['sb3:add_us'])} / {fmt(r['full:add_us'])} / {fmt(r.get(f'{best}:add_us') if best else None)} | "
                f"{r['sb3:sample_ms']:.2f} / {r['full:sample_ms']:.2f} / "
                f"{fmt(r.get(f'{best}:sample_ms') if best else None, 2)} | "
                f"{r['full:sample_ms'] / r['sb3:sample_ms']:.2f} | {identical} |")
        if sb3x:
            out += ["", "sb3-extra-buffers, every setting measured (bytes per transition / add µs / sample ms):", "",
                    "| Env | " + " | ".join(sb3x) + " |", "|---|" + "---:|" * len(sb3x)]
            for r in brows:
                cells = [f"{fmt(r[f'sb3x {s}:bytes_per_step'])} / {fmt(r[f'sb3x {s}:add_us'])} / "
                         f"{r[f'sb3x {s}:sample_ms']:.2f}" for s in sb3x]
                out.append(f"| {r['env']} | " + " | ".join(cells) + " |")
    out += ["", f"Wall time {wall / 60:.1f} min."]
    return "\n".join(out) + "\n"


def write_csv(rows: list, path: pathlib.Path) -> None:
    if not rows:
        return
    fields = sorted({key for row in rows for key in row if key != "paper"}, key=lambda k: (k not in ("alg", "env"), k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "paper"})


def sweep(args: argparse.Namespace) -> str:
    """full's bytes per transition and times over key_interval x anchor_interval, on each game's stream."""
    from tqdm import tqdm
    results = {}
    args.modes, args.sb3x = ("full",), ()
    grid = [(k, a, e) for e in args.entropy for k in args.key_intervals for a in args.anchor_intervals]
    for game in tqdm(args.games, unit="game"):
        stream = record_stream(game, args.buffer_steps, args.seed)
        for k, a, e in grid:
            codec = dict(key_interval=k, anchor_interval=a, entropy=e == "on")
            results[game, k, a, e] = measure_buffers(game, args, codec, stream)
    out = [f"# full's codec settings on Atari, measured by `python bench/table2.py {' '.join(args.argv)}`", "",
           f"{args.buffer_steps:,} random-policy transitions per game (QR-DQN env), capacity 100k; bytes per "
           f"transition (every byte), compression against 4x84x84 per transition, add µs, sample ms (batch {BATCH}) "
           "relative to SB3's ReplayBuffer's in the same round-robin.", "",
           "| entropy | key_interval | anchor_interval | mean B/step | compression (of mean) | worst game | worst comp | "
           "add µs | sample / SB3 (mean) | sample / SB3 (worst) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for k, a, e in grid:
        per_game = {g: results[g, k, a, e]["full"]["bytes_per_step"] for g in args.games}
        worst = max(per_game, key=per_game.get)
        mean = float(np.mean(list(per_game.values())))
        add = np.mean([results[g, k, a, e]["full"]["add_us"] for g in args.games])
        ratios = [results[g, k, a, e]["full"]["sample_ms"] / results[g, k, a, e]["sb3"]["sample_ms"] for g in args.games]
        out.append(f"| {e} | {k} | {a} | {mean:,.0f} | {BASE_BYTES / mean:.1f}× | {worst} | "
                   f"{BASE_BYTES / per_game[worst]:.1f}× | {add:.0f} | {np.mean(ratios):.2f} | {max(ratios):.2f} |")
    out += ["", "Per game, bytes per transition / sample time relative to SB3's:", "",
            "| entropy | key_interval | anchor_interval | " + " | ".join(args.games) + " |",
            "|---|---:|---:|" + "---:|" * len(args.games)]
    for k, a, e in grid:
        out.append(f"| {e} | {k} | {a} | " + " | ".join(
            f"{results[g, k, a, e]['full']['bytes_per_step']:,.0f} / "
            f"{results[g, k, a, e]['full']['sample_ms'] / results[g, k, a, e]['sb3']['sample_ms']:.2f}"
            for g in args.games) + " |")
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--games", nargs="+", default=list(GAMES), choices=GAMES)
    p.add_argument("--algos", nargs="+", default=["ppo", "qrdqn"], choices=["ppo", "qrdqn"])
    p.add_argument("--qrdqn-steps", type=int, default=1500, help="agent steps per QR-DQN training run")
    p.add_argument("--ppo-steps", type=int, default=2048, help="agent steps per PPO training run (8 x 128 per rollout)")
    p.add_argument("--buffer-steps", type=int, default=3000, help="transitions of the buffer comparison's stream")
    p.add_argument("--samples", type=int, default=100, help="sample() calls per buffer")
    p.add_argument("--sb3x", nargs="*", default=["rle-jit", "zstd-3", "zstd3", "zstd10"],
                   help="sb3-extra-buffers compression settings to measure")
    p.add_argument("--modes", nargs="+", default=["half", "full"], choices=["half", "full"])
    p.add_argument("--no-train", action="store_true", help="buffers only")
    p.add_argument("--no-buffers", action="store_true", help="training runs only")
    p.add_argument("--sweep", action="store_true", help="sweep full's key_interval x anchor_interval instead")
    p.add_argument("--key-intervals", nargs="+", type=int, default=[2, 3, 4, 6])
    p.add_argument("--anchor-intervals", nargs="+", type=int, default=[50, 100, 200, 400])
    p.add_argument("--entropy", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="obs_comp's entropy-coded differences in the sweep")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="cpu", help="output names: table2_<tag>.md / .csv")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    p.add_argument("--runs", type=pathlib.Path, default=ROOT / "exp_local" / "table2",
                   help="where the training runs write train.csv")
    p.add_argument("--extra", nargs="*", default=[], help="more train_atari overrides for every training run")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.sweep:
        text = sweep(args) + f"\nWall time {(time.perf_counter() - start) / 60:.1f} min.\n"
        (args.out / f"table2_sweep_{args.tag}.md").write_text(text)
        print(text)
        return 0
    jobs = []
    for i, game in enumerate(args.games):
        if not args.no_buffers:
            jobs.append((game, "buffers", None))
        if not args.no_train:
            for algo in args.algos:
                modes = ("none", "full") if i % 2 == 0 else ("full", "none")  # alternate which runs first
                jobs += [(game, algo, mode) for mode in modes]
    measured, runs = {}, {}
    codec = {k: compose([]).compression[k] for k in ("key_interval", "anchor_interval")}
    bar = tqdm(jobs, unit="job")
    for game, kind, mode in bar:
        bar.set_postfix_str(f"{game} {kind} {mode or ''}")
        if kind == "buffers":
            measured[game] = measure_buffers(game, args, codec)
            full, sb3 = measured[game]["full"], measured[game]["sb3"]
            tqdm.write(f"{game}: full {full['bytes_per_step']:,.0f} B/step ({BASE_BYTES / full['bytes_per_step']:.1f}×), "
                       f"add {full['add_us']:.0f} µs, sample {full['sample_ms'] / sb3['sample_ms']:.2f}× SB3's")
        else:
            steps = args.qrdqn_steps if kind == "qrdqn" else args.ppo_steps
            runs[game, kind, mode] = runs_entry = train_run(game, kind, mode, steps, args)
            tqdm.write(f"{game} {kind} {mode}: {runs_entry['fps']:.0f} fps, {runs_entry['bytes_per_step']:,.0f} B/step")
    rows = table_rows(runs, args.games)
    brows = buffer_rows(measured, args.games, args.sb3x)
    text = render_markdown(rows, brows, args, time.perf_counter() - start)
    (args.out / f"table2_{args.tag}.md").write_text(text)
    write_csv(rows, args.out / f"table2_{args.tag}.csv")
    write_csv(brows, args.out / f"table2_buffers_{args.tag}.csv")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
