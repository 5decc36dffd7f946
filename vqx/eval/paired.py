"""Paired comparisons of two quantized points on the same videos, with prompts as the unit of replication.

Videos of one prompt at several noise seeds are not independent samples: the text conditioning is fixed over the
whole trajectory, so a quantized model's error on a prompt's text keys and values is a bias every seed of that
prompt shares (on wan_mini one prompt lost 5 dB to RTN on all 8 of its seeds). An interval that resamples videos
then counts one prompt's bias 8 times and comes out too narrow. Here each prompt's paired differences are averaged
first, and the interval is Student's t over the prompt means (G prompts, G - 1 degrees of freedom): the usual
cluster-robust interval, which a percentile bootstrap over 8 clusters would make too narrow again.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections.abc import Hashable, Sequence


def t_cdf(x: float, df: float) -> float:
    """Student's t distribution function: 1/2 plus the density's integral from 0 to |x| (composite Simpson, 4096
    panels: within 1e-9 of the exact value for df >= 1 and |x| <= 100)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom {df}: must be positive")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    a, n = abs(x), 4096
    h = a / n
    area = pdf(0.0) + pdf(a) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, n))
    half = min(area * h / 3, 0.5)
    return 0.5 + half if x >= 0 else 0.5 - half


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on `t_cdf`, to 1e-9)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"quantile {p}: give 0.5 <= p < 1")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def cluster_means(values: Sequence[float], clusters: Sequence[Hashable]) -> list[float]:
    """The mean of ``values`` within each cluster, in order of first appearance."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    groups: dict[Hashable, list[float]] = {}
    for v, c in zip(values, clusters):
        groups.setdefault(c, []).append(v)
    return [statistics.fmean(g) for g in groups.values()]


def clustered_interval(values: Sequence[float], clusters: Sequence[Hashable], level: float = 0.95) -> dict:
    """The mean of ``values`` over the cluster means and its ``level`` t interval with clusters as the unit:
    {"mean", "interval": [lo, hi] or None with one cluster, "clusters"}."""
    means = cluster_means(values, clusters)
    mean = statistics.fmean(means)
    g = len(means)
    if g < 2:
        return {"mean": mean, "interval": None, "clusters": g}
    half = t_quantile(0.5 + level / 2, g - 1) * statistics.stdev(means) / math.sqrt(g)
    return {"mean": mean, "interval": [mean - half, mean + half], "clusters": g}


def format_interval(mean: float, interval: Sequence[float] | None, digits: int) -> str:
    """"+1.52 [+0.93, +2.10]": a mean and its interval (the mean alone without one)."""
    text = f"{mean:+.{digits}f}"
    return text + (f" [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]" if interval else "")


def _anova_f(groups: list[list[float]]) -> float:
    """One-way ANOVA F: the mean square between groups over the mean square within them (inf if within is 0)."""
    n, g = sum(len(x) for x in groups), len(groups)
    grand = sum(sum(x) for x in groups) / n
    means = [statistics.fmean(x) for x in groups]
    between = sum(len(x) * (m - grand) ** 2 for x, m in zip(groups, means)) / (g - 1)
    within = sum(sum((v - m) ** 2 for v in x) for x, m in zip(groups, means)) / (n - g)
    return between / within if within > 0 else math.inf


def cluster_effect(values: Sequence[float], clusters: Sequence[Hashable], permutations: int = 2000,
                   seed: int = 0) -> dict | None:
    """Whether clusters differ: the one-way ANOVA F of ``values`` between clusters and its permutation p-value (the
    share of ``permutations`` random relabellings, cluster sizes kept, with an F at least as large; seeded). F near 1
    and a large p: the clusters' videos are as alike as any, and an interval over videos is as good as one over
    clusters. None without two clusters of which one has two values, or where all values are equal; "f" is None where
    the clusters have no spread within (F infinite)."""
    labels = list(clusters)
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} values but {len(labels)} cluster labels")
    order = list(dict.fromkeys(labels))
    if len(order) < 2 or len(values) == len(order) or len(set(values)) == 1:
        return None

    def split(vals: list[float]) -> list[list[float]]:
        groups = {c: [] for c in order}
        for v, c in zip(vals, labels):
            groups[c].append(v)
        return list(groups.values())

    f = _anova_f(split(list(values)))
    rng = random.Random(seed)
    shuffled, hits = list(values), 0
    for _ in range(permutations):
        rng.shuffle(shuffled)
        hits += _anova_f(split(shuffled)) >= f
    # the observed labelling counts as one of the permutations, so p is never 0
    return {"f": f if math.isfinite(f) else None, "df": [len(order) - 1, len(values) - len(order)],
            "p": (hits + 1) / (permutations + 1)}
