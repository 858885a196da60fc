"""The model is built in the training dtype, bitwise as DeepSpeed's cast of the fp32-built model leaves it.

Every initializer draws in fp32 and copies into the parameter (one rounding to nearest even), so the bf16 and
fp16 models built directly hold exactly the fp32 model's values cast, at TP = 1 and TP = 2, for the
pretraining model and for the pipeline's pieces; a THUDM checkpoint (fp32 or fp16) loaded into them rounds
as a load into fp32 then the cast. DeepSpeed then trains the directly built bf16 model bitwise as it trains
the cast fp32 one: the losses, gradient norms and fp32 master weights of a few steps are equal at one rank
(ZeRO-1), PP = 2 (ZeRO-1) and DP = 2 (ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from tests.multiproc import run_ranks
from tests.tiny_glm import TINY, TINY_SETTINGS, engine_batches

SEED = 7
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Tensor sizes that are not multiples of 16: torch's CPU normal_ draws the tail of such a tensor differently
# in bf16/fp16 than in fp32, so a draw straight into a low-precision parameter would show here.
ODD_VOCAB = 250
ODD = dataclasses.replace(TINY, hidden_size=36, vocab_size=ODD_VOCAB)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # DeepSpeed's cast of an fp32 module to the training dtype: p.data = p.data.to(dtype) per parameter.
    return {key: value.to(dtype) for key, value in state.items()}


def _bitwise_equal(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors differ in dtype or in any bit."""
    assert ours.keys() == reference.keys()
    return [
        k for k in reference if ours[k].dtype != reference[k].dtype or not torch.equal(ours[k], reference[k])
    ]


