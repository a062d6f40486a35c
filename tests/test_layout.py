"""channels_last: auto chooses the model's memory layout by timing both on the run's device, keeps the default where
channels_last fails or changes the scores, obeys an explicit setting, and a resumed run keeps the first run's
choice. Tiny models, so the tests are fast; which layout is really faster is scripts/bench.py's to measure."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import harness.pipeline.layout
from harness.cli import main
from harness.config import Preprocess
from harness.errors import ModelError
from harness.pipeline.devices import DevicePlan
from harness.pipeline.layout import LayoutChoice, choose_layout, settle_layout
from harness.pipeline.resume import record_path, run_identity
from harness.results.writer import partial_path
from harness.sources import build_config
from tests.helpers import SAMPLES

CPU = DevicePlan(torch.device("cpu"))
PRE = Preprocess(input_size=16, resize_size=16)
SAMPLE = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class Views(Convolutional):
    """Flattens with .view(), which a channels-last activation refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 14 * 14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


class ReadsMemory(Convolutional):
    """Reads its activations in memory order: other scores in the other layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.as_strided((y.shape[0], 8), (y.stride(0), 1)))


def _layout_of(model: nn.Module) -> bool:
    return model.conv.weight.is_contiguous(memory_format=torch.channels_last) and not model.conv.weight.is_contiguous()


def _timed(times: dict[bool, float]) -> Callable[..., tuple[float, torch.Tensor]]:
    """A stand-in for one timed pass: `times` seconds per image for each layout, the same scores."""

    def timed_pass(
        model: nn.Module, plan: DevicePlan, pre: Preprocess, images: torch.Tensor, channels_last: bool
    ) -> tuple[float, torch.Tensor]:
        return times[channels_last] * len(images), torch.zeros(len(images), 5)

    return timed_pass


@pytest.mark.parametrize("channels_last_faster", [True, False])
def test_the_faster_layout_is_kept_and_the_model_left_in_it(
    monkeypatch: pytest.MonkeyPatch, channels_last_faster: bool
) -> None:
    monkeypatch.setattr(
        harness.pipeline.layout, "_timed_pass", _timed({True: 1.0, False: 2.0 if channels_last_faster else 0.5})
    )
    model = Convolutional()
    choice = choose_layout(model, CPU, PRE, SAMPLE, batch_size=64)
    assert choice.channels_last is channels_last_faster
    assert choice.ms_per_image == {"contiguous": 2000.0 if channels_last_faster else 500.0, "channels_last": 1000.0}
    assert _layout_of(model) is channels_last_faster


def _passes(seconds: list[float], calls: list[bool]) -> Callable[..., tuple[float, torch.Tensor]]:
    """A stand-in for the timed passes: each takes the next of `seconds` per image; `calls` gets their layouts."""
    each = iter(seconds)

    def timed_pass(
        model: nn.Module, plan: DevicePlan, pre: Preprocess, images: torch.Tensor, channels_last: bool
    ) -> tuple[float, torch.Tensor]:
        calls.append(channels_last)
        return next(each) * len(images), torch.zeros(len(images), 5)

    return timed_pass


# "meta" stands in for a GPU: any device but the CPU times a fixed TRIAL_ROUNDS
@pytest.mark.parametrize("plan", [CPU, DevicePlan(torch.device("meta"))], ids=["cpu", "not-cpu"])
def test_a_cold_first_pass_does_not_decide_the_faster_of_each_counts(
    monkeypatch: pytest.MonkeyPatch, plan: DevicePlan
) -> None:
    """The first pass of each layout also warms it up: a cold, slow first channels_last pass gets a second."""
    calls: list[bool] = []
    # contiguous, channels_last (cold), contiguous, channels_last (warm)
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _passes([1.0, 3.0, 1.0, 0.5], calls))
    monkeypatch.setattr(harness.pipeline.layout, "_put", lambda model, channels_last: None)
    choice = choose_layout(Convolutional(), plan, PRE, SAMPLE, batch_size=64)
    assert calls == [False, True, False, True]
    assert choice.channels_last and choice.ms_per_image == {"contiguous": 1000.0, "channels_last": 500.0}


def test_on_the_cpu_the_trial_stops_once_channels_last_would_be_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _passes([1.0, 0.9], calls))
    choice = choose_layout(Convolutional(), CPU, PRE, SAMPLE, batch_size=64)
    assert calls == [False, True]
    assert choice.channels_last and choice.why.endswith("on 4 images x 1 timed pass")

    calls.clear()  # elsewhere every round runs
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _passes([1.0, 0.9, 1.0, 0.9], calls))
    monkeypatch.setattr(harness.pipeline.layout, "_put", lambda model, channels_last: None)
    choose_layout(Convolutional(), DevicePlan(torch.device("meta")), PRE, SAMPLE, batch_size=64)
    assert calls == [False, True, False, True]


def test_on_the_cpu_contiguous_is_kept_only_after_every_round_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that looks faster contiguous is timed up to CPU_TRIAL_MAX_ROUNDS, its fastest passes deciding."""
    rounds = harness.pipeline.layout.CPU_TRIAL_MAX_ROUNDS
    calls: list[bool] = []
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _passes([0.5, 1.0, 0.8, 0.6] * rounds, calls))
    choice = choose_layout(Convolutional(), CPU, PRE, SAMPLE, batch_size=64)
    assert calls == [False, True] * rounds
    assert not choice.channels_last and choice.ms_per_image == {"contiguous": 500.0, "channels_last": 600.0}

    calls.clear()  # a later round that shows channels_last faster ends the trial there, in its favour
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _passes([0.5, 1.0, 0.8, 0.45], calls))
    assert choose_layout(Convolutional(), CPU, PRE, SAMPLE, batch_size=64).channels_last
    assert calls == [False, True, False, True]


