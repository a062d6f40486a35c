"""The worker/device preprocessing split must equal torchvision's float pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers.image_transforms import center_crop as hf_center_crop
from transformers.image_transforms import resize as hf_resize
from transformers.image_utils import PILImageResampling

from harness.config import Preprocess
from harness.pipeline.decode import load_rgb
from harness.pipeline.devices import DeviceNormalizer
from harness.pipeline.transforms import center_crop, geometry
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


def odd_margins() -> Image.Image:
    """300 x 260 with a 221 crop: margins of 79 and 39, halves of 39.5 and 19.5, which round (to even) up to 40 and
    20 and floor down to 39 and 19: the two offsets give different pixels on both axes."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))


def test_the_crop_offset_places_the_crop_as_torchvision_rounds_or_as_hugging_face_floors() -> None:
    image = odd_margins()
    rounded = np.asarray(center_crop(image, 221))
    floored = np.asarray(center_crop(image, 221, "floor"))
    assert np.array_equal(rounded, T.CenterCrop(221)(image))
    assert np.array_equal(floored, hf_center_crop(np.asarray(image), (221, 221), input_data_format="channels_last"))
    assert not np.array_equal(rounded, floored)


def test_a_hugging_face_preprocessing_crops_with_its_floor_and_squashes_as_its_resize() -> None:
    image = odd_margins()
    cropped = geometry(image, Preprocess(input_size=221, resize_size=260, crop_offset="floor"))
    expected = hf_center_crop(np.asarray(image), (221, 221), input_data_format="channels_last")
    assert np.array_equal(cropped, expected.transpose(2, 0, 1))
    squashed = geometry(image, Preprocess(input_size=224, resize_mode="squash"))  # bilinear: not Pillow's default
    resized = hf_resize(
        np.asarray(image), (224, 224), resample=PILImageResampling.BILINEAR, input_data_format="channels_last"
    )
    assert squashed.dtype == np.uint8
    assert np.array_equal(squashed, resized.transpose(2, 0, 1))
    square = Image.fromarray(np.asarray(image)[:224, :224])
    assert np.array_equal(
        geometry(square, Preprocess(input_size=224, resize_mode="squash")), np.asarray(square).transpose(2, 0, 1)
    )


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
