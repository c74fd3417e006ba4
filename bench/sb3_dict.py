"""Dict and n-step replay and Dict rollouts on Atari frames: our buffers against SB3's own and sb3-extra-buffers'.

    python bench/sb3_dict.py                                          # the ten games of Table II, 20k steps each
    python bench/sb3_dict.py --games Pong --steps 2000 --samples 20   # a quick look

Per game, one random-policy stream from QR-DQN's env (AtariWrapper, 1 env) is added, as QR-DQN adds it, to
every replay buffer round-robin (capacity 100k), observed as a Dict of
  camera: the 4 stacked 84x84 gray frames (4, 84, 84), as train_atari's QR-DQN sees them;
  rgb:    a second camera, the game's RGB screen resized to (84, 84, 3), one frame, channels last;
  proprio: the console's 128 RAM bytes / 255 as float32 (a proprioception-like vector).
The rgb and proprio of a next_obs at an episode's end are the reset screen's (the env has reset by then).
Buffers: SB3's DictReplayBuffer against ours (`full`, `half`) and sb3-extra-buffers' CompressedDictReplayBuffer
(--sb3x settings); the camera alone through SB3's NStepReplayBuffer (--n-steps, gamma 0.99) against our
CompressedNStepReplayBuffer, and through SB3's ReplayBuffer against our CompressedReplayBuffer (the 1-step
bytes the n-step ones should match). Samples (batch --batch, numpy seeds 0..--samples-1 after one untimed
warm-up sample each) go round-robin too and are checked byte for byte against SB3's buffer of their kind.
Rollouts: PPO's env (8 envs x 128 steps, --rollouts of them): SB3's DictRolloutBuffer against our
CompressedDictRolloutBuffer on {camera, proprio} (every minibatch of get(64) compared), and our Dict buffer on
{camera} alone against our CompressedRolloutBuffer on the same frames (bytes per step).
DMC: train_atari's SAC env (--dmc-task, rendered as DrQ-v2 renders it, {camera, proprio}, 3 stacked frames),
--dmc-steps random-action steps through SB3's DictReplayBuffer, ours and sb3-extra-buffers'.
Bytes per step count every byte a buffer holds: capacity-sized arrays over the capacity, stored payload over
the steps stored. Writes --out/sb3_dict_<tag>.md and .csv.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import table2  # noqa: E402
from sb3_buffers import (CompressedDictReplayBuffer, CompressedDictRolloutBuffer, CompressedNStepReplayBuffer,  # noqa: E402
                         CompressedReplayBuffer, CompressedRolloutBuffer)

CAPACITY = 100_000
GAMMA = 0.99
ROLLOUT_STEPS, MINIBATCH = 128, 64  # PPO's n_steps per env (train_atari: 8 envs)


def dict_space(camera: Any) -> Any:
    """The Dict observation space: the stacked camera, a single-frame RGB camera and a float32 vector."""
    from gymnasium import spaces
    return spaces.Dict({"camera": camera, "rgb": spaces.Box(0, 255, (84, 84, 3), np.uint8),
                        "proprio": spaces.Box(0.0, 1.0, (128,), np.float32)})


def extra_keys(venv: Any) -> dict[str, np.ndarray]:
    """Each env's current RGB screen (84, 84, 3) and RAM / 255 (float32), stacked over envs."""
    import cv2
    ales = [env.unwrapped.ale for env in venv.unwrapped.envs]
    rgb = np.stack([cv2.resize(ale.getScreenRGB(), (84, 84), interpolation=cv2.INTER_AREA) for ale in ales])
    return {"rgb": rgb, "proprio": np.stack([ale.getRAM() for ale in ales]).astype(np.float32) / 255}


def make_venv(game: str, seed: int, algo: str) -> Any:
    """train_atari's env of the algorithm, its camera frames channels first (as SB3's CnnPolicy stores them)."""
    from stable_baselines3.common.vec_env import VecTransposeImage
    cfg = table2.compose([f"algo={algo}", f"env={game}NoFrameskip-v4", f"seed={seed}"])
    return VecTransposeImage(table2.train_atari.make_env(cfg))


