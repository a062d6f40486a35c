"""Precedence defaults < model/config.yaml < environment < command line, and clear errors for bad values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness.config import IMAGENET_MEAN
from harness.errors import ConfigError
from harness.options import given_settings, run_parser
from harness.sources import build_config


def _cli(*argv: str) -> dict:
    return given_settings(run_parser().parse_args(list(argv)))


def test_defaults_are_the_template_preprocessing() -> None:
    config = build_config({}, {}, yaml_data={})
    pre = config.preprocess
    assert (pre.border, pre.input_size, pre.resize_to, pre.interpolation) == (2, 224, 224, "bilinear")
    assert (pre.channel_order, pre.value_scale, pre.mean) == ("rgb", 1.0, IMAGENET_MEAN)
    assert config.input_dir == Path("/input") and config.output_file == Path("/output/predictions.csv")
    assert config.softmax and config.topk == 5 and config.label_map == "auto" and config.device == "auto"


def test_precedence_yaml_then_env_then_cli() -> None:
    yaml_data = {"class_name": "FromYaml", "softmax": False, "preprocess": {"input_size": 200}, "for_any_class": True}
    config = build_config({}, {}, yaml_data)
    assert (config.class_name, config.softmax, config.preprocess.input_size) == ("FromYaml", False, 200)
    env = {"BATCH_SIZE": "16", "MODEL_CLASS_NAME": "FromEnv", "WORKERS": ""}  # empty build arg = unset
    config = build_config({}, env, yaml_data)
    assert (config.batch_size, config.class_name, config.workers) == (16, "FromEnv", None)
    config = build_config(_cli("--batch_size", "32", "--input-size", "160", "--softmax"), env, yaml_data)
    assert (config.batch_size, config.class_name, config.preprocess.input_size) == (32, "FromEnv", 160)
    assert config.softmax is True


def test_a_config_yaml_written_for_another_class_is_refused_naming_both_and_the_fix() -> None:
    """The example's config.yaml (EfficientNet-Lite0's preprocessing) kept for another class: refused, not run with
    the wrong preprocessing; the same class, a config.yaml with only its class, or for_any_class run."""
    yaml_data = {"class_name": "EfficientNetLite0", "preprocess": {"value_scale": 255}}
    with pytest.raises(ConfigError) as refused:
        build_config({}, {"MODEL_CLASS_NAME": "ResNet"}, yaml_data)
    said = str(refused.value)
    assert "model/config.yaml was written for class EfficientNetLite0 (its class_name)" in said
    assert "this run's class is ResNet (from the environment variable MODEL_CLASS_NAME)" in said
    assert "set class_name: ResNet in model/config.yaml, or for_any_class: true" in said
    assert "its preprocess may not fit ResNet" in said
    with pytest.raises(ConfigError, match="its preprocess, checkpoint may not fit ResNet"):
        build_config({}, {"MODEL_CLASS_NAME": "ResNet"}, {**yaml_data, "checkpoint": "w.pth"})
    with pytest.raises(ConfigError, match="from the command line"):
        build_config(_cli("imgs", "out.csv", "ResNet"), {}, yaml_data)
    assert build_config({}, {"MODEL_CLASS_NAME": "EfficientNetLite0"}, yaml_data).class_name == "EfficientNetLite0"
    assert build_config({}, {"MODEL_CLASS_NAME": "ResNet"}, {"class_name": "Lite"}).class_name == "ResNet"
    anyone = {**yaml_data, "for_any_class": True}
    assert build_config({}, {"MODEL_CLASS_NAME": "ResNet"}, anyone).preprocess.value_scale == 255


def test_each_setting_says_where_it_came_from() -> None:
    yaml_data = {"class_name": "Net", "preprocess": {"input_size": 200, "mean": [1, 2, 3], "std": [1, 1, 1]}}
    config = build_config(_cli("--input-size", "160"), {"BATCH_SIZE": "4"}, yaml_data)
    assert config.origins == {
        "class_name": "model/config.yaml",
        "input_size": "command line",
        "mean": "model/config.yaml",
        "std": "model/config.yaml",
        "batch_size": "environment variable BATCH_SIZE",
    }


def test_the_example_model_folder_config_is_read() -> None:
    config = build_config({}, {})  # model/ relative to the repository root (the fixture's working directory)
    assert config.class_name == "EfficientNetLite0"
    assert (config.preprocess.resize_to, config.preprocess.value_scale) == (256, 255.0)


def test_positional_and_named_cli_give_the_same_config() -> None:
    positional = _cli("imgs", "out.csv", "Net", "w.pth", "--batch_size", "4", "--softmax", "false")
    named = _cli(
        "--input-dir",
        "imgs",
        "--output-file",
        "out.csv",
        "--class-name",
        "Net",
        "--checkpoint",
        "w.pth",
        "--batch-size",
        "4",
        "--softmax=false",
    )
    assert build_config(positional, {}, {}) == build_config(named, {}, {})


def test_softmax_false_really_turns_it_off_and_convert_mode_maps_to_label_map() -> None:
    assert build_config(_cli("--softmax", "false"), {}, {}).softmax is False
    assert build_config(_cli("--convert_outputs_mode", "0"), {}, {}).label_map == "none"
    assert build_config(_cli("--convert_outputs_mode", "1"), {}, {}).label_map == "auto"
    assert build_config(_cli("--channels-last"), {}, {}).channels_last is True


@pytest.mark.parametrize(
    ("cli", "env", "yaml_data", "message"),
    [
        ({}, {}, {"batchsize": 3}, "unknown setting 'batchsize'. Known settings: .*batch_size"),
        ({}, {}, {"input_size": 3}, "belongs under 'preprocess:'"),
        ({}, {"BATCH_SIZE": "many"}, {}, "environment variable BATCH_SIZE: batch_size='many'"),
        ({"batch_size": "0"}, {}, {}, "command line: batch_size='0' is not valid: must be >= 1"),
        ({}, {}, {"preprocess": {"border": "wide"}}, "number of pixels .* or auto"),
        ({}, {}, {"preprocess": {"value_scale": 100}}, "expected 1 .* or 255"),
        ({}, {}, {"preprocess": {"resize_size": 100}}, "smaller than input_size"),
        ({}, {}, {"preprocess": {"mean": None}}, "both be set or both be none"),
        ({"device": "cpu", "gpus": "2"}, {}, {}, "choose one"),
        ({"amp": "fp16", "device": "cpu"}, {}, {}, "fp16 AMP needs CUDA"),
        ({}, {}, {"input_dir": "/x"}, "'input_dir' is not the model's to set"),
    ],
)
def test_bad_settings_name_their_source(cli: dict, env: dict, yaml_data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(cli, env, yaml_data)


def test_conflicting_positional_and_named_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        _cli("imgs", "--input-dir", "other")


def test_bad_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("batch_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config({"model_dir": str(tmp_path)}, {})
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config({"model_dir": str(tmp_path)}, {})


def test_switches_and_metavars_come_from_the_settings_parsers() -> None:
    from harness.config import SETTINGS, is_switch, setting_metavar
    from harness.options import add_model_options

    parser = run_parser()
    actions = {action.dest: action for action in parser._actions}
    for name in SETTINGS:
        assert actions[name].metavar == setting_metavar(name)
        if is_switch(name):
            assert _cli(f"--{name.replace('_', '-')}")[name] == "true"
    assert {name for name in SETTINGS if is_switch(name)} >= {"softmax", "resume", "head_start", "compile"}
    assert (setting_metavar("border"), setting_metavar("amp"), setting_metavar("gpus")) == (
        "N|auto",
        "off|bf16|fp16",
        "N",
    )
    tool = argparse.ArgumentParser()
    add_model_options(tool)
    assert "--batch-size N" in tool.format_help() and "--device auto|cpu|cuda" in tool.format_help()


def test_the_run_the_tools_and_the_benchmark_read_a_command_line_alike(tmp_path: Path) -> None:
    from harness.options import add_model_options, run_config, tool_sources, with_model_settings

    argv = ["--model-dir", "model", "--batch-size", "7", "--input-size", "200", "--device", "cpu"]
    run = run_config(argv, {})
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    tool = with_model_settings(tool_sources(parser.parse_args(argv), {}))
    assert (run.batch_size, run.preprocess.input_size, run.device) == (7, 200, "cpu")
    assert (tool.batch_size, tool.preprocess, tool.device) == (run.batch_size, run.preprocess, run.device)


@pytest.mark.parametrize("label_map", ["objectnet", "objectnet-legacy"])
def test_an_objectnet_file_has_five_pairs_a_row(label_map: str) -> None:
    """The scorer reads exactly 11 fields: any other --topk with an ObjectNet map is refused before any work."""
    for topk in ("1", "4", "6"):
        with pytest.raises(ConfigError, match="reads exactly 5"):
            build_config({"label_map": label_map, "topk": topk}, {}, {})
    assert build_config({"label_map": label_map}, {}, {}).topk == 5


def test_config_yamls_model_key_is_named_as_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model' '\.\./elsewhere\.onnx' is outside the model folder"):
        build_config({"model_dir": str(tmp_path)}, {}, {"model": "../elsewhere.onnx"})


def test_config_yamls_model_names_a_file_in_its_folder_or_a_timm_name_and_says_so(tmp_path: Path) -> None:
    """config.yaml's `model:` takes a timm name (the weights are then the folder's), or a model file inside the
    folder; an empty one leaves the defaults, and the origin of what it set is config.yaml."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = str(folder / "config.yaml")
    cli = {"model_dir": str(folder)}
    timm = build_config(cli, {}, {"model": "  timm:resnet18 "})
    assert (timm.model, timm.origins["model"], timm.module) == ("timm:resnet18", source, None)
    own = build_config(cli, {}, {"model": " net.onnx"})
    assert (own.module, own.origins["module"], own.model) == ("net.onnx", source, None)
    for empty in (None, "", "  "):
        unset = build_config(cli, {}, {"model": empty})
        assert (unset.model, unset.module) == (None, None) and not {"model", "module"} & set(unset.origins)
    with pytest.raises(ConfigError, match=r"config\.yaml: model 'hf:google/vit' would take the model from elsewhere"):
        build_config(cli, {}, {"model": "hf:google/vit"})
    with pytest.raises(ConfigError, match=r"config\.yaml: 'model' '/abs/net\.onnx' is outside the model folder"):
        build_config(cli, {}, {"model": "/abs/net.onnx"})
