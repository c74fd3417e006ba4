"""DeepMind Control Suite pixel environments with the DrQ-v2 wrapper stack."""
from collections import deque
from typing import Any, NamedTuple

import dm_env
import mujoco
import numpy as np
from dm_control import suite
from dm_control.suite.wrappers import action_scale, pixels
from dm_env import StepType, specs

PIXELS_KEY = "pixels"
IMAGE_SIZE = 84
# ITU-R BT.601 luma weights scaled by 1000 so that rounding can be done exactly in integers.
_LUMA_WEIGHTS = np.array([299, 587, 114], dtype=np.int32)
_TASKS = {f"{domain}_{task}": (domain, task) for domain, task in suite.ALL_TASKS}


class ExtendedTimeStep(NamedTuple):
    """A dm_env TimeStep that also carries the action which produced it."""

    step_type: Any
    reward: Any
    discount: Any
    observation: Any
    action: Any

    def first(self) -> bool:
        """True on the first step of an episode."""
        return self.step_type == StepType.FIRST

    def mid(self) -> bool:
        """True on steps that are neither first nor last."""
        return self.step_type == StepType.MID

    def last(self) -> bool:
        """True on the last step of an episode."""
        return self.step_type == StepType.LAST

    def __getitem__(self, attr):
        # Replay-buffer code looks fields up by spec name, e.g. time_step["observation"].
        if isinstance(attr, str):
            return getattr(self, attr)
        return tuple.__getitem__(self, attr)  # super() is unavailable in NamedTuple bodies


class Wrapper(dm_env.Environment):
    """Pass-through wrapper that delegates unknown attributes (e.g. `physics`) to the inner env."""

    def __init__(self, env: dm_env.Environment):
        self._env = env

    def reset(self):
        return self._env.reset()

    def step(self, action):
        return self._env.step(action)

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    def __getattr__(self, name: str):
        # Guard: during unpickling/copying `_env` may not exist yet, which would recurse forever.
        if name == "_env":
            raise AttributeError(name)
        return getattr(self._env, name)


class ActionDTypeWrapper(Wrapper):
    """Advertises actions of `dtype` and casts them back to the inner env's dtype."""

    def __init__(self, env: dm_env.Environment, dtype: Any):
        super().__init__(env)
        inner = env.action_spec()
        self._inner_dtype = inner.dtype
        self._action_spec = specs.BoundedArray(
            inner.shape, dtype, inner.minimum, inner.maximum, "action")

    def step(self, action):
        return self._env.step(np.asarray(action).astype(self._inner_dtype))

    def action_spec(self):
        return self._action_spec


