"""The DeepSpeed engine around GLM: ZeRO 0-3 without pipeline parallelism, PipelineEngine (ZeRO-1) with it.

``TrainingEngine`` hides the two modes behind ``train_step`` / ``evaluate``: both take an iterator of
micro-batches (the batch dicts of ``megatron_glm.data``) and consume ``gradient_accumulation_steps`` of
them per call.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.profiler import record_function

from megatron_glm.checkpoint import load_thudm_checkpoint, pipeline_key_to_thudm, write_training_weights
from megatron_glm.config import GLMConfig, Layout, ModelConfig, uses_cuda_graphs
from megatron_glm.log import get_logger
from megatron_glm.model import GLMLoss, GLMModel, loss_rows
from megatron_glm.model.cuda_graphs import enable_layer_graphs
from megatron_glm.parallel import (
    DeepSpeedMPU,
    get_data_parallel_group,
    get_pipeline_parallel_group,
    get_pipeline_parallel_world_size,
)
from megatron_glm.training.fused_bf16 import fuse_bf16_optimizer, skip_single_rank_allreduce
from megatron_glm.training.fused_zero import fuse_zero_optimizer
from megatron_glm.training.lr_schedule import AnnealingLR
from megatron_glm.training.metrics import HostScalars
from megatron_glm.training.optimizer import GuardedAdamW, SkipDecision, build_optimizer
from megatron_glm.training.pipeline import build_pipeline_module

logger = get_logger("engine")

Batch = dict[str, torch.Tensor]


class GLMForPretraining(GLMModel):
    """GLM whose forward returns the pretraining loss, so every weight use happens inside the engine's
    forward (ZeRO-3 gathers partitioned weights there). Parameter names stay THUDM's."""

    def __init__(self, *args, loss: GLMLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss = loss

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        sep: torch.Tensor,
        targets: torch.Tensor,
        loss_mask: torch.Tensor,
        objective: torch.Tensor,
        loss_index: torch.Tensor,
    ) -> torch.Tensor:
        hidden = super().forward(tokens, position_ids, sep)
        labels = (targets, loss_mask, objective, loss_index)
        return self.loss(self.logits(loss_rows(hidden, loss_index)), labels)


# The parameters' dtype under each ``training.precision``.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_pretraining_model(
    config: ModelConfig,
    vocab_size: int,
    *,
    seed: int,
    loss: GLMLoss,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> GLMForPretraining:
    """``GLMForPretraining`` built on ``meta`` and initialized in place on ``device`` in ``dtype``.

    No full fp32 copy of the model is made in host RAM (a 10B model would need 40 GB per rank), nor on the
    device under bf16/fp16 (DeepSpeed would otherwise hold the fp32 model there before casting it). The
    initialization draws from the same per-key CPU generators as a model built directly, so the weights
    are identical at every parallel size and on every device; it draws in fp32 and copies into the
    parameter, so a bf16 or fp16 model holds the fp32 model's values rounded once to nearest even:
    bitwise what DeepSpeed's cast of the fp32 model gives.
    """
    module = GLMForPretraining(config, vocab_size, seed=seed, loss=loss, device="meta", dtype=dtype)
    module.to_empty(device=device)
    module.reset_parameters(seed)
    return module


# DeepSpeed's Muon modules, which its ZeRO and BF16 optimizers import to ask whether the optimizer is Muon.
_DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
_DEEPSPEED_MUON_UPDATE = "deepspeed.runtime.zero.muon.original_muon"


def _muon_update(*args, **kwargs):
    raise RuntimeError("megatron-glm's engine trains with its own AdamW; DeepSpeed's Muon is not loaded here")


