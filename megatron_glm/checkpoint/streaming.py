"""Write safetensors files and torch checkpoint files tensor by tensor (safetensors sharded above a size
limit, with Hugging Face's index file).

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range) and the raw bytes. Shapes and dtypes are known before any data is produced, so the header is
written first and each tensor is produced, written and dropped in turn: peak memory is one tensor.

A ``torch.save`` file is a zip archive of a pickle (``data.pkl``, which names each tensor's storage record)
and one stored (uncompressed) record per storage. ``write_torch_file`` lets torch write that archive with
every record's space reserved but empty (``torch.serialization.skip_data`` on shape-only fake tensors), then
fills each record in place, one produced tensor at a time, so a file of any size costs one tensor of memory.
Its data records carry no CRC32, as with ``torch.serialization.set_crc32_options(False)``: ``torch.load``
(every version, whose zip reader is built without CRC checks) reads them; ``unzip -t`` would complain.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors_file(
    path: Path, plans: list[TensorPlan], produce: Callable[[str], torch.Tensor], progress: tqdm | None = None
) -> None:
    """One safetensors file holding ``plans``, ``produce(name)`` called once per tensor, in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        header[plan.name] = {
            "dtype": SAFETENSORS_DTYPES[plan.dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for plan in plans:
            tensor = produce(plan.name).to(plan.dtype).contiguous()
            if tuple(tensor.shape) != plan.shape:
                raise ValueError(f"{plan.name}: produced shape {tuple(tensor.shape)}, planned {plan.shape}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(plan.nbytes)


def write_torch_file(
    path: Path,
    plans: list[TensorPlan],
    produce: Callable[[str], torch.Tensor],
    *,
    wrap: Callable[[dict[str, torch.Tensor]], Any] = lambda tensors: tensors,
    progress: tqdm | None = None,
) -> None:
    """``torch.save(wrap({name: tensor}), path)`` with ``produce(name)`` called once per plan, in order, and
    written before the next: ``wrap`` places the state dict in the saved object (e.g. under ``'module'``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fakes = {plan.name: torch.empty(plan.shape, dtype=plan.dtype) for plan in plans}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(wrap(fakes), path)
    # Storages are numbered in the order the pickle meets them: the state dict's order.
    offsets = [
        torch._C.PyTorchFileReader(str(path)).get_record_offset(f"data/{i}") for i in range(len(plans))
    ]
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename.partition("/")[2]: info.file_size for info in archive.infolist()}
    for i, plan in enumerate(plans):
        if sizes.get(f"data/{i}") != plan.nbytes:  # the numbering above no longer holds: never write blindly
            raise RuntimeError(
                f"{path}: record data/{i} has {sizes.get(f'data/{i}')} bytes, {plan.name} needs {plan.nbytes}"
            )
    with open(path, "r+b") as f:
        for offset, plan in zip(offsets, plans):
            tensor = produce(plan.name).to(plan.dtype).contiguous()
            if tuple(tensor.shape) != plan.shape:
                raise ValueError(f"{plan.name}: produced shape {tuple(tensor.shape)}, planned {plan.shape}")
            f.seek(offset)
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(plan.nbytes)


def write_safetensors(
    directory: Path,
    plans: Iterable[TensorPlan],
    produce: Callable[[str], torch.Tensor],
    *,
    max_shard_bytes: int | None = None,
    metadata: dict | None = None,
) -> list[Path]:
    """Write ``model.safetensors`` in ``directory``, or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_bytes``; returns the files."""
    plans = list(plans)
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if max_shard_bytes and shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    total = sum(plan.nbytes for plan in plans)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors") as progress:
        for name, shard in zip(names, shards):
            write_safetensors_file(directory / name, shard, produce, progress)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total, **(metadata or {})},
            "weight_map": {plan.name: name for name, shard in zip(names, shards) for plan in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]


def open_safetensors_dir(directory: Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a directory holding ``model.safetensors`` or an index with shards."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return {}
