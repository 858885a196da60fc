"""Atomic DeepSpeed checkpoints with THUDM/GLM's directory layout (file names: ``megatron_glm.checkpoint``).

``<save_dir>/<step>/`` holds DeepSpeed's files (``mp_rank_XX_model_states.pt`` with the model under
``'module'`` — the file THUDM/GLM's tools read — and the ZeRO optimizer shards), one
``rng_state_rank<r>.pt`` per rank, ``config.yaml`` and ``meta.json``. A checkpoint is written under
``<step>.partial`` and renamed when every rank has finished; only then do the tracker files
``latest`` and ``latest_checkpointed_iteration.txt`` move to it (atomically), and only then are
checkpoints beyond ``keep_last`` deleted. A crash at any moment leaves the previous checkpoint as the
latest, complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import kernels
from megatron_glm.checkpoint import (
    CONFIG_FILE,
    META_FILE,
    PARTIAL_SUFFIX,
    CheckpointError,
    load_torch_file,
    rng_file_name,
    tile_file_name,
    write_text_atomic,
    write_trackers,
)
from megatron_glm.checkpoint.universal import is_universal, load_universal, reseed
from megatron_glm.config import load_config
from megatron_glm.log import get_logger
from megatron_glm.parallel import get_rng_tracker

logger = get_logger("checkpoint")


def capture_rng_state() -> dict[str, Any]:
    """Every random generator that affects training on this rank."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    state["tensor_parallel"] = get_rng_tracker().get_states()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_rng_tracker().set_states(state["tensor_parallel"])