class ActionRepeatWrapper(Wrapper):
    """Repeats each action `num_repeats` times, summing discounted rewards; stops at episode end."""

    def __init__(self, env: dm_env.Environment, num_repeats: int):
        super().__init__(env)
        if num_repeats < 1:
            raise ValueError(f"action_repeat must be >= 1, got {num_repeats}")
        self._num_repeats = num_repeats

    def step(self, action):
        reward, discount = 0.0, 1.0
        for _ in range(self._num_repeats):
            time_step = self._env.step(action)
            reward += (0.0 if time_step.reward is None else time_step.reward) * discount
            discount *= 1.0 if time_step.discount is None else time_step.discount
            if time_step.last():
                break
        return time_step._replace(reward=reward, discount=discount)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (..., 3) uint8 image, rounded to the nearest uint8."""
    # Weights sum to 1000, so the result is already within 0..255 and needs no clipping.
    return ((rgb.astype(np.int32) @ _LUMA_WEIGHTS + 500) // 1000).astype(np.uint8)


class FrameStackWrapper(Wrapper):
    """Observation = the last `num_frames` frames (RGB or gray) stacked channel-first, uint8."""

    def __init__(self, env: dm_env.Environment, num_frames: int, grayscale: bool = False,
                 pixels_key: str = PIXELS_KEY):
        super().__init__(env)
        self._frames: deque = deque(maxlen=num_frames)
        self._grayscale = grayscale
        self._pixels_key = pixels_key
        height, width = env.observation_spec()[pixels_key].shape[:2]
        channels = 1 if grayscale else 3
        self._obs_spec = specs.BoundedArray(
            (channels * num_frames, height, width), np.uint8, 0, 255, "observation")

    def _frame(self, time_step) -> np.ndarray:
        rgb = time_step.observation[self._pixels_key]
        if self._grayscale:
            return rgb_to_gray(rgb)[None]
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def _stacked(self, time_step):
        return time_step._replace(observation=np.concatenate(self._frames, axis=0))

    def reset(self):
        time_step = self._env.reset()
        frame = self._frame(time_step)
        self._frames.extend([frame] * self._frames.maxlen)
        return self._stacked(time_step)

    def step(self, action):
        time_step = self._env.step(action)
        self._frames.append(self._frame(time_step))
        return self._stacked(time_step)

    def observation_spec(self):
        return self._obs_spec


class ExtendedTimeStepWrapper(Wrapper):
    """Returns ExtendedTimeStep with the action and float32 reward/discount."""

    def _extend(self, time_step, action) -> ExtendedTimeStep:
        # float32 scalars: float64 rewards silently promote the critic's targets under numpy 2.
        return ExtendedTimeStep(
            step_type=time_step.step_type,
            reward=np.float32(0.0 if time_step.reward is None else time_step.reward),
            discount=np.float32(1.0 if time_step.discount is None else time_step.discount),
            observation=time_step.observation,
            action=action,
        )

    def reset(self) -> ExtendedTimeStep:
        spec = self.action_spec()
        return self._extend(self._env.reset(), np.zeros(spec.shape, spec.dtype))

    def step(self, action) -> ExtendedTimeStep:
        action = np.asarray(action, dtype=self.action_spec().dtype)
        return self._extend(self._env.step(action), action)

    def reward_spec(self):
        return specs.Array((), np.float32, "reward")

    def discount_spec(self):
        return specs.BoundedArray((), np.float32, 0.0, 1.0, "discount")


def remove_floor(physics: Any, domain: str) -> None:
    """Paints the floor of a loaded model pure black (no texture, no lighting), in place."""
    model = physics.model
    # Floor = upward-facing plane on the world body. Vertical planes are walls (reacher, point_mass,
    # manipulator) and reacher's wall material is shared with the arm, so they must stay untouched.
    quat = model.geom_quat
    normal_z = 1.0 - 2.0 * (quat[:, 1] ** 2 + quat[:, 2] ** 2)  # world-frame z of the plane normal
    floor = ((model.geom_type == mujoco.mjtGeom.mjGEOM_PLANE)
             & (model.geom_bodyid == 0) & (normal_z > 0.5))
    if not floor.any():
        raise ValueError(f"Domain {domain!r} has no floor (no upward-facing plane geom) to remove")
    materials = np.unique(model.geom_matid[floor])
    materials = materials[materials >= 0]
    if np.isin(model.geom_matid[~floor], materials).any():
        raise ValueError(f"Domain {domain!r}: the floor material is shared with other geoms")
    model.geom_rgba[floor] = (0.0, 0.0, 0.0, 1.0)
    # Black rgba alone is not enough: a geom without a material still gets default specular
    # highlights, and the floor material adds texture and reflections. So blacken the material.
    model.mat_texid[materials] = -1
    model.mat_rgba[materials] = (0.0, 0.0, 0.0, 1.0)
    model.mat_emission[materials] = 0.0
    model.mat_specular[materials] = 0.0
    model.mat_shininess[materials] = 0.0
    model.mat_reflectance[materials] = 0.0


def _parse_name(name: str) -> tuple[str, str]:
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}; available tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def check_task(name: str, floor: bool = True) -> None:
    """Raise ValueError, saying what is allowed, unless make(name, floor=floor) can build the env."""
    domain, task = _parse_name(name)
    if not floor:
        try:
            remove_floor(suite.load(domain, task).physics, domain)  # loads the model only; no rendering
        except ValueError as error:
            raise ValueError(f"{error}: floor=false needs a domain with a floor; "
                             f"use floor=true for {name!r}") from error


def pixel_env(name: str, action_repeat: int, seed: int, floor: bool = True, image_size: int = IMAGE_SIZE,
              pixels_only: bool = True) -> dm_env.Environment:
    """A task rendered as upstream DrQ-v2 renders it (its camera, float32 actions in [-1, 1], repeated), observing
    `pixels` (H, W, 3) uint8 and, unless pixels_only, the task's state observations."""
    domain, task = _parse_name(name)
    env = suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)
    if not floor:
        remove_floor(env.physics, domain)
    env = ActionDTypeWrapper(env, np.float32)
    env = ActionRepeatWrapper(env, action_repeat)
    camera_id = 2 if domain == "quadruped" else 0  # as upstream DrQ-v2: quadruped uses its "y" camera
    render_kwargs = dict(height=image_size, width=image_size, camera_id=camera_id)
    env = pixels.Wrapper(env, pixels_only=pixels_only, render_kwargs=render_kwargs)
    # float32 bounds: under numpy 2 Python-float bounds would promote the action spec to float64.
    return action_scale.Wrapper(env, minimum=np.float32(-1.0), maximum=np.float32(1.0))


def make(name: str, frame_stack: int, action_repeat: int, seed: int,
         grayscale: bool = False, floor: bool = True) -> ExtendedTimeStepWrapper:
    """Builds the DrQ-v2 pixel env for `<domain>_<task>` names such as 'ball_in_cup_catch'."""
    env = FrameStackWrapper(pixel_env(name, action_repeat, seed, floor), frame_stack, grayscale)
    return ExtendedTimeStepWrapper(env)


def is_task(name: str) -> bool:
    """Whether `name` is a DMC task (`<domain>_<task>`)."""
    return name in _TASKS
