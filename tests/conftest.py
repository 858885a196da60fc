"""Test environment: choose CPU/interpreter settings only when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a GPU, each Triton kernel runs one fixed tile shape instead of autotuning six per new shape (the tile
# tests choose theirs): a GPU test run then compiles one variant per kernel and flag set.
os.environ.setdefault("GLM_KERNELS_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def tp2pp2_run(tmp_path_factory):
    """A glm-pretrain run at TP2 x PP2, ZeRO-1 (4 gloo ranks, fp32, no dropout): 4 steps, checkpoints at
    steps 2 and 4; shared by the conversion tests (one 4-rank run for all of them). Returns (root, run dir)."""
    from tests.glm_corpora import austen_corpus
    from tests.training_runs import run_pretrain, tiny_overrides

    root = tmp_path_factory.mktemp("tp2pp2")
    corpus = austen_corpus(root, 0, 6)
    settings = {
        "training.train_steps": 4,
        "checkpoint.interval": 2,
        "parallel.tensor_parallel_size": 2,
        "parallel.pipeline_parallel_size": 2,
        "parallel.zero_stage": 1,
    }
    run_pretrain(4, tiny_overrides(corpus, root / "samples", root / "run", **settings))
    return root, root / "run"


def pytest_runtest_logreport(report):
    """With GLM_TEST_TIMINGS=<file>, append each test's call duration as it finishes (also under pytest-xdist,
    whose reports arrive here): a run stopped at a time limit still tells which tests took the time."""
    path = os.environ.get("GLM_TEST_TIMINGS")
    if path and report.when == "call":
        with open(path, "a") as timings:
            timings.write(f"{report.duration:.2f} {report.outcome} {report.nodeid}\n")
