"""RankSampler: b of each step is a pure function of (seed, step), distributed as its pmf."""

import numpy as np
import pytest
from scipy.stats import chisquare

from dylora import DyLoraConfig, RankSampler


def test_same_seed_same_sequence_in_any_order():
    a, b = RankSampler(1, 8, seed=3), RankSampler(1, 8, seed=3)
    forward = [a.sample(s) for s in range(200)]
    backward = [b.sample(s) for s in reversed(range(200))][::-1]
    assert forward == backward  # a resumed run (or another process) needs no state


def test_different_seed_different_sequence():
    assert [RankSampler(1, 8, seed=0).sample(s) for s in range(50)] != \
        [RankSampler(1, 8, seed=1).sample(s) for s in range(50)]


@pytest.mark.parametrize("dist", ["uniform", "geometric"])
def test_range(dist):
    s = RankSampler(3, 6, dist, seed=0)
    draws = {s.sample(i) for i in range(2000)}
    assert draws == {3, 4, 5, 6}


def test_uniform_pmf():
    assert np.allclose(RankSampler(1, 8).pmf(), 1 / 8)


def test_geometric_pmf_is_truncated_geometric():
    p = 0.15
    pmf = RankSampler(2, 8, "geometric", p).pmf()
    k = np.arange(7)
    expected = p * (1 - p) ** k / (1 - (1 - p) ** 7)
    assert np.allclose(pmf, expected)
    assert np.all(np.diff(pmf) < 0)  # favours low ranks


@pytest.mark.parametrize("dist", ["uniform", "geometric"])
def test_top_share_gives_r_max_its_share_and_the_ranks_below_the_law_scaled(dist):
    """P(r_max) = q; below it the law restricted to [r_min, r_max - 1], scaled to 1 - q; rowwise puts q of the rows
    at r_max in every step (stratified)."""
    s = RankSampler(2, 8, dist, 0.3, top_share=0.5)
    below = RankSampler(2, 7, dist, 0.3).pmf()
    assert np.allclose(s.pmf(), np.append(0.5 * below, 0.5)) and s.pmf().sum() == pytest.approx(1.0)
    assert all(np.sum(s.example_ranks(16, step) == 8) == 8 for step in range(10))
    assert np.allclose(RankSampler(2, 8, dist, 0.3, top_share=0.0).pmf(), RankSampler(2, 8, dist, 0.3).pmf())
    assert RankSampler(3, 3, top_share=0.5).pmf().tolist() == [1.0]  # one rank: nothing to share


@pytest.mark.parametrize(("dist", "p", "q"), [("uniform", 0.15, 0.0), ("geometric", 0.15, 0.0),
                                              ("geometric", 0.6, 0.0), ("geometric", 0.3, 0.5)])
def test_empirical_distribution_matches_pmf(dist, p, q):
    s = RankSampler(1, 8, dist, p, seed=7, top_share=q)
    draws = np.array([s.sample(i) for i in range(20_000)])
    counts = np.bincount(draws - 1, minlength=8)
    expected = s.pmf() * len(draws)
    assert chisquare(counts, expected).pvalue > 1e-3


def test_from_config():
    s = RankSampler.from_config(DyLoraConfig(r=6, r_min=2, rank_distribution="geometric", geometric_p=0.3,
                                             seed=5, top_share=0.25, target_modules=["q"]))
    assert (s.r_min, s.r_max, s.distribution, s.p, s.seed, s.top_share) == (2, 6, "geometric", 0.3, 5, 0.25)


@pytest.mark.parametrize(("args", "msg"), [((0, 8), "r_min"), ((5, 4), "r_min"), ((1, 8, "zipf"), "uniform"),
                                           ((1, 8, "geometric", 0.0), "p must"),
                                           ((1, 8, "uniform", 0.15, 0, 1.0), "top_share")])
def test_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=msg):
        RankSampler(*args)
