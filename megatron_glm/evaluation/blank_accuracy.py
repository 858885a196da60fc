"""Top-1 accuracy on held-out single-token blanks: does the model fill a [MASK] with the right token?

Each blank is one token of a held-out text window replaced by ``[MASK]`` in Part A; Part B is ``[sop]``
alone, and the model's prediction at ``[sop]`` is its answer (the first token of the blank, exactly as
in pretraining's token objective and in ``glm-fill-blanks``). One blank per laid-out sequence, so every
answer comes from Part A context only (never from another blank's answer).

Two baselines put the number in context: the unigram baseline always answers the most frequent target
of the blank set itself (the best any constant answer can do on it), and the untrained model (initial
weights) shows what the architecture gets without learning. Blanks and answers are text tokens, never
command tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from data_tools.layout import build_glm_layout, pad_layout
from data_tools.objectives import Objective
from data_tools.sample_reader import SampleDirectory
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.model import GLMModel
from megatron_glm.parallel import gather_from_tensor_parallel


@dataclasses.dataclass
class BlankSet:
    """Laid-out single-blank sequences: ``tokens`` [N, T], ``position_ids`` [N, 2, T], ``sep`` [N] (the
    ``[sop]`` position, where the answer is read), ``targets`` [N] (the hidden tokens)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    sep: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def held_out_windows(
    directory: SampleDirectory, split: str, tokenizer: GLMTokenizer, context: int
) -> list[np.ndarray]:
    """The samples of ``split`` (documents never trained on when it is "valid" or "test"), cut into windows
    of at most ``context`` tokens, each starting with ``[CLS]`` as pretraining samples do."""
    command = tokenizer.command
    samples = directory.split(split)
    windows = []
    for corpus, size in enumerate(samples.corpus_sizes):
        for sample in range(size):
            tokens = samples.tokens(corpus, sample, command.cls, command.eos)
            for start in range(0, len(tokens), context - 1):
                piece = tokens[start : start + context - 1]
                if piece[0] != command.cls:
                    piece = np.concatenate(([command.cls], piece))
                windows.append(piece.astype(np.int64))
    return windows


def build_blank_set(
    windows: Iterable[np.ndarray],
    tokenizer: GLMTokenizer,
    *,
    blanks_per_window: int = 2,
    max_blanks: int | None = None,
    seed: int = 0,
) -> BlankSet:
    """Blanks at positions drawn (with ``seed``) among each window's text tokens; padded to one length."""
    command = tokenizer.command
    answerable = np.flatnonzero(answer_tokens(tokenizer).numpy())
    rng = np.random.Generator(np.random.Philox(seed))
    layouts, targets = [], []
    for window in windows:
        candidates = np.flatnonzero(np.isin(window, answerable))
        count = min(blanks_per_window, len(candidates))
        for position in np.sort(rng.choice(candidates, size=count, replace=False)):
            layouts.append(
                build_glm_layout(window, [(int(position), 1)], Objective.TOKEN, command, span_order=[0])
            )
            targets.append(int(window[position]))
    if not layouts:
        raise ValueError("no text tokens to blank: the held-out windows are empty")
    if max_blanks is not None and len(layouts) > max_blanks:
        keep = np.sort(rng.choice(len(layouts), size=max_blanks, replace=False))
        layouts = [layouts[i] for i in keep]
        targets = [targets[i] for i in keep]
    length = max(len(layout) for layout in layouts)
    padded = [pad_layout(layout, length) for layout in layouts]
    return BlankSet(
        tokens=torch.from_numpy(np.stack([p.tokens for p in padded])),
        position_ids=torch.from_numpy(np.stack([p.position_ids for p in padded])),
        sep=torch.tensor([p.sep for p in padded], dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
    )


def answer_tokens(tokenizer: GLMTokenizer) -> torch.Tensor:
    """A [text vocabulary] bool mask of the possible answers: text tokens that are not command tokens
    (BERT's [PAD], [CLS], [MASK], ... lie inside its text vocabulary)."""
    mask = torch.ones(tokenizer.text_vocab_size, dtype=torch.bool)
    command = [t for t in dataclasses.astuple(tokenizer.command) if t < tokenizer.text_vocab_size]
    mask[command] = False
    return mask


@torch.no_grad()
def predict_blanks(
    model: GLMModel, blanks: BlankSet, tokenizer: GLMTokenizer, *, batch_size: int = 64
) -> torch.Tensor:
    """The model's top-1 answer for every blank among ``answer_tokens``, [N] int64 on the CPU."""
    answerable = answer_tokens(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(blanks), batch_size):
        rows = slice(start, start + batch_size)
        sep = blanks.sep[rows].to(device)
        hidden = model(blanks.tokens[rows].to(device), blanks.position_ids[rows].to(device), sep)
        at_sop = hidden[torch.arange(hidden.shape[0], device=device), sep]
        logits = gather_from_tensor_parallel(model.logits(at_sop).float())
        logits = logits[:, : len(answerable)].masked_fill(~answerable.to(device), -math.inf)
        answers.append(logits.argmax(dim=-1).cpu())
    model.train(was_training)
    return torch.cat(answers)


def word_tokens(tokenizer: GLMTokenizer) -> torch.Tensor:
    """A [text vocabulary] bool mask: tokens whose text holds a letter (words and word pieces, not
    punctuation, digits or whitespace)."""
    return torch.tensor(
        [any(c.isalpha() for c in tokenizer.decode([i])) for i in range(tokenizer.text_vocab_size)],
        dtype=torch.bool,
    )


@dataclasses.dataclass
class TargetSetScores:
    """Accuracies on one target set (a subset of the blanks), each in [0, 1]."""

    name: str
    count: int
    unigram_token: int  # the constant answer of the unigram baseline
    unigram: float
    models: dict[str, float]


def score_target_set(
    name: str, targets: torch.Tensor, selected: torch.Tensor, answers: dict[str, torch.Tensor]
) -> TargetSetScores:
    """Accuracies over the blanks with ``selected``; the unigram baseline is computed on the same blanks."""
    chosen = targets[selected]
    if chosen.numel() == 0:
        raise ValueError(f"target set {name!r} is empty")
    values, counts = torch.unique(chosen, return_counts=True)
    best = int(counts.argmax())
    return TargetSetScores(
        name=name,
        count=int(chosen.numel()),
        unigram_token=int(values[best]),
        unigram=float(counts[best]) / chosen.numel(),
        models={
            label: float((predicted[selected] == chosen).float().mean())
            for label, predicted in answers.items()
        },
    )


def format_accuracy_table(scores: Sequence[TargetSetScores], tokenizer: GLMTokenizer, title: str) -> str:
    """A Markdown table: one row per model, one column per target set, baseline first."""
    columns = [f"{s.name} ({s.count:,} blanks)" for s in scores]
    rows = [
        [
            "unigram baseline (always the most frequent target: "
            + ", ".join(f"{s.name} {tokenizer.decode([s.unigram_token])!r}" for s in scores)
            + ")"
        ]
        + [f"{100 * s.unigram:.1f}%" for s in scores]
    ]
    for label in scores[0].models:
        rows.append([label] + [f"{100 * s.models[label]:.1f}%" for s in scores])
    labels = list(scores[0].models)
    if labels:
        last = labels[-1]
        rows.append(
            [f"{last} / unigram baseline"]
            + [f"{s.models[last] / s.unigram:.1f}x" if s.unigram > 0 else "-" for s in scores]
        )
    lines = [title, "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
