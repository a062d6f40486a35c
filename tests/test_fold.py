"""BatchNorm folding (harness/models/fold.py): what it folds gives the model's scores, and what it must not fold
(a convolution whose output something else reads, a weight-standardising convolution, a BatchNorm that does more)
it leaves as written, byte for byte."""

from __future__ import annotations

import functools
import json
import types
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from harness.cli import main
from harness.models.fold import FoldResult, fold_batchnorm
from tests.helpers import REPO, SAMPLES, compare_predictions

pytestmark = pytest.mark.equivalence  # outputs pinned against a reference: run again under other CPU kernels


def _randomise_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affines far from the identity, so a fold that is wrong shows in the scores."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator))
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(count, generator=generator))
    return model.eval()


def _scores(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images)


def _fold(model: nn.Module, images: torch.Tensor):
    return fold_batchnorm(model, images[:1], lambda output: output)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


IMAGES = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_a_resnet_folds_every_batchnorm_and_keeps_its_scores() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(resnet18(num_classes=10))
    before = _scores(model, IMAGES)
    result = _fold(model, IMAGES)
    assert (result.folded, _norms(model)) == (20, 0)
    assert torch.allclose(_scores(model, IMAGES), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


class _ConvNormHead(nn.Module):
    """A convolution, its BatchNorm and a head: the subclasses differ in what else reads the convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)


class ReadTwice(_ConvNormHead):
    """The convolution's output is read by its BatchNorm and again by the sum: folding would change the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.norm(y) + y).mean((2, 3)))


class StandardisedConv(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d does this): a folded scale would be standardised away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.weight.mean((1, 2, 3), keepdim=True)
        std = self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, (self.weight - mean) / (std + 1e-5), self.bias, self.stride, self.padding)


