"""``glm-convert reshard``: a glm-pretrain checkpoint at one TP x PP x DP layout, optimizer state included, into
a *universal* checkpoint that glm-pretrain resumes at another layout.

Reading. DeepSpeed stores a run's state per model-parallel slice ``mp`` (``tp_rank`` without pipeline
parallelism, ``stage * TP + tp_rank`` with it; ``mp_rank_XX_model_states.pt``: step counters, LR schedule,
our client state) and per data-parallel rank ``d`` (``zero_pp_rank_d_mp_rank_XX_optim_states.pt``, with a
``bf16_`` prefix for DeepSpeed's BF16_Optimizer): the fp32 master weights and Adam's moments of each parameter group
flattened and cut into DP partitions, with ``param_slice_mappings`` saying where each parameter's fragment
lies in the partition (the records DeepSpeed's own ``ds_to_universal`` reads). Concatenating a parameter's
fragments over the DP ranks gives its tensor-parallel shard; merging the TP shards by the rules of
``layout`` (interleaved QKV included) gives the full tensor, and pipeline names map to THUDM keys.

ZeRO-3 (weights partitioned too) keeps the run's state in ``zero_pp_rank_d_mp_rank_XX_model_states.pt`` (one
per rank, the same counters) and the optimizer files' ``fp32_flat_groups``: each rank's flat partition of a
parameter group is the concatenation, in ``param_shapes`` order, of every parameter's ``ceil(numel / DP)``-element
slice (the last rank's zero-padded), as DeepSpeed's ``zero_to_fp32`` reads them; Adam's moments lie the same way.
ZeRO-0 runs (fp32 only) keep the torch optimizer's own ``state_dict`` in the model-states files, indexed by
parameter in param-group order, and the weights under ``'module'`` (pipeline runs: the per-layer files);
``zero0.py`` names each entry by rebuilding glm-pretrain's parameter groups.

Writing (``universal.py`` reads it back): ``<output>/<step>/universal/{fp32,exp_avg,exp_avg_sq}.safetensors``
hold the full tensors under THUDM keys, ``state.json`` the counters; ``config.yaml`` is the source's with the
target layout, so ``glm-pretrain --config <output>/<step>/config.yaml`` resumes. Tensors are produced one at
a time from memory-mapped files, and everything is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_glm.checkpoint import zero0
from megatron_glm.checkpoint.files import (
    CONFIG_FILE,
    META_FILE,
    CheckpointError,
    load_torch_file,
    resolve_tag_dir,
    shard_file_name,
    staged,
    write_trackers,
)
from megatron_glm.checkpoint.layout import (
    check_tensor_parallel_size,
    expected_keys,
    full_shape,
    merge_shards,
    model_shape,
    pipeline_key_to_thudm,
)
from megatron_glm.checkpoint.streaming import TensorPlan, write_safetensors_file
from megatron_glm.checkpoint.thudm import check_keys
from megatron_glm.checkpoint.universal import STATE_FILE, STATES, UNIVERSAL_SUBDIR, state_file
from megatron_glm.config import ConfigError, GLMConfig, dump_config, load_config, validate_config


def optim_file_name(data_parallel_rank: int, model_parallel_rank: int, bf16_optimizer: bool) -> str:
    prefix = "bf16_" if bf16_optimizer else ""
    return f"{prefix}zero_pp_rank_{data_parallel_rank}_mp_rank_{model_parallel_rank:02d}_optim_states.pt"


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where one tensor-parallel shard of a parameter lies: slice ``mp``, parameter group, name, shape."""

    mp: int
    group: int
    name: str
    shape: tuple[int, ...]


