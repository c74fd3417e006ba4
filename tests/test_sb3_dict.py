"""bench/sb3_dict.py's measurements on short real streams."""
import pytest

from bench import sb3_dict

pytest.importorskip("sb3_extra_buffers")


def test_dict_and_n_step_replay_on_a_real_stream():
    args = sb3_dict.parse_args(["--steps", "60", "--samples", "3", "--sb3x", "zstd-3", "--rollouts", "1",
                                "--dmc-steps", "12"])
    results = sb3_dict.measure_replay("Breakout", args)
    assert set(results) == {"dict", "nstep", "box"}
    dict_replay = results["dict"]
    # SB3's: obs and next_obs of every key, an int64 action and 3 float32 (reward, done, time-out)
    assert dict_replay["sb3"]["bytes_per_step"] == 2 * (4 * 84 * 84 + 84 * 84 * 3 + 128 * 4) + 8 + 3 * 4
    assert dict_replay["half"]["equal_to_sb3"] == dict_replay["full"]["equal_to_sb3"] == 1.0
    assert dict_replay["full"]["bytes_per_step"] < dict_replay["half"]["bytes_per_step"] < \
        dict_replay["sb3"]["bytes_per_step"]
    assert dict_replay["sb3x zstd-3"]["equal_to_sb3"] == 0.0  # it casts the float32 proprio to uint8
    assert results["nstep"]["full"]["equal_to_sb3"] == results["box"]["full"]["equal_to_sb3"] == 1.0
    assert results["nstep"]["full"]["bytes_per_step"] == pytest.approx(results["box"]["full"]["bytes_per_step"],
                                                                        rel=0.01)
    rollouts = sb3_dict.measure_rollouts("Breakout", args)
    assert rollouts["minibatches_equal"] == 1.0
    assert rollouts["full camera:bytes_per_step"] == pytest.approx(rollouts["box:bytes_per_step"], rel=0.1)
    assert rollouts["full:bytes_per_step"] < rollouts["sb3:bytes_per_step"] / 5
    dmc = sb3_dict.measure_dmc(args)
    assert dmc["full"]["equal_to_sb3"] == 1.0 and dmc["full"]["bytes_per_step"] < dmc["sb3"]["bytes_per_step"] / 2
    text = sb3_dict.render({"Breakout": results}, {"Breakout": rollouts}, dmc, args, 1.0)
    assert "| Breakout | 99,828 |" in text and "## Dict rollouts" in text and "| full |" in text
