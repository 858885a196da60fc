"""The pretraining loop: data, engine, resume, steps, evaluation, checkpoints, preemption."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import kernels
from data_tools.tokenizer import load_tokenizer
from megatron_glm.config import (
    ConfigError,
    GLMConfig,
    cuda_graph_blockers,
    dump_config,
    model_flops_per_token,
    padded_vocab_size,
    parallel_layout,
    uses_cuda_graphs,
)
from megatron_glm.data import build_glm_data_loader, prepare_sample_directory
from megatron_glm.errors import USER_ERRORS, TrainingError
from megatron_glm.log import get_logger, setup_logging
from megatron_glm.model import per_objective_means
from megatron_glm.parallel import (
    destroy_parallel,
    get_data_parallel_rank,
    get_pipeline_parallel_rank,
    initialize_parallel,
    seed_parallel_rng,
)
from megatron_glm.training.checkpoint import CheckpointManager, TrainingState
from megatron_glm.training.distributed import LaunchInfo, device_for, init_distributed
from megatron_glm.training.engine import (
    PRECISION_DTYPES,
    StepResult,
    TrainingEngine,
    single_replica_zero_warning,
)
from megatron_glm.training.hardware import emulated_bf16_warning, fp32_matmul_warning, measure_matmul_peak
from megatron_glm.training.metrics import MetricsReporter, StepProfiler, TimedIterator
from megatron_glm.training.signals import PreemptionHandler

logger = get_logger("training")


@dataclasses.dataclass
class TrainingResult:
    final_step: int
    status: str  # "completed" or "preempted"
    last_checkpoint: str | None
    losses: list[float]


def pretrain(cfg: GLMConfig) -> TrainingResult:
    """Train ``cfg`` on this rank (every rank of the job calls it): join the process group, set up
    (``_setup``), resume from ``checkpoint.save_dir`` when it holds a checkpoint, and run the loop
    (``_train``) until ``training.train_steps`` or a preemption signal."""
    info = init_distributed()
    setup_logging(info.rank, cfg.logging.log_dir, cfg.logging.all_ranks, cfg.logging.level)
    logger.info(
        "launcher %s: rank %d of %d (local rank %d), master %s:%d",
        info.launcher,
        info.rank,
        info.world_size,
        info.local_rank,
        info.master_addr,
        info.master_port,
    )
    try:
        result = _pretrain(cfg, info, device_for(info))
    except BaseException as exc:
        # Only this rank may have failed: the others wait in a collective, so no barrier here. An
        # unexpected failure is printed with its rank (rank 0 alone logs by default); the caller reports
        # the user errors. The launcher then stops the other ranks.
        if info.world_size > 1 and not isinstance(exc, USER_ERRORS):
            print(f"glm-pretrain: rank {info.rank} of {info.world_size} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
        raise
    dist.barrier()
    destroy_parallel()
    dist.destroy_process_group()
    return result


@dataclasses.dataclass
class TrainingRun:
    """Everything the loop needs, built by ``_setup``."""

    cfg: GLMConfig
    device: torch.device
    engine: TrainingEngine
    manager: CheckpointManager
    state: TrainingState
    batches: Iterator[dict]
    valid: DataLoader | None
    reporter: MetricsReporter
    config_yaml: str

    def save_if_due(self, *, preempted: bool = False, final: bool = False) -> None:
        self.manager.maybe_save(
            self.engine.deepspeed_engine,
            self.state,
            self.config_yaml,
            preempted=preempted,
            final=final,
            meta={"name": self.cfg.name},
            write_weights=self.engine.write_thudm_weights,
        )


def refuse_gpu_only_settings(cfg: GLMConfig, device: torch.device) -> None:
    """A ``ConfigError`` for a setting that needs CUDA GPUs on a run on another device."""
    if cfg.training.cuda_graphs is True and device.type != "cuda":
        raise ConfigError(f"training.cuda_graphs: CUDA graphs need CUDA GPUs; this run is on {device.type}")
    if cfg.training.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "training.precision: fp16 needs CUDA GPUs (CPUs compute fp16 very slowly and DeepSpeed's "
            "CPU accelerator does not support it); use bf16 or fp32"
        )


def _pretrain(cfg: GLMConfig, info: LaunchInfo, device: torch.device) -> TrainingResult:
    run = _setup(cfg, info, device)
    if isinstance(run, TrainingResult):
        return run
    return _train(run)


def _setup(cfg: GLMConfig, info: LaunchInfo, device: torch.device) -> TrainingRun | TrainingResult:
    """Parallel state, data, engine and the resume; a ``TrainingResult`` when the checkpoint is already done."""
    rank, world_size = info.rank, info.world_size
    layout = parallel_layout(cfg, world_size)
    initialize_parallel(layout.tensor_parallel_size, layout.pipeline_parallel_size)
    dp_rank = get_data_parallel_rank()
    # Dropout differs across data-parallel replicas and pipeline stages, agrees across tensor ranks.
    seed_parallel_rng(cfg.training.seed + 100 * get_pipeline_parallel_rank() + 1000 * dp_rank)
    logger.info(
        "%s: world %d = tp %d x pp %d x dp %d, micro batch %d, accumulation %d, global batch %d",
        cfg.name,
        world_size,
        layout.tensor_parallel_size,
        layout.pipeline_parallel_size,
        layout.data_parallel_size,
        cfg.training.micro_batch_size,
        layout.gradient_accumulation_steps,
        cfg.training.global_batch_size,
    )

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    refuse_gpu_only_settings(cfg, device)
    if cfg.training.cuda_graphs == "auto":
        blockers = cuda_graph_blockers(cfg) if device.type == "cuda" else ["a CUDA device"]
        logger.info(
            "training.cuda_graphs auto: %s",
            "per-layer CUDA graphs on" if not blockers else f"off (they need {'; '.join(blockers)})",
        )
    if cfg.training.precision == "bf16" and (warning := emulated_bf16_warning(device)):
        logger.warning(warning)
    if cfg.training.precision == "fp32" and (warning := fp32_matmul_warning(device)):
        logger.warning(warning)
    builder = rank == 0 if cfg.data.shared_cache else info.local_rank == 0
    samples = prepare_sample_directory(cfg.data, cfg.model.tokenizer, builder=builder)
    vocab_size = padded_vocab_size(cfg.model, layout.tensor_parallel_size)
    if warning := single_replica_zero_warning(cfg, layout):
        logger.warning(warning)
    engine = TrainingEngine(cfg, layout, vocab_size, device)
    backend = kernels.resolve_backend(cfg.model.kernels, device)
    logger.info(
        "kernels: %s attention and LayerNorm on %s (model.kernels=%s)%s",
        backend,
        device.type,
        cfg.model.kernels,
        ""
        if cfg.model.deterministic_kernels or backend != "triton"
        else "; attention backward with atomic dQ, not bitwise reproducible (model.deterministic_kernels=false)",
    )
    if backend == "triton" and device.type == "cuda":
        from kernels.precompile import default_workers

        logger.info(
            "the first steps compile the Triton kernels and time their tiles (%d compile worker processes); "
            "Triton's cache at %s keeps both for later runs on this node",
            default_workers(),
            os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"),
        )

    manager = CheckpointManager(cfg.checkpoint.save_dir, cfg.checkpoint.keep_last, cfg.checkpoint.interval)
    state = TrainingState()
    tag = manager.latest_tag()
    if tag is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"checkpoint.save_dir {cfg.checkpoint.save_dir} already holds checkpoints (latest: step {tag}) and "
            "checkpoint.resume is false: choose a new save_dir, or resume"
        )
    if tag is not None:
        state = TrainingState.from_client_state(manager.load(engine.deepspeed_engine, tag))
        if state.step >= cfg.training.train_steps:
            logger.info(
                "checkpoint %s is already at step %d of %d: nothing to train",
                tag,
                state.step,
                cfg.training.train_steps,
            )
            return TrainingResult(state.step, "completed", str(manager.last_saved), [])

    def loader(split: str, consumed_samples: int = 0) -> DataLoader:
        return build_glm_data_loader(
            cfg.data,
            tokenizer,
            samples,
            split,
            micro_batch_size=cfg.training.micro_batch_size,
            global_batch_size=cfg.training.global_batch_size,
            data_parallel_rank=dp_rank,
            data_parallel_size=layout.data_parallel_size,
            consumed_samples=consumed_samples,
        )

    dtype = PRECISION_DTYPES[cfg.training.precision]
    # Before the data loaders start their worker processes, which would share a CPU with the measurement (on a
    # 2-core machine the MFU then read 72-119%). On the device: NCCL reduces only device tensors.
    peak = torch.tensor([measure_matmul_peak(device, dtype)], dtype=torch.float64, device=device)
    dist.all_reduce(peak)

    batches = iter(loader("train", state.consumed_samples))
    valid = loader("valid") if cfg.training.eval_interval else None
    if valid is not None and len(valid.dataset) == 0:
        logger.warning(
            "the validation split has no samples: no evaluation (give data.split a larger valid share)"
        )
        valid = None
    if valid is not None:
        # Start the evaluation loader's (persistent) workers now: each later iter() then only restarts
        # the sampler, and the random seed a new iterator draws is drawn here, before the RNG restore.
        iter(valid)

    seq_length = cfg.data.seq_length
    reporter = MetricsReporter(
        cfg.logging.log_dir,
        enabled=rank == 0,
        tensorboard=cfg.logging.tensorboard,
        total_steps=cfg.training.train_steps,
        tokens_per_step=cfg.training.global_batch_size * seq_length,
        flops_per_token=lambda fraction: model_flops_per_token(cfg.model, vocab_size, seq_length, fraction),
        peak_flops=float(peak.item()),
        log_interval=cfg.logging.log_interval,
    )
    if tag is not None:
        # Last, after everything above that draws random numbers: the next step then draws exactly what
        # the uninterrupted run drew.
        manager.restore_rng(tag)
        manager.restore_kernel_tiles(tag)
    return TrainingRun(cfg, device, engine, manager, state, batches, valid, reporter, dump_config(cfg))


def _train(run: TrainingRun) -> TrainingResult:
    """Steps until ``training.train_steps`` or a preemption; evaluation and checkpoints on their cadence.

    A step's loss and gradient norm are reported once the next step is queued: reading them right away would
    make the host wait for the GPU to finish the step (its optimizer update included) before it could queue
    anything more, leaving the GPU idle while the host reports, fetches the next batch and launches its first
    kernels. Before an evaluation, a checkpoint and at the end the step is reported first, in order.
    """
    cfg, state, engine, reporter = run.cfg, run.state, run.engine, run.reporter
    losses: list[float] = []
    status = "completed"
    logger.info(
        "training from step %d to %d (%s consumed samples)",
        state.step,
        cfg.training.train_steps,
        f"{state.consumed_samples:,}",
    )
    profiler = StepProfiler(
        cfg.logging.profile_steps,
        cfg.logging.log_dir,
        dist.get_rank(),
        run.device,
        uses_cuda_graphs(cfg, run.device.type),
    )
    pending: _PendingReport | None = None
    with PreemptionHandler(run.device) as preemption:
        while state.step < cfg.training.train_steps:
            profiler.before(state.step + 1)
            start = time.perf_counter()
            timed = TimedIterator(run.batches)
            result = engine.train_step(timed)
            step_time = time.perf_counter() - start
            state.advance(cfg.training.global_batch_size)
            profiler.after(state.step)
            if pending is not None:
                _report(run, pending, losses)  # the previous step: finished on the device by now
            pending = _PendingReport(state.step, result, step_time, timed.waited, timed.loss_fraction)
            evaluate = run.valid is not None and state.step % cfg.training.eval_interval == 0
            preempted = preemption.requested()
            if evaluate or preempted or run.manager.due(state.step) or state.step >= cfg.training.train_steps:
                _report(run, pending, losses)
                pending = None
            if evaluate:
                sums = engine.evaluate(iter(run.valid), cfg.training.eval_steps)
                reporter.evaluation(state.step, per_objective_means(sums.cpu()))
            run.save_if_due(preempted=preempted)
            if preempted:
                status = "preempted"
                logger.info(
                    "preempted at step %d: checkpoint %s saved, exiting", state.step, run.manager.last_saved
                )
                break
    if status == "completed":
        run.save_if_due(final=True)
    reporter.close()
    last = run.manager.last_saved
    return TrainingResult(state.step, status, str(last) if last else None, losses)


@dataclasses.dataclass
class _PendingReport:
    """An optimizer step whose loss and gradient norm may still be on their way from the device."""

    step: int
    result: StepResult
    step_time: float
    data_wait: float
    loss_fraction: float


def _report(run: TrainingRun, pending: _PendingReport, losses: list[float]) -> None:
    """Report ``pending``'s step: count it if its update was skipped, stop on a non-finite loss
    (``training.nonfinite_policy=stop``) or warn, keep the loss, and hand the step's numbers to the reporter.
    Every step is reported before a checkpoint is written, so the checkpoint's counters include it."""
    cfg, result = run.cfg, pending.result
    run.state.skipped_steps += int(result.skipped)
    skipped_total = run.state.skipped_steps
    if not math.isfinite(result.loss):
        if cfg.training.nonfinite_policy == "stop":
            where = run.manager.last_saved or "none saved yet"
            raise TrainingError(
                f"non-finite loss at step {pending.step}; the update was not applied. Last good "
                f"checkpoint: {where}. Lower optimizer.lr, check the data, or set "
                "training.nonfinite_policy=skip"
            )
        logger.warning(
            "non-finite loss at step %d: update skipped (%d skipped so far)",
            pending.step,
            skipped_total,
        )
    else:
        losses.append(result.loss)
    run.reporter.step(
        pending.step,
        loss=result.loss,
        lr=result.lr,
        grad_norm=result.grad_norm,
        step_time=pending.step_time,
        data_wait=pending.data_wait,
        loss_fraction=pending.loss_fraction,
        skipped_total=skipped_total,
    )
