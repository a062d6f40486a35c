"""engine: auto runs a PyTorch model on the CPU in onnxruntime only where torch.export captures it whole, the export's
scores agree with PyTorch's on the check images and it was the faster; an explicit setting is obeyed or refused in
one line; a resumed run keeps the first run's engine; a run in onnxruntime gives PyTorch's ids up to ties. Which
engine is really faster is scripts/bench.py's to measure."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import harness.pipeline.engine
import harness.pipeline.placement
from harness.cli import main
from harness.errors import ConfigError, ModelError
from harness.models.load import LoadedModel
from harness.models.onnx_export import NotExported, capture_failure, export, proven_export
from harness.models.onnx_runtime import OnnxModule
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DevicePlan
from harness.pipeline.engine import PAYBACK_IMAGES, EngineChoice, settle_engine
from harness.pipeline.files import discover
from harness.pipeline.layout import LayoutChoice
from harness.pipeline.loader import ImageDataset
from harness.pipeline.placement import place_model
from harness.pipeline.resume import record_path
from harness.results.writer import partial_path
from harness.sources import build_config
from tests.helpers import REPO, SAMPLES, compare_predictions
from tests.test_layout import Convolutional  # the same tiny model the layout's trial is tested on

pytest.importorskip("onnx")  # the exporter writes through it
pytest.importorskip("onnxruntime")

CPU = DevicePlan(torch.device("cpu"))
PRE = {"input_size": "16", "resize_size": "16"}
SAMPLE = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
MANY = 10**6


class Branches(Convolutional):
    """Takes another path for a bright input: an export traced on one path would lose the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 10:
            return -super().forward(x)
        return super().forward(x)


class FixedBatch(Convolutional):
    """Reshapes to the batch size it was traced with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)).reshape(int(x.shape[0]), 8))


class OtherWhenTraced(Convolutional):
    """Another model while the exporter traces it: only the check against PyTorch can tell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (2.0 if torch.jit.is_tracing() else 1.0)


@pytest.fixture(autouse=True, scope="module")
def _exporter_loaded() -> None:
    """torch.export's and the exporter's modules loaded once here, so each export's child process forks with them
    (a run's child imports them itself: a second of each test otherwise)."""
    model = Convolutional().eval()
    capture_failure(model, torch.randn(2, 3, 16, 16))
    export(model, torch.randn(2, 3, 16, 16), 17)


def _config(**settings: str):
    return build_config({**PRE, **settings}, {}, {})


def _settle(config, model: nn.Module, plan: DevicePlan = CPU, images: int = MANY, runtime: str | None = None):
    return settle_engine(config, model.eval(), plan, SAMPLE, images, runtime)


def test_auto_keeps_pytorch_where_an_export_cannot_pay_or_be_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.engine, "proven_export", _no_export)
    model = Convolutional()
    cases = [
        (_config(), CPU, PAYBACK_IMAGES - 1, f"{PAYBACK_IMAGES - 1} images are too few to pay for an export"),
        (_config(engine="torch"), CPU, MANY, "set: engine torch"),
        (_config(amp="bf16"), CPU, MANY, "--amp bf16 is PyTorch's mixed precision"),
        (_config(compile="true"), CPU, MANY, "--compile compiles the PyTorch model"),
        (
            _config(),
            DevicePlan(torch.device("cuda", 0), [0]),
            MANY,
            "onnxruntime runs a PyTorch model on the CPU only, and this run is on cuda",
        ),
    ]
    for config, plan, images, why in cases:
        runs, settled, choice = _settle(config, model, plan, images)
        assert runs is model and settled is plan and choice == EngineChoice("torch", why)


def _no_export(*args: object) -> None:
    raise AssertionError("no export expected")


def test_a_system_that_cannot_fork_keeps_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "fork")
    why = "the export runs in a forked process, and this system cannot fork"
    assert _settle(_config(), Convolutional())[2] == EngineChoice("torch", why)


def test_an_explicit_onnxruntime_that_cannot_be_used_is_refused_in_one_line() -> None:
    for settings, why in (
        ({"amp": "bf16"}, "--amp bf16 is PyTorch's mixed precision"),
        ({"compile": "true"}, "--compile"),
    ):
        with pytest.raises(ConfigError, match=rf"^--engine onnxruntime: {why}.*; use --engine torch or auto$"):
            _settle(_config(engine="onnxruntime", **settings), Convolutional())
    with pytest.raises(ConfigError, match=r"^--engine torch: ONNX \(CPU\) runs this model, not PyTorch; leave"):
        _settle(_config(engine="torch"), Convolutional(), runtime="ONNX (CPU)")
    choice = _settle(_config(), Convolutional(), runtime="ONNX (CPU)")[2]
    assert choice == EngineChoice("onnxruntime", "ONNX (CPU) runs the model")


