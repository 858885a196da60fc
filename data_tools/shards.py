"""Corpus outputs as shards: multi-node rank naming, the ``.meta.json`` sidecar, and ``--merge``.

In multi-node mode rank ``r`` of ``W`` writes ``<prefix>_rank<r>-of-<W>`` (five digits each, so the
names sort); ``glm-preprocess --merge -o <prefix>`` finds all of them, checks that every rank is there and
that they agree on tokenizer and settings, and concatenates them in rank order into ``<prefix>``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset, merge_indexed
from data_tools.progress import CorpusStats

META_VERSION = 1
_RANK_NAME = re.compile(r"_rank(\d+)-of-(\d+)$")


def rank_output_prefix(prefix: str, rank: int, world_size: int) -> str:
    return prefix if world_size == 1 else f"{prefix}_rank{rank:05d}-of-{world_size:05d}"


def meta_path(prefix: str) -> Path:
    return Path(prefix + ".meta.json")


def write_meta(path: Path, **fields) -> None:
    """Write the sidecar atomically (a temporary name, then a rename)."""
    meta = {
        "format": "megatron-mmidx-v1",
        "writer": "glm-preprocess",
        "meta_version": META_VERSION,
        "appended_tokens": [],
        **fields,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_meta(prefix: str) -> dict | None:
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); re-run glm-preprocess for this shard") from exc
    if meta.get("writer") != "glm-preprocess" or meta.get("meta_version") != META_VERSION:
        raise DataError(f"{path}: not a glm-preprocess meta.json (version {META_VERSION})")
    return meta


def _strip_extension(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def _rank_outputs(prefix: str) -> list[str]:
    found: dict[int, dict[int, str]] = {}
    for idx in glob.glob(glob.escape(prefix) + "_rank*-of-*.idx"):
        shard = idx[:-4]
        match = _RANK_NAME.search(shard)
        if match and shard[: match.start()] == prefix:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = shard
    if not found:
        raise DataError(f"no rank outputs {prefix}_rank<r>-of-<W>.idx to merge; pass the shards with --input")
    if len(found) > 1:
        raise DataError(
            f"rank outputs of runs with different world sizes ({', '.join(map(str, sorted(found)))}) "
            f"share the prefix {prefix}; remove the stale ones or pass the shards with --input"
        )
    ((world_size, shards),) = found.items()
    missing = sorted(set(range(world_size)) - set(shards))
    if missing:
        raise DataError(
            f"{prefix}: ranks {', '.join(map(str, missing))} of {world_size} have no complete output yet "
            "(an .idx appears only when a rank finishes); wait for them or re-run those ranks"
        )
    return [shards[r] for r in range(world_size)]


def _resolve(inputs: list[str], manifest: str | None) -> list[str]:
    shards: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(m[:-4] for m in glob.glob(item, recursive=True) if m.endswith(".idx"))
            if not matches:
                raise DataError(f"{item}: the pattern matches no .idx file")
            shards.extend(matches)
        else:
            shards.append(_strip_extension(item))
    if manifest:
        try:
            lines = Path(manifest).read_text().splitlines()
        except OSError as exc:
            raise DataError(f"{manifest}: cannot read the manifest ({exc.strerror})") from exc
        shards.extend(
            _strip_extension(line.strip()) for line in lines if line.strip() and not line.startswith("#")
        )
    return shards


def merge_shards(
    output_prefix: str, inputs: list[str], manifest: str | None, command: str
) -> tuple[str, CorpusStats, str]:
    """Merge shards into ``output_prefix`` (see the module docstring); returns the output, counts and unit."""
    shards = _resolve(inputs, manifest) if inputs or manifest else _rank_outputs(output_prefix)
    if not shards:
        raise DataError("nothing to merge: the manifest lists no shard")
    if output_prefix in shards:
        raise DataError(f"{output_prefix} is one of the shards; merge into another prefix")
    metas = [read_meta(shard) for shard in shards]
    with_meta = [m is not None for m in metas]
    if any(with_meta) and not all(with_meta):
        missing = [s for s, m in zip(shards, metas) if m is None]
        raise DataError(f"shards without a meta.json among glm-preprocess shards: {', '.join(missing[:5])}")
    stats = CorpusStats()
    first = metas[0]
    for shard, meta in zip(shards, metas):
        if meta is None:
            continue
        for field in ("tokenizer", "token_dtype", "sequence_unit", "settings"):
            if meta[field] != first[field]:
                raise DataError(
                    f"{shard} was written with another {field} than {shards[0]} "
                    f"({meta[field]} vs {first[field]}); shards must come from the same settings"
                )
        counts = CorpusStats.from_json(meta["counts"])
        dataset = IndexedDataset(shard)
        if (counts.documents, counts.sequences, counts.tokens) != (
            dataset.num_documents,
            len(dataset),
            dataset.num_tokens,
        ):
            raise DataError(
                f"{shard}: its meta.json counts ({counts.documents} documents, {counts.sequences} sequences) "
                "do not match its index; the shard was replaced after it was written: re-run it"
            )
        stats += counts
    meta_path(output_prefix).unlink(missing_ok=True)
    merged = merge_indexed(shards, output_prefix)
    if first is None:
        print(
            f"glm-preprocess: the shards have no meta.json; {output_prefix}.meta.json not written",
            file=sys.stderr,
        )
        stats = CorpusStats(documents=merged.num_documents, sequences=len(merged), tokens=merged.num_tokens)
        return output_prefix, stats, "sequence"
    counts = stats.to_json() | {"input_files": sum(m["counts"]["input_files"] for m in metas)}
    write_meta(
        meta_path(output_prefix),
        tokenizer=first["tokenizer"],
        token_dtype=first["token_dtype"],
        sequence_unit=first["sequence_unit"],
        settings=first["settings"],
        counts=counts,
        rank=0,
        world_size=1,
        merged_from=shards,
        command=command,
    )
    return output_prefix, stats, first["sequence_unit"]