class NormAct(nn.BatchNorm2d):
    """A BatchNorm that also applies its activation (timm's BatchNormAct2d): replacing it would drop the ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class Mixed(nn.Module):
    """One pair of each kind: foldable, standardised, with an activation inside, and a convolution called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.plain, self.plain_norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.standard, self.standard_norm = StandardisedConv(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.acting, self.acting_norm = nn.Conv2d(8, 8, 1), NormAct(8)
        self.shared, self.shared_norm = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.plain_norm(self.plain(x))
        x = self.standard_norm(self.standard(x))
        x = self.acting_norm(self.acting(x))
        x = self.shared_norm(self.shared(x)) + self.shared(x)
        return self.head(x.mean((2, 3)))


def test_a_convolution_read_twice_is_put_back_as_written() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(ReadTwice())
    before = _scores(model, IMAGES)
    weight = model.conv.weight.detach().clone()
    result = _fold(model, IMAGES)
    assert result.folded == 0 and "nothing else reads" in result.why  # seen, not tried and put back
    assert isinstance(model.norm, nn.BatchNorm2d) and torch.equal(model.conv.weight, weight)
    assert torch.equal(_scores(model, IMAGES), before)


def test_only_the_plain_pair_of_a_mixed_model_is_folded() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(Mixed())
    before = _scores(model, IMAGES)
    result = _fold(model, IMAGES)
    assert result.folded == 1 and "left as written" not in result.why  # the standardised one not even tried
    assert isinstance(model.plain_norm, nn.Identity)
    assert isinstance(model.standard_norm, nn.BatchNorm2d) and model.standard.bias is not None  # its own bias back
    assert isinstance(model.acting_norm, NormAct) and isinstance(model.shared_norm, nn.BatchNorm2d)
    assert torch.allclose(_scores(model, IMAGES), before, rtol=1e-4, atol=1e-5)


class SamePadded(nn.Conv2d):
    """Pads, then convolves with its own weight through F.conv2d (timm's Conv2dSame, as EfficientNets have)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class SamePaddedNet(_ConvNormHead):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SamePadded(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


class BrightBranch(_ConvNormHead):
    """On very bright images only, a second branch reads the convolution's weight itself (F.conv2d): no check image
    takes it, so no sample can prove a fold safe; folding would change every bright image's scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        if x.mean() > 3:
            y = y + F.conv2d(x, self.conv.weight, padding=1)
        return self.head(y.mean((2, 3)))


class WeightReadBeside(BrightBranch):
    """The same read, on every image: the graph shows it, so the fold is not proven."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)) + 0.5 * F.conv2d(x, self.conv.weight, padding=1)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("model_class", [BrightBranch, WeightReadBeside])
def test_a_fold_no_static_proof_covers_is_never_made(model_class: type[nn.Module]) -> None:
    """Folding is proven over the model's whole program or not done: a branch on the input's values fails torch.fx's
    tracing, a read of the weight beside the BatchNorm shows in its graph (was: folded, since the check images never
    took the bright branch, and bright images' top-1 changed)."""
    torch.manual_seed(0)
    model = _randomise_statistics(model_class())
    bright = torch.full((1, 3, 16, 16), 10.0)
    before = _scores(model, bright)
    result = _fold(model, IMAGES)  # the check images are dark: they never take the bright branch
    assert result.folded == 0 and isinstance(model.norm, nn.BatchNorm2d)
    assert ("does not trace with torch.fx" in result.why) == (model_class is BrightBranch)
    assert torch.equal(_scores(model, bright), before)


def test_a_model_without_batchnorm_is_not_run() -> None:
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    model.register_forward_hook(lambda *_: calls.append(1))
    assert _fold(model, IMAGES).why == "no BatchNorm to fold" and not calls


def test_a_model_that_fails_is_left_for_the_probe_to_report() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.norm(self.conv(x))
            raise SystemExit(3)

    model = Fails().eval()
    assert _fold(model, IMAGES).folded == 0 and isinstance(model.norm, nn.BatchNorm2d)


def test_the_example_model_runs_folded_with_its_classes_and_probabilities(tmp_path: Path) -> None:
    output = tmp_path / "predictions.csv"
    assert main([str(SAMPLES), str(output), "--progress", "false", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["fold_batchnorm"]["folded"] == 49
    problems = compare_predictions(REPO / "tests" / "golden" / "sample-images.csv", output, tolerance=1e-5)
    assert not problems, "\n".join(problems)


class ReadsBeforeTheNorm(nn.Module):
    """The convolution's output also feeds a branch beside its BatchNorm, `relu(y - 1.8)`: on a random image that
    branch is nearly silent, on a real photo it is not, so only seeing the reader keeps this model safe."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.fc2 = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(F.relu(self.norm(y)).mean((2, 3))) + self.fc2(F.relu(y - 1.8).mean((2, 3)))


class ChangedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x).add_(1.0)).mean((2, 3)))


@pytest.mark.parametrize("model_class", [ReadsBeforeTheNorm, ChangedInPlace])
def test_a_convolution_output_with_another_reader_is_never_folded(model_class: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(model_class())
    before = _scores(model, IMAGES)
    result = fold_batchnorm(model, IMAGES, lambda output: output)
    assert result.folded == 0 and "nothing else reads" in result.why
    assert isinstance(model.norm, nn.BatchNorm2d) and torch.equal(_scores(model, IMAGES), before)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("hooked", ["norm", "conv"])
def test_hooked_layers_are_left_as_written_and_their_hooks_keep_firing(hooked: str) -> None:
    torch.manual_seed(0)
    assert fold_batchnorm(_randomise_statistics(Plain()), IMAGES, lambda output: output).folded == 1
    model = _randomise_statistics(Plain())
    seen: list[torch.Tensor] = []
    getattr(model, hooked).register_forward_hook(lambda module, inputs, output: seen.append(output))
    result = fold_batchnorm(model, IMAGES, lambda output: output)
    assert result.folded == 0 and isinstance(model.norm, nn.BatchNorm2d)
    seen.clear()
    _scores(model, IMAGES)
    assert len(seen) == 1, f"the {hooked}'s hook stopped firing"


class ReadsTheNormsAttributes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.conv(x)).mean((2, 3))
        return self.head(features[:, : self.norm.num_features]) * self.norm.eps / 1e-5


def test_a_forward_that_reads_a_folded_batchnorms_attributes_still_runs() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(ReadsTheNormsAttributes())
    before = _scores(model, IMAGES)
    assert fold_batchnorm(model, IMAGES, lambda output: output).folded == 1
    assert not isinstance(model.norm, nn.BatchNorm2d) and model.norm.num_features == 8
    after = _scores(model, IMAGES)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert sum(p.numel() for p in model.parameters()) == 8 * 3 * 9 + 8 + 8 * 5 + 5  # no BatchNorm's left over


class Shifted(nn.Module):
    """A convolution and its BatchNorm, whose shift adds `offset` that the forward takes off again."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.offset = offset
        _randomise_statistics(self)
        with torch.no_grad():
            self.norm.bias += offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.norm(self.conv(x)) - self.offset).mean((2, 3))


def test_a_fold_that_moves_its_layers_output_by_a_thousandth_is_put_back() -> None:
    """In half precision the folded weights are rounded to 11 bits: the layer's output moves by about 1e-3 of its
    largest value, ten times what a fold may move it, so the fold is undone and the scores stay the model's."""
    torch.manual_seed(0)
    model = Shifted().half()
    images = IMAGES[:, :, :16, :16].half()
    before = _scores(model, images)
    result = _fold(model, images)
    assert (result.folded, result.why) == (0, "none folded: 1 folds changed their layer's output")
    assert isinstance(model.norm, nn.BatchNorm2d) and model.conv.bias is not None
    assert torch.equal(_scores(model, images), before)


def test_a_fold_only_the_whole_models_scores_tell_from_the_model_is_put_back() -> None:
    """A shift of a million, taken off after the BatchNorm: float32 rounding at that size moves each output by a few
    hundredths, well within the layer's check (1e-4 of a million) but not the model's, so the whole-model check on
    the check images undoes the fold and the model gives its own scores again, bit for bit."""
    torch.manual_seed(0)
    model = Shifted(offset=1e6)
    images = IMAGES[:, :, :16, :16]
    before = _scores(model, images)
    weight = model.conv.weight.detach().clone()
    result = _fold(model, images)
    assert (result.folded, result.why) == (0, "none folded: the folded model gave other scores")
    assert isinstance(model.norm, nn.BatchNorm2d) and torch.equal(model.conv.weight, weight)
    assert torch.equal(_scores(model, images), before)


def test_a_layers_tolerance_is_a_share_of_its_own_largest_value_however_small() -> None:
    """The half-precision fold above, on a layer whose outputs are hundredths: it moves them by about 1e-3 of
    their size, so it is undone here too (a floor of 1 under the scale would have let it through)."""
    torch.manual_seed(0)
    model = Shifted()
    with torch.no_grad():
        model.norm.weight.mul_(0.01)
        model.norm.bias.mul_(0.01)
    model = model.half()
    images = IMAGES[:, :, :16, :16].half()
    result = _fold(model, images)
    assert (result.folded, result.why) == (0, "none folded: 1 folds changed their layer's output")


class Aliased(_ConvNormHead):
    """The BatchNorm is also reachable by a second name, which the forward calls it by."""

    def __init__(self) -> None:
        super().__init__()
        self.same_norm = self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.same_norm(self.conv(x)).mean((2, 3)))


class Unscaled(_ConvNormHead):
    """A BatchNorm without its affine (no weight, no bias) after a convolution without a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


class RefusesABias(nn.Conv2d):
    """Written for bias=False: a bias given to it after the fact makes it fail (or, with `wraps`, return a tuple)."""

    wraps = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return super().forward(x)
        if self.wraps:
            return (super().forward(x),)  # type: ignore[return-value]
        raise RuntimeError("this convolution takes no bias")


class BiasFree(_ConvNormHead):
    def __init__(self, wraps: bool) -> None:
        super().__init__()
        self.conv = RefusesABias(3, 8, 3, padding=1, bias=False)
        self.conv.wraps = wraps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("wraps", [False, True], ids=["raises", "returns-a-tuple"])
def test_a_convolution_that_fails_or_changes_with_a_bias_keeps_its_batchnorm(wraps: bool) -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(BiasFree(wraps))
    before = _scores(model, IMAGES)
    result = _fold(model, IMAGES)
    assert (result.folded, result.why) == (0, "none folded: 1 folds changed their layer's output")
    assert isinstance(model.norm, nn.BatchNorm2d) and model.conv.bias is None
    assert torch.equal(_scores(model, IMAGES), before)


class KeywordWeight(nn.Conv2d):
    """Calls conv2d with its weight by keyword (`by_keyword`) or as the second of exactly two positions."""

    by_keyword = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_keyword:
            return F.conv2d(x, weight=self.weight, bias=self.bias, padding=1)
        return F.conv2d(x, self.weight, bias=self.bias, padding=1)


class Nested(nn.Module):
    """The convolution one level down (block.conv), so its weight's owner is found by its whole path."""

    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.conv = KeywordWeight(3, 8, 3)
        self.block.conv.by_keyword = by_keyword
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "make",
    [SamePaddedNet, Aliased, Unscaled, lambda: Nested(by_keyword=True), lambda: Nested(by_keyword=False)],
    ids=["same-padding", "two-names", "no-affine", "weight-by-keyword", "weight-in-two-positions"],
)
def test_each_proven_pair_is_folded_everywhere_its_batchnorm_is_called(make: Callable[[], nn.Module]) -> None:
    """A convolution module that calls conv2d on its own weight (timm's same padding), by keyword or in two
    positions one module down; a BatchNorm by two names, or without its affine: each folds, with the model's
    scores."""
    torch.manual_seed(0)
    model = _randomise_statistics(make())
    before = _scores(model, IMAGES)
    result = _fold(model, IMAGES)
    assert result.folded == 1 and _norms(model) == 0
    assert torch.allclose(_scores(model, IMAGES), before, rtol=1e-4, atol=1e-5)


class ReadsRunningMean(_ConvNormHead):
    """Reads its BatchNorm's running mean (a buffer, not a parameter) beside the BatchNorm: a fold would change it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)) + self.norm.running_mean)


def test_a_batchnorm_whose_running_statistics_are_read_elsewhere_is_not_folded() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(ReadsRunningMean())
    result = _fold(model, IMAGES)
    assert result.folded == 0 and isinstance(model.norm, nn.BatchNorm2d)


class EveryPairing(nn.Module):
    """One pair the watched pass must keep, and one of each kind it must not: a convolution called twice, a
    BatchNorm called twice, a convolution sharing its weight, one whose output is read beside its BatchNorm, a
    convolution and a BatchNorm called by keyword (a hook sees no positional input), and a BatchNorm after an
    activation."""

    def __init__(self) -> None:
        super().__init__()
        self.plain, self.plain_norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.twice, self.twice_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.first, self.second, self.shared_norm = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.tied, self.tied_twin, self.tied_norm = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.tied_twin.weight = self.tied.weight
        self.read, self.read_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.keyword, self.keyword_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.after_act_norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.plain_norm(self.plain(x))
        x = self.twice_norm(self.twice(x)) + self.twice(x)
        x = self.shared_norm(self.first(x)) + self.shared_norm(self.second(x))
        x = self.tied_norm(self.tied(x)) + self.tied_twin(x)
        y = self.read(x)
        x = self.read_norm(y) + y
        x = self.keyword_norm(input=self.keyword(input=x))
        return self.after_act_norm(torch.relu(x)).mean((2, 3))


def _no_hooks_left(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_watched_pass_alone_keeps_only_a_pair_nothing_else_touches() -> None:
    """The watched half of the proof holds on its own (the static half is tested alone below): each pair it keeps
    was seen one call each, the weight its own, the output read by its BatchNorm alone; its hooks are all gone."""
    from harness.models.fold import _watch

    model = _randomise_statistics(EveryPairing())
    pairs, reference = _watch(model, IMAGES[:2, :, :8, :8], lambda output: output)
    assert [(pair.conv, pair.norm) for pair in pairs] == [(model.plain, model.plain_norm)]
    assert reference.shape == (2, 4) and _no_hooks_left(model)


def test_a_model_with_every_pairing_folds_its_one_plain_pair_and_keeps_its_scores() -> None:
    model = _randomise_statistics(EveryPairing())
    images = IMAGES[:2, :, :8, :8]
    before = _scores(model, images)
    assert _fold(model, images) == FoldResult(1, "1 BatchNorms folded into their convolutions")
    assert isinstance(model.plain_norm, nn.Identity) and _no_hooks_left(model)
    assert torch.allclose(_scores(model, images), before, rtol=1e-4, atol=1e-5)


class StaticCases(nn.Module):
    """Calls the static proof must never pair, traced but never run: a product with a convolution's weight, a
    convolution function on a top-level weight, on a linear layer's weight and on a transposed convolution's
    weight; and one plain pair it must find, after them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lin, self.transposed = nn.Conv2d(3, 3, 1), nn.Linear(3, 3), nn.ConvTranspose2d(3, 3, 1)
        self.w = nn.Parameter(torch.ones(3, 3, 1, 1))
        self.norms = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(4))
        self.plain, self.plain_norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norms[0](torch.mul(x, self.conv.weight))
        x = self.norms[1](F.conv2d(x, self.w))
        x = self.norms[2](F.conv2d(x, self.lin.weight))
        x = self.norms[3](F.conv2d(x, self.transposed.weight))
        return self.plain_norm(self.plain(x))


