"""bench/headline.py's tables on the committed results files and on small CSVs."""
import pathlib

import pytest

from bench import headline

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"


def test_gray_table_compares_full_with_half_on_the_same_frames():
    rows = [{"comp_type": "Half", "env": "walker_walk", "fps_base": "10", "fps_ours": "12", "gb_ours": "7.0",
             "total_comp": "9.0"},
            {"comp_type": "Full", "env": "walker_walk", "fps_base": "10", "fps_ours": "8", "gb_ours": "1.4",
             "total_comp": "45.0"}]
    lines = headline.dmc_gray(rows).splitlines()
    assert lines[2] == "| Half | walker_walk | 7.0 / 7.1 | – | 9.0× / 8.9× | 1.20 / 1.19 |"
    # 7.0 / 1.4 = 5.0 ours; the paper's 7.1 / 3.8 = 1.9
    assert lines[3] == "| Full | walker_walk | 1.4 / 3.8 | 5.0× / 1.9× | 45.0× / 16.7× | 0.80 / 0.61 |"


def test_tables_of_the_committed_results(capsys):
    headline.main(["--results", str(RESULTS)])
    text = capsys.readouterr().out
    assert text.count("|---|") == 3
    assert "| PPO |" in text and "| QR-DQN |" in text and "| Full | **AVG** |" in text


def test_empty_results_file_is_a_clear_error(tmp_path):
    (tmp_path / "table1_cpu.csv").write_text("comp_type,env\n")
    with pytest.raises(ValueError, match="table1_cpu.csv: no rows"):
        headline.main(["--results", str(tmp_path)])


def test_readme_tables_are_the_ones_headline_prints(capsys):
    headline.main(["--results", str(RESULTS)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    readme = (RESULTS.parents[1] / "README.md").read_text().splitlines()
    assert [line for line in rows if line not in readme] == []
