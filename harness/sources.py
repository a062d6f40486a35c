"""One Config from its sources: defaults < the model's own settings < model/config.yaml < environment < command
line. It is built here and nowhere else (the run, every tool, the benchmark and the tests call `build_config` or
harness/options.py), and here the model's own files are trusted no further than describing the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import ENV_FIELDS, PREPROCESS_FIELDS, RUN_FIELDS, Config, Preprocess, check_settings, parse_setting
from harness.errors import ConfigError
from harness.models.kinds import MODEL_PREFIXES, locate_model
from harness.parsers import parse_bool
from harness.results.label_maps import check_label_map, check_objectnet_topk, is_named_map

CONFIG_FILE = "config.yaml"


def read_yaml(model_dir: Path) -> dict[str, Any]:
    """The model folder's config.yaml as a mapping, or {} when there is none."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {error.problem or error.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of setting: value, not {type(data).__name__}")
    return data


_RUN_ONLY = (
    "a model's own files describe the model (its preprocessing, class, weights inside its folder, label map, "
    "softmax), not how or where it runs: set that on the command line or in the environment"
)


def _inside(folder: Path, value: str, source: str, name: str) -> Path:
    """A path a model's own file names: relative, and inside the model folder once links are followed."""
    path = Path(value)
    resolved = (folder / path).resolve()
    if path.is_absolute() or not resolved.is_relative_to(folder.resolve()):
        raise ConfigError(f"{source}: '{name}' {value!r} is outside the model folder {folder}: {_RUN_ONLY}")
    return path


# What a model file that is itself the model (an ONNX file's metadata, a Hugging Face or timm config) may carry:
# how to feed it and read it, not which file or class it is (that would let it swap itself for another).
CARRIED = frozenset({"label_map", "softmax", "output_name"})


def model_setting(name: str, value: Any, source: str, folder: Path, carried: bool = False) -> Any:
    """A setting that one of the model's own files gives (config.yaml, or with `carried` an ONNX file's metadata,
    a Hugging Face or timm config), parsed, and refused unless it describes the model: a submission is untrusted,
    and nothing in it may grant trust (trust_pickle), move the output, change limits or devices, or read files
    outside its folder."""
    fields = PREPROCESS_FIELDS if name in PREPROCESS_FIELDS else RUN_FIELDS
    run_only = name in fields and not fields[name].metadata["model"]
    if run_only or (carried and name in RUN_FIELDS and name not in CARRIED):
        variable = next((v for v, field_name in ENV_FIELDS.items() if field_name == name), None)
        where = f"--{name.replace('_', '-')}" + (f" or {variable}" if variable else "")
        raise ConfigError(f"{source}: '{name}' is not the model's to set ({where}): {_RUN_ONLY}")
    parsed = parse_setting(fields, name, value, source)
    if parsed is not None and name in ("module", "checkpoint"):
        inside = _inside(folder, parsed, source, name)
        return str(inside) if name == "module" else str(folder / inside)
    if name == "label_map" and not is_named_map(parsed):
        return str(folder / _inside(folder, parsed, source, name))
    return parsed


Carried = Callable[["Config"], tuple[Mapping[str, Any], str]]


@dataclass(frozen=True)
class Sources:
    """A Config merged from its sources, and which settings they gave: the model's own settings (its framework's
    preprocessing, an exported file's) fill the others later, once the run is confined (timm's need torch)."""

    config: Config
    given: frozenset[str]

    def with_model_settings(self, carried: Carried | None) -> Config:
        """The config with what `carried` reads from the model itself wherever no source set it."""
        values, source = carried(self.config) if carried is not None else ({}, "")
        return _with_model_settings(self.config, values, source, self.given) if values else self.config


def build_config(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    yaml_data: Mapping[str, Any] | None = None,
    carried: Carried | None = None,
) -> Config:
    """Merge the sources in order of precedence, then the model's own settings (`carried`) where none set them."""
    return merge_sources(cli, environ, yaml_data).with_model_settings(carried)


def merge_sources(
    cli: Mapping[str, Any], environ: Mapping[str, str], yaml_data: Mapping[str, Any] | None = None
) -> Sources:
    """Merge the sources in order of precedence; `cli` holds only the options the user actually gave.

    `cli` may carry preprocessing settings at its top level; they are routed to `Config.preprocess`. When
    `yaml_data` is None the model folder's config.yaml is read (the folder itself may come from the CLI, through
    --model or --model-dir).
    """
    merged = _Merged()
    located, read_folder_config = locate_model(cli.get("model"), cli.get("model_dir"))
    for name, value in located.items():
        merged.run[name] = parse_setting(RUN_FIELDS, name, value, "command line (--model)")
    model_dir = Path(merged.run.get("model_dir", Config.model_dir))
    if yaml_data is None:
        yaml_data = read_yaml(model_dir) if read_folder_config else {}
    yaml_source = str(model_dir / CONFIG_FILE)
    merged.read_yaml(yaml_data, yaml_source, model_dir)
    for variable, name in ENV_FIELDS.items():
        value = environ.get(variable, "")
        if value.strip():
            merged.apply(name, value, f"environment variable {variable}")
    for name, value in cli.items():
        if value is not None and name not in located:
            merged.apply(name, value, "command line")
    _check_written_for(yaml_data, yaml_source, merged)
    config = Config(**merged.run, preprocess=Preprocess(**merged.pre), origins=dict(merged.origins))
    _check(config)
    return Sources(config, frozenset(merged.origins))


