"""Answer metrics (SQuAD normalisation) and confidence intervals.

contains: a normalised gold answer occurs in the normalised output (fair to chatty instruct models);
em / f1: SQuAD exact match and token F1, best over the gold answers.
Confidence intervals: Wilson score for proportions (contains, em), percentile bootstrap for means (f1).
Two methods answered the same questions: ``paired_difference`` (a paired bootstrap interval of the difference and
McNemar's exact test), which separates methods that two overlapping unpaired intervals cannot.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains(prediction: str, answers: list[str]) -> float:
    pred = f" {normalize(prediction)} "
    return float(any(f" {normalize(a)} " in pred for a in answers if normalize(a)))


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    pred = normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold or common == 0:
            best = max(best, float(pred == gold))
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def wilson_ci(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: well-behaved at 0 and 1 and for small n, unlike the normal approximation."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return (means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1])


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven of the questions where two methods
    disagree (``wins`` right only for the first, ``losses`` right only for the second) if neither were better."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p(diffs: list[int]) -> float:
    """Exact two-sided randomisation test of integer per-question differences: the chance that flipping the sign of
    each at random gives a total at least as far from zero, if neither method were better. On 0/1 scores of one pair
    of runs it is McNemar's exact test; on sums over several pairs (seeds) it keeps a question's runs together."""
    counts = {0: 1}  # total -> number of sign patterns reaching it
    for d in (abs(d) for d in diffs if d):
        nxt: dict[int, int] = {}
        for total, ways in counts.items():
            for step in (d, -d):
                nxt[total + step] = nxt.get(total + step, 0) + ways
        counts = nxt
    observed = abs(sum(diffs))
    return sum(w for t, w in counts.items() if abs(t) >= observed) / sum(counts.values())


def paired_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """``a`` minus ``b``, scored on the same questions in the same order: the mean difference, its 95% paired
    bootstrap interval (questions resampled, both methods kept together), the questions each got right alone
    (0/1 scores) and McNemar's exact p-value on those."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions ({len(a)} against {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    wins = sum(1 for d in diffs if d > 0)
    losses = sum(1 for d in diffs if d < 0)
    return {"diff": sum(diffs) / len(diffs) if diffs else 0.0, "diff_ci": list(bootstrap_ci(diffs, resamples, seed)),
            "wins": wins, "losses": losses, "p_value": mcnemar_p(wins, losses), "n": len(diffs)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