def test_missing_packages_keep_pytorch_or_refuse_an_explicit_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.engine, "PACKAGES", {"no_such_module_here": "onnx"})
    why = "onnx not installed (pip install onnx)"
    assert _settle(_config(), Convolutional())[2] == EngineChoice("torch", why)
    with pytest.raises(ModelError, match=rf"^--engine onnxruntime \(set: engine onnxruntime\): {re.escape(why)}$"):
        _settle(_config(engine="onnxruntime"), Convolutional())


def test_an_explicit_onnxruntime_runs_the_export_which_gives_pytorchs_scores() -> None:
    config = _config(engine="onnxruntime")
    model = Convolutional()
    runs, plan, choice = _settle(config, model, DevicePlan(torch.device("cpu"), channels_last=True))
    assert isinstance(runs, OnnxModule) and not plan.channels_last
    assert choice.engine == "onnxruntime" and choice.why == "set: engine onnxruntime" and choice.ms_per_image == {}
    assert choice.max_score_diff is not None and choice.max_score_diff < 1e-4 and choice.export_s > 0
    for count in (1, 3, 7):  # the batch axis is free
        images = SAMPLE.repeat(3, 1, 1, 1)[:count]
        with torch.inference_mode():
            want = model(CPU.normalizer(config.preprocess)(images))
            got = runs(plan.normalizer(config.preprocess)(images))
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)


def test_auto_measures_both_and_keeps_onnxruntime_only_where_it_was_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = harness.pipeline.engine._passes
    trials = (({"torch": 2.0, "onnxruntime": 1.0}, "onnxruntime"), ({"torch": 1.04, "onnxruntime": 1.0}, "torch"))
    for ms, kept in trials:
        monkeypatch.setattr(harness.pipeline.engine, "_passes", lambda *args, ms=ms: (passes(*args)[0], ms))
        runs, _, choice = _settle(_config(), Convolutional())
        assert choice.engine == kept and choice.ms_per_image == ms and isinstance(runs, OnnxModule) is (kept != "torch")
        assert choice.why == (
            "onnxruntime was 2.00x as fast on 3 images"
            if kept == "onnxruntime"
            else "onnxruntime was not 5% faster than PyTorch on 3 images"
        )
    monkeypatch.undo()
    rounds: list[int] = []
    monkeypatch.setattr(harness.pipeline.engine, "_passes", lambda *args: rounds.append(args[-1]) or passes(*args))
    choice = _settle(_config(), Convolutional())[2]  # the real passes: both engines timed, twice each
    assert set(choice.ms_per_image) == {"torch", "onnxruntime"} and all(ms > 0 for ms in choice.ms_per_image.values())
    _settle(_config(engine="onnxruntime"), Convolutional())  # set: the check alone
    assert rounds == [2, 1]


