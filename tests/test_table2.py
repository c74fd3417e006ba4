"""bench/table2.py's arithmetic and its buffer measurement on a short real stream."""
import argparse

import numpy as np
import pytest

from bench import table2


def run(fps, bytes_per_step, steps=100):
    return {"fps": fps, "fps_cpu": fps / 2, "bytes_per_step": bytes_per_step, "steps": steps, "episodes": 1}


def test_table_rows_follow_the_papers_arithmetic():
    runs = {("Pong", "qrdqn", "none"): run(100, 56468), ("Pong", "qrdqn", "full"): run(95, 282.24),
            ("Qbert", "qrdqn", "none"): run(50, 56468), ("Qbert", "qrdqn", "full"): run(50, 846.72)}
    rows = table2.table_rows(runs, ["Pong", "Qbert"])
    pong, qbert, avg = rows
    assert pong["mb_base"] == pytest.approx(28224 * 100_000 / 2**20)
    assert pong["total_comp"] == pytest.approx(100.0) and qbert["total_comp"] == pytest.approx(100 / 3)
    assert pong["fps_ratio"] == pytest.approx(0.95) and pong["mb_sb3"] == pytest.approx(2 * pong["mb_base"], rel=1e-3)
    assert avg["env"] == "AVG" and avg["total_comp"] == pytest.approx(28224 / ((282.24 + 846.72) / 2))
    assert avg["paper"] == table2.PAPER["qrdqn"]["AVG"]
    text = table2.render_markdown(rows, [], table2.parse_args([]), 60.0)
    assert "| QR-DQN | Pong | 100 | 95 | 0.95 |" in text and "100.0× |" in text


def test_measure_buffers_on_a_real_stream():
    args = argparse.Namespace(buffer_steps=60, seed=0, modes=["half", "full"], sb3x=[], samples=3)
    stream = table2.record_stream("Breakout", 60, seed=0)
    measured = table2.measure_buffers("Breakout", args, dict(key_interval=4, anchor_interval=100), stream)
    assert set(measured) == {"sb3", "half", "full"}
    assert measured["sb3"]["bytes_per_step"] == 2 * 28224 + 8 + 3 * 4  # two stacks, int64 action, 3 float32
    assert measured["half"]["equal_to_sb3"] == measured["full"]["equal_to_sb3"] == 1.0
    assert measured["full"]["bytes_per_step"] < measured["half"]["bytes_per_step"] < 28224
    rows = table2.buffer_rows({"Breakout": measured}, ["Breakout"], [])
    assert rows[0]["full:bytes_per_step"] == measured["full"]["bytes_per_step"]


def test_sb3_extra_buffers_are_counted_by_their_payload():
    pytest.importorskip("sb3_extra_buffers")
    observation_space, action_space, stream = table2.record_stream("Pong", 20, seed=0)
    buffer = table2.sb3x_buffer("zstd-3", observation_space, action_space)
    for transition in stream:
        buffer.add(*transition)
    per_step = table2.bytes_per_step(buffer)
    arrays = sum(a.nbytes for a in vars(buffer).values() if isinstance(a, np.ndarray))
    assert arrays / 100_000 < per_step < 28224
