"""MMIDIDX v1: write -> read, the exact byte layout of the spec, files laid out as Megatron-LM and GPT-NeoX
write them (built here byte by byte), every corruption the reader must name, and streaming merges."""

import pickle
import struct

import numpy as np
import pytest

from data_tools.errors import DataError
from data_tools.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    merge_indexed,
    rename_dataset,
    token_dtype,
)

# Three documents: [s0 s1] [s2] [s3 s4 s5]
SEQUENCES = [[5, 6, 7], [8], [9, 10], [], [11, 12, 13, 14], [15]]
DOC_ENDS = [2, 3, 6]


def _spec_bytes(sequences, doc_ends, code, fmt, modes=None):
    """The .idx and .bin as the spec lays them out (frameworks.md §1.1), built with struct only."""
    lengths = [len(s) for s in sequences]
    itemsize = struct.calcsize("<" + fmt)
    pointers, offset = [], 0
    for n in lengths:
        pointers.append(offset)
        offset += n * itemsize
    docs = [0, *doc_ends]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(docs))
    idx += struct.pack(f"<{len(lengths)}i", *lengths)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(docs)}q", *docs)
    if modes is not None:
        idx += struct.pack(f"<{len(modes)}b", *modes)
    flat = [t for s in sequences for t in s]
    return idx, struct.pack(f"<{len(flat)}{fmt}", *flat)


def _write_files(prefix, idx, bin_):
    with open(f"{prefix}.idx", "wb") as f:
        f.write(idx)
    with open(f"{prefix}.bin", "wb") as f:
        f.write(bin_)


def _write(prefix, sequences=SEQUENCES, doc_ends=DOC_ENDS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        start = 0
        for end in doc_ends:
            for s in sequences[start:end]:
                writer.add_sequence(s)
            writer.end_document()
            start = end
    return IndexedDataset(prefix)


def test_write_then_read_back(tmp_path):
    ds = _write(tmp_path / "c")
    assert len(ds) == 6 and ds.num_documents == 3 and ds.num_tokens == 11
    assert [ds[i].tolist() for i in range(6)] == SEQUENCES
    assert ds[-1].tolist() == [15]
    assert ds.document_sequence_range(2) == (3, 6)
    assert ds.get_document(0).tolist() == [5, 6, 7, 8]
    assert ds.get_document(2).tolist() == [11, 12, 13, 14, 15]
    assert ds.document_token_range(1) == (4, 6)
    assert ds.dtype == np.uint16 and not ds.multimodal


def test_batched_writes_equal_one_by_one(tmp_path):
    one = _write(tmp_path / "one")
    with IndexedDatasetWriter(tmp_path / "batched", np.uint16) as writer:
        writer.add_sequences(np.array([5, 6, 7, 8, 9, 10]), np.array([3, 1, 2]))
        writer.add_document_boundaries(np.array([2, 3]))
        writer.add_sequences(np.array([11, 12, 13, 14, 15]), np.array([0, 4, 1]))
        writer.add_document_boundaries(np.array([6]))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"batched.{ext}").read_bytes() == (tmp_path / f"one.{ext}").read_bytes()
    assert IndexedDataset(tmp_path / "batched").num_documents == one.num_documents


