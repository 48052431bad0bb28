"""Verification statistics shared by every scheme.

Each scheme reduces a suspect to a count of successes out of a number of trials (bits that match, key queries
answered with the key label) or to a score; these helpers turn that into a p-value under a stated null.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scipy import special, stats


def binomial_p_value(successes: int, trials: int, chance: float) -> float:
    """Exact one-sided binomial tail ``P[Bin(trials, chance) >= successes]``.

    The null of Uchida et al. (each bit matches with probability 1/2) and of trigger sets (an unrelated model
    gives the key label with the chance rate ``1/K`` or an empirical rate), see papers.md §6.4.
    """
    if trials <= 0:
        raise ValueError(f"binomial_p_value needs at least one trial, got {trials}")
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance must be a probability, got {chance}")
    if successes <= 0:
        return 1.0
    return float(stats.binom.sf(successes - 1, trials, chance))


def binomial_log10_p_value(successes: int, trials: int, chance: float) -> float:
    """log10 of :func:`binomial_p_value`, exact where the p-value itself underflows (a sum of pmf terms in logs)."""
    if trials <= 0:
        raise ValueError(f"binomial_log10_p_value needs at least one trial, got {trials}")
    if successes <= 0:
        return 0.0
    if successes > trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    p = binomial_p_value(successes, trials, chance)
    if p > 1e-250:
        return math.log10(p)
    if chance >= 1.0:
        return 0.0
    if chance <= 0.0:
        raise ValueError("a chance rate of 0 gives p = 0 for any success: state a positive rate")
    log_terms = stats.binom.logpmf(range(successes, trials + 1), trials, chance)
    return float(special.logsumexp(log_terms)) / math.log(10.0)


def binomial_threshold(trials: int, chance: float, alpha: float) -> int:
    """Smallest number of successes whose binomial tail p-value is below ``alpha``."""
    return int(stats.binom.isf(alpha, trials, chance)) + 1


def label_permutation_log10_p_value(answer_counts: Sequence[int], label_counts: Sequence[int], matches: int) -> float:
    """log10 of ``P[M >= matches]`` where M counts the keys whose answer equals their label when the key labels
    are put in a uniformly random order: the exact permutation test of random-label trigger sets given the labels
    drawn.

    Random labels drawn i.i.d. are, given how many of each class were drawn (``label_counts``), in a uniformly
    random order, independent of any suspect that never saw them; so the test is exact for such a suspect
    whatever it answers (``answer_counts``: how many keys it answers with each class). Unlike
    ``Binomial(n, 1/K)``, which is exact over the draw of the labels, it cannot be fooled by one unlucky draw: a
    key whose labels happen to favour a class does not accuse the models that favour it (Good, *Permutation,
    Parametric and Bootstrap Tests of Hypotheses*, 2005). Computed exactly in integers: the matches are the rooks a
    random permutation places on the board made of one ``answers_c × labels_c`` block per class, whose rook
    polynomial is the product of the blocks' (inclusion-exclusion over the rook numbers).
    """
    if len(answer_counts) != len(label_counts) or sum(answer_counts) != sum(label_counts):
        raise ValueError(
            f"answer counts {list(answer_counts)} and label counts {list(label_counts)} must cover the same keys"
        )
    if matches <= 0:
        return 0.0
    rooks = [1]
    for answers, labels in zip(answer_counts, label_counts):
        most = min(answers, labels)
        block = [math.comb(answers, k) * math.comb(labels, k) * math.factorial(k) for k in range(most + 1)]
        rooks = [
            sum(rooks[i] * block[k - i] for i in range(max(0, k - len(block) + 1), min(k, len(rooks) - 1) + 1))
            for k in range(len(rooks) + len(block) - 1)
        ]
    keys = sum(label_counts)
    at_least = sum(
        (-1) ** (k - matches) * math.comb(k - 1, matches - 1) * rooks[k] * math.factorial(keys - k)
        for k in range(matches, len(rooks))
    )
    if at_least <= 0:
        return -math.inf
    return math.log10(at_least) - math.log10(math.factorial(keys))


def queries_to_significance(hit_rate: float, chance: float, alpha: float = 1e-6, max_queries: int = 100_000) -> int:
    """Queries needed until a suspect that answers ``hit_rate`` of them correctly reaches ``p < alpha``.

    Returns ``-1`` when ``hit_rate`` is not above ``chance`` (no number of queries suffices).
    """
    if hit_rate <= chance:
        return -1
    return _fewest(lambda n: binomial_p_value(math.floor(hit_rate * n + 1e-9), n, chance) < alpha, max_queries)


def _fewest(significant: Callable[[int], bool], most: int) -> int:
    """The fewest ``n`` in ``1..most`` with ``significant(n)`` (``-1``: none): doubling finds a significant
    ``high``; the ``n`` below it are then scanned when they are few (the first significant one, exactly as a scan
    from 1 finds it, unless doubling stepped over an earlier one), else bisected.

    The p-value of a fixed hit rate falls with ``n`` only up to the rounding of the hit counts, so bisection is
    exact up to that rounding (within 3% of a full scan where tried). A scan of up to ``most`` took seconds per
    verdict on innocent suspects, whose rates barely differ.
    """
    high = 1
    while not significant(high):
        if high >= most:
            return -1
        high = min(2 * high, most)
    low = high // 2
    if high - low <= 256:
        return next(n for n in range(low + 1, high + 1) if significant(n))
    while high - low > 1:
        middle = (low + high) // 2
        if significant(middle):
            high = middle
        else:
            low = middle
    return high


def normal_log10_sf(z: float) -> float:
    """log10 of the standard normal's upper tail ``P[N(0, 1) >= z]``, finite far past where the tail underflows."""
    return float(stats.norm.logsf(z)) / math.log(10.0)