class Records(Convolutional):
    """Notes, each pass, the layout of its weights and of its input, and its input's dtype and device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool, torch.dtype, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_last = _layout_of(self)
        input_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.seen.append((weights_last, input_last, x.dtype, x.device.type))
        return super().forward(x.float())


class _Float64Plan(DevicePlan):
    """A plan whose normaliser makes float64: the trial must feed the model what the run's plan makes."""

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float64


def test_each_timed_pass_runs_the_model_and_its_input_in_the_layout_it_times() -> None:
    model = Records()
    choose_layout(model, _Float64Plan(torch.device("cpu")), PRE, SAMPLE, batch_size=64)
    assert model.seen[:2] == [(False, False, torch.float64, "cpu"), (True, True, torch.float64, "cpu")]


def _trial(
    monkeypatch: pytest.MonkeyPatch, plan: DevicePlan, seconds: list[float], last_scores: float = 0.0, fails: str = ""
) -> LayoutChoice:
    """choose_layout with stand-in passes (each the next of `seconds` an image; channels_last's scores all
    `last_scores`, contiguous's 0; channels_last raising `fails`) and a clock that says the trial took 1.23456 s."""
    each = iter(seconds)

    def timed_pass(
        model: nn.Module, plan: DevicePlan, pre: Preprocess, images: torch.Tensor, channels_last: bool
    ) -> tuple[float, torch.Tensor]:
        if channels_last and fails:
            raise RuntimeError(fails)
        return next(each) * len(images), torch.full((len(images), 5), last_scores if channels_last else 0.0)

    clock = itertools.cycle([100.0, 101.23456])  # a start and an end, each trial
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", timed_pass)
    monkeypatch.setattr(harness.pipeline.layout, "_put", lambda model, channels_last: None)
    monkeypatch.setattr(harness.pipeline.layout, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    return choose_layout(Convolutional(), plan, PRE, SAMPLE, batch_size=64)


def test_the_trials_figures_and_words_say_exactly_what_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = DevicePlan(torch.device("meta"))  # a device but the CPU: no margin, TRIAL_ROUNDS passes each
    choice = _trial(monkeypatch, CPU, [0.00123456, 0.001])
    assert choice == LayoutChoice(
        True, {"contiguous": 1.235, "channels_last": 1.0}, "channels_last was faster on 4 images x 1 timed pass", 1.235
    )
    choice = _trial(monkeypatch, CPU, [1.0, 1.2] * 4)
    assert (choice.channels_last, choice.why) == (False, "contiguous was faster on 4 images x 4 timed passes")
    choice = _trial(monkeypatch, CPU, [1.0, 1.0])
    assert choice.channels_last and choice.why == (
        "channels_last was within 5% of contiguous on 4 images: a close trial on the CPU"
    )
    for seconds in ([1.0, 1.02, 1.0, 1.02], [1.0, 1.0, 1.0, 1.0]):  # a tie keeps the default where no margin applies
        choice = _trial(monkeypatch, meta, seconds)
        assert (choice.channels_last, choice.why) == (False, "contiguous was faster on 4 images x 2 timed passes")
    assert _trial(monkeypatch, meta, [1.0, 0.9, 1.0, 0.9]).channels_last


def test_the_layouts_scores_are_compared_within_the_documented_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contiguous scores 0 here: channels_last's within atol (1e-4) agree; beyond it they do not. And 1 against
    1.0005 agree by rtol (1e-3) though not by atol alone."""
    assert _trial(monkeypatch, CPU, [1.0, 0.9], last_scores=5e-5).channels_last
    other = _trial(monkeypatch, CPU, [1.0, 0.9], last_scores=5e-4)
    assert (other.channels_last, other.why) == (False, "channels_last gives other scores")

    def relative(model: nn.Module, plan: DevicePlan, pre: Preprocess, images: torch.Tensor, last: bool):
        return 0.5 * len(images) if last else len(images), torch.full((len(images), 5), 1.0005 if last else 1.0)

    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", relative)
    assert choose_layout(Convolutional(), CPU, PRE, SAMPLE, batch_size=64).channels_last


def test_a_layout_the_model_fails_in_is_named_with_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = _trial(monkeypatch, CPU, [1.0, 1.0], fails="view size is not compatible\nmore")
    assert (choice.channels_last, choice.why) == (
        False,
        "channels_last failed on 4 random images: RuntimeError: view size is not compatible",
    )


def test_a_real_trial_times_both_layouts_and_agrees() -> None:
    model = Convolutional()
    choice = choose_layout(model, CPU, PRE, SAMPLE, batch_size=64)
    assert set(choice.ms_per_image) == {"contiguous", "channels_last"}
    assert "faster" in choice.why or "a close trial" in choice.why  # two layouts a tiny model runs alike
    assert _layout_of(model) is choice.channels_last
    assert choice.describe()["trial_s"] > 0
    assert all(0 < ms < 60_000 for ms in choice.ms_per_image.values())  # milliseconds an image, as timed


@pytest.mark.parametrize(("model", "why"), [(Views(), "channels_last failed"), (ReadsMemory(), "other scores")])
def test_a_model_channels_last_breaks_keeps_the_default_layout(model: nn.Module, why: str) -> None:
    choice = choose_layout(model, CPU, PRE, SAMPLE, batch_size=8)
    assert not choice.channels_last and why in choice.why
    assert not _layout_of(model)
    model(torch.zeros(2, 3, 16, 16))  # still runs as it was written


def _no_trial(*args: object) -> None:
    raise AssertionError("no trial expected")


@pytest.mark.parametrize("setting", ["true", "false"])
def test_an_explicit_setting_is_obeyed_without_a_trial(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "choose_layout", _no_trial)
    config = build_config({"channels_last": setting}, {}, {})
    plan = DevicePlan(torch.device("cpu"), channels_last=config.channels_last)
    settled, choice = settle_layout(config, Convolutional(), plan, SAMPLE, 64, images=10**6)
    assert settled.channels_last is choice.channels_last is (setting == "true") and choice.why.startswith("set")


def test_auto_is_the_default_and_a_few_images_on_the_cpu_get_no_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "choose_layout", _no_trial)
    config = build_config({}, {}, {})
    assert config.channels_last == "auto"
    settled, choice = settle_layout(config, Convolutional(), CPU, SAMPLE, 64, images=19)
    assert not settled.channels_last and "too few" in choice.why


def test_a_resumed_run_keeps_the_layout_the_first_run_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "choose_layout", _no_trial)
    config = build_config({"output_file": str(tmp_path / "p.csv"), "resume": "true"}, {}, {})
    partial_path(config.output_file).write_text("")
    record_path(config.output_file).write_text(json.dumps({"placed": {"channels_last": True}}))
    model = Convolutional()
    settled, choice = settle_layout(config, model, CPU, SAMPLE, 64, images=10**6)
    assert settled.channels_last and "resumes" in choice.why and _layout_of(model)


def test_run_json_and_the_resume_record_carry_the_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "CPU_PAYBACK", 0)  # a trial even for 19 images
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import torch\n\n\nclass Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n\n    def forward(self, x):\n"
        "        return self.conv(x).mean((2, 3))\n"
    )
    output = tmp_path / "out" / "p.csv"
    argv = [str(SAMPLES), str(output), "--model-dir", str(folder), "--label-map", "none", "--progress", "false"]
    assert main([*argv, "--input-size", "32", "--resize-size", "32"]) == 0
    layout = json.loads(output.with_name("run.json").read_text())["layout"]
    assert set(layout["ms_per_image"]) == {"contiguous", "channels_last"}
    assert json.loads(output.with_name("run.json").read_text())["devices"]["channels_last"] is layout["channels_last"]


def test_the_resume_record_holds_the_layout_chosen_not_auto() -> None:
    model = {"class": "Model", "source": None, "checkpoint": None}
    identity = run_identity(build_config({}, {}, {}), model, [], {"channels_last": True})
    assert identity["placed"]["channels_last"] is True and "channels_last" not in identity["settings"]


@pytest.mark.parametrize(("contiguous_s", "channels_last"), [(0.97, True), (0.9, False)])
def test_on_the_cpu_contiguous_must_be_clearly_faster_to_be_kept(
    monkeypatch: pytest.MonkeyPatch, contiguous_s: float, channels_last: bool
) -> None:
    """A few images rank the layouts less clearly than the run's pieces: within 5%, the CPU keeps channels_last."""
    monkeypatch.setattr(harness.pipeline.layout, "_timed_pass", _timed({True: 1.0, False: contiguous_s}))
    choice = choose_layout(Convolutional(), CPU, PRE, SAMPLE, batch_size=64)
    assert choice.channels_last is channels_last
    assert ("close trial" in choice.why) is channels_last


def test_a_model_whose_to_fails_while_its_layout_is_set_is_its_error_naming_the_call() -> None:
    class RefusesLayouts(Convolutional):
        def to(self, *args: object, **kwargs: object) -> nn.Module:
            raise ValueError("no layouts here")

    with pytest.raises(ModelError) as failed:
        harness.pipeline.layout._put(RefusesLayouts(), True)
    assert str(failed.value) == "the model's to(memory_format) failed: ValueError: no layouts here"


def _measured(*args: object) -> LayoutChoice:
    return LayoutChoice(True, {"contiguous": 2.0, "channels_last": 1.0}, "measured")


@pytest.mark.parametrize(
    ("batch_size", "images", "trial"),
    [(64, 159, False), (64, 160, True), (2, 79, False), (2, 80, True)],  # 10 x (min(batch, 4) x 2 layouts x 2 rounds)
)
def test_a_cpu_run_gets_a_trial_from_ten_times_the_trials_own_images(
    monkeypatch: pytest.MonkeyPatch, batch_size: int, images: int, trial: bool
) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "choose_layout", _measured)
    settled, choice = settle_layout(build_config({}, {}, {}), Convolutional(), CPU, SAMPLE, batch_size, images)
    expected = (
        _measured() if trial else LayoutChoice(False, {}, f"{images} images are too few to pay for a trial on the CPU")
    )
    assert choice == expected and settled.channels_last is expected.channels_last


