"""The per-rank basis pick on validation (`dylora.app.report.pick_bases`): the default, prefer-svd (the SVD cut unless
the prefix is better beyond noise); by the metric, by the mean loss, and the paired rule (the prefix unless the SVD
cut's per-example losses are lower beyond noise)."""

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
    with pytest.raises(ValueError, match="basis rule must be one of prefer-svd, paired, loss, metric"):
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


def correct_rows(prefix_correct, svd_correct, rank=1, prefix_loss=None, svd_loss=None):
    """Two bases at `rank` scored by accuracy, with per-example correctness (and losses, where given)."""
    def row(correct, loss, basis):
        extra = {"example_correct": correct, **({"example_loss": loss} if loss is not None else {})}
        return SweepRow(rank, {"accuracy": 100 * sum(correct) / len(correct)}, 10, extra, basis)
    return [row(prefix_correct, prefix_loss, "prefix"), row(svd_correct, svd_loss, "svd")]


def test_prefer_svd_keeps_the_svd_cut_unless_the_prefix_is_right_on_more_examples_beyond_noise():
    assert Settings().basis_rule == "prefer-svd"  # what dylora train and its export use
    # 100 examples; the two agree except on d of them, where only the prefix is right: d_i = 1 there, else 0, so
    # mean = d / 100, sd ~ sqrt(d / 100) and the prefix is better beyond noise (z = 1) when d / 100 > sd / 10
    svd = [1.0] * 60 + [0.0] * 40
    pre = [1.0] * 60 + [1.0] * 2 + [0.0] * 38  # right on 2 more: mean 0.02, SE 0.014 -> beyond z = 1
    assert pick_bases(correct_rows(pre, svd), "accuracy", rule="prefer-svd") == {1: "prefix"}
    assert pick_bases(correct_rows(svd, svd), "accuracy", rule="prefer-svd") == {1: "svd"}  # a tie everywhere
    # the prefix ahead by one example (61 vs 60 of 100: mean 0.01 = SE 0.01, not beyond it): the SVD cut, where the
    # accuracy pick takes the prefix
    pre, svd = [1.0] * 61 + [0.0] * 39, [1.0] * 60 + [0.0] * 40
    assert pick_bases(correct_rows(pre, svd), "accuracy", rule="prefer-svd") == {1: "svd"}
    assert pick_bases(correct_rows(pre, svd), "accuracy", rule="metric") == {1: "prefix"}
    # ahead by 5 of 100 but behind on 3 others: mean 0.02, sd ~0.28, SE ~0.028: within noise
    pre = [1.0] * 55 + [1.0] * 5 + [0.0] * 3 + [0.0] * 37
    svd = [1.0] * 55 + [0.0] * 5 + [1.0] * 3 + [0.0] * 37
    assert pick_bases(correct_rows(pre, svd), "accuracy", rule="prefer-svd") == {1: "svd"}


def test_prefer_svd_reads_losses_for_a_metric_that_is_not_a_mean_of_correctness():
    pre_loss, svd_loss = losses(200, shift=-0.3, noise=0.2, seed=2)  # the prefix's losses lower by ~0.3: beyond noise
    rows = correct_rows([1.0, 0.0] * 100, [1.0] * 200, prefix_loss=pre_loss, svd_loss=svd_loss)
    for row in rows:
        row.metrics = {"perplexity": 2.0}
    # by perplexity the losses decide (the prefix); by accuracy the correctness does (the SVD cut, right on more)
    assert pick_bases(rows, "perplexity", higher_is_better=False, rule="prefer-svd") == {1: "prefix"}
    rows = correct_rows([1.0, 0.0] * 100, [1.0] * 200, prefix_loss=pre_loss, svd_loss=svd_loss)
    assert pick_bases(rows, "accuracy", rule="prefer-svd") == {1: "svd"}
    # no per-example scores at all: the metric decides, as for every rule
    plain = [SweepRow(1, {"accuracy": 75.0}, 5, basis="prefix"), SweepRow(1, {"accuracy": 70.0}, 5, basis="svd")]
    assert pick_bases(plain, "accuracy", rule="prefer-svd") == {1: "prefix"}


def test_at_the_full_rank_every_rule_keeps_the_prefix_the_one_update_as_trained():
    pre = [1.0] * 50 + [0.0] * 50
    rows = correct_rows(pre, [1.0] * 60 + [0.0] * 40, rank=4)  # the SVD cut ahead (rounding, at the full rank)
    for rule in ("prefer-svd", "metric"):
        assert pick_bases(rows, "accuracy", rule=rule) == {4: "svd"}
        assert pick_bases(rows, "accuracy", rule=rule, r=4) == {4: "prefix"}
        assert pick_bases(rows, "accuracy", rule=rule, r=8) == {4: "svd"}  # rank 4 of r = 8 is not the full rank
    svd_only = [SweepRow(4, {"accuracy": 60.0}, 5, basis="svd")]
    assert pick_bases(svd_only, "accuracy", rule="prefer-svd", r=4) == {4: "svd"}  # no prefix row: nothing to keep
