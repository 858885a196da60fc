"""megatron_glm.data: the batch contract, precomputed == online, epoch order, and data-position resume."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_tools.errors import DataError
from data_tools.objectives import Objective, ObjectiveConfig
from data_tools.sample_reader import SampleDirectory, shuffled_position
from data_tools.samples import build_or_load_samples
from data_tools.tokenizer import load_tokenizer
from megatron_glm.config import CorpusConfig, DataConfig
from megatron_glm.data import (
    BATCH_KEYS,
    GLMBatchSampler,
    GLMDataset,
    build_data_loader,
    build_glm_data_loader,
    collate_glm_batch,
    prepare_sample_directory,
)
from tests.glm_corpora import austen_corpus
from tests.multiproc import run_ranks

T = 128
K = 2
MASK_IDS = set(load_tokenizer("bert-base-uncased").command.mask_ids())
MIXTURE = ObjectiveConfig(
    token_prob=0.5, sentence_prob=0.25, document_prob=0.25, task_mask=True, block_mask_prob=0.1
)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = austen_corpus(root, first=60, count=4)
    return build_or_load_samples([corpus], "bert-base-uncased", T, MIXTURE, K, (9, 1, 0), 5, root / "cache")


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("the loader ended early")


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in BATCH_KEYS:
            assert torch.equal(x[key], y[key]), key


def loader(sample_dir, *, micro=4, global_batch=8, rank=0, dp=1, consumed=0, workers=0, online=False):
    dataset = GLMDataset(sample_dir, "train", "bert-base-uncased", online=online)
    sampler = GLMBatchSampler(
        micro_batch_size=micro,
        global_batch_size=global_batch,
        data_parallel_rank=rank,
        data_parallel_size=dp,
        consumed_samples=consumed,
    )
    return build_data_loader(dataset, sampler, workers)


def test_batch_contract(sample_dir):
    batch = take(loader(sample_dir), 1)[0]
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (4, T)
    assert batch["position_ids"].shape == (4, 2, T) and batch["sep"].shape == batch["objective"].shape == (4,)
    assert batch["loss_mask"].dtype == torch.float32
    assert all(batch[k].dtype == torch.int64 for k in BATCH_KEYS if k != "loss_mask")
    command = load_tokenizer("bert-base-uncased").command
    for i in range(4):
        sep = int(batch["sep"][i])
        assert int(batch["tokens"][i, 0]) == command.cls
        assert not batch["loss_mask"][i, :sep].any() and batch["loss_mask"][i, sep:].any()
        assert not batch["position_ids"][i, 1, :sep].any(), "block positions are 0 on Part A"
        assert torch.equal(batch["position_ids"][i, 0, :sep], torch.arange(sep))
        # Part B positions point back into Part A.
        assert int(batch["position_ids"][i, 0, sep:].max()) < sep
        assert int(batch["objective"][i]) in (Objective.TOKEN, Objective.SENTENCE, Objective.DOCUMENT)


def test_precomputed_equals_online_for_the_same_seed(sample_dir):
    epoch = len(GLMDataset(sample_dir, "train", "bert-base-uncased"))
    steps = K * epoch // 8
    assert_same_batches(take(loader(sample_dir), steps), take(loader(sample_dir, online=True), steps))
    # Past K epochs the online mode draws fresh variants; the precomputed one reuses variant epoch mod K.
    later = K * epoch
    precomputed = take(loader(sample_dir, consumed=later), 4)
    online = take(loader(sample_dir, consumed=later), 4)
    assert_same_batches(precomputed, online)
    online_fresh = take(loader(sample_dir, consumed=later, online=True), 4)
    assert any(not torch.equal(a["tokens"], b["tokens"]) for a, b in zip(precomputed, online_fresh))


def test_each_epoch_uses_its_variant_and_a_new_order(sample_dir):
    dataset = GLMDataset(sample_dir, "train", "bert-base-uncased")
    samples, n = dataset.samples, len(dataset)
    orders = []
    for epoch in range(3):
        refs = [samples.locate(epoch * n + j, shuffle=True) for j in range(n)]
        assert sorted(r.sample for r in refs) == list(range(n)), "an epoch visits every sample once"
        assert {r.pass_ for r in refs} == {epoch}
        orders.append([r.sample for r in refs])
        ref = refs[0]
        assert samples.draw(ref) == samples.stored_draw(ref.corpus, ref.sample, epoch % K)
    assert orders[0] != orders[1] != orders[2]
    valid = GLMDataset(sample_dir, "valid", "bert-base-uncased")
    assert [valid.samples.locate(j, valid.shuffle).sample for j in range(len(valid))] == list(
        range(len(valid))
    )


@pytest.mark.parametrize("size", [1, 2, 3, 17, 64, 1000, 4097])
def test_epoch_shuffle_is_a_permutation(size):
    image = [shuffled_position(i, size, key=12345) for i in range(size)]
    assert sorted(image) == list(range(size))
    if size > 16:
        assert image != list(range(size))


def test_resume_from_consumed_samples_single_rank(sample_dir):
    uninterrupted = take(loader(sample_dir), 6)
    # Resume after 2 optimizer steps (global batch 8 = 2 micro-batches of 4).
    resumed = take(loader(sample_dir, consumed=16), 2)
    assert_same_batches(uninterrupted[4:], resumed)
    with pytest.raises(DataError, match="multiple of"):
        GLMBatchSampler(micro_batch_size=4, global_batch_size=8, consumed_samples=6)


def _rank_batches(rank, world_size, sample_dir):
    """This rank's first 4 micro-batches, and 2 after resuming at 8 consumed samples (one optimizer step)."""
    assert dist.get_world_size() == world_size

    def tokens(consumed, count):
        data = loader(
            sample_dir, micro=2, global_batch=8, rank=dist.get_rank(), dp=world_size, consumed=consumed
        )
        return [batch["tokens"] for batch in take(data, count)]

    return tokens(0, 4), tokens(8, 2)


