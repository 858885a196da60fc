"""The GLM blank-infilling objective mixture: which spans are blanked and how Part B is laid out.

Names map to THUDM/GLM's flags as follows (defaults are the reference's):

===========================  ==========================  =======================================
here                         THUDM/GLM                   meaning
===========================  ==========================  =======================================
``token_prob``               ``--bert-prob``             share of token-level (short span) samples
``sentence_prob``            ``--gap-sentence-prob``     share of sentence-level samples
``document_prob``            ``1 - bert - gap_sentence`` share of document-level ([gMASK]) samples
``token_ratio``              ``bert_ratio`` (0.15)       masked fraction in token mode
``avg_span_length``          ``--avg-block-length``      Poisson lambda of span lengths
``max_span_length``          ``max_block_length`` (40)   span lengths are drawn from 1..max-1
``sentence_ratio``           ``--gap-sentence-ratio``    masked fraction in sentence mode
``document_min_ratio``       ``--gpt-min-ratio``         lower bound of the generated fraction
``document_suffix_prob``     ``--gpt-infill-prob``       P(suffix / prefix-LM layout) in document mode
``single_span_prob``         ``--single-span-prob``      P(token mode masks exactly one span)
``task_mask``                ``--task-mask``             [sMASK]/[gMASK] instead of [MASK]
``shuffle_spans``            not ``--no-shuffle-block``  Part-B spans in random order
``block_positions``          not ``--no-block-position`` intra-span positions 1..L+1 (else all 1)
``block_mask_prob``          ``--block-mask-prob``       Part-B inputs replaced by [dBLOCK] (token mode)
===========================  ==========================  =======================================
"""

from __future__ import annotations

import dataclasses
import enum
import math


class Objective(enum.IntEnum):
    """Stored as one byte per sample variant."""

    TOKEN = 0
    SENTENCE = 1
    DOCUMENT = 2


@dataclasses.dataclass
class ObjectiveConfig:
    token_prob: float = 1.0
    sentence_prob: float = 0.0
    document_prob: float = 0.0
    token_ratio: float = 0.15
    avg_span_length: float = 3.0
    max_span_length: int = 40
    sentence_ratio: float = 0.15
    document_min_ratio: float = 0.5
    document_suffix_prob: float = 0.5
    single_span_prob: float = 0.0
    task_mask: bool = False
    shuffle_spans: bool = True
    block_positions: bool = True
    block_mask_prob: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every invalid value; empty when the mixture is usable."""
        found: list[tuple[str, str]] = []
        for name in (
            "token_prob",
            "sentence_prob",
            "document_prob",
            "token_ratio",
            "sentence_ratio",
            "document_min_ratio",
            "document_suffix_prob",
            "single_span_prob",
            "block_mask_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                found.append((name, f"must lie in [0, 1], got {value}"))
        total = self.token_prob + self.sentence_prob + self.document_prob
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            found.append(
                ("token_prob", f"token_prob + sentence_prob + document_prob must be 1, got {total:g}")
            )
        if self.avg_span_length <= 0:
            found.append(("avg_span_length", f"must be positive, got {self.avg_span_length}"))
        if self.max_span_length < 2:
            found.append(
                ("max_span_length", f"must be at least 2 (spans of 1..max-1), got {self.max_span_length}")
            )
        return found

    def mixture(self) -> dict[Objective, float]:
        return {
            Objective.TOKEN: self.token_prob,
            Objective.SENTENCE: self.sentence_prob,
            Objective.DOCUMENT: self.document_prob,
        }
