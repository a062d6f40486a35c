"""`harness score`: the numbers a submission will be judged by, computed locally.

Three modes, picked by the options:
- `--answers A.json`: ObjectNet top-1/top-5 as the challenge's scorer counts them (rows matched by basename, a
  missing image counts as wrong), over all answers and over the 113 classes that overlap ImageNet.
- `--labels L.json`: for an N x 1 head (`key,score` rows), the F1 at the best threshold, and with `--macs` the
  model-optimisation score against a baseline (formula in `optimisation_score`).
- `--compare B.csv`: Kendall's tau-b and Pearson's r between the score column of two `key,score` files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import CheckFailedError, ConfigError, ToolFileError
from harness.results.contract import ID_MAX, SCORER_LAYOUT, problems, scorer_id, scorer_key
from harness.results.labels import imagenet_to_objectnet
from harness.results.rows import Layout
from harness.tools.arguments import positive_number
from harness.tools.validate import read_predictions_file

PAIR_CHUNK = 2048  # rows of the pairwise sign matrix built at once for Kendall's tau


def overlap_ids() -> set[int]:
    """The 113 ObjectNet classes that have ImageNet counterparts (a test checks them against the official list)."""
    return set(imagenet_to_objectnet().values())


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ToolFileError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ToolFileError(f"{path} must hold a JSON object of image name: answer")
    return data


def read_answer_ids(path: Path) -> dict[str, int]:
    """Image name -> ObjectNet id, as the scorer reads them: a JSON integer, which it compares with the integer ids
    it parsed from each row. Anything else (a string of digits included: the scorer would never match it) is
    named, exit 10."""
    answers = {}
    for key, value in read_json_object(path).items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= ID_MAX:
            raise ToolFileError(
                f"{path}: the answer for {key} is {json.dumps(value, ensure_ascii=False)}, not an ObjectNet id "
                f"(an integer 0..{ID_MAX}, as the scorer compares them)"
            )
        answers[scorer_key(key)] = value
    return answers


def _nan_as_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _nan_as_null(item) for key, item in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_predictions(path: Path) -> dict[str, list[int]]:
    """Basename -> the five predicted ids, after the checks the scorer makes (it rejects the file on any)."""
    rows = read_predictions_file(path)
    rejected, _ = problems(rows)
    if rejected:
        raise CheckFailedError(f"{path} would be rejected by the scorer: {rejected[0]} (harness validate lists all)")
    parts = [SCORER_LAYOUT.split(row) for row in rows]
    return {scorer_key(part.key): [scorer_id(x) for x in part.ids] for part in parts}


def topk_accuracy(predictions: dict[str, list[int]], answers: dict[str, int]) -> dict[str, float | int]:
    """Top-1 and top-5 in percent of all answers, as the scorer reports them; unanswered rows are an error."""
    unknown = sorted(set(predictions) - set(answers))
    if unknown:
        raise CheckFailedError(f"{len(unknown)} row(s) name images not in the answers, e.g. {unknown[0]}")
    top1 = sum(1 for key, truth in answers.items() if predictions.get(key, [-1])[0] == truth)
    top5 = sum(1 for key, truth in answers.items() if truth in predictions.get(key, []))
    total = len(answers)
    return {
        "top1": 100.0 * top1 / total if total else 0.0,
        "top5": 100.0 * top5 / total if total else 0.0,
        "images_scored": sum(1 for key in answers if key in predictions),
        "total_images": total,
    }


def score_objectnet(predictions: dict[str, list[int]], answers: dict[str, int]) -> dict[str, Any]:
    overlap = overlap_ids()
    in_overlap = {key: truth for key, truth in answers.items() if truth in overlap}
    scored = {key: ids for key, ids in predictions.items() if key in in_overlap}
    return {"all": topk_accuracy(predictions, answers), "overlap_113": topk_accuracy(scored, in_overlap)}


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(F1, threshold): the best F1 over every threshold `score >= t`, t running through the observed scores."""
    positives = int(labels.sum())
    if positives == 0:
        raise CheckFailedError("the labels hold no positive image, so F1 is undefined")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_pos = np.cumsum(sorted_labels)
    predicted = np.arange(1, len(scores) + 1)
    # only the last position of each run of equal scores is a threshold that can really be set
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    f1 = 2 * true_pos[last] / (predicted[last] + positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(sorted_scores[last][best])


def optimisation_score(f1: float, macs: float, baseline_f1: float, baseline_macs: float, weight: float) -> float:
    """(F1 / baseline F1) * (baseline MACs / MACs) ** weight.

    1.0 is the baseline; the F1 ratio rewards accuracy linearly and the MACs ratio rewards compute with
    diminishing returns (weight 0.5: a quarter of the MACs doubles the score at equal F1). Our formula, not a
    published one: replace it when the challenge publishes its own.
    """
    if min(f1, macs, baseline_f1, baseline_macs) <= 0:
        raise ConfigError("F1, MACs and both baselines must be positive")
    return (f1 / baseline_f1) * (baseline_macs / macs) ** weight


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b: sum(sign dx * sign dy) / sqrt(pairs untied in x * pairs untied in y), over all pairs.

    Exact and O(n^2) in chunks: fine for tens of thousands of images.
    """
    together = untied_x = untied_y = 0.0
    for start in range(0, len(x), PAIR_CHUNK):
        sx = np.sign(x[start : start + PAIR_CHUNK, None] - x[None, :])
        sy = np.sign(y[start : start + PAIR_CHUNK, None] - y[None, :])
        together += float((sx * sy).sum())
        untied_x += float(np.abs(sx).sum())
        untied_y += float(np.abs(sy).sum())
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return together / math.sqrt(untied_x * untied_y)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum()) / denominator if denominator else math.nan


def read_scores(path: Path) -> dict[str, float]:
    """Basename -> score from a `key,score` file (an N x 1 head's output); an image that failed (no score) is NaN."""
    scores = {}
    layout = Layout(None)
    for line, row in enumerate(read_predictions_file(path), start=1):
        try:
            if len(row) != 2:
                raise ValueError(f"{len(row)} columns, expected 2 (key,score)")
            scores[scorer_key(row[0])] = math.nan if layout.is_failure(row) else float(row[1])
        except ValueError as error:
            raise CheckFailedError(f"{path} line {line}: {error}") from None
    return scores


def _paired(first: dict[str, float], second: dict[str, Any], names: str) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(first)
    if set(keys) != set(second):
        missing = sorted(set(keys) ^ set(second))
        raise CheckFailedError(f"{names} do not name the same images ({len(missing)} differ, e.g. {missing[0]})")
    return np.array([first[k] for k in keys], dtype=np.float64), np.array([second[k] for k in keys], dtype=np.float64)


def score_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="harness score", description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="predictions CSV (or key,score CSV for --labels/--compare)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--answers", type=Path, help="ObjectNet answers JSON: image name -> ObjectNet id")
    mode.add_argument("--labels", type=Path, help="JSON: image name -> 0 or 1, for a key,score file")
    mode.add_argument("--compare", type=Path, help="a second key,score file: Kendall tau-b and Pearson r")
    parser.add_argument(
        "--macs", type=positive_number, help="the model's MACs per image (harness check-model prints them)"
    )
    parser.add_argument("--baseline-f1", type=positive_number, help="the baseline model's F1")
    parser.add_argument("--baseline-macs", type=positive_number, help="the baseline model's MACs per image")
    parser.add_argument(
        "--mac-weight", type=positive_number, default=0.5, help="exponent of the MACs ratio (default 0.5)"
    )
    args = parser.parse_args(argv)
    result: dict[str, Any]
    if args.answers:
        answers = read_answer_ids(args.answers)
        result = score_objectnet(read_predictions(args.predictions), answers)
    elif args.labels:
        truth = {scorer_key(k): v for k, v in read_json_object(args.labels).items()}
        if any(v not in (0, 1) for v in truth.values()):
            raise ToolFileError(f"{args.labels}: every label must be 0 or 1")
        scores, labels = _paired(read_scores(args.predictions), truth, "scores and labels")
        f1, threshold = best_f1(np.nan_to_num(scores, nan=-np.inf), labels)  # a failed image is never positive
        result = {"f1": f1, "threshold": threshold, "images": len(scores)}
        if args.macs is not None:
            if args.baseline_f1 is None or args.baseline_macs is None:
                raise ConfigError("--macs needs --baseline-f1 and --baseline-macs for the optimisation score")
            result["optimisation_score"] = optimisation_score(
                f1, args.macs, args.baseline_f1, args.baseline_macs, args.mac_weight
            )
    else:
        x, y = _paired(read_scores(args.predictions), read_scores(args.compare), "the two score files")
        scored = ~(np.isnan(x) | np.isnan(y))  # an image that failed in either run has nothing to compare
        x, y = x[scored], y[scored]
        result = {"kendall_tau_b": kendall_tau_b(x, y), "pearson_r": pearson(x, y), "images": len(x)}
        result["failed_in_either"] = int((~scored).sum())
    # JSON has no NaN: a correlation that is undefined (every score tied) is null
    print(json.dumps(_nan_as_null(result), indent=2, sort_keys=True, allow_nan=False))
    return 0
