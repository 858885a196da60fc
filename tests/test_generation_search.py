"""glm-generate's decoders: the KV cache decodes exactly what full recomputation decodes (greedy,
sampling, beam search, batches with several blanks), beam search with enough beams finds the
brute-force best answer on a tiny vocabulary, and the TP = 2 decoder gives the TP = 1 tokens."""

import dataclasses
import itertools

import pytest
import torch

from data_tools.tokenizer import CommandTokens, load_tokenizer
from megatron_glm.config import ModelConfig
from megatron_glm.generation import GenerationConfig, GenerationError, generate, generate_ids, prompt_from_ids
from megatron_glm.generation.search import beam_search_blank
from megatron_glm.generation.steppers import CachedStepper, RecomputeStepper, Row
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel
from tests.multiproc import run_ranks

# A large init makes the layers (not the residual copy of the input token) decide the prediction, so the
# tokens vary with position and a position or mask mistake in decoding changes them.
CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.5,
)
TEXTS = [
    "the [MASK] was [MASK] today",
    "she was the youngest of the two daughters of a most affectionate [sMASK]",
    "it was a fine day",  # no blank: a [gMASK] continuation
]
SEED = 7


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small decode one token at a time: thread hand-offs cost more than they parallelize
    # (40x slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    initialize_parallel(1, 1)
    yield GLMModel(CONFIG, 30592, seed=SEED)
    destroy_parallel()


def _answers(model, config, use_cache):
    tokenizer = load_tokenizer("bert-base-uncased")
    return [r.answer_ids for r in generate(model, tokenizer, TEXTS, config, use_cache=use_cache)]


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(max_tokens=6),
        GenerationConfig(strategy="sample", max_tokens=6, temperature=0.8, top_k=40, top_p=0.9, seed=3),
        GenerationConfig(strategy="beam", max_tokens=5, num_beams=3, length_penalty=0.7),
        GenerationConfig(strategy="beam", max_tokens=5, num_beams=2, min_tokens=3, no_repeat_ngram_size=1),
    ],
    ids=["greedy", "sample", "beam", "beam-constrained"],
)
def test_cached_decoding_equals_full_recomputation(model, config):
    cached = _answers(model, config, use_cache=True)
    assert cached == _answers(model, config, use_cache=False)
    assert [len(a) for a in cached] == [2, 1, 1]
    assert any(len(answer) > 1 for answers in cached for answer in answers)
    if config.min_tokens:
        assert all(len(answer) >= config.min_tokens for answers in cached for answer in answers)
    if config.no_repeat_ngram_size == 1:
        assert all(len(set(answer)) == len(answer) for answers in cached for answer in answers)


def test_cached_logits_match_recomputed_logits(model):
    """The cache's step logits equal the full forward's to fp32 rounding (a mask or position slip is O(1))."""
    tokenizer = load_tokenizer("bert-base-uncased")
    from megatron_glm.generation import prompt_from_text
    from megatron_glm.generation.steppers import CachedStepper

    prompts = [prompt_from_text(t, tokenizer) for t in TEXTS]
    rows = [Row(0, [[2000, 2001]], [2002]), Row(1, [], [2003, 2004, 2005]), Row(2, [], [])]
    model.eval()
    with torch.no_grad():
        cached = CachedStepper(model, prompts, tokenizer.command, tokenizer.num_tokens)
        reference = RecomputeStepper(model, prompts, tokenizer.command, tokenizer.num_tokens)
        torch.testing.assert_close(cached.logits(rows), reference.logits(rows), atol=1e-4, rtol=1e-4)
        # Rewrite row 0's Part B (as beam search does) and extend the others: the cache must follow.
        rows = [Row(0, [[2000, 2010]], []), Row(1, [], [2003, 2004, 2005, 2006]), Row(2, [], [2007])]
        torch.testing.assert_close(cached.logits(rows), reference.logits(rows), atol=1e-4, rtol=1e-4)


# -- beam search against brute force --------------------------------------------------------------------
TINY_VOCAB = 8
COMMAND = CommandTokens(pad=7, eos=7, cls=0, mask=1, sep=6, unk=6, sop=2, eop=3, gmask=4, smask=5, dblock=6)


