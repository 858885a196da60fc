"""On-disk pieces of a sample directory: names, corpus fingerprints, tokenizer identity, streaming .npy files.

Layout of a directory (all arrays little-endian ``.npy``, memory-mappable with ``np.load(mmap_mode="r")``)::

    meta.json                              inputs, counts, statistics, build time
    <split>/blend_corpus.npy               int16 [N]      corpus of each blend position
    <split>/blend_index.npy                int64 [N]      pick number k of that corpus (see packing.py)
    <split>/corpus-<i>/sample_offsets.npy  int64 [n+1]    sample s is segments [offsets[s], offsets[s+1])
    <split>/corpus-<i>/segments.npy        int64 [g, 3]   (document, token start, token end), absolute
    <split>/corpus-<i>/segment_eos.npy     uint8 [g]      1: an eos follows the segment (document ends)
    <split>/corpus-<i>/objective.npy       uint8 [n, K]   Objective of each (sample, variant)
    <split>/corpus-<i>/suffix.npy          uint8 [n, K]   1: document objective in the suffix layout
    <split>/corpus-<i>/used_length.npy     int32 [n, K]   prefix of the sample that is laid out
    <split>/corpus-<i>/span_offsets.npy    int64 [n*K+1]  spans of (s, v) are rows [o[s*K+v], o[s*K+v+1])
    <split>/corpus-<i>/spans.npy           uint16|int32 [m, 2]  (start, length) in sample coordinates
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from data_tools.errors import DataError
from data_tools.tokenizer import BUILTIN_TOKENIZERS, GLMTokenizer

FORMAT_NAME = "glm-samples"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")
META_FILE = "meta.json"

_FULL_HASH_LIMIT = 256 << 20
_EDGE_BYTES = 16 << 20
_PROBE_BYTES = 64 << 10
_PROBES = 64


def split_index(name: str) -> int:
    if name not in SPLIT_NAMES:
        raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES.index(name)


def file_fingerprint(path: Path) -> str:
    """Content fingerprint: the whole file up to 256 MiB; beyond, its size, both 16 MiB ends and 64 probes."""
    size = path.stat().st_size
    digest = hashlib.blake2b(struct.pack("<Q", size), digest_size=16)
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(16 << 20), b""):
                digest.update(block)
        else:
            offsets = [0, size - _EDGE_BYTES] + [int(size * (i + 1) / (_PROBES + 1)) for i in range(_PROBES)]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(_EDGE_BYTES if offset in (0, size - _EDGE_BYTES) else _PROBE_BYTES))
    return digest.hexdigest()


def corpus_fingerprints(prefix: str) -> dict[str, str]:
    return {"idx": file_fingerprint(Path(prefix + ".idx")), "bin": file_fingerprint(Path(prefix + ".bin"))}


def fingerprint_key(fingerprints: dict[str, str]) -> int:
    """A 63-bit integer from a corpus's fingerprints (seeds its document split)."""
    return (
        int(
            hashlib.blake2b((fingerprints["idx"] + fingerprints["bin"]).encode(), digest_size=8).hexdigest(),
            16,
        )
        >> 1
    )


def tokenizer_identity(tokenizer: GLMTokenizer) -> dict:
    return {
        "name": tokenizer.name,
        "num_tokens": tokenizer.num_tokens,
        "command": dataclasses.asdict(tokenizer.command),
    }


def same_tokenizer(a: dict, b: dict) -> bool:
    """Same vocabulary size and command ids, and the same name when both are built-in tokenizers."""
    if a["num_tokens"] != b["num_tokens"] or a["command"] != b["command"]:
        return False
    builtin = a["name"] in BUILTIN_TOKENIZERS or b["name"] in BUILTIN_TOKENIZERS
    return a["name"] == b["name"] or not builtin


def read_corpus_sidecar(prefix: str) -> dict | None:
    """``<prefix>.meta.json`` written by glm-preprocess (tokenizer name, command ids), or None if absent."""
    path = Path(prefix + ".meta.json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: unreadable corpus metadata ({exc}); re-run glm-preprocess or delete the file"
        ) from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def check_corpus_tokenizer(prefix: str, tokenizer: GLMTokenizer) -> None:
    """Raise if the corpus's sidecar names another tokenizer or other command ids than ``tokenizer``."""
    sidecar = read_corpus_sidecar(prefix)
    if sidecar is None:
        return
    recorded = sidecar.get("tokenizer")
    name = recorded.get("name") if isinstance(recorded, dict) else recorded
    where = f"{prefix}.meta.json"
    if (
        isinstance(name, str)
        and name != tokenizer.name
        and (name in BUILTIN_TOKENIZERS or tokenizer.name in BUILTIN_TOKENIZERS)
    ):
        raise DataError(
            f"{where}: the corpus was tokenized with {name!r} but {tokenizer.name!r} was requested; "
            f"pass --tokenizer {name} or re-run glm-preprocess with {tokenizer.name}"
        )
    commands = recorded.get("command_tokens") if isinstance(recorded, dict) else None
    if isinstance(commands, dict):
        ours = dataclasses.asdict(tokenizer.command)
        differing = sorted(k for k, v in commands.items() if k in ours and ours[k] != v)
        if differing:
            raise DataError(
                f"{where}: command token ids {differing} differ from tokenizer {tokenizer.name!r} "
                f"({ {k: commands[k] for k in differing} } vs { {k: ours[k] for k in differing} })"
            )


def spans_dtype(seq_length: int) -> np.dtype:
    return np.dtype(np.uint16) if seq_length <= np.iinfo(np.uint16).max else np.dtype(np.int32)


class NpyWriter:
    """Append rows to a ``.npy`` file whose header (with the final row count) is written at ``close``."""

    _HEADER_BYTES = 128

    def __init__(self, path: Path, dtype: np.dtype | type, row_shape: tuple[int, ...] = ()):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype).newbyteorder("<"), tuple(row_shape)
        self.rows = 0
        with open(path, "wb") as f:
            f.write(b"\0" * self._HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {array.shape[1:]}, expected {self.row_shape}")
        with open(self.path, "ab") as f:
            f.write(array.tobytes())
        self.rows += array.shape[0]

    def close(self) -> None:
        header = repr(
            {"descr": self.dtype.str, "fortran_order": False, "shape": (self.rows, *self.row_shape)}
        )
        preamble = b"\x93NUMPY\x01\x00"
        width = self._HEADER_BYTES - len(preamble) - 2
        text = header.ljust(width - 1).encode("latin1") + b"\n"
        if len(text) != width:
            raise ValueError(f"{self.path}: .npy header {header!r} longer than {width} bytes")
        with open(self.path, "r+b") as f:
            f.write(preamble + struct.pack("<H", width) + text)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
