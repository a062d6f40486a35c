"""The settings: the one configuration object a run is given, each setting with its parser, help and role.

harness/sources.py builds it once from defaults < the model's own settings < model/config.yaml < environment <
command line, every source through the same per-field parser (harness/parsers.py), so a bad value gets the same
message wherever it came from, and the message names the source. Nothing here knows models, images or outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import parsers
from harness.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
FLOAT32_MAX = 3.4028234663852886e38  # the model's input is float32: a normalised pixel must stay below it
MAX_BATCH = 65536  # a larger batch is a typo: its shared-memory buffers alone would not be allocated
DEFAULT_MAX_FAILURES = 0.01  # a run with more unreadable images than this share is a wrong folder or a broken mount
MAX_SIDE = 8192  # pixels a side of the model's input or resize: 200 MB an image already, beyond any classifier
MAX_PROCESSES = 1024  # decoders or torch threads: beyond any machine's cores (torch crashes on 100,000 threads)
TRANSFORM_FILE = "data_transform_description.py"  # the ObjectNet template's preprocessing hook

# Environment variables (the Docker build args) and the field each one sets.
ENV_FIELDS = {
    "MODEL_CLASS_NAME": "class_name",
    "MODEL_CHECKPOINT": "checkpoint",
    "WORKERS": "workers",
    "BATCH_SIZE": "batch_size",
    "GPUS": "gpus",
    "EXPORT_CACHE": "export_cache",
    # set by torchrun for each process it starts (harness/pipeline/distributed.py)
    "WORLD_SIZE": "world_size",
    "RANK": "rank",
    "LOCAL_RANK": "local_rank",
    "LOCAL_WORLD_SIZE": "local_world_size",
    "MASTER_ADDR": "master_addr",
    "MASTER_PORT": "master_port",
}


def _setting(default: Any, parse: Callable[[Any], Any], help: str, model: bool = False, path: str | None = None) -> Any:
    """A dataclass field that carries its parser and help text, so sources and --help cannot drift apart; whether
    the model's own files (config.yaml, an ONNX file's metadata, a Hugging Face processor) may set it: only what
    describes the model, never what runs it (harness/sources.py: model_setting); and, for a setting that names a
    file or folder, whether the run reads it or writes it (`path`: the confinement grants exactly these,
    harness/pipeline/confine.py)."""
    return field(default=default, metadata={"parse": parse, "help": help, "model": model, "path": path})


def _preprocessing(default: Any, parse: Callable[[Any], Any], help: str) -> Any:
    """A preprocessing setting: the model's own to describe."""
    return _setting(default, parse, help, model=True)


@dataclass(frozen=True)
class Preprocess:
    """What the model expects of its input: the worker half (geometry) and the device half (values)."""

    border: int | str = _preprocessing(
        2, parsers.border, "pixels stripped from each side before any transform, or auto"
    )
    input_size: int = _preprocessing(224, parsers.integer(1, MAX_SIDE), "side of the square crop the model sees")
    resize_size: int | None = _preprocessing(
        None,
        parsers.optional(parsers.integer(1, MAX_SIDE)),
        "shorter side after resizing, before the centre crop (default: from crop_pct)",
    )
    crop_pct: float = _preprocessing(
        1.0,
        parsers.number(0.05, 1.0),
        "when resize_size is not set, the resize is input_size / crop_pct, rounded down (as timm's)",
    )
    resize_mode: str = _preprocessing(
        "shorter",
        parsers.choice("shorter", "squash"),
        "shorter: resize the shorter side, then centre-crop; squash: resize both sides to input_size, no crop",
    )
    interpolation: str = _preprocessing("bilinear", parsers.choice(*INTERPOLATIONS), "resampling filter for the resize")
    crop_offset: str = _preprocessing(
        "round",
        parsers.choice("round", "floor"),
        "the centre crop's offset from an odd margin: round (torchvision, timm) or floor (Hugging Face processors)",
    )
    channel_order: str = _preprocessing("rgb", parsers.choice("rgb", "bgr"), "channel order the model expects")
    value_scale: float = _preprocessing(1.0, parsers.value_scale, "pixel values 0..1 (1) or 0..255 (255)")
    mean: tuple[float, float, float] | None = _preprocessing(
        IMAGENET_MEAN, parsers.triple, "per-channel mean, in the units of value_scale (none: no normalisation)"
    )
    std: tuple[float, float, float] | None = _preprocessing(
        IMAGENET_STD, parsers.triple, "per-channel std, in the units of value_scale (none: no normalisation)"
    )
    # How pixels become RGB: the defaults are Image.open(path).convert("RGB"), what torchvision's ImageFolder, timm's
    # datasets, the ObjectNet template and Hugging Face's scripts train on; the rest show images as a viewer does.
    alpha: str = _preprocessing(
        "drop",
        parsers.alpha,
        "transparency: drop it (as training loaders do), or composite onto a colour (docs/running.md)",
    )
    exif_transpose: bool = _preprocessing(
        False, parsers.switch, "rotate images as their EXIF orientation tag says (training loaders do not)"
    )
    sixteen_bit: str = _preprocessing(
        "clip",
        parsers.choice("clip", "scale"),
        "16-bit and 32-bit grey: clip to 255 (as training loaders do) or scale to 8 bits (docs/running.md: Images)",
    )
    jpeg_draft: bool = _preprocessing(
        False, parsers.switch, "decode JPEGs at least twice the resize size at 1/2..1/8 scale (faster; docs/speed.md)"
    )

    @property
    def resize_to(self) -> int:
        if self.resize_size is not None:
            return self.resize_size
        return max(self.input_size, math.floor(self.input_size / self.crop_pct))  # timm's create_transform


