"""glm-preprocess end to end: every input format, folders/globs/gzip, the same bytes for any number of
workers, multi-node shards merged == one run, the meta.json sidecar, the summary and the help."""

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset
from data_tools.preprocess import PreprocessOptions, build_parser, main, preprocess
from data_tools.sentences import split_sentences
from data_tools.shards import merge_shards, rank_output_prefix
from data_tools.tokenizer import load_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "run" / "demo" / "corpus" / "austen-chapters.jsonl"
GPT2 = "gpt2"


def _run(inputs, prefix, **options):
    options.setdefault("tokenizer", GPT2)
    stats = preprocess(PreprocessOptions([str(i) for i in inputs], str(prefix), progress=False, **options))
    output = rank_output_prefix(str(prefix), options.get("rank", 0), options.get("world_size", 1))
    return IndexedDataset(output), stats


def _documents(ds, tokenizer=GPT2):
    tok = load_tokenizer(tokenizer)
    out = []
    for d in range(ds.num_documents):
        first, last = ds.document_sequence_range(d)
        out.append([tok.decode(ds[i].tolist()) for i in range(first, last)])
    return out


def _write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _austen_slice(tmp_path, chapters):
    path = tmp_path / "austen.jsonl"
    with open(CORPUS, encoding="utf-8") as src:
        path.write_text("".join(next(src) for _ in range(chapters)))
    return path


def _same_files(a, b):
    return all(Path(f"{a}.{e}").read_bytes() == Path(f"{b}.{e}").read_bytes() for e in ("bin", "idx"))


def test_jsonl_one_sequence_per_sentence(tmp_path):
    texts = [
        "Mr. Bennet came. He sat down.\nShe smiled.",
        "  ",
        "One sentence only",
        "A \u201cquote\u201d. Next!",
    ]
    ds, stats = _run([_write_jsonl(tmp_path / "in.jsonl", texts)], tmp_path / "out")
    assert _documents(ds) == [
        ["Mr. Bennet came.", " He sat down.", "\nShe smiled."],
        ["One sentence only"],
        ['A "quote".', " Next!"],
    ]
    assert (stats.documents, stats.sequences, stats.tokens) == (3, 6, ds.num_tokens)
    assert stats.skipped == {"empty document": 1}
    assert ds.dtype == np.uint16


def test_no_split_sentences_keeps_documents_whole(tmp_path):
    path = _austen_slice(tmp_path, 3)
    split, _ = _run([path], tmp_path / "split")
    whole, stats = _run([path], tmp_path / "whole", split_sentences=False)
    assert whole.document_indices.tolist() == [0, 1, 2, 3]
    assert np.array_equal(whole.tokens(0, whole.num_tokens), split.tokens(0, split.num_tokens))
    assert stats.sequences == 3
    assert json.loads((tmp_path / "whole.meta.json").read_text())["sequence_unit"] == "document"


def test_plain_text_document_units(tmp_path):
    text = "First block line one.\nstill the first block.\n\n  \n\nSecond block. Two sentences.\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    per_file, _ = _run([path], tmp_path / "file", wrapped_lines=True)
    assert _documents(per_file) == [
        ["First block line one.\nstill the first block.", "\n\n  \n\nSecond block.", " Two sentences."]
    ]
    per_block, _ = _run([path], tmp_path / "block", text_document="block", wrapped_lines=True)
    assert _documents(per_block) == [
        ["First block line one.\nstill the first block."],
        ["Second block.", " Two sentences."],
    ]
    per_line, stats = _run([path], tmp_path / "line", text_document="line")
    assert _documents(per_line) == [
        ["First block line one."],
        ["still the first block."],
        ["Second block.", " Two sentences."],
    ]
    assert stats.skipped == {"empty document": 3}


def test_folders_globs_gzip_and_several_inputs(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "From gzip."}) + "\n")
    (folder / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"Compressed text file."))
    (folder / "a.txt").write_text("Plain text file.")
    (folder / ".hidden.txt").write_text("Never read.")
    (folder / "z.data").write_bytes(gzip.compress(json.dumps({"text": "Gzip found by content."}).encode()))
    extra = _write_jsonl(tmp_path / "extra.jsonl", ["Extra file."])
    ds, stats = _run([folder, str(tmp_path / "*.jsonl"), extra], tmp_path / "out", input_format="auto")
    assert [d[0] for d in _documents(ds)] == [
        "Plain text file.",
        "From gzip.",
        "Compressed text file.",
        '{"text": "Gzip found by content."}',  # the format comes from the name: z.data is plain text
        "Extra file.",  # named twice, read once
    ]
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["counts"]["input_files"] == 5 == stats.documents


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl: no such file or folder"):
        _run([tmp_path / "nothing.jsonl"], tmp_path / "out")
    with pytest.raises(DataError, match=r"\*\.none: the pattern matches no file"):
        _run([str(tmp_path / "*.none")], tmp_path / "out")


