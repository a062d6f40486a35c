"""`harness check`: look before you submit, at what the model receives, and catch preprocessing that does not fit it.

It runs the model on labelled images exactly as `harness run` would, with the same options and model/config.yaml.

The images: by default five real photos with known ImageNet classes that ship with the package
(harness/data/photos, licences in SOURCES.md there), judged in ImageNet ids; or `--images DIR` with `--answers` (the
ObjectNet answers JSON, image name -> ObjectNet id, or a CSV of key,label rows), judged in the ids the predictions
CSV holds, through the label map. One report, a verdict a line:
- run: the run itself writes the CSV (into --output) and it is right to submit, by the run's own check, which
  holds validate's rules for an ObjectNet top-5 file;
- failed images: which could not be read, and why;
- label map: the one in use;
- preprocessing: the audit of harness/tools/audit.py; it fails when a variant does clearly better;
- model size: parameters and MACs (check-model's), against any limits given;
- time: per image here, and an estimate for --estimate N images;
- preview: preview.png and preview.html (harness/tools/preview.py says how the model's input is drawn);
- parity (`--parity`, a timm or Hugging Face model): its framework's own pipeline on the same images, top-5 ids
  and probabilities compared image by image (harness/tools/parity.py).
Exit 0 when no check fails, 9 when one does.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.config import Config, Preprocess
from harness.errors import CheckFailedError, ToolFileError, TooManyFailuresError
from harness.models.python_class import load_custom_transform
from harness.pipeline.decode import DecodeOptions, load_rgb
from harness.pipeline.decode_options import Decoding
from harness.pipeline.files import ImageFile, run_files
from harness.pipeline.host import usable_cpus
from harness.pipeline.runner import RunPlan, finish, prepare
from harness.results.contract import scorer_key
from harness.results.labels import IMAGENET_CLASSES, LabelMap, Score, class_ids, id_names, make_label_map
from harness.results.report import RunReport, describe_preprocessing, preprocessing_sources
from harness.results.writer import read_rows
from harness.tools.arguments import PHOTO_ANSWERS
from harness.tools.audit import (
    Decoder,
    Judge,
    Tally,
    VariantResult,
    audit,
    configured_value,
    outputs_for,
    raised_and_lowered,
)
from harness.tools.check_model import CHANNELS, broken_limits, measure, time_batches
from harness.tools.parity import compare
from harness.tools.preview import Item, Label, Preview, standard_view, write_preview
from harness.tools.score import read_json_object
from harness.tools.validate import read_predictions_file

SHOWN_LABELS = 5  # of the photos' ImageNet classes; other images show the run's --topk


@dataclass(frozen=True)
class Verdict:
    check: str
    verdict: str  # pass, FAIL, warn, skip or info; only FAIL fails the check
    detail: str


def read_answers(path: Path) -> dict[str, frozenset[str]]:
    """Image name -> the labels that count as right: from a JSON object (the ObjectNet answers, name -> id; the
    shipped photos', name -> a list of ids) or a CSV of key,label rows (no header)."""
    if path.suffix.lower() == ".json":
        pairs = list(read_json_object(path).items())
    else:
        rows = read_predictions_file(path)
        wrong = next((line for line, row in enumerate(rows, start=1) if len(row) != 2), None)
        if wrong is not None:
            raise ToolFileError(f"{path} line {wrong}: expected key,label")
        pairs = [(row[0], row[1]) for row in rows]
    answers = {}
    for key, value in pairs:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values):
            raise ToolFileError(f"{path}: the answer for {key} must be a label, or a list of labels")
        answers[scorer_key(key)] = frozenset(str(v).strip() for v in values)
    return answers


