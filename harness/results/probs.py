"""`--save-probs`: every image's full output vector, kept beside the CSV so runs can be combined later.

The CSV keeps only the top-k; an ensemble needs all classes. The .npz holds `keys` (one per image, input
order), `probs` (N x C float32: softmax probabilities, or the raw outputs when softmax is off or the head has
one column; NaN rows for unreadable images) and `softmax` (whether `probs` are probabilities).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from harness.errors import OutputError
from harness.results.gate import open_output, partial_path, replace_output


class ProbabilityRecorder:
    def __init__(self, softmax: bool) -> None:
        self.softmax = softmax
        self.keys: list[str] = []
        self.rows: list[np.ndarray] = []

    def add(self, keys: list[str], scores: torch.Tensor, errors: list[str]) -> None:
        values = scores.float().cpu().numpy().copy()
        values[[bool(error) for error in errors]] = np.nan
        self.keys += keys
        self.rows.append(values)

    def save(self, path: Path) -> None:
        """Written to its .partial file and renamed, like the CSV, so the .npz is never half a file."""
        partial = partial_path(path)
        try:
            with os.fdopen(open_output(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                np.savez_compressed(
                    f, keys=np.array(self.keys), probs=np.concatenate(self.rows), softmax=np.array(self.softmax)
                )
            replace_output(partial, path)
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
