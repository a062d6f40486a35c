"""One run, start to finish: images -> workers -> device -> model -> label map -> streamed CSV.

Everything that can be wrong with the inputs (folder, output, model, device) is checked before the first image
is decoded, so a mistake costs seconds, not a run.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from harness.config import Config
from harness.devices import DeviceNormalizer, DevicePlan, inference_context, plan_devices, prepare_model
from harness.errors import InputError, ModelError, PipelineError, TooManyFailuresError
from harness.headstart import HeadStart
from harness.host import usable_cpus
from harness.images import IMAGE_EXTENSIONS, DecodeLimits, ImageFile, discover, shard
from harness.labels import LabelMap, make_label_map
from harness.loader import Batch, ImageDataset, fit_to_shm, make_loader, shm_free_bytes
from harness.models import load_custom_transform, load_model
from harness.onnx_model import OnnxModule
from harness.probs import ProbabilityRecorder
from harness.report import RunReport, progress_bar, say
from harness.resume import resume_point
from harness.speed import tune_process
from harness.writer import AtomicCsvWriter, check_writable, partial_path


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


def loader_timeout(decode_timeout: float) -> float:
    """How long to wait for one batch before declaring a worker hung. Each image is already cut off at
    decode_timeout inside the worker, so only a worker stuck in native code or killed outright gets here."""
    return max(300.0, 5 * decode_timeout)


@dataclass
class Forward:
    """Runs batches through the model, halving the piece size for good after a CUDA out-of-memory error.

    With `pad` (a compiled model), a short piece is padded with blank images to the piece size, so the compiled
    graph sees one shape and never recompiles for the last batch.
    """

    model: nn.Module
    normalize: DeviceNormalizer
    plan: DevicePlan
    piece: int
    pad: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(images):
            piece = images[start : start + self.piece]
            count = len(piece)
            if self.pad and count < self.piece:
                piece = torch.cat([piece, piece.new_zeros((self.piece - count, *piece.shape[1:]))])
            try:
                with inference_context(self.plan):
                    outputs.append(as_logits(self.model(self.normalize(piece)), len(piece))[:count])
            except torch.OutOfMemoryError:
                if self.piece == 1:
                    raise ModelError("the device ran out of memory on a single image") from None
                self.piece = max(1, self.piece // 2)
                if self.plan.device.type == "cuda":
                    torch.cuda.empty_cache()
                say(f"out of device memory: running batches in pieces of {self.piece} from now on")
                continue
            start += count
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def compiled_forward(forward: Forward, blank: torch.Tensor) -> Forward:
    """`forward` with its model under torch.compile, compiled now on a blank batch so the wait and any failure
    come before the first image; where it cannot compile, the eager `forward` with a one-line warning."""
    if isinstance(forward.model, (nn.DataParallel, OnnxModule)):
        say("--compile applies to one PyTorch model on one device: running eagerly (use torchrun for several GPUs)")
        return forward
    started = time.perf_counter()
    try:
        compiled = dataclasses.replace(forward, model=torch.compile(forward.model), pad=True)
        compiled(blank.expand(forward.piece, *blank.shape).to(forward.plan.device))
    except Exception as error:  # a missing C++ compiler, an operator the compiler cannot take, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        say(f"torch.compile failed ({type(error).__name__}: {first_line[:200]}): running eagerly")
        return forward
    say(f"compiled the model in {time.perf_counter() - started:.1f} s")
    return compiled


def run(config: Config, head: HeadStart | None = None) -> RunReport:
    """Classify the images; with a head start (already decoding, see harness/headstart.py) its files are the
    run's files and its batches come first."""
    report = RunReport(config=config.to_dict())
    start = clock = time.perf_counter()
    if head is not None:
        files = head.files
    else:
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
    dataset = ImageDataset(files, config.preprocess, custom, DecodeLimits.of(config))
    num_classes = probe_classes(model, normalize, dataset.blank, plan)
    label_map, warnings = make_label_map(config.label_map, num_classes, config.topk, config.softmax)
    for warning in warnings:
        say(warning)
    batch_size = config.batch_size * max(1, len(plan.gpu_ids))
    head_images = head.stop(batch_size) if head is not None else 0  # none when resuming: it never runs then
    workers = usable_cpus() if config.workers is None else config.workers
    batch_bytes = dataset.blank.numel() * dataset.blank.element_size() * batch_size
    workers, prefetch, shm_warning = fit_to_shm(workers, batch_bytes, shm_free_bytes())
    if shm_warning:
        say(shm_warning)

    done = 0
    if config.resume:
        keys = [image.key for image in files]
        row_width = 1 + len(label_map.failure_fields)
        done, report.failures = resume_point(config.output_file, config.errors_csv, keys, row_width, batch_size)
        say(f"resuming after {done} of {len(files)} images" if done else "nothing to resume: starting afresh")
    elif partial_path(config.output_file).exists():
        say("replacing an earlier run's partial file (--resume would have continued it)")
    report.images = done
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
        "resumed_rows": done,
        "head_start_images": head_images,
        "tuning": tuning,
        "output": str(config.output_file),
    }
    say(
        f"{len(files)} images, model {loaded.class_name} ({num_classes} classes), {plan.device}"
        f"{f' x{len(plan.gpu_ids)}' if len(plan.gpu_ids) > 1 else ''}, batch {batch_size}, {workers} workers, "
        f"label map {label_map.name}"
    )

    remaining = Subset(dataset, range(done + head_images, len(files)))  # keeps the indices rows are keyed by
    timeout = loader_timeout(config.decode_timeout)
    loader = make_loader(remaining, batch_size, workers, prefetch, plan.device.type == "cuda", timeout)
    dataset.watch(workers)
    # The workers start now, beside the head start's last batches (none to start when it covered every image).
    batches: Iterable[Batch] = iter(loader) if len(remaining) else iter(())
    if head is not None:
        batches = itertools.chain(head_batches(head, timeout), batches)
    forward = Forward(model, normalize, plan, batch_size)
    if config.compile:
        forward = compiled_forward(forward, dataset.blank)
    recorder = ProbabilityRecorder(label_map.softmax) if config.save_probs else None
    try:
        try:
            _classify(config, files, done, batches, forward, label_map, report, recorder)
        except RuntimeError as error:  # PyTorch raises a worker's death wherever the main process happens to be
            if "DataLoader" not in str(error):
                raise
            in_hand = ", ".join(dataset.decoding_now()) or "unknown"
            raise PipelineError(
                f"a decoding worker died or stopped answering ({str(error).splitlines()[0].strip()}) "
                f"while decoding: {in_hand}. Finished rows are kept in {partial_path(config.output_file)}: "
                "remove or fix the file and rerun with --resume"
            ) from None
    except BaseException:
        report.status = "interrupted"
        report.timed("total_s", start)
        report.write(config.run_json)
        raise
    report.timed("classify_s", clock)
    report.timed("total_s", start)
    return finish(config, report, len(files))


