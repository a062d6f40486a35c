"""The settings a model carries with it, read as its own framework reads them: timm's pretrained config, a Hugging
Face folder's preprocessor_config.json, what `harness export-onnx` stored in an ONNX file: SETTINGS_READERS names
each kind's reader.

Torch-free except for a timm model, whose config only timm knows: the run reads a model's preprocessing before
its head-start decoders fork, and those must fork before torch loads wherever they can.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.config import Config
from harness.errors import ModelError
from harness.models.kinds import HF, ONNX, TIMM, ModelKind, find_saved_file, kind_of
from harness.models.onnx_metadata import read_settings

HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_CROP_PCT_UNTIL = 384  # ConvNeXt's processor crops below this size and squashes from it on


def timm_name(config: Config) -> str:
    return (config.model or "")[len(TIMM.prefix or "") :].strip()


def import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise ModelError("this is a timm model, and timm is not installed: pip install -e '.[timm]'") from None
    return timm


def timm_settings(config: Config) -> tuple[dict[str, Any], str]:
    return timm_preprocess(timm_name(config)), f"timm's pretrained config for {timm_name(config)}"


def hf_settings(config: Config) -> tuple[dict[str, Any], str]:
    path = config.model_dir / HF_PREPROCESSOR
    return hf_preprocess(path), str(path)


def onnx_settings(config: Config) -> tuple[dict[str, Any], str]:
    path = find_saved_file(config, ONNX.suffixes)
    return (read_settings(path) if path is not None and path.is_file() else {}), f"{path} (its metadata)"


SettingsReader = Callable[[Config], tuple[dict[str, Any], str]]
SETTINGS_READERS: dict[ModelKind, SettingsReader] = {TIMM: timm_settings, HF: hf_settings, ONNX: onnx_settings}


def carried_settings(config: Config) -> tuple[dict[str, Any], str]:
    """The settings the configured model carries, and where they came from (harness/sources.py's `carried`): none
    for a kind whose models carry none."""
    reader = SETTINGS_READERS.get(kind_of(config))
    return reader(config) if reader is not None else ({}, "")


def timm_pretrained_cfg(name: str) -> Any:
    """timm's pretrained config for NAME (its preprocessing, its classifier's name), or None where it has none. An
    unknown name or tag is one line naming the close ones."""
    timm = import_timm()
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        similar = ", ".join(similar_timm_names(timm.list_models(), arch))
        raise ModelError(f"timm has no model {arch!r}" + (f"; similar names: {similar}" if similar else ""))
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's complaint about an unknown tag
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        raise ModelError(
            f"timm has no pretrained config {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'} "
            f"(or timm:{arch} alone)"
        ) from None


def similar_timm_names(names: list[str], wanted: str, count: int = 8) -> list[str]:
    """The names closest to `wanted`, spelled alike once case, `_` and `-` are set aside (resnet_18: resnet18)."""
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(_name_key(name), name)
    close = difflib.get_close_matches(_name_key(wanted), list(by_key), n=count, cutoff=0.6)
    return [by_key[key] for key in close]


def _name_key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def timm_preprocess(name: str) -> dict[str, Any]:
    """timm's eval transform for NAME as harness settings, resolved as timm's resolve_data_config does."""
    cfg = timm_pretrained_cfg(name)
    if cfg is None:
        return {}
    _, height, width = cfg.input_size
    if height != width:
        raise ModelError(f"timm model {name} takes {height} x {width} images; the harness feeds square ones")
    mode = getattr(cfg, "crop_mode", "center") or "center"
    if mode not in ("center", "squash"):
        raise ModelError(f"timm model {name} uses crop mode {mode!r}; set resize_size and input_size yourself")
    return {
        "input_size": height,
        "crop_pct": cfg.crop_pct or 1.0,  # the resize follows the crop, as timm's: floor(input_size / crop_pct)
        "resize_size": None,
        "resize_mode": "shorter" if mode == "center" else "squash",
        "interpolation": cfg.interpolation or "bilinear",
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "value_scale": 1,
        "channel_order": "rgb",
    }


def hf_preprocess(path: Path) -> dict[str, Any]:
    """A Hugging Face image processor's resize, crop, rescale and normalisation as harness settings."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path}: {error}") from None
    settings: dict[str, Any] = {"channel_order": "rgb", "crop_offset": "floor"}
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    if cfg.get("do_resize", True) and cfg.get("size"):
        settings.update(_hf_geometry(cfg, path))
    if "resample" in cfg:
        resample = cfg["resample"]
        if isinstance(resample, bool) or resample not in PIL_RESAMPLE:
            raise ModelError(
                f"{path}: resample {json.dumps(resample)} is not one of Pillow's filter numbers {sorted(PIL_RESAMPLE)}"
            )
        settings["interpolation"] = PIL_RESAMPLE[resample]
    factor = _number(cfg.get("rescale_factor", 1 / 255), path, "rescale_factor")
    if cfg.get("do_rescale", True) and not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise ModelError(f"{path}: rescale_factor {factor} is not 1/255; set value_scale, mean and std yourself")
    settings["value_scale"] = 1 if cfg.get("do_rescale", True) else 255
    if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
        settings["mean"], settings["std"] = cfg["image_mean"], cfg["image_std"]
    else:
        settings["mean"] = settings["std"] = None
    return settings


def _number(value: Any, path: Path, what: str, low: float = 0.0, high: float = math.inf) -> float:
    """A number from a model's own JSON, within (low, high]: anything else is that file's mistake, exit 4."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
        shown = f"a number in ({low:g}, {high:g}]" if high < math.inf else f"a number above {low:g}"
        raise ModelError(f"{path}: {what} {json.dumps(value)} is not {shown}")
    return float(value)


def _pixels(value: Any, path: Path, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{path}: {what} {json.dumps(value)} is not a whole number of pixels")
    return value


def _side(value: Any, path: Path, what: str) -> int:
    if isinstance(value, dict) and value.get("height") == value.get("width") and value.get("height") is not None:
        return _pixels(value["height"], path, f"{what} height")
    if isinstance(value, dict):
        raise ModelError(f"{path}: {what} {json.dumps(value)} is not square; set input_size and resize_size yourself")
    return _pixels(value, path, what)


def _hf_geometry(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    size = cfg["size"]
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if isinstance(size, dict) and "shortest_edge" in size:
        edge = _pixels(size["shortest_edge"], path, "shortest_edge")
        if cfg.get("crop_pct") is not None:  # ConvNeXt: crop below 384, squash from there
            crop_pct = _number(cfg["crop_pct"], path, "crop_pct", high=1.0)
            if edge < HF_CROP_PCT_UNTIL:
                return {"resize_mode": "shorter", "resize_size": int(edge / crop_pct), "input_size": edge}
            return {"resize_mode": "squash", "resize_size": edge, "input_size": edge}
        if crop is None:
            raise ModelError(f"{path}: a shortest-edge resize with no centre crop gives non-square images")
        return {"resize_mode": "shorter", "resize_size": edge, "input_size": _side(crop, path, "crop_size")}
    side = _side(size, path, "size")
    cropped = _side(crop, path, "crop_size") if crop is not None else side
    return {"resize_mode": "squash", "resize_size": side, "input_size": cropped}
