"""glm-generate (and its alias glm-fill-blanks) end to end on a checkpoint on disk: the JSON-lines output
is the library's answers; bad input names the file and line (or the key) and writes nothing."""

import json

import pytest
import torch
import yaml

from data_tools.tokenizer import load_tokenizer
from megatron_glm.checkpoint import save_thudm_checkpoint
from megatron_glm.cli import inference
from megatron_glm.cli.fill_blanks import main as fill_blanks_main
from megatron_glm.cli.generate import main as generate_main
from megatron_glm.config import GLMConfig, ModelConfig
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel
from megatron_glm.training import distributed

MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "init_method_std": 0.5,
    "kernels": "torch",
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL}))
    initialize_parallel(1, 1)
    try:
        model = GLMModel(ModelConfig(**MODEL), 30592, seed=3)
        save_thudm_checkpoint(model, root / "checkpoints")
    finally:
        destroy_parallel()
    return root, config, root / "checkpoints", model


def test_jsonl_in_jsonl_out_equals_the_library(checkpoint, tmp_path):
    _, config, checkpoints, model = checkpoint
    texts = ["the [MASK] was [MASK] today", "a most affectionate [sMASK]", "it was a fine day"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    output = tmp_path / "out.jsonl"
    args = ["--config", str(config), "--checkpoint", str(checkpoints), "--input", str(source)]
    args += [
        "--output",
        str(output),
        "--strategy",
        "beam",
        "--num-beams",
        "3",
        "--max-tokens",
        "4",
        "--batch-size",
        "2",
    ]
    assert generate_main(args) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    initialize_parallel(1, 1)
    try:
        expected = generate(
            model,
            load_tokenizer("bert-base-uncased"),
            texts,
            GenerationConfig("beam", max_tokens=4, num_beams=3),
        )
    finally:
        destroy_parallel()
    assert [r["text"] for r in records] == texts
    assert [r["answers"] for r in records] == [e.answers for e in expected]
    assert [len(r["answers"]) for r in records] == [2, 1, 1]


def test_fill_blanks_alias_prints_answers(checkpoint, capsys):
    _, config, checkpoints, _ = checkpoint
    args = [
        "--config",
        str(config),
        "--checkpoint",
        str(checkpoints),
        "--text",
        "the [MASK] was here",
        "--max-tokens",
        "2",
    ]
    assert fill_blanks_main(args) == 0
    assert "answers:" in capsys.readouterr().out


def _error(capsys, args):
    code = generate_main(args)
    return code, capsys.readouterr().err


def test_bad_input_is_named_and_nothing_is_written(checkpoint, tmp_path, capsys):
    root, config, checkpoints, _ = checkpoint
    base = ["--config", str(config), "--checkpoint", str(checkpoints)]
    output = tmp_path / "out.jsonl"
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "a [MASK]"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    code, err = _error(capsys, [*base, "--input", str(source), "--output", str(output)])
    assert code == 1 and f"{source}:2: no 'text' field" in err
    source.write_text(json.dumps({"text": "word " * 80}) + "\n")
    code, err = _error(capsys, [*base, "--input", str(source), "--output", str(output)])
    assert code == 1 and f"{source}:1: " in err and "max_position_embeddings=64" in err
    code, err = _error(capsys, [*base, "--text", "a [MASK]", "--strategy", "sample", "--temperature", "0"])
    assert code == 1 and "temperature=0.0 must be positive" in err
    assert not output.exists() and not list(tmp_path.glob("out.jsonl*"))
    # A checkpoint trained with another vocabulary than the config's tokenizer.
    gpt2 = root / "gpt2.yaml"
    gpt2.write_text(yaml.safe_dump({"model": {**MODEL, "tokenizer": "gpt2"}}))
    code, err = _error(
        capsys, ["--config", str(gpt2), "--checkpoint", str(checkpoints), "--text", "a [MASK]"]
    )
    assert code == 1 and "another vocabulary" in err


def test_eval_cli_reports_the_library_numbers_and_names_bad_input(checkpoint, tmp_path, capsys):
    from megatron_glm.cli.evaluate import main as eval_main
    from megatron_glm.evaluation.zero_shot import corpus_stream, last_word_accuracy, perplexity
    from tests.glm_corpora import austen_chapters, write_corpus

    _, config, checkpoints, model = checkpoint
    base = ["--config", str(config), "--checkpoint", str(checkpoints)]
    paragraphs = austen_chapters(0, 1)[0].split("\n")[:4]
    source = tmp_path / "lambada.jsonl"
    source.write_text("".join(json.dumps({"text": p[:200].rsplit(" ", 1)[0]}) + "\n" for p in paragraphs))
    corpus = write_corpus(tmp_path / "corpus", paragraphs)
    assert eval_main(["lambada", *base, "--input", str(source)]) == 0
    lambada = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        eval_main(
            ["perplexity", *base, "--corpus", corpus, "--window", "32", "--stride", "8", "--unidirectional"]
        )
        == 0
    )
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokenizer = load_tokenizer("bert-base-uncased")
    initialize_parallel(1, 1)
    try:
        texts = [(str(i), json.loads(line)["text"]) for i, line in enumerate(source.read_text().splitlines())]
        assert (
            lambada["total"] == 4
            and lambada["correct"] == last_word_accuracy(model, tokenizer, texts).correct
        )
        stream = corpus_stream(corpus, tokenizer.command)
        expected = perplexity(
            model, stream, tokenizer.command, tokenizer.num_tokens, window=32, stride=8, unidirectional=True
        )
        assert ppl["tokens"] == len(stream) - 1 and ppl["perplexity"] == pytest.approx(
            expected.perplexity, rel=1e-5
        )
    finally:
        destroy_parallel()
    source.write_text(json.dumps({"text": "two words"}) + "\n" + json.dumps({"text": "oneword"}) + "\n")
    assert eval_main(["lambada", *base, "--input", str(source)]) == 1
    assert f"{source}:2: the text needs a context and a last word" in capsys.readouterr().err
    assert eval_main(["perplexity", *base, "--corpus", corpus, "--window", "64", "--stride", "8"]) == 1
    assert "max_position_embeddings=64" in capsys.readouterr().err
    assert eval_main(["perplexity", *base, "--corpus", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


class _PlacedModel(torch.nn.Module):
    """Stands in for GLMModel: records where ``load_for_inference`` materializes it."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.placed_on = None

    def to_empty(self, *, device, recurse=True):
        self.placed_on = device
        return self


@pytest.mark.parametrize(
    "gpus_per_rank, visible_gpus, expected",
    [("0", 2, torch.device("cuda", 1)), ("1", 1, torch.device("cuda", 0))],
    ids=["shared-gpus", "gpu-per-rank"],
)
def test_each_inference_rank_loads_the_model_onto_its_gpu(monkeypatch, gpus_per_rank, visible_gpus, expected):
    # Rank 1 of a two-rank glm-generate / glm-evaluate on GPUs: CUDA, the process group and the model are
    # mocked, the device choice is the library's.
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GLM_GPUS_PER_RANK", gpus_per_rank)
    monkeypatch.delenv("SLURM_GPUS_PER_TASK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    launch = distributed.LaunchInfo("torchrun", 1, 2, 1, "127.0.0.1", 29500)
    monkeypatch.setattr(distributed, "init_distributed", lambda: launch)
    groups, loaded = [], []
    monkeypatch.setattr(inference, "initialize_parallel", lambda *sizes: groups.append(sizes))
    monkeypatch.setattr(inference, "GLMModel", _PlacedModel)
    monkeypatch.setattr(inference, "load_thudm_checkpoint", lambda model, path: loaded.append(path))

    model, _ = inference.load_for_inference(GLMConfig(model=ModelConfig(**MODEL)), "checkpoints")

    assert model.placed_on == expected and groups == [(2, 1)] and loaded == ["checkpoints"]


def test_inference_under_srun_is_tensor_parallel_over_its_ranks(monkeypatch):
    # srun sets no WORLD_SIZE: rank 1 of two srun tasks must still join the others, not run a copy of its own.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (
        ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", "0"), ("SLURM_LOCALID", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):  # fmt: skip
        monkeypatch.setenv(name, value)
    joined, groups = [], []
    monkeypatch.setattr(
        distributed, "init_distributed", lambda: joined.append(1) or distributed.detect_launch()
    )
    monkeypatch.setattr(inference, "initialize_parallel", lambda *sizes: groups.append(sizes))
    monkeypatch.setattr(inference, "GLMModel", _PlacedModel)
    monkeypatch.setattr(inference, "load_thudm_checkpoint", lambda model, path: None)

    model, _ = inference.load_for_inference(GLMConfig(model=ModelConfig(**MODEL)), "checkpoints")

    assert joined == [1] and groups == [(2, 1)]
    assert model.placed_on.type == ("cuda" if torch.cuda.is_available() else "cpu")