def _stand_in_for_deepspeed_muon() -> None:
    """Put stand-ins for DeepSpeed's two Muon modules in ``sys.modules``, unless either is imported already.

    ``deepspeed.initialize`` with ZeRO, DeepSpeed's BF16 optimizer, and ZeRO-1/2's gradient reduction on every
    step import them, to ask ``isinstance(optimizer, MuonWithAuxAdam)`` and to have ``muon_update`` at hand for
    parameters marked ``use_muon`` under a Muon optimizer. Importing them decorates Muon's functions with
    ``torch.compile``, which imports Inductor: some 2.5 s of every rank's start on a CPU, for an optimizer that
    this engine never builds (it passes its own ``GuardedAdamW`` and names no optimizer in DeepSpeed's
    config). The stand-ins' ``MuonWithAuxAdam`` is a class no optimizer is an instance of, so every check
    answers as with the real modules, and their ``muon_update``, which only a Muon optimizer reaches, raises.
    """
    if _DEEPSPEED_MUON in sys.modules or _DEEPSPEED_MUON_UPDATE in sys.modules:
        return
    optimizer = types.ModuleType(_DEEPSPEED_MUON, "megatron-glm's stand-in: DeepSpeed's Muon is not used")
    optimizer.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {"__module__": _DEEPSPEED_MUON})
    update = types.ModuleType(_DEEPSPEED_MUON_UPDATE, "megatron-glm's stand-in: DeepSpeed's Muon is not used")
    update.muon_update = _muon_update
    sys.modules[_DEEPSPEED_MUON] = optimizer
    sys.modules[_DEEPSPEED_MUON_UPDATE] = update


@contextlib.contextmanager
def _without_forced_memory_reports() -> Iterator[None]:
    """Within: DeepSpeed's BF16 optimizer does not print its memory reports.

    Its constructor calls ``see_memory_usage(..., force=True)`` before and after building each parameter group:
    on rank 0, a ``gc.collect()`` (0.15 s each on a CPU in a process that has imported TorchDynamo) and three
    lines on standard output ("MA 0.0 GB Max_MA ..."), in the middle of the training log, whose metrics
    report the GPU's peak memory.
    """
    from deepspeed.runtime import bf16_optimizer

    report = getattr(bf16_optimizer, "see_memory_usage", None)
    if report is None:
        yield
        return
    bf16_optimizer.see_memory_usage = lambda message, force=False: None
    try:
        yield
    finally:
        bf16_optimizer.see_memory_usage = report


def deepspeed_config(cfg: GLMConfig, layout: Layout, cuda: bool | None = None) -> dict:
    """DeepSpeed's configuration for ``cfg`` (``cuda``: whether the ranks train on GPUs; default: present)."""
    t = cfg.training
    cuda = torch.cuda.is_available() if cuda is None else cuda
    overlap = cfg.parallel.overlap_comm
    if overlap is None:
        # DeepSpeed's overlapped reduction synchronizes the whole device before each bucket's reduction and at
        # the end of the backward. That pays where there is communication to hide; over one data-parallel rank
        # there is none, and each sync only makes the host wait for the GPU instead of queueing ahead.
        overlap = cuda and layout.data_parallel_size > 1
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": overlap,
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
            "initial_scale_power": 16,
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at the start of every micro-batch's forward and
        # at the end of every step, for a samples/s figure it prints every steps_per_print steps (never,
        # here): the host then cannot queue the next step while the GPU finishes this one. glm-pretrain
        # measures its own throughput.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "dump_state": False,
    }
    if t.precision == "bf16":
        # Accumulate micro-batch gradients in fp32 (ZeRO-1: DeepSpeed's BF16 optimizer; ZeRO-2/3: an fp32
        # accumulator) rather than in bf16 over up to hundreds of micro-batches, and reduce them over the
        # data-parallel ranks in fp32 too, as Megatron-LM does under bf16: DeepSpeed's default for bf16 would
        # round the fp32 accumulators to bf16 for the all-reduce and write the rounded sums back.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    if layout.pipeline_parallel_size > 1:
        # Each stage runs each layer's forward once per micro-batch (pipeline.OutputHead relies on it).
        config["pipeline"] = {"activation_checkpoint_interval": 0}
    return config