def _bare(model: nn.Module) -> nn.Module:
    """The model without what the run wrapped it in (torch.compile, DataParallel), as check-model measures it."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.DataParallel) else model


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def seconds_per_image(model_s: float, decode_s: float, device: str, workers: int, cpus: int) -> float:
    """A run's steady pace: on a GPU the decoding workers keep up beside the model, so the slower of the two sets
    it; on the CPU they share its cores, so their work adds up, the decoding spread over the workers."""
    if workers == 0:
        return model_s + decode_s
    if device == "cuda":
        return max(model_s, decode_s / workers)
    return model_s + decode_s / min(workers, cpus)


def describe_label_map(label_map: str, report: RunReport) -> str:
    meanings = {
        "objectnet": "distinct ObjectNet ids, ranked by the summed probability of their ImageNet classes",
        "objectnet-legacy": "the template's ObjectNet ids of the top ImageNet classes (-1 where none maps)",
        "score": "one raw score per image",
        "none": f"the model's own class ids ({report.model['classes']} classes)"
        if label_map in ("auto", "none")
        else f"the names in {label_map}",
    }
    return f"{report.label_map}: {meanings[report.label_map]}; {report.columns} fields a row"


def judge_run(config: Config, report: RunReport, files: list[ImageFile]) -> tuple[Verdict, Verdict]:
    """The run's own verdict on the CSV it wrote, and on the images that failed."""
    problem: Exception | None = None
    try:
        finish(config, report, [image.key for image in files])
    except (CheckFailedError, TooManyFailuresError) as error:
        problem = error
    scored = report.scorer_rules
    rules = "validate's rules hold" if scored else "not an ObjectNet top-5 file, so the scorer's rules do not apply"
    run = (
        Verdict("run", "FAIL", str(problem))
        if isinstance(problem, CheckFailedError)
        else Verdict("run", "pass", f"{report.images} rows in {config.output_file}, right to submit; {rules}")
    )
    failed = read_rows(config.errors_csv)
    listed = "; ".join(f"{row[0]}: {row[1]}" for row in failed if len(row) == 2)
    if isinstance(problem, TooManyFailuresError):
        images = Verdict("failed images", "FAIL", f"{problem} ({listed})")
    elif failed:
        images = Verdict("failed images", "warn", f"{len(failed)} of {report.total}: {listed}")
    else:
        images = Verdict("failed images", "pass", f"none of {report.total}")
    return run, images


def _tally_row(name: str, tally: Tally, changes: str, verdict: str) -> list[str]:
    total = len(tally.top1)
    return [name, f"{tally.correct}/{total}", f"{tally.mean_log_prob:.3f}", changes, verdict]


def audit_table(configured: Tally, results: list[VariantResult]) -> list[list[str]]:
    rows = [["preprocessing", "top-1", "mean log p(true)", "images better/worse", "does clearly better"]]
    rows.append(_tally_row("configured", configured, "", ""))
    for result in results:
        better, worse = raised_and_lowered(result.tally, configured)
        name = f"{result.variant.setting} {result.variant.value}"
        rows.append(_tally_row(name, result.tally, f"{better}/{worse}", "YES" if result.beats else "no"))
    return rows


def audit_verdict(pre: Preprocess, configured: Tally, results: list[VariantResult]) -> Verdict:
    summary = f"configured: top-1 {configured.correct}/{len(configured.top1)}, mean log-probability of the true "
    summary += f"labels {configured.mean_log_prob:.2f}"
    better = sorted((result for result in results if result.beats), key=lambda r: -r.tally.mean_log_prob)
    if not better:
        return Verdict("preprocessing", "pass", f"{summary}; no variant does clearly better")
    total = len(configured.top1)
    problems = [
        f"{r.variant.setting} {r.variant.value} does clearly better than the configured "
        f"{configured_value(r.variant.setting, pre)} (top-1 {r.tally.correct}/{total} against "
        f"{configured.correct}/{total}, mean log-probability of the true labels {r.tally.mean_log_prob:.2f} against "
        f"{configured.mean_log_prob:.2f}): set {r.variant.advice} in model/config.yaml"
        for r in better
    ]
    return Verdict("preprocessing", "FAIL", "; ".join(problems))


@dataclass
class Seen:
    """The configured preprocessing's pass over the images: what the model received and what it said."""

    inputs: torch.Tensor  # the model's input for each file
    outputs: torch.Tensor  # its output for each file
    errors: list[str]
    decode_s: float  # per image, on one core


def look(plan: RunPlan, decoder: Decoder, pre: Preprocess) -> Seen:
    inputs = decoder(pre)
    devices = plan.forward.plan
    normalize = devices.normalizer(pre)
    model_inputs = normalize(inputs.images.to(devices.device)).float().cpu()
    return Seen(
        model_inputs, outputs_for(plan.forward, pre, inputs).float().cpu(), inputs.errors, inputs.seconds_per_image
    )


