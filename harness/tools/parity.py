"""`harness check --parity`: the model's own framework run beside the harness, image by image.

For a timm model, timm's own pipeline: `create_model(NAME, pretrained=False, num_classes=...)`, the checkpoint
through timm's `load_checkpoint` (EMA weights as `create_model(checkpoint_path=...)` takes them, or its own with
`--ema false`), `create_transform(**resolve_data_config({}, model=model))`, softmax. For a Hugging Face folder,
transformers' `AutoImageProcessor` and `AutoModelForImageClassification`, softmax of the logits. Either opens each
image with `Image.open(p).convert("RGB")`; the run's frame (`border`, ObjectNet's) is stripped from it first, as
the harness strips it for every kind of model, so parity judges the model's pipeline, not the dataset's frame.

The trust boundary holds: the reference reads only files the harness has already loaded, the same way (a timm
checkpoint that `torch.load(weights_only=True)` read, so it holds tensors and argparse.Namespace alone; a Hugging
Face folder with local files only and no remote code), and it runs after the harness has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from harness.config import Config
from harness.errors import describe_user_error
from harness.models.checkpoint import resolve_checkpoint
from harness.models.kinds import KINDS
from harness.models.preprocessing import import_timm, timm_name
from harness.pipeline.decode import strip_border
from harness.pipeline.files import ImageFile

TOLERANCE = 1e-4  # on probabilities
TOP = 5
FRAMEWORKS = {kind.name: kind.framework for kind in KINDS if kind.framework}
Reference = Callable[[Image.Image], torch.Tensor]  # an RGB image -> the framework's probabilities


@dataclass(frozen=True)
class Parity:
    """The comparison: whether it holds, its one-line summary, the pipeline compared with, and the table."""

    agrees: bool
    detail: str
    caption: str
    rows: list[list[str]]


def _timm_reference(config: Config, classes: int) -> tuple[Reference, str]:
    timm = import_timm()
    checkpoint = resolve_checkpoint(config)
    model = timm.create_model(timm_name(config), pretrained=False, num_classes=classes)
    if checkpoint is not None:
        timm.models.load_checkpoint(model, str(checkpoint), use_ema=config.ema is not False)
    data = timm.data.resolve_data_config({}, model=model.eval())
    transform = timm.data.create_transform(**data)
    shown = ", ".join(f"{key} {value}" for key, value in data.items())
    return lambda image: model(transform(image).unsqueeze(0)).softmax(1)[0], f"resolve_data_config: {shown}"


def _hf_reference(folder: Path) -> tuple[Reference, str]:
    import transformers

    local = {"local_files_only": True, "trust_remote_code": False}  # as the harness loads it: no code of the folder's
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), **local)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), **local).eval()
    return (
        lambda image: model(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0],
        f"{type(processor).__name__} from {folder}",
    )


def _open_rgb(path: Path, border: int | str) -> Image.Image:
    with Image.open(path) as image:
        return strip_border(image.convert("RGB"), border)


def top_agreement(mine: torch.Tensor, theirs: torch.Tensor) -> tuple[str, str]:
    """("yes", "") when the top-5 ids are the reference's in order; ("yes (tie)", "") when they differ only where
    the reference's probabilities of the swapped ids are within the tolerance; else ("no", both lists)."""
    k = min(TOP, theirs.numel())
    ours, ref = mine.topk(k).indices.tolist(), theirs.topk(k).indices.tolist()
    if ours == ref:
        return "yes", ""
    if all(abs(float(theirs[a]) - float(theirs[b])) <= TOLERANCE for a, b in zip(ours, ref, strict=True)):
        return "yes (tie)", ""
    listed = f"harness {' '.join(map(str, ours))}, reference {' '.join(map(str, ref))}"
    return "no", f"top-{TOP} ids differ ({listed})"


def judge(mine: torch.Tensor, theirs: torch.Tensor) -> tuple[str, str, str]:
    """(top-5 agreement, max |dp|, the difference or "") of one image's scores against the reference's."""
    if theirs.shape != mine.shape:
        return "", "", f"{theirs.numel()} classes against the harness's {mine.numel()}"
    (top, differs), dp = top_agreement(mine, theirs), float((mine - theirs).abs().max())
    if not differs and dp > TOLERANCE:
        differs = f"probabilities differ by up to {dp:.2e} (over {TOLERANCE:g})"
    return top, f"{dp:.2e}", differs


def compare(
    config: Config, kind: str, files: list[ImageFile], outputs: torch.Tensor, errors: list[str], classes: int
) -> Parity:
    """The harness's scores for `files` (the run's outputs, softmaxed as the run does) against the framework's."""
    reference, pipeline = _timm_reference(config, classes) if kind == "timm" else _hf_reference(config.model_dir)
    mine = outputs.float().softmax(1) if config.softmax else outputs.float()
    rows = [["image", f"top-{TOP} equal", "max |dp|", "verdict"]]
    first, compared = "", 0
    for image, scores, error in zip(files, mine, errors, strict=True):
        if error:
            rows.append([image.key, "", "", f"skip: the harness could not read it ({error})"])
            continue
        compared += 1
        try:
            with torch.inference_mode():
                theirs = reference(_open_rgb(image.path, config.preprocess.border)).float()
            top, gap, problem = judge(scores, theirs)
        except Exception as failure:  # the framework failing on an image the harness read is a difference too
            top, gap, problem = "", "", f"the reference failed: {describe_user_error(failure)}"
        rows.append([image.key, top, gap, f"FAIL: {problem}" if problem else "pass"])
        first = first or (f"{image.key}: {problem}" if problem else "")
    against = FRAMEWORKS[kind]
    caption = f"parity with {against} ({pipeline}); images opened with .convert('RGB'), border "
    caption += f"{config.preprocess.border} stripped from each as the run strips it"
    if first:
        return Parity(False, f"differs from {against}, first at {first}", caption, rows)
    if not compared:
        return Parity(False, "no image could be compared: the harness read none", caption, rows)
    detail = f"{compared} images: top-{TOP} ids and probabilities (within {TOLERANCE:g}) as {against} gives them"
    return Parity(True, detail, caption, rows)
