"""Cloze finetuning on the DeepSpeed engine: a label the text determines (does the sentence mention a
woman: "she"/"her") is learned well above chance in 8 epochs of 30 steps from random weights (the
dev accuracy jumps from 0.5 to > 0.8 around epoch 5); the same run with labels drawn at random stays at
chance. 30 s (idle) to 100 s (loaded) on the 2-core machine, hence slow. The best epoch's weights are written in THUDM's layout. Bad rows are named."""

import json
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.finetune import ClozeTask, cloze_example
from tests.glm_corpora import austen_chapters
from tests.multiproc import run_ranks
from tests.training_runs import pretrain_env

ROOT = Path(__file__).resolve().parents[1]
TASK = ClozeTask(pattern="{text} Is it about her? [MASK].", verbalizer={"yes": "yes", "no": "no"})


def _sentences():
    text = " ".join(austen_chapters(0, 8))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    return [s for s in sentences if 6 <= len(s.split()) <= 25]


def _records(random_labels: bool):
    records = []
    for sentence in _sentences():
        words = set(re.findall(r"[a-z]+", sentence.lower()))
        if random_labels:
            label = "yes" if zlib.crc32(sentence.encode()) % 2 else "no"
        else:
            label = "yes" if words & {"she", "her", "herself"} else "no"
        records.append({"text": sentence, "label": label})
    yes = [r for r in records if r["label"] == "yes"][:170]
    no = [r for r in records if r["label"] == "no"][:170]
    balanced = [r for pair in zip(yes, no) for r in pair]
    return balanced[:240], balanced[240:340]


def _finetune_both(rank, world_size, out_dir):
    import torch

    from megatron_glm.config import config_from_dict
    from megatron_glm.finetune import finetune_cloze
    from megatron_glm.training.distributed import init_distributed

    init_distributed()
    tokenizer = load_tokenizer("bert-base-uncased")
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "max_position_embeddings": 64,
                "hidden_dropout": 0.0,
                "attention_dropout": 0.0,
                "kernels": "torch",
            },
            "parallel": {"zero_stage": 1},
            "data": {"seq_length": 64},
            "training": {"micro_batch_size": 8, "global_batch_size": 8, "precision": "fp32", "seed": 3},
            "optimizer": {"lr": 3e-3},
            "lr_schedule": {"warmup_fraction": 0.0},
        }
    )
    results = {}
    for name, random_labels in (("learnable", False), ("random", True)):
        train, dev = _records(random_labels)
        train = [cloze_example(r, f"train:{i}", TASK, tokenizer) for i, r in enumerate(train)]
        dev = [cloze_example(r, f"dev:{i}", TASK, tokenizer) for i, r in enumerate(dev)]
        torch.manual_seed(0)
        result = finetune_cloze(cfg, train, dev, tokenizer, epochs=8, output_dir=f"{out_dir}/{name}")
        results[name] = (result.scores, result.best_dir, result.train_loss)
    return results


@pytest.mark.slow
def test_cloze_learns_a_learnable_label_and_not_a_random_one(tmp_path):
    results = run_ranks(_finetune_both, 1, str(tmp_path))[0]
    learnable, best_dir, losses = results["learnable"]
    assert max(learnable) >= 0.75, (learnable, losses)
    assert (tmp_path / "learnable" / "best" / "mp_rank_00_model_states.pt").exists() and best_dir
    random_accuracy, _, _ = results["random"]
    assert 0.3 <= random_accuracy[-1] <= 0.7, random_accuracy


