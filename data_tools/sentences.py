"""English text preparation for corpora: GLM's punctuation standardization and a rule-based sentence splitter.

The splitter needs no downloaded model (NLTK's punkt needs its data files) and runs as a few C-level
regular-expression passes per batch of documents, so it costs a few percent of tokenizing.
It marks the end of each sentence with ``SENTENCE_END`` (a Unicode noncharacter, reserved for
internal use) instead of cutting the string; the corpus encoder turns the marks into sequence
boundaries. Rules:

* A sentence ends after ``.``, ``!``, ``?`` or ``…`` (runs such as ``?!`` or ``...`` included) and the
  closing quotes and brackets that follow them, when whitespace and then a sentence start follow: an
  uppercase letter or a digit, possibly behind opening quotes or brackets. So ``"Stop!" she said.``
  stays one sentence and ``He said "Stop." Then he left.`` is two.
* Not after abbreviations (``Mr.``, ``Mrs.``, ``Dr.``, ``St.``, ``e.g.``, ``vs.``, ``Jan.``, ...),
  single-letter initials (``J. R. R. Tolkien``; ``I.`` is a pronoun and may end a sentence) and list
  numbers at the start of a line (``1. Introduction``). Decimals (``3.5``) never split: no whitespace
  follows the point.
* Line breaks: with ``wrapped_lines=False`` (JSON corpora, one paragraph per line) every line break
  ends a sentence; with ``wrapped_lines=True`` (hard-wrapped plain text) only blank lines do, and a
  single line break counts as a space. The mark goes before the run of whitespace holding the break.

The whitespace after a sentence end belongs to the next sentence, so for byte-level BPE the next
sentence keeps its leading-space tokens and the sentences' tokens concatenate to the document's.
"""

from __future__ import annotations

import re
from itertools import repeat

SENTENCE_END = "\uffff"
# Joins the documents of a batch; the rules treat it like the start of a text (or of a line).
DOCUMENT_SEPARATOR = "\ufffe"

# THUDM/GLM's punctuation_standardization for English corpora: curly quotes and the en dash.
_PUNCTUATION_STANDARD = (("\u201c", '"'), ("\u201d", '"'), ("\u2019", "'"), ("\u2018", "'"), ("\u2013", "-"))

# Written as they appear before the period; Title and UPPER forms are added below.
_ABBREVIATIONS = (  # noqa: SIM905 -- a word list reads best as words
    "Mr Mrs Ms Mssrs Messrs Mme Mmes Mlle Dr Prof Rev Hon St Sr Jr Esq Capt Col Gen Lt Sgt Maj Cmdr "
    "Adm Gov Sen Rep Pres Supt Insp Fr Mt Ft Ave Blvd Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov "
    "Dec No Nos Vol Vols Fig Figs Eq Eqs Ch Sec Art Ref Refs Dept Univ Approx vs cf al viz approx "
    "ca ibid op vol vols pp fig figs eq eqs ch sec art ref refs dept"
).split()
_TERMINATORS = ".!?\u2026"
_CLOSERS = "\"'\u201d\u2019)\\]}\u00bb_*"
_OPENERS = "\"'\u201c\u2018(\\[{\u00ab\u00a1\u00bf_*"


def _uppercase_class() -> str:
    """A regex class of the uppercase and titlecase letters of the Basic Multilingual Plane, and digits."""
    ranges: list[list[int]] = []
    for code in range(0x10000):
        char = chr(code)
        if char.isupper() or char.istitle():
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    parts = [re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges]
    return "[0-9" + "".join(parts) + "]"


