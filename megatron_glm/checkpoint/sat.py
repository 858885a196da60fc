"""SwissArmyTransformer (SAT, THUDM's maintained framework): its ``GLMModel``'s checkpoint layout.

A SAT checkpoint directory holds ``model_config.json`` (``model_class`` and the architecture arguments that
``GLMModel.from_pretrained`` rebuilds the model from), the tracker ``latest`` and
``<tag>/mp_rank_XX_model_states.pt`` with the model under ``'module'``. SAT's ``BaseModel`` keeps the
transformer under ``transformer.`` and GLM's block-position table in its mixin, so three keys differ from
THUDM/GLM's; everything else, including the model-parallel split (QKV with stride 3), is THUDM's.
SAT's ``max_sequence_length`` is the number of position-table rows (THUDM's maximum + 1, e.g. 513).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_glm.checkpoint.convert import WeightSource, export_thudm, thudm_source
from megatron_glm.checkpoint.files import CheckpointError
from megatron_glm.checkpoint.layout import check_tensor_parallel_size
from megatron_glm.config import ModelConfig

SAT_CONFIG_FILE = "model_config.json"
_TO_SAT = {
    "word_embeddings.weight": "transformer.word_embeddings.weight",
    "transformer.block_position_embeddings.weight": "mixins.block_position_embedding.block_position_embeddings.weight",
}
_FROM_SAT = {sat: thudm for thudm, sat in _TO_SAT.items()}


def to_sat_key(key: str) -> str:
    return _TO_SAT.get(key, key)


def from_sat_key(key: str) -> str:
    return _FROM_SAT.get(key, key)


def sat_model_config(source: WeightSource, model: ModelConfig, model_parallel_size: int) -> dict:
    """``model_config.json`` for SAT's ``GLMModel`` (the fields SAT's ``save_checkpoint`` writes)."""
    shape = source.model_shape()
    config = {
        "model_class": "GLMModel",
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "vocab_size": shape.vocab_rows,
        "layernorm_order": "pre",
        "model_parallel_size": model_parallel_size,
        "max_sequence_length": source.shape("transformer.position_embeddings.weight")[0],
        "block_lm": True,
    }
    if model.layernorm_epsilon != 1e-5:  # SAT writes it only when it is not its default
        config["layernorm_epsilon"] = model.layernorm_epsilon
    return config


def export_sat(
    source: WeightSource,
    output: Path,
    model: ModelConfig,
    *,
    model_parallel_size: int = 1,
    dtype: torch.dtype | None = None,
) -> Path:
    """A SAT GLM checkpoint directory: ``model_config.json``, ``latest`` and ``release/mp_rank_XX_model_states.pt``."""
    shape = source.model_shape()
    if not shape.block_position_encoding:
        raise CheckpointError(
            f"{source.where}: no block position table; SAT's GLMModel always has one (2D positions)"
        )
    check_tensor_parallel_size(shape, model.num_attention_heads, model_parallel_size, source.where)
    config = json.dumps(sat_model_config(source, model, model_parallel_size), indent=4) + "\n"
    return export_thudm(
        source,
        output,
        model_parallel_size=model_parallel_size,
        num_attention_heads=model.num_attention_heads,
        dtype=dtype,
        rename=to_sat_key,
        extra_files={SAT_CONFIG_FILE: config},
    )


def sat_source(path: str | Path, *, trust: bool = False) -> WeightSource:
    """The weights of a SAT GLM checkpoint (any model-parallel size) under THUDM keys."""
    inner = thudm_source(path, trust=trust)
    names = {from_sat_key(key): key for key in inner.keys}
    if "word_embeddings.weight" not in names:
        raise CheckpointError(
            f"{inner.where}: no transformer.word_embeddings.weight: not a SwissArmyTransformer GLM checkpoint"
        )
    return WeightSource(
        list(names),
        lambda key: inner.shape(names[key]),
        lambda key: inner.dtype(names[key]),
        lambda key: inner.tensor(names[key]),
        inner.where,
    )


def sat_model_fields(directory: Path) -> dict:
    """The ``ModelConfig`` fields a SAT ``model_config.json`` gives."""
    path = Path(directory) / SAT_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        return {
            "num_layers": config["num_layers"],
            "hidden_size": config["hidden_size"],
            "num_attention_heads": config["num_attention_heads"],
            "max_position_embeddings": config["max_sequence_length"] - 1,
            "vocab_size": config["vocab_size"],
        }
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a SAT GLM model_config.json ({exc})") from exc
