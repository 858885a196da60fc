"""GLM as a flat sequence of layers for DeepSpeed's pipeline engine.

Layer list (``L`` transformer layers)::

    0        word embeddings            TiedLayerSpec "word_embeddings" (shared with the output head)
    1        position + block position  embeddings and embedding dropout
    2..L+1   transformer layers         THUDM ``transformer.layers.{i}``
    L+2      final LayerNorm
    L+3      output head                the tied word embeddings, logits only where the loss is taken

Between stages flows ``(hidden, position_ids, sep)``; integer tensors ride along untouched. The output head
takes the rows that carry a loss by the micro-batch's ``loss_index``, computed by the data loader on the host
(``OutputHead``): a mask would make the host wait for the GPU on every micro-batch, and activations between
stages keep fixed shapes, so the index list cannot travel with them.

Each piece initializes itself from the seed and its THUDM key, so the weights are identical to
``GLMModel``'s at any pipeline (and tensor) parallel size; in the training dtype, drawn in fp32 and rounded
once, as DeepSpeed's cast of an fp32 stage would leave them. ``megatron_glm.checkpoint.pipeline_key_to_thudm``
maps the pipeline's parameter names to THUDM's keys; keep it in step with this layer list.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model import (
    GLMLoss,
    GLMTransformerLayer,
    LayerNorm,
    PositionEmbeddings,
    init_generator,
    loss_rows,
)
from megatron_glm.parallel import VocabParallelEmbedding, normal_init, recompute, vocab_parallel_logits

PipelineActivations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class WordEmbeddingPipe(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, seed: int, dtype: torch.dtype):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=normal_init(config.init_method_std), dtype=dtype
        )
        self.word_embeddings.reset_parameters(init_generator(seed, "word_embeddings"))

    def forward(self, inputs: PipelineActivations) -> PipelineActivations:
        tokens, position_ids, sep = inputs
        return self.word_embeddings(tokens), position_ids, sep


class OutputHead:
    """The output head's forward on the last stage: vocab-parallel logits of the rows that carry a loss (the
    tied embedding is the output matrix), picked by the micro-batch's ``loss_index``.

    DeepSpeed's pipeline engine gives a stage's forward only the activations; the labels, ``loss_index`` among
    them, go to the loss function. The last stage loads its micro-batches and runs their forwards in the same
    order, so the engine's data iterator queues each loaded micro-batch's ``loss_index`` (``pending``) and
    the forward takes the oldest (one forward per micro-batch: DeepSpeed's pipeline activation checkpointing,
    which would run it again, is off). The logits stay inside the module's forward: computed in the loss
    function from the tied matrix instead, they changed the matrix's gradient under DeepSpeed's BF16
    optimizer (0.19.8).
    """

    def __init__(self) -> None:
        self.pending: deque[torch.Tensor] = deque()

    def __call__(self, module: WordEmbeddingPipe, inputs: PipelineActivations) -> torch.Tensor:
        hidden, _, _ = inputs
        loss_index = self.pending.popleft()
        return vocab_parallel_logits(loss_rows(hidden, loss_index), module.word_embeddings.weight)


class PositionEmbeddingPipe(PositionEmbeddings):
    def __init__(self, config: ModelConfig, seed: int, dtype: torch.dtype):
        super().__init__(config, seed=seed, dtype=dtype)

    def forward(self, inputs: PipelineActivations) -> PipelineActivations:
        hidden, position_ids, sep = inputs
        # The kernels take sep as int32 on the device: the stages pass it on converted, once.
        sep = sep.to(device=hidden.device, dtype=torch.int32)
        return self.embed_positions(hidden, position_ids), position_ids, sep


class TransformerLayerPipe(GLMTransformerLayer):
    def __init__(self, config: ModelConfig, layer_number: int, seed: int, dtype: torch.dtype):
        super().__init__(config, layer_number, seed=seed, dtype=dtype)
        self.recompute = config.activation_checkpointing == "full"

    def forward(self, inputs: PipelineActivations) -> PipelineActivations:
        hidden, position_ids, sep = inputs
        if self.recompute and torch.is_grad_enabled():
            hidden = recompute(super().forward, hidden, sep)
        else:
            hidden = super().forward(hidden, sep)
        return hidden, position_ids, sep


class FinalLayerNormPipe(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.final_layernorm = LayerNorm(
            config.hidden_size, config.layernorm_epsilon, kernel_backend=config.kernels, dtype=dtype
        )

    def forward(self, inputs: PipelineActivations) -> PipelineActivations:
        hidden, position_ids, sep = inputs
        return self.final_layernorm(hidden), position_ids, sep


def build_pipeline_module(
    config: ModelConfig,
    vocab_size: int,
    seed: int,
    topology,
    loss: GLMLoss,
    partition: str,
    dtype: torch.dtype = torch.float32,
):
    """The ``deepspeed.pipe.PipelineModule`` of GLM on ``topology`` (DeepSpeed's
    PipeModelDataParallelTopology), its parameters in ``dtype``, and its ``OutputHead`` (used on the last
    stage, whose micro-batches' ``loss_index`` it must be given)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    output_head = OutputHead()
    layers = [
        TiedLayerSpec(
            "word_embeddings",
            WordEmbeddingPipe,
            config,
            vocab_size,
            seed,
            dtype,
            tied_weight_attr="word_embeddings.weight",
        ),
        LayerSpec(PositionEmbeddingPipe, config, seed, dtype),
        *[LayerSpec(TransformerLayerPipe, config, i, seed, dtype) for i in range(config.num_layers)],
        LayerSpec(FinalLayerNormPipe, config, dtype),
        TiedLayerSpec(
            "word_embeddings",
            WordEmbeddingPipe,
            config,
            vocab_size,
            seed,
            dtype,
            forward_fn=output_head,
            tied_weight_attr="word_embeddings.weight",
        ),
    ]
    method = "type:TransformerLayerPipe" if partition == "uniform" else "parameters"
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss, partition_method=method)
    return module, output_head