def head_batches(head: HeadStart, timeout: float) -> Iterator[Batch]:
    for indices, images, errors in head.batches(timeout):
        yield Batch(indices, torch.from_numpy(images), errors)


def finish(config: Config, report: RunReport, images: int) -> RunReport:
    """Judge the failures against --max-failures, write run.json, and fail the run if there were too many."""
    limit = failure_limit(config.max_failures, images)
    report.status = "too many failures" if limit is not None and report.failures > limit else "complete"
    report.write(config.run_json)
    if report.status != "complete":
        raise TooManyFailuresError(
            f"{report.failures} of {images} images failed, more than --max-failures allows ({limit}); "
            f"the predictions were written, and {config.errors_csv} says why each failed"
        )
    return report


def _classify(
    config: Config,
    files: list[ImageFile],
    done: int,
    batches: Iterable[Batch],
    forward: Forward,
    label_map: LabelMap,
    report: RunReport,
    recorder: ProbabilityRecorder | None,
) -> None:
    with (
        AtomicCsvWriter(config.output_file, append=done > 0) as predictions,
        AtomicCsvWriter(config.errors_csv, append=done > 0) as errors,
        progress_bar(len(files), config.progress) as bar,
    ):
        bar.update(done)
        for batch in batches:
            images = batch.images.to(forward.plan.device, non_blocking=True)
            outputs = forward(images)
            rows = label_map(outputs)
            if recorder is not None:
                recorder.add([files[i].key for i in batch.indices], label_map.scores(outputs), batch.errors)
            for index, error, fields in zip(batch.indices, batch.errors, rows, strict=True):
                key = files[index].key
                if error:
                    predictions.write([key, *label_map.failure_fields])
                    errors.write([key, error])
                    report.failures += 1
                else:
                    predictions.write([key, *fields])
            predictions.flush()
            errors.flush()
            report.images += len(batch.indices)
            bar.update(len(batch.indices))
        if recorder is not None and config.save_probs is not None:
            recorder.save(config.save_probs)
        predictions.commit()
        errors.commit()
    if report.failures:
        say(f"{report.failures} image(s) could not be read; reasons in {config.errors_csv}")