def test_pytorch_timed_by_the_layouts_trial_makes_one_pass_for_the_checks_scores() -> None:
    """The layout's trial already timed PyTorch on these images: one pass of it gives the check its scores, and
    its time counts beside the trial's; onnxruntime still makes its two."""
    calls: list[str] = []

    def engine(name: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            time.sleep(0.003)  # a pass of at least a millisecond an image
            return x.float().flatten(1)[:, :10] * (2 if name == "torch" else 1)

        return run

    engines = {name: (engine(name), lambda x: x) for name in ("torch", "onnxruntime")}
    for timed, torch_ms in (({"torch": 0.001}, 0.001), ({"torch": 1e9}, None)):
        calls.clear()
        scores, ms = harness.pipeline.engine._passes(engines, CPU, SAMPLE, timed, 2)
        assert calls == ["torch", "onnxruntime", "onnxruntime"]
        assert torch.equal(scores["torch"], 2 * scores["onnxruntime"])  # each engine's own scores
        assert ms["onnxruntime"] >= 1 and (ms["torch"] == torch_ms if torch_ms else 1 <= ms["torch"] < 1e9)
    calls.clear()
    harness.pipeline.engine._passes(engines, CPU, SAMPLE, {}, 2)
    assert calls == ["torch", "onnxruntime"] * 2


def test_auto_weighs_onnxruntime_against_the_layouts_time_for_pytorch() -> None:
    """A PyTorch time from the layout's trial that no pass here beats keeps PyTorch: the trial's time is weighed."""
    choice = settle_engine(_config(), Convolutional().eval(), CPU, SAMPLE, MANY, torch_ms=0.0)[2]
    assert choice.engine == "torch" and choice.ms_per_image["torch"] == 0.0
    assert choice.why == "onnxruntime was not 5% faster than PyTorch on 3 images"


def test_placement_hands_the_layouts_time_for_the_layout_kept_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[float | None] = []
    settle = harness.pipeline.placement.settle_engine
    monkeypatch.setattr(
        harness.pipeline.placement,
        "settle_engine",
        lambda *args, **kwargs: handed.append(args[-1]) or settle(*args, **kwargs),
    )
    for channels_last, ms in ((True, 2.0), (False, 3.0)):
        layout = LayoutChoice(channels_last, {"contiguous": 3.0, "channels_last": 2.0}, "timed")
        monkeypatch.setattr(
            harness.pipeline.placement,
            "settle_layout",
            lambda config, model, plan, *_, layout=layout: (
                dataclasses.replace(plan, channels_last=layout.channels_last),
                layout,
            ),
        )
        config = build_config({**PRE, "input_dir": str(SAMPLES), "engine": "torch"}, {}, {})
        loaded = LoadedModel(Convolutional().eval(), "Convolutional", "test", None, None)
        dataset = ImageDataset(discover(SAMPLES), Decoding.of(config))
        place_model(config, loaded, dataset, MANY)
        assert handed[-1] == ms


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (Branches(), r"^torch\.export cannot capture the whole model \(\w+: "),
        (FixedBatch(), r"^torch\.export cannot capture the whole model \(\w+: "),
        (OtherWhenTraced(), r"^the export's scores differ from PyTorch's on the check images \(by up to [0-9.e-]+\)$"),
    ],
    ids=["data-dependent-branch", "fixed-batch", "other-when-traced"],
)
def test_a_model_the_export_cannot_be_proven_for_runs_in_pytorch(model: nn.Module, why: str) -> None:
    runs, plan, choice = _settle(_config(), model)
    assert runs is model and plan is CPU and choice.engine == "torch" and choice.ms_per_image == {}
    assert choice.why.count("\n") == 0 and re.search(why, choice.why), choice.why
    with pytest.raises(ModelError, match=r"^--engine onnxruntime \(set: engine onnxruntime\): .*; use --engine torch$"):
        _settle(_config(engine="onnxruntime"), model)


def test_an_export_whose_process_dies_is_no_export() -> None:
    class Dies(Convolutional):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_tracing():  # the exporter's trace, after torch.export's capture
                os._exit(3)
            return super().forward(x)

    with pytest.raises(NotExported, match=r"^the export's process ended without an answer \(exit code 3\)$"):
        proven_export(Dies().eval(), torch.randn(2, 3, 16, 16), 17)
    choice = _settle(_config(), Dies())[2]
    why = "the export's process ended without an answer (exit code 3)"
    assert choice == EngineChoice("torch", why, export_s=choice.export_s)


def test_a_resumed_run_keeps_the_engine_the_first_run_chose(tmp_path: Path) -> None:
    config = _config(output_file=str(tmp_path / "p.csv"), resume="true")
    partial_path(config.output_file).write_text("")
    for recorded in ("torch", "onnxruntime"):
        record_path(config.output_file).write_text(json.dumps({"placed": {"engine": recorded}}))
        runs, _, choice = _settle(config, Convolutional(), images=1)  # no payback rule: the record decides
        assert choice.engine == recorded and choice.why == "the choice of the run this one resumes"
        assert isinstance(runs, OnnxModule) is (recorded == "onnxruntime")


@pytest.mark.equivalence
def test_the_example_model_in_onnxruntime_gives_the_pinned_ids_and_records_its_engine(tmp_path: Path) -> None:
    """The pinned CSV of the sample images (BatchNorms folded), within the CPUs' tolerance and up to ties; run.json
    and the resume record say which engine ran; a second run takes the kept export and writes the same bytes."""
    output = tmp_path / "out" / "predictions.csv"
    assert main([str(SAMPLES), str(output), "--progress", "false", "--engine", "onnxruntime"]) == 0
    problems = compare_predictions(REPO / "tests" / "golden" / "sample-images.folded.csv", output)
    assert not problems, "\n".join(problems)
    engine = json.loads(output.with_name("run.json").read_text())["engine"]
    assert engine["engine"] == "onnxruntime" and engine["why"] == "set: engine onnxruntime"
    assert engine["max_score_diff"] < 1e-3 and engine["export_s"] > 0 and engine["cache"] == "written"
    again = tmp_path / "again" / "predictions.csv"
    assert main([str(SAMPLES), str(again), "--progress", "false", "--engine", "onnxruntime"]) == 0
    assert json.loads(again.with_name("run.json").read_text())["engine"]["cache"] == "read"
    assert again.read_bytes() == output.read_bytes()
