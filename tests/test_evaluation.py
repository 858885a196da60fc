"""glm-eval's zero-shot measures: perplexity windows predict every token exactly once; a tiny GLM trained
for a few seconds on a repeated paragraph of the demo corpus scores far better than an untrained one on
last-word accuracy and perplexity, bidirectionally and unidirectionally."""

import random

import numpy as np
import pytest
import torch

from data_tools.tokenizer import load_tokenizer
from megatron_glm.config import ModelConfig
from megatron_glm.evaluation.zero_shot import (
    EvaluationError,
    last_word_accuracy,
    perplexity,
    perplexity_windows,
    suffix_layout,
)
from megatron_glm.model import GLMModel, glm_loss
from megatron_glm.parallel import destroy_parallel, initialize_parallel
from tests.glm_corpora import austen_chapters

CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=128,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
WINDOW, STRIDE = 48, 16


@pytest.mark.parametrize(
    "num_tokens, window, stride", [(2, 8, 3), (100, 8, 3), (97, 48, 16), (48, 48, 47), (49, 48, 1)]
)
def test_windows_predict_every_token_but_the_first_exactly_once(num_tokens, window, stride):
    windows = perplexity_windows(num_tokens, window, stride)
    predicted = [i for _, start, end in windows for i in range(start, end)]
    assert predicted == list(range(1, num_tokens))
    assert all(end - context <= window and start > context >= 0 for context, start, end in windows)
    assert all(start - context == window - stride for context, start, _ in windows[1:])


def test_bad_windows_are_refused():
    with pytest.raises(EvaluationError, match="stride=8 must lie in"):
        perplexity_windows(100, 8, 8)
    with pytest.raises(EvaluationError, match="at least 2"):
        perplexity_windows(1, 8, 3)


@pytest.fixture(scope="module")
def models():
    """(untrained, trained) on a paragraph of Emma repeated: a few seconds of Adam on the eval layouts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("bert-base-uncased")
    command = tokenizer.command
    paragraph = austen_chapters(0, 1)[0].split("\n")[0]
    ids = tokenizer.encode(paragraph)
    stream = np.asarray((ids + [command.eos]) * 4, dtype=np.int64)
    initialize_parallel(1, 1)
    untrained = GLMModel(CONFIG, 30592, seed=1).eval()
    trained = GLMModel(CONFIG, 30592, seed=1)
    optimizer = torch.optim.Adam(trained.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(300):
        # Last-word layouts: the paragraph's start as context, a 1-3 token target, uni- and bidirectional.
        # (A model this small learns which word follows a position well before it learns to look at the
        # word before the blank, so the contexts start where the cases start.)
        layouts = []
        for i in range(8):
            split = rng.randrange(2, WINDOW - 8)
            end = split + rng.randint(1, 3)
            layouts.append(
                suffix_layout(
                    stream[:split], stream[split:end], command, unidirectional=i % 2 == 1, gmask=True
                )
            )
        longest = max(len(layout) for layout in layouts)
        from data_tools.layout import pad_layout

        batch = [pad_layout(layout, longest) for layout in layouts]
        hidden = trained(
            torch.tensor(np.stack([b.tokens for b in batch])),
            torch.tensor(np.stack([b.position_ids for b in batch])),
            torch.tensor([b.sep for b in batch]),
        )
        loss = glm_loss(
            trained,
            hidden,
            torch.tensor(np.stack([b.targets for b in batch])),
            torch.tensor(np.stack([b.loss_mask for b in batch])),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    yield untrained, trained.eval(), tokenizer, paragraph, stream
    destroy_parallel()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("unidirectional", [False, True], ids=["bidirectional", "unidirectional"])
def test_trained_model_beats_untrained_on_last_words_and_perplexity(models, unidirectional):
    untrained, trained, tokenizer, paragraph, stream = models
    words = paragraph.split()
    # The paragraph cut after each plain word (punctuation stays in the context, as in the text).
    cases = [(f"case {k}", " ".join(words[: k + 1])) for k in range(4, 28) if words[k].isalpha()]
    assert max(len(tokenizer.encode(text)) for _, text in cases) < WINDOW - 8  # contexts seen in training
    scores = [
        last_word_accuracy(m, tokenizer, cases, unidirectional=unidirectional) for m in (untrained, trained)
    ]
    assert scores[0].total == len(cases) >= 10
    assert scores[1].accuracy >= 0.4 and scores[0].accuracy <= 0.1
    ppl = [
        perplexity(
            m,
            stream,
            tokenizer.command,
            tokenizer.num_tokens,
            window=WINDOW,
            stride=STRIDE,
            unidirectional=unidirectional,
        )
        for m in (untrained, trained)
    ]
    assert ppl[0].tokens == len(stream) - 1
    assert ppl[1].perplexity < ppl[0].perplexity / 10
