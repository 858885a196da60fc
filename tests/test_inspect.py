"""glm-inspect on a corpus and on a sample directory: tables, JSON and rendered samples."""

import json

import numpy as np
import pytest

from data_tools.indexed import IndexedDataset
from data_tools.inspect import main as inspect_main
from data_tools.objectives import ObjectiveConfig
from data_tools.samples import build_or_load_samples
from tests.glm_corpora import austen_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = austen_corpus(root, first=200, count=4)
    objectives = ObjectiveConfig(token_prob=0.4, sentence_prob=0.3, document_prob=0.3, task_mask=True)
    directory = build_or_load_samples(
        [corpus], "bert-base-uncased", 128, objectives, 2, (3, 1, 0), 1, root / "cache"
    )
    return corpus, directory


def run(capsys, *args):
    assert inspect_main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_corpus_statistics(built, capsys):
    corpus, _ = built
    stats = json.loads(run(capsys, corpus, "--json"))
    dataset = IndexedDataset(corpus)
    assert stats["tokens"] == dataset.num_tokens and stats["documents"] == 4
    assert stats["sentences"] == dataset.sequence_count == stats["sentence_tokens"]["count"]
    assert stats["sentence_tokens"]["mean"] == pytest.approx(dataset.num_tokens / dataset.sequence_count)
    assert stats["document_tokens"]["count"] == 4 and stats["tokenizer"] == "bert-base-uncased"
    table = run(capsys, corpus + ".idx", "--show", "1")
    assert (
        "| sentence tokens |" in table
        and "--- document 0" in table
        and " | " in table.split("--- document 0")[1]
    )


def test_sample_directory_statistics_match_the_build(built, capsys):
    _, directory = built
    stats = json.loads(run(capsys, directory, "--json"))
    meta = json.loads((directory / "meta.json").read_text())
    for split in ("train", "valid"):
        assert stats["splits"][split] == meta["splits"][split]["statistics"], (
            "recomputed == recorded at build"
        )
    train = stats["splits"]["train"]
    assert sum(o["share"] for o in train["objectives"].values()) == pytest.approx(1.0)
    histogram = np.asarray(train["objectives"]["token"]["span_length_histogram"])
    assert histogram.sum() == round(
        train["objectives"]["token"]["spans_per_sample"] * train["objectives"]["token"]["variants"]
    )
    table = run(capsys, directory)
    assert "padding fraction" in table and "| token |" in table and "| document |" in table


def test_show_renders_parts_and_masks(built, capsys):
    _, directory = built
    text = run(capsys, directory, "--show", "6")
    assert text.count("--- train position") == 6
    assert "Part A: [CLS]" in text and "<sop>" in text
    assert "[MASK]" in text or "[sMASK]" in text or "[gMASK]" in text
    with_positions = run(capsys, directory, "--show", "1", "--split", "valid", "--positions")
    part_a = next(line for line in with_positions.splitlines() if line.startswith("Part A:"))
    assert part_a.startswith("Part A: [CLS](0,0)")
    part_b = next(line for line in with_positions.splitlines() if line.startswith("Part B:"))
    assert part_b.startswith("Part B: <|startofpiece|>(")


def test_missing_path_and_empty_split_are_errors(built, tmp_path, capsys):
    assert inspect_main([str(tmp_path / "nothing")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert inspect_main([str(built[1]), "--show", "1", "--split", "test"]) == 1
    assert "has no samples" in capsys.readouterr().err
