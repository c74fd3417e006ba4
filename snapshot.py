"""Crash-safe run snapshots: one file, replaced atomically, read back without executing code.

A snapshot is a torch zip archive holding only tensors and plain values (dicts, lists, tuples,
str, numbers), so torch.load(weights_only=True) reads it without unpickling arbitrary objects.
torch does not verify tensor data on load, so the CRC-32 that the zip format keeps for every
member is checked first: a flipped byte is reported instead of silently resumed from. A digest of
the whole content, written with it, makes the file one unit: a member copied in from another
snapshot (whose CRC is its own, and right) is refused too. The digest guards against mix-ups, not
against whoever edits a file on purpose and recomputes it: what loading does with the content is
checked by those who take it (the replay buffer validates every index it will read with).
"""
import hashlib
import json
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# Format of the contents; raised whenever a key is added or changes meaning, so that old files are refused.
VERSION = 3
# Settings that shape the saved agent, replay buffer or environments, or name the run (seed); a resume
# may not change them (training length, evaluation, logging and the like may change). The learning rate
# is among them because the restored optimizer state carries the saved one.
FIXED_ON_RESUME = ('task.name', 'compression', 'grayscale', 'floor', 'frame_stack', 'action_repeat',
                   'replay_buffer_size', 'nstep', 'discount', 'agent.feature_dim', 'agent.hidden_dim',
                   'agent.lr', 'seed')


class SnapshotError(Exception):
    """A snapshot that cannot be read, or that the configured run cannot continue from."""


def run_settings(cfg: DictConfig) -> dict:
    """The FIXED_ON_RESUME values of cfg as plain Python values."""
    settings = {}
    for key in FIXED_ON_RESUME:
        value = OmegaConf.select(cfg, key)
        settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    return settings


def save(path: Path, cfg: DictConfig, state: dict) -> None:
    """Write state (tensors and plain values) with cfg's settings to path, atomically and durably."""
    tmp = path.with_name(path.name + '.tmp')
    try:
        with tmp.open('wb') as f:
            content = {'version': VERSION, 'settings': run_settings(cfg), **state}
            torch.save({**content, 'digest': digest(content)}, f)
            f.flush()
            os.fsync(f.fileno())
        # The previous snapshot stays in place until the new one is complete on disk.
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename survives a power cut only once the directory entry itself is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path, cfg: DictConfig) -> dict:
    """Read the snapshot at path and check that cfg may continue it; SnapshotError names the file otherwise."""
    state = _read(path)
    if not isinstance(state, dict) or state.get('version') != VERSION:
        version = state.get('version') if isinstance(state, dict) else None
        raise SnapshotError(f'cannot resume from {path}: snapshot format {version!r}, this code reads '
                            f'format {VERSION}. Start this run over in another directory.')
    if state.pop('digest', None) != digest(state):
        raise SnapshotError(f'cannot resume from {path}: its parts do not belong together (the digest of its '
                            'content does not match: a member was copied in from another snapshot, or edited). '
                            'Restore a good copy, or move it away to start this run over.')
    changed = [f'{key}={value!r} (snapshot: {state["settings"].get(key)!r})'
               for key, value in run_settings(cfg).items() if state['settings'].get(key) != value]
    if changed:
        raise SnapshotError(f'cannot resume from {path} with {", ".join(changed)}: these settings must '
                            'match the snapshot. Resume with its settings, or start a new run in another directory.')
    return state


def digest(content: Any) -> str:
    """blake2b of a snapshot's content, every value in order: tensors by dtype, shape and bytes, the rest by repr."""
    hasher = hashlib.blake2b(digest_size=32)

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            hasher.update(f'tensor {value.dtype} {tuple(value.shape)};'.encode())
            hasher.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            hasher.update(f'dict {len(value)};'.encode())
            for key, item in value.items():  # in insertion order, which pickling keeps
                add(key)
                add(item)
        elif isinstance(value, (list, tuple)):
            hasher.update(f'{type(value).__name__} {len(value)};'.encode())
            for item in value:
                add(item)
        else:
            hasher.update(f'{type(value).__name__} {value!r};'.encode())

    add(content)
    return hasher.hexdigest()


def _read(path: Path) -> Any:
    """The contents of a snapshot file whose checksums all match, unpickled as tensors and plain values only."""
    advice = 'Restore a good copy, or move it away to start this run over.'
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is None:
            # mmap: the (possibly GBs of) replay arrays are paged in while being copied, not read twice.
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as error:  # whatever fails to parse, the file cannot be trusted
        raise SnapshotError(f'cannot resume from {path}: the file is truncated, corrupt or not a snapshot '
                            f'({error}). {advice}') from error
    raise SnapshotError(f'cannot resume from {path}: the file is corrupt (checksum mismatch in {damaged}). {advice}')


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy arrays as tensors sharing their memory, so that saving makes no copy."""
    return {key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()}


def to_arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of to_tensors."""
    return {key: value.numpy() for key, value in tensors.items()}


def _legacy_state(generator: Any) -> str:
    # np.random (the module) and RandomState share get_state; JSON keeps it a plain string.
    state = generator.get_state(legacy=False)
    state['state']['key'] = state['state']['key'].tolist()
    return json.dumps(state)


def _set_legacy_state(generator: Any, text: str) -> None:
    state = json.loads(text)
    state['state']['key'] = np.array(state['state']['key'], dtype=np.uint32)
    generator.set_state(state)


def rng_state(env_generators: list[np.random.RandomState]) -> dict:
    """States of python's, numpy's and torch's global generators and of the given env generators."""
    return {'python': random.getstate(), 'numpy': _legacy_state(np.random),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'envs': [_legacy_state(generator) for generator in env_generators]}


def set_rng_state(state: dict, env_generators: list[np.random.RandomState]) -> None:
    """Restore what rng_state saved (CUDA states only where this machine has as many GPUs)."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    _set_legacy_state(np.random, state['numpy'])
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    for generator, saved in zip(env_generators, state['envs'], strict=True):
        _set_legacy_state(generator, saved)
