"""bench/speed_table.py: the README's speed table comes from the benches' saved figures, machine and date included,
and only the block between its markers is rewritten."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import speed_table  # noqa: E402

MOMA = dict(bench="bench_moma_ppo", date="2026-12-03T20:00:00", machine="AMD EPYC, 2 logical CPUs, load average 0.10",
            torch="2.13.0+cpu", threads=2, command="python bench/bench_moma_ppo.py --env ant --obs partial",
            rows=[dict(env="ant", obs="partial", history=True, bf16=False, synthetic_steps_per_s=1532.4,
                       mflop_per_transition=36.9, gflop_per_s=56.5, gemm_gflop_per_s=176.0, roofline_share=0.321)])
BASE = dict(bench="bench_baselines", date="2026-12-02T10:00:00", machine="AMD EPYC, 2 logical CPUs", torch="2.13.0+cpu",
            threads=1, command="python bench/bench_baselines.py --bf16",
            rows=[dict(script="icql", obs="partial", steps_per_s={"fp32": 0.8, "bf16": 1.31})])


def test_table_is_generated_between_the_markers_only(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps(MOMA))
    (results / "b.json").write_text(json.dumps(BASE))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{speed_table.BEGIN}\nold row\n{speed_table.END}\nafter\n")
    speed_table.main(results, readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n") and "old row" not in text
    assert "| MOMA-PPO whole loop, ant/partial, history encoder | 1,532 synthetic steps/s (36.9 MFLOP each, 32% of " \
           "the GEMM rate 176 GFLOP/s) | AMD EPYC, 2 logical CPUs, load average 0.10; 2 threads; 2026-12-03 | " \
           "`python bench/bench_moma_ppo.py --env ant --obs partial` |" in text
    assert "| `icql.py` update, ant/partial, batch 256 | fp32 0.80, bf16 1.31 gradient steps/s | AMD EPYC, 2 logical " \
           "CPUs; 1 thread; 2026-12-02 |" in text
    speed_table.main(results, readme)  # idempotent
    assert readme.read_text() == text


def test_missing_markers_or_figures_are_clear_errors(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    (tmp_path / "r").mkdir()
    with pytest.raises(SystemExit, match="no saved figures"):
        speed_table.main(tmp_path / "r", readme)
    (tmp_path / "r" / "a.json").write_text(json.dumps(MOMA))
    with pytest.raises(SystemExit, match="needs one line"):
        speed_table.main(tmp_path / "r", readme)


def test_baseline_rows_with_flop_counts_show_the_share_and_the_ceiling(tmp_path):
    """A bench_baselines record with FLOP counts: the share of the GEMM rate is steps/s x GFLOP / rate, the ceiling
    rate / GFLOP (here fp32: 2 x 25 / 100 = 50%, 100 / 25 = 4.0; bf16: 5 x 25 / 400 = 31%, 400 / 25 = 16.0)."""
    record = dict(BASE, rows=[dict(script="icql", obs="full", steps_per_s={"fp32": 2.0, "bf16": 5.0},
                                   gflop_per_step={"fp32": 25.0, "bf16": 25.0},
                                   gemm_gflop_per_s={"fp32": 100.0, "bf16": 400.0})])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"{speed_table.BEGIN}\n{speed_table.END}\n")
    speed_table.main(tmp_path / "r", readme)
    assert ("fp32 2.00, bf16 5.00 gradient steps/s; fp32 25.00 GFLOP each, 50% of the GEMM rate 100 GFLOP/s (ceiling 4.0), "
            "bf16 25.00 GFLOP each, 31% of the GEMM rate 400 GFLOP/s (ceiling 16.0) |") in readme.read_text()


def test_gemm_rate_is_a_positive_rate():
    assert 0 < speed_table.gemm_rate(2, 64, 32, repeats=2) < 1e5
