"""The preprocessing audit of `harness check`: the labelled images under the configured preprocessing and under the
mistakes people make with it, each judged by top-1 and by the mean log-probability of the true labels.

The variants are the preprocessing a user gets with the other value of one setting, everything else as configured:
- `channel_order` swapped (rgb against bgr; the AISafety contract is BGR);
- `value_scale` 1 against 255, mean and std left as they are: that is what the other setting gives, and rescaling
  them with it would make the same numbers reach the model, hiding the very mistake;
- normalisation off (`mean`/`std` none), or, when it is off, on with ImageNet's mean and std (in value_scale's
  units and the model's channel order);
- the configured `border` against none (against the default 2 when none is configured).

A variant beats the configured preprocessing clearly when, over the judged images, all three hold:
1. its mean log-probability of the true labels is at least MARGIN (0.1 nats) higher;
2. its top-1 count is no lower;
3. it raises the true label's probability on more images than it lowers it (changes under TIE nats are ties).
Each guards against another way a handful of images misleads: (1) a top-1 that flips on one borderline image,
(2) confidence bought with wrong answers, (3) a mean carried by one image. A log-probability below LOG_FLOOR, or
none (a non-finite output), counts as LOG_FLOOR, so one hopeless image cannot outweigh the rest. On the example
model and the shipped photos, the channel swap costs 0.18 nats and one top-1, a value scale of 1 about 6 nats and
every top-1, while leaving the border on moves 0.02 nats: docs/check.md has the table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from harness.config import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from harness.pipeline.decode_options import Decoding
from harness.pipeline.files import ImageFile
from harness.pipeline.forward import Forward
from harness.pipeline.loader import ImageDataset, Transform
from harness.results.contract import scorer_key
from harness.results.labels import LabelMap

MARGIN = 0.1  # nats: the true labels get at least 10% more probability, as a geometric mean
TIE = 1e-3  # nats: a change smaller than this on one image is float noise
LOG_FLOOR = -30.0  # nats: as good as no probability at all


@dataclass(frozen=True)
class Variant:
    setting: str  # as model/config.yaml names it
    value: str  # the variant's value, as shown
    advice: str  # what to write in model/config.yaml to get it
    pre: Preprocess


def _numbers(values: tuple[float, ...] | None) -> str:
    return "null" if values is None else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def configured_value(setting: str, pre: Preprocess) -> str:
    """The configured value of a setting the audit varies, as shown beside the variant's."""
    if setting == "mean/std":
        return "none" if pre.mean is None else f"mean {_numbers(pre.mean)}, std {_numbers(pre.std)}"
    value = getattr(pre, setting)
    return f"{value:g}" if isinstance(value, float) else str(value)


def variants(pre: Preprocess) -> list[Variant]:
    order = "bgr" if pre.channel_order == "rgb" else "rgb"
    scale = 1.0 if pre.value_scale == 255.0 else 255.0
    if pre.mean is None:
        step = -1 if pre.channel_order == "bgr" else 1  # mean and std are given in the model's channel order
        mean = tuple(round(m * pre.value_scale, 6) for m in IMAGENET_MEAN[::step])
        std = tuple(round(s * pre.value_scale, 6) for s in IMAGENET_STD[::step])
        normalised = Variant(
            "mean/std",
            f"ImageNet's: mean {_numbers(mean)}, std {_numbers(std)}",
            f"mean: {_numbers(mean)} and std: {_numbers(std)}",
            dataclasses.replace(pre, mean=mean, std=std),
        )
    else:
        normalised = Variant(
            "mean/std", "none", "mean: null and std: null", dataclasses.replace(pre, mean=None, std=None)
        )
    border = 0 if pre.border != 0 else Preprocess().border
    return [
        Variant("channel_order", order, f"channel_order: {order}", dataclasses.replace(pre, channel_order=order)),
        Variant("value_scale", f"{scale:g}", f"value_scale: {scale:g}", dataclasses.replace(pre, value_scale=scale)),
        normalised,
        Variant("border", str(border), f"border: {border}", dataclasses.replace(pre, border=border)),
    ]


@dataclass(frozen=True)
class Tally:
    """How one preprocessing did on the judged images, image by image."""

    top1: tuple[bool, ...]
    log_probs: tuple[float, ...]  # of the true label, floored at LOG_FLOOR

    @property
    def correct(self) -> int:
        return sum(self.top1)

    @property
    def mean_log_prob(self) -> float:
        return sum(self.log_probs) / len(self.log_probs)


def raised_and_lowered(variant: Tally, configured: Tally) -> tuple[int, int]:
    """On how many images the variant gives the true label more probability, and on how many less."""
    changes = [v - c for v, c in zip(variant.log_probs, configured.log_probs, strict=True)]
    return sum(change > TIE for change in changes), sum(change < -TIE for change in changes)