def replay_buffers(space: Any, action_space: Any, sb3x: Sequence[str], n_steps: int,
                   stacks: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The replay buffers, by kind ('dict' ones take Dict observations, the others the camera); the first of each
    kind is SB3's, the reference."""
    from stable_baselines3.common.buffers import DictReplayBuffer, NStepReplayBuffer, ReplayBuffer
    camera = space["camera"]
    kinds = {"dict": {"sb3": DictReplayBuffer(CAPACITY, space, action_space, device="cpu")}}
    for mode in ("half", "full"):
        kinds["dict"][mode] = CompressedDictReplayBuffer(CAPACITY, space, action_space, device="cpu", compression=mode,
                                                         frame_stack=stacks)
    for setting in sb3x:
        from sb3_extra_buffers.compressed import CompressedDictReplayBuffer as ExtraDictReplayBuffer, find_buffer_dtypes
        dtypes = find_buffer_dtypes(camera.shape, np.uint8, setting)
        kinds["dict"][f"sb3x {setting}"] = ExtraDictReplayBuffer(CAPACITY, space, action_space, device="cpu",
                                                                 compression_method=setting, dtypes=dtypes)
    if n_steps:
        kinds["nstep"] = {"sb3": NStepReplayBuffer(CAPACITY, camera, action_space, device="cpu", n_steps=n_steps,
                                                   gamma=GAMMA),
                          "full": CompressedNStepReplayBuffer(CAPACITY, camera, action_space, device="cpu",
                                                              n_steps=n_steps, gamma=GAMMA,
                                                              frame_stack=stacks["camera"])}
        kinds["box"] = {"sb3": ReplayBuffer(CAPACITY, camera, action_space, device="cpu"),
                        "full": CompressedReplayBuffer(CAPACITY, camera, action_space, device="cpu",
                                                       frame_stack=stacks["camera"])}
    return kinds


def atari_stream(venv: Any, steps: int, seed: int) -> Iterator[tuple]:
    """add() arguments of a uniform random policy, observations as Dicts {camera, rgb, proprio}."""
    rng = np.random.default_rng(seed)
    obs = {"camera": venv.reset(), **extra_keys(venv)}
    for _ in range(steps):  # as OffPolicyAlgorithm._store_transition builds them
        action = rng.integers(0, venv.action_space.n, venv.num_envs)
        new_obs, reward, dones, infos = venv.step(action)
        next_camera = new_obs.copy()
        for e in np.flatnonzero(dones):
            next_camera[e] = infos[e]["terminal_observation"]
        new = {"camera": new_obs, **extra_keys(venv)}
        yield obs, {**new, "camera": next_camera}, action, reward, dones, infos
        obs = new


def dmc_stream(venv: Any, steps: int, seed: int) -> Iterator[tuple]:
    """add() arguments of uniform random actions on a DMC task observed as {camera, proprio} (envs.gym_dmc)."""
    rng = np.random.default_rng(seed)
    low, high = venv.action_space.low, venv.action_space.high
    obs = venv.reset()
    for _ in range(steps):
        action = rng.uniform(low, high, (venv.num_envs, *low.shape)).astype(np.float32)
        new_obs, reward, dones, infos = venv.step(action)
        next_obs = {key: value.copy() for key, value in new_obs.items()}
        for e in np.flatnonzero(dones):
            for key in next_obs:
                next_obs[key][e] = infos[e]["terminal_observation"][key]
        yield obs, next_obs, action, reward, dones, infos
        obs = new_obs


def measure(kinds: dict[str, dict[str, Any]], stream: Iterator[tuple], args: argparse.Namespace
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Bytes per step, add µs, sample ms and byte-identity to SB3's of every buffer, adds and samples round-robin."""
    add_time = {kind: dict.fromkeys(buffers, 0.0) for kind, buffers in kinds.items()}
    steps = 0
    for obs, next_obs, *rest in stream:
        steps += 1
        for kind, buffers in kinds.items():
            observed = (obs, next_obs) if kind == "dict" else (obs["camera"], next_obs["camera"])
            for name, buffer in buffers.items():
                start = time.perf_counter()
                buffer.add(*observed, *rest)
                add_time[kind][name] += time.perf_counter() - start
    results = {}
    for kind, buffers in kinds.items():
        for buffer in buffers.values():  # untimed: the first sample pays for torch's and numba's warm-up
            buffer.sample(args.batch)
        sample_time, equal = dict.fromkeys(buffers, 0.0), dict.fromkeys(buffers, True)
        for seed in range(args.samples):
            reference = None
            for name, buffer in buffers.items():
                np.random.seed(seed)
                start = time.perf_counter()
                batch = buffer.sample(args.batch)
                sample_time[name] += time.perf_counter() - start
                reference = batch if reference is None else reference
                equal[name] &= table2.same_samples(reference, batch)
        results[kind] = {name: {"bytes_per_step": table2.bytes_per_step(buffer), "add_us": add_time[kind][name] / steps
                                * 1e6, "sample_ms": sample_time[name] / args.samples * 1e3,
                                "equal_to_sb3": float(equal[name])}
                         for name, buffer in buffers.items()}
    return results


def measure_replay(game: str, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Every replay buffer on one game's stream."""
    venv = make_venv(game, args.seed, "qrdqn")
    try:
        kinds = replay_buffers(dict_space(venv.observation_space), venv.action_space, args.sb3x, args.n_steps,
                               {"camera": 4, "rgb": 1})
        return measure(kinds, atari_stream(venv, args.steps, args.seed), args)
    finally:
        venv.close()


def measure_dmc(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The Dict replay buffers on train_atari's SAC env: a DMC task's 3 stacked RGB frames and its state."""
    cfg = table2.compose(["algo=sac", f"env={args.dmc_task}", f"seed={args.seed}"])
    venv = table2.train_atari.make_env(cfg)
    try:
        kinds = replay_buffers(venv.observation_space, venv.action_space, args.sb3x, 0,
                               {"camera": cfg.algo.frame_stack})
        return measure(kinds, dmc_stream(venv, args.dmc_steps, args.seed), args)["dict"]
    finally:
        venv.close()


def measure_rollouts(game: str, args: argparse.Namespace) -> dict[str, float]:
    """Dict rollouts: bytes per step of ours and SB3's, minibatches compared; ours on {camera} against the Box buffer."""
    import torch
    from gymnasium import spaces
    from stable_baselines3.common.buffers import DictRolloutBuffer
    venv = make_venv(game, args.seed, "ppo")
    camera = venv.observation_space
    space = spaces.Dict({"camera": camera, "proprio": dict_space(camera)["proprio"]})
    camera_only = spaces.Dict({"camera": camera})
    n_envs = venv.num_envs
    options = dict(device="cpu", gamma=GAMMA, n_envs=n_envs)
    buffers = {"sb3": DictRolloutBuffer(ROLLOUT_STEPS, space, venv.action_space, **options),
               "full": CompressedDictRolloutBuffer(ROLLOUT_STEPS, space, venv.action_space, **options),
               "full camera": CompressedDictRolloutBuffer(ROLLOUT_STEPS, camera_only, venv.action_space, **options),
               "box": CompressedRolloutBuffer(ROLLOUT_STEPS, camera, venv.action_space, **options)}
    rng = np.random.default_rng(args.seed)
    obs, starts = venv.reset(), np.ones(n_envs, dtype=bool)
    per_step, equal = {name: [] for name in buffers}, True
    for _ in range(args.rollouts):
        for buffer in buffers.values():
            buffer.reset()
        for _ in range(ROLLOUT_STEPS):  # as OnPolicyAlgorithm.collect_rollouts adds them
            action = rng.integers(0, venv.action_space.n, n_envs)
            value = torch.as_tensor(rng.normal(size=n_envs), dtype=torch.float32)
            log_prob = torch.as_tensor(rng.normal(size=n_envs), dtype=torch.float32)
            observed = {"camera": obs, "proprio": extra_keys(venv)["proprio"]}
            new_obs, reward, dones, _ = venv.step(action)
            for name, buffer in buffers.items():
                obs_ = obs if name == "box" else {"camera": obs} if name == "full camera" else observed
                buffer.add(obs_, action[:, None], reward, starts, value, log_prob)
            obs, starts = new_obs, dones
        for name, buffer in buffers.items():
            buffer.compute_returns_and_advantage(torch.zeros(n_envs), starts)
            per_step[name].append(table2.bytes_per_step(buffer))
        np.random.seed(args.seed)
        want = list(buffers["sb3"].get(MINIBATCH))
        np.random.seed(args.seed)
        got = list(buffers["full"].get(MINIBATCH))
        equal &= len(want) == len(got) and all(table2.same_samples(a, b) for a, b in zip(want, got))
    venv.close()
    return {**{f"{name}:bytes_per_step": float(np.mean(values)) for name, values in per_step.items()},
            "minibatches_equal": float(equal)}


def render(results: dict, rollouts: dict, dmc: Optional[dict], args: argparse.Namespace, wall: float) -> str:
    """The tables, their averages and how they were made."""
    games, sb3x = list(results), list(args.sb3x)
    base = table2.BASE_BYTES
    out = [f"# SB3 Dict and n-step buffers, measured by `python bench/sb3_dict.py {' '.join(args.argv)}`".rstrip(), "",
           f"{args.steps:,} random-policy transitions per game into rings of {CAPACITY:,}; batch {args.batch}, "
           f"{args.samples} samples; seed {args.seed}. B/step: bytes per stored step, every byte held.", "",
           "## Dict replay: {camera 4x84x84, rgb 84x84x3, proprio 128 float32}", "",
           "| Env | SB3 B/step | full B/step | SB3 / full | half B/step | sb3x best | sb3x B/step | full / sb3x bytes | "
           "add µs SB3 / full / sb3x | sample ms SB3 / full / sb3x | full sample / SB3 | byte-identical to SB3 |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    ratios = {"dict": [], "dict_sample": [], "nstep_sample": []}
    for game in games:
        m = results[game]["dict"]
        best = min(sb3x, key=lambda s: m[f"sb3x {s}"]["bytes_per_step"]) if sb3x else None
        x = m[f"sb3x {best}"] if best else {}
        sb3, full = m["sb3"], m["full"]
        ratios["dict"].append(sb3["bytes_per_step"] / full["bytes_per_step"])
        ratios["dict_sample"].append(full["sample_ms"] / sb3["sample_ms"])
        identical = ", ".join(name for name, v in m.items() if name != "sb3" and v["equal_to_sb3"] == 1.0) or "none"
        out.append(f"| {game} | {sb3['bytes_per_step']:,.0f} | {full['bytes_per_step']:,.0f} | "
                   f"{sb3['bytes_per_step'] / full['bytes_per_step']:.1f}× | {m['half']['bytes_per_step']:,.0f} | "
                   f"{best or '–'} | {table2.fmt(x.get('bytes_per_step'))} | "
                   f"{full['bytes_per_step'] / x['bytes_per_step'] if x else float('nan'):.2f} | "
                   f"{sb3['add_us']:.0f} / {full['add_us']:.0f} / {table2.fmt(x.get('add_us'))} | "
                   f"{sb3['sample_ms']:.2f} / {full['sample_ms']:.2f} / {table2.fmt(x.get('sample_ms'), 2)} | "
                   f"{full['sample_ms'] / sb3['sample_ms']:.2f} | {identical} |")
    out += ["", f"SB3 / full over the games: mean {np.mean(ratios['dict']):.1f}×, worst {min(ratios['dict']):.1f}×; "
            f"full's sample time / SB3's: mean {np.mean(ratios['dict_sample']):.2f}, worst "
            f"{max(ratios['dict_sample']):.2f}."]
    if sb3x:
        out += ["", "sb3-extra-buffers' Dict buffer, every setting (B/step / add µs / sample ms / byte-identical):", "",
                "| Env | " + " | ".join(sb3x) + " |", "|---|" + "---:|" * len(sb3x)]
        for game in games:
            cells = [f"{v['bytes_per_step']:,.0f} / {v['add_us']:.0f} / {v['sample_ms']:.2f} / "
                     f"{'yes' if v['equal_to_sb3'] == 1.0 else 'no'}"
                     for v in (results[game]["dict"][f"sb3x {s}"] for s in sb3x)]
            out.append(f"| {game} | " + " | ".join(cells) + " |")
    out += ["", f"## n-step replay (n_steps={args.n_steps}, gamma {GAMMA}): the camera alone", "",
            "| Env | SB3 NStep B/step | ours NStep B/step | comp (4x84x84 / B/step) | CompressedReplayBuffer B/step | "
            "sample ms SB3 NStep / ours | ours / SB3 | byte-identical to SB3 (n-step, 1-step) |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for game in games:
        n, box = results[game]["nstep"], results[game]["box"]
        ratios["nstep_sample"].append(n["full"]["sample_ms"] / n["sb3"]["sample_ms"])
        out.append(f"| {game} | {n['sb3']['bytes_per_step']:,.0f} | {n['full']['bytes_per_step']:,.0f} | "
                   f"{base / n['full']['bytes_per_step']:.1f}× | {box['full']['bytes_per_step']:,.0f} | "
                   f"{n['sb3']['sample_ms']:.2f} / {n['full']['sample_ms']:.2f} | {ratios['nstep_sample'][-1]:.2f} | "
                   f"{'yes' if n['full']['equal_to_sb3'] else 'no'}, {'yes' if box['full']['equal_to_sb3'] else 'no'} |")
    mean_bytes = np.mean([results[g]["nstep"]["full"]["bytes_per_step"] for g in games])
    out += ["", f"Over the games: {base / mean_bytes:.1f}× (4x84x84 over the mean B/step, as Table II averages); "
            f"sample time / SB3's: mean {np.mean(ratios['nstep_sample']):.2f}, worst {max(ratios['nstep_sample']):.2f}."]
    if rollouts:
        out += ["", f"## Dict rollouts (PPO's env: 8 envs x {ROLLOUT_STEPS} steps, {args.rollouts} rollouts, "
                f"get({MINIBATCH}))", "",
                "| Env | SB3 {camera, proprio} B/step | ours {camera, proprio} B/step | minibatches byte-identical | "
                "ours {camera} B/step | ours Box B/step | {camera} / Box |", "|---|---:|---:|---|---:|---:|---:|"]
        for game, r in rollouts.items():
            out.append(f"| {game} | {r['sb3:bytes_per_step']:,.0f} | {r['full:bytes_per_step']:,.0f} | "
                       f"{'yes' if r['minibatches_equal'] else 'no'} | {r['full camera:bytes_per_step']:,.0f} | "
                       f"{r['box:bytes_per_step']:,.0f} | "
                       f"{r['full camera:bytes_per_step'] / r['box:bytes_per_step']:.3f} |")
    if dmc:
        out += ["", f"## Dict replay on rendered DMC frames: train_atari's SAC env ({args.dmc_task}: camera 3 stacked "
                f"RGB 84x84 frames with the floor, proprio its state, stacked), {args.dmc_steps:,} random-action steps",
                "", "| buffer | B/step | SB3 / it | add µs | sample ms | byte-identical to SB3 |",
                "|---|---:|---:|---:|---:|---|"]
        for name, v in dmc.items():
            out.append(f"| {name} | {v['bytes_per_step']:,.0f} | {dmc['sb3']['bytes_per_step'] / v['bytes_per_step']:.1f}× | "
                       f"{v['add_us']:.0f} | {v['sample_ms']:.2f} | {'yes' if v['equal_to_sb3'] else 'no'} |")
    out += ["", f"Wall time {wall / 60:.1f} min."]
    return "\n".join(out) + "\n"


def flat_rows(results: dict, rollouts: dict) -> list[dict[str, Any]]:
    """One CSV row per game: kind:buffer:measure columns."""
    rows = []
    for game, kinds in results.items():
        row = {"env": game}
        for kind, buffers in kinds.items():
            for name, values in buffers.items():
                row.update({f"{kind}:{name}:{key}": value for key, value in values.items()})
        row.update({f"rollout:{key}": value for key, value in rollouts.get(game, {}).items()})
        rows.append(row)
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--games", nargs="+", default=list(table2.GAMES), choices=table2.GAMES)
    p.add_argument("--steps", type=int, default=20_000, help="transitions per game's replay stream")
    p.add_argument("--samples", type=int, default=100, help="sample() calls per buffer")
    p.add_argument("--batch", type=int, default=table2.BATCH)
    p.add_argument("--n-steps", type=int, default=3)
    p.add_argument("--rollouts", type=int, default=2, help="PPO rollouts per game (0: none)")
    p.add_argument("--sb3x", nargs="*", default=["zstd-3", "zstd10"], help="sb3-extra-buffers settings")
    p.add_argument("--dmc-task", default="walker_walk", help="a DMC task for the SAC env (MUJOCO_GL=egl renders)")
    p.add_argument("--dmc-steps", type=int, default=2000, help="agent steps of the DMC stream (0: none)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="cpu", help="output names: sb3_dict_<tag>.md / .csv")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, rollouts = {}, {}
    for game in args.games:
        results[game] = measure_replay(game, args)
        if args.rollouts:
            rollouts[game] = measure_rollouts(game, args)
        d, n = results[game]["dict"], results[game]["nstep"]  # progress
        print(f"{game}: Dict {d['sb3']['bytes_per_step'] / d['full']['bytes_per_step']:.1f}× smaller, sample "
              f"{d['full']['sample_ms'] / d['sb3']['sample_ms']:.2f}× SB3's; n-step "
              f"{table2.BASE_BYTES / n['full']['bytes_per_step']:.1f}×, sample "
              f"{n['full']['sample_ms'] / n['sb3']['sample_ms']:.2f}× SB3's", flush=True)
    dmc = measure_dmc(args) if args.dmc_steps else None
    text = render(results, rollouts, dmc, args, time.perf_counter() - start)
    (args.out / f"sb3_dict_{args.tag}.md").write_text(text)
    table2.write_csv(flat_rows(results, rollouts), args.out / f"sb3_dict_{args.tag}.csv")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
