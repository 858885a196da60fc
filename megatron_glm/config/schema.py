"""The config tree: one dataclass per section, each checking its own values with ``problems()``.

Rules that span sections (heads vs tensor-parallel size, sequence length vs position tables, the world
size) live in ``megatron_glm.config.validation``; reading YAML lives in ``megatron_glm.config.loading``.
Every ``problems()`` returns ``(key, message)`` pairs, so a config reports every broken rule at once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from data_tools.objectives import ObjectiveConfig

Problems = list[tuple[str, str]]


def _positive(section: object, prefix: str, *names: str) -> Problems:
    return [
        (f"{prefix}.{name}", f"must be positive, got {getattr(section, name)}")
        for name in names
        if getattr(section, name) <= 0
    ]


def _fraction(value: float, key: str, closed: bool = True) -> Problems:
    inside = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    return [] if inside else [(key, f"must lie in [0, 1{']' if closed else ')'}, got {value}")]


@dataclasses.dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    tokenizer: str = "bert-base-uncased"
    """"bert-base-uncased", "gpt2" or the path of a tokenizer.json; it fixes the vocabulary."""
    vocab_size: int | None = None
    """Rows of the embedding table. None derives it: the tokenizer's size rounded up to a multiple of
    make_vocab_size_divisible_by x tensor_parallel_size (30592 for BERT, 50304 for GPT-2 at tp=1)."""
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    block_position_encoding: bool = True
    """GLM's 2D positions: a second table for the position inside a Part-B span (false: one table)."""
    attention_scale: float = 1.0
    """THUDM/GLM's --attention-scale (1.0 = plain 1/sqrt(d_head) scaling)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Activation recomputation: "full" recomputes each layer in backward, "selective" only the attention
    core."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """"auto": Triton kernels on CUDA when available, torch elsewhere; "triton" or "torch" to force."""
    deterministic_kernels: bool = True
    """Bitwise reproducible Triton kernels, so that a resumed run is bitwise the uninterrupted one. false lets the
    attention's backward add dQ with atomics, as FlashAttention-2 does (less work per step; gradients then
    differ in their last bits from run to run, and so does a resumed run from the uninterrupted one)."""

    def problems(self) -> Problems:
        found = _positive(
            self,
            "model",
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
        )
        if found:
            return found
        if self.hidden_size % self.num_attention_heads:
            found.append(
                (
                    "model.hidden_size",
                    f"{self.hidden_size} is not divisible by model.num_attention_heads = "
                    f"{self.num_attention_heads}",
                )
            )
        elif self.kernels == "triton" and self.hidden_size // self.num_attention_heads > 128:
            found.append(
                (
                    "model.kernels",
                    f"the Triton attention kernel supports head dimensions up to 128, this model has "
                    f"{self.hidden_size // self.num_attention_heads}; use kernels: torch or more heads",
                )
            )
        found += _fraction(self.hidden_dropout, "model.hidden_dropout", closed=False)
        found += _fraction(self.attention_dropout, "model.attention_dropout", closed=False)
        if self.attention_scale <= 0:
            found.append(("model.attention_scale", f"must be positive, got {self.attention_scale}"))
        return found


@dataclasses.dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    """Data parallelism is what remains of the world: world_size / (tensor x pipeline)."""
    zero_stage: int = 1
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    """How the pipeline engine splits layers over stages: "uniform" or "parameters"."""
    overlap_comm: bool | None = None
    """ZeRO 1-3: reduce gradient buckets on a side stream while the backward goes on. Unset: on with CUDA
    GPUs and more than one data-parallel rank; off on CPUs (no stream to overlap with) and over one
    data-parallel rank (nothing to overlap: DeepSpeed's overlapped path only adds device syncs)."""

    def problems(self) -> Problems:
        found = _positive(self, "parallel", "tensor_parallel_size", "pipeline_parallel_size")
        if self.zero_stage not in (0, 1, 2, 3):
            found.append(("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"))
        elif self.pipeline_parallel_size > 1 and self.zero_stage > 1:
            found.append(
                (
                    "parallel.zero_stage",
                    f"ZeRO stage {self.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed's "
                    "pipeline engine supports stages 0 and 1); use zero_stage: 1",
                )
            )
        return found


@dataclasses.dataclass
class CorpusConfig:
    path: str = ""
    """Prefix of a <prefix>.bin / <prefix>.idx pair written by glm-preprocess."""
    weight: float = 1.0
    """Blend weight: the corpora's shares of the samples are proportional to their weights."""


@dataclasses.dataclass
class DataConfig:
    corpora: list[CorpusConfig] = dataclasses.field(default_factory=list)
    seq_length: int = 512
    """Length T of every laid-out sequence (Part A + Part B) fed to the model."""
    objectives: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    num_variants: int = 4
    """Mask variants precomputed per sample; epoch e uses variant e mod num_variants."""
    split: list[float] = dataclasses.field(default_factory=lambda: [949.0, 50.0, 1.0])
    """Train, valid, test proportions of the documents."""
    seed: int = 1234
    """Seeds the data: the document split, the span masks and the sample order (not the model)."""
    cache_dir: str = "outputs/samples"
    """Where sample directories are built (named by a hash of their inputs, reused when present)."""
    shared_cache: bool = True
    """cache_dir is one file system seen by all nodes (global rank 0 builds); false: node-local storage
    (local rank 0 of every node builds its copy)."""
    online_masking: bool = False
    """Draw the spans on the fly with the same sampler instead of reading precomputed ones (ablations)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0: load in the training process)."""

    def problems(self) -> Problems:
        found = _positive(self, "data", "seq_length", "num_variants")
        found += [(f"data.objectives.{field}", message) for field, message in self.objectives.problems()]
        if len(self.split) != 3 or any(x < 0 for x in self.split) or sum(self.split) <= 0:
            found.append(
                (
                    "data.split",
                    f"expected three non-negative proportions (train, valid, test), got {self.split}",
                )
            )
        if any(c.weight < 0 for c in self.corpora):
            found.append(("data.corpora", "blend weights must be non-negative"))
        for i, corpus in enumerate(self.corpora):
            if not corpus.path:
                found.append((f"data.corpora[{i}].path", "is empty; give the prefix of a .bin/.idx pair"))
        if self.num_workers < 0:
            found.append(("data.num_workers", f"must be >= 0, got {self.num_workers}"))
        return found


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 4e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6

    def problems(self) -> Problems:
        return _positive(self, "optimizer", "lr")


@dataclasses.dataclass
class LRScheduleConfig:
    style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None
    """Steps over which the LR decays; None means training.train_steps."""
    warmup_fraction: float = 0.01
    """Linear warmup length as a fraction of decay_steps (THUDM/GLM's --warmup)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (THUDM/GLM's --lr-decay-ratio)."""

    def problems(self) -> Problems:
        found = _fraction(self.warmup_fraction, "lr_schedule.warmup_fraction")
        found += _fraction(self.min_lr_ratio, "lr_schedule.min_lr_ratio")
        if self.decay_steps is not None and self.decay_steps <= 0:
            found.append(("lr_schedule.decay_steps", f"must be positive, got {self.decay_steps}"))
        return found


@dataclasses.dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    """Samples per rank in one forward/backward."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks: micro x dp x accumulation steps."""
    train_steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: float = 1.0
    seed: int = 1234
    """Seeds the model: weight initialization and dropout (the data has data.seed)."""
    eval_interval: int = 0
    """Steps between evaluations on the valid split (0: never evaluate)."""
    eval_steps: int = 10
    """Global batches per evaluation."""
    nonfinite_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss outside fp16 loss scaling: stop (naming the last good checkpoint) or skip the
    update."""
    cuda_graphs: Literal[False, True, "auto"] = False
    """Replay each transformer layer's forward and backward from CUDA graphs, captured at the first training
    step (two launches per layer instead of a few dozen: for a step bound by the host's launches). true: on,
    refused where they cannot run (they need CUDA, no activation checkpointing, no pipeline parallelism, ZeRO
    0-2); auto: on where they can run, off elsewhere (CPUs included); false: off. On one H200 glm-large trained
    at twice the eager run's tokens/s (docs/benchmarks.md). Off by default until a resume under it is checked
    on a GPU."""

    def problems(self) -> Problems:
        found = _positive(self, "training", "micro_batch_size", "global_batch_size", "train_steps")
        if self.eval_interval < 0 or (self.eval_interval and self.eval_steps < 1):
            found.append(
                (
                    "training.eval_steps" if self.eval_interval > 0 else "training.eval_interval",
                    "evaluation needs eval_interval >= 0 (0: never) and eval_steps >= 1",
                )
            )
        return found


@dataclasses.dataclass
class CheckpointConfig:
    save_dir: str = "outputs/checkpoints"
    interval: int = 0
    """Steps between checkpoints (0: only at the end; a preemption signal also saves)."""
    keep_last: int = 3
    """Checkpoints kept in save_dir; older ones are deleted once a newer one is complete."""
    resume: bool = True
    """Resume from save_dir's latest checkpoint when one exists."""
    init_from: str | None = None
    """THUDM-format weights (a directory with mp_rank_XX_model_states.pt) to start from; the optimizer
    starts fresh."""

    def problems(self) -> Problems:
        found = []
        if self.interval < 0:
            found.append(("checkpoint.interval", f"must be >= 0 (0: only at the end), got {self.interval}"))
        if self.keep_last < 1:
            found.append(("checkpoint.keep_last", f"must be at least 1, got {self.keep_last}"))
        return found


@dataclasses.dataclass
class LoggingConfig:
    log_dir: str = "outputs/logs"
    log_interval: int = 10
    tensorboard: bool = True
    all_ranks: bool = False
    """Every rank logs to its own file (log_dir/rank-<r>.log); rank 0 alone otherwise."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    profile_steps: list[int] = dataclasses.field(default_factory=list)
    """[first, last]: profile these optimizer steps (torch.profiler) and write the ops that took the most
    GPU (else CPU) time to log_dir/profile-rank<r>.txt, then as many steps after them under cProfile and add
    the Python functions the host spent the most time in. Empty: no profiling."""

    def problems(self) -> Problems:
        found = _positive(self, "logging", "log_interval")
        steps = self.profile_steps
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            found.append(
                ("logging.profile_steps", f"must be [first, last] with 1 <= first <= last, got {steps}")
            )
        return found


@dataclasses.dataclass
class GLMConfig:
    name: str = "glm"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = dataclasses.field(default_factory=LRScheduleConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def sections(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"]


def count_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the GLM architecture (embeddings tied to the output; two position tables)."""
    h, layers = model.hidden_size, model.num_layers
    per_layer = (
        2 * 2 * h  # two LayerNorms
        + 3 * h * h
        + 3 * h  # fused QKV
        + h * h
        + h  # attention output
        + 4 * h * h
        + 4 * h  # h -> 4h
        + 4 * h * h
        + h  # 4h -> h
    )
    # With block positions both tables have max_position_embeddings + 1 rows; without, one table of
    # max_position_embeddings rows (as in THUDM/GLM).
    if model.block_position_encoding:
        tables = 2 * (model.max_position_embeddings + 1) * h
    else:
        tables = model.max_position_embeddings * h
    return vocab_size * h + tables + layers * per_layer + 2 * h


def model_flops_per_token(
    model: ModelConfig, vocab_size: int, seq_length: int, logit_fraction: float = 1.0
) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

    ``72 L h^2 + 12 L h T + 6 V h f``: the layers' weight matmuls, the attention scores and weighted
    sum over all T keys (no discount for the mask), and the output head on the fraction ``f`` of
    positions whose logits are computed (GLM only needs them where the loss is taken).
    """
    h, layers = model.hidden_size, model.num_layers
    return 72.0 * layers * h * h + 12.0 * layers * h * seq_length + 6.0 * vocab_size * h * logit_fraction


def describe_parameters(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M"