def test_same_output_for_any_number_of_workers(tmp_path):
    jsonl = _austen_slice(tmp_path, 12)
    block = tmp_path / "blocks.txt"
    block.write_text("\n\n".join(f"Paragraph {i}.\nWrapped line. Mr. Smith said so." for i in range(3000)))
    common = dict(text_document="block", min_unit_bytes=64 << 10)
    one, stats_one = _run([jsonl, block], tmp_path / "one", **common)
    two, stats_two = _run([jsonl, block], tmp_path / "two", workers=2, **common)
    assert _same_files(tmp_path / "one", tmp_path / "two")
    assert stats_one.to_json() == stats_two.to_json()
    assert one.num_documents == 12 + 3000


def test_rank_shards_merged_equal_a_single_run(tmp_path, capsys):
    jsonl = _austen_slice(tmp_path, 8)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"Line {i}. It ends here." for i in range(500)))
    inputs = [jsonl, text]
    single, single_stats = _run(inputs, tmp_path / "single", text_document="line")
    for rank in range(3):
        _run(inputs, tmp_path / "multi", text_document="line", rank=rank, world_size=3)
    shards = sorted(p.name for p in tmp_path.glob("multi_rank*.idx"))
    assert shards == [f"multi_rank0000{r}-of-00003.idx" for r in range(3)]
    assert all(IndexedDataset(tmp_path / s[:-4]).num_documents > 0 for s in shards)
    assert main(["--merge", "-o", str(tmp_path / "multi")]) == 0
    assert _same_files(tmp_path / "single", tmp_path / "multi")
    meta = json.loads((tmp_path / "multi.meta.json").read_text())
    assert meta["counts"]["documents"] == single_stats.documents == 8 + 500
    assert meta["counts"]["tokens"] == single.num_tokens
    assert len(meta["merged_from"]) == 3 and meta["world_size"] == 1
    single_meta = json.loads((tmp_path / "single.meta.json").read_text())
    assert meta["counts"] == single_meta["counts"]
    assert "documents              508" in capsys.readouterr().out


def test_merge_refuses_shards_with_other_settings(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [f"Document {i}." for i in range(10)])
    _run([path], tmp_path / "p", rank=0, world_size=2)
    _run([path], tmp_path / "p", rank=1, world_size=2, split_sentences=False)
    with pytest.raises(DataError, match="another sequence_unit"):
        merge_shards(str(tmp_path / "p"), [], None, "")
    assert not (tmp_path / "p.idx").exists()


def test_merge_reports_missing_ranks(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "in.jsonl", [f"Document {i}." for i in range(10)])
    _run([path], tmp_path / "p", rank=0, world_size=2)
    assert main(["--merge", "-o", str(tmp_path / "p")]) == 1
    assert "ranks 1 of 2 have no complete output yet" in capsys.readouterr().err


def test_merge_from_a_manifest(tmp_path):
    a = _run([_write_jsonl(tmp_path / "a.jsonl", ["Alpha."])], tmp_path / "a")[0]
    b = _run([_write_jsonl(tmp_path / "b.jsonl", ["Beta. Gamma."])], tmp_path / "b")[0]
    manifest = tmp_path / "shards.txt"
    manifest.write_text(f"# in this order\n{tmp_path / 'b'}\n{tmp_path / 'a.idx'}\n")
    assert main(["--merge", "--manifest", str(manifest), "-o", str(tmp_path / "m")]) == 0
    merged = IndexedDataset(tmp_path / "m")
    assert _documents(merged) == [["Beta.", " Gamma."], ["Alpha."]]
    assert merged.num_tokens == a.num_tokens + b.num_tokens


def test_meta_json_describes_the_corpus(tmp_path):
    _run(
        [_write_jsonl(tmp_path / "in.jsonl", ["One. Two.", ""])],
        tmp_path / "out",
        tokenizer="bert-base-uncased",
    )
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["format"] == "megatron-mmidx-v1" and meta["appended_tokens"] == []
    assert meta["tokenizer"]["name"] == "bert-base-uncased"
    assert meta["tokenizer"]["padded_vocab_size"] == 30592
    assert (
        meta["tokenizer"]["command_tokens"]["cls"] == 101 and meta["tokenizer"]["command_tokens"]["eos"] == 0
    )
    assert meta["token_dtype"] == "uint16" and meta["sequence_unit"] == "sentence"
    assert meta["counts"]["documents"] == 1 and meta["counts"]["sequences"] == 2
    assert meta["counts"]["skipped"] == {"empty document": 1}
    assert meta["settings"]["split_sentences"] is True and meta["rank"] == 0


