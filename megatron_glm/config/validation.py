"""Validation of a whole config: each section's own rules plus the rules that span sections, and the
parallel layout derived from the world size.

``validate_config`` reports every broken rule at once, each with the key to change; it runs before any
process of a job starts (``glm-config validate --world-size N``) and once at the start of ``glm-pretrain`` and
``glm-finetune`` (which adds its own rules), so every user of the training engine meets the same errors.
"""

from __future__ import annotations

import dataclasses

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.config.schema import GLMConfig, ModelConfig, Problems
from megatron_glm.errors import ConfigError


def padded_vocab_size(model: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """The embedding-table size: explicit ``model.vocab_size`` or derived from the tokenizer."""
    if model.vocab_size is not None:
        return model.vocab_size
    return load_tokenizer(model.tokenizer).padded_vocab_size(
        model.make_vocab_size_divisible_by * tensor_parallel_size
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a job of ``world_size`` ranks is split."""

    world_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int


def _vocabulary_problems(cfg: GLMConfig) -> Problems:
    model, tp = cfg.model, cfg.parallel.tensor_parallel_size
    try:
        tokens = load_tokenizer(model.tokenizer).num_tokens
    except DataError as exc:
        return [("model.tokenizer", str(exc))]
    found = []
    if model.vocab_size is not None and model.vocab_size < tokens:
        found.append(
            (
                "model.vocab_size",
                f"{model.vocab_size} rows cannot hold the {tokens} tokens of tokenizer {model.tokenizer!r}; "
                "leave it unset to derive it from the tokenizer",
            )
        )
    multiple = model.make_vocab_size_divisible_by * tp
    if model.vocab_size is not None and multiple > 0 and model.vocab_size % multiple:
        suggestion = -(-model.vocab_size // multiple) * multiple
        found.append(
            (
                "model.vocab_size",
                f"{model.vocab_size} is not a multiple of make_vocab_size_divisible_by x tensor_parallel_size "
                f"= {multiple}; use {suggestion} or leave it unset to derive it from the tokenizer",
            )
        )
    return found


def _world_problems(cfg: GLMConfig, world_size: int) -> Problems:
    parallel, training = cfg.parallel, cfg.training
    model_parallel = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world_size % model_parallel:
        return [
            (
                "parallel.tensor_parallel_size",
                f"world size {world_size} is not divisible by tensor_parallel_size x "
                f"pipeline_parallel_size = {model_parallel}",
            )
        ]
    per_step = training.micro_batch_size * (world_size // model_parallel)
    if training.global_batch_size % per_step:
        lower = max(per_step, training.global_batch_size // per_step * per_step)
        return [
            (
                "training.global_batch_size",
                f"{training.global_batch_size} is not micro_batch_size x data-parallel size x "
                f"accumulation steps (micro {training.micro_batch_size} x dp {per_step // training.micro_batch_size}"
                f" = {per_step} per accumulation step); use a multiple of {per_step} such as {lower}",
            )
        ]
    return []


def config_problems(cfg: GLMConfig, world_size: int | None = None) -> Problems:
    """Every broken rule of ``cfg`` as (key, message): each section's, then those that span sections."""
    found = [problem for section in cfg.sections() for problem in section.problems()]
    model, parallel = cfg.model, cfg.parallel
    sizes = (model.num_layers, model.num_attention_heads, model.make_vocab_size_divisible_by)
    sizes += (parallel.tensor_parallel_size, parallel.pipeline_parallel_size, cfg.training.micro_batch_size)
    if min(sizes) <= 0:  # already reported by the sections; the rules below divide by these
        return found
    if model.num_attention_heads % parallel.tensor_parallel_size:
        found.append(
            (
                "model.num_attention_heads",
                f"{model.num_attention_heads} heads cannot be split over parallel.tensor_parallel_size = "
                f"{parallel.tensor_parallel_size}; use a tensor-parallel size that divides the head count",
            )
        )
    if model.num_layers % parallel.pipeline_parallel_size:
        found.append(
            (
                "model.num_layers",
                f"{model.num_layers} layers cannot be split evenly over parallel.pipeline_parallel_size = "
                f"{parallel.pipeline_parallel_size}; use a pipeline size that divides the layer count",
            )
        )
    if cfg.training.cuda_graphs is True:
        for why in cuda_graph_blockers(cfg):
            found.append(("training.cuda_graphs", f"per-layer CUDA graphs need {why}"))
    if parallel.zero_stage == 0 and cfg.training.precision != "fp32":
        why = {
            "bf16": "DeepSpeed has no fp32 gradient accumulation for bf16 weights without ZeRO (it stops with "
            "'unsupported mix of model_dtype=bf16 and grad_accum_dtype=fp32')",
            "fp16": "DeepSpeed runs its unfused per-parameter optimizer (a host sync per parameter every step) "
            "and accumulates gradients in fp16",
        }[cfg.training.precision]
        found.append(
            (
                "parallel.zero_stage",
                f"ZeRO stage 0 with training.precision {cfg.training.precision}: {why}; use zero_stage: 1 "
                "(fp32 master weights and gradient accumulation, the same memory per replica), or precision: fp32",
            )
        )
    if cfg.data.seq_length > model.max_position_embeddings:
        found.append(
            (
                "data.seq_length",
                f"{cfg.data.seq_length} exceeds model.max_position_embeddings = "
                f"{model.max_position_embeddings}: positions would fall outside the position tables",
            )
        )
    found += _vocabulary_problems(cfg)
    if world_size is not None:
        found += _world_problems(cfg, world_size)
    return found


def validate_config(
    cfg: GLMConfig, world_size: int | None = None, command_problems: Problems | None = None
) -> None:
    """Raise ``ConfigError`` listing every broken rule, each with the key to change: ``config_problems``
    and the ones a command adds for itself (``command_problems``)."""
    found = config_problems(cfg, world_size) + (command_problems or [])
    if found:
        lines = "\n".join(f"  {key}: {message}" for key, message in found)
        raise ConfigError(f"invalid configuration {cfg.name!r}:\n{lines}")


def parallel_layout(cfg: GLMConfig, world_size: int) -> Layout:
    """The layout of ``world_size`` ranks. Checks only the world-size rules: the rest is
    ``validate_config``'s, which commands run once before they start."""
    found = _world_problems(cfg, world_size)
    if found:
        raise ConfigError(
            f"invalid configuration {cfg.name!r} for {world_size} ranks:\n"
            + "\n".join(f"  {key}: {message}" for key, message in found)
        )
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    dp = world_size // (tp * pp)
    accumulation = cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)
    return Layout(world_size, tp, pp, dp, accumulation)


def cuda_graph_blockers(cfg: GLMConfig) -> list[str]:
    """What per-layer CUDA graphs need that ``cfg`` does not give them (empty where they can run). A layer's
    graphs hold one micro-batch's buffers and run the layer's own kernels, nothing around them."""
    model, parallel = cfg.model, cfg.parallel
    return [
        why
        for broken, why in (
            (
                model.activation_checkpointing != "none",
                "model.activation_checkpointing none (recomputation runs outside the graph)",
            ),
            (
                parallel.pipeline_parallel_size > 1,
                "parallel.pipeline_parallel_size 1 (a pipeline keeps several micro-batches in flight)",
            ),
            (
                parallel.zero_stage > 2,
                "parallel.zero_stage 0-2 (ZeRO-3 gathers each layer's parameters around it)",
            ),
        )
        if broken
    ]


def uses_cuda_graphs(cfg: GLMConfig, device_type: str) -> bool:
    """Whether training runs its layers through per-layer CUDA graphs on a device of ``device_type``:
    ``training.cuda_graphs`` true (validated, and refused off CUDA at start), or ``auto`` where they can run."""
    setting = cfg.training.cuda_graphs
    if setting == "auto":
        return device_type == "cuda" and not cuda_graph_blockers(cfg)
    return setting is True
