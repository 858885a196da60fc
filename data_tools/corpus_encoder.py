"""Turns batches of documents into token arrays with sentence and document boundaries.

One batch costs a handful of C-level string operations, ONE call to the tokenizer's native batch
encoder and a few numpy operations, whatever the number of documents or sentences:

1. documents are joined with separators; punctuation standardization and the sentence splitter run once
   over the joined text and put ``SENTENCE_END`` after each sentence;
2. the text is cut back into documents and encoded by ``encode_batch_fast``, with ``SENTENCE_END``
   registered as an added token of a private copy of the tokenizer, so the marks come back as one known
   id that never merges with neighbouring text (added tokens split the input before tokenizing, so a
   subword can never straddle a sentence boundary);
3. numpy finds the marks, derives the sentence lengths and document ends, and removes the marks.

Nothing is appended to documents: the sample builder adds ``[CLS]`` and ``eos`` itself.
"""

from __future__ import annotations

import dataclasses
import tempfile
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from data_tools.errors import DataError
from data_tools.sentences import (
    DOCUMENT_SEPARATOR,
    SENTENCE_END,
    mark_sentence_ends,
    standardize_punctuation,
)
from data_tools.tokenizer import GLMTokenizer

_JOIN = SENTENCE_END + DOCUMENT_SEPARATOR


@dataclasses.dataclass(frozen=True)
class TextOptions:
    split_sentences: bool = True
    wrapped_lines: bool = False
    standardize_punctuation: bool = True


@dataclasses.dataclass
class EncodedBatch:
    tokens: np.ndarray  # int32, all sequences concatenated
    sequence_lengths: np.ndarray  # int32, one per sequence (sentence, or document)
    document_ends: np.ndarray  # int64, exclusive end of each document in sequences, from 0
    empty_documents: int  # documents that produced no token (dropped)

    @property
    def document_count(self) -> int:
        return self.document_ends.size


def _marking_tokenizer(tokenizer: GLMTokenizer) -> tuple[Tokenizer, int]:
    """A copy of the corpus tokenizer (command strings stay text) that knows ``SENTENCE_END``."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        tokenizer.save(path)
        hf = Tokenizer.from_file(str(path))
    hf.encode_special_tokens = True  # "[MASK]" in a corpus is text, as in GLMTokenizer.encode
    hf.no_truncation()
    hf.no_padding()
    hf.add_tokens([AddedToken(SENTENCE_END, special=False, normalized=False)])
    return hf, hf.token_to_id(SENTENCE_END)


# The tokenizer's working memory grows with the string it is given (about 100x the text for its
# encodings); documents longer than this are encoded in pieces cut after sentence marks, and pieces are
# encoded a few MB at a time, so memory stays flat even for a multi-megabyte document. Subwords never
# straddle a mark, so the pieces' tokens join up to the document's.
_PIECE_CHARS = 1 << 18
_GROUP_CHARS = 1 << 21


def _pieces(text: str) -> list[str]:
    """``text`` (which ends with a sentence mark) cut after marks into pieces of about ``_PIECE_CHARS``."""
    if len(text) <= _PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.rfind(SENTENCE_END, start, start + _PIECE_CHARS)
        if end < start:  # one sentence longer than a piece: it stays whole
            end = text.find(SENTENCE_END, start + _PIECE_CHARS)
        pieces.append(text[start : end + 1])
        start = end + 1
    return pieces


class CorpusEncoder:
    def __init__(self, tokenizer: GLMTokenizer, options: TextOptions):
        self.options = options
        self.tokenizer_name = tokenizer.name
        self._tokenizer, self._mark_id = _marking_tokenizer(tokenizer)

    def prepare(self, texts: list[str]) -> list[str]:
        """The documents' text as tokenized: cleaned, sentence ends marked, each ending with a mark."""
        plain = "".join(texts)  # one check for all; instant when the text is Latin-1
        if SENTENCE_END in plain or DOCUMENT_SEPARATOR in plain:
            # The two noncharacters are reserved for internal use; real text essentially never holds them.
            texts = [t.replace(SENTENCE_END, "\ufffd").replace(DOCUMENT_SEPARATOR, "\ufffd") for t in texts]
        joined = _JOIN.join(texts)
        if self.options.standardize_punctuation:
            joined = standardize_punctuation(joined)
        if self.options.split_sentences:
            joined = mark_sentence_ends(joined, self.options.wrapped_lines)
        return (joined + SENTENCE_END).split(DOCUMENT_SEPARATOR)

    def encode(self, texts: list[str]) -> EncodedBatch:
        """Encode stripped, non-empty documents; sentences that produce no token are dropped."""
        return self.encode_prepared(self.prepare(texts) if texts else [])

    def _encode_in_pieces(self, prepared: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All tokens of ``prepared`` concatenated (int32) and the token count of each document."""
        pieces, owner = [], []
        for index, text in enumerate(prepared):
            for piece in _pieces(text):
                pieces.append(piece)
                owner.append(index)
        chunks, piece_counts = [], []
        group_start, group_chars = 0, 0
        for end, piece in enumerate(pieces, 1):
            group_chars += len(piece)
            if group_chars >= _GROUP_CHARS or end == len(pieces):
                encodings = self._tokenizer.encode_batch_fast(
                    pieces[group_start:end], add_special_tokens=False
                )
                ids = [e.ids for e in encodings]
                del encodings
                counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                chunks.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(counts.sum())))
                piece_counts.append(counts)
                group_start, group_chars = end, 0
        counts = np.bincount(np.asarray(owner), weights=np.concatenate(piece_counts), minlength=len(prepared))
        return np.concatenate(chunks), counts.astype(np.int64)

    def encode_prepared(self, prepared: list[str]) -> EncodedBatch:
        """``encode`` in two steps, so that a thread can prepare the next batch while this one encodes."""
        if not prepared:
            empty = np.zeros(0, np.int32)
            return EncodedBatch(empty, empty, np.zeros(0, np.int64), 0)
        flat, counts = self._encode_in_pieces(prepared)
        marks = np.flatnonzero(flat == self._mark_id)
        # Every document ends with a mark, so the mark at its last token closes its last sentence.
        document_last = np.cumsum(counts) - 1
        if not np.all(flat[document_last] == self._mark_id):
            raise DataError(f"tokenizer {self.tokenizer_name!r} appends tokens to the text: unusable here")
        document_ends = np.searchsorted(marks, document_last) + 1
        sentence_ends = marks - np.arange(marks.size)  # in tokens once the marks are removed
        lengths = np.diff(sentence_ends, prepend=0)
        tokens = flat[np.not_equal(flat, self._mark_id)]
        keep = lengths > 0
        if not keep.all():
            document_ends = np.cumsum(keep)[document_ends - 1]
            lengths = lengths[keep]
        non_empty = np.diff(document_ends, prepend=0) > 0
        return EncodedBatch(
            tokens=tokens,
            sequence_lengths=lengths.astype(np.int32),
            document_ends=document_ends[non_empty].astype(np.int64),
            empty_documents=int(non_empty.size - np.count_nonzero(non_empty)),
        )
