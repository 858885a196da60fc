"""What the inference commands share: loading a checkpoint for evaluation, reading JSON-lines input,
writing output atomically."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from data_tools.errors import DataError
from data_tools.tokenizer import GLMTokenizer, load_tokenizer
from megatron_glm.checkpoint import load_thudm_checkpoint, write_text_atomic
from megatron_glm.config import GLMConfig, padded_vocab_size
from megatron_glm.model import GLMModel
from megatron_glm.parallel import initialize_parallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_inference(
    cfg: GLMConfig, checkpoint: str, dtype: str = "float32"
) -> tuple[GLMModel, GLMTokenizer]:
    """The model of ``cfg`` with the weights of ``checkpoint`` (THUDM layout, any model-parallel size) and
    its tokenizer. Launched on several processes (torchrun, srun, mpirun) the model is tensor-parallel over
    all of them; every rank then runs the same commands and rank 0 writes the output."""
    from megatron_glm.training.distributed import detect_launch, device_for, init_distributed

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    # From whichever launcher started the ranks: srun and mpirun set no WORLD_SIZE.
    world_size = detect_launch().world_size
    if world_size > 1:
        info = init_distributed()
        device = device_for(info)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initialize_parallel(world_size, 1)
    model = GLMModel(cfg.model, padded_vocab_size(cfg.model, world_size), device="meta")
    model.to_empty(device=device)
    load_thudm_checkpoint(model, checkpoint)
    return model.to(DTYPES[dtype]).eval(), tokenizer


def is_output_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each non-empty line of a JSON-lines file; each record must be an object with
    ``fields`` (strings). ``where`` is ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for field in fields:
                if field not in record:
                    raise DataError(f"{where}: no {field!r} field (the line has {sorted(record)})")
                if not isinstance(record[field], str):
                    raise DataError(
                        f"{where}: {field!r} must be a string, got {type(record[field]).__name__}"
                    )
            yield where, record


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """All records at once under the final name (written to a temporary name first)."""
    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
