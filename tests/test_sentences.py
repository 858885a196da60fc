"""The rule-based sentence splitter on edge cases and on real Austen text, the batch-independence the
preprocessor relies on, and GLM's punctuation standardization."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.sentences import (
    DOCUMENT_SEPARATOR,
    SENTENCE_END,
    mark_sentence_ends,
    split_sentences,
    standardize_punctuation,
)

CORPUS = Path(__file__).resolve().parent.parent / "run" / "demo" / "corpus" / "austen-chapters.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Bennet was among the earliest. He visited Mrs. Long.",
         ["Mr. Bennet was among the earliest.", " He visited Mrs. Long."]),
        ("Dr. Grant and St. George met Prof. Smith. They talked.",
         ["Dr. Grant and St. George met Prof. Smith.", " They talked."]),
        ('"Stop!" she said. Then she left.', ['"Stop!" she said.', " Then she left."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', " Then he left."]),
        ("(It was over.) Next came the rest.", ["(It was over.)", " Next came the rest."]),
        ("It costs 3.5 dollars. Really?! Yes.", ["It costs 3.5 dollars.", " Really?!", " Yes."]),
        ("Wait... Then it came. He paused... and went on.",
         ["Wait...", " Then it came.", " He paused... and went on."]),
        ("J. R. R. Tolkien wrote it. So did I. Then what?",
         ["J. R. R. Tolkien wrote it.", " So did I.", " Then what?"]),
        ("Use e.g. the first, i.e. The Hobbit. Or not.",
         ["Use e.g. the first, i.e. The Hobbit.", " Or not."]),
        ("See Fig. 3 and No. 5 of Vol. 2 in Jan. 1811. It sold.",
         ["See Fig. 3 and No. 5 of Vol. 2 in Jan. 1811.", " It sold."]),
        ("He was born in 1811. 1812 was worse.", ["He was born in 1811.", " 1812 was worse."]),
        ("1. Introduction\n2. Methods", ["1. Introduction", "\n2. Methods"]),
        ("first line\nsecond line", ["first line", "\nsecond line"]),
        ("one.  \n\n  Two", ["one.  ", "\n\n  Two"]),
        ("lower case after a period. stays together", ["lower case after a period. stays together"]),
        ("\u201cCurly!\u201d He left.", ["\u201cCurly!\u201d", " He left."]),
        ("   ", []),
    ],
)  # fmt: skip
def test_sentence_rules(text, expected):
    assert split_sentences(text) == expected


def test_wrapped_lines_only_blank_lines_end_paragraphs():
    text = "It was a dark\nnight. The rain fell on\nMr. Smith\n\nNew paragraph\nhere"
    assert split_sentences(text, wrapped_lines=True) == [
        "It was a dark\nnight.",
        " The rain fell on\nMr. Smith",
        "\n\nNew paragraph\nhere",
    ]
    assert len(split_sentences(text)) == 6  # unwrapped: every line break ends a sentence


def test_line_ends_keep_their_whitespace_with_the_sentence_before():
    text = "One line \r\nTwo lines\t\r\n\r\nThree"
    assert split_sentences(text) == ["One line \r", "\nTwo lines\t\r", "\n\r\nThree"]
    assert split_sentences(text, wrapped_lines=True) == ["One line \r\nTwo lines\t\r", "\n\r\nThree"]


def _austen(chapter_id):
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["id"] == chapter_id:
                return standardize_punctuation(record["text"])
    raise KeyError(chapter_id)


def test_real_text_pride_and_prejudice():
    sentences = split_sentences(_austen("prideprejudice-01"))
    assert sentences[:6] == [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife.",
        "\nHowever little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters.",
        '\n"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let '
        'at last?"',
        "\nMr. Bennet replied that he had not.",
        '\n"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."',
        "\nMr. Bennet made no answer.",
    ]
    assert '\n"Do you not want to know who has taken it?" cried his wife impatiently.' in sentences
    assert sentences[13:15] == ['\n"Oh!', " Single, my dear, to be sure!"]


def test_real_text_keeps_titles_inside_sentences():
    sentences = split_sentences(_austen("emma-01"))
    title_starts = [
        s for s in sentences if s.strip() in ("Mr.", "Mrs.", "Miss.") or s.endswith((" Mr.", " Mrs."))
    ]
    assert title_starts == []
    assert any("Sixteen years had Miss Taylor been in Mr. Woodhouse's family" in s for s in sentences)
    # every chapter is split into many sentences, and the sentences give the text back
    assert "".join(sentences) == _austen("emma-01").strip() and len(sentences) > 40


_PIECES = [*"aZ .!?\"')(\n\t1_\u2026\u201d", "Mr.", "e.g.", "J.", " The", "No. 5"]
_TRICKY = st.lists(st.sampled_from(_PIECES), max_size=25).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TRICKY.map(str.strip).filter(bool), min_size=1, max_size=5))
def test_a_batch_marks_each_document_as_if_alone(documents):
    """The preprocessor marks a whole batch at once; the result must not depend on the batch."""
    joined = mark_sentence_ends(DOCUMENT_SEPARATOR.join(documents))
    assert joined.split(DOCUMENT_SEPARATOR) == [mark_sentence_ends(d) for d in documents]


def test_text_is_unchanged_apart_from_the_marks():
    text = _austen("persuasion-05")
    assert mark_sentence_ends(text).replace(SENTENCE_END, "") == text


def test_punctuation_standardization_follows_glm():
    text = "\u201cQuote\u201d \u2018single\u2019 en\u2013dash em\u2014dash"
    assert standardize_punctuation(text) == "\"Quote\" 'single' en-dash em\u2014dash"
