"""Where checkpoint files live and what they are called; atomic writes; reading files of unknown origin.

A ``glm-pretrain`` save directory (THUDM/GLM's layout, which DeepSpeed also writes)::

    <save_dir>/latest_checkpointed_iteration.txt     the tag ("release" or a step number), THUDM's tracker
    <save_dir>/latest                                 the same tag, DeepSpeed's tracker
    <save_dir>/<tag>/mp_rank_XX_model_states.pt       {"module": THUDM-keyed state dict of model-parallel
                                                      rank XX, DeepSpeed's metadata, our client state}
    <save_dir>/<tag>/zero_pp_rank_D_mp_rank_XX_optim_states.pt   DeepSpeed ZeRO optimizer partitions
    <save_dir>/<tag>/layer_LL-model_XX-model_states.pt           pipeline-parallel runs: per-layer weights
    <save_dir>/<tag>/thudm/mp_rank_XX_model_states.pt            pipeline or ZeRO-3 runs: THUDM-layout weights
    <save_dir>/<tag>/rng_state_rank<R>.pt, config.yaml, meta.json

Every file here is written under a temporary name and renamed, so an interrupted writer leaves nothing
under a final name. Checkpoints downloaded from elsewhere are pickles: ``load_torch_file`` unpickles
only tensors, containers and an allowlist of the plain types THUDM/GLM's and DeepSpeed's files hold, and
refuses anything else (which could run code) unless the caller trusts the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_glm.errors import CheckpointError
from megatron_glm.log import get_logger

logger = get_logger("checkpoint")

TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
# Where glm-pretrain puts THUDM-layout weights when DeepSpeed's own files are not in that layout.
WEIGHTS_SUBDIR = "thudm"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
PARTIAL_SUFFIX = ".partial"
SHARD_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
TRUST_HINT = "if you trust where the file comes from, pass --trust-checkpoint (trust=True in the API)"


def shard_file_name(model_parallel_rank: int) -> str:
    return f"mp_rank_{model_parallel_rank:02d}_model_states.pt"


def rng_file_name(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def tile_file_name(rank: int) -> str:
    """The autotuned Triton tiles of one rank (``kernels.tile_choices``)."""
    return f"triton_tiles_rank{rank}.json"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` (file or directory) that becomes ``final`` only if the block succeeds.

    An existing ``final`` is replaced; on any exception (or a kill) the temporary is what remains, never a
    half-written ``final``.
    """
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def save_torch_atomic(obj: Any, path: Path) -> None:
    with staged(path) as tmp:
        torch.save(obj, tmp)


def write_trackers(save_dir: Path, tag: str) -> None:
    """Point both tracker files at ``tag`` (after the tag directory is complete)."""
    for name in TRACKER_FILES:
        write_text_atomic(save_dir / name, tag)


def resolve_tag_dir(path: Path) -> Path:
    """``path`` itself, or the tag directory its tracker file names when ``path`` is a save directory."""
    if any(SHARD_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    for tracker in TRACKER_FILES:
        if (path / tracker).is_file():
            tag = (path / tracker).read_text().strip()
            if not (path / tag).is_dir():
                raise CheckpointError(
                    f"{path / tracker} names tag {tag!r}, but {path / tag} does not exist; point the tracker "
                    "at an existing tag directory or pass that directory"
                )
            return path / tag
    return path


def find_checkpoint_files(path: str | Path) -> list[Path]:
    """The THUDM-layout weight files in model-parallel rank order.

    ``path`` is a save directory (its tracker names the tag), a tag directory (its ``thudm/`` weights when
    present), or one file (an MP=1 ``mp_rank_00_model_states.pt`` or a bare state dict).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    path = resolve_tag_dir(path)
    if (path / WEIGHTS_SUBDIR).is_dir():
        path = path / WEIGHTS_SUBDIR
    ranks = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := SHARD_FILE.fullmatch(p.name)))
    if not ranks:
        raise CheckpointError(
            f"{path}: no mp_rank_XX_model_states.pt files (and no tracker file naming a tag "
            f"directory that has them)"
        )
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise CheckpointError(
            f"{path}: model-parallel ranks {[r for r, _ in ranks]} are not 0..{len(ranks) - 1}; "
            "a shard file is missing (copy it, or convert from a complete checkpoint)"
        )
    return [p for _, p in ranks]


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; their contents are kept (re-read or swapped in)


@functools.cache
def _madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel reclaim the resident pages of ``tensor``'s storage once a conversion is done with it.

    The pages of memory-mapped source files otherwise stay mapped (and counted in the process's resident
    memory) until the file is closed, so reading a model tensor by tensor would end with the whole model
    resident. ``MADV_PAGEOUT`` never changes contents: file pages are re-read and anonymous pages swapped
    in if touched again. A no-op where the call is unavailable (other systems, older kernels).
    """
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours keep theirs
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def _allowed_globals() -> list:
    """The non-tensor types in THUDM/GLM's and DeepSpeed's checkpoint files: numpy RNG states, and
    DeepSpeed's loss scalers, ZeRO stage enum and parameter-fragment records (plain data classes)."""
    reconstruct = (
        np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    )
    allowed: list = [
        np.ndarray,
        np.dtype,
        reconstruct,
        # Files pickled under numpy 1.x name the function by its old module.
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32)},
    ]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


def _unsafe_types(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (pre-zip) files cannot be scanned; the unpickler's message names the type
        return []


def load_torch_file(path: str | Path, *, trust: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` of ``path`` on the CPU that runs no code from the file.

    Only tensors, Python containers/scalars and the allowlisted types are unpickled; a file holding any
    other type raises ``CheckpointError`` naming it, unless ``trust`` (then it is fully unpickled).
    Zip-format files are memory-mapped when ``mmap``, so reading them costs little memory.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            try:
                return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            except RuntimeError as exc:
                if not (mmap and "mmap" in str(exc)):
                    raise
                # Legacy (pre-zip) files cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if trust:
                logger.warning("%s: fully unpickling it (trusted by the caller)", path)
                return torch.load(path, map_location="cpu", weights_only=False)
            found = _unsafe_types(path)
            what = ", ".join(found) if found else str(exc).splitlines()[0]
            raise CheckpointError(
                f"{path}: holds types outside the checkpoint allowlist ({what}); unpickling them could "
                f"run code, so the file was not loaded. {TRUST_HINT}"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: cannot read as a torch checkpoint ({str(exc).splitlines()[0]}); the file is "
                "truncated, corrupt or not a checkpoint: copy it again"
            ) from exc
