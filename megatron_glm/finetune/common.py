"""What every finetuning task shares: the engine, the batches, the epoch loop and the best weights.

A task hands ``finetune`` its training sequences already laid out (``GLMLayout``: Part A, Part B, targets,
loss mask) and a function that scores the model on its dev split. ``finetune`` builds ``TrainingEngine``
(the config's optimizer, schedule, precision, ZeRO stage and tensor parallelism over the launched
processes: the same engine and checkpoints as pretraining), trains ``epochs`` passes in a seeded shuffled
order (each global batch split over the data-parallel ranks, padded to one shape), scores the dev split
after each epoch and writes the best epoch's weights to ``<output>/best`` in THUDM's layout, which every
command loads.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.layout import GLMLayout, pad_layout
from megatron_glm.checkpoint import save_thudm_checkpoint
from megatron_glm.config import ConfigError, GLMConfig, padded_vocab_size, parallel_layout, validate_config
from megatron_glm.data import collate_glm_batch
from megatron_glm.model import GLMModel
from megatron_glm.parallel import get_data_parallel_rank


@dataclasses.dataclass
class FinetuneResult:
    metric: str  # the dev metric that picks the best epoch (higher is better)
    dev: list[dict[str, float]]  # the dev metrics after each epoch
    train_loss: list[float]  # mean over each epoch's steps
    best_epoch: int  # 0-based
    best_dir: str | None

    @property
    def scores(self) -> list[float]:
        """``metric`` after each epoch."""
        return [metrics[self.metric] for metrics in self.dev]


def layouts_batch(layouts: list[GLMLayout], length: int) -> dict[str, torch.Tensor]:
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


class HiddenStates(torch.nn.Module):
    """The engine's module (whose forward returns the training loss) seen as a plain ``GLMModel`` by the
    decoders of ``megatron_glm.generation``: calling it returns hidden states. It shares the weights."""

    def __init__(self, model: GLMModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return GLMModel.forward(self.model, *args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)


def check_finetune_config(cfg: GLMConfig) -> None:
    """Raise ``ConfigError`` listing every broken rule of ``cfg``: pretraining's (``validate_config``: the same
    engine, so the same rules) and finetuning's own."""
    own = []
    if cfg.parallel.pipeline_parallel_size > 1:
        own.append(
            ("parallel.pipeline_parallel_size", "glm-finetune runs without pipeline parallelism; use 1")
        )
    if cfg.parallel.zero_stage >= 3:
        own.append(("parallel.zero_stage", "glm-finetune runs with ZeRO stages 0-2; use zero_stage: 1"))
    validate_config(cfg, command_problems=own)


def finetune(
    cfg: GLMConfig,
    train: list[GLMLayout],
    evaluate: Callable[[GLMModel], dict[str, float]],
    metric: str,
    *,
    epochs: int,
    output_dir: str | Path,
    label_smoothing: float = 0.0,
) -> FinetuneResult:
    """Train on ``train`` for ``epochs`` (the process group must be up); after each epoch ``evaluate`` the
    engine's module (every rank calls it) and keep the weights of the best ``metric`` in ``<output_dir>/best``."""
    import torch.distributed as dist

    from megatron_glm.parallel import initialize_parallel, is_initialized
    from megatron_glm.training.distributed import detect_launch, device_for
    from megatron_glm.training.engine import TrainingEngine

    check_finetune_config(cfg)
    if not train:
        raise DataError("the training set is empty")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label smoothing {label_smoothing} must lie in [0, 1)")
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
    # The module's loss is the engine's GLMLoss object: smoothing set here applies to every train step.
    engine.loss.label_smoothing = label_smoothing
    longest = max(len(sequence) for sequence in train)
    rng = random.Random(cfg.training.seed)
    micro, dp_rank = cfg.training.micro_batch_size, get_data_parallel_rank()
    per_rank = micro * layout.gradient_accumulation_steps
    dev, losses, best, best_dir = [], [], -math.inf, None
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)

        def micro_batches(order: list[int] = order) -> Iterator[dict[str, torch.Tensor]]:
            for step in range(steps_per_epoch):
                chosen = order[step * per_step : (step + 1) * per_step]
                mine = chosen[dp_rank * per_rank :][:per_rank]
                for first in range(0, len(mine), micro):
                    yield layouts_batch([train[i] for i in mine[first : first + micro]], longest)

        batches = micro_batches()
        # The losses are read after the epoch's last step is queued: a read after each step would make the host
        # wait for the GPU to finish that step before it could queue the next.
        results = [engine.train_step(batches) for _ in range(steps_per_epoch)]
        losses.append(float(np.mean([result.loss for result in results])))
        metrics = evaluate(engine.module)
        dev.append(metrics)
        if metrics[metric] > best:
            best = metrics[metric]
            best_dir = str(save_thudm_checkpoint(engine.module, output_dir, tag="best"))
    scores = [metrics[metric] for metrics in dev]
    return FinetuneResult(metric, dev, losses, int(np.argmax(scores)), best_dir)
