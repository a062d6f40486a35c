"""The worker/device preprocessing split must equal torchvision's float pipeline."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

from harness.config import Preprocess
from harness.pipeline.decode import load_rgb
from harness.pipeline.devices import DeviceNormalizer
from harness.pipeline.transforms import geometry
from tests.helpers import SAMPLES

IMAGES = ["coffee.png", "grace_hopper.jpg", "camera.png", "9419e565a04b4fd.png"]


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize(
    ("interpolation", "mode"), [("bilinear", T.InterpolationMode.BILINEAR), ("bicubic", T.InterpolationMode.BICUBIC)]
)
def test_geometry_matches_torchvision_resize_and_centre_crop(name: str, interpolation: str, mode: object) -> None:
    image = load_rgb(str(SAMPLES / name))
    pre = Preprocess(input_size=224, resize_size=256, interpolation=interpolation)
    expected = T.PILToTensor()(T.CenterCrop(224)(T.Resize(256, interpolation=mode)(image)))
    assert torch.equal(torch.from_numpy(geometry(image, pre)), expected)


def test_normaliser_matches_to_tensor_and_normalize() -> None:
    image = load_rgb(str(SAMPLES / "coffee.png"))
    pre = Preprocess()
    uint8 = torch.from_numpy(geometry(image, pre)).unsqueeze(0)
    reference = T.Normalize(pre.mean, pre.std)(T.ToTensor()(T.CenterCrop(224)(T.Resize(224)(image)))).unsqueeze(0)
    ours = DeviceNormalizer(pre, torch.device("cpu"), torch.float32, channels_last=False)(uint8)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bgr_zero_to_one_without_normalisation() -> None:
    """The AISafety contract: BGR order, values 0..1, no mean/std."""
    batch = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    pre = Preprocess(channel_order="bgr", value_scale=1.0, mean=None, std=None)
    out = DeviceNormalizer(pre, torch.device("cpu"), torch.float32, channels_last=False)(batch)
    assert torch.allclose(out.flatten(), torch.tensor([30, 20, 10]) / 255.0)


def test_zero_to_255_scale_with_model_mean_and_std() -> None:
    batch = torch.tensor([127, 255, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    pre = Preprocess(value_scale=255.0, mean=(127, 127, 127), std=(128, 128, 128))
    out = DeviceNormalizer(pre, torch.device("cpu"), torch.float32, channels_last=True)(batch)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, -127 / 128]))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_float_batches_from_a_model_transform_pass_through() -> None:
    batch = torch.rand(2, 3, 4, 4)
    out = DeviceNormalizer(Preprocess(), torch.device("cpu"), torch.float32, channels_last=False)(batch)
    assert torch.equal(out, batch)
