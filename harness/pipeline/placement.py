"""The model put where it runs, ready for the first batch: on its device(s), its output width probed, its engine
weighed, and where PyTorch may run it, its BatchNorms folded where that is proven to change nothing, its memory
layout settled and its engine settled against PyTorch at its fastest; and the forward pass that feeds it batches. The
run and scripts/bench.py place a model through this one function, so what is measured is what runs.

Every speed-up is checked on the same few real images of the run (loader.check_sample), not on a random tensor:
a model's branches follow its input, and random pixels may never reach the branch a speed-up would break.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.config import Config
from harness.models.fold import FoldResult
from harness.models.load import LoadedModel
from harness.pipeline.devices import DevicePlan, fold_sample, on_device, plan_devices, prepare_model
from harness.pipeline.engine import EngineChoice, Weighed, keep_export, settle_engine, weigh_engine
from harness.pipeline.forward import Forward, first_piece, probe_classes
from harness.pipeline.layout import LAYOUTS, LayoutChoice, settle_layout
from harness.pipeline.loader import ImageDataset, check_sample

# What a run in onnxruntime records for PyTorch's speed-ups: onnxruntime runs an export of the model as written and
# makes its own fusions and layout, so a resumed run records alike whether they were made to time PyTorch or not.
EXPORT_FOLD = FoldResult(0, "onnxruntime runs an export of the model as written, and fuses its BatchNorms itself")
EXPORT_LAYOUT = "onnxruntime runs the model and chooses its layout"


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
    model = on_device(loaded.module, plan)
    classes = probe_classes(model, plan.normalizer(config.preprocess), dataset.blank, plan)
    batch_size = config.batch_size * max(1, len(plan.gpu_ids))
    graph = loaded.kind.torch_graph
    runtime = None if graph else loaded.class_name
    weighed = weigh_engine(config, model, plan, sample, images, runtime, loaded.files_read)
    if weighed.in_onnxruntime:
        runs, plan, engine = settle_engine(weighed, model, plan, config.preprocess, sample)
        folded, layout = EXPORT_FOLD, LayoutChoice(False, {}, EXPORT_LAYOUT)
    else:
        settled = _speed_ups_then_engine(config, model, plan, sample, (batch_size, images), weighed, runtime)
        runs, plan, folded, layout, engine = settled
    engine = keep_export(weighed, engine)
    normalize = plan.normalizer(config.preprocess)
    graph = graph and engine.engine == "torch"
    forward = Forward(runs, normalize, plan, first_piece(plan, batch_size), classes, torch_graph=graph)
    return Placement(forward, classes, batch_size, folded, layout, engine, sample)


def _speed_ups_then_engine(
    config: Config,
    model: nn.Module,
    plan: DevicePlan,
    sample: torch.Tensor,
    sizes: tuple[int, int],
    weighed: Weighed,
    runtime: str | None,
) -> tuple[nn.Module, DevicePlan, FoldResult, LayoutChoice, EngineChoice]:
    """PyTorch's speed-ups made (the folds, the layout: `sizes` is the batch and the run's images), then the engine
    settled against PyTorch at its fastest where the weighing left it open; a run that ends in onnxruntime records
    what one settled at once does."""
    batch_size, images = sizes
    model, folded = prepare_model(model, plan, fold_sample(config, plan, sample))
    plan, layout = settle_layout(config, model, plan, sample, batch_size, images, runtime)
    torch_ms = layout.ms_per_image.get(LAYOUTS[plan.channels_last])  # timed by the layout's trial, this run
    runs, plan, engine = settle_engine(weighed, model, plan, config.preprocess, sample, torch_ms)
    if runs is weighed.module:  # onnxruntime runs the export
        folded, layout = EXPORT_FOLD, LayoutChoice(False, layout.ms_per_image, EXPORT_LAYOUT, layout.trial_s)
    return runs, plan, folded, layout, engine