@pytest.mark.parametrize(
    ("model", "pairs"),
    [
        (StaticCases(), lambda m: {(m.plain, m.plain_norm)}),
        (Mixed(), lambda m: {(m.plain, m.plain_norm)}),  # not the called-twice, the acting, the standardised one
        (ReadTwice(), lambda m: set()),
        (EveryPairing(), lambda m: {(m.plain, m.plain_norm)}),  # a BatchNorm called by keyword: not proven
    ],
    ids=["weights-read-otherwise", "mixed", "read-twice", "every-pairing"],
)
def test_the_static_proof_alone_pairs_only_a_convolution_whose_output_only_its_batchnorm_reads(
    model: nn.Module, pairs: Callable[[nn.Module], set[tuple[nn.Module, nn.Module]]]
) -> None:
    from harness.models.fold import proven_pairs

    proven, why = proven_pairs(model.eval())
    assert why == "" and proven == {(id(conv), id(norm)) for conv, norm in pairs(model)}


class Untraceable(nn.Module):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.conv, self.norm, self.message = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(self.message)


@pytest.mark.parametrize(
    ("message", "shown"),
    [("", ""), ("first line\nsecond line", "first line"), ("x" * 200, "x" * 120)],
    ids=["empty", "two-lines", "long"],
)
def test_a_model_fx_cannot_trace_is_not_folded_saying_why_in_one_short_line(message: str, shown: str) -> None:
    assert _fold(Untraceable(message).eval(), IMAGES) == FoldResult(
        0, f"not folded: the model does not trace with torch.fx (ValueError: {shown}), so no fold is proven"
    )