def beats_clearly(variant: Tally, configured: Tally) -> bool:
    """The module docstring's rule: a margin in mean log-probability, no top-1 lost, better on more images."""
    raised, lowered = raised_and_lowered(variant, configured)
    return (
        variant.mean_log_prob >= configured.mean_log_prob + MARGIN
        and variant.correct >= configured.correct
        and raised > lowered
    )


def log_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """The model's outputs as log-probabilities: read as logits, unless they already are probabilities (rows of
    non-negative numbers summing to 1: a model that applies softmax itself)."""
    outputs = outputs.float()
    rows_sum_to_one = torch.allclose(outputs.sum(1), torch.ones(len(outputs), device=outputs.device), atol=1e-3)
    if bool((outputs >= 0).all()) and rows_sum_to_one:
        return outputs.clamp_min(1e-30).log()
    return outputs.log_softmax(1)


@dataclass
class Judge:
    """The answers of the images that can be judged, in the ids a label map writes: top-1 is the first id of the
    map's row, and the true label's probability is the total of the model's classes written as that id."""

    label_map: LabelMap
    indices: list[int]  # the images judged, by position among the files
    answers: list[frozenset[str]]  # the ids that count as right, for each judged image
    truth: torch.Tensor  # judged images x classes, True where the class is written as a right id

    @classmethod
    def of(
        cls, label_map: LabelMap, class_ids: list[str], files: list[ImageFile], answers: Mapping[str, frozenset[str]]
    ) -> Judge:
        """Judges each file whose basename has an answer that some class of the model is written as."""
        indices, right, rows = [], [], []
        for index, image in enumerate(files):
            answer = answers.get(scorer_key(image.key), frozenset())
            mask = [class_id in answer for class_id in class_ids]
            if any(mask):
                indices.append(index)
                right.append(answer)
                rows.append(mask)
        truth = torch.tensor(rows, dtype=torch.bool) if rows else torch.zeros(0, len(class_ids), dtype=torch.bool)
        return cls(label_map, indices, right, truth)

    def tally(self, outputs: torch.Tensor, skip: frozenset[int] = frozenset()) -> Tally:
        """How `outputs` (one row per file) do on the judged images, leaving out the positions in `skip`."""
        keep = [n for n, index in enumerate(self.indices) if index not in skip]
        chosen = outputs[[self.indices[n] for n in keep]].float().cpu()
        predicted = self.label_map(chosen)
        top1 = tuple(p.ids is not None and p.ids[0] in self.answers[n] for p, n in zip(predicted, keep, strict=True))
        log_probs = log_probabilities(chosen).masked_fill(~self.truth[keep], float("-inf")).logsumexp(1)
        floored = torch.nan_to_num(log_probs, nan=LOG_FLOOR).clamp_min(LOG_FLOOR)
        return Tally(top1, tuple(floored.tolist()))


@dataclass
class Inputs:
    """Images as the workers hand them to the device (uint8, or a model folder's own transform's floats)."""

    images: torch.Tensor
    errors: list[str]  # "" where the image decoded
    seconds_per_image: float


class Decoder:
    """The files through the run's own dataset, in this process, timed; once per geometry, since most variants
    change only the values step that runs on the device."""

    def __init__(self, files: list[ImageFile], decoding: Decoding, custom: Transform | None) -> None:
        self.files = files
        self.decoding = decoding
        self.custom = custom
        self._done: dict[Preprocess, Inputs] = {}

    def __call__(self, pre: Preprocess) -> Inputs:
        geometry = dataclasses.replace(pre, channel_order="rgb", value_scale=1.0, mean=None, std=None)
        if geometry not in self._done:
            dataset = ImageDataset(self.files, dataclasses.replace(self.decoding, pre=pre), self.custom)
            started = time.perf_counter()
            samples = [dataset[index] for index in range(len(self.files))]
            seconds = (time.perf_counter() - started) / max(1, len(self.files))
            images = torch.stack([image for _, image, _, _ in samples])
            self._done[geometry] = Inputs(images, [error for _, _, error, _ in samples], seconds)
        return self._done[geometry]


def with_preprocessing(forward: Forward, pre: Preprocess) -> Forward:
    """The run's forward pass with another preprocessing's values step."""
    plan = forward.plan
    return dataclasses.replace(forward, normalize=plan.normalizer(pre))


def outputs_for(forward: Forward, pre: Preprocess, inputs: Inputs) -> torch.Tensor:
    return with_preprocessing(forward, pre)(inputs.images.to(forward.plan.device))


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    tally: Tally
    beats: bool


def audit(
    forward: Forward, judge: Judge, configured: Tally, pre: Preprocess, decode: Decoder, skip: frozenset[int]
) -> list[VariantResult]:
    """Each variant of `pre`, run and tallied on the judged images but those in `skip` (unreadable), and weighed
    against the configured preprocessing's tally."""
    results = []
    for variant in variants(pre):
        tally = judge.tally(outputs_for(forward, variant.pre, decode(variant.pre)), skip)
        results.append(VariantResult(variant, tally, beats_clearly(tally, configured)))
    return results
