"""glm-convert: a TP2 x PP2 ZeRO-1 training checkpoint -> THUDM MP=1 -> Hugging Face -> import at MP=2, equal
within fp32 tolerance; the HF model (remote code, offline) returns our logits and fills a blank like
glm-fill-blanks; bad inputs give one message and write nothing."""

import dataclasses
import json
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM

from data_tools.tokenizer import load_tokenizer
from megatron_glm.checkpoint import ThudmShards, load_thudm_checkpoint, save_thudm_checkpoint
from megatron_glm.checkpoint.convert import export_hf, thudm_source
from megatron_glm.cli.convert import main as convert
from megatron_glm.config import load_config, padded_vocab_size
from megatron_glm.generation import fill_blanks
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tp2pp2_run):
    """A glm-pretrain checkpoint at TP2 x PP2, ZeRO-1 (4 gloo ranks; conftest.tp2pp2_run)."""
    root, run = tp2pp2_run
    return root, run / "checkpoints"


def _config(checkpoints):
    return dataclasses.replace(load_config(checkpoints / "2" / "config.yaml").model, kernels="torch")


@pytest.fixture(scope="module")
def tp1_model(trained):
    _, checkpoints = trained
    config = _config(checkpoints)
    initialize_parallel(1, 1)
    model = GLMModel(config, padded_vocab_size(config), seed=5)
    load_thudm_checkpoint(model, checkpoints)
    yield model.eval()
    destroy_parallel()