def measure_verdicts(
    plan: RunPlan, args: argparse.Namespace, decode_s: float, config: Config
) -> tuple[Verdict, Verdict]:
    """Parameters, MACs and limits, as check-model gives them; and the time per image and for --estimate images."""
    report, forward = plan.report, plan.forward
    batch, size = report.batch_size_total, config.preprocess.input_size
    model = _bare(forward.model)
    if not forward.torch_graph:
        _, seconds = time_batches(model, forward.plan, batch, size, max(1, args.repeats))
        cost = Verdict("model size", "skip", "not a PyTorch model: check-model measures the folder it came from")
    else:
        measured = measure(model, forward.plan, batch, size, max(1, args.repeats))
        # the model as written counts (its BatchNorms' parameters too), not the run's folded one
        measured = dataclasses.replace(measured, parameters=report.model.get("parameters") or measured.parameters)
        seconds = measured.batch_seconds
        figures = (
            f"{measured.parameters:,} parameters, {measured.macs / 1e9:.3f} GMACs per image "
            f"(input {CHANNELS} x {size} x {size})"
        )
        broken = broken_limits(measured, args.max_params, args.max_gflops, args.max_gmacs)
        given = any(limit is not None for limit in (args.max_params, args.max_gflops, args.max_gmacs))
        if broken:
            cost = Verdict("model size", "FAIL", f"{figures}; over its limits: {'; '.join(broken)}")
        else:
            cost = Verdict("model size", "pass", f"{figures}; {'within its limits' if given else 'no limits given'}")
    model_s = statistics.median(seconds) / batch
    pace = seconds_per_image(model_s, decode_s, forward.plan.device.type, report.workers, usable_cpus())
    start = report.timings.get("discover_s", 0.0) + report.timings.get("load_model_s", 0.0)
    time = Verdict(
        "time",
        "info",
        f"{pace * 1000:.1f} ms per image on {forward.plan.device} (model {model_s * 1000:.1f} ms at batch {batch}, "
        f"decoding {decode_s * 1000:.1f} ms on one core, {report.workers} workers); {args.estimate:,} images: about "
        f"{_duration(start + args.estimate * pace)} (start-up {start:.1f} s, Python's imports not counted)",
    )
    return cost, time


def preview_items(
    files: list[ImageFile],
    seen: Seen,
    display: LabelMap,
    names: dict[str, str],
    answers: dict[str, frozenset[str]] | None,
    config: Config,
) -> list[Item]:
    items = []
    for image, model_input, prediction, error in zip(
        files, seen.inputs, display(seen.outputs), seen.errors, strict=True
    ):
        right = (answers or {}).get(scorer_key(image.key), frozenset())
        try:
            original = load_rgb(image.path, DecodeOptions.of(config.preprocess), config.max_pixels)
        except Exception:  # the run's decoder already said why (`error`)
            original = None
        labels = [
            Label(f"{label} {names.get(label, '')}".strip(), confidence, label in right)
            for label, confidence in zip(prediction.ids or ("score",), prediction.scores, strict=True)
        ]
        note = error or (
            f"input values {float(model_input.min()):.2f}..{float(model_input.max()):.2f}, "
            f"mean {float(model_input.mean()):.2f}"
        )
        truth = ", ".join(f"{label} {names.get(label, '')}".strip() for label in sorted(right))
        tile = None if error else standard_view(model_input)
        items.append(Item(image.key, original, tile, labels if not error else [], truth, note))
    return items


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def preprocessing_verdict(
    plan: RunPlan,
    judge: Judge,
    decoder: Decoder,
    seen: Seen,
    answers: dict[str, frozenset[str]] | None,
    imagenet_ids: bool,
    custom: bool,
) -> tuple[Verdict, list[tuple[str, list[list[str]]]]]:
    """The audit's verdict and its table, or why there is none."""
    pre, files, classes = plan.config.preprocess, plan.files, judge.truth.shape[1]
    skip = frozenset(index for index, error in enumerate(seen.errors) if error)
    judged = [index for index in judge.indices if index not in skip]
    if custom:
        return Verdict("preprocessing", "skip", "the model folder's own transform replaces the harness's"), []
    if answers is None:
        return Verdict("preprocessing", "skip", "no answers to judge by: pass --answers with --images"), []
    if imagenet_ids and classes != IMAGENET_CLASSES:
        message = f"the photos are labelled in ImageNet's 1000 classes, the model has {classes}: pass --images and "
        return Verdict("preprocessing", "skip", message + "--answers in its own labels"), []
    if isinstance(judge.label_map, Score) or not judged:
        none = "no image has an answer that the model's classes include"
        return Verdict("preprocessing", "skip" if imagenet_ids else "FAIL", none), []
    configured = judge.tally(seen.outputs, skip)
    results = audit(plan.forward, judge, configured, pre, decoder, skip)
    space = "ImageNet's ids" if imagenet_ids else "the ids the CSV holds"
    caption = f"preprocessing audit: {len(judged)} of {len(files)} images judged, in {space}"
    if len(judged) < len(files):
        caption += " (the others are unreadable, or have no answer that one of the model's classes is written as)"
    return audit_verdict(pre, configured, results), [(caption, audit_table(configured, results))]


