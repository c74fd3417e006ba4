"""Pixel-based DeepMind Control Suite environments."""
import os

# Must happen before dm_control is first imported: it picks its GL backend at import time.
os.environ.setdefault("MUJOCO_GL", "egl")

from envs.dmc import ExtendedTimeStep, check_task, make  # noqa: E402

__all__ = ["ExtendedTimeStep", "check_task", "make"]
