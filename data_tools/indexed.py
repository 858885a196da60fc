"""Megatron-LM's indexed dataset format (MMIDIDX v1): ``<prefix>.bin`` tokens and ``<prefix>.idx`` index.

``.idx`` layout, little-endian, no alignment padding:

======  =========  ================================================================
offset  size       content
======  =========  ================================================================
0       9          magic ``b"MMIDIDX\\x00\\x00"``
9       8 (<Q)     version, always 1
17      1 (<B)     dtype code of the tokens (4 = int32, 8 = uint16; see DTYPE_CODES)
18      8 (<Q)     sequence count S
26      8 (<Q)     document count D (= documents + 1: the array starts with 0)
34      4 S        int32 sequence lengths (tokens)
34+4S   8 S        int64 sequence pointers (byte offsets into .bin)
34+12S  8 D        int64 document indices: document i is sequences [doc[i], doc[i+1])
+8D     1 S        int8 sequence modes, only in multimodal datasets (read, never written)
======  =========  ================================================================

Files written by Megatron-LM and GPT-NeoX open with ``IndexedDataset``. The writer streams: lengths
and document boundaries go to temporary files, so memory stays flat however large the corpus is,
and both files appear under their final names only when complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data_tools.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34
# Megatron-Core's DType codes. Float codes differ between forks (6/7 mean different things in
# Megatron-Core, legacy Megatron and GPT-NeoX), so only the integer codes are accepted.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # index entries handled per step when streaming


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Append sequences, close documents, then ``finalize()``; nothing exists under the final names before.

    Use as a context manager: an exception inside the block removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        self.bin_path, self.idx_path = _paths(self.prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(str(self.bin_path) + suffix)
        self._tmp_idx = Path(str(self.idx_path) + suffix)
        self._tmp_lengths = Path(str(self.idx_path) + suffix + ".lengths")
        self._tmp_docs = Path(str(self.idx_path) + suffix + ".docs")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = open(self._tmp_lengths, "wb")
        self._docs = open(self._tmp_docs, "wb")
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self._open_document_sequences = 0
        self._finalized = False

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token id out of range for {self.dtype} in {self.prefix}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._lengths.write(np.int32(array.size).tobytes())
        self.sequence_count += 1
        self.token_count += int(array.size)
        self._open_document_sequences += 1

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once: ``tokens`` concatenated, ``lengths`` per sequence."""
        lengths = np.asarray(lengths, dtype=np.int32)
        tokens = np.asarray(tokens)
        if int(lengths.sum()) != tokens.size:
            raise DataError(f"{self.prefix}: lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.write(lengths.tobytes())
        self.sequence_count += lengths.size
        self.token_count += int(tokens.size)
        self._open_document_sequences += lengths.size

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last call)."""
        self._docs.write(np.int64(self.sequence_count).tobytes())
        self.document_count += 1
        self._open_document_sequences = 0

    def add_document_boundaries(self, ends: np.ndarray) -> None:
        """Close several documents at once; ``ends`` are sequence counts (exclusive ends), ascending."""
        ends = np.asarray(ends, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.document_count += ends.size
        self._open_document_sequences = self.sequence_count - int(ends[-1]) if ends.size else \
            self._open_document_sequences

    def finalize(self) -> None:
        if self._open_document_sequences:
            self.end_document()
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        lengths = np.memmap(self._tmp_lengths, dtype=np.int32, mode="r") if self.sequence_count else \
            np.zeros(0, np.int32)
        docs = np.memmap(self._tmp_docs, dtype=np.int64, mode="r") if self.document_count else np.zeros(0, np.int64)
        with open(self._tmp_idx, "wb") as out:
            _write_index(out, self.dtype, lengths, docs, self.sequence_count)
        del lengths, docs
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)  # the index appears last: its presence means complete
        self._tmp_lengths.unlink()
        self._tmp_docs.unlink()
        self._finalized = True

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._docs):
            if not f.closed:
                f.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._finalized:
            self.finalize()
        elif exc_type is not None:
            self.abort()


def _write_index(out, dtype: np.dtype, lengths: np.ndarray, doc_ends: np.ndarray, sequence_count: int,
                 pointer_base: int = 0) -> None:
    """Stream the header, lengths, pointers and document indices (with the leading 0)."""
    out.write(MAGIC)
    out.write(struct.pack("<Q", VERSION))
    out.write(struct.pack("<B", _CODE_OF[dtype]))
    out.write(struct.pack("<Q", sequence_count))
    out.write(struct.pack("<Q", doc_ends.size + 1))
    for start in range(0, sequence_count, _CHUNK):
        out.write(np.asarray(lengths[start:start + _CHUNK], dtype=np.int32).tobytes())
    offset = pointer_base
    for start in range(0, sequence_count, _CHUNK):
        chunk = np.asarray(lengths[start:start + _CHUNK], dtype=np.int64) * dtype.itemsize
        pointers = np.cumsum(chunk) - chunk + offset
        out.write(pointers.tobytes())
        offset += int(chunk.sum())
    out.write(np.int64(0).tobytes())
    for start in range(0, doc_ends.size, _CHUNK):
        out.write(np.asarray(doc_ends[start:start + _CHUNK], dtype=np.int64).tobytes())


class IndexedDataset:
    """Memory-mapped reader; validates magic, version, dtype code and sizes when opened."""

    def __init__(self, prefix: str | os.PathLike, multimodal: bool | None = None):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"{path}: no such file (expected a Megatron .bin/.idx pair at prefix {self.prefix})")
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(f"{self.idx_path}: truncated index ({idx_size} bytes, the header alone is {HEADER_SIZE})")
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise DataError(f"{self.idx_path}: not an MMIDIDX index (magic {header[:9]!r}, expected {MAGIC!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version} (only version 1 exists)")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unsupported token dtype code {code} "
                            f"(integer codes {sorted(DTYPE_CODES)} are supported)")
        self.dtype = DTYPE_CODES[code]
        self.sequence_count, self.document_count = struct.unpack("<QQ", header[18:34])
        S, D = self.sequence_count, self.document_count
        plain = HEADER_SIZE + 12 * S + 8 * D
        if multimodal is None:
            multimodal = idx_size == plain + S and S > 0
        expected = plain + (S if multimodal else 0)
        if idx_size != expected:
            raise DataError(f"{self.idx_path}: size {idx_size} bytes does not match its header "
                            f"({S} sequences, {D} document indices -> {expected} bytes); the file is truncated "
                            "or corrupt")
        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=S, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=S, offset=HEADER_SIZE + 4 * S)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=D, offset=HEADER_SIZE + 12 * S)
        self.sequence_modes = (np.frombuffer(self._idx, dtype=np.int8, count=S, offset=plain)
                               if multimodal else None)
        if D == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != S:
            raise DataError(f"{self.idx_path}: document indices must run from 0 to the sequence count {S}")
        bin_size = self.bin_path.stat().st_size
        expected_bin = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
                        if S else 0)
        if bin_size != expected_bin:
            raise DataError(f"{self.bin_path}: {bin_size} bytes but the index describes {expected_bin}; "
                            "the .bin is truncated or belongs to another index")
        self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype)

    # -- sequences ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.sequence_count <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.sequence_count} sequences")
        i %= self.sequence_count
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sequence_lengths[i])]

    # -- documents ----------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    def document_sequence_range(self, d: int) -> tuple[int, int]:
        return int(self.document_indices[d]), int(self.document_indices[d + 1])

    def document_token_range(self, d: int) -> tuple[int, int]:
        """[start, end) of document ``d`` in token units of the .bin (its sequences are contiguous)."""
        first, last = self.document_sequence_range(d)
        if first == last:
            start = self._token_offset(first) if first < self.sequence_count else self.num_tokens
            return start, start
        return self._token_offset(first), self._token_offset(last - 1) + int(self.sequence_lengths[last - 1])

    def _token_offset(self, sequence: int) -> int:
        return int(self.sequence_pointers[sequence]) // self.dtype.itemsize

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the whole .bin, as a memory-mapped view."""
        return self._bin[start:end]

    def get_document(self, d: int) -> np.ndarray:
        start, end = self.document_token_range(d)
        return self._bin[start:end]

    @property
    def num_tokens(self) -> int:
        return self._bin.size