def _brute_force(model, prompt, config):
    """Every answer with its beam score, best first, by scoring every token sequence with full
    recomputation (teacher forcing)."""
    stops = (COMMAND.eop, COMMAND.eos)
    content = [t for t in range(TINY_VOCAB) if t not in stops]
    prefixes = [list(p) for n in range(config.max_tokens) for p in itertools.product(content, repeat=n)]
    stepper = RecomputeStepper(model, [prompt], COMMAND, TINY_VOCAB)
    with torch.no_grad():
        log_probs = torch.log_softmax(stepper.logits([Row(0, [], p) for p in prefixes]).double(), -1)
    table = {tuple(p): log_probs[i] for i, p in enumerate(prefixes)}

    def allowed(prefix, token):
        if token in stops:
            return len(prefix) >= config.min_tokens
        n = config.no_repeat_ngram_size
        return n == 0 or tuple([*prefix, token][-n:]) not in {
            tuple(prefix[i : i + n]) for i in range(len(prefix) - n + 1)
        }

    ranked = []
    for prefix in prefixes:
        if not all(allowed(prefix[:i], t) for i, t in enumerate(prefix)):
            continue
        logp = sum(float(table[tuple(prefix[:i])][t]) for i, t in enumerate(prefix))
        for stop in stops:
            if allowed(prefix, stop):
                ranked.append(
                    (
                        (logp + float(table[tuple(prefix)][stop]))
                        / (len(prefix) + 1) ** config.length_penalty,
                        prefix,
                    )
                )
        if len(prefix) == config.max_tokens - 1:
            for token in content:
                if allowed(prefix, token):
                    score = (
                        logp + float(table[tuple(prefix)][token])
                    ) / config.max_tokens**config.length_penalty
                    ranked.append((score, [*prefix, token]))
    return sorted(ranked, key=lambda item: -item[0])


@pytest.mark.parametrize(
    "length_penalty, min_tokens, no_repeat",
    [(1.0, 0, 0), (0.5, 1, 1), (0.0, 0, 2), (-0.5, 0, 0)],
    ids=["lp1", "lp.5-min-ngram", "lp0-ngram2", "lp-neg"],
)
def test_exhaustive_beam_search_ranks_answers_as_brute_force(length_penalty, min_tokens, no_repeat):
    initialize_parallel(1, 1)
    try:
        model = GLMModel(dataclasses.replace(CONFIG, init_method_std=0.3), 128, seed=11).eval()
        with torch.no_grad():
            model.word_embeddings.weight[COMMAND.eop] *= (
                3  # [eop] likely in some contexts: answers of every length
            )
        prompts = [
            prompt_from_ids([0, 6, 1, 6, 6, 7], COMMAND),
            prompt_from_ids([0, 1, 5, 0, 6, 7, 7], COMMAND),
        ]
        config = GenerationConfig(
            strategy="beam",
            max_tokens=3,
            num_beams=400,  # > 6 x 6 x 8 candidates per step and > 302 answers: nothing is pruned
            length_penalty=length_penalty,
            min_tokens=min_tokens,
            no_repeat_ngram_size=no_repeat,
        )
        stepper = CachedStepper(model, prompts, COMMAND, TINY_VOCAB)
        rows = [Row(p, [], []) for p in range(len(prompts)) for _ in range(config.num_beams)]
        with torch.no_grad():
            found = beam_search_blank(stepper, rows, [True] * len(rows), config.num_beams, config, [3, 7])
        for p, prompt in enumerate(prompts):
            expected = _brute_force(model, prompt, config)
            assert len({len(tokens) for _, tokens in expected}) > 1
            got = found[p].items
            assert [tokens for _, tokens in got] == [tokens for _, tokens in expected]
            torch.testing.assert_close([s for s, _ in got], [s for s, _ in expected], rtol=1e-5, atol=1e-5)
        # The best is what glm-generate answers (the second prompt has a second blank, answered after).
        answers = generate_ids(model, prompts, COMMAND, TINY_VOCAB, config)
        assert [a[0] for a in answers] == [_brute_force(model, p, config)[0][1] for p in prompts]
        assert [len(a) for a in answers] == [1, 2]
        small = dataclasses.replace(config, num_beams=4)
        assert generate_ids(model, prompts, COMMAND, TINY_VOCAB, small) == generate_ids(
            model, prompts, COMMAND, TINY_VOCAB, small, use_cache=False
        )
    finally:
        destroy_parallel()


def test_bad_settings_and_too_long_prompts_are_named(model):
    tokenizer = load_tokenizer("bert-base-uncased")
    with pytest.raises(GenerationError, match="prompt 1: .* max_position_embeddings=64"):
        generate(model, tokenizer, ["a [MASK]", "word " * 80], GenerationConfig(max_tokens=4))
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, tokenizer, ["a [MASK]"], GenerationConfig(strategy="sample", top_p=0.0))
    with pytest.raises(GenerationError, match="max_tokens=70"):
        generate(model, tokenizer, ["a [MASK]"], GenerationConfig(max_tokens=70))


# -- tensor parallel ------------------------------------------------------------------------------------
TP_CONFIGS = [
    GenerationConfig(max_tokens=5),
    GenerationConfig(strategy="sample", max_tokens=5, top_k=20, seed=5),
    GenerationConfig(strategy="beam", max_tokens=4, num_beams=3),
]


def _decode_all(model):
    tokenizer = load_tokenizer("bert-base-uncased")
    return [[r.answer_ids for r in generate(model, tokenizer, TEXTS, config)] for config in TP_CONFIGS]


def _decode_at_tp2(rank, world_size):
    initialize_parallel(world_size, 1)
    try:
        return _decode_all(GLMModel(CONFIG, 30592, seed=SEED))
    finally:
        destroy_parallel()


def test_tensor_parallel_decoding_gives_the_single_rank_tokens(model):
    expected = _decode_all(model)
    ranks = run_ranks(_decode_at_tp2, 2)
    assert ranks[0] == expected and ranks[1] == expected
