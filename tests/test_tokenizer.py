"""GLM tokenizers: command-token ids of the reference, known encodings, and agreement with independent
pure-Python implementations of WordPiece and GPT-2 BPE on real text."""

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from data_tools.tokenizer import GLMTokenizer, load_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "run" / "demo" / "corpus" / "austen-chapters.jsonl"

# The ids THUDM/GLM gives its command tokens and the padded vocabulary (data_utils/tokenization.py there).
REFERENCE_IDS = {
    "bert-base-uncased": dict(
        pad=0,
        eos=0,
        cls=101,
        mask=103,
        sep=102,
        unk=100,
        sop=30522,
        eop=30523,
        gmask=30524,
        smask=30525,
        dblock=30526,
    ),
    "gpt2": dict(
        pad=50256,
        eos=50256,
        cls=50259,
        mask=50260,
        sep=50261,
        unk=50262,
        sop=50257,
        eop=50258,
        gmask=50263,
        smask=50264,
        dblock=50265,
    ),
}
REFERENCE_PADDED = {"bert-base-uncased": 30592, "gpt2": 50304}


def _austen_paragraphs(n: int) -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"] + "\n" + json.loads(f.readline())["text"]
    return text.split("\n")[:n]


@pytest.mark.parametrize("name", sorted(REFERENCE_IDS))
def test_command_token_ids_match_the_reference(name):
    tok = load_tokenizer(name)
    for field, expected in REFERENCE_IDS[name].items():
        assert getattr(tok.command, field) == expected, field
    assert tok.padded_vocab_size(128) == REFERENCE_PADDED[name]


def test_known_encodings():
    bert = load_tokenizer("bert-base-uncased")
    assert bert.encode("hello world") == [7592, 2088]
    assert bert.encode("Hello World") == [7592, 2088]
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (
        gpt2.decode(gpt2.encode("It is a truth universally acknowledged"))
        == "It is a truth universally acknowledged"
    )


def test_bert_agrees_with_the_pure_python_wordpiece_on_real_text():
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = str(resources.files("data_tools") / "vocab" / "bert-base-uncased-vocab.txt")
    reference = BertTokenizerLegacy(vocab, do_lower_case=True)
    ours = load_tokenizer("bert-base-uncased")
    paragraphs = _austen_paragraphs(60)
    for text, ids in zip(paragraphs, ours.encode_batch(paragraphs)):
        assert ids == reference.convert_tokens_to_ids(reference.tokenize(text)), text


@lru_cache(maxsize=1)
def _gpt2_tables():
    # The GPT-2 byte-to-unicode table and merge ranks, written from the published algorithm.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    byte_to_char = {b: chr(c) for b, c in zip(printable, codes)}
    base = resources.files("data_tools") / "vocab"
    encoder = json.loads((base / "gpt2-vocab.json").read_text(encoding="utf-8"))
    merges = (base / "gpt2-merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
    return byte_to_char, encoder, ranks


def _python_gpt2(text: str) -> list[int]:
    import re

    byte_to_char, encoder, ranks = _gpt2_tables()
    # GPT-2's pre-tokenization pattern restricted to ASCII letters/digits, enough for English prose.
    pattern = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        word = tuple(byte_to_char[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(encoder[w] for w in word)
    return ids


def test_gpt2_agrees_with_a_pure_python_bpe_on_real_text():
    ours = load_tokenizer("gpt2")
    paragraphs = [p for p in _austen_paragraphs(60) if p.isascii()]
    assert len(paragraphs) > 30
    for text, ids in zip(paragraphs, ours.encode_batch(paragraphs)):
        assert ids == _python_gpt2(text), text


@pytest.mark.parametrize("name", sorted(REFERENCE_IDS))
def test_command_strings_in_text_stay_text_unless_asked(name):
    tok = load_tokenizer(name)
    plain = tok.encode("the [MASK] is [gMASK] here")
    assert tok.command.mask not in plain and tok.command.gmask not in plain
    commands = tok.encode_with_commands("the [MASK] is [gMASK] here <|startofpiece|>")
    assert tok.command.mask in commands and tok.command.gmask in commands and tok.command.sop in commands


def test_gpt2_mask_absorbs_the_preceding_space():
    tok = load_tokenizer("gpt2")
    assert tok.encode_with_commands("hello [MASK] x") == [31373, tok.command.mask, 2124]


def test_encode_batch_equals_encode():
    tok = load_tokenizer("bert-base-uncased")
    texts = _austen_paragraphs(20)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_saved_tokenizer_json_reloads_with_the_same_ids(tmp_path):
    tok = load_tokenizer("gpt2")
    tok.save(tmp_path / "tokenizer.json")
    again = GLMTokenizer.from_name(str(tmp_path / "tokenizer.json"))
    assert again.command == tok.command and again.num_tokens == tok.num_tokens
    assert again.encode("Hello world") == [15496, 995]


def test_new_bpe_gets_command_tokens_appended_after_its_vocabulary(tmp_path):
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(_austen_paragraphs(200), vocab_size=600, min_frequency=2, show_progress=False)
    trainer.save(str(tmp_path / "tokenizer.json"))
    tok = GLMTokenizer.from_name(str(tmp_path / "tokenizer.json"))
    size = tok.text_vocab_size
    assert (tok.command.eos, tok.command.sop, tok.command.eop, tok.command.cls, tok.command.mask) == (
        size,
        size + 1,
        size + 2,
        size + 3,
        size + 4,
    )
    assert tok.command.dblock == size + 9 and tok.num_tokens == size + 10


def test_unknown_tokenizer_is_a_clear_error():
    from data_tools.errors import DataError

    with pytest.raises(DataError, match="unknown tokenizer 'bert-large-cased'"):
        GLMTokenizer.from_name("bert-large-cased")
