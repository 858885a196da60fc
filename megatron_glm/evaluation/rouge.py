"""ROUGE-1, ROUGE-2 and ROUGE-L F1 between generated texts and references (Lin, 2004), without downloads.

Texts are compared as lower-cased words (runs of letters and digits, ``\\w+``): no stemming and no
stop-word removal, so the figures are close to, not identical with, the ``rouge-score`` / files2rouge
packages THUDM/GLM reports (they stem with Porter). ROUGE-n counts the clipped n-gram overlap
(``sum min(count_hyp, count_ref)``); ROUGE-L the longest common subsequence. Each is the F1 of
precision (over the hypothesis) and recall (over the reference), averaged over the pairs; a side
without any n-gram scores 0 (as ``rouge-score`` does: ROUGE-2 of one-word texts is 0).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _f1(overlap: int, hypothesis: int, reference: int) -> float:
    if overlap == 0:  # also when a side has no n-grams (rouge-score's convention)
        return 0.0
    precision, recall = overlap / hypothesis, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _ngrams(items: Sequence, n: int) -> Counter:
    return Counter(tuple(items[i : i + n]) for i in range(len(items) - n + 1))


def rouge_n(hypothesis: Sequence, reference: Sequence, n: int) -> float:
    """ROUGE-n F1 of two token sequences (words or ids)."""
    hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
    return _f1(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming over one row)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 (sentence level) of two token sequences."""
    return _f1(lcs_length(hypothesis, reference), len(hypothesis), len(reference))


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"rouge-1", "rouge-2", "rouge-l"}``: mean F1 over the pairs of texts (0 for no pairs)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = words(hypothesis), words(reference)
        totals["rouge-1"] += rouge_n(hyp, ref, 1)
        totals["rouge-2"] += rouge_n(hyp, ref, 2)
        totals["rouge-l"] += rouge_l(hyp, ref)
    return {key: value / max(len(hypotheses), 1) for key, value in totals.items()}
