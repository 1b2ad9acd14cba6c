"""RankSampler: the rank(s) of each training step, a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np

from .options import DISTRIBUTIONS


class RankSampler:
    """Draws the DyLoRA rank(s) of an optimizer step.

    `sample(step)` (one rank), `sandwich_ranks(step, k)` and `example_ranks(n, step)` depend on (seed, step)
    alone, so every process of a distributed run and every resumed
    run draws the same rank for the same step without any communication.

    The pmf over b in [r_min, r_max]:
      - uniform:   P(b) = 1 / (r_max - r_min + 1)
      - geometric: P(b) = p (1 - p)^(b - r_min) / Z,  Z = 1 - (1 - p)^(r_max - r_min + 1)
        (a geometric law truncated to the range, favouring low ranks).
    With `top_share` q > 0, r_max itself gets P(r_max) = q and the ranks below it the law above restricted to
    [r_min, r_max - 1], scaled to 1 - q (for rowwise: about q of every batch's rows at r_max).
    """

    def __init__(self, r_min: int, r_max: int, distribution: str = "uniform", p: float = 0.15,
                 seed: int = 0, top_share: float = 0.0) -> None:
        if not 1 <= r_min <= r_max:
            raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown rank distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"geometric p must lie in (0, 1], got {p}")
        if not 0.0 <= top_share < 1.0:
            raise ValueError(f"top_share must lie in [0, 1), got {top_share}")
        self.r_min, self.r_max, self.distribution, self.p, self.seed = r_min, r_max, distribution, p, int(seed)
        self.top_share = float(top_share)
        self._cdf = np.cumsum(self.pmf())

    @classmethod
    def from_config(cls, config) -> RankSampler:
        return cls(config.r_min, config.r, config.rank_distribution, config.geometric_p, config.seed,
                   config.top_share)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.r_min, self.r_max + 1))

    def pmf(self) -> np.ndarray:
        """P(b) for b = r_min .. r_max."""
        n = self.r_max - self.r_min + 1
        if self.top_share and n > 1:
            return np.append((1.0 - self.top_share) * self._law(n - 1), self.top_share)
        return self._law(n)

    def _law(self, n: int) -> np.ndarray:
        if self.distribution == "uniform":
            return np.full(n, 1.0 / n)
        w = self.p * (1.0 - self.p) ** np.arange(n)
        return w / w.sum()

    def sample(self, step: int) -> int:
        """The rank of optimizer step `step`."""
        u = np.random.default_rng([self.seed, int(step)]).random()
        i = int(np.searchsorted(self._cdf, u, side="right"))
        return self.r_min + min(i, self.r_max - self.r_min)

    def sandwich_ranks(self, step: int, k: int = 1) -> list[int]:
        """The ranks of a sandwich step: r_max, r_min, then k ranks drawn (with replacement) from the pmf
        restricted to r_min < b < r_max. r_max comes first: it is the teacher of distillation."""
        ranks = [self.r_max] + ([self.r_min] if self.r_min < self.r_max else [])
        inner = self.pmf()[1:-1]
        if k > 0 and inner.size:
            draws = np.random.default_rng([self.seed, int(step)]).choice(inner.size, size=k, p=inner / inner.sum())
            ranks += [self.r_min + 1 + int(i) for i in draws]
        return ranks

    def example_ranks(self, n: int, step: int) -> np.ndarray:
        """A rank for each of n rows, stratified: systematic sampling of the pmf, u_j = (j + u) / n with one
        u ~ U[0, 1), then shuffled. Each rank b gets n P(b) rows rounded up or down, so with the uniform pmf
        and n >= r_max - r_min + 1 every rank appears, as evenly as possible."""
        rng = np.random.default_rng([self.seed, int(step)])
        u = (np.arange(n) + rng.random()) / n
        i = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.r_max - self.r_min)
        ranks = self.r_min + i
        rng.shuffle(ranks)
        return ranks

    def teacher_rows(self, n: int, step: int, fraction: float) -> tuple[int, ...]:
        """The rows of a step's r_max pass when it runs on a fraction of the n rows: max(1, round(fraction n)) of
        them, drawn without replacement, in increasing order (a stream of its own, not the ranks')."""
        k = min(n, max(1, round(fraction * n)))
        rows = np.random.default_rng([self.seed, int(step), 1]).choice(n, size=k, replace=False)
        return tuple(int(j) for j in np.sort(rows))

    def __repr__(self) -> str:
        return (f"RankSampler(r_min={self.r_min}, r_max={self.r_max}, distribution={self.distribution!r}, "
                f"p={self.p}, seed={self.seed}, top_share={self.top_share})")
