"""Held-out single-token blank accuracy: the blanks follow GLM's layout, the answer is read at [sop], the
unigram baseline counts the most frequent target of the same set, and batching does not change answers."""

import types

import numpy as np
import pytest
import torch
from torch import nn

from data_tools.layout import build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens, load_tokenizer
from megatron_glm.config import ModelConfig
from megatron_glm.evaluation.blank_accuracy import (
    answer_tokens,
    build_blank_set,
    format_accuracy_table,
    predict_blanks,
    score_target_set,
    word_tokens,
)
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel

COMMAND = CommandTokens(pad=0, eos=0, cls=1, mask=2, sep=3, unk=4, sop=5, eop=6, gmask=7, smask=8, dblock=9)
# Text tokens 10..41; the command tokens 0..9 lie inside the text range, as BERT's do.
TOKENIZER = types.SimpleNamespace(command=COMMAND, text_vocab_size=42)
SYMBOLS = 32


@pytest.fixture(autouse=True)
def parallel_state():
    initialize_parallel(1, 1)
    yield
    destroy_parallel()


def counting_windows(count: int, seed: int) -> list[np.ndarray]:
    """``[CLS] s s+1 s+2 ... [eos]`` (symbols counted mod 32): every blank follows from its neighbours."""
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(count):
        start, length = int(rng.integers(SYMBOLS)), int(rng.integers(3, 12))
        text = 10 + (start + np.arange(length)) % SYMBOLS
        windows.append(np.concatenate(([COMMAND.cls], text, [COMMAND.eos])).astype(np.int64))
    return windows


