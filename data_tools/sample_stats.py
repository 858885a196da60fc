"""Statistics of precomputed span masks, accumulated chunk by chunk (at build time and by glm-inspect)."""

from __future__ import annotations

import numpy as np

from data_tools.objectives import Objective

HISTOGRAM_BINS = 64  # span lengths 1..63 exactly, the last bin counts 64 and longer


class SplitStatistics:
    """Per objective: share of sample variants, masked fraction of the used length, spans per sample,
    mean span length, span-length histogram; overall: padding and unused-tail fractions."""

    def __init__(self, seq_length: int):
        self.seq_length = seq_length
        self.samples = 0
        self.raw_tokens = 0
        self.variants = 0
        self.used_tokens = 0
        self.layout_tokens = 0
        self.raw_tokens_per_variant = 0
        k = len(Objective)
        self.count = np.zeros(k, np.int64)
        self.suffix = np.zeros(k, np.int64)
        self.masked = np.zeros(k, np.int64)
        self.used = np.zeros(k, np.int64)
        self.spans = np.zeros(k, np.int64)
        self.histogram = np.zeros((k, HISTOGRAM_BINS), np.int64)

    def add(
        self,
        objective: np.ndarray,
        suffix: np.ndarray,
        used_length: np.ndarray,
        span_counts: np.ndarray,
        span_lengths: np.ndarray,
        raw_lengths: np.ndarray,
    ) -> None:
        """Arrays of one chunk of n samples and K variants: [n, K] (objective, suffix, used), span_counts [n*K],
        span_lengths [sum(span_counts)], raw_lengths [n]."""
        n, k = objective.shape
        self.samples += n
        self.raw_tokens += int(raw_lengths.sum())
        if k == 0:
            return
        objective = objective.reshape(-1).astype(np.int64)
        suffix = suffix.reshape(-1).astype(bool)
        used = used_length.reshape(-1).astype(np.int64)
        counts = np.asarray(span_counts, np.int64)
        lengths = np.asarray(span_lengths, np.int64)
        owner = np.repeat(np.arange(n * k), counts)
        masked = np.bincount(owner, weights=lengths, minlength=n * k).astype(np.int64)
        layout = used + np.where(suffix, 1, 2 * counts)
        self.variants += n * k
        self.used_tokens += int(used.sum())
        self.layout_tokens += int(layout.sum())
        self.raw_tokens_per_variant += int(raw_lengths.sum()) * k
        n_objectives = len(Objective)
        self.count += np.bincount(objective, minlength=n_objectives)
        self.suffix += np.bincount(objective[suffix], minlength=n_objectives)
        self.masked += np.bincount(objective, weights=masked, minlength=n_objectives).astype(np.int64)
        self.used += np.bincount(objective, weights=used, minlength=n_objectives).astype(np.int64)
        self.spans += np.bincount(objective, weights=counts, minlength=n_objectives).astype(np.int64)
        bins = np.minimum(lengths, HISTOGRAM_BINS) - 1
        np.add.at(self.histogram, (objective[owner], bins), 1)

    def as_dict(self) -> dict:
        capacity = self.variants * self.seq_length
        objectives = {}
        for objective in Objective:
            o = int(objective)
            count = int(self.count[o])
            if count == 0:
                continue
            objectives[objective.name.lower()] = {
                "variants": count,
                "share": count / self.variants,
                "suffix_layout_share": int(self.suffix[o]) / count,
                "masked_fraction": int(self.masked[o]) / max(int(self.used[o]), 1),
                "spans_per_sample": int(self.spans[o]) / count,
                "mean_span_length": int(self.masked[o]) / max(int(self.spans[o]), 1),
                "span_length_histogram": self.histogram[o].tolist(),
            }
        return {
            "samples": self.samples,
            "raw_tokens": self.raw_tokens,
            "variants": self.variants,
            "padding_fraction": (capacity - self.layout_tokens) / capacity if capacity else 0.0,
            "unused_tail_fraction": (
                1 - self.used_tokens / self.raw_tokens_per_variant if self.raw_tokens_per_variant else 0.0
            ),
            "objectives": objectives,
        }
