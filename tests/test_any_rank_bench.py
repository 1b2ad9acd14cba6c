"""The any-rank benchmark's pure parts (benchmarks/any_rank.py): AURAC, the per-rank pick of a basis on validation,
the summary's targets and the table rendering."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # any_rank.py imports its helpers from reproduce.py
spec = importlib.util.spec_from_file_location("any_rank_bench",
                                              Path(__file__).parents[1] / "benchmarks" / "any_rank.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

RANKS = bench.RANKS


def test_aurac_is_the_trapezoid_area_over_the_range():
    assert bench.aurac(dict.fromkeys(RANKS, 100.0)) == pytest.approx(100.0)
    assert bench.aurac(dict.fromkeys(RANKS, 40.0)) == pytest.approx(40.0)
    # a line from 30 at b=1 to 100 at b=8: its mean height is the midpoint
    line = {b: 30 + 10 * (b - 1) for b in RANKS}
    assert bench.aurac(line) == pytest.approx(65.0)
    # a step at b=2: trapezoid (0 + 100) / 2 on [1, 2], then 100 on [2, 8] -> (50 + 600) / 7
    step = {b: 0.0 if b == 1 else 100.0 for b in RANKS}
    assert bench.aurac(step) == pytest.approx(650 / 7)


def sweep(prefix_val, svd_val, prefix_test, svd_test):
    rows = []
    for basis, val, test in (("prefix", prefix_val, prefix_test), ("svd", svd_val, svd_test)):
        rows += [{"rank": b, "basis": basis, "validation_accuracy": val[b - 1], "test_accuracy": test[b - 1]}
                 for b in RANKS]
    return rows


def test_picked_takes_the_basis_better_on_validation_and_reports_its_test():
    prefix_val = [50, 60, 70, 80, 80, 80, 80, 90]
    svd_val = [70, 60, 65, 85, 80, 80, 80, 90]  # better at b=1 and 4; ties at 2, 5..8 keep the prefix
    prefix_test = [10, 20, 30, 40, 50, 60, 70, 80]
    svd_test = [11, 21, 31, 41, 51, 61, 71, 81]  # svd is better on test everywhere: test must not drive the pick
    c = bench.curves(sweep(prefix_val, svd_val, prefix_test, svd_test), "accuracy")
    assert c["picked-metric"]["choice"] == {1: "svd", 2: "prefix", 3: "prefix", 4: "svd", 5: "prefix", 6: "prefix",
                                            7: "prefix", 8: "prefix"}
    assert c["picked-metric"]["test"] == {1: 11, 2: 20, 3: 30, 4: 41, 5: 50, 6: 60, 7: 70, 8: 80}
    assert c["picked-metric"]["validation"][1] == 70 and c["picked-metric"]["validation"][3] == 70
    # without per-example scores every rule is the metric's (dylora.app.report.pick_bases)
    assert c["picked"] == c["picked-metric"] == c["picked-loss"] == c["picked-paired"]


def test_picked_is_the_default_rule_the_svd_cut_unless_the_prefix_is_right_on_more_examples_beyond_noise():
    rows = sweep([61] * 8, [60] * 8, [50] * 8, [55] * 8)  # the prefix ahead on validation, the SVD cut on test
    for row in rows:  # 100 validation examples: the prefix right on 1 more at every b, on 3 more at b = 2
        lead = 3 if row["rank"] == 2 else 1
        ones = 60 + (lead if row["basis"] == "prefix" else 0)
        row["validation_example_correct"] = [1.0] * ones + [0.0] * (100 - ones)
    c = bench.curves(rows, "accuracy")
    assert c["picked-metric"]["choice"] == dict.fromkeys(RANKS, "prefix")  # 61 > 60 (b = 2: 63 > 60)
    # one example is within noise; at b = 8 = r both bases are one update: the prefix, as trained
    assert c["picked"]["choice"] == {**dict.fromkeys(RANKS, "svd"), 2: "prefix", 8: "prefix"}
    assert c["picked"]["test"][1] == 55 and c["picked"]["test"][2] == 50


def evaluated(dy_test: float, lora_at_b: float, svd_test: float) -> dict:
    """One task, two seeds: LoRA at every b, LoRA r=8 and every recipe, flat curves."""
    flat = sweep([50] * 8, [50] * 8, [dy_test] * 8, [dy_test] * 8)
    lora8 = sweep([50] * 8, [50] * 8, [svd_test - 5] * 8, [svd_test] * 8)
    spectrum = {"mean": [0.5 + 0.5 * b / 8 for b in RANKS]}
    seed = {f"lora-r{b}": {"train_s": 10.0, "metric": "accuracy", "stuck": False,
                           "own": {"rank": b, "test_accuracy": lora_at_b}} for b in (1, 2, 4)}
    seed["lora-r8"] = {"train_s": 10.0, "metric": "accuracy", "stuck": False, "own": {"test_accuracy": lora_at_b},
                       "sweep": lora8, "spectrum": spectrum}
    for i, arm in enumerate(bench.RECIPES):
        seed[arm] = {"train_s": 10.0 + 2 * i, "metric": "accuracy", "stuck": False, "own": {}, "sweep": flat,
                     "spectrum": spectrum}
    return {"bbc-1ep": {"task": "bbc", "schedule": "1ep", "settings": {}, "lr": 3e-3, "seeds": {"0": seed, "1": seed}},
            "polarity-1ep": {"task": "polarity", "schedule": "1ep", "settings": {}, "lr": 3e-3, "seeds": {}}}


def test_targets_compare_picked_with_the_better_lora_and_costs_are_ratios():
    s = bench.summarise(evaluated(dy_test=80.0, lora_at_b=80.2, svd_test=79.0))["bbc-1ep"]
    gap = s["targets"]["paper"]["gap"]
    assert gap == {b: pytest.approx(-0.2) for b in bench.SHOWN}
    assert s["targets"]["paper"]["met"]
    assert s["arms"]["lora-r8-svd"]["aurac"][0] == pytest.approx(79.0)
    assert s["arms"]["lora-at-b"]["aurac"] is None  # trained at 1, 2, 4, 8 only: no curve over 1..8
    assert s["cost"]["rowwise"]["mean"] == pytest.approx(1.2)
    s = bench.summarise(evaluated(dy_test=80.0, lora_at_b=78.0, svd_test=81.0))["bbc-1ep"]
    assert s["targets"]["paper"]["gap"][1] == pytest.approx(-1.0) and not s["targets"]["paper"]["met"]


def test_tables_render_run_and_not_run_tasks():
    summary = bench.summarise(evaluated(dy_test=80.0, lora_at_b=80.2, svd_test=79.0))
    text = "\n".join(bench.table_lines("bbc-1ep", summary["bbc-1ep"]))
    assert "| LoRA r=8 + SVD cut | 79.0 ± 0.0 | 79.0 ± 0.0 | 79.0 ± 0.0 | 79.0 ± 0.0 | 79.0 ± 0.0 | 1.00x |" in text
    assert "| DyLoRA rowwise, picked | 80.0 ± 0.0 |" in text and "| 1.20x |" in text
    assert "| paper | -0.2 (0.0) | -0.2 (0.0) | -0.2 (0.0) | -0.2 (0.0) | yes |" in text  # (paired SE over seeds)
    assert "Not run" in "\n".join(bench.table_lines("polarity-1ep", summary["polarity-1ep"]))


def test_smollm2_on_bbc_headlines_is_one_seed_at_four_ranks_picked_on_rouge():
    spec = bench.SCHEDULES["bbc-headlines", "1ep"]
    assert ("bbc-headlines", "1ep") in bench.ORDER
    assert bench.schedule_seeds("bbc-headlines", "1ep", range(0, 3)) == range(0, 1)
    assert bench.schedule_seeds("bbc", "1ep", range(1, 3)) == range(1, 3)
    jobs = bench.train_jobs([("bbc-headlines", "1ep")], range(3), Path("/nonexistent"))
    assert {key[2] for key in jobs} == {0}  # one seed, every arm
    assert {key[3] for key in jobs} == set(bench.ARMS)
    s = jobs["bbc-headlines", "1ep", 0, "rowwise-distill"][2]
    assert (s.model, s.data, s.r, s.max_eval, s.recipe, s.distill) == ("smollm2", "bbc-headlines", 8, 30, "rowwise",
                                                                        True)
    assert spec["ranks"] == bench.SHOWN and spec["metric"] == "rougeL"
    # a curve at 1, 2, 4, 8: its AURAC is the trapezoid over those ranks
    assert bench.aurac({1: 20.0, 2: 30.0, 4: 30.0, 8: 30.0}, [1, 2, 4, 8]) == pytest.approx((25 + 60 + 120) / 7)


def test_curves_pick_by_loss_and_by_the_paired_test_and_the_oracle_reads_test():
    rows = sweep([80] * 8, [81] * 8, [70] * 8, [60] * 8)  # svd better on validation accuracy, worse on test
    for row in rows:  # at b = 1 the SVD cut's losses are lower beyond noise; elsewhere lower by a hair, within noise
        shift = 0.5 if row["rank"] == 1 else 0.01
        noise = [(-1) ** i * 0.5 for i in range(40)]
        row["validation_example_loss"] = [1.0 + x - (shift if row["basis"] == "svd" else 0.0) for x in noise]
        if row["rank"] != 1 and row["basis"] == "svd":
            row["validation_example_loss"] = [x + (0.3 if i % 3 else -0.6) for i, x in
                                              enumerate(row["validation_example_loss"])]
    c = bench.curves(rows, "accuracy")
    assert c["picked-metric"]["choice"] == {**dict.fromkeys(RANKS, "svd"), 8: "prefix"}  # b = r: one update
    assert c["picked-paired"]["choice"][1] == "svd" and c["picked-paired"]["choice"][2] == "prefix"
    assert c["oracle"]["choice"] == dict.fromkeys(RANKS, "prefix") and c["oracle"]["test"][1] == 70


def test_paired_gaps_are_the_standard_error_of_the_per_seed_difference():
    per_arm = {"lora-at-b": [dict.fromkeys(bench.SHOWN, 80.0), dict.fromkeys(bench.SHOWN, 82.0)],
               "lora-r8-svd": [dict.fromkeys(bench.SHOWN, 70.0)] * 2,
               "rowwise-distill-picked": [dict.fromkeys(bench.SHOWN, 81.0), dict.fromkeys(bench.SHOWN, 81.0)]}
    se = bench.paired_gaps(per_arm)["rowwise-distill"]
    assert se == {b: pytest.approx(1.0) for b in bench.SHOWN}  # differences +1, -1: sd sqrt(2), over sqrt(2)


def test_select_arms_keeps_the_named_arms():
    import copy

    saved = copy.deepcopy((bench.ARMS, bench.RECIPES, bench.SWEPT))
    try:
        bench.select_arms(["lora-r8", "lora-first", "lora-r1"])
        assert list(bench.ARMS) == ["lora-r8", "lora-first", "lora-r1"] and list(bench.RECIPES) == ["lora-first"]
        assert bench.SWEPT == ("lora-r8", "lora-first")
        with pytest.raises(ValueError, match="unknown arm"):
            bench.select_arms(["nope"])
    finally:
        bench.ARMS.clear()
        bench.ARMS.update(saved[0])
        bench.RECIPES.clear()
        bench.RECIPES.update(saved[1])
        bench.SWEPT = saved[2]


def test_smollm2_on_bbc_topic_is_three_seeds_fp32_and_one_seed_4bit_with_fewer_arms():
    jobs = bench.train_jobs([("bbc-topic", "1ep"), ("bbc-topic", "4bit")], range(3), Path("/nonexistent"))
    fp32 = {key[3] for key in jobs if key[1] == "1ep"}
    # the DyLoRA recipes: the default and the two cheap shapes measured beside it
    assert fp32 == {"lora-r8", "rowwise-distill", "lora-first-distill", "rowwise-top75", "lora-r1", "lora-r2",
                    "lora-r4"}
    assert {key[2] for key in jobs if key[1] == "1ep"} == {0, 1, 2}
    assert {(key[2], key[3]) for key in jobs if key[1] == "4bit"} == {(0, "lora-r8"), (0, "rowwise-distill"),
                                                                     (0, "lora-r1")}
    s = jobs["bbc-topic", "4bit", 0, "rowwise-distill"][2]
    assert (s.model, s.data, s.quantize, s.recipe, s.distill, s.ranks) == ("smollm2", "bbc-topic", "4bit", "rowwise",
                                                                           True, [8])
    assert jobs["bbc-topic", "1ep", 1, "lora-r2"][2].quantize is None
    for schedule in ("1ep", "4bit"):
        spec = bench.SCHEDULES["bbc-topic", schedule]
        assert spec["metric"] == "perplexity" and spec["also"] == ["exact_match"] and spec["ranks"] == bench.SHOWN
        assert ("bbc-topic", schedule) in bench.ORDER


def topic_sweep(ppl: dict[str, tuple[list[float], list[float]]], em: float = 50.0) -> list[dict]:
    """Rows at b in SHOWN for each basis: (validation, test) perplexity; exact match = em + b (both splits)."""
    return [{"rank": b, "basis": basis, "validation_perplexity": val[i], "test_perplexity": test[i],
             "validation_exact_match": em + b, "test_exact_match": em + b + (basis == "svd")}
            for basis, (val, test) in ppl.items() for i, b in enumerate(bench.SHOWN)]


def test_perplexity_picks_the_lower_basis_and_exact_match_follows_that_pick():
    rows = topic_sweep({"prefix": ([1.5, 1.4, 1.3, 1.2], [1.5, 1.4, 1.3, 1.2]),
                        "svd": ([1.4, 1.5, 1.3, 1.1], [1.6, 1.3, 1.3, 1.2])})
    c = bench.curves(rows, "perplexity")
    # the lower validation; a tie: the prefix; b = 8 = r, one update in both bases: the prefix
    assert c["picked"]["choice"] == {1: "svd", 2: "prefix", 4: "prefix", 8: "prefix"}
    assert c["picked"]["test"] == {1: 1.6, 2: 1.4, 4: 1.3, 8: 1.2}
    assert c["oracle"]["choice"] == {1: "prefix", 2: "svd", 4: "prefix", 8: "prefix"}
    em = bench.curves(rows, "exact_match", pick_on="perplexity")  # the SVD cut is 1 point better on test EM
    assert em["picked"]["choice"] == c["picked"]["choice"]
    assert em["picked"]["test"] == {1: 52.0, 2: 52.0, 4: 54.0, 8: 58.0}


def test_topic_targets_are_relative_perplexity_and_4bit_compares_b_2_4_with_the_svd_cut():
    def seed(lora_ppl: dict[int, float], svd_ppl: float, dy_ppl: float, arms=(1, 2, 4)) -> dict:
        base = {"train_s": 10.0, "metric": "exact_match", "stuck": False, "eval_s": 5.0,
                "spectrum": {"mean": [1.0] * 8}}
        runs = {f"lora-r{b}": {**base, "own": {"test_perplexity": lora_ppl[b], "test_exact_match": 50.0}}
                for b in arms}
        lora8 = topic_sweep({"svd": ([svd_ppl] * 4, [svd_ppl] * 4)})
        runs["lora-r8"] = {**base, "own": {"test_perplexity": lora_ppl[8], "test_exact_match": 50.0}, "sweep": lora8}
        runs["rowwise-distill"] = {**base, "train_s": 20.0, "own": {},
                                   "sweep": topic_sweep({"prefix": ([dy_ppl] * 4, [dy_ppl] * 4),
                                                         "svd": ([dy_ppl + 1] * 4, [dy_ppl + 1] * 4)})}
        return runs

    lora = {1: 1.30, 2: 1.25, 4: 1.22, 8: 1.20}
    entry = {"task": "bbc-topic", "schedule": "1ep", "settings": {}, "lr": 1e-3, "metric": "perplexity",
             "also": ["exact_match"], "seeds": {"0": seed(lora, 1.21, 1.21), "1": seed(lora, 1.21, 1.21)}}
    out = bench.summarise({"bbc-topic-1ep": entry})
    assert set(out) == {"bbc-topic-1ep", "bbc-topic-1ep/exact_match"}
    t = out["bbc-topic-1ep"]
    gap = t["targets"]["rowwise-distill"]["gap"]  # against 1.21 (SVD cut) at b = 1, 2, 4; LoRA r=8 (1.20) at 8
    assert gap[1] == pytest.approx(0.0) and gap[8] == pytest.approx(-100 * 0.01 / 1.20)
    assert t["targets"]["rowwise-distill"]["met"]  # within 1% everywhere
    assert t["arms"]["rowwise-distill-picked"]["aurac"] is None  # no AURAC of a perplexity
    assert t["times"]["rowwise-distill"] == {"train_s": 20.0, "eval_s": 5.0}
    em = out["bbc-topic-1ep/exact_match"]
    assert em["picked_on"] == "perplexity" and em["targets"]["rowwise-distill"]["gap"][1] == pytest.approx(51 - 52)
    entry["seeds"] = {"0": seed(lora, 1.21, 1.24, arms=(1,))}  # 4-bit: LoRA at b = 1 and 8 only
    t = bench.summarise({"bbc-topic-4bit": entry})["bbc-topic-4bit"]
    assert sorted(t["arms"]["lora-at-b"]["test"]) == [1, 8]
    assert t["targets"]["rowwise-distill"]["gap"][2] == pytest.approx(-100 * 0.03 / 1.21)
    assert not t["targets"]["rowwise-distill"]["met"]
    text = "\n".join(bench.table_lines("bbc-topic-4bit", t))
    assert "| LoRA trained at r = b | 1.300 ± 0.000 |  |  | 1.200 ± 0.000 |" in text
    assert "| rowwise-distill | -2.48 | -2.48 | -2.48 | -3.33 | no |" in text


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie that nobody reaps, as under a container's init, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_a_pool_worker_ends_soon_after_its_killed_benchmark(tmp_path):
    """A benchmark killed by SIGKILL leaves no worker training on: its spawned workers (`reproduce.Pool`'s
    initializer calls `pool_workers.exit_with_parent`) end within seconds of their parent."""
    import subprocess
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import multiprocessing, os, sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1] / "benchmarks")!r})
        import pool_workers

        def worker(parent):
            pool_workers.exit_with_parent(parent, every=0.05)
            time.sleep(60)

        if __name__ == "__main__":
            child = multiprocessing.get_context("spawn").Process(target=worker, args=(os.getpid(),))
            child.start()
            print(child.pid, flush=True)
            time.sleep(60)
    """)
    (tmp_path / "bench.py").write_text(script)  # spawn finds `worker` in a __main__ read from a file
    parent = subprocess.Popen([sys.executable, str(tmp_path / "bench.py")], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _running(child)  # the worker outlives a while of its parent's life
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child)
    finally:
        parent.kill()


def test_the_four_epoch_schedule_is_the_checks_lr_on_each_minilm_tasks_own_data():
    """bbc, polarity and tweets at 4 epochs and lr 2e-3 (issue 27's check schedule): the 1-epoch settings otherwise,
    opt-in (not in ORDER, so `make any-rank` does not grow)."""
    for task in ("bbc", "polarity", "tweets"):
        four, one = bench.SCHEDULES[task, "4ep"], bench.SCHEDULES[task, "1ep"]
        assert (four["settings"]["epochs"], four["lr"]) == (4.0, 2e-3)
        assert {**four["settings"], "epochs": one["settings"].get("epochs", 1.0)} == \
            {**one["settings"], "epochs": one["settings"].get("epochs", 1.0)}
        assert (task, "4ep") not in bench.ORDER