class FailsOnceFolded(_ConvNormHead):
    """Runs only while its BatchNorm is one (a model that checks its own layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.norm, nn.BatchNorm2d):
            raise RuntimeError("my BatchNorm is gone")
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


class WrongHead(_ConvNormHead):
    """Traces, but fails on every input: its head takes another width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.norm(self.conv(x)).mean((2, 3)), torch.ones(5, 3))


def test_each_way_a_fold_ends_is_reported_word_for_word_and_the_model_left_as_written() -> None:
    from torch.nn.modules import module as torch_module

    assert _fold(nn.Sequential(nn.Conv2d(3, 4, 1)), IMAGES) == FoldResult(0, "no BatchNorm to fold")
    hooked = "not folded: module hooks are registered globally (they would see other numbers)"
    for register in (torch_module.register_module_forward_hook, torch_module.register_module_forward_pre_hook):
        handle = register(lambda *_: None)
        try:
            model = _randomise_statistics(Plain())
            assert _fold(model, IMAGES) == FoldResult(0, hooked) and isinstance(model.norm, nn.BatchNorm2d)
        finally:
            handle.remove()
    assert _fold(_randomise_statistics(WrongHead()), IMAGES) == FoldResult(
        0, "not folded: the model failed on the check images"
    )
    assert _fold(_randomise_statistics(ReadTwice()), IMAGES) == FoldResult(
        0, "no BatchNorm that only a convolution's output feeds, and nothing else reads"
    )
    model = _randomise_statistics(FailsOnceFolded())
    weight, bias = model.conv.weight.detach().clone(), model.conv.bias
    assert _fold(model, IMAGES) == FoldResult(0, "none folded: the folded model failed (RuntimeError)")
    assert isinstance(model.norm, nn.BatchNorm2d) and torch.equal(model.conv.weight, weight) and model.conv.bias is bias