@dataclasses.dataclass
class TrainingState:
    """The run's counters: what a checkpoint must hold, beyond model, optimizer and RNG, to resume exactly."""

    step: int = 0  # optimizer steps taken (skipped updates count)
    consumed_samples: int = 0  # training samples read, over all data-parallel ranks
    skipped_steps: int = 0  # steps whose update was not applied (non-finite loss or fp16 overflow)

    def advance(self, global_batch_size: int) -> None:
        """One optimizer step taken (whether it was skipped is counted when the loop reads it, before any
        checkpoint: ``skipped_steps``)."""
        self.step += 1
        self.consumed_samples += global_batch_size

    def to_client_state(self) -> dict[str, int]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> TrainingState:
        # Checkpoints written before skipped steps were counted have no "skipped_steps".
        return cls(client["step"], client["consumed_samples"], client.get("skipped_steps", 0))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Writes, finds and loads glm-pretrain's checkpoints under ``save_dir`` (layout:
    ``megatron_glm.checkpoint.files``), and decides when a step is saved.

    Saving is a collective, atomic (staged under ``<step>.partial``) and prunes to ``keep_last``;
    ``maybe_save`` saves every ``interval`` steps (0: never on a schedule), at a preemption and at the end
    of training, never twice for one step; ``last_saved`` is the newest complete checkpoint of this run
    (or the one it resumed from), ``saved_step`` its step. Loading restores model, optimizer and schedule,
    and ``restore_rng`` the random states, as the last thing.
    """

    def __init__(self, save_dir: str | os.PathLike, keep_last: int = 3, interval: int = 0):
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.interval = interval
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_saved: Path | None = None
        self.saved_step: int | None = None

    # -- discovery ----------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """The tag the tracker points at, if that checkpoint is complete."""
        tracker = self.save_dir / "latest"
        if not tracker.is_file():
            return None
        tag = tracker.read_text().strip()
        if not (self.save_dir / tag / META_FILE).is_file():
            raise CheckpointError(
                f"{tracker} points at {tag!r} but {self.save_dir / tag} is not a complete "
                "checkpoint (no meta.json); remove the tracker or point it at a complete one"
            )
        return tag

    def completed_tags(self) -> list[str]:
        if not self.save_dir.is_dir():
            return []
        tags = [
            p.name
            for p in self.save_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / META_FILE).is_file()
        ]
        return sorted(tags, key=int)

    def path(self, tag: str) -> Path:
        return self.save_dir / tag

    # -- saving -------------------------------------------------------------------------------------
    def due(self, step: int, *, preempted: bool = False, final: bool = False) -> bool:
        """Whether ``step`` must be saved: on the interval, at a preemption or at the end, once."""
        if step == self.saved_step:
            return False
        return final or preempted or bool(self.interval and step % self.interval == 0)

    def maybe_save(
        self,
        engine,
        state: TrainingState,
        config_yaml: str,
        *,
        preempted: bool = False,
        final: bool = False,
        meta: dict[str, Any] | None = None,
        write_weights: Callable[[Path], None] | None = None,
    ) -> Path | None:
        """Save ``state.step`` when ``due`` (a collective: every rank calls it with the same flags)."""
        if not self.due(state.step, preempted=preempted, final=final):
            return None
        meta = {**(meta or {}), "consumed_samples": state.consumed_samples}
        return self.save(engine, state.step, state.to_client_state(), config_yaml, meta, write_weights)

    def save(
        self,
        engine,
        step: int,
        client_state: dict[str, Any],
        config_yaml: str,
        meta: dict[str, Any] | None = None,
        write_weights: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save on every rank (a collective); returns the final directory.

        ``write_weights(directory)``, called on every rank, adds files to the checkpoint before it is
        complete (the THUDM-layout weights where DeepSpeed's files are not in that layout).
        """
        tag = str(step)
        staging_tag = tag + PARTIAL_SUFFIX
        staging = self.save_dir / staging_tag
        start = time.perf_counter()
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.save_dir.glob(f"*{PARTIAL_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(
            str(self.save_dir), tag=staging_tag, client_state=client_state, save_latest=False
        )
        torch.save(capture_rng_state(), staging / rng_file_name(self.rank))
        tiles = kernels.tile_choices()
        if tiles:
            (staging / tile_file_name(self.rank)).write_text(json.dumps(tiles) + "\n")
        if write_weights is not None:
            write_weights(staging)
        _barrier()
        final = self.save_dir / tag
        if self.rank == 0:
            (staging / CONFIG_FILE).write_text(config_yaml)
            info = {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(meta or {}),
            }
            write_text_atomic(staging / META_FILE, json.dumps(info, indent=2) + "\n")
            replaced = None
            if final.exists():
                replaced = final.with_name(f"{tag}.replaced-{os.getpid()}")
                os.replace(final, replaced)
            os.replace(staging, final)
            write_trackers(self.save_dir, tag)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            self._prune(keep=tag)
        _barrier()
        logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - start)
        self.last_saved, self.saved_step = final, step
        return final

    def _prune(self, keep: str) -> None:
        tags = [t for t in self.completed_tags() if t != keep]
        excess = len(tags) + 1 - self.keep_last
        for tag in tags[: max(0, excess)]:
            shutil.rmtree(self.save_dir / tag, ignore_errors=True)
            logger.info("removed old checkpoint %s (keep_last=%d)", self.save_dir / tag, self.keep_last)

    # -- loading ------------------------------------------------------------------------------------
    def load(self, engine, tag: str, load_optimizer: bool = True) -> dict[str, Any]:
        """Load model, optimizer and scheduler into ``engine`` on every rank; returns the client state.

        The random states are restored separately (``restore_rng``), as the last thing before the first
        step, so that whatever the job draws while setting up does not shift them.
        """
        directory = self.save_dir / tag
        meta = self._meta(tag)
        if is_universal(directory):  # written by glm-convert reshard: no layout, loads at this job's
            model = load_config(directory / CONFIG_FILE).model
            return load_universal(
                engine,
                directory,
                num_layers=model.num_layers,
                vocab_multiple=model.make_vocab_size_divisible_by,
            )
        load_path, client_state = engine.load_checkpoint(
            str(self.save_dir),
            tag=tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}")
        logger.info("resumed from %s (step %d)", directory, meta["step"])
        self.last_saved, self.saved_step = directory, meta["step"]
        return client_state or {}

    def restore_rng(self, tag: str) -> None:
        """Put back this rank's random states of checkpoint ``tag`` (when the world size is the same); a
        universal checkpoint (``glm-convert reshard``) has none: every rank is re-seeded (``universal.reseed``)."""
        directory = self.save_dir / tag
        meta = self._meta(tag)
        if is_universal(directory):
            reseed(directory)
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        rng_file = directory / rng_file_name(self.rank)
        if meta.get("world_size") == world and rng_file.is_file():
            restore_rng_state(load_torch_file(rng_file, mmap=False))
        else:
            logger.warning(
                "checkpoint %s was saved by %s ranks, this job has %d: random states are not "
                "restored (training continues, but not bit-identically)",
                directory,
                meta.get("world_size"),
                world,
            )

    def restore_kernel_tiles(self, tag: str) -> None:
        """Make the autotuned Triton kernels run the tiles this rank ran when checkpoint ``tag`` was saved (when
        the world size is the same), instead of timing them again: Triton keeps its choices in a node-local
        cache, and a job resumed on another node could choose other tiles, whose rounding differs."""
        directory = self.save_dir / tag
        tile_file = directory / tile_file_name(self.rank)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if not tile_file.is_file() or self._meta(tag).get("world_size") != world:
            return
        restored = kernels.restore_tile_choices(json.loads(tile_file.read_text()))
        logger.debug("restored %d autotuned kernel tiles from %s", restored, tile_file)

    def _meta(self, tag: str) -> dict[str, Any]:
        meta_path = self.save_dir / tag / META_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{self.save_dir / tag} is not a complete checkpoint (no {META_FILE})")
        return json.loads(meta_path.read_text())
