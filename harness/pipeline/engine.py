"""What runs a PyTorch model on the CPU (`engine`): PyTorch itself, or ONNX Runtime on an export of it, chosen as
the memory layout is (harness/pipeline/layout.py): measured on the run's own check images, before the first batch
and while the head start decodes.

ONNX Runtime ran EfficientNet-Lite0 several times and ResNet-50 about 1.6 times as fast as PyTorch on the 2-core VM
(docs/speed.md), but an export is another program than the model, so it is used only where it is provably the same
one: torch.export must capture the whole model with the batch size free (no branch on the input's values, no batch
size fixed in the code: harness/models/onnx_export.py), the export is traced on two check images, and its scores on
every check image (another batch size) must agree with PyTorch's within the tolerance the layouts and --compile are
held to (SAME_RTOL of each score plus SAME_ATOL of the largest). `auto` weighs it first against PyTorch running the
model as written (no BatchNorm folded, the layout the settings give), before PyTorch's own speed-ups are made: where
onnxruntime was far the faster (AS_WRITTEN_MARGIN), it runs the model, and the fold and the layout's trial, whose
checks and passes would only speed up a PyTorch that does not run, are not made. Otherwise PyTorch gets them, and
onnxruntime is kept only where it beat PyTorch at its fastest (MARGIN). The two engines' scores differ in the last
digits, so a top-k id may differ only between classes whose scores lie that close (a tie); a resumed run takes the
engine of the run it continues; `torch` runs the model exactly as PyTorch does.

An export that passed its check is kept in the export cache (harness/pipeline/export_cache.py), and a later run of
the same model with the same settings and software takes it from there instead of exporting again; a kept export is
checked on that run's check images as a new one is, and replaced where it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.config import Config, Preprocess
from harness.errors import ConfigError, ModelError, describe_user_error
from harness.models.load import open_onnx
from harness.models.onnx_export import NotExported, proven_export
from harness.models.onnx_metadata import metadata, with_metadata
from harness.models.outputs import as_logits, same_scores
from harness.pipeline.devices import DeviceNormalizer, DevicePlan, inference_context
from harness.pipeline.export_cache import keep, load, not_held
from harness.pipeline.host import cpu_name
from harness.pipeline.resume import recorded_choice
from harness.results.outputs import run_outputs

ENGINES = ("torch", "onnxruntime")
OPSET = 17
# The proof, the export and the checks take seconds (docs/speed.md): `auto` keeps PyTorch for fewer images.
PAYBACK_IMAGES = 256
# `auto` keeps ONNX Runtime only where its fastest pass on the check images beat PyTorch's at its fastest (its
# BatchNorms folded where the settings fold them, in the layout kept) by this much; within it PyTorch runs the model.
MARGIN = 1.05
# ... and keeps it at once, neither folding nor timing layouts, where it beat PyTorch as written by this much. The
# fold and channels_last together made PyTorch up to 2.1x as fast on the check images (EfficientNet-Lite0 20.1 ->
# 9.7 ms an image; ResNet-50 59 -> 47), and PyTorch's one pass here, the check's, is its first, which took up to
# 1.44x its second (docs/speed.md): 3 covers both.
AS_WRITTEN_MARGIN = 3.0
# passes of onnxruntime over the check images (the first is the check too); PyTorch makes one as written, which
# gives the check its scores, and where it is weighed again at its fastest the layout's trial has timed it
TRIAL_ROUNDS = 2
PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime"}  # module -> what pip installs it as
AS_WRITTEN = "torch_as_written"  # PyTorch's time before its speed-ups, in EngineChoice.ms_per_image
VERDICT_KEY = "harness.engine"  # the metadata entry an export in the cache carries its verdict under


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    why: str
    ms_per_image: dict[str, float] = field(default_factory=dict)  # each engine's fastest pass, where timed
    export_s: float = 0.0  # the proof and the export (or the cache's read), the session and the check
    max_score_diff: float | None = None  # onnxruntime's farthest score from PyTorch's on the check images
    cache: str = ""  # the export cache: "read", "written", or why not (harness/pipeline/export_cache.py)

    def describe(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Weighed:
    """The engines weighed on the model as written: `choice` where that settles it (`settled`), else onnxruntime's
    trial, to weigh against PyTorch at its fastest (settle_engine); `module` is onnxruntime running the checked
    export, where there is one."""

    choice: EngineChoice
    module: nn.Module | None = None
    settled: bool = True
    data: bytes | None = None  # the export made now, to keep once the engine is settled (keep_export)

    @property
    def in_onnxruntime(self) -> bool:
        """onnxruntime runs an export of the model, whatever PyTorch's speed-ups would make of PyTorch's time."""
        return self.settled and self.module is not None


def weigh_engine(
    config: Config,
    model: nn.Module,
    plan: DevicePlan,
    sample: torch.Tensor,
    images: int,
    runtime: str | None = None,
    files_read: list[str] | None = None,
) -> Weighed:
    """The engine for a run of `images` images, where it can be chosen before PyTorch's speed-ups: as `engine`
    says, or for `auto` as the run a resumed one continues chose, or PyTorch where an export cannot be used or
    cannot pay, or onnxruntime where its trial beat `model` as written (unfolded, in `plan`'s layout) by
    AS_WRITTEN_MARGIN; else the trial, to weigh again. `runtime`: the runtime a model not made of PyTorch layers
    comes with (its kind says: harness/models/kinds.py); `files_read`: what loading the model read (an export of a
    model that read a file the cache's key does not hold is not kept)."""
    decided, forced = _before_export(config, plan, images, runtime)
    if decided is not None:
        return Weighed(decided)
    started = time.perf_counter()
    inputs = _TrialInputs(model, plan, config.preprocess, sample, 1 if forced else TRIAL_ROUNDS)
    trial = _exported(inputs, _uncached(config, files_read or []))
    export_s = round(time.perf_counter() - started, 3)
    difference, cache = trial.difference, trial.cache
    if trial.module is None:
        if forced:
            raise ModelError(f"--engine onnxruntime ({forced}): {trial.why}; use --engine torch")
        return Weighed(EngineChoice("torch", trial.why, {}, export_s, difference, cache))
    if forced:
        return Weighed(
            EngineChoice("onnxruntime", forced, {}, export_s, difference, cache), trial.module, data=trial.data
        )
    ms = {AS_WRITTEN: trial.ms["torch"], "onnxruntime": trial.ms["onnxruntime"]}
    ratio = ms[AS_WRITTEN] / ms["onnxruntime"] if ms["onnxruntime"] else math.inf
    why = f"onnxruntime was {ratio:.2f}x as fast as PyTorch as written on {len(sample)} images"
    if trial.earlier is not None:
        why = f"the verdict kept with the export, on this CPU: {trial.earlier}"
    choice = EngineChoice("onnxruntime", why, ms, export_s, difference, cache)
    settled = trial.earlier is not None or ratio > AS_WRITTEN_MARGIN
    return Weighed(choice if settled else dataclasses.replace(choice, why=""), trial.module, settled, trial.data)


def keep_export(weighed: Weighed, choice: EngineChoice) -> EngineChoice:
    """`choice` (the engine settled) with the export made this run kept in the export cache, carrying the verdict
    where onnxruntime won by measurement: a later run of the same model, on the same CPU with as many threads,
    then checks the export and runs it without weighing PyTorch's speed-ups again. A verdict only moves which
    engine runs: the check against PyTorch's scores is made on every run, whatever an entry says."""
    if weighed.data is None:
        return choice
    data = weighed.data
    if choice.engine == "onnxruntime" and choice.ms_per_image:
        verdict = {"engine": "onnxruntime", "cpu": cpu_name(), "threads": torch.get_num_threads(), "why": choice.why}
        data = with_metadata(data, VERDICT_KEY, json.dumps(verdict, sort_keys=True))
    return dataclasses.replace(choice, cache=keep(data) + choice.cache)


def _honoured(verdict: str) -> str | None:
    """The why of a kept export's verdict for onnxruntime, where it was measured on this CPU with this run's
    threads; else None (another machine sharing the cache, or another thread count, weighs anew)."""
    try:
        record = json.loads(verdict) if verdict else None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("engine") != "onnxruntime":
        return None
    if record.get("cpu") != cpu_name() or record.get("threads") != torch.get_num_threads():
        return None
    why = record.get("why")
    return why if isinstance(why, str) else None


def settle_engine(
    weighed: Weighed,
    model: nn.Module,
    plan: DevicePlan,
    pre: Preprocess,
    sample: torch.Tensor,
    torch_ms: float | None = None,
) -> tuple[nn.Module, DevicePlan, EngineChoice]:
    """The module that runs the run, the plan it runs on (onnxruntime takes contiguous float32) and why: `weighed`'s
    choice where it settled it, else onnxruntime where its trial beat `model` (PyTorch at its fastest: BatchNorms
    folded, in the layout `plan` settled on) by MARGIN. `torch_ms`: that PyTorch's fastest pass on the check
    images, ms an image, where the layout's trial timed it this run; else timed here."""
    choice = weighed.choice
    if weighed.module is None:
        return model, plan, choice
    contiguous = dataclasses.replace(plan, channels_last=False)
    if weighed.settled:
        return weighed.module, contiguous, choice
    if torch_ms is None:
        engines = {"torch": (model, plan.normalizer(pre))}
        torch_ms = _passes(engines, plan, sample, {"torch": TRIAL_ROUNDS})[1]["torch"]
    ms = {**choice.ms_per_image, "torch": torch_ms}
    if ms["onnxruntime"] * MARGIN < torch_ms:
        faster = f"onnxruntime was {torch_ms / ms['onnxruntime']:.2f}x as fast on {len(sample)} images"
        return weighed.module, contiguous, dataclasses.replace(choice, why=faster, ms_per_image=ms)
    slower = f"onnxruntime was not {MARGIN - 1:.0%} faster than PyTorch on {len(sample)} images"
    return model, plan, dataclasses.replace(choice, engine="torch", why=slower, ms_per_image=ms)


def _before_export(
    config: Config, plan: DevicePlan, images: int, runtime: str | None
) -> tuple[EngineChoice | None, str | None]:
    """(the choice, where it is made before any export), or (None, why onnxruntime is wanted without a trial:
    None for `auto`'s trial); an explicit engine this run cannot use is refused."""
    wanted = config.engine
    if runtime is not None:
        if wanted == "torch":
            raise ConfigError(f"--engine torch: {runtime} runs this model, not PyTorch; leave --engine auto")
        return EngineChoice("onnxruntime", f"{runtime} runs the model"), None
    if wanted == "torch":
        return EngineChoice("torch", "set: engine torch"), None
    why_not = _why_not(config, plan)
    if why_not is not None:
        if wanted == "onnxruntime":
            raise ConfigError(f"--engine onnxruntime: {why_not}; use --engine torch or auto")
        return EngineChoice("torch", why_not), None
    recorded = recorded_choice(config.output_file, "engine", ENGINES) if config.resume and wanted == "auto" else None
    if recorded == "torch":
        return EngineChoice("torch", "the choice of the run this one resumes"), None
    forced = "set: engine onnxruntime" if wanted == "onnxruntime" else None
    forced = forced or ("the choice of the run this one resumes" if recorded == "onnxruntime" else None)
    if forced is None and images < PAYBACK_IMAGES:
        return EngineChoice("torch", f"{images} images are too few to pay for an export"), None
    missing = [package for module, package in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (pip install {' '.join(missing)})"
        if forced:
            raise ModelError(f"--engine onnxruntime ({forced}): {why}")
        return EngineChoice("torch", why), None
    return None, forced


def _uncached(config: Config, files_read: list[str]) -> str | None:
    """Why this run's export is neither taken from the export cache nor kept there, or None."""
    if config.export_cache == "none":
        return "--export-cache none"
    return not_held(config, files_read, run_outputs(config).files)


def _why_not(config: Config, plan: DevicePlan) -> str | None:
    """Why this run cannot use onnxruntime, or None."""
    if plan.device.type != "cpu":
        return f"onnxruntime runs a PyTorch model on the CPU only, and this run is on {plan.device.type}"
    if config.amp:
        return f"--amp {config.amp} is PyTorch's mixed precision"
    if config.compile:
        return "--compile compiles the PyTorch model"
    if not hasattr(os, "fork"):
        return "the export runs in a forked process, and this system cannot fork"
    return None


@dataclass(frozen=True)
class _Trial:
    module: nn.Module | None  # onnxruntime running the export, or None
    why: str = ""  # why there is none
    difference: float | None = None  # the export's farthest score from PyTorch's, where measured
    ms: dict[str, float] = field(default_factory=dict)  # each engine's fastest pass, ms an image
    cache: str = ""  # as EngineChoice.cache; with `data`, what follows "written" once it is kept
    data: bytes | None = None  # an export made now, kept once the engine is settled (keep_export)
    earlier: str | None = None  # the why of the kept export's verdict, where this run honours it (_honoured)


@dataclass(frozen=True)
class _TrialInputs:
    """What the check and the timing run on: `model` as written, on `plan`'s device and in its layout, the check
    images (`sample`, as the decoders make them) and the passes onnxruntime makes over them."""

    model: nn.Module
    plan: DevicePlan
    pre: Preprocess
    sample: torch.Tensor
    rounds: int

    @functools.cached_property
    def onnx_input(self) -> DeviceNormalizer:
        """onnxruntime's input: contiguous float32, normalised as the model's (made once: the export, and each
        export's check, take the same)."""
        return DeviceNormalizer(self.pre, self.plan.device, torch.float32, False)


def _exported(inputs: _TrialInputs, uncached: str | None) -> _Trial:
    """onnxruntime running an export of the model that passed its check, the kept one where there is one (else one
    made now, to keep unless `uncached` says why not), with each engine's fastest of its passes over the check
    images; or why there is none."""
    kept = load() if uncached is None else None
    failed = ""
    if kept is not None:
        earlier = _honoured(metadata(kept).get(VERDICT_KEY, ""))
        # an honoured verdict needs no time of onnxruntime's: its one pass is the check
        trial = _checked(kept, inputs if earlier is None else dataclasses.replace(inputs, rounds=1))
        if trial.module is not None:
            return dataclasses.replace(trial, cache="read", earlier=earlier)
        failed = f" (the kept export failed its check: {trial.why})"
    try:
        two = inputs.onnx_input(inputs.sample).repeat(2, 1, 1, 1)[:2]  # one image would fix the batch
        data = proven_export(inputs.model, two, OPSET)
    except NotExported as refusal:
        return _Trial(None, str(refusal))
    trial = _checked(data, inputs)
    if trial.module is None:
        return trial
    if uncached is not None:
        return dataclasses.replace(trial, cache=f"not kept: {uncached}{failed}")
    return dataclasses.replace(trial, cache=failed, data=data)


def _checked(data: bytes, inputs: _TrialInputs) -> _Trial:
    """The export `data` in onnxruntime, where its scores on the check images agree with PyTorch's."""
    onnx_input = inputs.onnx_input
    try:
        module = open_onnx(data, want_cuda=False, threads=torch.get_num_threads())
        engines = {"torch": (inputs.model, inputs.plan.normalizer(inputs.pre)), "onnxruntime": (module, onnx_input)}
        scores, ms = _passes(engines, inputs.plan, inputs.sample, {"torch": 1, "onnxruntime": inputs.rounds})
        module.release_memory(onnx_input(inputs.sample[:1]))  # before the workers fork
    except (Exception, SystemExit) as error:  # onnxruntime's or the model's: PyTorch runs it then
        return _Trial(None, f"onnxruntime failed on the export ({describe_user_error(error)})")
    expected, got = scores["torch"], scores["onnxruntime"]
    if got.shape != expected.shape:
        return _Trial(None, f"the export returned {tuple(got.shape)} scores for PyTorch's {tuple(expected.shape)}")
    difference = float((got - expected).abs().max()) if got.numel() else 0.0
    if not same_scores(got, expected):
        why = f"the export's scores differ from PyTorch's on the check images (by up to {difference:.3g})"
        return _Trial(None, why, difference)
    return _Trial(module, "", difference, ms)


def _passes(
    engines: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]],
    plan: DevicePlan,
    sample: torch.Tensor,
    rounds: dict[str, int],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each engine over the check images `rounds[name]` times, alternating (a first pass warms an engine up, as the
    layout trial's do): the scores of each one's first pass, and its fastest pass in ms an image."""
    scores: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(max(rounds.values())):
        for name, (module, normalize) in engines.items():
            if round_ >= rounds[name]:
                continue
            started = time.perf_counter()
            with inference_context(plan):
                output = as_logits(module(normalize(sample)), len(sample)).float()
            times[name].append(1000 * (time.perf_counter() - started) / len(sample))
            scores.setdefault(name, output)
    return scores, {name: round(min(each), 3) for name, each in times.items()}