class TwoShiftedOnePlain(nn.Module):
    """Two folds that move their layer (half precision, as above) and one that does not."""

    def __init__(self) -> None:
        super().__init__()
        self.shifted = nn.ModuleList([Shifted(), Shifted()])
        self.plain, self.plain_norm = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifted[0](x) + self.shifted[1](x) + self.plain_norm(self.plain(x)).mean((2, 3))


def test_folds_put_back_are_counted_beside_those_kept() -> None:
    torch.manual_seed(0)
    model = _randomise_statistics(TwoShiftedOnePlain()).half()
    with torch.no_grad():  # the plain pair an identity: exact in half precision too
        model.plain_norm.running_mean.zero_(), model.plain_norm.running_var.fill_(1 - model.plain_norm.eps)
        model.plain_norm.weight.fill_(1), model.plain_norm.bias.zero_()
    result = fold_batchnorm(model, IMAGES[:1, :, :16, :16].half(), lambda output: output.float())
    assert result == FoldResult(
        1, "1 BatchNorms folded into their convolutions; 2 left as written (folding changed their layer's output)"
    )


def _moved_after_the_first(reference: torch.Tensor, delta: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """Scores that are `reference` on the watched pass and `reference + delta` on the folded model's."""
    calls = []

    def scores(_: object) -> torch.Tensor:
        calls.append(1)
        return reference if len(calls) == 1 else reference + delta

    return scores


@pytest.mark.parametrize(
    ("largest", "where", "moved", "kept"),
    [
        (1000.0, 0, 0.9e-4 * 1000, True),  # the absolute tolerance grows with the largest score
        (1000.0, 0, 1.1e-4 * 1000, False),
        (0.5, 0, 0.9e-4, True),  # but never shrinks under 1e-4
        (0.5, 0, 1.5e-4, False),
        (1000.0, 1, 1000 * 1e-3 + 0.9e-4 * 1000, True),  # and the relative one holds on top of it, at 1e-3
        (1000.0, 1, 1000 * 1e-3 + 1.1e-4 * 1000, False),
    ],
)
def test_the_whole_models_check_allows_what_outputs_same_allows_and_no_more(
    largest: float, where: int, moved: float, kept: bool
) -> None:
    """The folded model's scores against the written model's: within SAME_RTOL of each score plus SAME_ATOL of the
    largest (at least 1), on a score of 0 (where 0) or on the largest (where 1)."""
    reference = torch.tensor([[0.0, largest, -largest / 2]])
    delta = torch.zeros_like(reference)
    delta[0, where] = moved
    model = _randomise_statistics(Plain())
    result = fold_batchnorm(model, IMAGES[:1], _moved_after_the_first(reference, delta))
    assert result.folded == (1 if kept else 0), result


def test_a_model_with_no_scores_to_compare_folds() -> None:
    empty = torch.zeros(1, 0)
    result = fold_batchnorm(_randomise_statistics(Plain()), IMAGES[:1], _moved_after_the_first(empty, empty))
    assert result.folded == 1


@pytest.mark.parametrize(
    ("func", "reads"),
    [
        (torch.Tensor.add, True),
        (torch.Tensor.size, False),
        (torch.Tensor.shape.__get__, False),  # an attribute read through the mode: metadata
        (torch.Tensor.grad.__get__, True),
        (functools.partial(torch.add), True),  # no name: a read
        (types.SimpleNamespace(__name__="__get__", __self__=object()), True),  # a getter of nothing named
        (types.SimpleNamespace(__name__="__get__"), True),  # a getter bound to nothing
    ],
)
def test_only_calls_that_read_a_tensors_metadata_are_no_reads_of_its_values(func: object, reads: bool) -> None:
    from harness.models.fold import _reads_values

    assert _reads_values(func) is reads  # type: ignore[arg-type]


def test_the_watched_pass_holds_no_activation_past_its_life() -> None:
    """Each block's input is freed as the model itself frees it, before the pass ends: the pass kept every
    convolution's input and output for all check images (570 MB of a Lite0 run's peak)."""
    from harness.models.fold import _watch

    blocks = [nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()) for _ in range(4)]
    model = _randomise_statistics(nn.Sequential(*blocks))
    alive: list[list[bool]] = []
    refs: list[weakref.ref[torch.Tensor]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if len(inputs[0]) == 1:  # the layer's check, calling the convolution again on the first image
            return
        alive.append([ref() is not None for ref in refs])
        refs.append(weakref.ref(inputs[0]))

    handles = [block[0].register_forward_pre_hook(record) for block in blocks]
    try:
        pairs, _ = _watch(model, IMAGES[:2, :, :8, :8].clone(), lambda output: output)
    finally:
        for handle in handles:
            handle.remove()
    assert len(pairs) == 4 and all(pair.agrees for pair in pairs)
    assert alive[3] == [True, False, False]  # the sample (its caller holds it), then two freed blocks' inputs


def test_a_convolution_without_a_batchnorm_frees_its_input_with_its_output() -> None:
    """The pass holds a convolution's input only while its output lives (to check a fold when a BatchNorm reads
    it): where none does, both go when the model lets the output go."""
    from harness.models.fold import _watch

    model = nn.Sequential(*(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()) for _ in range(4))).eval()
    alive: list[list[bool]] = []
    refs: list[weakref.ref[torch.Tensor]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        alive.append([ref() is not None for ref in refs])
        refs.append(weakref.ref(inputs[0]))

    handles = [block[0].register_forward_pre_hook(record) for block in model]
    try:
        assert _watch(model, IMAGES[:2, :, :8, :8].clone(), lambda output: output)[0] == []
    finally:
        for handle in handles:
            handle.remove()
    assert alive[3] == [True, False, False]


class TwoNorms(_ConvNormHead):
    """One convolution's output read by two BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.other = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.norm(y) + self.other(y)).mean((2, 3)))


class UnfoldableFirst(nn.Module):
    """A pair the static proof must refuse (a BatchNorm that does more), then one it must find."""

    def __init__(self) -> None:
        super().__init__()
        self.acting, self.acting_norm = nn.Conv2d(3, 3, 1), NormAct(3)
        self.plain, self.plain_norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain_norm(self.plain(self.acting_norm(self.acting(x)))).mean((2, 3))


def test_two_batchnorms_on_one_output_are_no_pair_and_the_proof_goes_on_past_a_refused_pair() -> None:
    from harness.models.fold import _watch, proven_pairs

    model = _randomise_statistics(TwoNorms())
    assert _watch(model, IMAGES[:2], lambda output: output)[0] == []
    model = _randomise_statistics(UnfoldableFirst())
    assert proven_pairs(model) == ({(id(model.plain), id(model.plain_norm))}, "")
