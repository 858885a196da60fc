"""Test environment: choose CPU/interpreter settings only when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_interpreter import skip_repeated_language_patches

    skip_repeated_language_patches()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests of what exists only on a GPU (CUDA graphs) live in *_cuda.py modules: collected where CUDA is present
# (benchmarks/gpu_check.py runs them), not collected on CPU machines, where they would have nothing to test.
collect_ignore_glob = [] if torch.cuda.is_available() else ["*_cuda.py"]
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


def _timings_line(text: str) -> None:
    path = os.environ.get("GLM_TEST_TIMINGS")
    # Under pytest-xdist the hooks run in the worker and again in the controller: write from one of them.
    if path and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as timings:
            timings.write(text + "\n")


def pytest_runtest_logstart(nodeid, location):
    """With GLM_TEST_TIMINGS=<file>, note each test as it starts ("start <id>") and each test's call duration
    as it finishes ("<seconds> <outcome> <id>"); under pytest-xdist too, whose events arrive here. A run
    stopped at a time limit then still tells which tests took the time and which never finished."""
    _timings_line(f"start {nodeid}")


def pytest_runtest_logreport(report):
    if report.when == "call":
        _timings_line(f"{report.duration:.2f} {report.outcome} {report.nodeid}")
