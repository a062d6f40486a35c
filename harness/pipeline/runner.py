"""One run in two steps: `prepare` checks and loads everything the run needs and returns its plan, before the first
image is decoded, so a mistake costs seconds, not a run; `RunPlan.classify` then streams the images through the
workers, the device, the model and the label map into the CSV.

The caller (harness/cli.py, or harness/pipeline/distributed.py for a torchrun rank) chooses the files once and
judges the run with `finish` once.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from harness.config import Config
from harness.console import progress_bar, say
from harness.errors import ModelError, OutputError, PipelineError, is_dataloader_failure, is_shared_memory_full
from harness.models.load import LoadedModel, load_model
from harness.pipeline.confine import current as current_confinement
from harness.pipeline.decode import ModelFailure, detect_border, load_rgb
from harness.pipeline.decode_options import Decoding
from harness.pipeline.devices import tune_process
from harness.pipeline.files import Discovery, ImageFile
from harness.pipeline.forward import Forward, compiled_forward
from harness.pipeline.headstart import HeadStart
from harness.pipeline.host import open_files_limit, release_freed_memory, usable_cpus
from harness.pipeline.loader import Batch, ImageDataset, fit_to_open_files, fit_to_shm, make_loader, shm_free_bytes
from harness.pipeline.placement import Placement, place_model
from harness.pipeline.resume import check_identity, record_identity, resume_point, run_identity
from harness.pipeline.tracker import DecoderTracker
from harness.results.contract import scorer_shaped
from harness.results.gate import remove_output
from harness.results.label_maps import OBJECTNET_MAPS
from harness.results.labels import LabelMap, make_label_map
from harness.results.outputs import ledger_path, record_path, run_outputs
from harness.results.probs import ProbabilityRecorder
from harness.results.report import SHOWN_PREPROCESSING, RunReport, describe_preprocessing, preprocessing_sources
from harness.results.verdict import judge
from harness.results.writer import AtomicCsvWriter, check_writable, flush_together, partial_path

NOT_FINITE = "the model's output is not a finite number (NaN or infinity)"


def _how_the_worker_failed(error: RuntimeError) -> str:
    """PyTorch's first line for a worker's failure. Its SIGCHLD handler says how a worker died ("killed by signal:
    Killed."), but when that lands while the main process waits for a batch, PyTorch re-raises it as "exited
    unexpectedly", the first kept as the cause: then the cause's line, which names the signal."""
    cause = error.__cause__
    shown = cause if cause is not None and is_dataloader_failure(cause) else error
    return str(shown).splitlines()[0].strip()


def loader_timeout(decode_timeout: float | None) -> float | None:
    """How long to wait for one batch before declaring a worker hung (None: as long as it takes, as asked with
    decode_timeout none). Each image is already cut off at decode_timeout inside the worker, so only a worker
    stuck in native code or killed outright gets here."""
    return None if decode_timeout is None else max(300.0, 5 * decode_timeout)


@dataclass
class RunPlan:
    """Everything decided before the first image: the files, the rows already done, where the batches come from,
    the forward pass, the label map, and the report filled in so far."""

    config: Config
    files: list[ImageFile]
    unreadable: list[tuple[str, str]]  # folders skipped: a line each in errors.csv, a failure each
    done: int
    batches: Iterable[Batch]
    forward: Forward
    label_map: LabelMap
    tracker: DecoderTracker
    recorder: ProbabilityRecorder | None
    report: RunReport
    started: float
    clock: float

    def classify(self) -> RunReport:
        """Every remaining image into the CSV; run.json is written here only when the run stops early."""
        config = self.config
        try:
            try:
                self._write_rows()
            except RuntimeError as error:  # PyTorch raises a worker's death wherever the main process happens to be
                if not is_dataloader_failure(error):
                    raise
                partial = partial_path(config.output_file)
                if any(is_shared_memory_full(link) for link in (error, error.__cause__) if link is not None):
                    free = shm_free_bytes()
                    room = f"{free // 2**20} MB free now" if free is not None else "its space unknown"
                    raise PipelineError(
                        f"a decoding process could not put its batch in shared memory (/dev/shm, {room}): give it "
                        f"more (docker run --shm-size=2g), or lower --batch-size or --workers; the finished rows "
                        f"are in {partial}: rerun with --resume"
                    ) from error
                what = f"died or stopped answering ({_how_the_worker_failed(error)})"
                raise self.tracker.decoder_failed(what, self.files, partial) from error
        except BaseException:
            self.report.status = "interrupted"
            self.report.timed("total_s", self.started)
            with contextlib.suppress(OutputError):  # the error that stopped the run is the one to report
                self.report.write(config.run_json)
            raise
        self.report.timed("classify_s", self.clock)
        self.report.timed("total_s", self.started)
        return self.report

    def _write_rows(self) -> None:
        config, files, report, label_map = self.config, self.files, self.report, self.label_map
        layout = label_map.layout
        with (
            AtomicCsvWriter(config.output_file, append=self.done > 0) as predictions,
            AtomicCsvWriter(config.errors_csv, append=self.done > 0) as errors,
            AtomicCsvWriter(ledger_path(config.output_file), append=self.done > 0) as ledger,
            progress_bar(len(files), config.progress) as bar,
        ):
            bar.update(self.done)
            for batch in self.batches:
                for index, error in zip(batch.indices, batch.errors, strict=True):
                    if isinstance(error, ModelFailure):
                        raise ModelError(
                            f"{error} (on {files[index].key}); the rows before it are in the .partial file"
                        )
                outputs = self.forward(batch.images.to(self.forward.plan.device, non_blocking=True))
                finite = torch.isfinite(outputs).all(dim=1).tolist()
                failed = [error or ("" if ok else NOT_FINITE) for error, ok in zip(batch.errors, finite, strict=True)]
                predicted = label_map(outputs)
                if self.recorder is not None:
                    self.recorder.add([files[i].key for i in batch.indices], label_map.scores(outputs), failed)
                for index, error, prediction in zip(batch.indices, failed, predicted, strict=True):
                    key = files[index].key
                    if error:
                        predictions.write(layout.failure(key))
                        errors.write([key, error])
                        report.failures += 1
                    else:
                        predictions.write(layout.format(key, prediction))
                for index, read in zip(batch.indices, batch.seen, strict=True):
                    ledger.write([files[index].key, read])
                flush_together((errors, ledger, predictions))  # a reason and an image's record are never missing
                report.images += len(batch.indices)
                bar.update(len(batch.indices))
            for folder, reason in self.unreadable:
                errors.write([folder, reason])
            report.failures += len(self.unreadable)
            if self.recorder is not None and config.save_probs is not None:
                self.recorder.save(config.save_probs)
            predictions.commit()
            errors.commit()
        if config.world_size == 1:  # a rank's records stay with its part: see distributed.reopen_finished_part
            remove_output(record_path(config.output_file))
            remove_output(partial_path(ledger_path(config.output_file)))
        if report.failures:
            say(f"{report.failures} image(s) or folder(s) failed; reasons in {config.errors_csv}")


def prepare(config: Config, found: Discovery, decoding: Decoding, head: HeadStart | None = None) -> RunPlan:
    """The run's plan, made in this order: the output checked, the model loaded and placed, the label map, the
    decoders, where a resumed run goes on; then the start-up lines and the batches. With a head start (already
    decoding the files, see harness/pipeline/headstart.py) its batches come first."""
    files = found.files
    started = time.perf_counter()
    report = _start_report(config, found)
    clock = report.timed("discover_s", started)
    loaded, dataset, placed = _load_and_place(config, decoding, files, report)
    label_map = _label_map(config, placed.classes, loaded.labels)
    head_images = head.stop(placed.batch_size) if head is not None else 0  # none when resuming: it never runs then
    release_freed_memory()  # before the workers fork (harness/pipeline/host.py)
    workers, prefetch = _decoders(config, dataset, placed.batch_size)
    identity = run_identity(
        config, report.model, loaded.files_read, placed.describe_for_resume(), run_outputs(config).files
    )
    done = _resume_or_start(config, files, identity, label_map, placed.batch_size, report)
    _describe(report, config, label_map, placed, workers=workers, prefetch=prefetch, head_images=head_images)
    clock = report.timed("load_model_s", clock)
    if config.rank == 0:  # under torchrun one rank speaks for all
        _announce(config, decoding, files, loaded.class_name, placed, label_map, report, resumed=done > 0)
    start = done + head_images
    batches, tracker = _batches(config, dataset, start, placed, workers=workers, prefetch=prefetch, head=head)
    return RunPlan(
        config=config,
        files=files,
        unreadable=found.unreadable,
        done=done,
        batches=batches,
        forward=compiled_forward(placed.forward, placed.sample) if config.compile else placed.forward,
        label_map=label_map,
        tracker=tracker,
        recorder=ProbabilityRecorder(label_map.softmax) if config.save_probs else None,
        report=report,
        started=started,
        clock=clock,
    )


def _start_report(config: Config, found: Discovery) -> RunReport:
    """run.json's report, begun once the output is known to take the run's files and the process is tuned."""
    check_writable(config.output_file, config.errors_csv, config.run_json)
    report = RunReport(
        config=config.to_dict(),
        output=str(config.output_file),
        total=len(found.files) + len(found.unreadable),
        confinement=current_confinement().describe(),
        skipped=found.skipped,
    )
    report.tuning = tune_process(config)
    return report


def _announce(
    config: Config,
    decoding: Decoding,
    files: list[ImageFile],
    model: str,
    placed: Placement,
    label_map: LabelMap,
    report: RunReport,
    *,
    resumed: bool,
) -> None:
    """The start-up lines: what runs where, the preprocessing and where it came from, and a hint where the images
    look unlike what the settings expect."""
    plan = placed.forward.plan
    say(
        f"{len(files)} images, model {model} ({placed.classes} classes), {plan.device}"
        f"{f' x{len(plan.gpu_ids)}' if len(plan.gpu_ids) > 1 else ''}, batch {placed.batch_size}, "
        f"{report.workers} workers, label map {label_map.name}"
    )
    say(f"preprocessing: {report.preprocessing['as_run']} ({report.preprocessing['from']})")
    if placed.engine.export_s:  # an export was made or read: which engine runs, and why
        kept = ", the export kept from an earlier run" if placed.engine.cache == "read" else ""
        say(f"engine: {placed.engine.engine} ({placed.engine.why}{kept})")
    hint = frame_hint(config, decoding, files, label_map) if not resumed else None
    if hint:
        say(hint)


def _load_and_place(
    config: Config, decoding: Decoding, files: list[ImageFile], report: RunReport
) -> tuple[LoadedModel, ImageDataset, Placement]:
    """The model loaded, and placed on its device(s) while the head start still decodes, before the DataLoader's
    workers start (harness/pipeline/placement.py); run.json's description of it."""
    loaded = load_model(config)
    dataset = ImageDataset.of(files, decoding)
    placed = place_model(config, loaded, dataset, len(files))
    report.fold_batchnorm, report.layout = placed.folded.describe(), placed.layout.describe()
    report.engine = placed.engine.describe()
    transform = decoding.transform_file
    report.model = loaded.describe(
        placed.classes, "model folder's data_transform_description.py" if transform else "harness"
    )
    report.preprocessing = {
        "as_run": describe_preprocessing(config.preprocess, transform),
        "from": preprocessing_sources(config.origins, transform),
        "settings_from": {name: config.origins.get(name, "default") for name in SHOWN_PREPROCESSING},
    }
    return loaded, dataset, placed


def frame_hint(config: Config, decoding: Decoding, files: list[ImageFile], label_map: LabelMap) -> str | None:
    """A hint when the run treats its images as ObjectNet's (a frame stripped, ObjectNet ids) and the first one has
    no such frame: ordinary photos, most likely. One image decoded, once."""
    border = config.preprocess.border
    objectnet = label_map.name in OBJECTNET_MAPS
    fixed = isinstance(border, int) and border > 0
    if not files or not (fixed or objectnet) or decoding.transform_file is not None:
        return None
    try:
        framed = detect_border(load_rgb(files[0].path, max_pixels=config.max_pixels)) >= (border if fixed else 1)
    except Exception:  # an unreadable first image gets its own row; no hint is worth a failure here
        return None
    if framed:
        return None
    advice = []
    if fixed:
        advice.append(f"--border 0 keeps their edges (the run strips {border} px)")
    if objectnet:
        advice.append("--label-map imagenet-names writes ImageNet class names, not ObjectNet ids")
    return f"hint: {files[0].key} has no frame like ObjectNet's images: if these are other photos, " + "; ".join(advice)


def _label_map(config: Config, classes: int, model_labels: list[str] | None) -> LabelMap:
    label_map, warnings = make_label_map(config.label_map, classes, config.topk, config.softmax, model_labels)
    for warning in warnings:
        say(warning)
    return label_map


def _describe(
    report: RunReport,
    config: Config,
    label_map: LabelMap,
    placed: Placement,
    *,
    workers: int,
    prefetch: int,
    head_images: int,
) -> None:
    report.label_map, report.columns = label_map.name, label_map.layout.columns
    report.scorer_rules = scorer_shaped(label_map.layout.columns, label_map.scorer_ids)
    report.devices, report.batch_size_total = placed.forward.plan.describe(), placed.batch_size
    report.world_size, report.workers = config.world_size, workers
    report.prefetch_batches, report.head_start_images = prefetch if workers else 0, head_images


def _batches(
    config: Config,
    dataset: ImageDataset,
    start: int,
    placed: Placement,
    *,
    workers: int,
    prefetch: int,
    head: HeadStart | None,
) -> tuple[Iterable[Batch], DecoderTracker]:
    """The batches from image `start` on: the head start's first, then the DataLoader's workers, which start now,
    beside the head start's last batches (none to start when it covered every image)."""
    remaining = Subset(dataset, range(start, len(dataset)))  # keeps the indices rows are keyed by
    timeout = loader_timeout(config.decode_timeout)
    pin = placed.forward.plan.device.type == "cuda"
    loader = make_loader(remaining, placed.batch_size, workers, prefetch, pin, timeout, config.idle_decoders)
    tracker = dataset.watch(workers)
    batches: Iterable[Batch] = iter(loader) if len(remaining) else iter(())
    if head is not None:
        batches = itertools.chain(head_batches(head, timeout), batches)
    return batches, tracker


def _decoders(config: Config, dataset: ImageDataset, batch_size: int) -> tuple[int, int]:
    """(workers, batches each prefetches): the usable cores, unless /dev/shm is too small for their batches."""
    workers = usable_cpus() if config.workers is None else config.workers
    batch_bytes = dataset.blank.numel() * dataset.blank.element_size() * batch_size
    workers, prefetch, shm_warning = fit_to_shm(workers, batch_bytes, shm_free_bytes())
    workers, files_warning = fit_to_open_files(workers, prefetch, open_files_limit())
    for warning in (shm_warning, files_warning):
        if warning:
            say(warning)
    return workers, prefetch


def _resume_or_start(
    config: Config,
    files: list[ImageFile],
    identity: dict[str, object],
    label_map: LabelMap,
    batch_size: int,
    report: RunReport,
) -> int:
    """Rows already done: with --resume, what the partial file kept, once it is known to come from this model and
    these settings; else none, and this run's identity is recorded beside the partial file it is about to write."""
    done = 0
    if config.resume and partial_path(config.output_file).exists():
        check_identity(config.output_file, identity)
        layout = label_map.layout
        done, report.failures, changed = resume_point(config.output_file, config.errors_csv, files, layout, batch_size)
        if changed:
            say(f"{changed} finished row(s) are done again: an image among them changed since it was read")
        say(f"resuming after {done} of {len(files)} images" if done else "nothing to resume: starting afresh")
    elif partial_path(config.output_file).exists():
        say("replacing an earlier run's partial file (--resume would have continued it)")
    if not done:
        record_identity(config.output_file, identity)
    report.images = report.resumed_rows = done
    return done


def head_batches(head: HeadStart, timeout: float | None) -> Iterator[Batch]:
    for indices, images, errors, seen in head.batches(timeout):
        yield Batch(indices, torch.from_numpy(images), errors, seen)


def finish(config: Config, report: RunReport, keys: list[str]) -> RunReport:
    """Judge the run once, by whoever holds the whole run's report (harness/results/verdict.py), write run.json, and
    raise unless the CSV is right to submit with the failures within --max-failures."""
    verdict = judge(
        config.output_file,
        keys,
        report.columns,
        report.scorer_rules,
        report.failures,
        report.total,
        config.max_failures,
    )
    report.status = verdict.status
    report.write(config.run_json)
    verdict.raise_unless_complete(config.output_file, config.errors_csv)
    return report