def merge_indexed(prefixes: Iterable[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (same dtype) into one; streams, so memory stays flat."""
    sources = [IndexedDataset(p) for p in prefixes]
    if not sources:
        raise DataError("merge_indexed: no input datasets")
    dtype = sources[0].dtype
    for src in sources[1:]:
        if src.dtype != dtype:
            raise DataError(f"cannot merge {src.prefix} ({src.dtype}) with {sources[0].prefix} ({dtype})")
    bin_path, idx_path = _paths(output_prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = Path(str(bin_path) + suffix), Path(str(idx_path) + suffix)
    try:
        with open(tmp_bin, "wb") as out:
            for src in sources:
                with open(src.bin_path, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        total_sequences = sum(s.sequence_count for s in sources)
        total_docs = sum(s.num_documents for s in sources)
        with open(tmp_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", _CODE_OF[dtype]))
            out.write(struct.pack("<Q", total_sequences))
            out.write(struct.pack("<Q", total_docs + 1))
            for src in sources:
                for start in range(0, src.sequence_count, _CHUNK):
                    out.write(np.asarray(src.sequence_lengths[start:start + _CHUNK]).tobytes())
            byte_base = 0
            for src in sources:
                for start in range(0, src.sequence_count, _CHUNK):
                    out.write((np.asarray(src.sequence_pointers[start:start + _CHUNK]) + byte_base).tobytes())
                byte_base += src.bin_path.stat().st_size
            out.write(np.int64(0).tobytes())
            seq_base = 0
            for src in sources:
                ends = src.document_indices[1:]
                for start in range(0, ends.size, _CHUNK):
                    out.write((np.asarray(ends[start:start + _CHUNK]) + seq_base).tobytes())
                seq_base += src.sequence_count
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    return IndexedDataset(output_prefix)
