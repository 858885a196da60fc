"""Bad input: each problem stops the run with file:line (or is skipped and counted with --skip-bad-lines),
undecodable bytes follow --errors, empty documents are skipped and counted."""

import gzip
import json

import pytest

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset
from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.tokenizer import load_tokenizer


def _run(inputs, prefix, **options):
    options.setdefault("tokenizer", "gpt2")
    return preprocess(PreprocessOptions([str(i) for i in inputs], str(prefix), progress=False, **options))


def _lines(tmp_path, *lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def _good(i):
    return json.dumps({"text": f"Document {i}."})


def _texts(prefix):
    ds = IndexedDataset(prefix)
    tok = load_tokenizer("gpt2")
    return [tok.decode(ds.get_document(d).tolist()) for d in range(ds.num_documents)]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "unterminated', r"in\.jsonl:3: malformed JSON \(Unterminated string"),
        ('{"body": "x"}', r"in\.jsonl:3: missing key 'text' \(keys: body\); choose the key with --json-key"),
        ('{"text": 42}', r"in\.jsonl:3: key 'text' is int, not text"),
        ('["text"]', r"in\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_bad_json_lines_name_file_and_line(tmp_path, bad_line, message):
    path = _lines(tmp_path, _good(0), _good(1), bad_line, _good(3))
    with pytest.raises(DataError, match=message) as info:
        _run([path], tmp_path / "out")
    assert "--skip-bad-lines" in str(info.value)
    assert list(tmp_path.iterdir()) == [path]  # nothing written, nothing left behind


def test_line_numbers_count_from_the_file_start_in_any_share(tmp_path):
    # Rank 1 of 2 reads the second half of the file: the line number must still be the file's.
    lines = [_good(i) for i in range(400)]
    lines[350] = "{oops"
    path = _lines(tmp_path, *lines)
    _run([path], tmp_path / "out", rank=0, world_size=2)
    with pytest.raises(DataError, match=r"in\.jsonl:351: malformed JSON"):
        _run([path], tmp_path / "out", rank=1, world_size=2)


def test_skip_bad_lines_counts_each_reason(tmp_path):
    path = _lines(tmp_path, _good(0), "{oops", '{"body": 1}', '{"text": null}', "", "  ", _good(6),
                  b"\xff\xfe bad", '{"text": ""}', '{"text": "   "}', _good(10))  # fmt: skip
    stats = _run([path], tmp_path / "out", skip_bad_lines=True)
    assert stats.skipped == {
        "malformed JSON": 1,
        "missing key 'text'": 1,
        "non-string 'text'": 1,
        "invalid UTF-8": 1,
        "empty document": 2,
    }
    assert stats.documents == 3 and _texts(tmp_path / "out") == ["Document 0.", "Document 6.", "Document 10."]
    assert {f"{path}:2: malformed JSON", f"{path}:3: missing key 'text'", f"{path}:8: invalid UTF-8"} <= set(
        stats.examples
    )
    assert json.loads((tmp_path / "out.meta.json").read_text())["counts"]["skipped"]["malformed JSON"] == 1


def test_undecodable_bytes_stop_the_run_by_default(tmp_path):
    path = _lines(tmp_path, "Good line.", b"Bad \xc3\x28 byte.", name="in.txt")
    with pytest.raises(DataError, match=r"in\.txt:2: invalid UTF-8 at byte 4 of the line .*--errors replace"):
        _run([path], tmp_path / "out", text_document="line")


def test_errors_replace_substitutes_and_counts(tmp_path):
    path = _lines(tmp_path, "Good line.", b"Bad \xc3\x28 byte.", name="in.txt")
    stats = _run([path], tmp_path / "out", text_document="line", errors="replace")
    assert _texts(tmp_path / "out") == ["Good line.", "Bad \ufffd( byte."]
    assert stats.repaired == {"lines with undecodable bytes replaced": 1} and not stats.skipped


def test_lone_surrogates_in_json_follow_errors(tmp_path):
    path = _lines(tmp_path, _good(0), '{"text": "half \\ud800 pair"}')
    with pytest.raises(DataError, match=r"in\.jsonl:2: the JSON string holds a lone surrogate"):
        _run([path], tmp_path / "out")
    stats = _run([path], tmp_path / "out", errors="replace")
    assert _texts(tmp_path / "out")[1] == "half \ufffd pair" and stats.repaired == {
        "lone surrogates replaced": 1
    }


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = _lines(tmp_path, "", "   ", "Real text.", "\t", name="in.txt")
    stats = _run([path], tmp_path / "out", text_document="line")
    assert stats.documents == 1 and stats.skipped == {"empty document": 3}
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("  \n")
    stats = _run([empty_file], tmp_path / "none")
    assert stats.documents == 0 and stats.skipped == {"empty document": 1}
    assert IndexedDataset(tmp_path / "none").num_documents == 0


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(_good(i) for i in range(2000)) + "\n").encode())[:-200])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: corrupt or truncated gzip file"):
        _run([path], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl.gz"]
