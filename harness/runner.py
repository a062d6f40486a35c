"""One run, start to finish: images -> workers -> device -> model -> label map -> streamed CSV.

Everything that can be wrong with the inputs (folder, output, model, device) is checked before the first image
is decoded, so a mistake costs seconds, not a run.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from harness.config import Config
from harness.devices import DevicePlan, inference_context, plan_devices, prepare_model, usable_cpus
from harness.distributed import shard
from harness.errors import InputError, ModelError, TooManyFailuresError
from harness.images import IMAGE_EXTENSIONS, discover
from harness.labels import LabelMap, make_label_map
from harness.loader import ImageDataset, fit_to_shm, make_loader, shm_free_bytes
from harness.models import load_custom_transform, load_model
from harness.report import RunReport, progress_bar, say
from harness.speed import tune_process
from harness.transforms import DeviceNormalizer
from harness.writer import AtomicCsvWriter, check_writable


def as_logits(output: Any, batch: int) -> torch.Tensor:
    """The model's scores as N x C: plain tensors, the first of a tuple, or a dict's 'logits' (Hugging Face)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    elif hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"the model returned {type(output).__name__}; it must return a tensor of N x C scores")
    if output.dim() == 1 and output.shape[0] == batch:
        output = output.unsqueeze(1)
    if output.dim() != 2 or output.shape[0] != batch:
        raise ModelError(f"the model returned shape {tuple(output.shape)} for {batch} images; expected ({batch}, C)")
    return output


def probe_classes(model: nn.Module, normalize: DeviceNormalizer, blank: torch.Tensor, plan: DevicePlan) -> int:
    """Run one blank image through the model to learn its output width before any real work."""
    try:
        with inference_context(plan):
            output = model(normalize(blank.unsqueeze(0).to(plan.device)))
    except Exception as error:
        raise ModelError(
            f"the model failed on one {tuple(blank.shape)} input image: {type(error).__name__}: {error}. "
            "Check input_size in model/config.yaml."
        ) from None
    return as_logits(output, 1).shape[1]


def failure_limit(max_failures: float | None, images: int) -> int | None:
    if max_failures is None:
        return None
    return int(max_failures) if max_failures >= 1 or max_failures == 0 else int(max_failures * images)


def run(config: Config) -> RunReport:
    report = RunReport(config=config.to_dict())
    start = clock = time.perf_counter()
    files = shard(discover(config.input_dir), config.rank, config.world_size, config.batch_size)
    if not files and config.world_size == 1:
        raise InputError(
            f"no images in {config.input_dir} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            "any letter case)"
        )
    check_writable(config.output_file)
    tuning = tune_process(config)
    clock = report.timed("discover_s", clock)

    loaded = load_model(config)
    custom = load_custom_transform(config)
    plan = plan_devices(config)
    model = prepare_model(loaded.module, plan)
    normalize = DeviceNormalizer(config.preprocess, plan.device, plan.input_dtype, plan.channels_last)
    dataset = ImageDataset(files, config.preprocess, custom)
    num_classes = probe_classes(model, normalize, dataset.blank, plan)
    label_map, warnings = make_label_map(config.label_map, num_classes, config.topk, config.softmax)
    for warning in warnings:
        say(warning)
    batch_size = config.batch_size * max(1, len(plan.gpu_ids))
    workers = usable_cpus() if config.workers is None else config.workers
    batch_bytes = dataset.blank.numel() * dataset.blank.element_size() * batch_size
    workers, prefetch, shm_warning = fit_to_shm(workers, batch_bytes, shm_free_bytes())
    if shm_warning:
        say(shm_warning)
    clock = report.timed("load_model_s", clock)
    report.details = {
        "model": {
            "class": loaded.class_name,
            "source": loaded.source,
            "checkpoint": loaded.checkpoint,
            "parameters": loaded.parameters,
            "classes": num_classes,
            "transform": "model folder's data_transform_description.py" if custom else "harness",
        },
        "label_map": label_map.name,
        "devices": plan.describe(),
        "workers": workers,
        "prefetch_batches": prefetch if workers else 0,
        "batch_size_total": batch_size,
        "tuning": tuning,
        "output": str(config.output_file),
    }
    say(
        f"{len(files)} images, model {loaded.class_name} ({num_classes} classes), {plan.device}"
        f"{f' x{len(plan.gpu_ids)}' if len(plan.gpu_ids) > 1 else ''}, batch {batch_size}, {workers} workers, "
        f"label map {label_map.name}"
    )

    loader = make_loader(dataset, batch_size, workers, prefetch, pin_memory=plan.device.type == "cuda")
    try:
        _classify(config, files, loader, model, normalize, label_map, plan, report)
    except BaseException:
        report.status = "interrupted"
        report.timed("total_s", start)
        report.write(config.run_json)
        raise
    clock = report.timed("classify_s", clock)
    report.timed("total_s", start)
    limit = failure_limit(config.max_failures, len(files))
    report.status = "too many failures" if limit is not None and report.failures > limit else "complete"
    report.write(config.run_json)
    if report.status != "complete":
        raise TooManyFailuresError(
            f"{report.failures} of {len(files)} images failed, more than --max-failures allows ({limit}); "
            f"the predictions were written, and {config.errors_csv} says why each failed"
        )
    return report


def _classify(
    config: Config,
    files: list,
    loader: Any,
    model: nn.Module,
    normalize: DeviceNormalizer,
    label_map: LabelMap,
    plan: DevicePlan,
    report: RunReport,
) -> None:
    with (
        AtomicCsvWriter(config.output_file) as predictions,
        AtomicCsvWriter(config.errors_csv) as errors,
        progress_bar(len(files), config.progress) as bar,
    ):
        for batch in loader:
            images = batch.images.to(plan.device, non_blocking=True)
            with inference_context(plan):
                outputs = as_logits(model(normalize(images)), len(batch.indices))
            rows = label_map(outputs)
            for index, error, fields in zip(batch.indices, batch.errors, rows, strict=True):
                key = files[index].key
                if error:
                    predictions.write([key, *label_map.failure_fields])
                    errors.write([key, error])
                    report.failures += 1
                else:
                    predictions.write([key, *fields])
            report.images += len(batch.indices)
            bar.update(len(batch.indices))
        predictions.commit()
        errors.commit()
    if report.failures:
        say(f"{report.failures} image(s) could not be read; reasons in {config.errors_csv}")