def test_cli_prints_the_summary(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "in.jsonl", ["One. Two.", "", "Three."])
    with open(path, "a") as f:
        f.write("{broken\n")
    code = main(["-i", str(path), "-o", str(tmp_path / "out"), "--tokenizer", GPT2, "--skip-bad-lines",
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"documents\s+2\n", out) and re.search(r"sequences \(sentences\)\s+3\n", out)
    tokens = IndexedDataset(tmp_path / "out").num_tokens
    assert re.search(rf"tokens\s+{tokens}\n", out)
    assert "empty document: 1, malformed JSON: 1" in out
    assert "in.jsonl:4" in out


def test_help_explains_every_flag():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    assert "examples:" in text and "--merge -o data/corpus" in text and "Nothing is appended" in text


def test_sentences_match_the_splitter_on_real_text(tmp_path):
    path = _austen_slice(tmp_path, 1)
    ds, _ = _run([path], tmp_path / "out", standardize_punctuation=False)
    text = json.loads(path.read_text())["text"]
    assert _documents(ds) == [split_sentences(text)]


def test_output_prefix_must_be_a_prefix(tmp_path):
    with pytest.raises(DataError, match="leave out .bin/.idx"):
        _run([_write_jsonl(tmp_path / "in.jsonl", ["x"])], tmp_path / "out.bin")


def test_progress_lines_in_logs(tmp_path, capsys):
    path = _austen_slice(tmp_path, 150)  # 2.5 MB: more than one batch of 1 MiB
    preprocess(PreprocessOptions([str(path)], str(tmp_path / "out"), GPT2, log_interval=0))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[glm-preprocess]")]
    assert len(lines) >= 2
    assert re.search(
        r"\d+\.\d% [\d.]+ of [\d.]+ MB, [\d.]+ MB/s, [\d,]+ docs/s, [\d,]+ tokens/s, ETA \d+:\d\d:\d\d",
        lines[0],
    )
    assert lines[-1].startswith("[glm-preprocess] 100.0%")


def test_custom_tokenizer_json(tmp_path):
    path = _austen_slice(tmp_path, 2)
    load_tokenizer("gpt2").save(tmp_path / "tokenizer.json")
    reference, _ = _run([path], tmp_path / "gpt2")
    custom, _ = _run([path], tmp_path / "custom", tokenizer=str(tmp_path / "tokenizer.json"))
    assert _same_files(tmp_path / "gpt2", tmp_path / "custom")
    meta = json.loads((tmp_path / "custom.meta.json").read_text())
    assert meta["tokenizer"]["name"] == str(tmp_path / "tokenizer.json")


def test_large_vocabularies_are_written_as_int32(tmp_path):
    words = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    word_level = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    word_level.pre_tokenizer = WhitespaceSplit()
    word_level.save(str(tmp_path / "big.json"))
    path = _write_jsonl(tmp_path / "in.jsonl", ["w69999 w1. W2 w3"])
    ds, _ = _run([path], tmp_path / "out", tokenizer=str(tmp_path / "big.json"))
    assert ds.dtype == np.int32 and (tmp_path / "out.idx").read_bytes()[17] == 4
    assert ds[0].tolist() == [69_999, 70_000] and ds.num_documents == 1  # "w1." is not a word here
    assert json.loads((tmp_path / "out.meta.json").read_text())["token_dtype"] == "int32"


def test_merge_refuses_a_shard_that_does_not_match_its_meta(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [f"Document {i}." for i in range(10)])
    for rank in range(2):
        _run([path], tmp_path / "p", rank=rank, world_size=2)
    _run([_write_jsonl(tmp_path / "other.jsonl", ["Other."])], tmp_path / "other")
    for ext in ("bin", "idx"):
        shutil.copy(tmp_path / f"other.{ext}", tmp_path / f"p_rank00001-of-00002.{ext}")
    with pytest.raises(
        DataError, match=r"p_rank00001-of-00002: its meta.json counts .* do not match its index"
    ):
        merge_shards(str(tmp_path / "p"), [], None, "")
    assert not (tmp_path / "p.idx").exists()


def test_rank_and_world_size_come_from_the_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["-o", "x"])
    assert (args.rank, args.world_size) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    args = build_parser().parse_args(["-o", "x"])
    assert (args.rank, args.world_size, args.rank_source) == (3, 8, "SLURM_PROCID/SLURM_NTASKS")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build_parser().parse_args(["-o", "x", "--rank", "0"]).rank == 0
    assert build_parser().parse_args(["-o", "x"]).world_size == 2
