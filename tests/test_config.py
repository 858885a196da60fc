"""Configs: reference sizes, validation rules naming the key, YAML errors with file:line, overrides."""

from pathlib import Path

import pytest

from megatron_glm.config import (
    ConfigError,
    count_parameters,
    load_config,
    padded_vocab_size,
    parallel_layout,
    uses_cuda_graphs,
    validate_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "run" / "configs"

# Parameter counts of the released GLM architectures (the GLM paper, Table 1; THUDM/GLM README).
REFERENCE_PARAMETERS = {
    "glm-base": 109.3e6,
    "glm-large": 334.7e6,
    "glm-410m": 410.3e6,
    "glm-515m": 514.6e6,
    "glm-2b": 1.92e9,
    "glm-10b": 9.88e9,
}
REFERENCE_VOCAB = {
    "glm-base": 30592,
    "glm-large": 30592,
    "glm-410m": 30592,
    "glm-515m": 30592,
    "glm-2b": 50304,
    "glm-10b": 50304,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_reference_sizes_validate_with_the_reference_parameter_count(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate_config(cfg)
    vocab = padded_vocab_size(cfg.model)
    assert vocab == REFERENCE_VOCAB[name]
    params = count_parameters(cfg.model, vocab)
    assert abs(params - REFERENCE_PARAMETERS[name]) / REFERENCE_PARAMETERS[name] < 0.01


def test_every_shipped_config_loads_and_validates():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert "glm-tiny" in names and set(REFERENCE_PARAMETERS) <= set(names)
    for name in names:
        validate_config(load_config(CONFIGS / f"{name}.yaml"))


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config(
        CONFIGS / "glm-tiny.yaml",
        [
            "training.micro_batch_size=4",
            "optimizer.lr=3e-4",
            "training.micro_batch_size=2",
            "model.kernels=torch",
        ],
    )
    assert cfg.training.micro_batch_size == 2
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.kernels == "torch"


def _error(overrides, world_size=None):
    cfg = load_config(CONFIGS / "glm-base.yaml", overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size)
    return str(info.value)


@pytest.mark.parametrize(
    "overrides,world_size,key",
    [
        (["parallel.tensor_parallel_size=5"], None, "model.num_attention_heads"),
        (["parallel.pipeline_parallel_size=5"], None, "model.num_layers"),
        (["training.global_batch_size=1000"], 8, "training.global_batch_size"),
        (["model.vocab_size=30000"], None, "model.vocab_size"),
        (["model.vocab_size=30592", "parallel.tensor_parallel_size=2"], None, "model.vocab_size"),
        (["data.seq_length=1024"], None, "data.seq_length"),
        (["parallel.pipeline_parallel_size=2", "parallel.zero_stage=2"], None, "parallel.zero_stage"),
        (["parallel.zero_stage=0", "training.precision=bf16"], None, "parallel.zero_stage"),
        (["data.objectives.token_prob=0.5"], None, "data.objectives.token_prob"),
        (["model.hidden_size=770"], None, "model.hidden_size"),
        (["parallel.tensor_parallel_size=4"], 6, "parallel.tensor_parallel_size"),
    ],
)
def test_each_broken_rule_names_its_key(overrides, world_size, key):
    assert f"  {key}: " in _error(overrides, world_size)


@pytest.mark.parametrize(
    "overrides,why",
    [
        (["model.activation_checkpointing=full"], "model.activation_checkpointing none"),
        (["parallel.pipeline_parallel_size=2", "parallel.zero_stage=1"], "parallel.pipeline_parallel_size 1"),
        (["parallel.zero_stage=3"], "parallel.zero_stage 0-2"),
    ],
)
def test_cuda_graphs_name_what_they_cannot_run_with(overrides, why):
    assert f"  training.cuda_graphs: per-layer CUDA graphs need {why}" in _error(
        ["training.cuda_graphs=true", *overrides]
    )
    validate_config(load_config(CONFIGS / "glm-base.yaml", overrides))  # without graphs the setup is valid


@pytest.mark.parametrize(
    "overrides,on_a_gpu",
    [
        ([], True),
        (["model.activation_checkpointing=full"], False),
        (["parallel.pipeline_parallel_size=2", "parallel.zero_stage=1"], False),
        (["parallel.zero_stage=3"], False),
    ],
)
def test_cuda_graphs_auto_takes_them_where_they_can_run(overrides, on_a_gpu):
    # auto: per-layer graphs on a CUDA device where nothing stands in their way, off elsewhere, never an error.
    cfg = load_config(CONFIGS / "glm-base.yaml", ["training.cuda_graphs=auto", *overrides])
    validate_config(cfg)
    assert uses_cuda_graphs(cfg, "cuda") is on_a_gpu
    assert uses_cuda_graphs(cfg, "cpu") is False
    # true asks for them (refused above where they cannot run), false never runs them.
    for setting, wanted in (("true", True), ("false", False)):
        assert (
            uses_cuda_graphs(
                load_config(CONFIGS / "glm-base.yaml", [f"training.cuda_graphs={setting}"]), "cuda"
            )
            is wanted
        )


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_cuda_graphs_take_true_false_or_auto(value):
    # 1 is no true here: the setting is one of three words, not a number.
    with pytest.raises(ConfigError, match="training.cuda_graphs: must be one of False, True, 'auto', got "):
        load_config(CONFIGS / "glm-base.yaml", [f"training.cuda_graphs={value}"])


def test_global_batch_error_suggests_a_valid_value():
    message = _error(["training.global_batch_size=1000"], 8)
    assert "micro 16 x dp 8 = 128" in message and "896" in message


def test_layout_derives_data_parallel_and_accumulation():
    cfg = load_config(
        CONFIGS / "glm-base.yaml",
        [
            "parallel.tensor_parallel_size=2",
            "parallel.pipeline_parallel_size=2",
            "training.micro_batch_size=4",
            "training.global_batch_size=64",
        ],
    )
    layout = parallel_layout(cfg, 16)
    assert (layout.data_parallel_size, layout.gradient_accumulation_steps) == (4, 4)


def test_derived_vocab_is_padded_for_tensor_parallelism():
    cfg = load_config(CONFIGS / "glm-base.yaml")
    assert padded_vocab_size(cfg.model, 1) == 30592
    assert padded_vocab_size(cfg.model, 2) == 30720


def test_unknown_key_reports_file_line_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  num_layers: 2\n  hiden_size: 64\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml:4: model.hiden_size: unknown key; did you mean 'hidden_size'"
    ):
        load_config(path)


def test_wrong_type_reports_file_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  precision: fp8\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: training.precision: must be one of"):
        load_config(path)
    path.write_text("training:\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: training.micro_batch_size: expected an integer"):
        load_config(path)


def test_bad_override_names_the_flag():
    with pytest.raises(ConfigError, match=r"--set training.micro_batch_size: expected an integer"):
        load_config(CONFIGS / "glm-tiny.yaml", ["training.micro_batch_size=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(CONFIGS / "glm-tiny.yaml", ["training.micro_batch_size"])


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_validate_reports_count_and_fails_with_exit_code_2(capsys):
    from megatron_glm.cli.config_cli import main

    assert main(["validate", str(CONFIGS / "glm-large.yaml"), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "334,688,256" in out and "dp 64" in out
    assert main(["validate", str(CONFIGS / "glm-large.yaml"), "--world-size", "48"]) == 2
    assert "training.global_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.vocab_size=1024"], "model.vocab_size"),
        (["model.tokenizer=no/such/tokenizer.json"], "model.tokenizer"),
        (["model.attention_scale=0"], "model.attention_scale"),
        (["training.eval_interval=10", "training.eval_steps=0"], "training.eval_steps"),
        (["checkpoint.interval=-5"], "checkpoint.interval"),
        (["model.kernels=triton", "model.num_attention_heads=2", "model.hidden_size=512"], "model.kernels"),
    ],
)
def test_settings_that_would_fail_later_are_refused_up_front(overrides, key):
    assert f"  {key}: " in _error(overrides)
