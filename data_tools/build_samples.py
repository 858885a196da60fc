"""glm-build-samples: pack corpora into samples and precompute K span-mask variants per sample.

Examples::

    python -m data_tools.build_samples --data-path 0.7 wiki 0.3 books \\
        --seq-length 512 --token-prob 0.5 --sentence-prob 0.3 --document-prob 0.2 --task-mask \\
        --num-variants 4 --split 949,50,1 --seed 1234 --cache-dir outputs/samples --workers 8
    python -m data_tools.build_samples --corpus outputs/demo/corpus/austen --seq-length 128

The directory is named by a hash of the inputs under ``--cache-dir`` (what the trainer looks up with the
same options) unless ``--output`` names it. An existing complete directory is reused, never rebuilt.
THUDM/GLM's flag names are accepted as aliases (``--bert-prob``, ``--gap-sentence-prob``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from data_tools.errors import DataError, run_cli
from data_tools.objectives import ObjectiveConfig
from data_tools.sample_format import META_FILE, SPLIT_NAMES, read_corpus_sidecar
from data_tools.samples import (
    CorpusSpec,
    SampleSpec,
    build_samples,
    describe_inputs,
    directory_name,
    inputs_hash,
)

# (flag, THUDM/GLM alias or None, ObjectiveConfig field, type)
_OBJECTIVE_FLAGS = (
    ("--token-prob", "--bert-prob", "token_prob", float),
    ("--sentence-prob", "--gap-sentence-prob", "sentence_prob", float),
    ("--document-prob", None, "document_prob", float),
    ("--token-ratio", None, "token_ratio", float),
    ("--avg-span-length", "--avg-block-length", "avg_span_length", float),
    ("--max-span-length", None, "max_span_length", int),
    ("--sentence-ratio", "--gap-sentence-ratio", "sentence_ratio", float),
    ("--document-min-ratio", "--gpt-min-ratio", "document_min_ratio", float),
    ("--document-suffix-prob", "--gpt-infill-prob", "document_suffix_prob", float),
    ("--single-span-prob", None, "single_span_prob", float),
    ("--block-mask-prob", None, "block_mask_prob", float),
)


def parse_corpora(data_path: list[str] | None, corpus: list[str] | None) -> list[CorpusSpec]:
    """``--data-path [w1] p1 [w2] p2 ...`` (Megatron style) and/or repeated ``--corpus PATH[:WEIGHT]``."""
    specs: list[CorpusSpec] = []
    if data_path:
        if len(data_path) % 2 == 0 and all(_is_number(x) for x in data_path[0::2]):
            specs += [CorpusSpec(p, float(w)) for w, p in zip(data_path[0::2], data_path[1::2])]
        elif any(_is_number(x) for x in data_path):
            raise DataError(
                f"--data-path {' '.join(data_path)}: give either prefixes only or weight/prefix pairs "
                "(--data-path 0.7 a 0.3 b)"
            )
        else:
            specs += [CorpusSpec(p) for p in data_path]
    for item in corpus or []:
        path, _, weight = item.rpartition(":")
        specs.append(CorpusSpec(path, float(weight)) if path and _is_number(weight) else CorpusSpec(item))
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def corpus_tokenizer_name(corpora: list[CorpusSpec]) -> str:
    """The tokenizer recorded by glm-preprocess in every corpus's sidecar (they must agree)."""
    names = {}
    for corpus in corpora:
        sidecar = read_corpus_sidecar(corpus.path) or {}
        name = sidecar.get("tokenizer")
        name = name.get("name") if isinstance(name, dict) else name
        if not isinstance(name, str):
            raise DataError(f"{corpus.path}.meta.json does not name the corpus's tokenizer; pass --tokenizer")
        names[corpus.path] = name
    if len(set(names.values())) > 1:
        raise DataError(f"the corpora were tokenized with different tokenizers: {names}")
    return next(iter(names.values()))


