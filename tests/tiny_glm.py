"""The tiny GLM and the hand-built batch that the model tests share (2 layers, hidden 64, vocabulary 256)."""

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model import glm_loss

VOCAB = 256
TINY = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    vocab_size=VOCAB,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def make_batch(seps=(14, 17), length=24, seed=0) -> dict:
    """A GLM batch: Part A of ``sep`` tokens, then two spans in Part B (``[sop]`` + span each)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(seps)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=g)
    targets = torch.randint(0, VOCAB, (batch, length), generator=g)
    position = torch.zeros(batch, length, dtype=torch.long)
    block = torch.zeros(batch, length, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    for b, sep in enumerate(seps):
        position[b, :sep] = torch.arange(sep)
        first = (length - sep) // 2
        # Each span sits at the position of its mask token in Part A; block positions count 1, 2, ...
        position[b, sep : sep + first], position[b, sep + first :] = 3, 8
        block[b, sep : sep + first] = torch.arange(1, first + 1)
        block[b, sep + first :] = torch.arange(1, length - sep - first + 1)
        loss_mask[b, sep:] = 1.0
    return {
        "tokens": tokens,
        "position_ids": torch.stack([position, block], dim=1),
        "sep": torch.tensor(seps),
        "targets": targets,
        "loss_mask": loss_mask,
    }


def forward_and_loss(model, batch):
    hidden = model(batch["tokens"], batch["position_ids"], batch["sep"])
    return hidden, glm_loss(model, hidden, batch["targets"], batch["loss_mask"])


# The tiny model as glm-pretrain's settings, for the tests that build a TrainingEngine.
TINY_SETTINGS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.max_position_embeddings=64",
    f"model.vocab_size={VOCAB}",
]


def engine_batches(data_rank: int = 0, pin: bool = False):
    """Micro-batches for ``TrainingEngine.train_step``: ``make_batch``'s, as the collate completes them (the
    objective, the loss rows), a different stream per data-parallel rank; pinned as the loader pins them on
    GPUs with ``pin``."""
    from megatron_glm.data.loader import loss_row_index

    for seed in range(1000):
        batch = make_batch(seps=(14, 17), seed=100 * data_rank + seed)
        batch["objective"] = torch.zeros(2, dtype=torch.int64)
        batch["loss_index"] = loss_row_index(batch["loss_mask"])
        yield {key: value.pin_memory() for key, value in batch.items()} if pin else batch
