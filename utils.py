"""Small helpers shared by the agent, the replay code and the training loop."""
import random
import re
import time
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch import distributions as pyd
from torch.distributions.utils import _standard_normal


class eval_mode:
    """Context manager that puts modules in eval mode and restores their previous mode on exit."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models

    def __enter__(self) -> None:
        self.prev_states = [model.training for model in self.models]
        for model in self.models:
            model.train(False)

    def __exit__(self, *args: Any) -> bool:
        for model, state in zip(self.models, self.prev_states):
            model.train(state)
        return False


def set_seed_everywhere(seed: int) -> None:
    """Seed torch, numpy and python's random."""
    seed = int(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    # random.seed only accepts python ints (numpy ints raise TypeError on 3.11+).
    random.seed(seed)


SWEEP_SUFFIX_CHARS = 150


def sweep_suffix(override_dirname: str) -> str:
    """'_' + a sweep job's other overrides as a safe part of a directory name (at most 150 chars); '' if none."""
    if not override_dirname:
        return ''
    # '/' would nest directories, quotes and spaces need escaping in a shell; the job number keeps names unique
    return '_' + re.sub(r'[^A-Za-z0-9._,=+-]', '_', override_dirname)[:SWEEP_SUFFIX_CHARS]


# cfgs/config.yaml names every sweep job's directory with it; Hydra resolves it when the job starts.
OmegaConf.register_new_resolver('sweep_suffix', sweep_suffix, replace=True)


def resolve_device(spec: str) -> torch.device:
    """Turn a device spec into a torch.device; 'auto' picks CUDA when available."""
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(spec)


def soft_update_params(net: nn.Module, target_net: nn.Module, tau: float) -> None:
    """Polyak-average net's parameters into target_net: target <- tau * net + (1 - tau) * target."""
    with torch.no_grad():
        for param, target_param in zip(net.parameters(), target_net.parameters()):
            target_param.lerp_(param, tau)


def to_torch(xs: Iterable[Union[np.ndarray, torch.Tensor]],
             device: Union[str, torch.device]) -> tuple:
    """Convert a sequence of numpy arrays or tensors to tensors on device."""
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            # Pinned tensors from the prefetcher can be copied asynchronously.
            out.append(x.to(device, non_blocking=True))
        else:
            out.append(torch.as_tensor(x, device=device))
    return tuple(out)


def weight_init(m: nn.Module) -> None:
    """Orthogonal init for linear and conv layers (conv layers use the ReLU gain), zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.orthogonal_(m.weight.data, nn.init.calculate_gain('relu'))
        if m.bias is not None:
            m.bias.data.fill_(0.0)


class Until:
    """True while step is below a frame budget (converted to agent steps)."""

    def __init__(self, until: Optional[int], action_repeat: int = 1) -> None:
        self._until = until
        self._action_repeat = action_repeat

    def __call__(self, step: int) -> bool:
        if self._until is None:
            return True
        return step < self._until // self._action_repeat


class Every:
    """True every `every` frames (converted to agent steps), including step 0."""

    def __init__(self, every: Optional[int], action_repeat: int = 1) -> None:
        self._every = every
        self._action_repeat = action_repeat

    def __call__(self, step: int) -> bool:
        if self._every is None:
            return False
        every = max(1, self._every // self._action_repeat)
        return step % every == 0


class Timer:
    """Wall-clock timer giving time since the last reset and total time (which survives resume)."""

    def __init__(self) -> None:
        self._start_time = time.time()
        self._last_time = self._start_time

    def reset(self) -> tuple:
        """Return (seconds since the last reset, total seconds) and restart the lap."""
        now = time.time()
        elapsed_time = now - self._last_time
        self._last_time = now
        return elapsed_time, now - self._start_time

    def total_time(self) -> float:
        """Seconds since the timer started."""
        return time.time() - self._start_time

    def state_dict(self) -> dict:
        """State to put in a snapshot."""
        return {'total_time': self.total_time()}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting total time from a snapshot; the current lap starts now."""
        now = time.time()
        self._start_time = now - state['total_time']
        self._last_time = now


class TruncatedNormal(pyd.Normal):
    """Normal distribution whose samples are clamped to (low, high) with a straight-through gradient."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, low: float = -1.0,
                 high: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__(loc, scale, validate_args=False)
        self.low = low
        self.high = high
        self.eps = eps

    def _clamp(self, x: torch.Tensor) -> torch.Tensor:
        clamped_x = torch.clamp(x, self.low + self.eps, self.high - self.eps)
        # Forward pass uses the clamped value, backward pass the identity.
        return x - x.detach() + clamped_x.detach()

    def sample(self, clip: Optional[float] = None,
               sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        """Sample loc + noise, with the noise optionally clipped to [-clip, clip]."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        eps = eps * self.scale
        if clip is not None:
            eps = torch.clamp(eps, -clip, clip)
        return self._clamp(self.loc + eps)


def schedule(schdl: Union[float, str], step: int) -> float:
    """Evaluate a constant, 'linear(init,final,duration)' or 'step_linear(init,f1,d1,f2,d2)' schedule."""
    try:
        return float(schdl)
    except ValueError:
        pass
    match = re.match(r'linear\((.+),(.+),(.+)\)', schdl)
    if match:
        init, final, duration = [float(g) for g in match.groups()]
        mix = float(np.clip(step / duration, 0.0, 1.0))
        return (1.0 - mix) * init + mix * final
    match = re.match(r'step_linear\((.+),(.+),(.+),(.+),(.+)\)', schdl)
    if match:
        init, final1, duration1, final2, duration2 = [float(g) for g in match.groups()]
        if step <= duration1:
            mix = float(np.clip(step / duration1, 0.0, 1.0))
            return (1.0 - mix) * init + mix * final1
        mix = float(np.clip((step - duration1) / duration2, 0.0, 1.0))
        return (1.0 - mix) * final1 + mix * final2
    raise ValueError(f'unknown schedule: {schdl!r}')
