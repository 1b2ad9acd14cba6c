"""The QLoRA / GPU benchmarks (benchmarks/qlora.py, benchmarks/gpu.py): their pure parts, and the GPU benchmark's
whole code path on a tiny config on the CPU, so it cannot rot before a GPU runs it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("qlora_bench", BENCH / "qlora.py")
qlora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qlora)


def run(arm, step_s, peak, repeat=0):
    return {"model": "m", "precision": "4bit", "r": 8, "seq": 64, "arm": arm, "step_s": step_s, "tokens_per_s": 128 /
            step_s, "rss_loaded": 100, "rss_load_peak": 150, "rss_steps_peak": peak, "repeat": repeat}


def test_ratios_are_of_the_medians_over_repeats_against_lora():
    results = [run("lora", 1.0, 200), run("dylora-rowwise", 1.1, 202), run("lora", 3.0, 200, 1),
               run("dylora-rowwise", 1.3, 206, 1), run("lora", 2.0, 200, 2), run("dylora-rowwise", 2.1, 204, 2)]
    rows = {r["arm"]: r for r in qlora.summarise(results)}
    assert rows["lora"]["time_ratio"] == 1.0 and rows["lora"]["repeats"] == 3
    assert rows["dylora-rowwise"]["step_s"] == pytest.approx(1.3)
    assert rows["dylora-rowwise"]["time_ratio"] == pytest.approx(1.3 / 2.0)
    assert rows["dylora-rowwise"]["memory_ratio"] == pytest.approx(204 / 200)
    table = qlora.table(list(rows.values()))
    assert table.splitlines()[0].count("|") == table.splitlines()[2].count("|")  # every row fills every column
    assert "| m | 4bit | 8 | 64 | dylora-rowwise | 1.300 |" in table


def test_the_gpu_benchmark_runs_end_to_end_on_a_tiny_config(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--precisions", "4bit", "--arms",
                           "lora,dylora-rowwise", "--r", "4", "--seq", "32", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = {r["arm"]: r for r in payload["rows"]}
    assert set(rows) == {"lora", "dylora-rowwise"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["rss_steps_peak"] > 0 and row["rss_loaded"] > 0
        assert row["tensor_peak_bytes"] > 0 and row["tensor_ratio"] > 0
    assert rows["lora"]["time_ratio"] == 1.0 and rows["dylora-rowwise"]["time_ratio"] > 0
    assert "| tiny | 4bit | 4 | 32 | dylora-rowwise |" in proc.stdout


def test_the_gpu_benchmark_says_so_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the benchmark would run for real")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
