"""The span samplers' statistics over many real samples, and their structural rules."""

import math

import numpy as np
import pytest

from data_tools.indexed import IndexedDataset
from data_tools.objectives import Objective, ObjectiveConfig
from data_tools.packing import corpus_documents, pack_documents, sentence_bounds
from data_tools.spans import SampleStructure, draw_spans, span_length_cdf, span_rng
from tests.glm_corpora import austen_corpus

T = 512


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
    corpus = IndexedDataset(austen_corpus(tmp_path_factory.mktemp("spans"), first=100, count=30))
    documents = corpus_documents(corpus)
    chunks = list(pack_documents(corpus, documents, np.arange(len(documents.ids)), T - 1))
    structures = [
        c.structure(i, lambda d: sentence_bounds(corpus, d)) for c in chunks for i in range(c.num_samples)
    ]
    # The last sample of the corpus is short; the statistics use the full ones.
    return corpus, [s for s in structures if s.length >= T - 1]


def draws(structures, config, variants=2):
    for sample, structure in enumerate(structures):
        for variant in range(variants):
            yield structure, draw_spans(span_rng(7, 0, 0, sample, variant), structure, config, T)


def check_disjoint_with_gaps(spans):
    ends = spans[:, 0] + spans[:, 1]
    assert np.all(spans[1:, 0] > ends[:-1]), "spans must be separated by at least one unmasked token"


def maskable(structure, used):
    """Boolean mask of the positions the token objective may blank (no [CLS], eos or last token)."""
    allowed = np.zeros(used, bool)
    for start, size in zip(*structure.text_regions(used)):
        allowed[start : start + size] = True
    return allowed


def test_token_level_masked_fraction_span_lengths_and_layout(austen):
    _, structures = austen
    masked = used = 0
    lengths = []
    for structure, draw in draws(structures, ObjectiveConfig()):
        assert draw.objective == Objective.TOKEN and not draw.suffix
        assert draw.layout_length == T, "every variant of a full sample fills T exactly"
        check_disjoint_with_gaps(draw.spans)
        allowed = maskable(structure, draw.used_length)
        for start, length in draw.spans.tolist():
            assert allowed[start : start + length].all()
        masked += int(draw.spans[:, 1].sum())
        used += draw.used_length
        lengths += draw.spans[:, 1].tolist()
    assert abs(masked / used - 0.15) <= 0.01
    cdf = np.asarray(span_length_cdf(3.0, 40))
    pmf = np.diff(np.concatenate(([0.0], cdf)))
    expected_mean = float(np.dot(np.arange(1, 40), pmf))
    assert abs(np.mean(lengths) - expected_mean) < 0.1
    assert max(lengths) <= 39 and min(lengths) >= 1
    # Pearson chi-square of the length histogram against the truncated Poisson pmf (lengths 1..9, 10+).
    observed = np.bincount(np.minimum(lengths, 10), minlength=11)[1:]
    probabilities = np.append(pmf[:9], pmf[9:].sum())
    expected = probabilities * len(lengths)
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 27.9, (
        f"chi-square {chi_square:.1f} exceeds the 0.1% critical value for 9 degrees of freedom"
    )


def test_single_span_probability_one_masks_one_span(austen):
    _, structures = austen
    for _, draw in draws(structures[:40], ObjectiveConfig(single_span_prob=1.0), variants=1):
        assert len(draw.spans) == 1 and draw.used_length == T - 2


def test_sentence_spans_are_whole_corpus_sentences(austen):
    corpus, structures = austen
    config = ObjectiveConfig(token_prob=0.0, sentence_prob=1.0)
    masked = used = 0
    for structure, draw in draws(structures, config):
        assert draw.objective == Objective.SENTENCE and len(draw.spans) >= 1
        assert draw.layout_length == T
        for start, length in draw.spans.tolist():
            chunk = int(np.searchsorted(structure.chunk_offsets, start, side="right")) - 1
            absolute = int(structure.starts[chunk]) + start - int(structure.chunk_offsets[chunk]) - 1
            bounds = sentence_bounds(corpus, int(structure.documents[chunk])).tolist()
            assert absolute in bounds and absolute + length in bounds
            assert bounds.index(absolute + length) == bounds.index(absolute) + 1, "exactly one sentence"
            assert start + length <= draw.used_length
        masked += int(draw.spans[:, 1].sum())
        used += draw.used_length
    assert masked / used >= 0.15


