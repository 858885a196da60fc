"""The conversions behind ``glm-convert``: between THUDM-layout checkpoints of any model-parallel size, a
consolidated safetensors file, and a Hugging Face directory.

Every conversion reads its source lazily (memory-mapped files), produces one full tensor at a time, and
writes into a temporary sibling of the output that is renamed at the end, so an interrupted conversion
leaves nothing under the output's name. The model's head count (and tokenizer) cannot be read from the
weights; they come from the ``config.yaml`` glm-pretrain saves next to its checkpoints, or ``--config``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_glm.checkpoint.files import (
    CONFIG_FILE,
    WEIGHTS_SUBDIR,
    CheckpointError,
    load_torch_file,
    resolve_tag_dir,
    shard_file_name,
    staged,
    write_trackers,
)
from megatron_glm.checkpoint.layout import (
    WORD_EMBEDDINGS,
    ModelShape,
    check_tensor_parallel_size,
    expected_keys,
    model_shape,
    shard_shape,
    split_tensor,
)
from megatron_glm.checkpoint.streaming import (
    SAFETENSORS_DTYPES,
    TensorPlan,
    open_safetensors_dir,
    write_safetensors,
    write_safetensors_file,
)
from megatron_glm.checkpoint.thudm import ThudmShards, check_keys, stream_module_file
from megatron_glm.checkpoint.universal import UNIVERSAL_SUBDIR, is_universal, state_file
from megatron_glm.config import ConfigError, ModelConfig, load_config

REMOTE_CODE = Path(__file__).resolve().parent / "hf_remote_code"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
_SAFETENSORS_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class WeightSource:
    """Full (MP=1) THUDM-keyed tensors, one at a time: ``keys``, ``shape(key)``, ``dtype(key)``, ``tensor(key)``."""

    def __init__(
        self,
        keys: list[str],
        shape: Callable[[str], tuple[int, ...]],
        dtype: Callable[[str], torch.dtype],
        tensor: Callable[[str], torch.Tensor],
        where: str,
    ):
        self.keys, self.shape, self.dtype, self.tensor, self.where = keys, shape, dtype, tensor, where

    def model_shape(self) -> ModelShape:
        found = model_shape({k: self.shape(k) for k in self.keys}, self.where)
        check_keys(expected_keys(found.num_layers, found.block_position_encoding), self.keys, self.where)
        return found


def thudm_source(path: str | Path, *, trust: bool = False) -> WeightSource:
    shards = ThudmShards(path, trust=trust)
    return WeightSource(shards.keys(), shards.full_shape, shards.dtype, shards.full, shards.where)


def hf_source(directory: str | Path, *, trust: bool = False) -> WeightSource:
    """The weights of a Hugging Face GLM directory (safetensors, sharded or not, or ``pytorch_model.bin``);
    keys lose the head models' ``glm.`` prefix, as THUDM's HF files have none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass a Hugging Face model directory")
    files = open_safetensors_dir(directory)
    if files:
        stored = _safetensors_source(files, str(directory))
        names = {(name[len("glm.") :] if name.startswith("glm.") else name): name for name in files}
        return WeightSource(
            list(names),
            lambda key: stored.shape(names[key]),
            lambda key: stored.dtype(names[key]),
            lambda key: stored.tensor(names[key]),
            str(directory),
        )
    if (directory / "pytorch_model.bin").is_file():
        state = load_torch_file(directory / "pytorch_model.bin", trust=trust)

        def tensor(key: str) -> torch.Tensor:
            return state[names[key]]

        def shape(key: str) -> tuple[int, ...]:
            return tuple(state[names[key]].shape)

        raw = list(state)
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    names = {(name[len("glm.") :] if name.startswith("glm.") else name): name for name in raw}

    def dtype(key: str) -> torch.dtype:
        return tensor(key).dtype

    return WeightSource(list(names), shape, dtype, tensor, str(directory))


def _safetensors_source(files: dict[str, Path], where: str) -> WeightSource:
    """A ``WeightSource`` over safetensors files holding full tensors under THUDM keys (``{key: file}``)."""
    from safetensors import safe_open

    for name, file in files.items():
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named by the index for {name} is missing; copy it")
    handles = {file: safe_open(str(file), framework="pt") for file in set(files.values())}

    def tensor(key: str) -> torch.Tensor:
        return handles[files[key]].get_tensor(key)

    def shape(key: str) -> tuple[int, ...]:
        return tuple(handles[files[key]].get_slice(key).get_shape())

    def dtype(key: str) -> torch.dtype:
        return _SAFETENSORS_TORCH[handles[files[key]].get_slice(key).get_dtype()]

    return WeightSource(list(files), shape, dtype, tensor, where)


