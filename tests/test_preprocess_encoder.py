"""The corpus encoder: sentence sequences are exactly the document's tokens cut at sentence ends, literal
command strings stay text, and sentences or documents that produce no token are dropped and counted."""

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.corpus_encoder import CorpusEncoder, TextOptions
from data_tools.sentences import split_sentences, standardize_punctuation
from data_tools.tokenizer import load_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "run" / "demo" / "corpus" / "austen-chapters.jsonl"


def _chapters(n):
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(next(f))["text"].strip() for _ in range(n)]


def _sequences(batch):
    ends = np.cumsum(batch.sequence_lengths)
    return [batch.tokens[e - n : e].tolist() for e, n in zip(ends, batch.sequence_lengths)]


@pytest.mark.parametrize("name", ["bert-base-uncased", "gpt2"])
def test_sentences_concatenate_to_the_document_tokens(name):
    tokenizer = load_tokenizer(name)
    documents = _chapters(6)
    batch = CorpusEncoder(tokenizer, TextOptions()).encode(documents)
    whole = [tokenizer.encode(standardize_punctuation(d)) for d in documents]
    assert batch.tokens.tolist() == [t for ids in whole for t in ids]
    sentence_counts = np.diff(batch.document_ends, prepend=0)
    assert batch.document_count == 6 and np.all(sentence_counts > 30)
    token_counts = np.add.reduceat(batch.sequence_lengths, np.concatenate([[0], batch.document_ends[:-1]]))
    assert token_counts.tolist() == [len(ids) for ids in whole]


def test_each_sequence_is_one_sentence():
    # Byte-level BPE decodes losslessly, so every sequence must give back exactly its sentence.
    tokenizer = load_tokenizer("gpt2")
    documents = _chapters(2)
    batch = CorpusEncoder(tokenizer, TextOptions()).encode(documents)
    expected = [s for d in documents for s in split_sentences(standardize_punctuation(d))]
    assert [tokenizer.decode(seq) for seq in _sequences(batch)] == expected


def test_one_sequence_per_document_without_splitting():
    tokenizer = load_tokenizer("bert-base-uncased")
    documents = _chapters(3)
    split = CorpusEncoder(tokenizer, TextOptions()).encode(documents)
    whole = CorpusEncoder(tokenizer, TextOptions(split_sentences=False)).encode(documents)
    assert whole.document_ends.tolist() == [1, 2, 3]
    assert np.array_equal(whole.tokens, split.tokens)


def test_command_strings_in_text_stay_text():
    tokenizer = load_tokenizer("gpt2")
    batch = CorpusEncoder(tokenizer, TextOptions()).encode(
        ["Fill [MASK] and [gMASK] here. <|endoftext|> Yes."]
    )
    command_ids = {tokenizer.command.mask, tokenizer.command.gmask, tokenizer.command.eos}
    assert not command_ids & set(batch.tokens.tolist())
    assert tokenizer.decode(batch.tokens.tolist()) == "Fill [MASK] and [gMASK] here. <|endoftext|> Yes."


def test_tokenless_sentences_and_documents_are_dropped():
    tokenizer = load_tokenizer("bert-base-uncased")  # BERT's normalizer deletes control characters
    batch = CorpusEncoder(tokenizer, TextOptions()).encode(
        ["Hello there.\n\x01\x02\nGoodbye.", "\x01\x02", "Last."]
    )
    assert [tokenizer.decode(s) for s in _sequences(batch)] == ["hello there.", "goodbye.", "last."]
    assert batch.document_ends.tolist() == [2, 3]
    assert batch.empty_documents == 1


def test_reserved_marks_in_the_input_do_not_split():
    tokenizer = load_tokenizer("gpt2")
    batch = CorpusEncoder(tokenizer, TextOptions()).encode(["one\uffff two\ufffe three"])
    assert batch.document_ends.tolist() == [1]
    assert tokenizer.decode(batch.tokens.tolist()) == "one\ufffd two\ufffd three"


def test_punctuation_standardization_can_be_turned_off():
    tokenizer = load_tokenizer("gpt2")
    text = "\u201cHi\u201d \u2013 she said."
    on = CorpusEncoder(tokenizer, TextOptions()).encode([text])
    off = CorpusEncoder(tokenizer, TextOptions(standardize_punctuation=False)).encode([text])
    assert tokenizer.decode(on.tokens.tolist()) == '"Hi" - she said.'
    assert tokenizer.decode(off.tokens.tolist()) == text


@pytest.mark.parametrize("tokenizer_name", ["bert-base-uncased", "gpt2"])
def test_long_documents_encode_in_pieces_to_the_same_tokens(monkeypatch, tokenizer_name):
    from data_tools import corpus_encoder
    from tests.glm_corpora import austen_chapters

    texts = ["\n".join(austen_chapters(0, 3)), "A short one. Two sentences.", austen_chapters(5, 1)[0]]
    encoder = CorpusEncoder(load_tokenizer(tokenizer_name), TextOptions())
    whole = encoder.encode(texts)
    # Pieces of ~2 KB cut after sentence marks, encoded ~8 KB at a time: the memory-bounded path.
    monkeypatch.setattr(corpus_encoder, "_PIECE_CHARS", 2048)
    monkeypatch.setattr(corpus_encoder, "_GROUP_CHARS", 8192)
    assert len(corpus_encoder._pieces(encoder.prepare(texts)[0])) > 10
    pieced = encoder.encode(texts)
    assert np.array_equal(pieced.tokens, whole.tokens)
    assert np.array_equal(pieced.sequence_lengths, whole.sequence_lengths)
    assert np.array_equal(pieced.document_ends, whole.document_ends)
