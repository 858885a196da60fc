"""Seq2seq finetuning: reversing a 2-4 word phrase of Austen's text is learned from random weights (dev
ROUGE-1 of beam search far above the same run with the targets shuffled across rows, which can only learn
which words are frequent); THUDM's layout, ROUGE on hand-counted cases,
bad rows named by file:line with nothing written, and the command end to end."""

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.evaluation.rouge import lcs_length, rouge_l, rouge_n, rouge_scores
from megatron_glm.finetune import seq2seq_example
from tests.glm_corpora import austen_chapters
from tests.multiproc import run_ranks
from tests.training_runs import pretrain_env

ROOT = Path(__file__).resolve().parents[1]
# The demo's 4,000-token BPE (trained on the same Austen text): a small output layer keeps steps cheap.
TOKENIZER = str(ROOT / "run" / "demo" / "tokenizer.json")
VOCABULARY = 20  # the most frequent single-token words: a vocabulary a tiny model learns in seconds


def _phrases(count: int, seed: int) -> list[dict]:
    """``count`` rows {source: 2-4 consecutive words, target: the same words reversed} from Austen."""
    tokenizer = load_tokenizer(TOKENIZER)
    text_words = re.findall(r"[a-z]+", " ".join(austen_chapters(0, 40)).lower())
    frequent = [w for w, _ in Counter(text_words).most_common(200) if len(tokenizer.encode(" " + w)) == 1]
    allowed = set(frequent[:VOCABULARY])
    rng = random.Random(seed)
    rows, seen = [], set()
    position = 0
    while len(rows) < count and position < len(text_words):
        length = rng.randint(2, 4)
        words = text_words[position : position + length]
        position += 1
        if len(words) == length and set(words) <= allowed and tuple(words) not in seen:
            seen.add(tuple(words))
            rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    assert len(rows) == count, len(rows)
    return rows


def _splits(shuffled: bool) -> tuple[list[dict], list[dict]]:
    rows = _phrases(448, seed=0)
    random.Random(1).shuffle(rows)
    if shuffled:
        targets = [r["target"] for r in rows]
        random.Random(2).shuffle(targets)
        rows = [{"source": r["source"], "target": t} for r, t in zip(rows, targets)]
    return rows[:384], rows[384:]


TINY_MODEL = {
    "tokenizer": TOKENIZER,
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "kernels": "torch",
}


def _finetune_both(rank, world_size, out_dir, epochs):
    from megatron_glm.config import config_from_dict
    from megatron_glm.finetune import finetune_seq2seq
    from megatron_glm.generation import GenerationConfig
    from megatron_glm.training.distributed import init_distributed

    init_distributed()
    tokenizer = load_tokenizer(TOKENIZER)
    cfg = config_from_dict(
        {
            "model": TINY_MODEL,
            # ZeRO-0: one rank and 1,920 steps of a 2-layer model, where DeepSpeed's ZeRO-1 path (parameter by
            # parameter, even over one rank) took a third of the time; the CLI test below keeps ZeRO-1.
            "parallel": {"zero_stage": 0},
            "data": {"seq_length": 32},
            "training": {"micro_batch_size": 8, "global_batch_size": 8, "precision": "fp32", "seed": 3},
            "optimizer": {"lr": 1e-2},
            "lr_schedule": {"warmup_fraction": 0.0},
        }
    )
    generation = GenerationConfig(strategy="beam", max_tokens=5, num_beams=2)
    results = {}
    for name, shuffled in (("learnable", False), ("shuffled", True)):
        train, dev = _splits(shuffled)
        train = [seq2seq_example(r, f"train:{i}", tokenizer) for i, r in enumerate(train)]
        dev = [seq2seq_example(r, f"dev:{i}", tokenizer) for i, r in enumerate(dev)]
        torch.manual_seed(0)
        result = finetune_seq2seq(
            cfg,
            train,
            dev,
            tokenizer,
            generation,
            epochs=epochs,
            output_dir=f"{out_dir}/{name}",
            label_smoothing=0.1,
        )
        results[name] = (result.dev, result.train_loss, result.best_dir)
    return results


@pytest.mark.slow
def test_seq2seq_learns_to_reverse_a_phrase_and_not_shuffled_targets(tmp_path):
    # Measured (AVX2-only AMD EPYC, one thread, 33 s): dev ROUGE-1 reaches 0.93; the shuffled control never passes
    # 0.15 (frequent words of a 20-word vocabulary).
    results = run_ranks(_finetune_both, 1, str(tmp_path), 20)[0]
    learnable, losses, best_dir = results["learnable"]
    shuffled, shuffled_losses, _ = results["shuffled"]
    best = max(m["rouge-1"] for m in learnable)
    control = max(m["rouge-1"] for m in shuffled)
    assert best >= 0.7, (learnable, losses)
    assert control <= 0.4, (shuffled, shuffled_losses)
    assert (tmp_path / "learnable" / "best" / "mp_rank_00_model_states.pt").exists() and best_dir