def single_replica_zero_warning(cfg: GLMConfig, layout: Layout) -> str | None:
    """A warning for ZeRO-2 over one data-parallel rank, where it partitions nothing and costs time; None
    otherwise."""
    if cfg.parallel.zero_stage != 2 or layout.data_parallel_size != 1:
        return None
    return (
        f"parallel.zero_stage=2 over one data-parallel rank (tp {layout.tensor_parallel_size} x pp "
        f"{layout.pipeline_parallel_size} x dp 1) partitions nothing: it only adds its per-gradient hooks and "
        "bucketed reduction to every step (glm-large trained 2.3x slower than under ZeRO-1 on one H200). Set "
        "parallel.zero_stage=1 for runs with one data-parallel rank; stage 2 divides the gradients' memory over "
        "several."
    )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepResult:
    """What one optimizer step reports, none of it read from the device when ``train_step`` returns: ``loss``
    (the mean over the micro-batches and data-parallel replicas) and ``grad_norm`` are on their way to the host
    (``HostScalars``), ``skipped`` (the update was not applied: a non-finite loss or gradients, or an fp16
    overflow) is the optimizer's device verdict (``SkipDecision``), and ``lr`` (where the schedule stands after
    the step) follows from it. Reading any of them waits for the end of the step, and nothing launched after
    it."""

    def __init__(
        self, scalars: HostScalars, decision: SkipDecision | None, overflow: bool, scheduler: AnnealingLR
    ) -> None:
        self._scalars = scalars
        self._decision = decision
        self._overflow = overflow  # DeepSpeed's own check skipped the update: known at once
        # Without a verdict of ours the schedule already stands where this step left it.
        self._lr = scheduler.get_lr() if decision is None else None

    @property
    def loss(self) -> float:
        return self._scalars.values()[0]

    @property
    def grad_norm(self) -> float | None:
        return self._scalars.values()[1]

    @property
    def skipped(self) -> bool:
        return self._overflow or (self._decision is not None and self._decision.skipped)

    @property
    def lr(self) -> float:
        return self._lr if self._decision is None else self._decision.lr