def test_bad_rows_and_patterns_are_named():
    tokenizer = load_tokenizer("bert-base-uncased")
    with pytest.raises(DataError, match="no 'label' field"):
        cloze_example({"text": "a"}, "train.jsonl:3", TASK, tokenizer)
    with pytest.raises(DataError, match="train.jsonl:4: unknown label 'maybe'"):
        cloze_example({"text": "a", "label": "maybe"}, "train.jsonl:4", TASK, tokenizer)
    with pytest.raises(DataError, match="train.jsonl:5: no 'text' field"):
        cloze_example({"label": "yes"}, "train.jsonl:5", TASK, tokenizer)
    with pytest.raises(DataError, match="must contain \\[MASK\\] exactly once"):
        ClozeTask(pattern="{text} Is it about her?", verbalizer={"yes": "yes"})
    example = cloze_example({"text": "she [MASK] ran", "label": "no"}, "x", TASK, tokenizer)
    # A "[MASK]" inside the data stays text: the one blank is the pattern's.
    assert sum(int(t == tokenizer.command.mask) for t in example.candidates[0].tokens) == 1
    assert example.label == 1 and json.dumps(example.where) == '"x"'


TINY_SETTINGS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.max_position_embeddings=64",
    "data.seq_length=64",
    "training.micro_batch_size=8",
    "training.global_batch_size=8",
    "training.precision=fp32",
    "parallel.zero_stage=1",
    "model.kernels=torch",
]


def _cli_files(tmp_path, train_rows):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in _records(False)[1][:8]))
    args = ["cloze", "--config", str(ROOT / "run" / "configs" / "glm-tiny.yaml"), "--train", str(train)]
    args += ["--dev", str(dev), "--pattern", TASK.pattern, "--verbalizer", "yes=yes", "--verbalizer", "no=no"]
    args += ["--output", str(tmp_path / "out"), "--epochs", "1"]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    return args, train


def test_finetune_cli_trains_and_keeps_the_best_weights(tmp_path):
    args, _ = _cli_files(tmp_path, _records(False)[0][:16])
    env = pretrain_env()
    done = subprocess.run(
        [sys.executable, "-m", "megatron_glm.cli.finetune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1: train loss" in done.stdout and "best: epoch 1" in done.stdout
    assert (tmp_path / "out" / "best" / "mp_rank_00_model_states.pt").exists()


def test_finetune_cli_names_bad_rows_before_training(tmp_path, capsys):
    from megatron_glm.cli.finetune import main

    rows = [{"text": "she ran.", "label": "yes"}, {"text": "he ran.", "label": "maybe"}]
    args, train = _cli_files(tmp_path, rows)
    assert main(args) == 1
    assert f"{train}:2: unknown label 'maybe'" in capsys.readouterr().err
    rows = [{"text": "she ran."}]
    args, train = _cli_files(tmp_path, rows)
    assert main(args) == 1
    assert f"{train}:1: no 'label' field" in capsys.readouterr().err
    bad_pattern = [a if a != TASK.pattern else "{text} Is it about her?" for a in args]
    assert main(bad_pattern) == 1
    assert "must contain [MASK] exactly once" in capsys.readouterr().err
    bad_verbalizer = [a if a != "no=no" else "no" for a in args]
    assert main(bad_verbalizer) == 1
    assert "--verbalizer 'no': write LABEL=ANSWER" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finetune_cli_refuses_half_precision_without_zero_before_training(tmp_path, capsys):
    """The rules glm-pretrain checks hold for glm-finetune (the same engine): bf16 with ZeRO-0 would stop
    inside DeepSpeed; it is a config error (exit 2) naming the key, before any row is read."""
    from megatron_glm.cli.finetune import main

    args, _ = _cli_files(tmp_path, [{"text": "he ran.", "label": "maybe"}])
    args += ["--set", "training.precision=bf16", "--set", "parallel.zero_stage=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "  parallel.zero_stage: ZeRO stage 0 with training.precision bf16" in err
    assert "unknown label" not in err and not (tmp_path / "out").exists()
    pipeline = [*args[:-4], "--set", "parallel.pipeline_parallel_size=2"]
    assert main(pipeline) == 2
    assert "  parallel.pipeline_parallel_size: glm-finetune runs without pipeline parallelism" in (
        capsys.readouterr().err
    )