class TrainingCheckpoint:
    """One glm-pretrain checkpoint (a tag directory) read as full, THUDM-keyed fp32 tensors and counters."""

    def __init__(self, tag_dir: Path, *, trust: bool = False):
        self.tag_dir = tag_dir
        self.trust = trust
        if not (tag_dir / CONFIG_FILE).is_file() or not (tag_dir / META_FILE).is_file():
            raise CheckpointError(
                f"{tag_dir}: no {CONFIG_FILE} / {META_FILE}: not a complete glm-pretrain checkpoint (reshard "
                "reads the checkpoints glm-pretrain saves; use glm-convert import for THUDM/HF weights)"
            )
        try:
            self.config = load_config(tag_dir / CONFIG_FILE)
        except ConfigError as exc:
            raise CheckpointError(f"{tag_dir / CONFIG_FILE}: {exc}") from exc
        meta = json.loads((tag_dir / META_FILE).read_text())
        p = self.config.parallel
        self.tp, self.pp = p.tensor_parallel_size, p.pipeline_parallel_size
        self.world_size = int(meta["world_size"])
        self.dp = self.world_size // (self.tp * self.pp)
        self.zero_stage = p.zero_stage
        self._layer_files: dict[str, dict[str, Any]] = {}
        if self.zero_stage == 0:
            self.bf16_optimizer = False
            self.models = [self._load(shard_file_name(mp)) for mp in range(self.tp * self.pp)]
            for mp, model in enumerate(self.models):
                if not isinstance(model.get("optimizer"), dict) or "state" not in model["optimizer"]:
                    raise CheckpointError(
                        f"{tag_dir / shard_file_name(mp)}: no optimizer state (a ZeRO-0 checkpoint keeps the "
                        "torch optimizer's state_dict there); it was saved without the optimizer"
                    )
            self.optims = [[model["optimizer"]] for model in self.models]
            no_decay = zero0.no_decay_keys(self.config)
            self.zero0_entries = [
                zero0.optimizer_entries(
                    self.config, tag_dir, mp, model, self._layer_file, no_decay, self._thudm_key
                )
                for mp, model in enumerate(self.models)
            ]
        else:
            # DeepSpeed's partitioning optimizers (ZeRO 1-3; bf16 runs' files carry a bf16_ prefix) record where
            # each parameter lies in its partition.
            prefixed = [(self.tag_dir / optim_file_name(0, 0, bf16)).is_file() for bf16 in (False, True)]
            self.bf16_optimizer = prefixed[1] and not prefixed[0]
            self.models = [self._load(self._model_file_name(mp)) for mp in range(self.tp * self.pp)]
            self.optims = [
                [
                    self._load(optim_file_name(d, mp, self.bf16_optimizer))["optimizer_state_dict"]
                    for d in range(self.dp)
                ]
                for mp in range(self.tp * self.pp)
            ]
        self.locations = self._locate()
        self.zero3_offsets = self._zero3_offsets() if self.zero_stage == 3 else {}

    def _model_file_name(self, mp: int) -> str:
        # ZeRO-3 writes one model-states file per rank (the same counters in each): read DP rank 0's.
        return f"zero_pp_rank_0_{shard_file_name(mp)}" if self.zero_stage == 3 else shard_file_name(mp)

    def _zero3_offsets(self) -> dict[tuple[int, int, str], tuple[int, int]]:
        """``{(mp, group, name): (offset, numel)}`` of each parameter's slice in every rank's flat partition."""
        offsets = {}
        for mp, model in enumerate(self.models):
            for group, group_shapes in enumerate(model["param_shapes"]):
                offset = 0
                for name, shape in group_shapes.items():
                    part = -(-torch.Size(shape).numel() // self.dp)
                    offsets[mp, group, name] = (offset, part)
                    offset += part
                flat = self.optims[mp][0]["fp32_flat_groups"][group]
                if offset != flat.numel():
                    raise CheckpointError(
                        f"{self.tag_dir}: parameter group {group} of slice {mp} holds {flat.numel()} values per "
                        f"rank, its parameters need {offset}; the optimizer files are from another run"
                    )
        return offsets

    def _layer_file(self, name: str) -> dict[str, Any]:
        """A pipeline per-layer weights file (ZeRO-0 sources), loaded once."""
        if name not in self._layer_files:
            self._layer_files[name] = self._load(name)
        return self._layer_files[name]

    def _thudm_key(self, name: str) -> str:
        return pipeline_key_to_thudm(name, self.config.model.num_layers) if self.pp > 1 else name

    def _entries(self, mp: int) -> list[tuple[int, str, tuple[int, ...]]]:
        """``[(group, name, shape)]`` of slice ``mp``'s parameters; at ZeRO-0 ``group`` is the optimizer index."""
        if self.zero_stage == 0:
            return [(index, name, shape) for index, (name, shape) in enumerate(self.zero0_entries[mp])]
        shapes = self.models[mp].get("param_shapes")
        if not shapes:
            raise CheckpointError(
                f"{self.tag_dir / self._model_file_name(mp)}: no param_shapes (not a ZeRO checkpoint)"
            )
        groups = self.optims[mp][0]["fp32_flat_groups" if self.zero_stage == 3 else "param_slice_mappings"]
        if len(groups) != len(shapes):
            raise CheckpointError(f"{self.tag_dir}: parameter groups of model and optimizer files differ")
        return [
            (group, name, tuple(shape))
            for group, group_shapes in enumerate(shapes)
            for name, shape in group_shapes.items()
        ]

    def _load(self, name: str) -> dict[str, Any]:
        path = self.tag_dir / name
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; a checkpoint saved by {self.world_size} ranks at TP {self.tp} x PP "
                f"{self.pp} x DP {self.dp} has one such file per rank. Copy the complete {self.tag_dir}"
            )
        return load_torch_file(path, trust=self.trust)

    def _locate(self) -> dict[str, list[_Location]]:
        """``{THUDM key: [location of TP shard r for r in range(TP)]}``."""
        found: dict[str, dict[int, _Location]] = {}
        for mp in range(len(self.models)):
            tp_rank = mp % self.tp
            for group, name, shape in self._entries(mp):
                # Tied embeddings sit on the first and the last stage with the same values: keep one.
                key = self._thudm_key(name)
                found.setdefault(key, {}).setdefault(tp_rank, _Location(mp, group, name, shape))
        for key, shards in found.items():
            if sorted(shards) != list(range(self.tp)):
                raise CheckpointError(f"{self.tag_dir}: {key} lacks tensor-parallel shards {sorted(shards)}")
        return {key: [shards[r] for r in range(self.tp)] for key, shards in found.items()}

    def keys(self) -> list[str]:
        shape = model_shape({k: self.full_shape(k) for k in self.locations}, str(self.tag_dir))
        keys = expected_keys(shape.num_layers, shape.block_position_encoding)
        check_keys(keys, list(self.locations), self.tag_dir)
        return keys

    def full_shape(self, key: str) -> tuple[int, ...]:
        return full_shape(torch.Size(self.locations[key][0].shape), key, self.tp)

    def _base_state(self, optim: dict) -> dict:
        """The wrapped torch optimizer's per-group state (``{group: {exp_avg, exp_avg_sq, step}}``)."""
        if self.zero_stage == 0:  # the torch optimizer's own state_dict: {parameter index: state}
            return optim["state"]
        base = optim["optimizer_state_dict"] if self.zero_stage == 3 else optim["base_optimizer_state"]
        return base["state"] if isinstance(base, dict) else dict(enumerate(base))

    def _flat_state(self, optim: dict, group: int, state: str) -> torch.Tensor:
        if state == "fp32":
            key = "fp32_flat_groups" if self.zero_stage == 3 else "single_partition_of_fp32_groups"
            return optim[key][group]
        return self._base_state(optim)[group][state]

    def _shard(self, where: _Location, state: str) -> torch.Tensor:
        if self.zero_stage == 0:  # every data-parallel replica holds everything; rank 0's file is saved
            if state == "fp32":
                model = self.models[where.mp]
                found = zero0.fp32_weight(where.mp, self.tp, where.name, model, self._layer_file)
            else:
                found = self.optims[where.mp][0]["state"][where.group][state]
            return found.view(where.shape).float()
        pieces = []
        for optim in self.optims[where.mp]:
            if self.zero_stage == 3:
                fragment = self.zero3_offsets[where.mp, where.group, where.name]
            else:
                found = optim["param_slice_mappings"][where.group].get(where.name)
                fragment = None if found is None else (found.start, found.numel)
            if fragment is not None:
                flat = self._flat_state(optim, where.group, state)
                pieces.append(flat.narrow(0, *fragment))
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        count = torch.Size(where.shape).numel()
        if self.zero_stage == 3:  # the last rank's slice is padded to the common size
            flat = flat[:count]
        if flat.numel() != count:
            raise CheckpointError(
                f"{self.tag_dir}: {where.name} of slice {where.mp} has {flat.numel()} values over the DP "
                f"partitions, its shape {where.shape} needs {count}; an optimizer file is from another run"
            )
        return flat.view(where.shape).float()

    def full(self, key: str, state: str) -> torch.Tensor:
        """The full fp32 tensor of ``state`` (fp32 / exp_avg / exp_avg_sq) for THUDM key ``key``."""
        return merge_shards([self._shard(where, state) for where in self.locations[key]], key)

    def adam_step(self) -> int:
        steps = set()
        for optims in self.optims:
            for optim in optims:
                for state in self._base_state(optim).values():
                    if "step" in state:
                        steps.add(int(state["step"]))
                if optim.get("base_optimizer_state_step") is not None:
                    steps.add(int(optim["base_optimizer_state_step"]))
        if len(steps) != 1:
            raise CheckpointError(f"{self.tag_dir}: Adam step counters {sorted(steps)} differ between files")
        return steps.pop()

    def counters(self) -> dict[str, Any]:
        model = self.models[0]
        client = {k: model[k] for k in ("step", "consumed_samples", "skipped_steps") if k in model}
        return {
            "adam_step": self.adam_step(),
            "lr_scheduler": model.get("lr_scheduler"),
            "global_steps": model.get("global_steps", 0),
            "global_samples": model.get("global_samples", 0),
            "skipped_steps": model.get("skipped_steps", 0),
            "client_state": client,
        }


