"""Cloze (PET-style) classification finetuning on the pretraining engine (THUDM/GLM ``finetune_glm.py``).

A task is a pattern with ``{field}`` placeholders and one ``[MASK]``, and a verbalizer: one answer text per
label. Each candidate answer a_1..a_n is laid out with the pretraining builder as the span at the mask:
Part A ``[CLS] pattern-with-[MASK] [eos]``, Part B ``[sop] a_1..a_n`` predicting ``a_1..a_n [eop]``.
A single-token answer is thus read at the ``[sop]`` position; a candidate scores the sum of its targets'
log-probabilities and the best-scoring label is the prediction (one candidate per label, so it is also
multiple choice). Training minimizes the correct candidate's token-mean cross entropy (THUDM's
"generative" cloze loss) through ``TrainingEngine``: the same config, DeepSpeed engine and checkpoints
as pretraining (``finetune.common``). After each epoch the dev accuracy is measured and the best weights
are kept (``<output>/best``, THUDM layout, loadable by every command).
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.layout import GLMLayout, build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.config import GLMConfig
from megatron_glm.evaluation.zero_shot import score_layouts
from megatron_glm.finetune.common import FinetuneResult, check_finetune_config, finetune
from megatron_glm.model import GLMModel

MASK = "[MASK]"


@dataclasses.dataclass
class ClozeTask:
    pattern: str  # e.g. "{text} Is it about her? [MASK]."
    verbalizer: dict[str, str]  # label -> answer text
    label_field: str = "label"

    def __post_init__(self) -> None:
        if self.pattern.count(MASK) != 1:
            raise DataError(
                f"pattern {self.pattern!r} must contain [MASK] exactly once (where the answer goes)"
            )
        if not self.verbalizer:
            raise DataError("the verbalizer is empty: give one answer per label, e.g. yes=Yes,no=No")
        self.fields = [name for _, name, _, _ in string.Formatter().parse(self.pattern) if name]


@dataclasses.dataclass
class ClozeExample:
    where: str
    candidates: list[GLMLayout]  # one per label, in verbalizer order
    label: int


def cloze_example(record: dict, where: str, task: ClozeTask, tokenizer: GLMTokenizer) -> ClozeExample:
    for name in [*task.fields, task.label_field]:
        if name not in record:
            raise DataError(f"{where}: no {name!r} field (the line has {sorted(record)})")
    label = str(record[task.label_field])
    labels = list(task.verbalizer)
    if label not in task.verbalizer:
        raise DataError(f"{where}: unknown label {label!r}; the verbalizer has {labels}")
    left, right = task.pattern.split(MASK)
    values = {name: str(record[name]) for name in task.fields}
    # Each side is encoded as text: a "[MASK]" inside a field stays characters.
    left_ids, right_ids = tokenizer.encode(left.format(**values)), tokenizer.encode(right.format(**values))
    command = tokenizer.command
    candidates = []
    for answer in task.verbalizer.values():
        answer_ids = tokenizer.encode(" " + answer)
        if not answer_ids:
            raise DataError(f"verbalizer answer {answer!r} encodes to no token")
        tokens = [command.cls, *left_ids, *answer_ids, *right_ids, command.eos]
        candidates.append(
            build_glm_layout(
                np.asarray(tokens), [(1 + len(left_ids), len(answer_ids))], Objective.TOKEN, command
            )
        )
    return ClozeExample(where, candidates, labels.index(label))


@torch.no_grad()
def cloze_accuracy(
    model: GLMModel, examples: list[ClozeExample], vocab_limit: int, batch_size: int = 16
) -> float:
    """Share of examples whose correct label's candidate has the highest summed log-probability."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        layouts = [layout for example in chunk for layout in example.candidates]
        nll, _, owner = score_layouts(model, layouts, vocab_limit)
        scores = torch.zeros(len(layouts), dtype=torch.float64).index_add_(0, owner, -nll)
        offset = 0
        for example in chunk:
            count = len(example.candidates)
            correct += int(scores[offset : offset + count].argmax()) == example.label
            offset += count
    model.train(was_training)
    return correct / max(len(examples), 1)


def finetune_cloze(
    cfg: GLMConfig,
    train: list[ClozeExample],
    dev: list[ClozeExample],
    tokenizer: GLMTokenizer,
    *,
    epochs: int,
    output_dir: str | Path,
) -> FinetuneResult:
    """Train on ``train`` for ``epochs`` (the process group must be up), keep the best dev-accuracy weights.

    Each example trains on its correct label's candidate; ``result.dev`` holds ``{"accuracy": ...}``."""
    check_finetune_config(cfg)
    limit = cfg.model.max_position_embeddings
    for example in [*train, *dev]:
        longest = max(len(c) for c in example.candidates)
        if longest > limit:
            raise DataError(
                f"{example.where}: {longest} tokens laid out, the model's position table holds "
                f"max_position_embeddings={limit}; shorten the text"
            )
    return finetune(
        cfg,
        [example.candidates[example.label] for example in train],
        lambda model: {"accuracy": cloze_accuracy(model, dev, tokenizer.num_tokens)},
        "accuracy",
        epochs=epochs,
        output_dir=output_dir,
    )