@dataclass(frozen=True)
class Config:
    """Everything one run needs; built by harness/sources.py and passed down, never re-read from the environment."""

    input_dir: Path = _setting(Path("/input"), parsers.path, "folder of images, searched recursively", path="read")
    output_file: Path = _setting(
        Path("/output/predictions.csv"), parsers.path, "predictions CSV to write", path="write"
    )
    model: str | None = _setting(
        None,
        parsers.optional(parsers.text),
        "the model: a folder, a .zip, a .onnx or TorchScript file, timm:NAME, or hf:FOLDER (docs/models.md)",
        path="read",
    )
    model_dir: Path = _setting(
        Path("model"), parsers.path, "folder holding the model's code, weights and config.yaml", path="read"
    )
    module: str | None = _setting(
        None,
        parsers.optional(parsers.text),
        "Python file in the model folder (default: model.py, else model_description.py), or a saved "
        ".onnx/.pt/.ts model",
        model=True,
        path="read",
    )
    class_name: str | None = _setting(
        None, parsers.optional(parsers.text), "model class in that file (default: Model)", model=True
    )
    checkpoint: str | None = _setting(
        None,
        parsers.optional(parsers.text),
        "weights: a state_dict, training checkpoint or .safetensors file, in the model folder or a path",
        model=True,
        path="read",
    )
    num_classes: int | None = _setting(
        None,
        parsers.optional(parsers.integer(1)),
        "classes of a timm model's head (default: from the checkpoint, else the model's)",
        model=True,
    )
    ema: bool | None = _setting(
        None,
        parsers.optional_bool,
        "a training checkpoint's EMA weights (state_dict_ema, model_ema): true = required, false = its own weights; "
        "unset = timm's rule, the EMA weights where the checkpoint holds them",
        model=True,
    )
    output_name: str | None = _setting(
        None,
        parsers.optional(parsers.text),
        "which output of an ONNX model with several is its N x C scores (default: its only output)",
        model=True,
    )
    device: str = _setting("auto", parsers.choice("auto", "cpu", "cuda"), "auto uses CUDA when present, else the CPU")
    gpus: int | None = _setting(
        None, parsers.optional(parsers.integer(0)), "GPUs to use with DataParallel (default: all)"
    )
    workers: int | None = _setting(
        None, parsers.optional(parsers.integer(0, MAX_PROCESSES)), "decoding processes (default: usable CPU cores)"
    )
    batch_size: int = _setting(64, parsers.integer(1, MAX_BATCH), "images per batch per GPU")
    softmax: bool = _setting(True, parsers.switch, "turn the model's outputs into probabilities", model=True)
    label_map: str = _setting(
        "auto",
        parsers.label_map_name,
        "auto, none, objectnet, objectnet-legacy, imagenet-names (a 1000-class ImageNet head's class names, for any "
        "photos), or a labels file (one class name a line)",
        model=True,
        path="read",
    )
    topk: int = _setting(5, parsers.integer(1), "predictions per image")
    amp: str | None = _setting(None, parsers.amp, "mixed precision: off, bf16 or fp16")
    channels_last: bool | str = _setting(
        "auto",
        parsers.bool_or_auto,
        "run the model in channels-last memory format; auto: time both layouts on a few batches at start-up and "
        "keep the faster where the outputs agree (docs/speed.md)",
    )
    fold_batchnorm: bool = _setting(
        True,
        parsers.switch,
        "fold each BatchNorm into the convolution that feeds it, each fold checked at start-up against the model "
        "as written (docs/speed.md)",
    )
    engine: str = _setting(
        "auto",
        parsers.choice("auto", "torch", "onnxruntime"),
        "what runs a PyTorch model on the CPU: torch, or onnxruntime on an export of it checked against torch; auto: "
        "onnxruntime where torch.export captures the whole model, the scores agree and it is faster (docs/speed.md)",
    )
    export_cache: str = _setting(
        "auto",
        parsers.folder_auto_none,
        "folder the ONNX exports of --engine are kept in between runs, one for each model and its settings, 4 GB "
        "at most (a model re-exported only when it changed); auto: the user's cache folder ($XDG_CACHE_HOME or "
        "~/.cache, objectnet-harness/exports); none: keep none (docs/speed.md)",
    )
    max_failures: float | None = _setting(
        DEFAULT_MAX_FAILURES,
        parsers.max_failures,
        "images that may fail (unreadable) before the run fails, exit 7: a count, or a fraction of the images "
        "(default 0.01: one in a hundred); none: any number but all",
    )
    max_pixels: int = _setting(
        178_956_970,
        parsers.integer(1),
        "images with more pixels are refused unread (decompression bombs); Pillow's own cap",
    )
    decode_timeout: float | None = _setting(
        60.0, parsers.timeout, "seconds one image may take to decode before it is skipped (none: no limit)"
    )
    skip_unreadable_folders: bool = _setting(
        False,
        parsers.switch,
        "go on without input folders that cannot be listed: each is a line in errors.csv and counts as a failure "
        "(default: refuse to start, naming them)",
    )
    resume: bool = _setting(False, parsers.switch, "continue from the .partial file an interrupted run left")
    progress: bool = _setting(True, parsers.switch, "show a progress bar on stderr")
    confine: str = _setting(
        "auto",
        parsers.choice("auto", "on", "off"),
        "confine the run (the model's code too) to reading its images, its model's files and Python, writing only "
        "its output files, with no network: auto where the kernel offers Landlock, on or refuse to run, off "
        "(docs/robustness.md: Confinement)",
    )
    trust_pickle: bool = _setting(
        False, parsers.switch, "load a whole pickled model file (this runs code from the file: only for trusted models)"
    )
    save_probs: Path | None = _setting(
        None,
        parsers.optional(parsers.path),
        "also save every image's full probability vector to this .npz (harness ensemble)",
        path="write",
    )
    threads: int | None = _setting(
        None,
        parsers.optional(parsers.integer(1, MAX_PROCESSES)),
        "torch threads in the main process (default: one per usable core, as torch counts them)",
    )
    keep_freed_memory: bool = _setting(
        True, parsers.switch, "keep freed memory in the heap (glibc mallopt): no page faults per batch"
    )
    compile: bool = _setting(
        False,
        parsers.switch,
        "torch.compile the model (needs a C++ compiler on the CPU): a one-off compile, then faster batches; the last "
        "batch is padded so it never recompiles (docs/speed.md)",
    )
    head_start: bool = _setting(
        True,
        parsers.switch,
        "decode the first batches in forked processes while torch and the model load (docs/speed.md)",
    )
    decoder_priority: str = _setting(
        "idle",
        parsers.choice("idle", "normal"),
        "idle: the decoding processes run at the lowest CPU priority, on the cycles the model leaves; normal: as "
        "the main process (docs/speed.md)",
    )
    omp_spin_count: int | None = _setting(
        30000,
        parsers.optional(parsers.integer(0)),
        "rounds torch's OpenMP threads spin in a wait before they sleep, leaving the core to the idle decoders; none: "
        "libgomp's default (300000). GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment win (docs/speed.md)",
    )
    dist_timeout: float = _setting(
        300.0,
        parsers.number(1.0, parsers.MAX_TIMEOUT_S),
        "seconds torchrun's processes wait for each other to start; a missing one is then exit 2, not a hang",
    )
    master_addr: str | None = _setting(None, parsers.optional(parsers.text), "where the ranks meet (set by torchrun)")
    master_port: int | None = _setting(
        None, parsers.optional(parsers.integer(1, 65535)), "the port they meet on (set by torchrun)"
    )
    world_size: int = _setting(1, parsers.integer(1), "processes sharing the images (set by torchrun)")
    rank: int = _setting(0, parsers.integer(0), "this process's place among them (set by torchrun)")
    local_rank: int = _setting(0, parsers.integer(0), "its place on this machine: the GPU it uses (set by torchrun)")
    local_world_size: int = _setting(
        1, parsers.integer(1), "processes on this machine, sharing its cores (set by torchrun)"
    )
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
    return SETTINGS[name].metadata["parse"] in (parsers.switch, parsers.optional_bool, parsers.bool_or_auto)


def setting_metavar(name: str) -> str:
    return parsers.metavar(SETTINGS[name].metadata["parse"])


def parse_setting(fields: Mapping[str, dataclasses.Field], name: str, value: Any, source: str) -> Any:
    if name not in fields:
        raise ConfigError(f"{source}: unknown setting '{name}'. Known settings: {', '.join(sorted(fields))}")
    try:
        return fields[name].metadata["parse"](value)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {name}={value!r} is not valid: {error}") from None


def check_settings(config: Config) -> None:
    """Constraints that span several settings (the label map's own are harness/results/label_maps.py's)."""
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
    if config.amp == "fp16" and config.device == "cpu":
        raise ConfigError("fp16 AMP needs CUDA; on the CPU use --amp bf16 or leave AMP off")
