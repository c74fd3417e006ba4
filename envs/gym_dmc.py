"""DeepMind Control tasks as gymnasium envs of pixels (and proprioception), for stable-baselines3 (SAC, TD3, ...)."""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.dmc import IMAGE_SIZE, PIXELS_KEY, check_task, pixel_env, rgb_to_gray

CAMERA_KEY, PROPRIO_KEY = "camera", "proprio"


class DMCPixels(gym.Env):
    """A DMC task rendered as DrQ-v2 renders it: a uint8 camera (C, H, W), RGB or gray, alone or with the task's state
    observations as one float32 vector in a Dict {camera, proprio}; actions in [-1, 1]. Episodes end by DMC's time
    limit (1000 frames) or after max_episode_steps agent steps (truncated), or by a task's own termination."""

    metadata = {"render_modes": []}

    def __init__(self, name: str, action_repeat: int = 2, image_size: int = IMAGE_SIZE, grayscale: bool = False,
                 floor: bool = True, proprio: bool = True, max_episode_steps: Optional[int] = None, seed: int = 0):
        check_task(name, floor)
        self._max_episode_steps, self._episode_steps = max_episode_steps, 0
        self._env = pixel_env(name, action_repeat, seed, floor, image_size, pixels_only=not proprio)
        self._grayscale, self._proprio = grayscale, proprio
        camera = spaces.Box(0, 255, (1 if grayscale else 3, image_size, image_size), np.uint8)
        if proprio:
            size = sum(int(np.prod(spec.shape)) for key, spec in self._env.observation_spec().items()
                       if key != PIXELS_KEY)
            state = spaces.Box(-np.inf, np.inf, (size,), np.float32)
            self.observation_space = spaces.Dict({CAMERA_KEY: camera, PROPRIO_KEY: state})
        else:
            self.observation_space = camera
        spec = self._env.action_spec()
        self.action_space = spaces.Box(np.broadcast_to(spec.minimum, spec.shape), np.broadcast_to(spec.maximum, spec.shape),
                                       dtype=np.float32)

    def _observe(self, time_step: Any) -> Any:
        rgb = time_step.observation[PIXELS_KEY]
        camera = rgb_to_gray(rgb)[None] if self._grayscale else np.ascontiguousarray(rgb.transpose(2, 0, 1))
        if not self._proprio:
            return camera
        state = [np.asarray(value, np.float32).reshape(-1) for key, value in time_step.observation.items()
                 if key != PIXELS_KEY]
        return {CAMERA_KEY: camera, PROPRIO_KEY: np.concatenate(state)}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[Any, dict]:
        """A new episode; a seed reseeds the task's initial states."""
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        self._episode_steps = 0
        return self._observe(self._env.reset()), {}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        """One agent step (action_repeat physics steps)."""
        time_step = self._env.step(action)
        self._episode_steps += 1
        terminated = time_step.last() and time_step.discount == 0
        truncated = not terminated and (time_step.last() or self._episode_steps == self._max_episode_steps)
        return self._observe(time_step), float(time_step.reward), terminated, truncated, {}

    def close(self) -> None:
        self._env.close()