class CountingOracle(nn.Module):
    """Answers a counting blank from Part A through GLM's layout contract only: at a ``[sop]`` whose
    position id p points at a ``[MASK]`` in Part A, the answer is Part A's token p-1 plus one (or p+1
    minus one after [CLS]). Elsewhere it outputs zeros, so reading the wrong row gives a wrong answer."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros(*tokens.shape, TOKENIZER.text_vocab_size)
        for b in range(tokens.shape[0]):
            for j in range(int(sep[b]), tokens.shape[1]):
                p = int(position_ids[b, 0, j])
                if tokens[b, j] != COMMAND.sop or tokens[b, p] != COMMAND.mask or p >= sep[b]:
                    continue
                left, right = int(tokens[b, p - 1]), int(tokens[b, p + 1])
                symbol = (right - 10 - 1) % SYMBOLS if left == COMMAND.cls else (left - 10 + 1) % SYMBOLS
                hidden[b, j, 10 + symbol] = 1.0
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class ZeroLogits(CountingOracle):
    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, TOKENIZER.text_vocab_size)


def test_an_oracle_reading_part_a_answers_every_blank_and_beats_the_unigram_baseline():
    blanks = build_blank_set(counting_windows(40, seed=1), TOKENIZER, blanks_per_window=2, seed=0)
    assert len(blanks) == 80
    # The blanks are text tokens, never [CLS] or [eos].
    assert bool(((blanks.targets >= 10) & (blanks.targets < 42)).all())
    answers = {
        "oracle": predict_blanks(CountingOracle(), blanks, TOKENIZER, batch_size=16),
        "always zero logits": predict_blanks(ZeroLogits(), blanks, TOKENIZER),
    }
    scores = score_target_set(
        "all tokens", blanks.targets, torch.ones(len(blanks), dtype=torch.bool), answers
    )
    assert scores.models["oracle"] == 1.0
    # Zero logits everywhere: the argmax is the first answerable token (10), never a command token.
    assert bool((answers["always zero logits"] == 10).all())
    assert scores.unigram < 0.2 and scores.models["oracle"] > 2 * scores.unigram


def test_unigram_baseline_is_the_most_frequent_target_of_the_same_set():
    targets = torch.tensor([7, 7, 7, 3, 3, 5, 5, 5, 5, 9])
    words = torch.tensor([False, False, False, True, True, True, False, False, False, True])
    answers = {"model": torch.tensor([7, 1, 1, 3, 3, 5, 5, 0, 0, 0])}
    everything = score_target_set("all", targets, torch.ones(10, dtype=torch.bool), answers)
    assert (everything.count, everything.unigram_token, everything.unigram) == (10, 5, 0.4)
    assert everything.models["model"] == pytest.approx(0.5)
    subset = score_target_set("words", targets, words, answers)
    # Over the words alone 3 is the most frequent target (2 of 4), not 5.
    assert (subset.count, subset.unigram_token, subset.unigram) == (4, 3, 0.5)
    assert subset.models["model"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty"):
        score_target_set("none", targets, torch.zeros(10, dtype=torch.bool), answers)


def test_batched_padded_answers_equal_one_layout_at_a_time():
    """A real GLM: padding rows to one length and batching them leaves every answer as computed alone."""
    config = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.5,  # so the layers, not the input embedding, decide the argmax
    )
    model = GLMModel(config, 64, seed=5)
    windows = counting_windows(12, seed=2)
    blanks = build_blank_set(windows, TOKENIZER, blanks_per_window=1, seed=3)
    batched = predict_blanks(model, blanks, TOKENIZER, batch_size=5)
    answerable = answer_tokens(TOKENIZER)
    alone = []
    for window, target in zip(windows, blanks.targets.tolist()):
        position = int(np.flatnonzero(window == target)[0])
        layout = build_glm_layout(window, [(position, 1)], Objective.TOKEN, COMMAND)
        with torch.no_grad():
            hidden = model(
                torch.from_numpy(layout.tokens)[None],
                torch.from_numpy(layout.position_ids)[None],
                torch.tensor([layout.sep]),
            )
            logits = model.logits(hidden[0, layout.sep])[:42].masked_fill(~answerable, -torch.inf)
        alone.append(int(logits.argmax()))
    assert batched.tolist() == alone
    assert len(set(alone)) > 1  # the answers depend on the input, so a misread row would show


def test_words_exclude_punctuation_and_the_table_states_both_target_sets():
    tokenizer = load_tokenizer("bert-base-uncased")
    words = word_tokens(tokenizer)
    assert words[tokenizer.token_to_id("wife")] and words[tokenizer.token_to_id("##ing")]
    assert not words[tokenizer.token_to_id(",")] and not words[tokenizer.token_to_id("1")]
    assert not answer_tokens(tokenizer)[tokenizer.command.cls]
    targets = torch.tensor([tokenizer.token_to_id(t) for t in (",", ",", ",", "wife", "man", "wife")])
    answers = {"trained": targets.clone()}
    scores = [
        score_target_set("all tokens", targets, torch.ones(6, dtype=torch.bool), answers),
        score_target_set("words only", targets, words[targets], answers),
    ]
    table = format_accuracy_table(scores, tokenizer, "title")
    assert "| all tokens (6 blanks) | words only (3 blanks) |" in table
    assert "all tokens ','" in table and "words only 'wife'" in table
    assert "| 50.0% | 66.7% |" in table and "| trained | 100.0% | 100.0% |" in table
    assert "| trained / unigram baseline | 2.0x | 1.5x |" in table


def test_eval_blanks_command_prints_the_table_for_a_checkpoint(tmp_path, capsys):
    """glm-eval-blanks end to end: held-out windows of a real corpus, a saved checkpoint, the table."""
    from megatron_glm.checkpoint import save_thudm_checkpoint
    from megatron_glm.cli.eval_blanks import main
    from megatron_glm.config import load_config, padded_vocab_size
    from tests.glm_corpora import austen_corpus
    from tests.training_runs import TINY_CONFIG, tiny_overrides

    corpus = austen_corpus(tmp_path, count=4)
    overrides = tiny_overrides(corpus, tmp_path / "cache", tmp_path / "run", **{"data.split": "[50, 50, 0]"})
    cfg = load_config(TINY_CONFIG, overrides)
    save_thudm_checkpoint(
        GLMModel(cfg.model, padded_vocab_size(cfg.model), seed=9), tmp_path / "ckpt", tag="7"
    )
    destroy_parallel()
    arguments = ["--config", str(TINY_CONFIG), "--checkpoint", str(tmp_path / "ckpt" / "7")]
    arguments += [f"--set={item}" for item in overrides] + ["--max-blanks", "50"]
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert "Top-1 accuracy on 50 single-token blanks of held-out text (valid split" in table
    assert "| all tokens (50 blanks) | words only (no punctuation) (" in table
    assert (
        "| untrained model (initial weights) |" in table
        and f"| trained model ({tmp_path / 'ckpt' / '7'}) |" in table
    )
    assert main([*arguments, "--split", "test"]) == 1
    assert "the test split" in capsys.readouterr().err
