"""GLM tokenizers on HuggingFace `tokenizers`, with GLM's command tokens at the reference's ids.

Three sources are supported:

* ``bert-base-uncased``: BERT uncased WordPiece (GLM-Base/Large/410M/515M). The document separator
  (``eos``) is ``[PAD]`` (id 0); the block tokens are appended after the 30,522 text tokens.
* ``gpt2``: GPT-2 byte-level BPE (GLM-2B/10B). ``eos`` is ``<|endoftext|>`` (50256); ``[CLS]``,
  ``[MASK]``, ... are appended after the block tokens.
* a path to a ``tokenizer.json`` (for example one written by ``glm-train-tokenizer``): command tokens
  are looked up by their strings and appended in the GPT-2 order when missing.

Ids of the appended tokens follow THUDM/GLM exactly, so released checkpoints line up:

=========== ===== ===== ===== ====== ===== ===== ===== ======= ======= ======== ======
vocabulary  eos   [CLS] [MASK] [SEP] [UNK] sop   eop   [gMASK] [sMASK] [dBLOCK] padded
=========== ===== ===== ===== ====== ===== ===== ===== ======= ======= ======== ======
BERT        0     101   103   102    100   30522 30523 30524   30525   30526    30592
GPT-2       50256 50259 50260 50261  50262 50257 50258 50263   50264   50265    50304
=========== ===== ===== ===== ====== ===== ===== ===== ======= ======= ======== ======
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

from data_tools.errors import DataError

SOP = "<|startofpiece|>"
EOP = "<|endofpiece|>"
GPT2_EOS = "<|endoftext|>"

# Order in which missing command tokens are appended after the text vocabulary. For BERT the
# reference appends the block tokens first, then the task-mask tokens, then [dBLOCK]; for GPT-2 and
# new BPE vocabularies the block tokens come before [CLS]/[MASK]/[SEP]/[UNK].
_BERT_APPEND_ORDER = (SOP, EOP, "[gMASK]", "[sMASK]", "[dBLOCK]")
_BPE_APPEND_ORDER = (
    GPT2_EOS,
    SOP,
    EOP,
    "[CLS]",
    "[MASK]",
    "[SEP]",
    "[UNK]",
    "[gMASK]",
    "[sMASK]",
    "[dBLOCK]",
)

_LSTRIP_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]")

BUILTIN_TOKENIZERS = ("bert-base-uncased", "gpt2")


@dataclasses.dataclass(frozen=True)
class CommandTokens:
    """Ids of GLM's named command tokens. ``pad`` always equals ``eos`` (the document separator)."""

    pad: int
    eos: int
    cls: int
    mask: int
    sep: int
    unk: int
    sop: int
    eop: int
    gmask: int
    smask: int
    dblock: int

    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


def _bpe_added_tokens(strings: Sequence[str]) -> list[AddedToken]:
    # In byte-level BPE the space before a mask belongs to the mask (" [MASK]" is one token), as in
    # the reference's GPT-2 tokenizer.
    return [AddedToken(s, special=True, lstrip=s in _LSTRIP_TOKENS) for s in strings]


