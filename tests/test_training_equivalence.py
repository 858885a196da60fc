"""Parallel layouts train identically: the same tiny GLM, data and global batch on DeepSpeed give the same
per-step losses at DP = 2 with ZeRO 1, 2 and 3, TP = 2, PP = 2 and TP = 2 x PP = 2 as on one rank."""

import pytest

from tests.glm_corpora import austen_corpus
from tests.training_runs import run_pretrain, step_losses, tiny_overrides


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    corpus = austen_corpus(root, 0, 12)
    baseline = root / "baseline"
    run_pretrain(1, tiny_overrides(corpus, root / "samples", baseline, **{"parallel.zero_stage": 0}))
    return root, corpus, step_losses(baseline)


def _assert_same_losses(reference: dict[int, float], other: dict[int, float], rel: float) -> None:
    assert sorted(other) == sorted(reference) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert other[step] == pytest.approx(loss, rel=rel), f"step {step}: {other[step]} vs {loss}"


def test_baseline_learns(workspace):
    _, _, losses = workspace
    assert losses[4] < losses[1]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_data_parallel_with_zero_matches_one_rank(workspace, zero_stage):
    root, corpus, reference = workspace
    run_dir = root / f"dp2-zero{zero_stage}"
    run_pretrain(2, tiny_overrides(corpus, root / "samples", run_dir, **{"parallel.zero_stage": zero_stage}))
    # fp32; the data-parallel all-reduce only changes the summation order of the gradients.
    _assert_same_losses(reference, step_losses(run_dir), rel=1e-5)


@pytest.mark.parametrize(
    "world_size,tp,pp",
    [(2, 2, 1), (2, 1, 2), (4, 2, 2)],
    ids=["tp2", "pp2", "tp2xpp2"],
)
def test_model_parallel_layouts_match_one_rank(workspace, world_size, tp, pp):
    root, corpus, reference = workspace
    run_dir = root / f"tp{tp}-pp{pp}"
    settings = {"parallel.tensor_parallel_size": tp, "parallel.pipeline_parallel_size": pp,
                "parallel.zero_stage": 1}
    run_pretrain(world_size, tiny_overrides(corpus, root / "samples", run_dir, **settings))
    # Tensor parallelism splits the matmuls' reductions (fp32 rounding); the pipeline runs the same math.
    _assert_same_losses(reference, step_losses(run_dir), rel=1e-4)
