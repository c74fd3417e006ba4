"""bench/frontier_plot.py on the committed results files, and its parsers on small real-format inputs."""
import pathlib

import pytest

from bench import frontier_plot

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BUFFER_OUTPUT = """base: 63504 B per stored step (RGB, 3-frame stack); batch 256, nstep 3

walker_walk, gray (3000 steps); numpy gather of the batch's frames 2.65 ms
config                            B/step   comp  add us sample ms vs half entropy scratch MB
half                                7103   8.9x    29.9      3.16    1.00                0.0
full key_interval=2                 1486  42.7x    62.4      3.57    1.15      0%        0.0
references (frame bytes per step, then the ratio against the base as if nothing else were stored):
  zstd per frame: 2956 B (21.5x)
  zstd diff to previous: decode 9.6 us per frame
  x264 lossless K=4: n/a (no ffmpeg with libx264)

walker_walk, rgb (3000 steps); numpy gather of the batch's frames 7.65 ms
config                            B/step   comp  add us sample ms vs half entropy scratch MB
half                               21229   3.0x    50.6      8.07    1.00                0.0

sweep walker_walk, gray: format x K x anchor codec (A = anchor_interval)
bytes   100   4 raw      1395  45.5x    70.2       3.79
"""


def test_plot_of_the_committed_results(tmp_path):
    out = tmp_path / "frontier.png"
    frontier_plot.main(["--results", str(RESULTS), "--out", str(out)])
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_parse_buffer_keeps_one_setting_and_skips_the_sweep(tmp_path):
    path = tmp_path / "buffer.txt"
    path.write_text(BUFFER_OUTPUT)
    gray = frontier_plot.parse_buffer(path, "gray")
    assert gray["base"] == 63504
    assert gray["tasks"] == {"walker_walk": {"rows": {"half": (7103, 1.0), "full key_interval=2": (1486, 1.15)},
                                             "references": {"zstd per frame": 2956}}}
    assert frontier_plot.parse_buffer(path, "rgb")["tasks"]["walker_walk"]["rows"] == {"half": (21229, 1.0)}
    with pytest.raises(ValueError, match="no 'quadruped' section"):
        frontier_plot.parse_buffer(path, "quadruped")


def test_parse_atari_means_over_games(tmp_path):
    path = tmp_path / "buffers.csv"
    path.write_text("env,full:bytes_per_step,full:sample_ms,sb3:bytes_per_step,sb3:sample_ms\n"
                    "Pong,200,1.0,56468,1.0\nQbert,400,3.0,56468,2.0\n")
    means = frontier_plot.parse_atari(path)
    assert means["full"] == pytest.approx((300.0, 1.25)) and means["sb3"] == pytest.approx((56468.0, 1.0))