def _vocab_path(name: str) -> str:
    return str(resources.files("data_tools") / "vocab" / name)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class GLMTokenizer:
    """A HuggingFace tokenizer plus GLM's command tokens.

    ``encode`` treats text as text: a literal "[MASK]" in a corpus stays characters, so raw data can
    never inject control tokens. ``encode_with_commands`` recognizes the command strings; it is the path
    for prompts typed by a user (generation, cloze evaluation).
    """

    def __init__(self, hf_tokenizer: Tokenizer, name: str, text_vocab_size: int, eos_string: str):
        self.name = name
        self.text_vocab_size = text_vocab_size
        self._commands_tokenizer = hf_tokenizer
        self._text_tokenizer = Tokenizer.from_str(hf_tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True
        ids = {s: hf_tokenizer.token_to_id(s) for s in (*_BPE_APPEND_ORDER[1:], eos_string)}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise DataError(f"tokenizer {name!r} lacks the command tokens {missing}")
        eos = ids[eos_string]
        self.command = CommandTokens(
            pad=eos,
            eos=eos,
            cls=ids["[CLS]"],
            mask=ids["[MASK]"],
            sep=ids["[SEP]"],
            unk=ids["[UNK]"],
            sop=ids[SOP],
            eop=ids[EOP],
            gmask=ids["[gMASK]"],
            smask=ids["[sMASK]"],
            dblock=ids["[dBLOCK]"],
        )
        self.num_tokens = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name_or_path: str) -> GLMTokenizer:
        """``bert-base-uncased``, ``gpt2`` or a path to a ``tokenizer.json``."""
        if name_or_path == "bert-base-uncased":
            impl = BertWordPieceTokenizer(_vocab_path("bert-base-uncased-vocab.txt"), lowercase=True)
            text_size = impl.get_vocab_size()
            impl.add_special_tokens(["[PAD]", "[CLS]", "[MASK]", "[SEP]", "[UNK]"])
            impl.add_special_tokens(list(_BERT_APPEND_ORDER))
            return cls(impl._tokenizer, name_or_path, text_size, "[PAD]")
        if name_or_path == "gpt2":
            impl = ByteLevelBPETokenizer(_vocab_path("gpt2-vocab.json"), _vocab_path("gpt2-merges.txt"))
            text_size = impl.get_vocab_size()
            impl.add_special_tokens(_bpe_added_tokens(_BPE_APPEND_ORDER))
            return cls(impl._tokenizer, name_or_path, text_size, GPT2_EOS)
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"unknown tokenizer {name_or_path!r}: use one of {', '.join(BUILTIN_TOKENIZERS)} "
                "or the path of a tokenizer.json (glm-train-tokenizer writes one)"
            )
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error names the JSON problem
            raise DataError(f"{path}: not a valid tokenizer.json: {exc}") from exc
        text_size = hf.get_vocab_size(with_added_tokens=False)
        if hf.token_to_id(GPT2_EOS) is not None:
            eos_string = GPT2_EOS
        elif hf.token_to_id("[PAD]") is not None:
            eos_string = "[PAD]"
        else:
            eos_string = GPT2_EOS
        hf.add_special_tokens(_bpe_added_tokens([s for s in _BPE_APPEND_ORDER if hf.token_to_id(s) is None]))
        return cls(hf, str(path), text_size, eos_string)

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens; command strings stay plain text."""
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents on the tokenizer's native thread pool (``TOKENIZERS_PARALLELISM``)."""
        encodings = self._text_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_with_commands(self, text: str) -> list[int]:
        """Like ``encode`` but "[MASK]", "[gMASK]", "[sMASK]", "<|startofpiece|>", ... become their ids."""
        return self._commands_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_command_tokens: bool = False) -> str:
        return self._commands_tokenizer.decode(list(ids), skip_special_tokens=skip_command_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._commands_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._commands_tokenizer.id_to_token(token_id)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """The embedding-table size: all tokens rounded up to ``multiple`` (dummy rows at the end)."""
        return round_up(self.num_tokens, multiple)

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``tokenizer.json`` that ``from_name`` reads back with the same ids."""
        self._commands_tokenizer.save(str(path))

    def __repr__(self) -> str:
        return f"GLMTokenizer({self.name!r}, tokens={self.num_tokens}, eos={self.command.eos})"


def load_tokenizer(name_or_path: str) -> GLMTokenizer:
    """``GLMTokenizer.from_name``, built once per process for each resolved name."""
    key = name_or_path if name_or_path in BUILTIN_TOKENIZERS else str(Path(name_or_path).resolve())
    return _load_cached(key)


@functools.lru_cache(maxsize=8)
def _load_cached(key: str) -> GLMTokenizer:
    return GLMTokenizer.from_name(key)
