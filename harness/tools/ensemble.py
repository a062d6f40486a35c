"""`harness ensemble`: average the saved probabilities of several runs (`--save-probs`) into one predictions CSV.

The average goes through the same label maps as a run. Averaged probabilities are handed over as their logs
with softmax on, since softmax(log p) = p when p sums to 1: the maps then rank and sum exactly as for one model.
An image unreadable in any run gets the failure row.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from harness.console import say
from harness.errors import ToolFileError
from harness.results.contract import scorer_shaped
from harness.results.labels import make_label_map
from harness.results.verdict import judge
from harness.results.writer import AtomicCsvWriter, check_writable


def load_probs(path: Path) -> tuple[list[str], np.ndarray, bool]:
    """(keys, N x C probabilities, softmax) of a --save-probs file, or exit 10 saying what it is not."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, probs, softmax = data["keys"], data["probs"], data["softmax"]
    except Exception as error:  # numpy raises OSError, KeyError, ValueError, zipfile's and pickle's errors alike
        raise ToolFileError(f"{path} is not a --save-probs file: {type(error).__name__}: {error}") from None
    if keys.ndim != 1 or keys.dtype.kind not in "US":
        raise ToolFileError(f"{path}: keys must be a list of image names, not {keys.dtype} of shape {keys.shape}")
    if probs.ndim != 2 or probs.shape[1] < 1 or probs.dtype.kind not in "fiu":
        raise ToolFileError(f"{path}: probs must be N x C real numbers with C >= 1, not {probs.dtype} {probs.shape}")
    if len(keys) != probs.shape[0]:
        raise ToolFileError(f"{path}: {len(keys)} keys for {probs.shape[0]} rows of probabilities")
    names = [k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k) for k in keys.tolist()]
    return names, probs.astype(np.float64), bool(softmax)


def average(paths: Sequence[Path]) -> tuple[list[str], np.ndarray, bool]:
    """(keys, mean of the runs, softmax); every run must cover the same images with the same classes."""
    keys, total, softmax = load_probs(paths[0])
    for path in paths[1:]:
        other_keys, probs, other_softmax = load_probs(path)
        if other_keys != keys or probs.shape != total.shape or other_softmax != softmax:
            raise ToolFileError(
                f"{path} does not match {paths[0]}: the runs must cover the same images, in the same order, "
                f"with the same number of classes and the same softmax setting ({probs.shape} vs {total.shape})"
            )
        total = total + probs
    return keys, total / len(paths), softmax


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def ensemble_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="harness ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("probs", type=Path, nargs="+", help=".npz files written by --save-probs")
    parser.add_argument("--output", type=Path, required=True, help="predictions CSV to write")
    parser.add_argument("--label-map", default="auto", help="as for harness run (default auto)")
    parser.add_argument("--topk", type=_positive, default=5, help="predictions per image (default 5)")
    args = parser.parse_args(argv)
    keys, mean, softmax = average(args.probs)
    label_map, warnings = make_label_map(args.label_map, mean.shape[1], args.topk, softmax)
    for warning in warnings:
        say(warning)
    check_writable(args.output)
    failed = ~np.isfinite(mean).all(axis=1)  # an image unreadable in any run, or a run's NaN or infinity
    scores = torch.from_numpy(np.where(failed[:, None], 0.0, mean))
    outputs = scores.log() if softmax else scores
    layout = label_map.layout
    with AtomicCsvWriter(args.output) as writer:
        for key, bad, prediction in zip(keys, failed, label_map(outputs), strict=True):
            writer.write(layout.failure(key) if bad else layout.format(key, prediction))
        writer.commit()
    # The same last word as a run's: one right row per image, the scorer's rules for an ObjectNet file.
    scored = scorer_shaped(layout.columns, label_map.scorer_ids)
    verdict = judge(args.output, keys, layout.columns, scored, int(failed.sum()), len(keys), None)
    verdict.raise_unless_complete(args.output, None)
    print(f"harness: {len(args.probs)} runs averaged over {len(keys)} images -> {args.output}")
    return 0