def _inputs(batch=2, length=20):
    """Part A of 14 tokens, then a span of 6 at position 5 (block positions 1..6)."""
    tokens = torch.randint(0, 30000, (batch, length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length).expand(batch, length).clone()
    positions[:, 14:] = 5
    block = torch.zeros(batch, length, dtype=torch.long)
    block[:, 14:] = torch.arange(1, length - 13)
    return tokens, torch.stack([positions, block], dim=1), torch.tensor([14, 14])


def _hf_dir(root, checkpoints):
    if not (root / "hf").exists():
        assert (
            convert(["export", "--to", "hf", "--max-shard-size", "2MB", str(checkpoints), str(root / "hf")])
            == 0
        )
    return root / "hf"


def test_round_trip_tp2pp2_to_thudm_to_hf_to_import_mp2(trained):
    root, checkpoints = trained
    assert convert(["export", "--to", "thudm", str(checkpoints), str(root / "mp1")]) == 0
    assert (root / "mp1" / "latest").read_text() == "release"
    hf = _hf_dir(root, checkpoints)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (
        convert(["import", "--from", "hf", "--model-parallel-size", "2", str(hf), str(root / "imported")])
        == 0
    )
    original = ThudmShards(checkpoints)
    for path in ("mp1", "imported"):
        converted = ThudmShards(root / path)
        keys = original.keys()
        assert converted.keys() == keys
        for key in keys:
            assert torch.equal(converted.full(key), original.full(key)), (path, key)
    assert ThudmShards(root / "imported").model_parallel_size == 2


def test_hf_export_returns_our_logits_inside_transformers(trained, tp1_model):
    root, checkpoints = trained
    hf = _hf_dir(root, checkpoints)
    tokens, positions, sep = _inputs()
    with torch.no_grad():
        expected = tp1_model.logits(tp1_model(tokens, positions, sep))
    for auto in (AutoModelForSeq2SeqLM, AutoModel):
        model, info = auto.from_pretrained(hf, trust_remote_code=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            logits = model.eval()(input_ids=tokens, position_ids=positions, attention_mask=sep).logits
        assert (logits - expected).abs().max() < 1e-4


def test_hf_generate_fills_a_blank_like_glm_fill_blanks(trained, tp1_model, tmp_path):
    _, checkpoints = trained
    config = _config(checkpoints)
    # Untrained weights: the answer is arbitrary tokens, not [eop] at once, so both decoders run 6 steps.
    model = GLMModel(config, padded_vocab_size(config), seed=11).eval()
    save_thudm_checkpoint(model, tmp_path / "random")
    tokenizer = load_tokenizer(config.tokenizer)
    text = "It is a truth universally [MASK] that a single man"
    ours = fill_blanks(model, tokenizer, text, max_tokens=6).answer_ids[0]
    export_hf(thudm_source(tmp_path / "random"), tmp_path / "hf", config)
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    remote = sys.modules[type(hf).__module__]
    command = tokenizer.command
    ids = torch.tensor([[command.cls, *tokenizer.encode_with_commands(text), command.eos]])
    inputs = remote.build_inputs_for_generation(ids, command.sop, command.mask_ids(), 6)
    out = hf.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=[command.eop, command.eos],
        pad_token_id=command.pad,
    )
    generated = [t for t in out[0, ids.shape[1] + 1 :].tolist() if t not in (command.eop, command.eos)]
    assert len(ours) > 0
    assert generated == ours


def test_safetensors_export_holds_our_keys(trained, tmp_path):
    from safetensors.torch import load_file

    _, checkpoints = trained
    output = tmp_path / "m.safetensors"
    assert convert(["export", "--to", "safetensors", "--dtype", "bf16", str(checkpoints), str(output)]) == 0
    state = load_file(output)
    original = ThudmShards(checkpoints)
    keys = original.keys()
    assert list(state) == keys
    for key in keys:
        assert torch.equal(state[key], original.full(key).to(torch.bfloat16)), key


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["export", "--to", "thudm", "--model-parallel-size", "3"],
            "model-parallel size 3 does not divide 4 attention heads",
        ),
        (["export", "--to", "hf", "--config", "hidden=128"], "hidden size 64 (config model.hidden_size=128)"),
        (
            ["import", "--from", "thudm", "--config", "vocab=50304"],
            "30720 vocabulary rows (config model.vocab_size=50304)",
        ),
        (["export", "--to", "thudm", "EXISTS"], "already exists; choose another output or pass --overwrite"),
    ],
)
def test_bad_targets_and_configs_are_refused_and_nothing_is_written(
    trained, tmp_path, capsys, arguments, message
):
    _, checkpoints = trained
    output = tmp_path / "out"
    fields = {"hidden": 64, "vocab": 30720}
    for i, argument in enumerate(arguments):
        if "=" in argument:
            name, value = argument.split("=")
            fields[name] = int(value)
            (tmp_path / "c.yaml").write_text(
                "model:\n  num_layers: 2\n  num_attention_heads: 4\n  max_position_embeddings: 64\n"
                f"  hidden_size: {fields['hidden']}\n  vocab_size: {fields['vocab']}\n"
            )
            arguments[i] = str(tmp_path / "c.yaml")
    if "EXISTS" in arguments:
        arguments = [a for a in arguments if a != "EXISTS"]
        output.mkdir()
    assert convert([*arguments, str(checkpoints), str(output)]) == 1
    assert message in capsys.readouterr().err
    assert not output.exists() or not any(output.iterdir())
    assert not list(tmp_path.glob("out.tmp-*"))


def test_a_missing_shard_and_an_interrupted_conversion(trained, tmp_path, capsys):
    _, checkpoints = trained
    split = tmp_path / "mp2"
    assert (
        convert(["export", "--to", "thudm", "--model-parallel-size", "2", str(checkpoints), str(split)]) == 0
    )
    (split / "release" / "mp_rank_00_model_states.pt").unlink()
    config = str(checkpoints / "2" / "config.yaml")
    assert convert(["export", "--to", "hf", "--config", config, str(split), str(tmp_path / "hf")]) == 1
    assert "model-parallel ranks [1] are not 0..0; a shard file is missing" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

    source = thudm_source(checkpoints)
    produce, calls = source.tensor, []

    def interrupted(key):
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return produce(key)

    source.tensor = interrupted
    with pytest.raises(KeyboardInterrupt):
        export_hf(source, tmp_path / "partial", _config(checkpoints))
    assert not list(tmp_path.glob("partial*"))
