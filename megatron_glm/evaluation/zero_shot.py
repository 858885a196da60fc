"""Zero-shot language-model evaluation as THUDM/GLM runs it: LAMBADA-style last-word accuracy and
perplexity with overlapping windows.

Both lay a text out with the pretraining builder's suffix (generation) layout: Part A is
``[CLS] context [gMASK]`` (or ``[MASK]``), Part B ``[sop] target[:-1]`` predicting ``target``, every
Part-B token at the mask's position with block positions ``1..``. Bidirectional (the default) lets
Part A attend to itself in both directions; unidirectional makes only ``[CLS]`` Part A (``sep = 1``),
so the context is read left to right like a GPT.

* Last word: the text splits at its last whitespace into context and word; the word is right when
  every one of its tokens is the argmax given the right ones before it (teacher forcing, which is
  greedy decoding of exactly the word).
* Perplexity: the token stream (documents joined by the end-of-text token) is cut into windows of
  ``window`` tokens. The first predicts all its tokens but the first from that one; every later
  window predicts the next ``stride`` tokens from the ``window - stride`` tokens before them. So every
  token but the stream's first is predicted exactly once (``perplexity_windows``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from data_tools.layout import GLMLayout, build_glm_layout, pad_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens, GLMTokenizer
from megatron_glm.errors import GLMError
from megatron_glm.generation import GenerationError
from megatron_glm.model import GLMModel, loss_row_index, loss_rows
from megatron_glm.parallel import gather_from_tensor_parallel, vocab_parallel_cross_entropy


class EvaluationError(GLMError):
    """Input the evaluation cannot use: a text without a last word, windows that do not fit the model."""


def suffix_layout(
    context: Sequence[int],
    target: Sequence[int],
    command: CommandTokens,
    *,
    unidirectional: bool,
    gmask: bool,
) -> GLMLayout:
    """``[CLS] context [gMASK|MASK] [sop] target[:-1]`` with the loss on ``target``."""
    tokens = [command.cls, *context, *target]
    layout = build_glm_layout(
        np.asarray(tokens),
        [(1 + len(context), len(target))],
        Objective.DOCUMENT,
        command,
        suffix=True,
        task_mask=gmask,
    )
    if unidirectional:
        layout.sep = 1
    return layout


def score_layouts(
    model: GLMModel, layouts: list[GLMLayout], vocab_limit: int
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Per loss position, in layout order: the NLL, whether the argmax is the target, the layout's index.

    ``model`` may be a ``GLMModel`` subclass whose own forward returns something else (the training
    engine's module returns the loss): the hidden states come from ``GLMModel.forward``."""
    longest = max(len(layout) for layout in layouts)
    padded = [pad_layout(layout, longest) for layout in layouts]
    device = next(model.parameters()).device
    loss_mask = torch.tensor(np.stack([p.loss_mask for p in padded]), device=device)
    targets = torch.tensor(np.stack([p.targets for p in padded]), device=device)
    hidden = GLMModel.forward(
        model,
        torch.tensor(np.stack([p.tokens for p in padded]), device=device),
        torch.tensor(np.stack([p.position_ids for p in padded]), device=device),
        torch.tensor([p.sep for p in padded], device=device),
    )
    rows = loss_row_index(loss_mask)
    logits = model.logits(loss_rows(hidden, rows)).float()
    wanted = loss_rows(targets.unsqueeze(-1), rows).squeeze(-1)
    nll = vocab_parallel_cross_entropy(logits, wanted)
    argmax = gather_from_tensor_parallel(logits)[:, :vocab_limit].argmax(-1)
    owner = loss_rows(torch.arange(len(layouts), device=device).expand(longest, -1).T.unsqueeze(-1), rows)
    return nll.double().cpu(), (argmax == wanted).cpu(), owner.squeeze(-1).cpu()


def _check_length(layout: GLMLayout, limit: int, where: str) -> None:
    if len(layout) - 1 > limit:
        raise EvaluationError(
            f"{where}: {len(layout)} tokens laid out, the model's position table holds "
            f"max_position_embeddings={limit}; use shorter texts or windows"
        )


