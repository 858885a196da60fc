"""Typed configuration: one merged, validated tree read from YAML with ``--set key=value`` overrides.

- ``schema``: the sections (dataclasses), each checking its own values with ``problems()``;
- ``loading``: YAML with file:line for every key, typed conversion, ``--set`` overrides;
- ``validation``: the rules that span sections, the world-size rules and the derived ``Layout``.

Every key is optional and unknown keys are errors (with the file:line and the closest valid key).
``validate_config`` reports every broken rule at once, before any process starts.
"""

from megatron_glm.config.loading import (
    add_override_argument,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from megatron_glm.config.schema import (
    CheckpointConfig,
    CorpusConfig,
    DataConfig,
    GLMConfig,
    LoggingConfig,
    LRScheduleConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    count_parameters,
    describe_parameters,
    model_flops_per_token,
)
from megatron_glm.config.validation import (
    Layout,
    config_problems,
    cuda_graph_blockers,
    padded_vocab_size,
    parallel_layout,
    uses_cuda_graphs,
    validate_config,
)
from megatron_glm.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "CorpusConfig",
    "DataConfig",
    "GLMConfig",
    "LRScheduleConfig",
    "Layout",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainingConfig",
    "add_override_argument",
    "config_from_dict",
    "config_problems",
    "config_to_dict",
    "count_parameters",
    "cuda_graph_blockers",
    "describe_parameters",
    "dump_config",
    "load_config",
    "model_flops_per_token",
    "padded_vocab_size",
    "parallel_layout",
    "parse_override",
    "uses_cuda_graphs",
    "validate_config",
]