def _alternation(words: list[str]) -> str:
    """A regex matching exactly ``words``, as a trie: each alternative is rejected on its first character."""
    by_first: dict[str, list[str]] = {}
    for word in words:
        by_first.setdefault(word[0], []).append(word[1:])
    branches = []
    for first, rests in sorted(by_first.items()):
        rests = sorted(set(rests))
        branches.append(re.escape(first) + ("" if rests == [""] else _alternation(rests)))
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def _abbreviation_guards() -> str:
    forms = set(_ABBREVIATIONS)
    forms |= {a[0].upper() + a[1:] for a in _ABBREVIATIONS} | {a.upper() for a in _ABBREVIATIONS}
    by_length: dict[int, list[str]] = {}
    for form in forms:
        by_length.setdefault(len(form), []).append(form)
    # One fixed-width lookbehind per length, evaluated at the position right after the period.
    guards = [f"(?<!\\b{_alternation(words)}\\.)" for _, words in sorted(by_length.items())]
    guards.append("(?<!\\b[A-HJ-Za-z]\\.)")  # initials and e.g./i.e.; "I." may end a sentence
    line_start = f"[\\n{DOCUMENT_SEPARATOR}]"  # "1. Introduction" at the start of a line or document
    guards.append(f"(?<!\\A\\d\\.)(?<!\\A\\d\\d\\.)(?<!{line_start}\\d\\.)(?<!{line_start}\\d\\d\\.)")
    return "".join(guards)


def _sentence_end_patterns(wrapped_lines: bool, sentence_start: str) -> list[tuple[str, re.Pattern]]:
    """One pattern per terminator, each starting with its literal: the regex engine then skips ahead to
    the next occurrence at memchr speed instead of testing a character class at every position. The
    cheap lookahead comes before the abbreviation guards, so most periods never reach them."""
    horizontal = "[^\\S\\n]"
    gap = f"(?:{horizontal}+|{horizontal}*\\n{horizontal}*)" if wrapped_lines else f"{horizontal}+"
    run = f"[{re.escape(_TERMINATORS)}]*[{_CLOSERS}]*"
    ahead = f"(?={run}{gap}[{_OPENERS}]*{sentence_start})"
    guards = {".": _abbreviation_guards()}
    return [(t, re.compile(f"({re.escape(t)}{ahead}{guards.get(t, '')}{run})")) for t in _TERMINATORS]


_SENTENCE_START = _uppercase_class()
_END_PATTERNS = {wrapped: _sentence_end_patterns(wrapped, _SENTENCE_START) for wrapped in (False, True)}
# A line break (wrapped text: a blank line) ends a sentence; the mark goes before the whole run of
# whitespace around it, so blank lines and indentation never form a sentence of their own.
_BREAK_PATTERNS = {False: re.compile(r"(\n\s*)"), True: re.compile(r"(\n[^\S\n]*\n\s*)")}


def standardize_punctuation(text: str) -> str:
    """Curly quotes to ASCII quotes and the en dash to ``-``, as THUDM/GLM does for English corpora."""
    for curly, plain in _PUNCTUATION_STANDARD:
        text = text.replace(curly, plain)
    return text


def mark_sentence_ends(text: str, wrapped_lines: bool = False) -> str:
    """``text`` with ``SENTENCE_END`` after every sentence but the last (whose end is the text's end).

    Works on a whole batch of documents joined by ``DOCUMENT_SEPARATOR``: no rule looks past one, so
    each document is marked as if it were alone. Apart from the marks the text is unchanged.
    """
    # split() keeps each match as its own item (the patterns capture it whole); the mark is appended
    # to (or put before) those items, which is faster than a template substitution.
    for terminator, pattern in _END_PATTERNS[wrapped_lines]:
        if terminator in text:
            # A run such as "?!" is marked once: after the first pass the run is followed by the mark.
            parts = pattern.split(text)
            parts[1::2] = map(str.__add__, parts[1::2], repeat(SENTENCE_END))
            text = "".join(parts)
    parts = _BREAK_PATTERNS[wrapped_lines].split(text)
    parts[1::2] = map(str.__add__, repeat(SENTENCE_END), parts[1::2])
    return "".join(parts)


def split_sentences(text: str, wrapped_lines: bool = False) -> list[str]:
    """The sentences of ``text``, each with the whitespace that precedes it (the first is stripped)."""
    text = text.replace(SENTENCE_END, "\ufffd").replace(DOCUMENT_SEPARATOR, "\ufffd").strip()
    if not text:
        return []
    return mark_sentence_ends(text, wrapped_lines).split(SENTENCE_END)
