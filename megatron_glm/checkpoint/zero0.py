"""ZeRO-0 checkpoints: which parameter each entry of the plain torch optimizer's state belongs to.

At ZeRO stage 0 DeepSpeed keeps our client optimizer (``GuardedAdamW``, a torch AdamW) as it is and saves its
``state_dict()`` under ``'optimizer'`` in every ``mp_rank_XX_model_states.pt``: Adam's ``exp_avg``,
``exp_avg_sq`` and ``step`` per parameter, indexed in parameter-group order, with no parameter names. The
weights themselves are the fp32 masters (ZeRO-0 trains in fp32 only): under ``'module'`` in the same file, or,
with pipeline parallelism, in the per-layer files ``layer_LL-model_XX-model_states.pt``.

The names are recovered by rebuilding the optimizer's parameter order exactly as glm-pretrain built it:
``weight_decay_param_groups`` over the module (decayed parameters, then biases and LayerNorm parameters, each in
``named_parameters`` order). The decay split is taken from GLM built on ``meta`` (nothing allocated); the order
within a module from its saved state dict (the same traversal as ``named_parameters``); a pipeline stage's
module from DeepSpeed's own partition rule (``PipelineModule._partition_layers``: tied modules first, then the
stage's layers by index). Every entry's shape is checked against its parameter's, so a mismatch is refused
rather than mapped wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.files import CheckpointError
from megatron_glm.config import GLMConfig

# The tie key and attribute of the word embeddings in our PipelineModule (training/pipeline.py).
TIED_EMBEDDINGS = "tied_modules.word_embeddings.word_embeddings.weight"


def layer_file_name(layer: int, tensor_parallel_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tensor_parallel_rank:02d}-model_states.pt"


def no_decay_keys(config: GLMConfig) -> set[str]:
    """THUDM keys of the parameters glm-pretrain's optimizer puts in the no-weight-decay group."""
    from megatron_glm.model import GLMModel
    from megatron_glm.parallel import state as parallel_state
    from megatron_glm.training.optimizer import weight_decay_param_groups

    # Names and module types do not depend on the tensor-parallel size: build at TP 1 on meta.
    owned = not parallel_state.is_initialized()
    if owned:
        parallel_state.initialize_parallel(1, 1)
    try:
        # The table size changes no name either (any positive size builds on meta).
        model = GLMModel(config.model, 128, device="meta")
        names = {id(p): n for n, p in model.named_parameters()}
        groups = weight_decay_param_groups(model, 1.0)
    finally:
        if owned:
            parallel_state.destroy_parallel()
    return {names[id(p)] for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}


def _stage_layers(config: GLMConfig, stage: int, layer_numels: dict[int, int]) -> range:
    """The global layer indices of pipeline ``stage`` (DeepSpeed's partition of our layer list)."""
    from deepspeed.runtime import utils as ds_utils

    layers = config.model.num_layers
    count = layers + 4  # word embeddings, position tables, the layers, final LayerNorm, tied output head
    stages = config.parallel.pipeline_parallel_size
    if config.parallel.pipeline_partition == "uniform":  # "type:TransformerLayerPipe"
        parts = ds_utils.partition_balanced(
            weights=[int(2 <= i <= layers + 1) for i in range(count)], num_parts=stages
        )
    else:  # "parameters": the output head counts the tied embedding again, as DeepSpeed builds it
        numels = [layer_numels.get(i, 0) for i in range(count)]
        numels[count - 1] = layer_numels[0]
        parts = ds_utils.partition_balanced(weights=numels, num_parts=stages)
    return range(parts[stage], parts[stage + 1])


def optimizer_entries(
    config: GLMConfig,
    tag_dir: Path,
    mp: int,
    model: dict[str, Any],
    load: Callable[[str], dict[str, Any]],
    no_decay: set[str],
    thudm_key: Callable[[str], str],
) -> list[tuple[str, tuple[int, ...]]]:
    """``[(parameter name, shape)]`` of slice ``mp``'s optimizer state entries, in index order."""
    tp = config.parallel.tensor_parallel_size
    if config.parallel.pipeline_parallel_size == 1:
        module = model.get("module") or {}
        buffers = set(model.get("buffer_names") or ())
        ordered = [(name, tuple(t.shape)) for name, t in module.items() if name not in buffers]
    else:
        stage, tp_rank = divmod(mp, tp)
        numels, layers = {}, {}
        index = 0
        while (tag_dir / layer_file_name(index, tp_rank)).is_file():
            layers[index] = load(layer_file_name(index, tp_rank))
            numels[index] = sum(t.numel() for t in layers[index].values())
            index += 1
        span = _stage_layers(config, stage, numels)
        last = config.model.num_layers + 3
        ordered = []
        if 0 in span or last in span:  # the tied module is registered before the stage's other layers
            ordered.append((TIED_EMBEDDINGS, tuple(layers[0]["word_embeddings.weight"].shape)))
        for layer in span:
            if layer in (0, last):
                continue
            if layer not in layers:
                raise CheckpointError(f"{tag_dir / layer_file_name(layer, tp_rank)}: missing")
            ordered += [(f"{layer}.{name}", tuple(t.shape)) for name, t in layers[layer].items()]
    decay = [entry for entry in ordered if thudm_key(entry[0]) not in no_decay]
    entries = decay + [entry for entry in ordered if thudm_key(entry[0]) in no_decay]
    optim = model["optimizer"]
    sizes = [len(group["params"]) for group in optim["param_groups"]]
    expected = [n for n in (len(decay), len(entries) - len(decay)) if n]
    if sizes != expected:
        raise CheckpointError(
            f"{tag_dir}: slice {mp}'s optimizer has parameter groups of {sizes} parameters, the model "
            f"{expected}; the checkpoint was not written by glm-pretrain's AdamW"
        )
    for index, (name, shape) in enumerate(entries):
        state = optim["state"].get(index)
        if state is None or tuple(state["exp_avg"].shape) != shape:
            found = None if state is None else tuple(state["exp_avg"].shape)
            raise CheckpointError(
                f"{tag_dir}: optimizer entry {index} of slice {mp} has shape {found}, parameter {name} {shape}; "
                "the optimizer state is not this model's (or no step was taken before the checkpoint)"
            )
    return entries


def fp32_weight(mp: int, tp: int, name: str, model: dict, load: Callable[[str], dict]) -> torch.Tensor:
    """The saved (fp32 master) weight of parameter ``name`` of slice ``mp``."""
    if "." in name and name.partition(".")[0].isdigit():  # a pipeline layer: its own file
        layer, _, key = name.partition(".")
        return load(layer_file_name(int(layer), mp % tp))[key]
    if name == TIED_EMBEDDINGS:
        return load(layer_file_name(0, mp % tp))["word_embeddings.weight"]
    return model["module"][name]
