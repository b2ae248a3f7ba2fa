"""Tests for recipe configuration: defaults, YAML + flags + key=value layers, and every error message."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from tunelab.cli import _data_source, main
from tunelab.config import (
    ConfigError,
    DataSource,
    SFTConfig,
    TrainConfig,
    build_config,
    config_to_yaml,
    describe_fields,
    parse_override,
)


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(SFTConfig, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- defaults and layers


def test_defaults():
    config = build_config(SFTConfig)
    assert config == SFTConfig()
    assert (config.peft, config.lora.r, config.lora.alpha, config.train.batch_size) == ("lora", 8, 16.0, 8)
    assert (config.data.max_length, config.data.overlong, config.data.train_on_prompt) == (512, "truncate", False)
    assert config.data.sources == [] and config.train.lr is None
    assert config.resolved_lr() == 2e-4
    assert build_config(SFTConfig, overrides=["peft=none"]).resolved_lr() == 2e-5
    assert build_config(SFTConfig, overrides=["peft=none", "train.lr=3e-3"]).resolved_lr() == 3e-3


def test_layers_later_wins(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.001\n  batch_size: 4\n  epochs: 3\nlora:\n  r: 4\n"
                                "data:\n  sources:\n    - path: a.jsonl\n      weight: 2\n")
    config = build_config(
        SFTConfig, yaml_path=str(path),
        flags={"train.lr": 5e-4, "train.batch_size": None, "train.epochs": 2.0, "output": "runs/x"},
        overrides=["lora.r=16", "train.epochs=5"])
    assert config.train.lr == 5e-4          # flag beats YAML
    assert config.train.batch_size == 4     # a None flag (not given) leaves the YAML value
    assert config.train.epochs == 5.0       # override beats flag
    assert config.lora.r == 16              # override beats YAML
    assert config.lora.alpha == 16.0        # untouched default
    assert config.output == "runs/x"
    assert config.data.sources == [DataSource(path="a.jsonl", weight=2.0)]


def test_flags_replace_yaml_sources(tmp_path):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n  max_length: 64\n")
    config = build_config(SFTConfig, yaml_path=str(path),
                          flags={"data.sources": [{"path": "b.jsonl"}, {"path": "c.csv", "weight": 0.5}]})
    assert [(s.path, s.weight) for s in config.data.sources] == [("b.jsonl", 1.0), ("c.csv", 0.5)]
    assert config.data.max_length == 64


@pytest.mark.parametrize("text,key,value", [
    ("train.lr=2e-4", "train.lr", "2e-4"),
    ("train.max_steps=3", "train.max_steps", 3),
    ("data.train_on_prompt=true", "data.train_on_prompt", True),
    ("train.max_grad_norm=null", "train.max_grad_norm", None),
    ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
    ("model.name_or_path=", "model.name_or_path", ""),
    ("output = runs/a=b", "output", "runs/a=b"),
    ("data.chat_template={% for m in messages %}{{ m['content'] }}{% endfor %}", "data.chat_template",
     "{% for m in messages %}{{ m['content'] }}{% endfor %}"),  # not valid YAML: kept as the raw text
])
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_override_values_get_their_types():
    config = build_config(SFTConfig, overrides=[
        "train.lr=2e-4", "train.max_steps=3", "data.train_on_prompt=true", "train.max_grad_norm=null",
        "lora.target_modules=[q_proj, v_proj]", "train.schedule=linear", "data.chat_template=chatml"])
    assert config.train.lr == pytest.approx(2e-4) and isinstance(config.train.lr, float)
    assert config.train.max_steps == 3
    assert config.data.train_on_prompt is True
    assert config.train.max_grad_norm is None
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.schedule == "linear"
    assert config.data.chat_template == "chatml"


@pytest.mark.parametrize("text", ["train.lr", "=5", "  =x"])
def test_override_without_key_value_form(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert str(info.value) == f"override '{text}' is not of the form key=value (for example train.lr=2e-4)"


def test_config_to_yaml_round_trip(tmp_path):
    config = build_config(SFTConfig, flags={"data.sources": [{"path": "a.jsonl", "weight": 0.5}]},
                          overrides=["lora.r=4", "train.lr=1e-3", "peft=none"])
    text = config_to_yaml(config)
    assert yaml.safe_load(text)["lora"]["r"] == 4
    assert list(yaml.safe_load(text)) == ["model", "data", "peft", "lora", "prompt_tuning", "quantization", "train",
                                          "output"]
    path = write_yaml(tmp_path, text, "resolved.yaml")
    assert build_config(SFTConfig, yaml_path=str(path)) == config


def test_sections_forbid_unknown_keys_and_validate_assignment():
    with pytest.raises(ValidationError):
        TrainConfig(lrr=1.0)
    config = SFTConfig()
    with pytest.raises(ValidationError):
        config.train.batch_size = 0
    with pytest.raises(ValidationError):
        DataSource(path="a.jsonl", format="xml")
    with pytest.raises(ValidationError):
        DataSource(path="a.jsonl", weight=0)


def test_describe_fields():
    rows = {key: (default, help) for key, default, help in describe_fields(SFTConfig)}
    assert rows["train.lr"] == ("None", "peak learning rate (null: 0.0002 with peft=lora or qlora; 0.03 with "
                                "peft=prompt; 2e-05 with peft=none)")
    assert rows["lora.r"] == ("8", "LoRA rank")
    assert rows["data.sources"] == ("[]", "datasets to mix (--data)")
    assert rows["data.overlong"][0] == "'truncate'"
    assert "data" not in rows and "train" not in rows and "data.sources.path" not in rows
    leaves = {f"{section}.{name}" for section in ("model", "data", "lora", "prompt_tuning", "quantization", "train")
              for name in type(getattr(SFTConfig(), section)).model_fields}
    items = {f"data.{field}.N.{name}" for field in ("sources", "eval_sources") for name in DataSource.model_fields}
    assert set(rows) == leaves | items | {"peft", "output"}
    assert rows["data.sources.N.path"][0] == "required" and rows["data.sources.N.format"][0] == "'auto'"


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_key_from_override_suggests_and_names_override():
    assert config_error(overrides=["train.lrr=1e-4"]) == (
        "unknown config key 'train.lrr' (from override 'train.lrr=1e-4') (did you mean 'train.lr'?)")
    assert config_error(overrides=["data.max_lenght=256"]) == (
        "unknown config key 'data.max_lenght' (from override 'data.max_lenght=256') "
        "(did you mean 'data.max_length'?)")
    assert config_error(overrides=["pfet=none"]) == (
        "unknown config key 'pfet' (from override 'pfet=none') (did you mean 'peft'?)")


def test_unknown_key_from_yaml_suggests_and_names_file(tmp_path):
    path = write_yaml(tmp_path, "lora:\n  rank: 16\n")
    assert config_error(yaml_path=str(path)) == (
        f"unknown config key 'lora.rank' (in {path}) (did you mean 'lora.r'?)")
    path = write_yaml(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      wieght: 2\n")
    assert config_error(yaml_path=str(path)) == (
        f"unknown config key 'data.sources.1.wieght' (in {path}) (did you mean 'data.sources.1.weight'?)")
    path = write_yaml(tmp_path, "tran: 5\n")
    assert config_error(yaml_path=str(path)) == f"unknown config key 'tran' (in {path}) (did you mean 'train'?)"


def test_unknown_key_without_a_close_match_lists_known_keys():
    msg = config_error(overrides=["data.banana=1"])
    assert msg == ("unknown config key 'data.banana' (from override 'data.banana=1'); known keys here: "
                   "data.sources, data.eval_sources, data.columns, data.max_length, data.overlong, data.train_on_prompt, data.eval_fraction, "
                   "data.eval_max_rows, data.chat_template, data.cache_dir")


@pytest.mark.parametrize("source", ["yaml", "override"])
def test_misspelled_section_names_its_source(tmp_path, source):
    if source == "yaml":
        path = write_yaml(tmp_path, "lora:\n  r: 4\ntrian:\n  lr: 0.1\n")
        msg = config_error(yaml_path=str(path))
        assert msg == f"unknown config key 'trian' (in {path}) (did you mean 'train'?)"
    else:
        msg = config_error(overrides=["modle.name_or_path=gpt2"])
        assert msg == ("unknown config key 'modle' (from override 'modle.name_or_path=gpt2') "
                       "(did you mean 'model'?)")


def test_whole_source_list_can_be_overridden():
    config = build_config(SFTConfig, overrides=["data.sources=[{path: a.jsonl, weight: 2}, {path: b.csv}]"])
    assert [(s.path, s.weight) for s in config.data.sources] == [("a.jsonl", 2.0), ("b.csv", 1.0)]


def test_override_of_one_source_field():
    config = build_config(SFTConfig, flags={"data.sources": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]},
                          overrides=["data.sources.0.weight=2"])
    assert [(s.path, s.weight) for s in config.data.sources] == [("a.jsonl", 2.0), ("b.jsonl", 1.0)]


# ----------------------------------------------------------------------------- wrong values


def test_wrong_type_from_override_names_key_and_override():
    assert config_error(overrides=["train.lr=abc"]) == (
        "config value 'train.lr' (from override 'train.lr=abc'): Input should be a valid number, "
        "unable to parse string as a number (got 'abc')")
    assert config_error(overrides=["train.batch_size=0"]) == (
        "config value 'train.batch_size' (from override 'train.batch_size=0'): "
        "Input should be greater than or equal to 1 (got 0)")
    assert config_error(overrides=["data.overlong=cut"]) == (
        "config value 'data.overlong' (from override 'data.overlong=cut'): "
        "Input should be 'truncate' or 'drop' (got 'cut')")


def test_wrong_values_from_yaml_are_all_reported(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: many\n  lr: -1\n")
    lines = config_error(yaml_path=str(path)).split("\n")
    assert sorted(lines) == sorted([
        f"config value 'train.lr' (in {path}): Input should be greater than 0 (got -1)",
        f"config value 'train.batch_size' (in {path}): Input should be a valid integer, unable to parse string "
        "as an integer (got 'many')",
    ])


def test_section_that_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "train: 5\n")
    assert config_error(yaml_path=str(path)) == (
        f"config value 'train' (in {path}): Input should be a valid dictionary or instance of TrainConfig (got 5)")


def test_unknown_source_format_name(tmp_path):
    path = write_yaml(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n      format: xml\n")
    assert config_error(yaml_path=str(path)) == (
        f"config value 'data.sources.0.format' (in {path}): Input should be 'auto', 'text', 'prompt_completion', "
        "'alpaca', 'messages', 'sharegpt', 'kto', 'preference' or 'prompt' (got 'xml')")


def test_bad_flag_value_names_the_flag():
    assert config_error(flags={"data.sources": [{"path": "a.jsonl", "weight": -1.0}]}) == (
        "config value 'data.sources.0.weight' (from flag for data.sources): Input should be greater than 0 "
        "(got -1.0)")


def test_union_type_error_names_override():
    msg = config_error(overrides=["lora.target_modules={a: 1}"])
    assert msg.startswith("config value 'lora.target_modules' (from override 'lora.target_modules={a: 1}'): ")
    assert "\n" not in msg  # one line per key, not one per union member


def test_numbers_given_for_string_fields_stay_strings():
    config = build_config(SFTConfig, overrides=["output=123", "model.name_or_path=1234"])
    assert config.output == "123" and config.model.name_or_path == "1234"


def test_list_index_override_out_of_range_is_named():
    msg = config_error(flags={"data.sources": [{"path": "a.jsonl"}]}, overrides=["data.sources.3.weight=2"])
    assert msg == "config key 'data.sources.3.weight': '3' is not an index of the 1-item list 'data.sources'"


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("text,type_name", [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, type_name):
    path = write_yaml(tmp_path, text)
    assert config_error(yaml_path=str(path)) == f"config file {path} must hold a mapping of keys, got {type_name}"


def test_empty_yaml_gives_defaults(tmp_path):
    assert build_config(SFTConfig, yaml_path=str(write_yaml(tmp_path, ""))) == SFTConfig()


def test_invalid_yaml_and_missing_file(tmp_path):
    path = write_yaml(tmp_path, "train: [\n")
    assert config_error(yaml_path=str(path)).startswith(f"config file {path} is not valid YAML: ")
    missing = tmp_path / "nope.yaml"
    assert config_error(yaml_path=str(missing)) == f"config file not found: {missing}"


# ----------------------------------------------------------------------------- the CLI layer


@pytest.mark.parametrize("text,expected", [
    ("data.jsonl", {"path": "data.jsonl"}),
    ("data.jsonl:0.5", {"path": "data.jsonl", "weight": 0.5}),
    ("org/name:2", {"path": "org/name", "weight": 2.0}),
    ("odd:name.jsonl", {"path": "odd:name.jsonl"}),
    (":3", {"path": ":3"}),
])
def test_data_flag_parsing(text, expected):
    assert _data_source(text) == expected


def test_cli_config_errors_exit_2(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    base = ["inspect", "--model", str(tokenizer_dir), "--data", str(data), "--no-color"]

    assert main(base + ["train.lrr=1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tunelab inspect: error: unknown config key 'train.lrr' (from override 'train.lrr=1') "
        "(did you mean 'train.lr'?)")

    assert main(base + ["data.max_length=abc"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tunelab inspect: error: config value 'data.max_length' (from override 'data.max_length=abc'): "
        "Input should be a valid integer, unable to parse string as an integer (got 'abc')")

    path = write_yaml(tmp_path, "- not\n- a mapping\n")
    assert main(base + ["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tunelab inspect: error: config file {path} must hold a mapping of keys, got list")

    assert main(base + ["--data", f"{data}:-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tunelab inspect: error: config value 'data.sources.1.weight' (from flag for data.sources): "
        "Input should be greater than 0 (got -1.0)")


def test_cli_config_file_and_overrides_reach_the_data(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Write a review.", "completion": " ' + "It was wonderful. " * 20 + '"}\n')
    path = write_yaml(tmp_path, f"data:\n  sources:\n    - path: {data}\n  max_length: 512\n")
    assert main(["inspect", "--model", str(tokenizer_dir), "--config", str(path), "--no-color",
                 "data.max_length=12"]) == 0
    out = capsys.readouterr().out
    assert f"source {data} [prompt_completion]: 1 rows, 1 kept (1 truncated)" in out
    assert "tokens per row: p50 12, p90 12, p99 12, max 12" in out


def test_cli_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "config keys (set them in --config YAML or as key=value" in out
    assert "LoRA rank [default: 8]" in out
    assert "data.max_length" in out


def test_overrides_may_sit_between_flags():
    from tunelab.cli import _parse, build_parser

    args = _parse(build_parser(), ["sft", "--model", "m", "train.log_every=5", "--lr", "1e-3", "train.precision=bf16",
                                   "--epochs", "2", "lora.r=4"])
    assert args.overrides == ["train.log_every=5", "train.precision=bf16", "lora.r=4"]
    assert args.lr == 1e-3 and args.epochs == 2.0


def test_unknown_flag_is_still_rejected(capsys):
    from tunelab.cli import _parse, build_parser

    with pytest.raises(SystemExit):
        _parse(build_parser(), ["sft", "--model", "m", "a=1", "--lr-max", "1", "b=2"])
    assert "unrecognized arguments: --lr-max 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides takes none
        _parse(build_parser(), ["merge", "run", "--output", "o", "a=1"])


def test_micro_batch_tokens_auto_number_or_off():
    from tunelab.modeling import activation_bytes_per_token
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only
        big = LlamaForCausalLM(LlamaConfig(hidden_size=512, num_hidden_layers=8, intermediate_size=1376))
        tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                            num_attention_heads=4, num_key_value_heads=4))
    per_token = activation_bytes_per_token(big)
    assert per_token == 4 * 8 * (8 * 512 + 4 * 1376)
    train = build_config(SFTConfig).train
    assert train.micro_batch_budget("cpu", per_token) == 160 * 2 ** 20 // per_token  # 546 tokens
    assert train.micro_batch_budget("cuda", per_token) == 1024 * 2 ** 20 // per_token
    assert train.micro_batch_budget("cpu", activation_bytes_per_token(tiny)) == 16384  # overhead-bound: whole batches
    assert train.micro_batch_budget("cpu", 10 ** 9) == 512
    fixed = build_config(SFTConfig, overrides=["train.micro_batch_tokens=300"]).train
    assert fixed.micro_batch_budget("cpu", per_token) == 300
    assert build_config(SFTConfig, overrides=["train.micro_batch_tokens=null"]).train.micro_batch_budget("cpu", 1) is None
    msg = config_error(overrides=["train.micro_batch_tokens=0"])
    assert msg.startswith("config value 'train.micro_batch_tokens' (from override 'train.micro_batch_tokens=0'): ")
    assert "positive number of tokens" in msg
