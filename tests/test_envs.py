"""Tests for the DMC pixel environment wrappers (envs/)."""
import dm_env
import mujoco
import numpy as np
import pytest
from dm_env import specs

from envs import ExtendedTimeStep, make  # first: sets MUJOCO_GL before dm_control is imported
from envs.dmc import (ActionRepeatWrapper, ExtendedTimeStepWrapper, _parse_name, remove_floor,
                      rgb_to_gray)
from dm_control import mujoco as dm_mujoco  # noqa: E402
from dm_control import suite  # noqa: E402

SIZE = 84
BT601 = np.array([0.299, 0.587, 0.114])


def _make(name="walker_walk", frame_stack=3, grayscale=False, floor=True, seed=1):
    return make(name=name, frame_stack=frame_stack, action_repeat=2, seed=seed,
                grayscale=grayscale, floor=floor)


def _random_action(env, rng):
    spec = env.action_spec()
    return rng.uniform(-1.0, 1.0, spec.shape).astype(np.float32)


@pytest.mark.parametrize("grayscale, channels", [(True, 1), (False, 3)])
def test_specs_and_frame_stacking(grayscale, channels):
    env = _make(grayscale=grayscale)
    obs_spec, act_spec = env.observation_spec(), env.action_spec()
    assert obs_spec.shape == (3 * channels, SIZE, SIZE)
    assert obs_spec.dtype == np.uint8 and obs_spec.name == "observation"
    assert isinstance(act_spec, specs.BoundedArray) and act_spec.dtype == np.float32
    assert act_spec.shape == (6,)
    np.testing.assert_array_equal(np.broadcast_to(act_spec.minimum, act_spec.shape), -1.0)
    np.testing.assert_array_equal(np.broadcast_to(act_spec.maximum, act_spec.shape), 1.0)

    ts = env.reset()
    assert isinstance(ts, ExtendedTimeStep) and ts.first()
    assert ts.observation.shape == obs_spec.shape and ts.observation.dtype == np.uint8
    frames = ts.observation.reshape(3, channels, SIZE, SIZE)
    assert (frames == frames[0]).all(), "reset must fill the stack with the first frame"
    assert ts.observation.any()

    rng = np.random.default_rng(0)
    prev = ts.observation
    for _ in range(3):
        ts = env.step(_random_action(env, rng))
        assert ts.mid() and ts.observation.shape == obs_spec.shape
        np.testing.assert_array_equal(ts.observation[:-channels], prev[channels:])
        prev = ts.observation
    # The walker moves under random torques, so the newest frame must be a fresh render.
    assert not np.array_equal(prev[-channels:], prev[:channels])


def test_extended_time_step_fields():
    env = _make(frame_stack=1)
    ts = env.reset()
    assert isinstance(ts.reward, np.float32) and ts.reward == 0.0
    assert isinstance(ts.discount, np.float32) and ts.discount == 1.0
    assert ts.action.dtype == np.float32 and ts.action.shape == (6,) and not ts.action.any()
    assert ts["observation"] is ts.observation and ts[0] == ts.step_type

    action = _random_action(env, np.random.default_rng(1))
    ts = env.step(action)
    assert isinstance(ts.reward, np.float32) and isinstance(ts.discount, np.float32)
    np.testing.assert_array_equal(ts["action"], action)


def test_grayscale_is_bt601_of_rgb_render():
    env = _make(grayscale=True)
    rng = np.random.default_rng(2)
    ts = env.reset()
    for _ in range(2):
        ts = env.step(_random_action(env, rng))
    rgb = env.physics.render(SIZE, SIZE, camera_id=0)  # same physics state as the newest frame
    exact = rgb.astype(np.float64) @ BT601
    gray = ts.observation[-1].astype(np.float64)
    assert np.abs(gray - exact).max() <= 0.5 + 1e-9  # i.e. rounded to nearest
    assert np.ptp(gray) > 20  # a real image, not a constant


def test_rgb_to_gray_rounding_and_channel_order():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1000, 3), dtype=np.uint8)
    gray = rgb_to_gray(rgb)
    assert gray.dtype == np.uint8 and gray.shape == (1000,)
    assert np.abs(gray - rgb.astype(np.float64) @ BT601).max() <= 0.5 + 1e-9
    pure = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(rgb_to_gray(pure), [76, 150, 29, 255, 0])