def _pipeline_pieces(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from megatron_glm.training.pipeline import (
        FinalLayerNormPipe,
        PositionEmbeddingPipe,
        TransformerLayerPipe,
        WordEmbeddingPipe,
    )

    pieces = {
        "word": WordEmbeddingPipe(ODD, ODD_VOCAB, SEED, dtype),
        "position": PositionEmbeddingPipe(ODD, SEED, dtype),
        "layer1": TransformerLayerPipe(ODD, 1, SEED, dtype),
        "final": FinalLayerNormPipe(ODD, dtype),
    }
    return {
        f"{name}.{key}": value for name, piece in pieces.items() for key, value in piece.state_dict().items()
    }


def _built_in_training_dtype(rank: int, world_size: int, root) -> dict:
    from megatron_glm import parallel
    from megatron_glm.checkpoint import load_thudm_checkpoint, save_thudm_checkpoint
    from megatron_glm.model import GLMLoss
    from megatron_glm.training.engine import build_pretraining_model

    parallel.initialize_parallel(world_size, 1)

    def build(dtype: torch.dtype, seed: int = SEED):
        return build_pretraining_model(
            ODD, ODD_VOCAB, seed=seed, loss=GLMLoss(), device=torch.device("cpu"), dtype=dtype
        )

    fp32 = build(torch.float32)
    fp32_state = fp32.state_dict()
    # Checkpoints of another seed's weights, in fp32 and in fp16 (the released THUDM files are fp16).
    other = build(torch.float32, seed=SEED + 1)
    save_thudm_checkpoint(other, root / "fp32")
    save_thudm_checkpoint(other.half(), root / "fp16")
    results = {
        # The test compares rounded values: the fp32 weights are not all representable in bf16.
        "fp32_needs_rounding": not torch.equal(
            fp32_state["word_embeddings.weight"],
            fp32_state["word_embeddings.weight"].bfloat16().float(),
        )
    }
    for dtype in LOW_PRECISION:
        name = str(dtype).removeprefix("torch.")
        direct = build(dtype)
        results[f"{name} model"] = _bitwise_equal(direct.state_dict(), _cast(fp32_state, dtype))
        # to_empty keeps the tensor-parallel marks that DeepSpeed reads for the gradient norm.
        results[f"{name} marks"] = [
            n
            for (n, p), q in zip(direct.named_parameters(), fp32.parameters())
            if getattr(p, "tensor_model_parallel", False) != getattr(q, "tensor_model_parallel", False)
        ]
        results[f"{name} pipeline"] = _bitwise_equal(
            _pipeline_pieces(dtype), _cast(_pipeline_pieces(torch.float32), dtype)
        )
        for source in ("fp32", "fp16"):
            loaded, reference = build(dtype), build(torch.float32)
            load_thudm_checkpoint(loaded, root / source)
            load_thudm_checkpoint(reference, root / source)
            results[f"{name} from {source} checkpoint"] = _bitwise_equal(
                loaded.state_dict(), _cast(reference.state_dict(), dtype)
            )
    parallel.destroy_parallel()
    return results


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_model_built_in_bf16_and_fp16_is_the_fp32_model_cast(tmp_path, tensor_parallel_size):
    for rank, results in enumerate(run_ranks(_built_in_training_dtype, tensor_parallel_size, tmp_path)):
        assert results.pop("fp32_needs_rounding"), rank
        for what, differing in results.items():
            assert differing == [], f"rank {rank}, {what}: {differing}"


STEPS = 3


def _train(rank: int, world_size: int, settings: list[str], build_in_fp32: bool) -> dict:
    """``STEPS`` bf16 steps of ``TrainingEngine`` on hand-built batches; with ``build_in_fp32`` the model is
    built in fp32 and cast by DeepSpeed (what the engine did before it built in the training dtype)."""
    import deepspeed

    from megatron_glm import parallel
    from megatron_glm.config import load_config, padded_vocab_size, parallel_layout
    from megatron_glm.training import engine as engine_module

    overrides = [
        *TINY_SETTINGS,
        "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0",
        "training.precision=bf16",
        "training.micro_batch_size=2",
        f"training.train_steps={STEPS}",
        "optimizer.lr=1e-2",
        "lr_schedule.warmup_fraction=0.0",
        *settings,
    ]
    # The pipeline engine asks DeepSpeed's communication layer for ranks: it wraps the gloo group up here.
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config(None, overrides)
    layout = parallel_layout(cfg, world_size)
    parallel.initialize_parallel(layout.tensor_parallel_size, layout.pipeline_parallel_size)
    built_dtypes = set()
    build_model, build_pipeline = engine_module.build_pretraining_model, engine_module.build_pipeline_module

    def built(module: torch.nn.Module) -> torch.nn.Module:
        built_dtypes.update(p.dtype for p in module.parameters())
        return module

    def model_in_build_dtype(*args, dtype, **kwargs):
        return built(build_model(*args, dtype=torch.float32 if build_in_fp32 else dtype, **kwargs))

    def pipeline_in_build_dtype(*args):
        *args, dtype = args
        module, output_head = build_pipeline(*args, torch.float32 if build_in_fp32 else dtype)
        return built(module), output_head

    engine_module.build_pretraining_model = model_in_build_dtype
    engine_module.build_pipeline_module = pipeline_in_build_dtype
    engine = engine_module.TrainingEngine(
        cfg, layout, padded_vocab_size(cfg.model, layout.tensor_parallel_size), torch.device("cpu")
    )
    trained_dtypes = {p.dtype for p in engine.module.parameters()}
    micro_batches = engine_batches(parallel.get_data_parallel_rank())
    losses, norms = [], []
    for _ in range(STEPS):
        result = engine.train_step(micro_batches)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    optimizer = engine.deepspeed_engine.optimizer
    master = getattr(optimizer, "fp32_groups_flat_partition", None) or optimizer.fp32_partitioned_groups_flat
    result = {
        # The pipeline's last stage ran a forward for every micro-batch whose loss rows it queued.
        "queued_loss_indices": len(engine.output_head.pending) if engine.pipeline else 0,
        "built_dtypes": built_dtypes,
        "trained_dtypes": trained_dtypes,
        "losses": losses,
        "norms": norms,
        "master": [m.detach().clone() for m in master],
        # What DeepSpeed's Muon imports (torch.compile), seconds of every rank's start for an optimizer never used.
        "inductor_imported": "torch._inductor.compile_fx" in sys.modules,
        # What torch's optimizer wrappers import for torch.compile (ZeRO-3's hooks import it for themselves).
        "dynamo_imported": "torch._dynamo" in sys.modules,
    }
    parallel.destroy_parallel()
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size, settings",
    [
        (1, ["parallel.zero_stage=1", "training.global_batch_size=4"]),
        (2, ["parallel.zero_stage=1", "parallel.pipeline_parallel_size=2", "training.global_batch_size=4"]),
        (2, ["parallel.zero_stage=3", "training.global_batch_size=8"]),
    ],
    ids=["one-rank-zero1", "pp2-zero1", "dp2-zero3"],
)
def test_bf16_training_of_the_model_built_in_bf16_is_bitwise_that_of_the_cast_fp32_model(
    world_size, settings
):
    ours = run_ranks(_train, world_size, settings, False)
    reference = run_ranks(_train, world_size, settings, True)
    for rank, (mine, theirs) in enumerate(zip(ours, reference)):
        assert mine["built_dtypes"] == {torch.bfloat16} and theirs["built_dtypes"] == {torch.float32}, rank
        assert mine["trained_dtypes"] == theirs["trained_dtypes"] == {torch.bfloat16}, rank
        assert mine["queued_loss_indices"] == theirs["queued_loss_indices"] == 0, rank
        assert not mine["inductor_imported"], "building and training the engine imported Inductor's compiler"
        if "parallel.zero_stage=1" in settings:
            assert not mine["dynamo_imported"], "building and training the engine imported TorchDynamo"
        assert mine["losses"] == theirs["losses"], rank
        assert mine["norms"] == theirs["norms"], rank
        assert len(mine["master"]) == len(theirs["master"]) > 0, rank
        for a, b in zip(mine["master"], theirs["master"]):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), rank
    # The steps updated the weights: the loss moved.
    assert ours[-1]["losses"][-1] != ours[-1]["losses"][0]
