"""Per-layer CUDA graphs' plumbing on any machine, with CUDA's graph primitives replaced by stand-ins that
re-run the captured code (``tests/graph_stand_ins.py``): in a training loop, and in glm-pretrain with its
checkpoint and resume."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel
from megatron_glm.model.cuda_graphs import LayerGraphs, enable_layer_graphs
from tests.glm_corpora import austen_corpus
from tests.graph_stand_ins import install
from tests.graph_training import train
from tests.multiproc import HIDE_GPUS
from tests.training_runs import ROOT, pretrain_arguments, pretrain_env, step_losses, tiny_overrides

CPU = torch.device("cpu")
VOCAB = 256


@pytest.fixture
def graph_stand_ins(monkeypatch):
    install(monkeypatch.setattr)
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


@pytest.mark.parametrize("defer", [True, False], ids=["adds-deferred", "layer-by-layer"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_graphed_training_is_the_eager_models(graph_stand_ins, dropout, defer):
    # Five steps of two micro-batches: every training call replays, the first included (its capture follows
    # warm-ups that change nothing: with dropout the losses differ from the first step on if the warm-ups do not
    # put the generators back), each backward replays on the output gradient of its own micro-batch, the
    # evaluation runs eagerly around the graphs. On CPUs the stand-ins' replays compute what eager execution
    # computes, so the runs agree bit for bit.
    # Each layer's last add in the next LayerNorm (the default) hands on the MLP's output and bias across the
    # graphs: the second layer's graph adds the first's, and the gradient of the first layer's bias comes back
    # from it.
    eager = train(CPU, False, dropout, defer=defer)
    graphed = train(CPU, True, dropout, defer=defer)
    assert graphed.captured == 2  # one input shape, two layers, captured once each
    # The second layer reads the first one's static outputs, and hands its input gradients back in place.
    assert graphed.chained_inputs == [False, True] and graphed.chained_output_grads == [True]
    assert torch.equal(graphed.losses, eager.losses)
    for ours, theirs in zip(graphed.params, eager.params, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(graphed.evaluated, eager.evaluated)


def test_a_graphed_run_resumed_from_its_state_continues_bitwise(graph_stand_ins):
    # The resumed run captures anew at its first step and continues the uninterrupted run's numbers.
    whole = train(CPU, True, 0.1)
    first = train(CPU, True, 0.1, steps=range(3))
    second = train(CPU, True, 0.1, steps=range(3, 5), resume_from=first.state)
    assert torch.equal(torch.cat([first.losses, second.losses]), whole.losses)
    for ours, theirs in zip(second.params, whole.params, strict=True):
        assert torch.equal(ours, theirs)


def test_the_graphed_layers_keep_the_state_dict_keys(graph_stand_ins):
    model = GLMModel(
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB), VOCAB
    )
    keys = set(model.state_dict())
    enable_layer_graphs(model.transformer)
    assert set(model.state_dict()) == keys  # the layers stay registered once, under THUDM's keys


def test_a_capture_needs_a_warm_up():
    with pytest.raises(ValueError, match="warmup: at least one forward and backward before a capture"):
        LayerGraphs(torch.nn.Linear(2, 2), None, None, warmup=0)


def _graphed_pretrain(world_size: int, overrides: list[str]) -> str:
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    process = subprocess.run(
        [*launcher, "-m", "tests.graphed_pretrain", *pretrain_arguments(overrides)],
        env={
            **pretrain_env(),
            **HIDE_GPUS,
        },  # the stand-ins replace CUDA's graphs: the run must be on the CPU
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    return process.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "zero_stage"), [(1, 1), (2, 2)], ids=["1-rank-zero1", "2-ranks-zero2"])
def test_glm_pretrain_with_graphs_resumes_bitwise(tmp_path, ranks, zero_stage):
    # glm-pretrain's own path under training.cuda_graphs: DeepSpeed's engine around the graphed layers (ZeRO-2
    # takes each gradient in a hook as autograd accumulates it, and reduces it over the data-parallel ranks),
    # dropout, evaluations between steps (eager, around the graphs), a checkpoint; then a run resumed from the
    # step-4 checkpoint captures anew and trains steps 5-8 as the uninterrupted run did.
    corpus = austen_corpus(tmp_path, 0, 12)
    settings = {
        "training.train_steps": 8,
        "training.cuda_graphs": "true",
        "checkpoint.interval": 4,
        "checkpoint.keep_last": 2,
        "parallel.zero_stage": zero_stage,
        "model.hidden_dropout": 0.1,
        "model.attention_dropout": 0.1,
        "training.eval_interval": 3,
        "training.eval_steps": 1,
    }
    whole = tmp_path / "whole"
    stderr = _graphed_pretrain(ranks, tiny_overrides(corpus, tmp_path / "samples", whole, **settings))
    replays = [int(text.split()[0]) for text in stderr.split("stand-in graph replays: ")[1:]]
    # Each rank: 2 layers x (forward + backward) x its micro-batches (8 per step over the ranks) x 8 steps.
    assert replays == [2 * 2 * (4 // ranks) * 8] * ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "4", resumed / "checkpoints" / "4")
    for tracker in ("latest", "latest_checkpointed_iteration.txt"):
        (resumed / "checkpoints" / tracker).write_text("4")
    _graphed_pretrain(ranks, tiny_overrides(corpus, tmp_path / "samples", resumed, **settings))
    reference, losses = step_losses(whole), step_losses(resumed)
    assert sorted(losses) == [5, 6, 7, 8]
    for step, loss in losses.items():
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"