def empirical_p_value(score: float, null_scores: Sequence[float], higher_is_watermarked: bool = True) -> float:
    """Rank p-value ``(1 + #{null >= score}) / (1 + n)``: exact (a permutation test) when the null scores are the
    same suspect's scores under secrets drawn like the owner's (verdicts.md), with resolution ``1 / (n + 1)``.
    A score that could not be read (NaN: a white-box mark on a model without its layer) is no evidence: 1."""
    if len(null_scores) == 0:
        raise ValueError("empirical_p_value needs at least one null score")
    if math.isnan(score):
        return 1.0
    if higher_is_watermarked:
        extreme = sum(1 for s in null_scores if s >= score)
    else:
        extreme = sum(1 for s in null_scores if s <= score)
    return (1 + extreme) / (1 + len(null_scores))


def normal_null_threshold(
    null_scores: Sequence[float], alpha: float = 0.01, higher_is_watermarked: bool = True
) -> float:
    """Decision threshold from a normal fit to clean models' scores, as the SoK toolbox does (anchors.md §1.4)."""
    if len(null_scores) < 2:
        raise ValueError("normal_null_threshold needs at least two null scores")
    mean = sum(null_scores) / len(null_scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in null_scores) / (len(null_scores) - 1))
    z = float(stats.norm.isf(alpha))
    return mean + z * std if higher_is_watermarked else mean - z * std


def normal_null_p_value(score: float, null_scores: Sequence[float], higher_is_watermarked: bool = True) -> float:
    """p-value of ``score`` under a normal fit to clean models' scores."""
    if len(null_scores) < 2:
        raise ValueError("normal_null_p_value needs at least two null scores")
    mean = sum(null_scores) / len(null_scores)
    std = max(math.sqrt(sum((s - mean) ** 2 for s in null_scores) / (len(null_scores) - 1)), 1e-12)
    z = (score - mean) / std
    return float(stats.norm.sf(z) if higher_is_watermarked else stats.norm.cdf(z))


def fisher_exact_log10_p_value(hits_a: int, trials_a: int, hits_b: int, trials_b: int) -> float:
    """log10 of the one-sided Fisher exact test that sample a's hit rate exceeds sample b's.

    ``P[X >= hits_a]`` for ``X ~ Hypergeometric(trials_a + trials_b, hits_a + hits_b, trials_a)``: given the total
    number of hits, the chance that sample a holds at least ``hits_a`` of them. Exact (a permutation test) whenever
    the ``trials_a + trials_b`` trials are exchangeable under the null, e.g. owner keys and never-embedded null keys
    drawn alike, for a suspect that never saw which are the owner's (verdicts.md).
    """
    if trials_a <= 0 or trials_b <= 0:
        raise ValueError(f"fisher_exact_log10_p_value needs trials in both samples, got {trials_a} and {trials_b}")
    if not (0 <= hits_a <= trials_a and 0 <= hits_b <= trials_b):
        raise ValueError(f"hits ({hits_a}, {hits_b}) must lie within the trials ({trials_a}, {trials_b})")
    total, hits = trials_a + trials_b, hits_a + hits_b
    log_terms = stats.hypergeom.logpmf(range(hits_a, min(trials_a, hits) + 1), total, hits, trials_a)
    return min(0.0, float(special.logsumexp(log_terms)) / math.log(10.0))


def fisher_threshold(trials_a: int, hits_b: int, trials_b: int, alpha: float) -> int:
    """Fewest hits in sample a for a one-sided Fisher p-value below ``alpha`` given sample b's hits
    (``trials_a + 1``: none suffices)."""
    log_alpha = math.log10(alpha)
    for hits_a in range(trials_a + 1):
        if fisher_exact_log10_p_value(hits_a, trials_a, hits_b, trials_b) < log_alpha:
            return hits_a
    return trials_a + 1


def two_sample_queries_to_significance(
    rate_a: float, rate_b: float, alpha: float = 1e-6, max_queries: int = 20_000
) -> int:
    """Queries (n to each of two samples, 2n in all) until hit rates ``rate_a`` and ``rate_b`` reach a one-sided
    Fisher p-value below ``alpha``; sample b's hits are rounded up. ``-1`` when ``rate_a <= rate_b`` or more
    than ``max_queries`` would be needed."""
    if rate_a <= rate_b:
        return -1
    log_alpha = math.log10(alpha)

    def significant(n: int) -> bool:
        hits_a = math.floor(rate_a * n + 1e-9)
        hits_b = min(n, math.ceil(rate_b * n - 1e-9))
        return hits_a > hits_b and fisher_exact_log10_p_value(hits_a, n, hits_b, n) < log_alpha

    n = _fewest(significant, max_queries // 2)
    return -1 if n < 0 else 2 * n