def parity_verdict(
    config: Config, kind: str, files: list[ImageFile], seen: Seen, classes: int
) -> tuple[Verdict, tuple[str, list[list[str]]]]:
    """--parity: the model's own framework beside the harness on the same images (harness/tools/parity.py)."""
    result = compare(config, kind, files, seen.outputs, seen.errors, classes)
    return Verdict("parity", "pass" if result.agrees else "FAIL", result.detail), (result.caption, result.rows)


def run_checks(
    config: Config,
    args: argparse.Namespace,
    answers: dict[str, frozenset[str]] | None,
    imagenet_ids: bool,
    parity_kind: str | None = None,
) -> tuple[list[Verdict], Preview]:
    found = run_files(config.input_dir, config.skip_unreadable_folders)
    files = found.files
    if answers is not None and not imagenet_ids and not any(scorer_key(image.key) in answers for image in files):
        example = next(iter(answers), "none")
        raise CheckFailedError(
            f"--answers {args.answers} names none of the {len(files)} images in {config.input_dir} (it names "
            f"{len(answers)}, such as {example!r}, by file name): pass the answers for these images"
        )
    decoding = Decoding.of(config)
    plan = prepare(config, found, decoding)
    report = plan.classify()
    verdicts = list(judge_run(config, report, files))
    verdicts.append(Verdict("label map", "info", describe_label_map(config.label_map, report)))

    custom = load_custom_transform(decoding.transform_file)
    decoder = Decoder(files, decoding, custom)
    seen = look(plan, decoder, config.preprocess)
    classes = int(report.model["classes"])
    # The photos are judged in ImageNet's ids; other answers in the ids the run's own label map writes.
    display = make_label_map("none", classes, SHOWN_LABELS, config.softmax)[0] if imagenet_ids else plan.label_map
    judge = Judge.of(display, class_ids(display, classes), files, answers or {})
    verdict, tables = preprocessing_verdict(plan, judge, decoder, seen, answers, imagenet_ids, custom is not None)
    verdicts.append(verdict)
    if parity_kind is not None:
        parity, table = parity_verdict(config, parity_kind, files, seen, classes)
        verdicts.append(parity)
        tables.append(table)
    verdicts += measure_verdicts(plan, args, seen.decode_s, config)

    items = preview_items(files, seen, display, id_names(display, classes), answers, config)
    return verdicts, _preview(config, args, report, decoding, tables, files, items)


def _preview(
    config: Config,
    args: argparse.Namespace,
    report: RunReport,
    decoding: Decoding,
    tables: list[tuple[str, list[list[str]]]],
    files: list[ImageFile],
    items: list[Item],
) -> Preview:
    """The page's head: what was run on which images, as the model saw them."""
    own = decoding.transform_file
    return Preview(
        title=f"harness check: {report.model['class']} ({report.model['source']})",
        lines=[
            f"{len(files)} images from {answers_source(args)}",
            f"preprocessing: {describe_preprocessing(config.preprocess, own)} "
            f"({preprocessing_sources(config.origins, own)})",
            "the model's input is drawn as the harness's default preprocessing would read it back (RGB, values 0..1, "
            "ImageNet mean and std): a photo that looks wrong there reached the model wrong",
        ],
        verdicts=[],
        tables=tables,
        items=items,
    )


def answers_source(args: argparse.Namespace) -> str:
    if args.images is None:
        return f"the photos shipped with the harness, answers: their ImageNet classes ({PHOTO_ANSWERS})"
    return f"{args.images}, answers: {args.answers or 'none'}"


def check(
    args: argparse.Namespace, config: Config, answers_file: Path | None, parity_kind: str | None, preview: list[Path]
) -> int:
    """The check, in a confined process (harness/tools/commands.py read its command line, chose the answers and
    the kind parity compares)."""
    answers = read_answers(answers_file) if answers_file else None
    png, page = preview
    verdicts, preview = run_checks(config, args, answers, args.images is None, parity_kind)
    verdicts.append(Verdict("preview", "info", f"{png}, {page}"))
    preview.verdicts = [(v.check, v.verdict, v.detail) for v in verdicts]
    write_preview(preview, png, page)
    print(_text_table([["check", "verdict", "detail"], *([v.check, v.verdict, v.detail] for v in verdicts)]))
    for caption, rows in preview.tables:
        print(f"\n{caption}\n{_text_table(rows)}")
    failed = [v for v in verdicts if v.verdict == "FAIL"]
    if failed:
        raise CheckFailedError("check failed: " + "; ".join(f"{v.check}: {v.detail}" for v in failed))
    return 0
