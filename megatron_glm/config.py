"""Typed configuration: one merged, validated tree read from YAML with ``--set key=value`` overrides.

A config file holds the sections below; every key is optional and unknown keys are errors (with the
file:line and the closest valid key). ``validate_config`` checks the rules that would otherwise fail
deep inside a distributed job, before any process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from data_tools.errors import DataError
from data_tools.objectives import ObjectiveConfig
from data_tools.tokenizer import load_tokenizer


class ConfigError(Exception):
    """An invalid configuration. The message names the key (and file:line when it came from a file)."""


@dataclasses.dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    # "bert-base-uncased", "gpt2" or the path of a tokenizer.json; it fixes the vocabulary.
    tokenizer: str = "bert-base-uncased"
    # Rows of the embedding table. None derives it: the tokenizer's size rounded up to a multiple of
    # make_vocab_size_divisible_by x tensor_parallel_size (30592 for BERT, 50304 for GPT-2 at tp=1).
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    block_position_encoding: bool = True
    # THUDM/GLM's --attention-scale (1.0 = plain 1/sqrt(d_head) scaling).
    attention_scale: float = 1.0
    # "none", "full" (recompute each layer) or "selective" (recompute only the attention core).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # "auto": Triton kernels on CUDA when available, torch elsewhere; "triton" or "torch" to force.
    kernels: Literal["auto", "triton", "torch"] = "auto"


@dataclasses.dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Data parallelism is what remains of the world: world_size / (tp * pp).
    zero_stage: int = 1
    # How the pipeline engine splits layers over stages: "uniform" or "parameters".
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    # ZeRO 1-3: reduce gradient buckets on a side stream while the backward goes on. Unset: on with
    # CUDA GPUs, off on CPUs (where there is no stream to overlap with).
    overlap_comm: bool | None = None


@dataclasses.dataclass
class CorpusConfig:
    # Prefix of a <prefix>.bin / <prefix>.idx pair written by glm-preprocess.
    path: str = ""
    weight: float = 1.0


@dataclasses.dataclass
class DataConfig:
    corpora: list[CorpusConfig] = dataclasses.field(default_factory=list)
    # Length T of every laid-out sequence (Part A + Part B) fed to the model.
    seq_length: int = 512
    objectives: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    # Mask variants precomputed per sample; epoch e uses variant e mod num_variants.
    num_variants: int = 4
    # train, valid, test proportions of the documents.
    split: list[float] = dataclasses.field(default_factory=lambda: [949.0, 50.0, 1.0])
    seed: int = 1234
    # Where sample directories are built (named by a hash of their inputs, reused when present).
    cache_dir: str = "outputs/samples"
    # cache_dir is one file system seen by all nodes (global rank 0 builds); false: node-local storage
    # (local rank 0 of every node builds its copy).
    shared_cache: bool = True
    # Draw the spans on the fly with the same sampler instead of reading precomputed ones (ablations).
    online_masking: bool = False
    num_workers: int = 1


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 4e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6


@dataclasses.dataclass
class LRScheduleConfig:
    style: Literal["cosine", "linear", "constant"] = "cosine"
    # Steps over which the LR decays; None means training.train_steps.
    decay_steps: int | None = None
    # Linear warmup length as a fraction of decay_steps (THUDM/GLM's --warmup).
    warmup_fraction: float = 0.01
    # Final LR as a fraction of the peak (THUDM/GLM's --lr-decay-ratio).
    min_lr_ratio: float = 0.1


@dataclasses.dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    # Samples per optimizer step over all data-parallel ranks: micro x dp x accumulation steps.
    global_batch_size: int = 8
    train_steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: float = 1.0
    seed: int = 1234
    eval_interval: int = 0
    eval_steps: int = 10
    # What to do on a non-finite loss outside fp16 loss scaling: stop (naming the last good checkpoint) or skip.
    nonfinite_policy: Literal["stop", "skip"] = "stop"


@dataclasses.dataclass
class CheckpointConfig:
    save_dir: str = "outputs/checkpoints"
    # Steps between checkpoints (0: only at the end).
    interval: int = 0
    keep_last: int = 3
    # Resume from save_dir's latest checkpoint when one exists.
    resume: bool = True
    # THUDM-format weights (a directory with mp_rank_XX_model_states.pt) to start from; optimizer is fresh.
    init_from: str | None = None


@dataclasses.dataclass
class LoggingConfig:
    log_dir: str = "outputs/logs"
    log_interval: int = 10
    tensorboard: bool = True
    # Every rank logs to its own file (log_dir/rank-<r>.log); rank 0 alone otherwise.
    all_ranks: bool = False
    level: Literal["debug", "info", "warning", "error"] = "info"
    # [first, last]: profile these optimizer steps (torch.profiler) and write the ops that took the most
    # GPU (else CPU) time to log_dir/profile-rank<r>.txt. Empty: no profiling.
    profile_steps: list[int] = dataclasses.field(default_factory=list)


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


# ---------------------------------------------------------------------------------------------------
# Reading: YAML with line numbers, typed conversion, --set overrides


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every key path ("model.num_layers" -> 12)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    lines: dict[str, int] = {}

    def walk(n: yaml.Node | None, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    walk(node, "")
    return yaml.safe_load(text), lines


def _where(source: str | None, lines: dict[str, int], key: str) -> str:
    if source is None:
        return key
    line = lines.get(key)
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _convert(value: Any, annotation: Any, key: str, where) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where(key)}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where(key)}: expected a list, got {value!r}")
        return [_convert(item, args[0], f"{key}[{i}]", where) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where(key)}: expected a mapping of {annotation.__name__} keys, got {value!r}"
            )
        return _build(annotation, value, key, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where(key)}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(key)}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, values: dict, prefix: str, where) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where(path)}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], path, where)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.micro_batch_size=4"`` -> ("training.micro_batch_size", 4); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set training.micro_batch_size=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def add_override_argument(
    parser: argparse.ArgumentParser, example: str = "training.train_steps=1000"
) -> None:
    """The ``--set KEY=VALUE`` option (repeatable, into ``args.overrides``) that ``load_config`` applies."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def config_from_dict(tree: dict, source: str | None = None, lines: dict[str, int] | None = None) -> GLMConfig:
    lines = lines or {}
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source or 'config'}: the top level must be a mapping of sections")
    return _build(GLMConfig, tree, "", lambda key: _where(source, lines, key))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> GLMConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides in order."""
    tree: dict = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        tree, lines = _yaml_with_lines(text, source)
        tree = tree or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
        lines.pop(key, None)

    def where(key: str) -> str:
        if key in lines:
            return _where(source, lines, key)
        return (
            f"--set {key}"
            if any(o.split("=", 1)[0].strip() == key for o in overrides)
            else _where(source, lines, key)
        )

    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return _build(GLMConfig, tree, "", where)


def config_to_dict(cfg: GLMConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: GLMConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------------
# Derived values and validation


def padded_vocab_size(model: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """The embedding-table size: explicit ``model.vocab_size`` or derived from the tokenizer."""
    if model.vocab_size is not None:
        return model.vocab_size
    return load_tokenizer(model.tokenizer).padded_vocab_size(
        model.make_vocab_size_divisible_by * tensor_parallel_size
    )


def count_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the GLM architecture (embeddings tied to the output; two position tables)."""
    h, L = model.hidden_size, model.num_layers
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
    return vocab_size * h + tables + L * per_layer + 2 * h


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a job of ``world_size`` ranks is split."""

    world_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int


def _problems(cfg: GLMConfig, world_size: int | None) -> list[tuple[str, str]]:
    m, p, t, d = cfg.model, cfg.parallel, cfg.training, cfg.data
    found: list[tuple[str, str]] = []

    def positive(key: str, value: float) -> None:
        if value <= 0:
            found.append((key, f"must be positive, got {value}"))

    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "max_position_embeddings",
        "make_vocab_size_divisible_by",
    ):
        positive(f"model.{key}", getattr(m, key))
    positive("parallel.tensor_parallel_size", p.tensor_parallel_size)
    positive("parallel.pipeline_parallel_size", p.pipeline_parallel_size)
    for key in ("micro_batch_size", "global_batch_size", "train_steps"):
        positive(f"training.{key}", getattr(t, key))
    positive("data.seq_length", d.seq_length)
    positive("data.num_variants", d.num_variants)
    if found:
        return found

    if m.hidden_size % m.num_attention_heads:
        found.append(
            (
                "model.hidden_size",
                f"{m.hidden_size} is not divisible by model.num_attention_heads = {m.num_attention_heads}",
            )
        )
    if m.num_attention_heads % p.tensor_parallel_size:
        found.append(
            (
                "model.num_attention_heads",
                f"{m.num_attention_heads} heads cannot be split over parallel.tensor_parallel_size = "
                f"{p.tensor_parallel_size}; use a tensor-parallel size that divides the head count",
            )
        )
    if m.num_layers % p.pipeline_parallel_size:
        found.append(
            (
                "model.num_layers",
                f"{m.num_layers} layers cannot be split evenly over parallel.pipeline_parallel_size = "
                f"{p.pipeline_parallel_size}; use a pipeline size that divides the layer count",
            )
        )
    try:
        tokens = load_tokenizer(m.tokenizer).num_tokens
    except DataError as exc:
        found.append(("model.tokenizer", str(exc)))
        tokens = 0
    if m.vocab_size is not None and m.vocab_size < tokens:
        found.append(
            (
                "model.vocab_size",
                f"{m.vocab_size} rows cannot hold the {tokens} tokens of tokenizer {m.tokenizer!r}; "
                "leave it unset to derive it from the tokenizer",
            )
        )
    multiple = m.make_vocab_size_divisible_by * p.tensor_parallel_size
    if m.vocab_size is not None and m.vocab_size % multiple:
        suggestion = -(-m.vocab_size // multiple) * multiple
        found.append(
            (
                "model.vocab_size",
                f"{m.vocab_size} is not a multiple of make_vocab_size_divisible_by x tensor_parallel_size "
                f"= {multiple}; use {suggestion} or leave it unset to derive it from the tokenizer",
            )
        )
    if d.seq_length > m.max_position_embeddings:
        found.append(
            (
                "data.seq_length",
                f"{d.seq_length} exceeds model.max_position_embeddings = {m.max_position_embeddings}: "
                "positions would fall outside the position tables",
            )
        )
    steps = cfg.logging.profile_steps
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        found.append(("logging.profile_steps", f"must be [first, last] with 1 <= first <= last, got {steps}"))
    if p.zero_stage not in (0, 1, 2, 3):
        found.append(("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}"))
    elif p.zero_stage == 0 and t.precision != "fp32":
        found.append(
            (
                "parallel.zero_stage",
                f"ZeRO stage 0 with training.precision {t.precision} runs DeepSpeed's unfused "
                "per-parameter optimizer (a host sync per parameter every step) and accumulates gradients "
                f"in {t.precision}; use zero_stage: 1 (fp32 master weights and gradient accumulation, "
                "the same memory per replica), or precision: fp32",
            )
        )
    elif p.pipeline_parallel_size > 1 and p.zero_stage > 1:
        found.append(
            (
                "parallel.zero_stage",
                f"ZeRO stage {p.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed's "
                "pipeline engine supports stages 0 and 1); use zero_stage: 1",
            )
        )
    if not 0.0 <= m.hidden_dropout < 1.0:
        found.append(("model.hidden_dropout", f"must lie in [0, 1), got {m.hidden_dropout}"))
    if not 0.0 <= m.attention_dropout < 1.0:
        found.append(("model.attention_dropout", f"must lie in [0, 1), got {m.attention_dropout}"))
    for field, message in d.objectives.problems():
        found.append((f"data.objectives.{field}", message))
    if len(d.split) != 3 or any(x < 0 for x in d.split) or sum(d.split) <= 0:
        found.append(
            ("data.split", f"expected three non-negative proportions (train, valid, test), got {d.split}")
        )
    if sum(c.weight for c in d.corpora) < 0 or any(c.weight < 0 for c in d.corpora):
        found.append(("data.corpora", "blend weights must be non-negative"))
    for i, corpus in enumerate(d.corpora):
        if not corpus.path:
            found.append((f"data.corpora[{i}].path", "is empty; give the prefix of a .bin/.idx pair"))
    sched = cfg.lr_schedule
    if not 0.0 <= sched.warmup_fraction <= 1.0:
        found.append(("lr_schedule.warmup_fraction", f"must lie in [0, 1], got {sched.warmup_fraction}"))
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        found.append(("lr_schedule.min_lr_ratio", f"must lie in [0, 1], got {sched.min_lr_ratio}"))
    if sched.decay_steps is not None and sched.decay_steps <= 0:
        found.append(("lr_schedule.decay_steps", f"must be positive, got {sched.decay_steps}"))
    if cfg.optimizer.lr <= 0:
        found.append(("optimizer.lr", f"must be positive, got {cfg.optimizer.lr}"))
    if m.attention_scale <= 0:
        found.append(("model.attention_scale", f"must be positive, got {m.attention_scale}"))
    if t.eval_interval < 0 or (t.eval_interval and t.eval_steps < 1):
        found.append(
            (
                "training.eval_steps" if t.eval_interval > 0 else "training.eval_interval",
                "evaluation needs eval_interval >= 0 (0: never) and eval_steps >= 1",
            )
        )
    if cfg.checkpoint.interval < 0:
        found.append(
            ("checkpoint.interval", f"must be >= 0 (0: only at the end), got {cfg.checkpoint.interval}")
        )
    if cfg.checkpoint.keep_last < 1:
        found.append(("checkpoint.keep_last", f"must be at least 1, got {cfg.checkpoint.keep_last}"))

    if world_size is not None:
        model_parallel = p.tensor_parallel_size * p.pipeline_parallel_size
        if world_size % model_parallel:
            found.append(
                (
                    "parallel.tensor_parallel_size",
                    f"world size {world_size} is not divisible by tensor_parallel_size x "
                    f"pipeline_parallel_size = {model_parallel}",
                )
            )
        else:
            dp = world_size // model_parallel
            per_step = t.micro_batch_size * dp
            if t.global_batch_size % per_step:
                lower = max(per_step, t.global_batch_size // per_step * per_step)
                found.append(
                    (
                        "training.global_batch_size",
                        f"{t.global_batch_size} is not micro_batch_size x data-parallel size x "
                        f"accumulation steps (micro {t.micro_batch_size} x dp {dp} = {per_step} per "
                        f"accumulation step); use a multiple of {per_step} such as {lower}",
                    )
                )
    return found


def validate_config(cfg: GLMConfig, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` listing every broken rule, each with the key to change."""
    found = _problems(cfg, world_size)
    if found:
        lines = "\n".join(f"  {key}: {message}" for key, message in found)
        raise ConfigError(f"invalid configuration {cfg.name!r}:\n{lines}")


def parallel_layout(cfg: GLMConfig, world_size: int) -> Layout:
    validate_config(cfg, world_size)
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    dp = world_size // (tp * pp)
    accumulation = cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)
    return Layout(world_size, tp, pp, dp, accumulation)


def model_flops_per_token(
    model: ModelConfig, vocab_size: int, seq_length: int, logit_fraction: float = 1.0
) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

    ``72 L h^2 + 12 L h T + 6 V h f``: the layers' weight matmuls, the attention scores and weighted
    sum over all T keys (no discount for the mask), and the output head on the fraction ``f`` of
    positions whose logits are computed (GLM only needs them where the loss is taken).
    """
    h, L = model.hidden_size, model.num_layers
    return 72.0 * L * h * h + 12.0 * L * h * seq_length + 6.0 * vocab_size * h * logit_fraction


def describe_parameters(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M"