def _erode(mask):
    """Keeps pixels whose 4 neighbours are also set (drops anti-aliased boundary pixels)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


@pytest.mark.parametrize("name, camera_id", [("walker_walk", 0), ("quadruped_walk", 2)])
def test_floor_removed_renders_black(name, camera_id):
    with_floor, no_floor = _make(name, frame_stack=1), _make(name, frame_stack=1, floor=False)
    # A second reset checks that the blackened floor survives episode re-initialisation.
    with_floor.reset(), no_floor.reset()
    a, b = with_floor.reset().observation, no_floor.reset().observation  # (3, 84, 84)
    np.testing.assert_array_equal(with_floor.physics.get_state(), no_floor.physics.get_state())

    lower_a, lower_b = a[:, SIZE // 2:], b[:, SIZE // 2:]
    assert (lower_a == 0).all(0).mean() < 0.01, "the textured floor should not be black"
    assert (lower_b == 0).all(0).mean() > 0.4, "most of the lower image is floor: must be black"
    differ = (lower_a != lower_b).any(0)
    assert differ.mean() > 0.4
    # Only pixels blending the floor with the robot or sky may stay non-zero (~5% here; a
    # material-less black floor still shows ~20% specular highlights, a textured one ~100%).
    assert (lower_b[:, differ] == 0).all(0).mean() > 0.9

    # Strict check on the floor alone: hide every geom except planes, and all sites and tendons.
    for env in (with_floor, no_floor):
        model = env.physics.model
        model.geom_group[model.geom_type != mujoco.mjtGeom.mjGEOM_PLANE] = 5  # 5: not rendered
        model.site_group[:] = 5
        model.tendon_group[:] = 5
    a, b = (env.physics.render(SIZE, SIZE, camera_id=camera_id) for env in (with_floor, no_floor))
    floor_interior = _erode((a != b).any(-1))
    assert floor_interior.mean() > 0.25
    assert (b[floor_interior] == 0).all()


def test_remove_floor_leaves_walls_and_other_materials_alone():
    physics = suite.load("reacher", "easy").physics
    model = physics.model
    geom_rgba, mat_rgba = model.geom_rgba.copy(), model.mat_rgba.copy()
    remove_floor(physics, "reacher")
    floor_mat = model.name2id("grid", "material")
    changed_mats = np.flatnonzero((model.mat_rgba != mat_rgba).any(1))
    np.testing.assert_array_equal(changed_mats, [floor_mat])
    changed_geoms = np.flatnonzero((model.geom_rgba != geom_rgba).any(1))
    np.testing.assert_array_equal(changed_geoms, [model.name2id("ground", "geom")])


@pytest.mark.parametrize("body", [
    '<geom type="box" size=".1 .1 .1"/>',
    '<geom type="plane" size="1 1 .1" zaxis="1 0 0"/>',  # a wall, not a floor
])
def test_floorless_model_raises(body):
    physics = dm_mujoco.Physics.from_xml_string(f"<mujoco><worldbody>{body}</worldbody></mujoco>")
    with pytest.raises(ValueError, match="no floor"):
        remove_floor(physics, "toy")


def test_task_names():
    assert _parse_name("ball_in_cup_catch") == ("ball_in_cup", "catch")
    assert _parse_name("walker_walk") == ("walker", "walk")
    assert _parse_name("point_mass_easy") == ("point_mass", "easy")
    with pytest.raises(ValueError, match="walker_fly.*walker_walk"):
        make(name="walker_fly", frame_stack=3, action_repeat=2, seed=1)


class _FakeEnv(dm_env.Environment):
    """Emits rewards 1, 2, 3, ... with a fixed discount and ends after `length` steps."""

    def __init__(self, length=10, discount=1.0):
        self.length, self.gamma, self.calls = length, discount, 0

    def reset(self):
        self.calls = 0
        return dm_env.restart(np.zeros(2))

    def step(self, action):
        self.calls += 1
        reward = float(self.calls)
        if self.calls >= self.length:
            return dm_env.termination(reward, np.zeros(2))
        return dm_env.transition(reward, np.zeros(2), self.gamma)

    def observation_spec(self):
        return specs.Array((2,), np.float64)

    def action_spec(self):
        return specs.BoundedArray((1,), np.float32, -1.0, 1.0)


def test_action_repeat_sums_discounted_rewards_and_stops_at_last():
    action = np.zeros(1, np.float32)
    env = ActionRepeatWrapper(_FakeEnv(), 3)
    env.reset()
    assert env.step(action).reward == 1 + 2 + 3
    assert env.step(action).reward == 4 + 5 + 6

    env = ActionRepeatWrapper(_FakeEnv(discount=0.5), 3)
    env.reset()
    ts = env.step(action)
    assert ts.reward == pytest.approx(1 + 0.5 * 2 + 0.25 * 3)
    assert ts.discount == pytest.approx(0.125)

    inner = _FakeEnv(length=2)
    env = ActionRepeatWrapper(inner, 3)
    env.reset()
    ts = env.step(action)
    assert ts.last() and inner.calls == 2 and ts.reward == 1 + 2


def test_extended_wrapper_converts_reward_and_discount():
    env = ExtendedTimeStepWrapper(ActionRepeatWrapper(_FakeEnv(length=2), 2))
    ts = env.reset()  # dm_env.restart has reward=None, discount=None
    assert ts.reward == 0.0 and ts.discount == 1.0 and ts.reward.dtype == np.float32
    ts = env.step(np.ones(1, np.float32))
    assert ts.last() and ts.reward == 3.0 and ts.discount == 0.0
    assert ts.reward.dtype == np.float32 and ts.discount.dtype == np.float32
    assert ts.action.dtype == np.float32


@pytest.mark.parametrize("grayscale, floor", [(False, True), (True, False)])
def test_gym_dmc_observes_drqv2s_frames_and_the_tasks_state(grayscale, floor):
    from envs.gym_dmc import DMCPixels

    env = DMCPixels("walker_walk", grayscale=grayscale, floor=floor, max_episode_steps=6, seed=4)
    drq = _make(frame_stack=1, grayscale=grayscale, floor=floor, seed=4)
    assert env.observation_space["camera"].shape == ((1 if grayscale else 3), SIZE, SIZE)
    assert env.observation_space["proprio"].shape == (24,)  # walker: orientations 14, height 1, velocity 9
    obs, _ = env.reset()
    time_step, rng = drq.reset(), np.random.default_rng(0)
    for step in range(1, 7):
        assert env.observation_space.contains(obs)
        assert np.array_equal(obs["camera"], time_step.observation)  # the same camera, actions and physics
        action = _random_action(drq, rng)
        obs, reward, terminated, truncated, _ = env.step(action)
        time_step = drq.step(action)
        assert reward == pytest.approx(time_step.reward) and not terminated and truncated == (step == 6)
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    camera_only = DMCPixels("walker_walk", image_size=48, proprio=False)
    assert camera_only.observation_space.shape == (3, 48, 48)
    assert camera_only.observation_space.contains(camera_only.reset(seed=1)[0])