def test_each_layout_chosen_without_a_trial_says_why_word_for_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.pipeline.layout, "choose_layout", _measured)
    config = build_config({"output_file": str(tmp_path / "p.csv")}, {}, {})
    partial_path(config.output_file).write_text("")
    record_path(config.output_file).write_text(json.dumps({"placed": {"channels_last": True}}))
    assert settle_layout(config, Convolutional(), CPU, SAMPLE, 64, 10**6)[1] == _measured()  # not resuming
    resumed = dataclasses.replace(config, resume=True)
    assert settle_layout(resumed, Convolutional(), CPU, SAMPLE, 64, 10**6)[1] == LayoutChoice(
        True, {}, "the choice of the run this one resumes"
    )
    settled, choice = settle_layout(config, Convolutional(), CPU, SAMPLE, 64, 10**6, runtime="ONNX Runtime")
    assert choice == LayoutChoice(False, {}, "ONNX Runtime runs the model and chooses its layout")
    assert settled.channels_last is False
    for setting in (True, False):
        given = dataclasses.replace(config, channels_last=setting)
        plan = DevicePlan(torch.device("cpu"), channels_last=setting)
        assert settle_layout(given, Convolutional(), plan, SAMPLE, 64, 10**6)[1] == LayoutChoice(
            setting, {}, f"set: channels_last {str(setting).lower()}"
        )
