"""Greedy blank filling decodes exactly what the pretraining layout predicts (teacher forcing agrees)."""

import numpy as np
import pytest
import torch

from data_tools.layout import build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import load_tokenizer
from megatron_glm.config import ModelConfig
from megatron_glm.generation import fill_blanks
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel

# A large init makes the layers (not the residual copy of the input token) decide the prediction, so the
# greedy tokens vary with position and a position or mask mistake in decoding changes them.
CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.5,
)


@pytest.fixture
def model():
    initialize_parallel(1, 1)
    yield GLMModel(CONFIG, 30592, seed=7)
    destroy_parallel()


def test_greedy_answer_is_the_teacher_forced_argmax(model):
    tokenizer = load_tokenizer("bert-base-uncased")
    command = tokenizer.command
    text = "she was the youngest of the two [MASK] of a most affectionate father"
    result = fill_blanks(model, tokenizer, text, max_tokens=3)
    answer = result.answer_ids[0]
    assert len(answer) == 3 and len(set(answer)) > 1

    ids = [command.cls, *tokenizer.encode_with_commands(text), command.eos]
    blank = ids.index(command.mask)
    original = ids[:blank] + answer + ids[blank + 1 :]
    layout = build_glm_layout(np.asarray(original), [(blank, len(answer))], Objective.TOKEN, command)
    with torch.no_grad():
        hidden = model(
            torch.from_numpy(layout.tokens)[None],
            torch.from_numpy(layout.position_ids)[None],
            torch.tensor([layout.sep]),
        )
        predicted = model.logits(hidden[0, layout.sep : layout.sep + len(answer)]).argmax(-1).tolist()
    assert predicted == answer


def test_later_blanks_are_filled_and_a_text_without_blank_gets_a_continuation(model):
    tokenizer = load_tokenizer("bert-base-uncased")
    two = fill_blanks(model, tokenizer, "the [MASK] was [MASK] today", max_tokens=2)
    assert [len(a) for a in two.answer_ids] == [2, 2]
    assert two.text.startswith("the ") and two.text.endswith("today")
    continuation = fill_blanks(model, tokenizer, "it was a fine day", max_tokens=2)
    assert [len(a) for a in continuation.answer_ids] == [2]
    assert continuation.text.startswith("it was a fine day")