def test_data_parallel_ranks_split_each_global_batch_and_resume(sample_dir):
    # DP=2, micro 2, global 8: 2 accumulation steps per optimizer step; 4 micro-batches = 2 steps per rank.
    single = take(loader(sample_dir, micro=2, global_batch=8), 8)
    ranks = run_ranks(_rank_batches, 2, sample_dir)
    for step in range(4):
        assert torch.equal(ranks[0][0][step], single[2 * step]["tokens"])
        assert torch.equal(ranks[1][0][step], single[2 * step + 1]["tokens"])
    for rank in (0, 1):
        for step in range(2):
            assert torch.equal(ranks[rank][1][step], ranks[rank][0][step + 2]), "resume == uninterrupted"


def test_worker_processes_give_the_same_batches(sample_dir):
    assert_same_batches(take(loader(sample_dir), 3), take(loader(sample_dir, workers=2), 3))
    # Spawned workers receive the dataset pickled: only paths travel, the memory maps are reopened.
    dataset = GLMDataset(sample_dir, "train", "bert-base-uncased")
    blob = pickle.dumps(dataset)
    assert len(blob) < 64 << 10
    copy = pickle.loads(blob)
    for key, value in dataset[7].items():
        assert np.array_equal(value, copy[7][key]), key


def test_each_pass_restarts_in_the_same_worker_processes(sample_dir):
    """Evaluation iterates its loader anew every eval_interval steps: each pass starts again at the first
    micro-batch, served by the same worker processes (no fork per evaluation)."""
    repeated = loader(sample_dir, workers=1)
    first = take(repeated, 3)
    workers = [w.pid for w in repeated._iterator._workers]
    again = take(repeated, 2)
    assert [w.pid for w in repeated._iterator._workers] == workers
    assert all(w.is_alive() for w in repeated._iterator._workers)
    assert_same_batches(first[:2], again)


def test_objectives_must_match_precomputed_masks(sample_dir):
    other = ObjectiveConfig(**{**MIXTURE.__dict__, "task_mask": False})
    with pytest.raises(DataError, match="task_mask \\(built True, requested False\\)"):
        GLMDataset(sample_dir, "train", "bert-base-uncased", objectives=other)
    online = GLMDataset(sample_dir, "train", "bert-base-uncased", objectives=other, online=True)
    items = [online[q] for q in range(16)]
    assert any(item["objective"] != Objective.TOKEN for item in items)
    used = set().union(*(MASK_IDS & set(item["tokens"].tolist()) for item in items))
    assert used == {load_tokenizer("bert-base-uncased").command.mask}, (
        "no [sMASK]/[gMASK] without the task mask"
    )


def test_model_tokenizer_must_match(sample_dir):
    with pytest.raises(DataError, match="model uses 'gpt2'"):
        GLMDataset(sample_dir, "train", "gpt2")
    with pytest.raises(DataError, match="no samples"):
        GLMDataset(sample_dir, "test", "bert-base-uncased")[0]


def test_config_entry_points(sample_dir, tmp_path):
    corpus = SampleDirectory(sample_dir).corpus_paths[0]
    data = DataConfig(
        corpora=[CorpusConfig(path=corpus)],
        seq_length=T,
        objectives=MIXTURE,
        num_variants=K,
        split=[9.0, 1.0, 0.0],
        seed=5,
        cache_dir=str(sample_dir.parent),
    )
    directory = prepare_sample_directory(data, "bert-base-uncased")
    assert directory.path == sample_dir
    train = build_glm_data_loader(
        data, "bert-base-uncased", directory, "train", micro_batch_size=4, global_batch_size=8
    )
    assert_same_batches(take(train, 2), take(loader(sample_dir), 2))
    online = DataConfig(**{**data.__dict__, "online_masking": True, "cache_dir": str(tmp_path)})
    packed_only = prepare_sample_directory(online, "bert-base-uncased")
    assert packed_only.num_variants == 0
    online_loader = build_glm_data_loader(
        online, "bert-base-uncased", packed_only, "train", micro_batch_size=4, global_batch_size=8
    )
    assert_same_batches(take(online_loader, 2), take(loader(sample_dir), 2))
    with pytest.raises(DataError, match="without span variants"):
        GLMDataset(packed_only, "train", "bert-base-uncased")[0]


def test_collate_stacks_items():
    item = {
        "tokens": np.arange(4),
        "targets": np.arange(4),
        "loss_mask": np.ones(4, np.float32),
        "position_ids": np.zeros((2, 4), np.int64),
        "sep": 2,
        "objective": 1,
    }
    batch = collate_glm_batch([item, item])
    assert batch["position_ids"].shape == (2, 2, 4) and batch["sep"].tolist() == [2, 2]
