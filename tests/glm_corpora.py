"""Tiny real corpora for the data tests: Austen chapters split naively into sentences, one sequence each."""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_tools.indexed import IndexedDatasetWriter, token_dtype
from data_tools.tokenizer import load_tokenizer

AUSTEN = Path(__file__).resolve().parents[1] / "run" / "demo" / "corpus" / "austen-chapters.jsonl"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def austen_chapters(first: int, count: int) -> list[str]:
    with open(AUSTEN) as f:
        lines = f.readlines()[first : first + count]
    return [json.loads(line)["text"] for line in lines]


def write_corpus(
    prefix: Path, documents: list[str], tokenizer: str = "bert-base-uncased", sidecar: bool = True
) -> str:
    """Write ``documents`` as an MMIDIDX corpus, one sequence per (naively split) sentence."""
    tok = load_tokenizer(tokenizer)
    with IndexedDatasetWriter(prefix, token_dtype(tok.num_tokens)) as writer:
        for text in documents:
            sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
            for ids in tok.encode_batch(sentences):
                if ids:
                    writer.add_sequence(ids)
            writer.end_document()
    if sidecar:
        Path(str(prefix) + ".meta.json").write_text(json.dumps({"tokenizer": tok.name}))
    return str(prefix)


def austen_corpus(directory: Path, first: int = 0, count: int = 12, name: str = "austen") -> str:
    return write_corpus(directory / name, austen_chapters(first, count))
