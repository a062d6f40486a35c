"""The one configuration object, built once from defaults < model/config.yaml < environment < command line.

Every source goes through the same per-field parser, so a bad value gets the same message wherever it came from,
and the message names the source. Nothing else in the package reads the environment.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError
from harness.models.kinds import MODEL_PREFIXES, locate_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
LABEL_MAPS = ("auto", "none", "objectnet", "objectnet-legacy", "imagenet-names")
OBJECTNET_MAPS = ("objectnet", "objectnet-legacy")  # the maps whose files the ObjectNet scorer reads
OBJECTNET_TOPK = 5  # it reads exactly five (id, confidence) pairs a row (harness/results/contract.py)
CONFIG_FILE = "config.yaml"
FLOAT32_MAX = 3.4028234663852886e38  # the model's input is float32: a normalised pixel must stay below it
MAX_BATCH = 65536  # a larger batch is a typo: its shared-memory buffers alone would not be allocated
DEFAULT_MAX_FAILURES = 0.01  # a run with more unreadable images than this share is a wrong folder or a broken mount
MAX_SIDE = 8192  # pixels a side of the model's input or resize: 200 MB an image already, beyond any classifier
MAX_PROCESSES = 1024  # decoders or torch threads: beyond any machine's cores (torch crashes on 100,000 threads)
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # the longest timeout the interval timer takes everywhere; none means no limit
TRANSFORM_FILE = "data_transform_description.py"  # the ObjectNet template's preprocessing hook

# Environment variables (the Docker build args) and the field each one sets.
ENV_FIELDS = {
    "MODEL_CLASS_NAME": "class_name",
    "MODEL_CHECKPOINT": "checkpoint",
    "WORKERS": "workers",
    "BATCH_SIZE": "batch_size",
    "GPUS": "gpus",
    # set by torchrun for each process it starts (harness/pipeline/distributed.py)
    "WORLD_SIZE": "world_size",
    "RANK": "rank",
    "LOCAL_RANK": "local_rank",
    "LOCAL_WORLD_SIZE": "local_world_size",
    "MASTER_ADDR": "master_addr",
    "MASTER_PORT": "master_port",
}


# ---- value parsers: each takes a YAML value or a string and returns the typed value or raises ValueError ----

Parse = Callable[[Any], Any]


@dataclass(frozen=True)
class Parser:
    """A setting's parser with the metavar its command-line option shows, so --help follows the parsers."""

    metavar: str
    parse: Parse

    def __call__(self, value: Any) -> Any:
        return self.parse(value)