FOR_ANY_CLASS = "for_any_class"  # config.yaml's word that its settings fit every class in the folder


@dataclass
class _Merged:
    """The settings the sources gave so far, and which source gave each."""

    run: dict[str, Any] = field(default_factory=dict)
    pre: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def apply(self, name: str, value: Any, source: str) -> None:
        self.origins[name] = source
        if name in PREPROCESS_FIELDS:
            self.pre[name] = parse_setting(PREPROCESS_FIELDS, name, value, source)
        else:
            self.run[name] = parse_setting(RUN_FIELDS, name, value, source)

    def read_yaml(self, data: Mapping[str, Any], source: str, folder: Path) -> None:
        """config.yaml's settings, each checked as the model's own to set (model_setting)."""
        for name, value in data.items():
            if name == FOR_ANY_CLASS:
                parse_bool(value)
            elif name == "preprocess":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: 'preprocess' must be a mapping of setting: value")
                for pre_name, pre_value in value.items():
                    self.pre[pre_name] = model_setting(pre_name, pre_value, f"{source} (preprocess)", folder)
                    self.origins[pre_name] = source
            elif name in PREPROCESS_FIELDS:
                raise ConfigError(f"{source}: '{name}' belongs under 'preprocess:'")
            elif name == "model":
                self._yaml_model(value, source, folder)
            else:
                self.run[name] = model_setting(name, value, source, folder)
                self.origins[name] = source

    def _yaml_model(self, value: Any, source: str, folder: Path) -> None:
        text = "" if value is None else str(value).strip()
        if not text:
            return
        if text.startswith("timm:"):
            self.run["model"] = parse_setting(RUN_FIELDS, "model", text, source)
            self.origins["model"] = source
        elif text.startswith(MODEL_PREFIXES):
            raise ConfigError(f"{source}: model {text!r} would take the model from elsewhere: {_RUN_ONLY}")
        else:  # a model file in this folder, named as the key is
            self.run["module"] = str(_inside(folder, text, source, "model"))
            self.origins["module"] = source


def _check_written_for(data: Mapping[str, Any], source: str, merged: _Merged) -> None:
    """config.yaml names the class it was written for (class_name): its preprocessing and checkpoint are that
    class's, so a run of another class with them is refused, unless the file says they fit any class."""
    written_for = data.get("class_name")
    chosen = merged.run.get("class_name")
    others = [name for name in data if name not in ("class_name", FOR_ANY_CLASS)]
    if not written_for or chosen in (None, written_for) or not others or parse_bool(data.get(FOR_ANY_CLASS, False)):
        return
    raise ConfigError(
        f"{source} was written for class {written_for} (its class_name), and this run's class is {chosen} (from "
        f"the {merged.origins['class_name']}): its {', '.join(others)} may not fit {chosen}. Check them, then set "
        f"class_name: {chosen} in {source}, or {FOR_ANY_CLASS}: true where they fit every class in the folder"
    )


def _with_model_settings(config: Config, values: Mapping[str, Any], source: str, given: frozenset[str]) -> Config:
    """The config with a model's own settings (its preprocessing, label map) wherever no source `given` set
    them: the model's config ranks above the harness's defaults and below model/config.yaml, the environment and
    the command line. Class names (`labels`) are no setting: the model's loader reads them with the model."""
    run: dict[str, Any] = {}
    pre: dict[str, Any] = {}
    origins = dict(config.origins)
    for name, value in values.items():
        if name == "labels":
            continue
        if value is None and name not in ("mean", "std", "resize_size"):
            continue
        parsed = model_setting(name, value, source, config.model_dir, carried=True)  # checked even when overridden
        if name not in given:
            (pre if name in PREPROCESS_FIELDS else run)[name] = parsed
            origins[name] = source
    preprocess = dataclasses.replace(config.preprocess, **pre)
    updated = dataclasses.replace(config, **run, preprocess=preprocess, origins=origins)
    _check(updated)
    return updated


def _check(config: Config) -> None:
    """The settings' own constraints, then the label map's on them."""
    check_settings(config)
    check_label_map(config.label_map)
    check_objectnet_topk(config.label_map, config.topk)
