"""Cloze (PET-style) classification finetuning on the pretraining engine (THUDM/GLM ``finetune_glm.py``).

A task is a pattern with ``{field}`` placeholders and one ``[MASK]``, and a verbalizer: one answer text per
label. Each candidate answer a_1..a_n is laid out with the pretraining builder as the span at the mask:
Part A ``[CLS] pattern-with-[MASK] [eos]``, Part B ``[sop] a_1..a_n`` predicting ``a_1..a_n [eop]``.
A single-token answer is thus read at the ``[sop]`` position; a candidate scores the sum of its targets'
log-probabilities and the best-scoring label is the prediction (one candidate per label, so it is also
multiple choice). Training minimizes the correct candidate's token-mean cross entropy (THUDM's
"generative" cloze loss) through ``TrainingEngine``: the same config, DeepSpeed engine and checkpoints
as pretraining. After each epoch the dev accuracy is measured and the best weights are kept
(``<output>/best``, THUDM layout, loadable by every command).
"""

from __future__ import annotations

import dataclasses
import random
import string
from pathlib import Path

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.layout import GLMLayout, build_glm_layout, pad_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.checkpoint import save_thudm_checkpoint
from megatron_glm.config import ConfigError, GLMConfig, padded_vocab_size, parallel_layout
from megatron_glm.data import collate_glm_batch
from megatron_glm.evaluation.zero_shot import score_layouts
from megatron_glm.model import GLMModel
from megatron_glm.parallel import get_data_parallel_rank

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


def _batch(layouts: list[GLMLayout], length: int) -> dict[str, torch.Tensor]:
    """The pretraining batch contract (``collate_glm_batch``) of ``layouts`` padded to ``length``."""
    padded = [pad_layout(layout, length) for layout in layouts]
    items = [
        {
            "tokens": p.tokens,
            "targets": p.targets,
            "loss_mask": p.loss_mask,
            "position_ids": p.position_ids,
            "sep": p.sep,
            "objective": 0,
        }
        for p in padded
    ]
    return collate_glm_batch(items)


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


@dataclasses.dataclass
class FinetuneResult:
    dev_accuracy: list[float]  # after each epoch
    train_loss: list[float]  # mean over each epoch's steps
    best_epoch: int
    best_dir: str | None


def finetune_cloze(
    cfg: GLMConfig,
    train: list[ClozeExample],
    dev: list[ClozeExample],
    tokenizer: GLMTokenizer,
    *,
    epochs: int,
    output_dir: str | Path,
) -> FinetuneResult:
    """Train on ``train`` for ``epochs`` (the process group must be up), keep the best dev-accuracy weights."""
    import torch.distributed as dist

    from megatron_glm.parallel import initialize_parallel, is_initialized
    from megatron_glm.training.distributed import detect_launch, device_for
    from megatron_glm.training.engine import TrainingEngine

    if cfg.parallel.pipeline_parallel_size > 1 or cfg.parallel.zero_stage >= 3:
        raise ConfigError("glm-finetune runs without pipeline parallelism and with parallel.zero_stage < 3")
    if not train:
        raise DataError("the training set is empty")
    limit = cfg.model.max_position_embeddings
    for example in [*train, *dev]:
        if max(len(c) for c in example.candidates) > limit:
            raise DataError(
                f"{example.where}: {max(len(c) for c in example.candidates)} tokens laid out, the model's position "
                f"table holds max_position_embeddings={limit}; shorten the text"
            )
    layout = parallel_layout(cfg, dist.get_world_size())
    per_step = cfg.training.global_batch_size
    steps_per_epoch = max(1, len(train) // per_step)
    cfg = dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, train_steps=epochs * steps_per_epoch)
    )
    if not is_initialized():
        initialize_parallel(layout.tensor_parallel_size, 1)
    device = device_for(detect_launch())
    engine = TrainingEngine(cfg, layout, padded_vocab_size(cfg.model, layout.tensor_parallel_size), device)
    longest = max(len(c) for example in train for c in example.candidates)
    rng = random.Random(cfg.training.seed)
    micro, dp_rank = cfg.training.micro_batch_size, get_data_parallel_rank()
    accuracies, losses, best, best_dir = [], [], -1.0, None
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)

        def micro_batches(order=order):
            for step in range(steps_per_epoch):
                chosen = order[step * per_step : (step + 1) * per_step]
                mine = chosen[dp_rank * micro * layout.gradient_accumulation_steps :][
                    : micro * layout.gradient_accumulation_steps
                ]
                for first in range(0, len(mine), micro):
                    yield _batch(
                        [train[i].candidates[train[i].label] for i in mine[first : first + micro]], longest
                    )

        batches = micro_batches()
        losses.append(float(np.mean([engine.train_step(batches).loss for _ in range(steps_per_epoch)])))
        accuracy = cloze_accuracy(engine.module, dev, tokenizer.num_tokens)
        accuracies.append(accuracy)
        if accuracy > best:
            best = accuracy
            best_dir = str(save_thudm_checkpoint(engine.module, output_dir, tag="best"))
    return FinetuneResult(accuracies, losses, int(np.argmax(accuracies)), best_dir)
