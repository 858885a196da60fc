"""Universal checkpoints: a run's state with no parallel layout in it, which glm-pretrain resumes at any layout.

``<tag>/universal/`` holds ``fp32.safetensors`` (the fp32 master weights), ``exp_avg.safetensors`` and
``exp_avg_sq.safetensors`` (Adam's moments), each the full tensors under THUDM keys, and ``state.json``
(Adam's step, the LR schedule, DeepSpeed's step/sample counters, glm-pretrain's client state: step,
consumed samples). ``glm-convert reshard`` writes them (``reshard.py``); ``load_universal`` puts them into a
freshly built DeepSpeed engine at the job's own TP x PP x DP (ZeRO stage 0, 1, 2 or 3): each rank cuts its TP
shard (``layout``'s rules), writes the weights, and at ZeRO-0 sets the torch optimizer's state per parameter
(Adam's moments and step); otherwise it writes its fragment of every flat ZeRO partition through
the parameter -> partition address records DeepSpeed keeps on each parameter (``_hp_mapping``) at stages 1
and 2, or by ZeRO-3's rule (each parameter cut in DP equal slices) at stage 3, as DeepSpeed's own
universal-checkpoint loaders do.

Random states. A rank's random streams belong to its place in the old layout (the tensor-parallel stream
is seeded by the TP rank, dropout differs per DP replica and stage) and have no counterpart in the new
one, so they are not mapped: the resumed run re-seeds every rank exactly as a fresh run at the new layout
seeds it, from ``training.seed + step``. Resuming is therefore deterministic (two resumes of one universal
checkpoint agree) and, without dropout, continues exactly; with dropout the masks differ from those the
old layout would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.files import CheckpointError
from megatron_glm.checkpoint.layout import (
    WORD_EMBEDDINGS,
    fit_vocab,
    full_shape,
    pipeline_key_to_thudm,
    split_tensor,
)
from megatron_glm.log import get_logger
from megatron_glm.parallel import state as parallel_state

logger = get_logger("checkpoint")

UNIVERSAL_SUBDIR = "universal"
STATE_FILE = "state.json"
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def state_file(directory: Path, state: str) -> Path:
    return directory / f"{state}.safetensors"


def is_universal(tag_dir: Path) -> bool:
    return (tag_dir / UNIVERSAL_SUBDIR / STATE_FILE).is_file()


def read_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / UNIVERSAL_SUBDIR / STATE_FILE).read_text())


def _partition_owner(optimizer) -> tuple[Any, list[torch.Tensor]] | None:
    """The base optimizer and its flat fp32 partitions, for DeepSpeed's flattening optimizers."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO 1 and 2
        return optimizer.optimizer, optimizer.single_partition_of_fp32_groups
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 at ZeRO stage 1)
        return optimizer.optimizer, optimizer.fp32_groups_flat_partition
    return None


