"""What a train.py snapshot.pt holds: the file's size and the tensor bytes of each top-level part.

    python bench/snapshot_parts.py exp_local/<date>/<time>_walker_walk_full_s1/snapshot.pt

Parts are the keys train.py saves (agent, replay, prefetched, rng, ...); a part's bytes are those of
the distinct tensor storages below it. The file is read as train.py resumes from it, with the run's
config.yaml beside it: CRC-32 of every member checked, then torch.load(weights_only=True), so it
runs no code from the file.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import snapshot  # noqa: E402

MIB = 2**20


def storages(value: Any) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        return {storage.data_ptr(): storage.nbytes()}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        found = {}
        for item in value:
            found.update(storages(item))
        return found
    return {}


def part_bytes(state: dict) -> dict[str, int]:
    """Tensor bytes of each top-level part of a snapshot's contents."""
    return {key: sum(storages(value).values()) for key, value in state.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=pathlib.Path)
    args = parser.parse_args(argv)
    state = snapshot.load(args.path, OmegaConf.load(args.path.parent / "config.yaml"))
    print(f"{args.path}: {args.path.stat().st_size / MIB:.1f} MiB")
    for key, size in part_bytes(state).items():
        print(f"  {key}: {size / MIB:.1f} MiB of tensors" if size else f"  {key}: plain values only")


if __name__ == "__main__":
    main()