def metavar(parse: Parse) -> str:
    return parse.metavar if isinstance(parse, Parser) else "VALUE"


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        number = int(value) if isinstance(value, int) else int(str(value).strip())
        if number < minimum:
            raise ValueError(f"must be >= {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"must be <= {maximum:,}")
        return number

    return Parser("N", parse)


def _finite(value: Any) -> float:
    """A number that is a number: NaN and the infinities would pass every range check and poison every result."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _float(low: float, high: float | None = None) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        number = _finite(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be in [{low}, {high}]" if high is not None else f"must be >= {low}")
        return number

    return Parser("X", parse)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_bool = Parser("true|false", _parse_bool)


def _parse_bool_or_auto(value: Any) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _parse_bool(value)


_bool_or_auto = Parser("true|false|auto", _parse_bool_or_auto)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text.lower() in choices:
            return text.lower()
        raise ValueError(f"expected one of {', '.join(choices)}")

    return Parser("|".join(choices), parse)


def _parse_text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


_text = Parser("TEXT", _parse_text)
_label_map = Parser("MAP", _parse_text)
_path = Parser("PATH", lambda value: Path(_parse_text(value)))


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return parse(value)

    return Parser(metavar(parse), parse_optional)


_optional_bool = _optional(_bool)  # a switch that can also be left unset (none)


def _parse_triple(value: Any) -> tuple[float, float, float] | None:
    """Per-channel mean or std: three numbers, one number for all channels, or none to skip normalisation."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    numbers = [_finite(item) for item in items]
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3:
        raise ValueError("expected one or three numbers")
    return (numbers[0], numbers[1], numbers[2])


_triple = Parser("V[,V,V]", _parse_triple)


def _parse_border(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _int(0)(value)
    except ValueError:
        raise ValueError("expected a number of pixels (>= 0) or auto") from None


_border = Parser("N|auto", _parse_border)


def _parse_alpha(value: Any) -> str:
    """drop, or the colour transparent pixels are composited onto: white, black or #RRGGBB."""
    text = str(value).strip().lower()
    if text in ("drop", "white", "black") or re.fullmatch(r"#[0-9a-f]{6}", text):
        return text
    raise ValueError("expected drop, white, black or #RRGGBB")


_alpha = Parser("drop|white|black|#RRGGBB", _parse_alpha)


def _parse_value_scale(value: Any) -> float:
    number = _finite(value)
    if number not in (1.0, 255.0):
        raise ValueError("expected 1 (values 0..1) or 255 (values 0..255)")
    return number


_value_scale = Parser("1|255", _parse_value_scale)


def _parse_amp(value: Any) -> str | None:
    parsed = _choice("off", "none", "bf16", "fp16", "bfloat16", "float16")(value if value is not None else "off")
    return {"off": None, "none": None, "bfloat16": "bf16", "float16": "fp16"}.get(parsed, parsed)


_amp = Parser("off|bf16|fp16", _parse_amp)


def _parse_max_failures(value: Any) -> float | None:
    """A count (>= 1, or 0 for none allowed) or a fraction of the images (0 < f < 1)."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    number = _finite(value)
    if number < 0 or (number >= 1 and number != int(number)):
        raise ValueError("expected a count (0, 1, 2, ...) or a fraction between 0 and 1")
    return number


_max_failures = Parser("N|FRACTION", _parse_max_failures)


def _parse_timeout(value: Any) -> float | None:
    """Seconds > 0, or none to wait as long as it takes."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "off"):
        return None
    number = _finite(value)
    if not 0 < number <= MAX_TIMEOUT_S:
        raise ValueError(f"expected seconds > 0 and at most {MAX_TIMEOUT_S:g}, or none to switch the timeout off")
    return number


_timeout = Parser("SECONDS|none", _parse_timeout)


def _setting(default: Any, parse: Callable[[Any], Any], help: str, model: bool = False, path: str | None = None) -> Any:
    """A dataclass field that carries its parser and help text, so sources and --help cannot drift apart; whether
    the model's own files (config.yaml, an ONNX file's metadata, a Hugging Face processor) may set it: only what
    describes the model, never what runs it (harness/config.py: model_setting); and, for a setting that names a
    file or folder, whether the run reads it or writes it (`path`: the confinement grants exactly these,
    harness/pipeline/confine.py)."""
    return field(default=default, metadata={"parse": parse, "help": help, "model": model, "path": path})


def _preprocessing(default: Any, parse: Callable[[Any], Any], help: str) -> Any:
    """A preprocessing setting: the model's own to describe."""
    return _setting(default, parse, help, model=True)


@dataclass(frozen=True)
class Preprocess:
    """What the model expects of its input: the worker half (geometry) and the device half (values)."""

    border: int | str = _preprocessing(2, _border, "pixels stripped from each side before any transform, or auto")
    input_size: int = _preprocessing(224, _int(1, MAX_SIDE), "side of the square crop the model sees")
    resize_size: int | None = _preprocessing(
        None,
        _optional(_int(1, MAX_SIDE)),
        "shorter side after resizing, before the centre crop (default: from crop_pct)",
    )
    crop_pct: float = _preprocessing(
        1.0,
        _float(0.05, 1.0),
        "when resize_size is not set, the resize is input_size / crop_pct, rounded down (as timm's)",
    )
    resize_mode: str = _preprocessing(
        "shorter",
        _choice("shorter", "squash"),
        "shorter: resize the shorter side, then centre-crop; squash: resize both sides to input_size, no crop",
    )
    interpolation: str = _preprocessing("bilinear", _choice(*INTERPOLATIONS), "resampling filter for the resize")
    crop_offset: str = _preprocessing(
        "round",
        _choice("round", "floor"),
        "the centre crop's offset from an odd margin: round (torchvision, timm) or floor (Hugging Face processors)",
    )
    channel_order: str = _preprocessing("rgb", _choice("rgb", "bgr"), "channel order the model expects")
    value_scale: float = _preprocessing(1.0, _value_scale, "pixel values 0..1 (1) or 0..255 (255)")
    mean: tuple[float, float, float] | None = _preprocessing(
        IMAGENET_MEAN, _triple, "per-channel mean, in the units of value_scale (none: no normalisation)"
    )
    std: tuple[float, float, float] | None = _preprocessing(
        IMAGENET_STD, _triple, "per-channel std, in the units of value_scale (none: no normalisation)"
    )
    # How pixels become RGB: the defaults are Image.open(path).convert("RGB"), what torchvision's ImageFolder, timm's
    # datasets, the ObjectNet template and Hugging Face's scripts train on; the rest show images as a viewer does.
    alpha: str = _preprocessing(
        "drop", _alpha, "transparency: drop it (as training loaders do), or composite onto a colour (docs/running.md)"
    )
    exif_transpose: bool = _preprocessing(
        False, _bool, "rotate images as their EXIF orientation tag says (training loaders do not)"
    )
    sixteen_bit: str = _preprocessing(
        "clip",
        _choice("clip", "scale"),
        "16-bit and 32-bit grey: clip to 255 (as training loaders do) or scale to 8 bits (docs/running.md: Images)",
    )
    jpeg_draft: bool = _preprocessing(
        False, _bool, "decode JPEGs at least twice the resize size at 1/2..1/8 scale (faster; docs/speed.md)"
    )

    @property
    def resize_to(self) -> int:
        if self.resize_size is not None:
            return self.resize_size
        return max(self.input_size, math.floor(self.input_size / self.crop_pct))  # timm's create_transform


@dataclass(frozen=True)
class Config:
    """Everything one run needs; built by `build_config` and passed down, never re-read from the environment."""

    input_dir: Path = _setting(Path("/input"), _path, "folder of images, searched recursively", path="read")
    output_file: Path = _setting(Path("/output/predictions.csv"), _path, "predictions CSV to write", path="write")
    model: str | None = _setting(
        None,
        _optional(_text),
        "the model: a folder, a .zip, a .onnx or TorchScript file, timm:NAME, or hf:FOLDER (docs/models.md)",
        path="read",
    )
    model_dir: Path = _setting(
        Path("model"), _path, "folder holding the model's code, weights and config.yaml", path="read"
    )
    module: str | None = _setting(
        None,
        _optional(_text),
        "Python file in the model folder (default: model.py, else model_description.py), or a saved "
        ".onnx/.pt/.ts model",
        model=True,
        path="read",
    )
    class_name: str | None = _setting(None, _optional(_text), "model class in that file (default: Model)", model=True)
    checkpoint: str | None = _setting(
        None,
        _optional(_text),
        "weights: a state_dict, training checkpoint or .safetensors file, in the model folder or a path",
        model=True,
        path="read",
    )
    num_classes: int | None = _setting(
        None,
        _optional(_int(1)),
        "classes of a timm model's head (default: from the checkpoint, else the model's)",
        model=True,
    )
    ema: bool | None = _setting(
        None,
        _optional_bool,
        "a training checkpoint's EMA weights (state_dict_ema, model_ema): true = required, false = its own weights; "
        "unset = timm's rule, the EMA weights where the checkpoint holds them",
        model=True,
    )
    output_name: str | None = _setting(
        None,
        _optional(_text),
        "which output of an ONNX model with several is its N x C scores (default: its only output)",
        model=True,
    )
    device: str = _setting("auto", _choice("auto", "cpu", "cuda"), "auto uses CUDA when present, else the CPU")
    gpus: int | None = _setting(None, _optional(_int(0)), "GPUs to use with DataParallel (default: all)")
    workers: int | None = _setting(
        None, _optional(_int(0, MAX_PROCESSES)), "decoding processes (default: usable CPU cores)"
    )
    batch_size: int = _setting(64, _int(1, MAX_BATCH), "images per batch per GPU")
    softmax: bool = _setting(True, _bool, "turn the model's outputs into probabilities", model=True)
    label_map: str = _setting(
        "auto",
        _label_map,
        "auto, none, objectnet, objectnet-legacy, imagenet-names (a 1000-class ImageNet head's class names, for any "
        "photos), or a labels file (one class name a line)",
        model=True,
        path="read",
    )
    topk: int = _setting(5, _int(1), "predictions per image")
    amp: str | None = _setting(None, _amp, "mixed precision: off, bf16 or fp16")
    channels_last: bool | str = _setting(
        "auto",
        _bool_or_auto,
        "run the model in channels-last memory format; auto: time both layouts on a few batches at start-up and "
        "keep the faster where the outputs agree (docs/speed.md)",
    )
    fold_batchnorm: bool = _setting(
        True,
        _bool,
        "fold each BatchNorm into the convolution that feeds it, each fold checked at start-up against the model "
        "as written (docs/speed.md)",
    )
    max_failures: float | None = _setting(
        DEFAULT_MAX_FAILURES,
        _max_failures,
        "images that may fail (unreadable) before the run fails, exit 7: a count, or a fraction of the images "
        "(default 0.01: one in a hundred); none: any number but all",
    )
    max_pixels: int = _setting(
        178_956_970, _int(1), "images with more pixels are refused unread (decompression bombs); Pillow's own cap"
    )
    decode_timeout: float | None = _setting(
        60.0, _timeout, "seconds one image may take to decode before it is skipped (none: no limit)"
    )
    skip_unreadable_folders: bool = _setting(
        False,
        _bool,
        "go on without input folders that cannot be listed: each is a line in errors.csv and counts as a failure "
        "(default: refuse to start, naming them)",
    )
    resume: bool = _setting(False, _bool, "continue from the .partial file an interrupted run left")
    progress: bool = _setting(True, _bool, "show a progress bar on stderr")
    confine: str = _setting(
        "auto",
        _choice("auto", "on", "off"),
        "confine the run (the model's code too) to reading its images, its model's files and Python, writing only "
        "its output files, with no network: auto where the kernel offers Landlock, on or refuse to run, off "
        "(docs/robustness.md: Confinement)",
    )
    trust_pickle: bool = _setting(
        False, _bool, "load a whole pickled model file (this runs code from the file: only for trusted models)"
    )
    save_probs: Path | None = _setting(
        None,
        _optional(_path),
        "also save every image's full probability vector to this .npz (harness ensemble)",
        path="write",
    )
    threads: int | None = _setting(
        None,
        _optional(_int(1, MAX_PROCESSES)),
        "torch threads in the main process (default: one per usable core, as torch counts them)",
    )
    keep_freed_memory: bool = _setting(
        True, _bool, "keep freed memory in the heap (glibc mallopt): no page faults per batch"
    )
    compile: bool = _setting(
        False,
        _bool,
        "torch.compile the model (needs a C++ compiler on the CPU): a one-off compile, then faster batches; the last "
        "batch is padded so it never recompiles (docs/speed.md)",
    )
    head_start: bool = _setting(
        True, _bool, "decode the first batches in forked processes while torch and the model load (docs/speed.md)"
    )
    decoder_priority: str = _setting(
        "idle",
        _choice("idle", "normal"),
        "idle: the decoding processes run at the lowest CPU priority, on the cycles the model leaves; normal: as "
        "the main process (docs/speed.md)",
    )
    omp_spin_count: int | None = _setting(
        30000,
        _optional(_int(0)),
        "rounds torch's OpenMP threads spin in a wait before they sleep, leaving the core to the idle decoders; none: "
        "libgomp's default (300000). GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment win (docs/speed.md)",
    )
    dist_timeout: float = _setting(
        300.0,
        _float(1.0, MAX_TIMEOUT_S),
        "seconds torchrun's processes wait for each other to start; a missing one is then exit 2, not a hang",
    )
    master_addr: str | None = _setting(None, _optional(_text), "where the ranks meet (set by torchrun)")
    master_port: int | None = _setting(None, _optional(_int(1, 65535)), "the port they meet on (set by torchrun)")
    world_size: int = _setting(1, _int(1), "processes sharing the images (set by torchrun)")
    rank: int = _setting(0, _int(0), "this process's place among them (set by torchrun)")
    local_rank: int = _setting(0, _int(0), "its place on this machine: the GPU it uses (set by torchrun)")
    local_world_size: int = _setting(1, _int(1), "processes on this machine, sharing its cores (set by torchrun)")
    preprocess: Preprocess = field(default_factory=Preprocess)
    # where each setting came from (config.yaml, the environment, the command line, the model itself); a default
    # is absent. Not a setting: built with them, shown in the start-up line and run.json
    origins: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def run_json(self) -> Path:
        return self.output_file.with_name("run.json")

    @property
    def idle_decoders(self) -> bool:
        """Whether every decoding process (the head start's, the DataLoader's) drops to the lowest CPU priority."""
        return self.decoder_priority == "idle"

    @property
    def errors_csv(self) -> Path:
        return self.output_file.with_name("errors.csv")

    @property
    def transform_file(self) -> Path:
        """The model folder's own preprocessing (the template's hook); the harness's geometry when absent."""
        return self.model_dir / TRANSFORM_FILE

    def to_dict(self) -> dict[str, Any]:
        """Plain values for run.json."""
        data = dataclasses.asdict(self)
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in data.items()}


RUN_FIELDS = {f.name: f for f in dataclasses.fields(Config) if "parse" in f.metadata}
PREPROCESS_FIELDS = {f.name: f for f in dataclasses.fields(Preprocess)}
SETTINGS = {**RUN_FIELDS, **PREPROCESS_FIELDS}


def path_settings(config: Config, role: str) -> list[str]:
    """The values of the settings that name a file or folder the run reads (`role` "read") or writes ("write")."""
    return [
        str(value)
        for name, spec in RUN_FIELDS.items()
        if spec.metadata["path"] == role and (value := getattr(config, name)) is not None
    ]


def is_switch(name: str) -> bool:
    """A true/false setting: on the command line, `--name` alone means true."""
    return SETTINGS[name].metadata["parse"] in (_bool, _optional_bool, _bool_or_auto)


def setting_metavar(name: str) -> str:
    return metavar(SETTINGS[name].metadata["parse"])


def _parse(fields: Mapping[str, dataclasses.Field], name: str, value: Any, source: str) -> Any:
    if name not in fields:
        raise ConfigError(f"{source}: unknown setting '{name}'. Known settings: {', '.join(sorted(fields))}")
    try:
        return fields[name].metadata["parse"](value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {name}={value!r} is not valid: {error}") from None


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
    parsed = _parse(fields, name, value, source)
    if parsed is not None and name in ("module", "checkpoint"):
        inside = _inside(folder, parsed, source, name)
        return str(inside) if name == "module" else str(folder / inside)
    if name == "label_map" and parsed not in LABEL_MAPS:
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
        merged.run[name] = _parse(RUN_FIELDS, name, value, "command line (--model)")
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
            self.pre[name] = _parse(PREPROCESS_FIELDS, name, value, source)
        else:
            self.run[name] = _parse(RUN_FIELDS, name, value, source)

    def read_yaml(self, data: Mapping[str, Any], source: str, folder: Path) -> None:
        """config.yaml's settings, each checked as the model's own to set (model_setting)."""
        for name, value in data.items():
            if name == FOR_ANY_CLASS:
                _parse_bool(value)
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
            self.run["model"] = _parse(RUN_FIELDS, "model", text, source)
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
    if not written_for or chosen in (None, written_for) or not others or _parse_bool(data.get(FOR_ANY_CLASS, False)):
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


def check_label_map(label_map: str) -> None:
    """A label map is one of LABEL_MAPS or a labels file: a typo is refused before the model loads."""
    if label_map not in LABEL_MAPS and not Path(label_map).is_file():
        raise ConfigError(f"--label-map {label_map}: not one of {', '.join(LABEL_MAPS)}, nor a labels file")


def check_objectnet_topk(label_map: str, topk: int) -> None:
    """An ObjectNet file the scorer can read: exactly five pairs a row."""
    if label_map in OBJECTNET_MAPS and topk != OBJECTNET_TOPK:
        raise ConfigError(
            f"--topk {topk} with the {label_map} label map: the ObjectNet scorer reads exactly {OBJECTNET_TOPK} "
            "(id, confidence) pairs a row. Use --topk 5, or --label-map none for the model's own ids"
        )


def _check(config: Config) -> None:
    """Constraints that span several settings."""
    pre = config.preprocess
    if pre.resize_to < pre.input_size:
        raise ConfigError(
            f"resize_size {pre.resize_to} is smaller than input_size {pre.input_size}: the centre crop would "
            "need padding. Set resize_size >= input_size."
        )
    if (pre.mean is None) != (pre.std is None):
        raise ConfigError("mean and std must both be set or both be none")
    if pre.std is not None and pre.mean is not None:
        for mean, std in zip(pre.mean, pre.std, strict=True):
            if std == 0 or max(abs(value - mean) / abs(std) for value in (0.0, pre.value_scale)) > FLOAT32_MAX:
                raise ConfigError(
                    f"std {std:g} with mean {mean:g}: pixels would normalise to infinity (every image would fail); "
                    "give the std the model was trained with, in the same units as the pixels (value_scale)"
                )
    if config.device == "cpu" and config.gpus:
        raise ConfigError(f"--device cpu with --gpus {config.gpus}: choose one (use --gpus 0 or --device cuda)")
    if config.resume and config.save_probs:
        raise ConfigError("--save-probs cannot be resumed: the probabilities of the rows done before were not kept")
    if config.rank >= config.world_size:
        raise ConfigError(f"rank {config.rank} is not below world_size {config.world_size}")
    if config.world_size > 1 and (config.master_addr is None or config.master_port is None):
        raise ConfigError(
            f"WORLD_SIZE={config.world_size} without MASTER_ADDR and MASTER_PORT: the ranks would have nowhere to "
            "meet. Start the processes with torchrun (docs/running.md), or unset WORLD_SIZE for one process"
        )
    check_label_map(config.label_map)
    check_objectnet_topk(config.label_map, config.topk)
    if config.amp == "fp16" and config.device == "cpu":
        raise ConfigError("fp16 AMP needs CUDA; on the CPU use --amp bf16 or leave AMP off")
