"""experiments/bench.py: speed-ups against each notebook's baseline row, the table, and notebook 04's case on the CPU."""

import torch

import bench  # experiments/bench.py
import bench_t2i


def test_speedup_is_baseline_time_over_row_time_per_notebook():
    rows = [{"notebook": "a", "variant": "plain", "baseline": True, "ms_per_step": 12.0},
            {"notebook": "a", "variant": "fast", "ms_per_step": 4.0},
            {"notebook": "b", "variant": "plain", "baseline": True, "ms_per_step": 3.0},
            {"notebook": "b", "variant": "cannot run here", "ms_per_step": None}]
    out = bench.with_speedups(rows)
    assert [r["speedup"] for r in out] == [1.0, 3.0, 1.0, None]
    text = bench.table(out)
    assert "| a | fast | 4.00 | – | – | 3.00× |" in text and "| b | cannot run here | – |" in text


def test_t2i_case_times_the_notebooks_cpu_step():
    rows = bench_t2i.run(torch.device("cpu"), reduced=True)
    assert len(rows) == 1 and rows[0]["baseline"] and rows[0]["ms_per_step"] > 0
    assert rows[0]["config"]["size"] == 32 and "CUDA-only" in rows[0]["note"]


def test_the_runner_passes_an_ablation_its_own_arguments_and_refuses_an_unknown_one(capsys, monkeypatch):
    import ablate_t2i

    seen = []
    monkeypatch.setattr(ablate_t2i, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["ablate", "t2i", "paper", "--iterations", "10"]) == 0
    assert seen == [["paper", "--iterations", "10"]]
    assert bench.main(["ablate", "nope"]) == 2 and "one of ['gan', 't2i']" in capsys.readouterr().out
