"""glm-train-tokenizer: a byte-level BPE trained on real text, with the command tokens after its vocabulary,
usable by the preprocessing tool."""

import json

import pytest

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset
from data_tools.preprocess import main as preprocess_main
from data_tools.tokenizer import GLMTokenizer
from data_tools.train_tokenizer import main, train_tokenizer
from tests.glm_corpora import austen_chapters


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "austen.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in austen_chapters(0, 6)))
    return path


def test_trained_vocabulary_then_command_tokens_in_gpt2_order(corpus, tmp_path):
    output = tmp_path / "tok" / "tokenizer.json"
    assert (
        main(["--input", str(corpus), "--vocab-size", "800", "--output", str(output), "--no-progress"]) == 0
    )
    tokenizer = GLMTokenizer.from_name(str(output))
    size = tokenizer.text_vocab_size
    assert size == 800
    c = tokenizer.command
    assert [c.eos, c.sop, c.eop, c.cls, c.mask, c.sep, c.unk, c.gmask, c.smask, c.dblock] == list(
        range(800, 810)
    )
    text = "Emma Woodhouse, handsome, clever, and rich."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned from the corpus
    assert not list(output.parent.glob("*.tmp-*"))


def test_preprocess_accepts_the_trained_tokenizer(corpus, tmp_path):
    output = tmp_path / "tokenizer.json"
    train_tokenizer([str(corpus)], output, 600, progress=False)
    prefix = tmp_path / "corpus"
    assert (
        preprocess_main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                str(output),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    dataset = IndexedDataset(prefix)
    assert dataset.num_documents == 6 and int(dataset.tokens(0, dataset.num_tokens).max()) < 600


def test_no_documents_or_a_tiny_vocabulary_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([str(empty)], tmp_path / "t.json", 600, progress=False)
    with pytest.raises(DataError, match="more than the 256 byte symbols"):
        train_tokenizer([str(empty)], tmp_path / "t.json", 200, progress=False)
    assert not (tmp_path / "t.json").exists()