def parse_split(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3 or not all(_is_number(p) for p in parts):
        raise DataError(f"--split {text!r}: expected three comma-separated proportions such as 949,50,1")
    return float(parts[0]), float(parts[1]), float(parts[2])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-build-samples", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("corpora")
    data.add_argument(
        "--data-path",
        nargs="+",
        metavar="[WEIGHT] PREFIX",
        help="corpus prefixes, optionally preceded by blend weights (Megatron style)",
    )
    data.add_argument(
        "--corpus", action="append", metavar="PREFIX[:WEIGHT]", help="a corpus and its weight (repeat)"
    )
    data.add_argument(
        "--tokenizer",
        help="bert-base-uncased, gpt2 or a tokenizer.json (default: the one named in "
        "the corpora's .meta.json)",
    )
    samples = parser.add_argument_group("samples")
    samples.add_argument("--seq-length", type=int, required=True, help="laid-out length T (Part A + Part B)")
    samples.add_argument(
        "--num-variants", type=int, default=4, help="mask variants per sample (epoch e uses e mod K)"
    )
    samples.add_argument("--split", default="949,50,1", help="train,valid,test proportions of the documents")
    samples.add_argument("--seed", type=int, default=1234)
    objectives = parser.add_argument_group("objectives (defaults: THUDM/GLM's)")
    defaults = ObjectiveConfig()
    for flag, alias, field, kind in _OBJECTIVE_FLAGS:
        names = [flag] + ([alias] if alias else [])
        objectives.add_argument(
            *names,
            dest=field,
            type=kind,
            default=getattr(defaults, field),
            help=f"ObjectiveConfig.{field} (default {getattr(defaults, field)})",
        )
    objectives.add_argument(
        "--task-mask", action="store_true", help="[sMASK]/[gMASK] for sentence/document spans"
    )
    objectives.add_argument(
        "--no-shuffle-spans", "--no-shuffle-block", dest="shuffle_spans", action="store_false"
    )
    objectives.add_argument(
        "--no-block-positions", "--no-block-position", dest="block_positions", action="store_false"
    )
    out = parser.add_argument_group("output")
    where = out.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir", default="outputs/samples", help="parent of hash-named sample directories"
    )
    where.add_argument("--output", help="build into this directory instead")
    out.add_argument("--workers", type=int, default=1, help="processes drawing the span masks")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _summary(path: Path, reused: bool, seconds: float) -> str:
    meta = json.loads((path / META_FILE).read_text())
    lines = [
        f"{'reused' if reused else 'built'} {path} in {seconds:.1f} s "
        f"(build took {meta['build']['seconds']:.1f} s with {meta['build']['workers']} worker(s))",
        f"seq_length {meta['seq_length']}, {meta['num_variants']} variant(s), seed {meta['seed']}",
        "| split | samples | raw tokens | padding fraction | unused tail fraction | token / sentence / document |",
        "|---|---|---|---|---|---|",
    ]
    for name in SPLIT_NAMES:
        stats = meta["splits"][name]["statistics"]
        shares = " / ".join(
            f"{stats['objectives'].get(o, {}).get('share', 0.0):.2f}"
            for o in ("token", "sentence", "document")
        )
        lines.append(
            f"| {name} | {meta['splits'][name]['blend_size']} | {stats['raw_tokens']} | "
            f"{stats['padding_fraction']:.4f} | {stats['unused_tail_fraction']:.4f} | {shares} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-build-samples", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    corpora = parse_corpora(args.data_path, args.corpus)
    if not corpora:
        raise DataError("no corpora: pass --data-path PREFIX ... or --corpus PREFIX[:WEIGHT]")
    objectives = ObjectiveConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ObjectiveConfig)}
    )
    spec = SampleSpec(
        corpora,
        args.tokenizer or corpus_tokenizer_name(corpora),
        args.seq_length,
        objectives,
        args.num_variants,
        parse_split(args.split),
        args.seed,
    )
    inputs = describe_inputs(spec)
    path = Path(args.output) if args.output else Path(args.cache_dir) / directory_name(inputs)
    reused = (path / META_FILE).is_file()
    if reused:
        if json.loads((path / META_FILE).read_text()).get("hash") != inputs_hash(inputs):
            raise DataError(
                f"{path} holds samples built from other inputs; choose another --output or delete it"
            )
    elif path.exists():
        raise DataError(f"{path} exists and is not a sample directory; choose another --output or delete it")
    else:
        build_samples(spec, path, workers=args.workers, progress=not args.quiet, inputs=inputs)
    print(_summary(path, reused, time.time() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
