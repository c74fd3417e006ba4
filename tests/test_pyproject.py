import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"obs_comp", "kernels", "frame_stacks", "sb3_buffers"}
LIGHT = {"numpy", "numba", "zstandard", "stable-baselines3"}


def name_of(requirement):
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirement_lines():
    lines = {}
    for path in ROOT.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                lines[name_of(line)] = line.replace(" ", "")
    return lines


def test_the_package_asks_for_what_the_checkout_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {name_of(r) for r in project["dependencies"]} == LIGHT
    lines = requirement_lines()
    for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        assert lines.get(name_of(requirement)) == requirement.replace(" ", ""), requirement


def test_the_wheel_installs_the_codec_and_the_buffers_importable_from_anywhere(tmp_path):
    source, dist, site, elsewhere = (tmp_path / name for name in ("source", "dist", "site", "elsewhere"))
    source.mkdir(), elsewhere.mkdir()
    for path in ROOT.iterdir():  # the checkout's top level: every module there, so a forgotten one is missed
        if path.is_file():
            shutil.copy(path, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: builds offline with this environment's setuptools
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, source], check=True)
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n[:-3] for n in names if "/" not in n} == MODULES
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert {name_of(r) for r in required if "extra ==" not in r} == LIGHT
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    script = """
import numpy as np, sb3_buffers, obs_comp
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
assert all(m.__file__.startswith(SITE) for m in (sb3_buffers, obs_comp)), (sb3_buffers.__file__, obs_comp.__file__)
space, actions = spaces.Box(0, 255, (4, 12, 12), np.uint8), spaces.Discrete(3)
ours = sb3_buffers.CompressedReplayBuffer(8, space, actions, device="cpu")
theirs = ReplayBuffer(8, space, actions, device="cpu")
frames = np.random.default_rng(0).integers(0, 3, (12, 1, 12, 12), dtype=np.uint8)
for t in range(8):
    obs, next_obs = frames[t:t + 4].reshape(1, 4, 12, 12), frames[t + 1:t + 5].reshape(1, 4, 12, 12)
    for buffer in (ours, theirs):
        buffer.add(obs, next_obs, np.array([[t % 3]]), np.array([1.0]), np.array([False]), [{}])
np.random.seed(1)
want = theirs.sample(5)
np.random.seed(1)
got = ours.sample(5)
assert (got.observations == want.observations).all() and (got.next_observations == want.next_observations).all()
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", f"SITE = {str(site)!r}\n{script}"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
