"""Sample directories: packing rules, determinism, the input hash, reuse, blending and bad inputs."""

import dataclasses
import json
import os

import numpy as np
import pytest

from data_tools.build_samples import main as build_samples_main
from data_tools.build_samples import parse_corpora
from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset, IndexedDatasetWriter
from data_tools.objectives import ObjectiveConfig
from data_tools.packing import blend_counts, blend_index, corpus_documents, pack_documents, sentence_bounds
from data_tools.sample_reader import SampleDirectory
from data_tools.samples import CorpusSpec, SampleSpec, build_or_load_samples, describe_inputs, directory_name
from tests.glm_corpora import austen_chapters, austen_corpus, write_corpus

MIXTURE = ObjectiveConfig(token_prob=0.5, sentence_prob=0.3, document_prob=0.2, task_mask=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return austen_corpus(tmp_path_factory.mktemp("samples"), first=0, count=12)


def build(corpus, cache, **overrides):
    options = dict(
        tokenizer="bert-base-uncased",
        seq_length=256,
        objectives=MIXTURE,
        num_variants=2,
        split=(8, 2, 0),
        seed=11,
        cache_dir=cache,
    )
    options.update(overrides)
    return build_or_load_samples([corpus], **options)


def test_packing_covers_every_token_and_continues_at_sentence_starts(corpus):
    dataset = IndexedDataset(corpus)
    documents = corpus_documents(dataset)
    capacity = 255
    chunks = list(
        pack_documents(dataset, documents, np.arange(len(documents.ids)), capacity, chunk_samples=16)
    )
    assert len(chunks) > 1, "several chunks exercise the chunk boundaries"
    covered = np.zeros(dataset.num_tokens, bool)
    structures = [c.structure(i) for c in chunks for i in range(c.num_samples)]
    previous_end = {}
    for index, structure in enumerate(structures):
        assert structure.length <= capacity
        if index < len(structures) - 1:
            assert structure.length >= capacity - 1, "only the last sample is short"
        for document, start, end, eos in zip(
            structure.documents.tolist(),
            structure.starts.tolist(),
            structure.ends.tolist(),
            structure.has_eos.tolist(),
        ):
            assert end > start
            covered[start:end] = True
            if document in previous_end:  # a continuation: at a sentence start, or exactly at the cut
                bounds = sentence_bounds(dataset, document).tolist()
                cut = previous_end[document]
                assert start == cut or (start in bounds and cut - capacity // 2 <= start < cut)
            previous_end[document] = end
            doc_end = int(documents.ends[np.flatnonzero(documents.ids == document)[0]])
            assert not eos or end == doc_end, "an eos follows only the end of a document"
    assert covered.all(), "every token of the corpus is in some sample"


def test_directory_is_complete_deterministic_and_reused(corpus, tmp_path):
    first = build(corpus, tmp_path / "a")
    meta = json.loads((first / "meta.json").read_text())
    assert first.name == f"glm-samples-{meta['hash'][:16]}"
    stamp = os.stat(first / "meta.json").st_mtime_ns
    assert build(corpus, tmp_path / "a") == first and os.stat(first / "meta.json").st_mtime_ns == stamp
    second = build(corpus, tmp_path / "b", workers=2)
    assert second.name == first.name
    files = sorted(p.relative_to(first) for p in first.rglob("*.npy"))
    assert len(files) == 3 * (2 + 8)  # per split: 2 blend arrays, 8 arrays per corpus (empty ones too)
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")], (
        "no temporary directory left"
    )


def test_waiting_ranks_time_out_with_advice(corpus, tmp_path):
    with pytest.raises(DataError, match="waited 0 s for .* build it before launching"):
        build(corpus, tmp_path, builder=False, wait_timeout_s=0.2, poll_s=0.05)
    built = build(corpus, tmp_path)
    assert build(corpus, tmp_path, builder=False, wait_timeout_s=0.2) == built


def test_statistics_padding_and_arrays(corpus, tmp_path):
    directory = SampleDirectory(build(corpus, tmp_path))
    train = directory.meta["splits"]["train"]
    stats = train["statistics"]
    assert stats["padding_fraction"] < 0.01, "only the split's last sample is short"
    assert set(stats["objectives"]) == {"token", "sentence", "document"}
    samples = directory.split("train")
    n = train["corpora"][0]["samples"]
    assert samples.array("objective", 0).shape == (n, 2)
    assert samples.array("spans", 0).dtype == np.uint16
    assert int(samples.array("span_offsets", 0)[-1]) == len(samples.array("spans", 0))
    # Every stored variant lays out to at most T tokens, and exactly T unless it is the short last sample.
    for sample in range(n):
        for variant in range(2):
            draw = samples.stored_draw(0, sample, variant)
            assert draw.layout_length == 256 or sample == n - 1


def test_hash_changes_with_every_input(corpus, tmp_path):
    base = SampleSpec([CorpusSpec(corpus)], "bert-base-uncased", 256, MIXTURE, 2, (8, 2, 0), 11)
    names = {directory_name(describe_inputs(base))}
    variants = [
        dataclasses.replace(base, seq_length=128),
        dataclasses.replace(base, num_variants=3),
        dataclasses.replace(base, split=(7, 3, 0)),
        dataclasses.replace(base, seed=12),
        dataclasses.replace(base, objectives=dataclasses.replace(MIXTURE, avg_span_length=2.0)),
        dataclasses.replace(base, objectives=dataclasses.replace(MIXTURE, task_mask=False)),
        dataclasses.replace(base, corpora=[CorpusSpec(corpus), CorpusSpec(corpus, 0.5)]),
    ]
    other = write_corpus(tmp_path / "other", austen_chapters(0, 11))
    variants.append(dataclasses.replace(base, corpora=[CorpusSpec(other)]))
    for spec in variants:
        names.add(directory_name(describe_inputs(spec)))
    assert len(names) == len(variants) + 1
    # Weights are normalized and the corpus is identified by content, not by path.
    os.symlink(corpus + ".bin", tmp_path / "link.bin")
    os.symlink(corpus + ".idx", tmp_path / "link.idx")
    same = dataclasses.replace(base, corpora=[CorpusSpec(str(tmp_path / "link"), 3.0)])
    assert directory_name(describe_inputs(same)) == directory_name(describe_inputs(base))


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="missing.idx: no such file"):
        build(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(DataError, match="tokenized with 'bert-base-uncased' but 'gpt2'"):
        build(corpus, tmp_path, tokenizer="gpt2")
    with pytest.raises(DataError, match="token_prob \\+ sentence_prob \\+ document_prob must be 1"):
        build(corpus, tmp_path, objectives=ObjectiveConfig(token_prob=0.5))
    with pytest.raises(DataError, match="objectives.avg_span_length: must be positive"):
        build(corpus, tmp_path, objectives=ObjectiveConfig(avg_span_length=0))
    with pytest.raises(DataError, match="split"):
        build(corpus, tmp_path, split=(1, 1))
    whole_documents = tmp_path / "documents"
    with IndexedDatasetWriter(whole_documents, np.uint16) as writer:
        for length in (40, 70, 55):
            writer.add_sequence(np.arange(1000, 1000 + length))
            writer.end_document()
    with pytest.raises(DataError, match="sentence objective needs sentence boundaries"):
        build(str(whole_documents), tmp_path)
    assert build(str(whole_documents), tmp_path, objectives=ObjectiveConfig(), split=(1, 0, 0)).is_dir()


def test_changed_corpus_and_other_tokenizer_are_detected_at_open(tmp_path):
    prefix = austen_corpus(tmp_path, first=20, count=3)
    directory = build(prefix, tmp_path / "cache")
    from data_tools.tokenizer import load_tokenizer

    opened = SampleDirectory(directory)
    opened.check_tokenizer(load_tokenizer("bert-base-uncased"))
    with pytest.raises(DataError, match="built for tokenizer 'bert-base-uncased'.*model uses 'gpt2'"):
        opened.check_tokenizer(load_tokenizer("gpt2"))
    write_corpus(tmp_path / "austen", austen_chapters(21, 3))
    with pytest.raises(DataError, match=r"austen\.idx changed since the sample directory"):
        SampleDirectory(directory)


def test_blend_counts_follow_weights_and_interleave_evenly():
    counts = blend_counts([100, 400, 0], [0.7, 0.3, 0.5])
    assert counts == [350, 150, 0]
    corpus, pick = blend_index(counts)
    assert np.bincount(corpus, minlength=3).tolist() == counts
    for i, count in enumerate(counts[:2]):
        assert pick[corpus == i].tolist() == list(range(count)), "each corpus is consumed in order"
    # Evenly interleaved: in every window of 20 positions corpus 0 holds 14 +- 1.
    windows = (corpus[:500].reshape(25, 20) == 0).sum(axis=1)
    assert windows.min() >= 13 and windows.max() <= 15


def test_blended_directory_locates_every_sample_of_each_corpus(corpus, tmp_path):
    other = write_corpus(tmp_path / "other", austen_chapters(40, 6))
    directory = SampleDirectory(
        build_or_load_samples(
            [CorpusSpec(corpus, 0.5), CorpusSpec(other, 0.5)],
            "bert-base-uncased",
            256,
            MIXTURE,
            2,
            (1, 0, 0),
            3,
            tmp_path / "cache",
        )
    )
    train = directory.split("train")
    sizes = train.corpus_sizes
    assert len(train) == sum(sizes) == sum(train.blend_counts)
    assert abs(train.blend_counts[0] - train.blend_counts[1]) <= 1, "equal weights, equal picks"

    seen = {0: [], 1: []}
    for position in range(3 * len(train)):
        ref = train.locate(position, shuffle=True)
        seen[ref.corpus].append((ref.pass_, ref.sample))
    for i in (0, 1):
        picks = 3 * train.blend_counts[i]
        assert sorted(seen[i]) == [divmod(t, sizes[i]) for t in range(picks)], "corpus passes run in order"


def test_cli_builds_then_reuses(corpus, tmp_path, capsys):
    args = [
        "--corpus",
        f"{corpus}:1.0",
        "--seq-length",
        "128",
        "--num-variants",
        "1",
        "--split",
        "9,1,0",
        "--bert-prob",
        "0.6",
        "--gap-sentence-prob",
        "0.4",
        "--task-mask",
        "--cache-dir",
        str(tmp_path),
        "--quiet",
    ]
    assert build_samples_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("built ") and "| train |" in out and "padding fraction" in out
    assert build_samples_main(args) == 0
    assert capsys.readouterr().out.startswith("reused ")
    meta = json.loads(next(tmp_path.glob("glm-samples-*/meta.json")).read_text())
    assert meta["inputs"]["objectives"]["token_prob"] == 0.6 and meta["inputs"]["objectives"]["task_mask"]
    assert (
        build_samples_main(
            [
                "--data-path",
                corpus,
                "--seq-length",
                "128",
                "--token-prob",
                "0.3",
                "--quiet",
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "must be 1" in capsys.readouterr().err


def test_corpus_arguments_parse_megatron_and_repeated_forms():
    assert parse_corpora(["0.7", "a", "0.3", "b"], None) == [CorpusSpec("a", 0.7), CorpusSpec("b", 0.3)]
    assert parse_corpora(["a", "b"], ["c:2", "/x/y"]) == [
        CorpusSpec("a"),
        CorpusSpec("b"),
        CorpusSpec("c", 2.0),
        CorpusSpec("/x/y"),
    ]
    with pytest.raises(DataError, match="weight/prefix pairs"):
        parse_corpora(["0.7", "a", "b"], None)


def test_a_preprocessed_corpus_with_other_command_ids_is_refused(tmp_path):
    from data_tools.preprocess import main as preprocess_main
    from data_tools.sample_format import check_corpus_tokenizer
    from data_tools.tokenizer import load_tokenizer

    text = tmp_path / "doc.jsonl"
    text.write_text('{"text": "It was a fine day. The sun shone."}\n')
    prefix = tmp_path / "corpus"
    assert (
        preprocess_main(
            [
                "--input",
                str(text),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                "bert-base-uncased",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    check_corpus_tokenizer(str(prefix), load_tokenizer("bert-base-uncased"))
    sidecar = tmp_path / "corpus.meta.json"
    meta = json.loads(sidecar.read_text())
    meta["tokenizer"]["command_tokens"]["sop"] = 5
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"command token ids \['sop'\] differ"):
        check_corpus_tokenizer(str(prefix), load_tokenizer("bert-base-uncased"))
    with pytest.raises(DataError, match="tokenized with 'bert-base-uncased' but 'gpt2'"):
        check_corpus_tokenizer(str(prefix), load_tokenizer("gpt2"))


def test_a_failed_build_is_reported_to_the_waiting_ranks(tmp_path, monkeypatch):
    import data_tools.samples

    corpus = austen_corpus(tmp_path, 0, 3)
    args = (
        [CorpusSpec(corpus)],
        "bert-base-uncased",
        128,
        ObjectiveConfig(),
        2,
        (1.0, 0.0, 0.0),
        1,
        tmp_path,
    )

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_tools.samples, "build_samples", full_disk)
    with pytest.raises(OSError):
        build_or_load_samples(*args, builder=True)
    with pytest.raises(DataError, match="failed on the builder rank: OSError: .*No space left on device"):
        build_or_load_samples(*args, builder=False, wait_timeout_s=30, poll_s=0.05)
