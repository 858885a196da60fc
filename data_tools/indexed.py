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

``.bin`` is the raw concatenation of all sequences in the index dtype; it has no header.

Files written by Megatron-LM and GPT-NeoX open with ``IndexedDataset``. The writer streams: lengths
and document boundaries go to temporary files, so memory stays flat however large the corpus is.
Outputs are committed in a fixed order: an old ``.idx`` is removed first, then the ``.bin`` is renamed
into place and the ``.idx`` last, so an ``.idx`` next to a ``.bin`` always means a complete pair.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
_COPY_BLOCK = 64 << 20  # bytes per copy call when concatenating .bin files


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def dataset_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` paths of a dataset prefix."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _commit(tmp_bin: Path, tmp_idx: Path, bin_path: Path, idx_path: Path) -> None:
    """Rename a finished pair into place; the index goes last, an older index is removed first."""
    idx_path.unlink(missing_ok=True)
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)


class IndexedDatasetWriter:
    """Append sequences, close documents, then ``finalize()``; nothing exists under the final names before.

    Use as a context manager: an exception inside the block removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        self._max_id = np.iinfo(self.dtype).max
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(str(self.bin_path) + suffix)
        self._tmp_idx = Path(str(self.idx_path) + suffix)
        self._tmp_lengths = Path(str(self.idx_path) + suffix + ".lengths")
        self._tmp_docs = Path(str(self.idx_path) + suffix + ".docs")
        self._files = []
        try:
            self._bin = self._open(self._tmp_bin)
            self._lengths = self._open(self._tmp_lengths)
            self._docs = self._open(self._tmp_docs)
        except OSError as exc:
            self.abort()
            raise DataError(f"cannot write {self.prefix}.bin/.idx: {exc}") from exc
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self._last_document_end = 0
        self._finalized = False

    def _open(self, path: Path):
        f = open(path, "wb")  # noqa: SIM115 -- closed by finalize() or abort()
        self._files.append(f)
        return f

    def _check_ids(self, array: np.ndarray) -> None:
        if array.size and (int(array.min()) < 0 or int(array.max()) > self._max_id):
            raise DataError(
                f"token id out of range for {self.dtype} in {self.prefix} "
                f"(ids {int(array.min())}..{int(array.max())}); the vocabulary needs int32 tokens"
            )

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens)
        self._check_ids(array)
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._lengths.write(np.int32(array.size).tobytes())
        self.sequence_count += 1
        self.token_count += int(array.size)

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once: ``tokens`` concatenated, ``lengths`` per sequence."""
        lengths = np.asarray(lengths, dtype=np.int32)
        tokens = np.asarray(tokens)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise DataError(
                f"{self.prefix}: lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given"
            )
        self._check_ids(tokens)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.write(lengths.tobytes())
        self.sequence_count += lengths.size
        self.token_count += int(tokens.size)

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last call)."""
        self._docs.write(np.int64(self.sequence_count).tobytes())
        self.document_count += 1
        self._last_document_end = self.sequence_count

    def add_document_boundaries(self, ends: np.ndarray) -> None:
        """Close several documents at once; ``ends`` are sequence counts (exclusive ends), ascending."""
        ends = np.asarray(ends, dtype=np.int64)
        if not ends.size:
            return
        if ends[0] < self._last_document_end or ends[-1] > self.sequence_count or np.any(np.diff(ends) < 0):
            raise DataError(
                f"{self.prefix}: document ends must ascend within "
                f"{self._last_document_end}..{self.sequence_count}"
            )
        self._docs.write(ends.tobytes())
        self.document_count += ends.size
        self._last_document_end = int(ends[-1])

    def finalize(self) -> None:
        if self.sequence_count > self._last_document_end:
            self.end_document()
        for f in self._files:
            f.close()
        with open(self._tmp_idx, "wb") as out:
            _write_header(out, self.dtype, self.sequence_count, self.document_count + 1)
            _write_lengths_and_pointers(out, self._tmp_lengths, 0, self.sequence_count, self.dtype.itemsize)
            out.write(np.int64(0).tobytes())
            for ends in _read_chunks(self._tmp_docs, 0, self.document_count, np.int64):
                out.write(ends.tobytes())
        _commit(self._tmp_bin, self._tmp_idx, self.bin_path, self.idx_path)
        self._tmp_lengths.unlink()
        self._tmp_docs.unlink()
        self._finalized = True

    def abort(self) -> None:
        for f in self._files:
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


def _write_header(out, dtype: np.dtype, sequence_count: int, document_index_count: int) -> None:
    out.write(MAGIC)
    out.write(struct.pack("<Q", VERSION))
    out.write(struct.pack("<B", _CODE_OF[dtype]))
    out.write(struct.pack("<Q", sequence_count))
    out.write(struct.pack("<Q", document_index_count))


def _read_chunks(path: Path, offset: int, count: int, dtype: type) -> Iterator[np.ndarray]:
    """``count`` items of ``dtype`` from ``offset`` of a file, in chunks read (not mapped): a pass over a
    huge index keeps resident memory at one chunk."""
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, count, _CHUNK):
            chunk = np.fromfile(f, dtype=dtype, count=min(_CHUNK, count - start))
            if chunk.size != min(_CHUNK, count - start):
                raise DataError(f"{path}: ended early (truncated while being read)")
            yield chunk


def _write_lengths_and_pointers(out, path: Path, offset: int, count: int, itemsize: int) -> None:
    """Stream ``count`` int32 lengths from ``path``, then the int64 byte pointers (their running sum)."""
    for lengths in _read_chunks(path, offset, count, np.int32):
        out.write(lengths.tobytes())
    position = 0
    for lengths in _read_chunks(path, offset, count, np.int32):
        sizes = lengths.astype(np.int64) * itemsize
        out.write((np.cumsum(sizes) - sizes + position).tobytes())
        position += int(sizes.sum())


class IndexedDataset:
    """Memory-mapped reader; validates magic, version, dtype code and sizes when opened.

    ``multimodal=None`` detects the optional int8 modes array from the index size. Pickling keeps only
    the prefix, so DataLoader workers map the files again instead of copying them.
    """

    def __init__(self, prefix: str | os.PathLike, multimodal: bool | None = None):
        self.prefix = str(prefix)
        self._multimodal_arg = multimodal
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(
                    f"{path}: no such file (expected a Megatron .bin/.idx pair at prefix {self.prefix})"
                )
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(
                f"{self.idx_path}: truncated index ({idx_size} bytes, the header alone is {HEADER_SIZE})"
            )
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise DataError(
                f"{self.idx_path}: not an MMIDIDX index (magic {header[:9]!r}, expected {MAGIC!r})"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version} (only version 1 exists)")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise DataError(
                f"{self.idx_path}: unsupported token dtype code {code} "
                f"(integer codes {sorted(DTYPE_CODES)} are supported)"
            )
        self.dtype = DTYPE_CODES[code]
        self.sequence_count, self.document_count = struct.unpack("<QQ", header[18:34])
        S, D = self.sequence_count, self.document_count
        plain = HEADER_SIZE + 12 * S + 8 * D
        if multimodal is None:
            multimodal = idx_size == plain + S and S > 0
        expected = plain + (S if multimodal else 0)
        if idx_size != expected:
            raise DataError(
                f"{self.idx_path}: size {idx_size} bytes does not match its header "
                f"({S} sequences, {D} document indices -> {expected} bytes); the file is truncated or corrupt"
            )
        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=S, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=S, offset=HEADER_SIZE + 4 * S)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=D, offset=HEADER_SIZE + 12 * S)
        self.sequence_modes = (
            np.frombuffer(self._idx, dtype=np.int8, count=S, offset=plain) if multimodal else None
        )
        if D == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != S:
            raise DataError(f"{self.idx_path}: document indices must run from 0 to the sequence count {S}")
        if S and self.sequence_pointers[0] != 0:
            raise DataError(
                f"{self.idx_path}: the first sequence pointer is {self.sequence_pointers[0]}, not 0"
            )
        bin_size = self.bin_path.stat().st_size
        expected_bin = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if S else 0
        )
        if bin_size != expected_bin:
            raise DataError(
                f"{self.bin_path}: {bin_size} bytes but the index describes {expected_bin}; "
                "the .bin is truncated or belongs to another index"
            )
        self._bin = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype)
        )

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "multimodal": self._multimodal_arg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], state["multimodal"])

    # -- sequences ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.sequence_count <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.sequence_count} sequences")
        i %= self.sequence_count
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sequence_lengths[i])]

    @property
    def multimodal(self) -> bool:
        return self.sequence_modes is not None

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


def _copy_file_into(source: Path, dst_fd: int, dst_offset: int, size: int) -> None:
    """Copy ``size`` bytes of ``source`` to ``dst_fd`` at ``dst_offset`` (in-kernel where the OS can)."""
    with open(source, "rb") as src:
        fd = src.fileno()
        copied = 0
        use_copy_range = hasattr(os, "copy_file_range")
        while copied < size:
            count = min(_COPY_BLOCK, size - copied)
            n = 0
            if use_copy_range:
                try:
                    n = os.copy_file_range(fd, dst_fd, count, copied, dst_offset + copied)
                except OSError:  # another filesystem or a kernel without support: plain reads
                    use_copy_range = False
                    continue
            else:
                data = os.pread(fd, count, copied)
                n = os.pwrite(dst_fd, data, dst_offset + copied) if data else 0
            if n == 0:
                raise DataError(f"{source}: file shrank to {copied} bytes while merging (expected {size})")
            copied += n


def merge_indexed(
    prefixes: Iterable[str | os.PathLike], output_prefix: str | os.PathLike, copy_threads: int = 8
) -> IndexedDataset:
    """Concatenate datasets (same dtype) into one, in the given order.

    Memory stays flat: each source is validated once, then its index is read in chunks in each
    streaming pass, so thousands of shards merge without holding their indices (or thousands of
    memory maps) at once. The ``.bin`` files are copied in parallel into their final offsets.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise DataError("merge_indexed: no input datasets")
    counts = []  # (sequences, documents, bin bytes) per source
    dtype = None
    for prefix in prefixes:
        src = IndexedDataset(prefix)
        if src.multimodal:
            raise DataError(f"{prefix}: multimodal datasets (with sequence modes) cannot be merged")
        if dtype is None:
            dtype = src.dtype
        elif src.dtype != dtype:
            raise DataError(f"cannot merge {prefix} ({src.dtype}) with {prefixes[0]} ({dtype})")
        counts.append((src.sequence_count, src.num_documents, src.bin_path.stat().st_size))
        del src
    bin_path, idx_path = dataset_paths(output_prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = Path(str(bin_path) + suffix), Path(str(idx_path) + suffix)
    try:
        byte_offsets = np.concatenate([[0], np.cumsum([c[2] for c in counts], dtype=np.int64)])
        with open(tmp_bin, "wb") as out:
            out.truncate(int(byte_offsets[-1]))
            jobs = [
                (dataset_paths(p)[0], out.fileno(), int(byte_offsets[i]), counts[i][2])
                for i, p in enumerate(prefixes)
                if counts[i][2]
            ]
            with ThreadPoolExecutor(max(1, min(copy_threads, len(jobs)))) as pool:
                for future in [pool.submit(_copy_file_into, *job) for job in jobs]:
                    future.result()
        with open(tmp_idx, "wb") as out:
            _write_header(out, dtype, sum(c[0] for c in counts), sum(c[1] for c in counts) + 1)
            # Each source's index is read in chunks, pass by pass, in the layout's order.
            for i, prefix in enumerate(prefixes):
                for lengths in _read_chunks(dataset_paths(prefix)[1], HEADER_SIZE, counts[i][0], np.int32):
                    out.write(lengths.tobytes())
            for i, prefix in enumerate(prefixes):
                offset = HEADER_SIZE + 4 * counts[i][0]
                for pointers in _read_chunks(dataset_paths(prefix)[1], offset, counts[i][0], np.int64):
                    out.write((pointers + byte_offsets[i]).tobytes())
            out.write(np.int64(0).tobytes())
            sequence_base = 0
            for i, prefix in enumerate(prefixes):
                offset = HEADER_SIZE + 12 * counts[i][0] + 8  # past the leading 0
                for ends in _read_chunks(dataset_paths(prefix)[1], offset, counts[i][1], np.int64):
                    out.write((ends + sequence_base).tobytes())
                sequence_base += counts[i][0]
        _commit(tmp_bin, tmp_idx, bin_path, idx_path)
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    return IndexedDataset(output_prefix)


def rename_dataset(prefix: str | os.PathLike, output_prefix: str | os.PathLike) -> None:
    """Move a complete dataset to another prefix on the same filesystem, in the committed order."""
    _commit(*dataset_paths(prefix), *dataset_paths(output_prefix))