def universal_source(tag_dir: Path) -> WeightSource:
    """The fp32 master weights of a universal checkpoint (``glm-convert reshard``'s output)."""
    weights = state_file(Path(tag_dir) / UNIVERSAL_SUBDIR, "fp32")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; copy the complete {tag_dir}")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    return _safetensors_source(dict.fromkeys(keys, weights), str(weights))


def checkpoint_source(path: str | Path, *, trust: bool = False) -> WeightSource:
    """The weights of a glm-pretrain checkpoint, a THUDM/GLM download or a universal checkpoint."""
    path = Path(path)
    if path.is_dir():
        tag_dir = resolve_tag_dir(path)
        if is_universal(tag_dir):
            return universal_source(tag_dir)
    return thudm_source(path, trust=trust)


def source_config(path: str | Path, config: str | Path | None) -> ModelConfig | None:
    """The model config: ``config`` (a YAML file) if given, else the ``config.yaml`` saved with the checkpoint."""
    if config is None:
        path = Path(path)
        candidates = [path / CONFIG_FILE, path.parent / CONFIG_FILE]
        if path.name == WEIGHTS_SUBDIR or path.parent.name == WEIGHTS_SUBDIR:
            candidates += [path.parent / CONFIG_FILE, path.parent.parent / CONFIG_FILE]
        if path.is_dir():
            for tracker in ("latest", "latest_checkpointed_iteration.txt"):
                if (path / tracker).is_file():
                    candidates.append(path / (path / tracker).read_text().strip() / CONFIG_FILE)
        found = [c for c in candidates if c.is_file()]
        if not found:
            return None
        config = found[0]
    try:
        return load_config(config).model
    except ConfigError as exc:
        raise CheckpointError(f"model config {config}: {exc}") from exc


def check_against_config(shape: ModelShape, model: ModelConfig | None, where: str) -> None:
    """Raise when the weights' shapes contradict the model config (hidden size, layers, positions, vocab)."""
    if model is None:
        return
    problems = []
    if shape.hidden_size != model.hidden_size:
        problems.append(f"hidden size {shape.hidden_size} (config model.hidden_size={model.hidden_size})")
    if shape.num_layers != model.num_layers:
        problems.append(f"{shape.num_layers} layers (config model.num_layers={model.num_layers})")
    if shape.max_position_embeddings != model.max_position_embeddings:
        problems.append(
            f"{shape.max_position_embeddings} positions (config model.max_position_embeddings="
            f"{model.max_position_embeddings})"
        )
    if model.hidden_size % model.num_attention_heads:
        problems.append(
            f"hidden size {shape.hidden_size} not divisible by model.num_attention_heads={model.num_attention_heads}"
        )
    if (
        model.vocab_size is not None
        and abs(model.vocab_size - shape.vocab_rows) >= model.make_vocab_size_divisible_by * 8
    ):
        problems.append(f"{shape.vocab_rows} vocabulary rows (config model.vocab_size={model.vocab_size})")
    if problems:
        raise CheckpointError(
            f"{where}: the weights do not match the model config: {'; '.join(problems)}. Pass the --config "
            "the checkpoint was trained with"
        )


def export_safetensors(source: WeightSource, output: Path, *, dtype: torch.dtype | None = None) -> Path:
    """One consolidated safetensors file with THUDM's (our) keys."""
    source.model_shape()
    plans = [TensorPlan(k, source.shape(k), dtype or source.dtype(k)) for k in source.keys]
    output = Path(output)
    total = sum(plan.nbytes for plan in plans)
    with (
        staged(output) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors") as bar,
    ):
        write_safetensors_file(tmp, plans, source.tensor, bar)
    return output