def test_document_level_fractions_and_layouts(austen):
    _, structures = austen
    config = ObjectiveConfig(
        token_prob=0.0, document_prob=1.0, document_min_ratio=0.5, document_suffix_prob=0.5
    )
    suffix = total = 0
    for structure, draw in draws(structures, config):
        assert draw.objective == Objective.DOCUMENT and len(draw.spans) == 1
        assert draw.layout_length == T
        start, length = draw.spans[0].tolist()
        fraction = length / draw.used_length
        assert 0.5 - 1 / draw.used_length <= fraction <= 1.0
        if draw.suffix:
            assert start + length == draw.used_length
        else:
            assert maskable(structure, draw.used_length)[start : start + length].all()
        multi = structure.document_end_before(draw.used_length - 1)
        assert draw.suffix or not multi, "samples holding several documents always use the suffix layout"
        if not multi:
            suffix += draw.suffix
            total += 1
    assert total > 100 and abs(suffix / total - 0.5) < 0.1


def test_several_documents_force_the_suffix_layout_and_share_token_spans():
    # Three packed documents of 100 tokens: [CLS] d0 [eos] [CLS] d1 [eos] [CLS] d2 (cut).
    structure = SampleStructure(
        np.arange(3), np.array([0, 100, 200]), np.array([100, 200, 300]), np.array([True, True, True])
    )
    document = ObjectiveConfig(token_prob=0.0, document_prob=1.0, document_suffix_prob=0.0)
    token = ObjectiveConfig()
    for variant in range(50):
        draw = draw_spans(span_rng(1, 0, 0, 0, variant), structure, document, 256)
        assert draw.suffix and draw.layout_length == 256
        draw = draw_spans(span_rng(1, 0, 0, 0, variant), structure, token, 256)
        allowed = maskable(structure, draw.used_length)
        for start, length in draw.spans.tolist():
            assert allowed[start : start + length].all(), (
                "a span never covers [CLS], eos or crosses documents"
            )


def test_objective_mixture_and_determinism(austen):
    _, structures = austen
    config = ObjectiveConfig(token_prob=0.5, sentence_prob=0.3, document_prob=0.2)
    objectives = [draw.objective for _, draw in draws(structures, config, variants=4)]
    shares = np.bincount(np.asarray(objectives, dtype=np.int64), minlength=3) / len(objectives)
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.06)
    structure = structures[3]
    first = draw_spans(span_rng(7, 0, 0, 3, 1), structure, config, T)
    again = draw_spans(span_rng(7, 0, 0, 3, 1), structure, config, T)
    assert first == again
    others = [
        draw_spans(span_rng(7, 0, 0, 3, v), structure, ObjectiveConfig(), T).spans.tolist() for v in range(4)
    ]
    assert len({str(o) for o in others}) == 4, "variants differ"


def test_short_samples_stay_within_the_sequence_length():
    structure = SampleStructure(np.array([0]), np.array([0]), np.array([6]), np.array([True]))
    config = ObjectiveConfig(token_prob=0.4, sentence_prob=0.0, document_prob=0.6)
    for variant in range(30):
        draw = draw_spans(span_rng(0, 0, 0, 0, variant), structure, config, 64)
        assert draw.used_length == structure.length == 8
        assert draw.layout_length <= 64


def test_truncated_poisson_cdf():
    cdf = span_length_cdf(3.0, 40)
    assert len(cdf) == 39 and cdf[-1] == 1.0
    weights = [3.0**k / math.factorial(k) for k in range(1, 40)]
    assert cdf[0] == pytest.approx(weights[0] / sum(weights))
