"""The per-rank basis pick on validation (`dylora.app.report.pick_bases`): by the metric, by the mean loss, and the
paired rule (the prefix unless the SVD cut's per-example losses are lower beyond noise)."""

import random

import pytest

from dylora.app.report import paired_better, pick_bases, sweep_payload
from dylora.app.settings import Settings
from dylora.sweep import SweepRow


def rows(prefix_loss, svd_loss, prefix_acc=80.0, svd_acc=81.0, rank=2):
    return [SweepRow(rank, {"accuracy": prefix_acc}, 10, {"example_loss": prefix_loss}, "prefix"),
            SweepRow(rank, {"accuracy": svd_acc}, 10, {"example_loss": svd_loss}, "svd")]


def losses(n, shift, noise, seed):
    """Two bases' per-example losses on the same n examples: a shared difficulty per example, the SVD cut `shift`
    lower on the mean, plus independent noise of scale `noise`."""
    rng = random.Random(seed)
    base = [rng.expovariate(1.0) for _ in range(n)]
    return ([x + rng.gauss(0, noise) for x in base], [x - shift + rng.gauss(0, noise) for x in base])


def test_paired_pick_takes_the_svd_cut_only_when_it_is_better_beyond_noise():
    pre, svd = losses(200, shift=0.3, noise=0.2, seed=0)  # better by ~0.3 with an SE of ~0.02: beyond noise
    assert paired_better(pre, svd)
    assert pick_bases(rows(pre, svd), "accuracy", rule="paired") == {2: "svd"}
    assert pick_bases(rows(pre, svd, svd_acc=79.0), "accuracy", rule="paired") == {2: "svd"}  # accuracy says prefix

    pre, svd = losses(200, shift=0.02, noise=1.0, seed=1)  # better by 0.02 with an SE of ~0.1: within noise
    assert sum(svd) < sum(pre)
    assert not paired_better(pre, svd)
    assert pick_bases(rows(pre, svd), "accuracy", rule="paired") == {2: "prefix"}
    assert pick_bases(rows(pre, svd), "accuracy", rule="loss") == {2: "svd"}  # the lower mean, however noisy
    assert pick_bases(rows(pre, svd), "accuracy", rule="metric") == {2: "svd"}  # 81 > 80 on 200 examples


def test_paired_better_is_the_one_sided_paired_z_test():
    # d = 1, 1, 1, 3: mean 1.5, sd 1, n 4 -> SE 0.5; better at z = 2.9, not at z = 3.1
    assert paired_better([2.0, 2.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0], z=2.9)
    assert not paired_better([2.0, 2.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0], z=3.1)
    assert not paired_better([1.0, 1.0], [1.0, 1.0])  # equal: the prefix
    with pytest.raises(ValueError, match="same examples"):
        paired_better([1.0, 2.0], [1.0])


def test_rules_without_per_example_losses_fall_back_to_the_metric_and_bad_rules_are_refused():
    plain = [SweepRow(1, {"accuracy": 70.0}, 5, basis="prefix"), SweepRow(1, {"accuracy": 75.0}, 5, basis="svd")]
    assert pick_bases(plain, "accuracy", rule="paired") == pick_bases(plain, "accuracy") == {1: "svd"}
    with pytest.raises(ValueError, match="basis rule must be one of paired, loss, metric"):
        pick_bases(plain, "accuracy", rule="vote")
    with pytest.raises(ValueError, match="--basis-rule must be one of") as err:
        Settings(basis_rule="vote").validate()
    assert "\n" not in str(err.value)
    payload = sweep_payload(plain, plain, ["accuracy"], 1, 1, picked={1: "prefix"}, rule="paired")
    assert payload["picked"] == {"1": "prefix"} and payload["basis_rule"] == "paired"


def test_rank_sweep_keeps_per_example_scores_out_of_the_metrics():
    from conftest import tiny_bert

    import dylora

    model = dylora.get_dylora_model(tiny_bert(), dylora.DyLoraConfig(r=2, target_modules=["query"]))
    got = dylora.rank_sweep(model, lambda m: {"accuracy": 50.0, "example_loss": [0.1, 0.2]}, progress=False,
                            basis="both")
    assert [(row.rank, row.basis) for row in got] == [(1, "prefix"), (1, "svd"), (2, "prefix"), (2, "svd")]
    assert all(row.metrics == {"accuracy": 50.0} and row.extra == {"example_loss": [0.1, 0.2]} for row in got)