@torch.no_grad()
def load_universal(engine, tag_dir: Path, *, num_layers: int, vocab_multiple: int) -> dict[str, Any]:
    """Load the universal checkpoint ``tag_dir`` into the DeepSpeed ``engine``; returns the client state."""
    from safetensors import safe_open

    universal = tag_dir / UNIVERSAL_SUBDIR
    counters = read_state(tag_dir)
    for name in STATES:
        if not state_file(universal, name).is_file():
            raise CheckpointError(f"{state_file(universal, name)}: missing; copy the complete {tag_dir}")
    files = {name: safe_open(str(state_file(universal, name)), framework="pt") for name in STATES}
    pipeline = hasattr(engine, "train_batch") and hasattr(engine, "num_stages")
    optimizer = engine.optimizer
    zero3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
    owner = _partition_owner(optimizer)
    plain = owner is None and not zero3 and isinstance(optimizer, torch.optim.Optimizer)
    if owner is None and not zero3 and not plain:
        raise CheckpointError(
            f"{tag_dir}: a universal checkpoint loads into a torch optimizer (ZeRO-0) or DeepSpeed's ZeRO stage "
            f"1, 2 or 3 optimizer, this job runs {type(optimizer).__name__}"
        )
    tp_rank = parallel_state.get_tensor_parallel_rank()
    tp_size = parallel_state.get_tensor_parallel_world_size()
    # Two paddings of one vocabulary differ by less than multiple x the larger TP size (layout.fit_vocab).
    max_parallel = max(tp_size, int(counters["source_layout"]["tensor_parallel_size"]))
    adam_step = float(counters["adam_step"])
    stored = set(files["fp32"].keys())

    def local_states(name: str, local_shape: torch.Size) -> dict[str, torch.Tensor]:
        """This rank's tensor-parallel shard of every state of parameter ``name``."""
        key = pipeline_key_to_thudm(name, num_layers) if pipeline else name
        if key not in stored:
            raise CheckpointError(
                f"{universal}: no tensor {key} (for parameter {name}); the model config differs"
            )
        expected = full_shape(local_shape, key, tp_size)
        local = {}
        for state in STATES:
            full = files[state].get_tensor(key)
            if key == WORD_EMBEDDINGS:
                full = fit_vocab(full, expected[0], max_parallel, vocab_multiple, str(universal))
            if tuple(full.shape) != expected:
                raise CheckpointError(
                    f"{key}: shape {tuple(full.shape)} in {universal}, the model expects {expected} (hidden "
                    "size, layer count or position table size differ from the checkpoint's config.yaml)"
                )
            local[state] = split_tensor(full, key, tp_rank, tp_size)
        return local

    if zero3:
        _load_zero3(engine, local_states, adam_step)
    elif plain:  # ZeRO-0: the torch optimizer itself, with its state per parameter
        for name, param in engine.module.named_parameters():
            local = {state: t.to(param.device) for state, t in local_states(name, param.shape).items()}
            param.data.copy_(local["fp32"].to(param.dtype))
            optimizer.state[param].update(
                step=torch.tensor(adam_step, dtype=torch.float32, device=param.device),
                exp_avg=local["exp_avg"].to(param.dtype).contiguous(),
                exp_avg_sq=local["exp_avg_sq"].to(param.dtype).contiguous(),
            )
    else:
        base, flats = owner
        for name, param in engine.module.named_parameters():
            local = {state: t.to(param.device) for state, t in local_states(name, param.shape).items()}
            param.data.copy_(local["fp32"].to(param.dtype))
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # none of this parameter lies in this rank's partition
                continue
            flat = flats[mapping.param_group_index]
            state = base.state[flat]
            if not state:
                state.update(
                    step=torch.tensor(adam_step, dtype=torch.float32, device=flat.device),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for name_, target in (
                ("fp32", flat),
                ("exp_avg", state["exp_avg"]),
                ("exp_avg_sq", state["exp_avg_sq"]),
            ):
                source = local[name_].reshape(-1).narrow(0, lp.start, lp.numel)
                target.narrow(0, hp.start, hp.numel).copy_(source)
    if engine.lr_scheduler is not None and counters.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    logger.info(
        "resumed from universal checkpoint %s (resharded from TP %s x PP %s)",
        tag_dir,
        counters["source_layout"]["tensor_parallel_size"],
        counters["source_layout"]["pipeline_parallel_size"],
    )
    return dict(counters["client_state"])


def _load_zero3(engine, local_states, adam_step: float) -> None:
    """Fill DeepSpeed's ZeRO-3 partitions: each parameter sub-group's flat fp32 partition (and Adam's moments)
    is the concatenation of this rank's ``ceil(numel / DP)``-element slice of each of its parameters (zero-padded
    at the end), as DeepSpeed's own universal loader lays it; the bit16 partitions are copied from it."""
    import torch.distributed as dist

    optimizer = engine.optimizer
    names = {param: name for name, param in engine.module.named_parameters()}
    rank, world = (
        dist.get_rank(group=optimizer.dp_process_group),
        dist.get_world_size(group=optimizer.dp_process_group),
    )
    for group_index, group in enumerate(optimizer.fp16_groups):
        flat = optimizer.fp32_partitioned_groups_flat[group_index]
        filled = {state: torch.zeros_like(flat) for state in STATES}
        offset = 0
        for param in group:
            local = local_states(names[param], param.ds_shape)
            part = param.partition_numel()
            for state, tensor in local.items():
                values = tensor.reshape(-1).to(flat.device, torch.float32)
                values = torch.nn.functional.pad(values, (0, world * part - values.numel()))
                filled[state].narrow(0, offset, part).copy_(values.narrow(0, rank * part, part))
            offset += part
        if offset != flat.numel():
            raise CheckpointError(
                f"ZeRO-3 sub-group {group_index}: {offset} values loaded, the partition has {flat.numel()}"
            )
        flat.data.copy_(filled["fp32"])
        optimizer.optimizer.state[flat].update(
            step=torch.tensor(adam_step, dtype=torch.float32, device=flat.device),
            exp_avg=filled["exp_avg"],
            exp_avg_sq=filled["exp_avg_sq"],
        )
        bit16 = optimizer.fp16_partitioned_groups_flat[group_index]
        bit16.data.copy_(flat.data)
        partitions = optimizer.fp16_partitioned_groups[group_index]
        for partition, values in zip(partitions, optimizer.unflatten(bit16, partitions)):
            partition.data = values.data


def reseed(tag_dir: Path) -> None:
    """Seed this rank's random streams as a fresh run at the current layout does, from the universal seed."""
    seed = int(read_state(tag_dir)["seed"])
    pp = parallel_state.get_pipeline_parallel_rank()
    dp = parallel_state.get_data_parallel_rank()
    # The same per-rank offsets as glm-pretrain's start (trainer._pretrain).
    parallel_state.seed_parallel_rng(seed + 100 * pp + 1000 * dp)
    logger.info("random states re-seeded from seed %d (a universal checkpoint carries none per rank)", seed)