def test_layout_is_thudms_seq2seq_layout():
    tokenizer = load_tokenizer("bert-base-uncased")
    command = tokenizer.command
    source, target = tokenizer.encode("the cat sat"), tokenizer.encode(" on it")
    example = seq2seq_example({"source": "the cat sat", "target": "on it"}, "x:1", tokenizer)
    layout, blank = example.layout, 1 + len(source)
    # Part A: [CLS] source [gMASK] [eos]; Part B: [sop] target, predicting target [eop].
    assert layout.tokens.tolist() == [command.cls, *source, command.gmask, command.eos, command.sop, *target]
    assert layout.targets[layout.sep :].tolist() == [*target, command.eop]
    assert layout.sep == len(source) + 3
    assert layout.loss_mask.tolist() == [0.0] * layout.sep + [1.0] * (len(target) + 1)
    assert layout.position_ids[0].tolist() == [*range(layout.sep), *[blank] * (len(target) + 1)]
    assert layout.position_ids[1].tolist() == [0] * layout.sep + list(range(1, len(target) + 2))
    assert example.prompt.blanks == (blank,) and example.target == target
    masked = seq2seq_example({"source": "the cat sat", "target": "on it"}, "x:1", tokenizer, mask="MASK")
    assert masked.layout.tokens[blank] == command.mask


def test_rouge_on_hand_counted_pairs():
    assert rouge_n(list("abcd"), list("abcd"), 1) == 1.0
    # Unigrams: overlap 2 of hypothesis 3 and reference 4: P 2/3, R 1/2, F1 4/7.
    assert rouge_n(list("abx"), list("bacd"), 1) == pytest.approx(4 / 7)
    # Bigrams: (a b) shared of 2 and 3: P 1/2, R 1/3, F1 2/5; one-word sides have no bigram: 0.
    assert rouge_n(list("abx"), list("abcd"), 2) == pytest.approx(2 / 5)
    assert rouge_n(["a"], ["a"], 2) == 0.0
    assert lcs_length(list("axbc"), list("abyc")) == 3
    assert rouge_l(list("cba"), list("abc")) == pytest.approx(1 / 3)
    scores = rouge_scores(["The cat, sat!", "dog"], ["the cat sat", "a cat"])
    assert scores["rouge-1"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["rouge-2"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["rouge-l"] == pytest.approx(0.5)


def test_bad_rows_are_named():
    tokenizer = load_tokenizer("bert-base-uncased")
    with pytest.raises(DataError, match="train.jsonl:3: no 'target' field"):
        seq2seq_example({"source": "a"}, "train.jsonl:3", tokenizer)
    with pytest.raises(DataError, match="train.jsonl:4: no 'source' field"):
        seq2seq_example({"target": "a"}, "train.jsonl:4", tokenizer)
    with pytest.raises(DataError, match="train.jsonl:5: 'target' must be a string, got int"):
        seq2seq_example({"source": "a", "target": 3}, "train.jsonl:5", tokenizer)
    with pytest.raises(DataError, match="train.jsonl:6: the 'target' text encodes to no token"):
        seq2seq_example({"source": "a", "target": " "}, "train.jsonl:6", tokenizer)


def _cli_args(tmp_path, train_rows, dev_rows, *extra):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
    args = ["seq2seq", "--config", str(ROOT / "run" / "configs" / "glm-tiny.yaml"), "--train", str(train)]
    args += ["--dev", str(dev), "--output", str(tmp_path / "out"), "--epochs", "1", *extra]
    settings = {f"model.{key}": value for key, value in TINY_MODEL.items()}
    settings |= {"data.seq_length": 32, "training.precision": "fp32", "parallel.zero_stage": 1}
    settings |= {"training.micro_batch_size": 8, "training.global_batch_size": 8}
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args, train, dev


def test_finetune_seq2seq_cli_trains_decodes_and_keeps_the_best_weights(tmp_path):
    train, dev = _splits(shuffled=False)
    args, _, _ = _cli_args(tmp_path, train[:16], dev[:4], "--label-smoothing", "0.1", "--num-beams", "2")
    env = pretrain_env()
    done = subprocess.run(
        [sys.executable, "-m", "megatron_glm.cli.finetune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(
        r"epoch 1: train loss [0-9.]+, dev rouge-1 [0-9.]+, rouge-2 [0-9.]+, rouge-l", done.stdout
    )
    assert "best: epoch 1 (rouge-l)" in done.stdout
    assert (tmp_path / "out" / "best" / "mp_rank_00_model_states.pt").exists()


def test_finetune_seq2seq_cli_names_bad_input_before_training(tmp_path, capsys):
    from megatron_glm.cli.finetune import main

    good = {"source": "she ran", "target": "ran she"}
    args, train, _ = _cli_args(tmp_path, [good, {"source": "he ran"}], [good])
    assert main(args) == 1
    assert f"{train}:2: no 'target' field" in capsys.readouterr().err
    long_source = {"source": " ".join(["she"] * 40), "target": "she"}
    args, _, dev = _cli_args(tmp_path, [good], [good, long_source])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{dev}:2: the source lays out to 43 tokens" in err and "max_position_embeddings=32" in err
    assert main([*args, "--label-smoothing", "1.5"]) == 2
    assert "--label-smoothing 1.5 must lie in [0, 1)" in capsys.readouterr().err
    assert main([*args, "--min-target-tokens", "9", "--max-target-tokens", "4"]) == 2
    assert "min_tokens=9 must lie in [0, max_tokens=4]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