def target_config(
    source: GLMConfig,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    zero_stage: int | None,
    save_dir: Path,
) -> GLMConfig:
    """The source's config at the target layout, saving into ``save_dir``; raises naming what does not divide."""
    parallel = dataclasses.replace(
        source.parallel,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        zero_stage=source.parallel.zero_stage if zero_stage is None else zero_stage,
    )
    checkpoint = dataclasses.replace(source.checkpoint, save_dir=str(save_dir), init_from=None)
    cfg = dataclasses.replace(source, parallel=parallel, checkpoint=checkpoint)
    try:
        validate_config(cfg)
    except ConfigError as exc:  # the requested layout is invalid: a usage error (exit 2), not a bad file
        raise ConfigError(
            f"target layout TP {tensor_parallel_size} x PP {pipeline_parallel_size}: {exc}"
        ) from None
    return cfg


def reshard(
    source: Path,
    output: Path,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    zero_stage: int | None = None,
    trust: bool = False,
) -> Path:
    """Convert the glm-pretrain checkpoint ``source`` (save or tag directory) into a universal save directory
    ``output`` for the target layout; returns ``output``."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory")
    tag_dir = resolve_tag_dir(source)
    checkpoint = TrainingCheckpoint(tag_dir, trust=trust)
    output = Path(output)
    cfg = target_config(
        checkpoint.config, tensor_parallel_size, pipeline_parallel_size, zero_stage, output.resolve()
    )
    keys = checkpoint.keys()
    shape = model_shape({k: checkpoint.full_shape(k) for k in keys}, str(tag_dir))
    check_tensor_parallel_size(shape, cfg.model.num_attention_heads, tensor_parallel_size, str(tag_dir))
    counters = checkpoint.counters()
    step = int(counters["client_state"].get("step", counters["global_steps"]))
    tag = str(step)
    plans = [TensorPlan(k, checkpoint.full_shape(k), torch.float32) for k in keys]
    total = 3 * sum(plan.nbytes for plan in plans)
    with staged(output) as tmp:
        universal = tmp / tag / UNIVERSAL_SUBDIR
        universal.mkdir(parents=True)
        with tqdm(total=total, unit="B", unit_scale=True, desc="resharding") as bar:
            for state in STATES:
                write_safetensors_file(
                    state_file(universal, state), plans, lambda k, s=state: checkpoint.full(k, s), bar
                )
        counters["source_layout"] = {
            "tensor_parallel_size": checkpoint.tp,
            "pipeline_parallel_size": checkpoint.pp,
            "data_parallel_size": checkpoint.dp,
            "zero_stage": checkpoint.zero_stage,
        }
        counters["vocab_rows"] = shape.vocab_rows
        # The resumed run re-seeds every rank (see universal.reseed); shifting the seed by the step keeps
        # it from replaying the dropout masks of the run's first steps.
        counters["seed"] = cfg.training.seed + step
        (universal / STATE_FILE).write_text(json.dumps(counters, indent=2) + "\n")
        (tmp / tag / CONFIG_FILE).write_text(dump_config(cfg))
        meta = {
            "step": step,
            "world_size": None,
            "universal": True,
            "resharded_from": str(tag_dir.resolve()),
            "consumed_samples": counters["client_state"].get("consumed_samples"),
        }
        (tmp / tag / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_trackers(tmp, tag)
    return output
