"""engine: auto runs a PyTorch model on the CPU in onnxruntime only where torch.export captures it whole, the export's
scores agree with PyTorch's on the check images and it was the faster (at once where it beat PyTorch as written by
far, and then PyTorch's fold and layout trial are not made); an explicit setting is obeyed or refused in one line; a
resumed run keeps the first run's engine and records alike; a run in onnxruntime gives PyTorch's ids up to ties.
Which engine is really faster is scripts/bench.py's to measure."""

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
from harness.models.onnx_metadata import metadata, with_metadata
from harness.models.onnx_runtime import OnnxModule
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import DevicePlan
from harness.pipeline.engine import (
    AS_WRITTEN,
    AS_WRITTEN_MARGIN,
    PAYBACK_IMAGES,
    TRIAL_ROUNDS,
    VERDICT_KEY,
    EngineChoice,
    Weighed,
    keep_export,
    settle_engine,
    weigh_engine,
)
from harness.pipeline.files import discover
from harness.pipeline.host import cpu_name
from harness.pipeline.layout import LayoutChoice
from harness.pipeline.loader import ImageDataset
from harness.pipeline.placement import EXPORT_FOLD, EXPORT_LAYOUT, Placement, place_model
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
    """The engine weighed and settled as placement does, PyTorch's speed-ups left out (timed here where needed)."""
    weighed = weigh_engine(config, model.eval(), plan, SAMPLE, images, runtime)
    return settle_engine(weighed, model, plan, config.preprocess, SAMPLE)


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
    """Weighed against PyTorch as written, then (where that was not decisive) against PyTorch at its fastest, timed
    here: the `_passes` below answer the weighing's pass first, then the one that times PyTorch again."""
    passes = harness.pipeline.engine._passes
    wide = AS_WRITTEN_MARGIN * 1.01
    trials = (
        (
            {"torch": wide, "onnxruntime": 1.0},
            None,
            "onnxruntime",
            f"onnxruntime was {wide:.2f}x as fast as PyTorch as written on 3 images",
        ),
        ({"torch": 2.9, "onnxruntime": 1.0}, 2.0, "onnxruntime", "onnxruntime was 2.00x as fast on 3 images"),
        ({"torch": 2.9, "onnxruntime": 1.0}, 1.04, "torch", "onnxruntime was not 5% faster than PyTorch on 3 images"),
    )
    for first, fastest, kept, why in trials:
        answers = [first, {"torch": fastest}]
        monkeypatch.setattr(
            harness.pipeline.engine, "_passes", lambda *args, answers=answers: (passes(*args)[0], answers.pop(0))
        )
        runs, _, choice = _settle(_config(), Convolutional())
        assert choice.engine == kept and choice.why == why and isinstance(runs, OnnxModule) is (kept != "torch")
        weighed = {AS_WRITTEN: first["torch"], "onnxruntime": 1.0}
        assert choice.ms_per_image == (weighed if fastest is None else {**weighed, "torch": fastest})
        assert answers == ([{"torch": fastest}] if fastest is None else [])  # PyTorch timed again only when open
    monkeypatch.undo()
    rounds: list[dict[str, int]] = []
    monkeypatch.setattr(harness.pipeline.engine, "_passes", lambda *args: rounds.append(args[-1]) or passes(*args))
    choice = _settle(_config(), Convolutional())[2]  # the real passes
    assert rounds[0] == {"torch": 1, "onnxruntime": TRIAL_ROUNDS} and rounds[1:] in ([], [{"torch": TRIAL_ROUNDS}])
    assert {AS_WRITTEN, "onnxruntime"} <= set(choice.ms_per_image) and all(
        ms > 0 for ms in choice.ms_per_image.values()
    )
    _settle(_config(engine="onnxruntime"), Convolutional())  # set: the check alone
    assert rounds[-1] == {"torch": 1, "onnxruntime": 1}