@dataclasses.dataclass
class LastWordResult:
    accuracy: float
    correct: int
    total: int


def split_last_word(text: str, where: str) -> tuple[str, str]:
    context, _, word = text.rstrip().rpartition(" ")
    if not context.strip() or not word:
        raise EvaluationError(f"{where}: the text needs a context and a last word separated by a space")
    return context, word


@torch.no_grad()
def last_word_accuracy(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    texts: Sequence[tuple[str, str]],
    *,
    unidirectional: bool = False,
    gmask: bool = True,
    batch_size: int = 16,
) -> LastWordResult:
    """Share of ``(where, text)`` whose last word the model predicts token for token."""
    layouts = []
    for where, text in texts:
        context, word = split_last_word(text, where)
        layout = suffix_layout(
            tokenizer.encode(context),
            tokenizer.encode(" " + word),
            tokenizer.command,
            unidirectional=unidirectional,
            gmask=gmask,
        )
        _check_length(layout, model.config.max_position_embeddings, where)
        layouts.append(layout)
    model.eval()
    correct = 0
    for start in range(0, len(layouts), batch_size):
        batch = layouts[start : start + batch_size]
        _, right, owner = score_layouts(model, batch, tokenizer.num_tokens)
        wrong = torch.zeros(len(batch), dtype=torch.long).index_add_(0, owner, (~right).long())
        correct += int((wrong == 0).sum())
    return LastWordResult(correct / max(len(layouts), 1), correct, len(layouts))


def perplexity_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(context_start, target_start, target_end)`` per window over a stream of ``num_tokens``."""
    if not 1 <= stride < window:
        raise EvaluationError(f"stride={stride} must lie in [1, window={window})")
    if num_tokens < 2:
        raise EvaluationError(f"{num_tokens} tokens: perplexity needs at least 2")
    windows = [(0, 1, min(window, num_tokens))]
    context = window - stride
    while windows[-1][2] < num_tokens:
        start = windows[-1][2]
        windows.append((start - context, start, min(start + stride, num_tokens)))
    return windows


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    loss: float  # mean NLL per predicted token (nats)
    tokens: int
    windows: int


@torch.no_grad()
def perplexity(
    model: GLMModel,
    stream: np.ndarray,
    command: CommandTokens,
    vocab_limit: int,
    *,
    window: int,
    stride: int,
    unidirectional: bool = False,
    gmask: bool = True,
    batch_size: int = 8,
    progress=None,
) -> PerplexityResult:
    """exp(mean NLL) of every token of ``stream`` but the first, scored in overlapping windows."""
    windows = perplexity_windows(len(stream), window, stride)
    limit = model.config.max_position_embeddings
    if window + 3 > limit + 1:
        raise EvaluationError(
            f"window={window}: a window lays out {window + 3} tokens, the model's position "
            f"table holds max_position_embeddings={limit}; lower window"
        )
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        layouts = [
            suffix_layout(stream[c:t], stream[t:e], command, unidirectional=unidirectional, gmask=gmask)
            for c, t, e in windows[first : first + batch_size]
        ]
        nll, _, _ = score_layouts(model, layouts, vocab_limit)
        total += float(nll.sum())
        count += len(nll)
        if progress is not None:
            progress.update(len(layouts))
    loss = total / count
    return PerplexityResult(math.exp(loss), loss, count, len(windows))


def corpus_stream(prefix: str, command: CommandTokens) -> np.ndarray:
    """The tokens of a glm-preprocess corpus, documents in order, each followed by the end-of-text token."""
    from data_tools.indexed import IndexedDataset

    dataset = IndexedDataset(prefix)
    pieces = []
    for d in range(dataset.num_documents):
        pieces.append(np.asarray(dataset.get_document(d), dtype=np.int64))
        pieces.append(np.asarray([command.eos], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


__all__ = [
    "EvaluationError",
    "GenerationError",
    "LastWordResult",
    "PerplexityResult",
    "corpus_stream",
    "last_word_accuracy",
    "perplexity",
    "perplexity_windows",
    "score_layouts",
    "split_last_word",
    "suffix_layout",
]