@pytest.mark.parametrize("dtype, code, fmt", [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_bytes_match_the_spec(tmp_path, dtype, code, fmt):
    _write(tmp_path / "c", dtype=dtype)
    idx, bin_ = _spec_bytes(SEQUENCES, DOC_ENDS, code, fmt)
    assert (tmp_path / "c.idx").read_bytes() == idx
    assert (tmp_path / "c.bin").read_bytes() == bin_


def test_reads_a_megatron_multimodal_index(tmp_path):
    # Megatron-Core appends an int8 mode per sequence after the document indices (multimodal=True).
    idx, bin_ = _spec_bytes(SEQUENCES, DOC_ENDS, 4, "i", modes=[0, 1, 0, 0, 1, 1])
    _write_files(tmp_path / "mm", idx, bin_)
    ds = IndexedDataset(tmp_path / "mm")
    assert ds.multimodal and ds.sequence_modes.tolist() == [0, 1, 0, 0, 1, 1]
    assert [ds[i].tolist() for i in range(6)] == SEQUENCES
    assert ds.dtype == np.int32


@pytest.mark.parametrize("code, fmt, dtype", [(8, "H", np.uint16), (4, "i", np.int32), (5, "q", np.int64)])
def test_reads_gpt_neox_and_megatron_integer_dtypes(tmp_path, code, fmt, dtype):
    # GPT-NeoX's MMapIndexedDatasetBuilder and Megatron's IndexedDatasetBuilder share this layout.
    idx, bin_ = _spec_bytes(SEQUENCES, DOC_ENDS, code, fmt)
    _write_files(tmp_path / "x", idx, bin_)
    ds = IndexedDataset(tmp_path / "x")
    assert ds.dtype == dtype and ds.get_document(2).tolist() == [11, 12, 13, 14, 15]


def _corrupt(tmp_path, how):
    idx, bin_ = _spec_bytes(SEQUENCES, DOC_ENDS, 8, "H")
    if how == "magic":
        idx = b"MMIDIDY\x00\x00" + idx[9:]
    elif how == "version":
        idx = idx[:9] + struct.pack("<Q", 2) + idx[17:]
    elif how == "float dtype":
        idx = idx[:17] + struct.pack("<B", 6) + idx[18:]
    elif how == "short header":
        idx = idx[:20]
    elif how == "truncated index":
        idx = idx[:-1]
    elif how == "sequence count":
        idx = idx[:18] + struct.pack("<Q", 7) + idx[26:]
    elif how == "document indices":
        idx = idx[:-8] + struct.pack("<q", 5)
    elif how == "truncated bin":
        bin_ = bin_[:-2]
    elif how == "long bin":
        bin_ = bin_ + b"\x00\x00"
    _write_files(tmp_path / "bad", idx, bin_)


@pytest.mark.parametrize(
    "how, message",
    [
        ("magic", "not an MMIDIDX index"),
        ("version", "unsupported index version 2"),
        ("float dtype", "unsupported token dtype code 6"),
        ("short header", "truncated index"),
        ("truncated index", "does not match its header"),
        ("sequence count", "does not match its header"),
        ("document indices", "document indices must run from 0 to the sequence count 6"),
        ("truncated bin", "the .bin is truncated"),
        ("long bin", "the .bin is truncated or belongs to another index"),
    ],
)
def test_corruption_is_named_at_open(tmp_path, how, message):
    _corrupt(tmp_path, how)
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(tmp_path / "bad")
    assert "bad." in str(info.value)  # the message names the file


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        IndexedDataset(tmp_path / "nope")


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_merge_concatenates_in_order(tmp_path):
    _write(tmp_path / "a")
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    _write(tmp_path / "b", sequences=[[1], [2, 3]], doc_ends=[1, 2])
    merged = merge_indexed(
        [tmp_path / "a", tmp_path / "empty", tmp_path / "b"], tmp_path / "m", copy_threads=2
    )
    assert [merged[i].tolist() for i in range(len(merged))] == [*SEQUENCES, [1], [2, 3]]
    assert merged.document_indices.tolist() == [0, 2, 3, 6, 7, 8]
    expected_idx, expected_bin = _spec_bytes([*SEQUENCES, [1], [2, 3]], [2, 3, 6, 7, 8], 8, "H")
    assert (tmp_path / "m.idx").read_bytes() == expected_idx
    assert (tmp_path / "m.bin").read_bytes() == expected_bin
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.")) == ["m.bin", "m.idx"]


def test_merge_refuses_mixed_dtypes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b", dtype=np.int32)
    with pytest.raises(DataError, match="cannot merge"):
        merge_indexed([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert not (tmp_path / "m.idx").exists()


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer:
        writer.add_sequence([1, 2])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_ids_are_refused(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    with (
        pytest.raises(DataError, match="out of range for uint16"),
        IndexedDatasetWriter(tmp_path / "c", np.uint16) as w,
    ):
        w.add_sequences(np.array([1, 70000]), np.array([2]))
    assert list(tmp_path.iterdir()) == []


def test_rename_replaces_an_older_pair(tmp_path):
    _write(tmp_path / "out", sequences=[[1]], doc_ends=[1])
    _write(tmp_path / "new")
    rename_dataset(tmp_path / "new", tmp_path / "out")
    assert IndexedDataset(tmp_path / "out").num_tokens == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]


def test_pickling_reopens_instead_of_copying(tmp_path):
    ds = _write(tmp_path / "c")
    blob = pickle.dumps(ds)
    assert len(blob) < 500
    again = pickle.loads(blob)
    assert again.get_document(2).tolist() == ds.get_document(2).tolist()