def test_each_engine_makes_its_own_count_of_passes_alternating_and_keeps_its_first_scores() -> None:
    calls: list[str] = []

    def engine(name: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            time.sleep(0.003)  # a pass of at least a millisecond an image
            return x.float().flatten(1)[:, :10] * (2 if name == "torch" else 1) * (len(calls) + 1)

        return run

    engines = {name: (engine(name), lambda x: x) for name in ("torch", "onnxruntime")}
    scores, ms = harness.pipeline.engine._passes(engines, CPU, SAMPLE, {"torch": 1, "onnxruntime": 2})
    assert calls == ["torch", "onnxruntime", "onnxruntime"]
    assert torch.equal(scores["torch"] / 2, scores["onnxruntime"] * 2 / 3)  # each engine's own first pass
    assert set(ms) == {"torch", "onnxruntime"} and all(1 <= each < 1e3 for each in ms.values())
    calls.clear()
    harness.pipeline.engine._passes(engines, CPU, SAMPLE, {"torch": 2, "onnxruntime": 2})
    assert calls == ["torch", "onnxruntime"] * 2


def test_an_open_weighing_takes_the_layouts_time_for_pytorch_or_times_it() -> None:
    """A PyTorch time from the layout's trial that onnxruntime does not beat keeps PyTorch; without one, PyTorch
    at its fastest is timed here."""
    model = Convolutional().eval()
    onnx = _settle(_config(engine="onnxruntime"), model)[0]
    weighed = Weighed(EngineChoice("onnxruntime", "", {AS_WRITTEN: 9.0, "onnxruntime": 1.0}), onnx, settled=False)
    runs, plan, choice = settle_engine(weighed, model, CPU, _config().preprocess, SAMPLE, 0.0)
    assert runs is model and plan is CPU and choice.engine == "torch" and choice.ms_per_image["torch"] == 0.0
    assert choice.why == "onnxruntime was not 5% faster than PyTorch on 3 images"
    runs, plan, choice = settle_engine(weighed, model, CPU, _config().preprocess, SAMPLE, 1e9)
    assert runs is onnx and choice.engine == "onnxruntime" and choice.why.startswith("onnxruntime was 1000000000.00x")
    timed = settle_engine(weighed, model, CPU, _config().preprocess, SAMPLE)[2].ms_per_image["torch"]
    assert 0 < timed < 1e9


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


def _not_made(*args: object) -> None:
    raise AssertionError("PyTorch's speed-ups are not made for a model onnxruntime runs")


def test_a_run_in_onnxruntime_records_alike_whether_pytorchs_speed_ups_were_made_or_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime far faster than PyTorch as written, or a resumed run that ran in it: neither the fold nor the
    layout's trial is made; onnxruntime faster only than PyTorch at its fastest: they were made to time it. Each
    runs the export contiguous and records the same, so each can resume the others' partial file."""
    passes = harness.pipeline.engine._passes
    output = tmp_path / "p.csv"
    settings = {**PRE, "input_dir": str(SAMPLES), "output_file": str(output)}
    dataset = ImageDataset(discover(SAMPLES), Decoding.of(build_config(settings, {}, {})))
    timed = LayoutChoice(True, {"contiguous": 3.0, "channels_last": 2.0}, "timed")

    def placed(weighed_ms: dict[str, float] | None, made: bool, **more: str) -> Placement:
        with monkeypatch.context() as patch:
            if weighed_ms is not None:
                patch.setattr(harness.pipeline.engine, "_passes", lambda *args: (passes(*args)[0], weighed_ms))
            if made:
                layout = lambda config, model, plan, *_: (dataclasses.replace(plan, channels_last=True), timed)  # noqa: E731
                patch.setattr(harness.pipeline.placement, "settle_layout", layout)
            else:
                patch.setattr(harness.pipeline.placement, "prepare_model", _not_made)
                patch.setattr(harness.pipeline.placement, "settle_layout", _not_made)
            loaded = LoadedModel(Convolutional().eval(), "Convolutional", "test", None, None)
            return place_model(build_config({**settings, **more}, {}, {}), loaded, dataset, MANY)

    at_once = placed({"torch": AS_WRITTEN_MARGIN * 1.5, "onnxruntime": 1.0}, made=False)
    weighed_again = placed({"torch": 2.0, "onnxruntime": 1.0}, made=True)
    assert weighed_again.engine.ms_per_image == {AS_WRITTEN: 2.0, "onnxruntime": 1.0, "torch": 2.0}
    assert weighed_again.layout == LayoutChoice(False, timed.ms_per_image, EXPORT_LAYOUT)
    partial_path(output).write_text("")
    record_path(output).write_text(json.dumps({"placed": {"engine": "onnxruntime"}}))
    resumed = placed(None, made=False, resume="true")
    assert resumed.engine.why == "the choice of the run this one resumes"
    for each in (at_once, weighed_again, resumed):
        assert isinstance(each.forward.model, OnnxModule) and not each.forward.plan.channels_last
        assert each.folded == EXPORT_FOLD and each.layout.why == EXPORT_LAYOUT and not each.layout.channels_last
        assert each.describe_for_resume() == at_once.describe_for_resume()
    assert at_once.describe_for_resume()["engine"] == "onnxruntime"


def test_the_verdict_is_kept_with_a_new_export_where_onnxruntime_won_by_measurement_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The export made this run is kept once the engine is settled: with the verdict where onnxruntime won by
    measurement (at once, or weighed again), with none where PyTorch won or the setting chose onnxruntime."""
    passes = harness.pipeline.engine._passes
    kept: list[bytes] = []
    monkeypatch.setattr(harness.pipeline.engine, "load", lambda: None)
    monkeypatch.setattr(harness.pipeline.engine, "keep", lambda data: kept.append(data) or "written")
    cases = (
        ({"torch": AS_WRITTEN_MARGIN * 2, "onnxruntime": 1.0}, None, "onnxruntime"),
        ({"torch": 2.0, "onnxruntime": 1.0}, 2.0, "onnxruntime"),
        ({"torch": 2.0, "onnxruntime": 1.0}, 1.0, "torch"),
    )
    for first, fastest, engine in cases:
        answers = [first, {"torch": fastest}]
        monkeypatch.setattr(
            harness.pipeline.engine, "_passes", lambda *args, answers=answers: (passes(*args)[0], answers.pop(0))
        )
        model = Convolutional().eval()
        weighed = weigh_engine(_config(), model, CPU, SAMPLE, MANY)
        choice = keep_export(weighed, settle_engine(weighed, model, CPU, _config().preprocess, SAMPLE)[2])
        assert choice.engine == engine and choice.cache == "written"
        verdict = metadata(kept[-1]).get(VERDICT_KEY)
        if engine == "torch":
            assert verdict is None
        else:
            assert json.loads(verdict) == {
                "engine": "onnxruntime",
                "cpu": cpu_name(),
                "threads": torch.get_num_threads(),
                "why": choice.why,
            }
    monkeypatch.setattr(harness.pipeline.engine, "_passes", passes)
    weighed = weigh_engine(_config(engine="onnxruntime"), Convolutional().eval(), CPU, SAMPLE, MANY)
    assert keep_export(weighed, weighed.choice).cache == "written" and VERDICT_KEY not in metadata(kept[-1])
    assert keep_export(Weighed(weighed.choice, weighed.module), weighed.choice) == weighed.choice  # none made now


def test_a_kept_verdict_settles_onnxruntime_only_on_the_same_cpu_and_threads_and_after_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kept export's verdict spares a run the second weighing where it was measured on this CPU with this run's
    threads; any other verdict (another CPU, thread count or engine, or not one at all) is weighed anew. The check
    comes first whatever the entry says: an export whose scores differ is not run, verdict or none."""
    passes = harness.pipeline.engine._passes
    model = Convolutional().eval()
    data = harness.pipeline.engine.proven_export(model, CPU.normalizer(_config().preprocess)(SAMPLE[:2]), 17)
    here = {"engine": "onnxruntime", "cpu": cpu_name(), "threads": torch.get_num_threads(), "why": "measured"}
    close = {"torch": 2.0, "onnxruntime": 1.0}  # neither at once nor beyond
    rounds: list[dict[str, int]] = []
    monkeypatch.setattr(
        harness.pipeline.engine, "_passes", lambda *args: rounds.append(args[-1]) or (passes(*args)[0], close)
    )
    for verdict, honoured in (
        (here, True),
        ({**here, "cpu": "another CPU"}, False),
        ({**here, "threads": here["threads"] + 1}, False),
        ({**here, "engine": "torch"}, False),
        ("not JSON", False),
    ):
        text = verdict if isinstance(verdict, str) else json.dumps(verdict)
        monkeypatch.setattr(harness.pipeline.engine, "load", lambda text=text: with_metadata(data, VERDICT_KEY, text))
        weighed = weigh_engine(_config(), model, CPU, SAMPLE, MANY)
        assert weighed.settled is honoured and weighed.module is not None and weighed.data is None
        assert weighed.choice.cache == "read"
        assert rounds[-1] == {"torch": 1, "onnxruntime": 1 if honoured else TRIAL_ROUNDS}  # no time owed, no pass
        if honoured:
            assert weighed.choice.why == "the verdict kept with the export, on this CPU: measured"
    other = harness.pipeline.engine.proven_export(OtherWhenTraced().eval(), torch.randn(2, 3, 16, 16), 17)
    monkeypatch.setattr(harness.pipeline.engine, "load", lambda: with_metadata(other, VERDICT_KEY, json.dumps(here)))
    weighed = weigh_engine(_config(), model, CPU, SAMPLE, MANY)
    assert weighed.choice.cache.startswith(" (the kept export failed its check: the export's scores differ")
    assert not weighed.settled and weighed.data is not None  # a new export, weighed anew, to be kept


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