def export_thudm(
    source: WeightSource,
    output: Path,
    *,
    model_parallel_size: int = 1,
    num_attention_heads: int | None = None,
    dtype: torch.dtype | None = None,
    tag: str = "release",
    rename: Callable[[str], str] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """THUDM/GLM's released layout: ``<output>/<tag>/mp_rank_XX_model_states.pt`` + both tracker files.

    Each file is written tensor by tensor (one full tensor and its shard in memory at a time), so no file
    is ever built in memory. ``rename`` maps THUDM keys to the keys written (SwissArmyTransformer's);
    ``extra_files`` are ``{name: text}`` written next to the tracker files.
    """
    shape = source.model_shape()
    check_tensor_parallel_size(shape, num_attention_heads, model_parallel_size, source.where)
    written = {(rename(key) if rename else key): key for key in source.keys}
    plans = [
        TensorPlan(name, shard_shape(source.shape(key), key, model_parallel_size), dtype or source.dtype(key))
        for name, key in written.items()
    ]
    total = model_parallel_size * sum(plan.nbytes for plan in plans)
    output = Path(output)
    with (
        staged(output) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="writing THUDM files") as progress,
    ):
        (tmp / tag).mkdir(parents=True)
        for rank in range(model_parallel_size):

            def produce(name: str, rank: int = rank) -> torch.Tensor:
                key = written[name]
                return split_tensor(source.tensor(key), key, rank, model_parallel_size)

            stream_module_file(
                tmp / tag / shard_file_name(rank), plans, produce, model_parallel_size, progress
            )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_trackers(tmp, tag)
    return output


def hf_config(shape: ModelShape, model: ModelConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of the exported model (THUDM/GLM's field names, our remote code in ``auto_map``)."""
    return {
        "architectures": ["GLMForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_glm.GLMConfig",
            "AutoModel": "modeling_glm.GLMModel",
            "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
        },
        "model_type": "glm",
        "num_layers": shape.num_layers,
        "vocab_size": shape.vocab_rows,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "max_sequence_length": shape.max_position_embeddings,
        "block_position_encoding": shape.block_position_encoding,
        "embedding_dropout_prob": model.hidden_dropout,
        "attention_dropout_prob": model.attention_dropout,
        "output_dropout_prob": model.hidden_dropout,
        "attention_scale": model.attention_scale,
        "initializer_range": model.init_method_std,
        "layernorm_epsilon": model.layernorm_epsilon,
        "output_predict": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _write_tokenizer(directory: Path, name: str, max_length: int) -> dict[str, int]:
    """``tokenizer.json`` + ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``; returns GLM's token ids."""
    from data_tools.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(name)
    tokenizer.save(directory / "tokenizer.json")
    command = tokenizer.command
    text = tokenizer.id_to_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": text(command.eos),
        "pad_token": text(command.pad),
        "cls_token": text(command.cls),
        "mask_token": text(command.mask),
        "unk_token": text(command.unk),
        "additional_special_tokens": [
            text(t) for t in (command.sop, command.eop, command.gmask, command.smask)
        ],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": command.eop, "pad_token_id": command.pad}, indent=2) + "\n"
    )
    return {
        "pad_token_id": command.pad,
        "eos_token_id": command.eop,
        "sop_token_id": command.sop,
        "eop_token_id": command.eop,
        "mask_token_id": command.mask,
        "gmask_token_id": command.gmask,
        "smask_token_id": command.smask,
    }


def export_hf(
    source: WeightSource,
    output: Path,
    model: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
) -> Path:
    """A Hugging Face directory: config.json, (sharded) safetensors, tokenizer files and the remote code,
    loadable offline with ``AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)``."""
    shape = source.model_shape()
    check_against_config(shape, model, source.where)
    out_dtype = dtype or source.dtype(WORD_EMBEDDINGS)
    plans = [TensorPlan(k, source.shape(k), out_dtype) for k in source.keys]
    output = Path(output)
    with staged(output) as tmp:
        tmp.mkdir(parents=True)
        ids = _write_tokenizer(tmp, model.tokenizer, shape.max_position_embeddings) if tokenizer else {}
        config = {**hf_config(shape, model, out_dtype), **ids}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in ("configuration_glm.py", "modeling_glm.py"):
            shutil.copyfile(REMOTE_CODE / name, tmp / name)
        write_safetensors(tmp, plans, source.tensor, max_shard_bytes=max_shard_bytes)
    return output


def hf_model_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` fields a Hugging Face GLM ``config.json`` gives (tokenizer: its tokenizer.json)."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
        fields = {
            "num_layers": config["num_layers"],
            "hidden_size": config["hidden_size"],
            "num_attention_heads": config["num_attention_heads"],
            "max_position_embeddings": config["max_sequence_length"],
            "vocab_size": config["vocab_size"],
            "block_position_encoding": config.get("block_position_encoding", True),
        }
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: not a GLM config.json ({exc}); pass a THUDM/GLM or glm-convert HF directory"
        ) from exc
    tokenizer = Path(directory) / "tokenizer.json"
    if tokenizer.is_file():
        fields["tokenizer"] = str(tokenizer)
    return dataclasses.replace(ModelConfig(), **fields)