class TrainingEngine:
    """The DeepSpeed engine of one rank: GLM (or its pipeline stage), AdamW and the schedule on ``device``.

    ``train_step`` and ``evaluate`` consume micro-batches from an iterator; ``write_thudm_weights`` adds
    the THUDM-layout weights to a checkpoint where DeepSpeed's own files are not in that layout.
    """

    def __init__(self, cfg: GLMConfig, layout: Layout, vocab_size: int, device: torch.device):
        self.cfg = cfg
        self.layout = layout
        self.pipeline = layout.pipeline_parallel_size > 1
        self.loss = GLMLoss(kernels=cfg.model.kernels)
        seed = cfg.training.seed
        # Built in the training dtype, as DeepSpeed would cast it (see build_pretraining_model); a checkpoint
        # loaded into it (init_from) rounds once from its stored values, as a load then the cast would.
        dtype = PRECISION_DTYPES[cfg.training.precision]
        if self.pipeline:
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

            topology = PipeModelDataParallelTopology(
                num_pp=layout.pipeline_parallel_size,
                num_mp=layout.tensor_parallel_size,
                num_dp=layout.data_parallel_size,
            )
            module, self.output_head = build_pipeline_module(
                cfg.model, vocab_size, seed, topology, self.loss, cfg.parallel.pipeline_partition, dtype
            )
            if cfg.checkpoint.init_from:
                layers = cfg.model.num_layers
                load_thudm_checkpoint(
                    module,
                    cfg.checkpoint.init_from,
                    thudm_key=lambda k: pipeline_key_to_thudm(k, layers),
                    vocab_multiple=cfg.model.make_vocab_size_divisible_by,
                )
        else:
            module = build_pretraining_model(
                cfg.model, vocab_size, seed=seed, loss=self.loss, device=device, dtype=dtype
            )
            if cfg.checkpoint.init_from:
                load_thudm_checkpoint(module, cfg.checkpoint.init_from)
            if uses_cuda_graphs(cfg, device.type):
                enable_layer_graphs(module.transformer)
        optimizer = build_optimizer(module, cfg.optimizer, check_gradients=self.pipeline)
        scheduler = AnnealingLR(optimizer, cfg.optimizer.lr, cfg.lr_schedule, cfg.training.train_steps)
        self.optimizer: GuardedAdamW = optimizer
        optimizer.on_resolved = self._on_resolved
        kwargs = {} if self.pipeline else {"mpu": DeepSpeedMPU()}
        if device.type == "cuda":
            # DeepSpeed would take cuda:LOCAL_RANK, which is not our GPU where each rank sees only its own.
            kwargs["args"] = argparse.Namespace(device_rank=device.index)
        _stand_in_for_deepspeed_muon()
        with _without_forced_memory_reports():
            self.deepspeed_engine, _, _, self.scheduler = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(cfg, layout),
                **kwargs,
            )
        self.device = self.deepspeed_engine.device
        if fuse_bf16_optimizer(self.deepspeed_engine.optimizer):
            logger.debug("DeepSpeed's BF16 optimizer runs its gradient loops as foreach operations")
        if fuse_zero_optimizer(self.deepspeed_engine.optimizer):
            logger.debug("DeepSpeed's ZeRO optimizer takes its gradient norm as one foreach operation")
        if skip_single_rank_allreduce(self.deepspeed_engine, layout.data_parallel_size):
            logger.debug("one data-parallel rank: DeepSpeed's gradient all-reduce (an identity) is off")

    @property
    def module(self) -> torch.nn.Module:
        return self.deepspeed_engine.module

    @property
    def writes_thudm_layout(self) -> bool:
        """Whether DeepSpeed's own ``mp_rank_XX_model_states.pt`` holds the model under THUDM's keys."""
        return not self.pipeline and self.cfg.parallel.zero_stage < 3

    @torch.no_grad()
    def write_thudm_weights(self, checkpoint_dir: Path) -> None:
        """Write ``<checkpoint_dir>/thudm/mp_rank_XX_model_states.pt`` (THUDM keys, one file per tensor rank)
        for pipeline-parallel and ZeRO-3 checkpoints; a collective, a no-op when DeepSpeed's files suffice."""
        if not self.writes_thudm_layout:
            write_training_weights(
                self.module, checkpoint_dir, pipeline=self.pipeline, num_layers=self.cfg.model.num_layers
            )

    # -- training -----------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Batch]) -> StepResult:
        self.deepspeed_engine.train()
        overflows_before = self.deepspeed_engine.skipped_steps
        self.optimizer.begin_step()
        if self.pipeline:
            loss = self.deepspeed_engine.train_batch(self._pipeline_iterator(batches)).float()
            return self._result(loss, overflows_before)
        steps = self.layout.gradient_accumulation_steps
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for micro in range(steps):
            # The phases are named for torch.profiler (logging.profile_steps); outside a profile they cost nothing.
            with record_function("glm.forward"):
                loss = self._forward(next(batches))
                total[0] += loss.detach().double()
            if micro == steps - 1:
                total[1] = (~torch.isfinite(total[0])).double()
                # Agree on finiteness before the update: every rank skips it together. The flag stays on
                # the device; the optimizer applies it there (GuardedAdamW), without the host reading it.
                dist.all_reduce(total)
                self.optimizer.skip_next = total[1] > 0
            with record_function("glm.backward"):
                self.deepspeed_engine.backward(loss)
            with record_function("glm.optimizer_step"):
                self.deepspeed_engine.step()
        # No .item(): the loop reads the loss once the next step is queued (StepResult, HostScalars).
        mean = total[0] / (steps * dist.get_world_size())
        return self._result(mean, overflows_before)

    def _result(self, loss: torch.Tensor, overflows_before: int) -> StepResult:
        # DeepSpeed's own checks (the fp16 loss scaler; under fp32 and fp16 ZeRO-1/2's finiteness test of the
        # norm) decide on the host, and then never call our optimizer. Under bf16 the verdict is ours.
        overflow = self.deepspeed_engine.skipped_steps != overflows_before
        # The gradient norm: a device tensor, a number (inf after an overflow) or None.
        norm = self.deepspeed_engine.get_global_grad_norm()
        decision = None if overflow else self.optimizer.last_decision
        return StepResult(HostScalars([loss, norm]), decision, overflow, self.scheduler)

    def _on_resolved(self, decision: SkipDecision) -> None:
        """The optimizer has read a step's verdict (at the next step's update at the latest, before it uses
        the learning rate). DeepSpeed advanced the schedule after the step, not knowing; THUDM/GLM steps the
        schedule only with an update, so a skipped step takes it back."""
        if decision.skipped:
            self.scheduler.step(-1)
        decision.lr = self.scheduler.get_lr()

    def _forward(self, batch: Batch) -> torch.Tensor:
        """The engine's forward on one micro-batch (``GLMForPretraining``: the loss)."""
        b = _to_device(batch, self.device)
        return self.deepspeed_engine(
            b["tokens"],
            b["position_ids"],
            b["sep"],
            b["targets"],
            b["loss_mask"],
            b["objective"],
            b["loss_index"],
        )

    def _pipeline_iterator(self, batches: Iterator[Batch]):
        """DeepSpeed's pipeline format: ``((tokens, position_ids, sep), labels)``, the labels those of
        ``GLMLoss``: ``(targets, loss_mask, objective, loss_index)``. Each batch is one micro-batch; on the last
        stage its ``loss_index`` (row-major over its ``[B, T]``, computed by the loader on the host) is queued
        for the output head as DeepSpeed loads it."""
        last_stage = self.deepspeed_engine.is_last_stage()
        # Whatever an interrupted batch left queued is not this batch's.
        self.output_head.pending.clear()
        for batch in batches:
            b = _to_device(batch, self.device)
            if last_stage:
                self.output_head.pending.append(b["loss_index"])
            yield (
                (b["tokens"], b["position_ids"], b["sep"]),
                (b["targets"], b["loss_mask"], b["objective"], b["loss_index"]),
            )

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterator[Batch], num_steps: int) -> torch.Tensor:
        """``[CE sum, token count]`` per objective over ``num_steps`` global batches, identical on every rank."""
        with self.loss.per_objective_sums():
            try:
                if self.pipeline:
                    sums = None
                    for _ in range(num_steps):
                        # eval_batch adds each micro-batch's loss to the engine's running total, which only
                        # train_batch resets; ours is a vector here, the last training step's a scalar.
                        self.deepspeed_engine.total_loss = None
                        out = self.deepspeed_engine.eval_batch(
                            self._pipeline_iterator(batches), bcast_loss=False
                        )
                        if out is not None:
                            sums = out if sums is None else sums + out
                    return _broadcast_from_last_stage(sums, self.device)
                self.deepspeed_engine.eval()
                sums = torch.zeros(6, dtype=torch.float32, device=self.device)
                for _ in range(num_steps * self.layout.gradient_accumulation_steps):
                    sums += self._forward(next(batches)).float()
                dist.all_reduce(sums, group=get_data_parallel_group())
                return sums
            finally:
                self.deepspeed_engine.train()


def _broadcast_from_last_stage(sums: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    group = get_pipeline_parallel_group()
    last = dist.get_global_rank(group, get_pipeline_parallel_world_size() - 1)
    buffer = sums.float().clone() if sums is not None else torch.zeros(6, dtype=torch.float32, device=device)
    dist.broadcast(buffer, src=last, group=group)
    return buffer
