"""The model put where it runs, ready for the first batch: on its device(s), its BatchNorms folded where that is
proven to change nothing, its output width probed, its memory layout and its engine settled, and the forward pass
that feeds it batches. The run and scripts/bench.py place a model through this one function, so what is measured is
what runs.

Every speed-up is checked on the same few real images of the run (loader.check_sample), not on a random tensor:
a model's branches follow its input, and random pixels may never reach the branch a speed-up would break.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.config import Config
from harness.models.fold import FoldResult
from harness.models.load import LoadedModel
from harness.pipeline.devices import fold_sample, plan_devices, prepare_model
from harness.pipeline.engine import EngineChoice, settle_engine
from harness.pipeline.forward import Forward, first_piece, probe_classes
from harness.pipeline.layout import LAYOUTS, LayoutChoice, settle_layout
from harness.pipeline.loader import ImageDataset, check_sample


@dataclass(frozen=True)
class Placement:
    forward: Forward  # the model, its device plan (forward.plan) and its input normaliser, in pieces
    classes: int  # the output width every batch must keep
    batch_size: int  # images a step takes, over every GPU
    folded: FoldResult
    layout: LayoutChoice
    engine: EngineChoice
    sample: object  # the check images (N x 3 x H x W as the decoders make them), for --compile's check after

    def describe_for_resume(self) -> dict[str, object]:
        """What the run resolved `auto` and the defaults to, that moves a row's numbers (the resume record)."""
        plan = self.forward.plan
        return {
            "device": plan.device.type,
            "gpus": len(plan.gpu_ids),
            "batch_size_total": self.batch_size,
            "channels_last": plan.channels_last,
            "torch_threads": torch.get_num_threads(),
            "batchnorms_folded": self.folded.folded,
            "engine": self.engine.engine,
        }


def place_model(config: Config, loaded: LoadedModel, dataset: ImageDataset, images: int) -> Placement:
    """The loaded model made ready for a run of `images` images drawn from `dataset`: what may be done to it is
    its kind's to say (harness/models/kinds.py)."""
    plan = plan_devices(config)
    sample = check_sample(dataset)
    model, folded = prepare_model(loaded.module, plan, fold_sample(config, plan, sample))
    classes = probe_classes(model, plan.normalizer(config.preprocess), dataset.blank, plan)
    batch_size = config.batch_size * max(1, len(plan.gpu_ids))
    graph = loaded.kind.torch_graph
    runtime = None if graph else loaded.class_name
    plan, layout = settle_layout(config, model, plan, sample, batch_size, images, runtime)
    torch_ms = layout.ms_per_image.get(LAYOUTS[plan.channels_last])  # timed by the layout's trial, this run
    runs, plan, engine = settle_engine(config, model, plan, sample, images, runtime, loaded.files_read, torch_ms)
    normalize = plan.normalizer(config.preprocess)
    graph = graph and engine.engine == "torch"
    forward = Forward(runs, normalize, plan, first_piece(plan, batch_size), classes, torch_graph=graph)
    return Placement(forward, classes, batch_size, folded, layout, engine, sample)
