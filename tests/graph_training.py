"""A few training steps of a tiny GLM, with or without per-layer CUDA graphs, for the graph tests: on CUDA
(``test_cuda_graphs_cuda.py``) and on CPUs with graph stand-ins (``test_cuda_graphs.py``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, glm_loss, loss_row_index
from megatron_glm.model.cuda_graphs import enable_layer_graphs

VOCAB, LENGTH, ROWS = 256, 64, 2
STEPS, ACCUMULATION = 5, 2


@dataclass
class Run:
    losses: torch.Tensor  # every micro-batch's loss, in order
    params: list[torch.Tensor]
    evaluated: torch.Tensor  # an evaluation after the last step (eager, around the graphs)
    captured: int  # shapes captured, over all layers
    state: dict  # model, optimizer and random generators: what a checkpoint holds
    # Per graphed layer: whether its inputs are the previous layer's static outputs; per pair of neighbours,
    # whether the first one's output gradients are the second one's static input gradients (chained graphs).
    chained_inputs: list[bool]
    chained_output_grads: list[bool]


def batches(device: torch.device, count: int = STEPS * ACCUMULATION, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        sep = int(torch.randint(8, LENGTH - 8, (1,), generator=g))
        positions = torch.arange(LENGTH).clamp(max=sep - 1).expand(ROWS, LENGTH)
        blocks = (torch.arange(LENGTH) - sep + 1).clamp(min=0).expand(ROWS, LENGTH)
        mask = (torch.arange(LENGTH) >= sep).float().expand(ROWS, LENGTH).contiguous()
        batch = {
            "tokens": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g),
            "targets": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g),
            "position_ids": torch.stack([positions, blocks], 1).contiguous(),
            "sep": torch.full((ROWS,), sep),
            "loss_mask": mask,
            "loss_index": loss_row_index(mask),
        }
        made.append({k: v.to(device) for k, v in batch.items()})
    return made


def rng_states(device: torch.device) -> tuple:
    default = torch.cuda.get_rng_state() if device.type == "cuda" else torch.get_rng_state()
    return default, parallel.get_rng_tracker().get_states()


def set_rng_states(device: torch.device, states: tuple) -> None:
    (torch.cuda.set_rng_state if device.type == "cuda" else torch.set_rng_state)(states[0])
    parallel.get_rng_tracker().set_states(states[1])


def train(
    device: torch.device,
    graphs: bool,
    dropout: float,
    kernels: str = "torch",
    steps: range = range(STEPS),
    resume_from: dict | None = None,
    defer: bool = True,
) -> Run:
    """Train ``steps`` of the batch sequence (``ACCUMULATION`` micro-batches each) with AdamW; ``resume_from`` a
    ``Run.state``, loaded into a new model as a resumed run loads its checkpoint; ``defer``: each layer's last
    add in the next LayerNorm (the default), else the layers one by one."""
    parallel.seed_parallel_rng(1234)
    config = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=LENGTH, vocab_size=VOCAB,
        hidden_dropout=dropout, attention_dropout=dropout, kernels=kernels,
    )  # fmt: skip
    model = GLMModel(config, VOCAB, device=device).train()
    if graphs:
        enable_layer_graphs(model.transformer)
    model.transformer.defer_residual_adds = defer
    # Hold every parameter's AccumulateGrad node, made here on the default stream, as DeepSpeed's gradient hooks
    # do: a captured backward must not sync with the stream such a node was made on.
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        set_rng_states(device, resume_from["rng"])
    losses = []
    data = batches(device)
    for step in steps:
        for micro in range(ACCUMULATION):
            batch = data[step * ACCUMULATION + micro]
            hidden = model(batch["tokens"], batch["position_ids"], batch["sep"])
            loss = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["loss_index"])
            (loss / ACCUMULATION).backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": rng_states(device),
    }
    with torch.no_grad():
        model.eval()
        batch = data[0]
        evaluated = glm_loss(model, model(batch["tokens"], batch["position_ids"], batch["sep"]),
                             batch["targets"], batch["loss_mask"], batch["loss_index"])  # fmt: skip
    layer_graphs = model.transformer.layer_graphs or []
    captured = sum(len(g._captures) for g in layer_graphs)
    captures = [next(iter(g._captures.values())) for g in layer_graphs if g._captures]
    chained_output_grads = [
        all(
            any(grad.data_ptr() == static.data_ptr() for static in after.grads if static is not None)
            for grad in before.output_grads
        )
        for before, after in zip(captures, captures[1:])
    ]
    del accumulators
    return Run(
        torch.stack(losses),
        [p.detach().clone() for p in model.parameters()],
        evaluated,
        captured,
        state,
        [c.chained for c in captures],
        chained_output_grads,
    )
