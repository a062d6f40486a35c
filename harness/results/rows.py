"""The predictions CSV's row, in one place: `key,id,confidence,...` best first (the challenge's layout), or
`key,score` for a one-score head; the row an image that failed gets; and a row read back into its parts. Label
maps hand over ids and scores (`Prediction`); the run, `ensemble`, the contract checks, `score`, `check` and the
tests all go through `Layout`."""

from __future__ import annotations

from dataclasses import dataclass

# An image that failed: no id (the scorer reads an empty id as -1, a wrong answer) and confidence 0; a one-score
# head's row has no score. No valid row can look like it: ids are never empty (they are numbers, or names from a
# labels file, which refuses empty ones) and scores are finite numbers (a NaN or infinite output is a failure).
FAILED_ID, FAILED_SCORE, NO_SCORE = "", "0", ""


def format_score(value: float) -> str:
    """Six significant digits: the template's precision, and stable across CPUs' last-digit differences."""
    return f"{value:.6g}"


@dataclass(frozen=True)
class Prediction:
    """One image's answer: ids best first with their scores; `ids` is None for a one-score head."""

    ids: tuple[str, ...] | None
    scores: tuple[float, ...]


@dataclass(frozen=True)
class Parts:
    """A row read back, its fields as written: the key, the ids (empty for a one-score row), the scores."""

    key: str
    ids: list[str]
    scores: list[str]


@dataclass(frozen=True)
class Layout:
    """The row shape of one file: `pairs` (id, confidence) pairs, or None for `key,score`."""

    pairs: int | None

    @classmethod
    def of_columns(cls, columns: int) -> Layout:
        """The layout a file of `columns` fields a row was written in (a one-score row has 2)."""
        return cls(None) if columns == 2 else cls((columns - 1) // 2)

    @property
    def columns(self) -> int:
        return 2 if self.pairs is None else 1 + 2 * self.pairs

    def format(self, key: str, prediction: Prediction) -> list[str]:
        scores = [format_score(value) for value in prediction.scores]
        if prediction.ids is None:
            return [key, *scores]
        return [key, *(field for pair in zip(prediction.ids, scores, strict=True) for field in pair)]

    def failure(self, key: str) -> list[str]:
        """The row of an image that could not be classified: empty ids with confidence 0 (the scorer reads it as
        wrong), or no score; no valid row of any layout equals it (FAILED_ID)."""
        return [key, NO_SCORE] if self.pairs is None else [key, *[FAILED_ID, FAILED_SCORE] * self.pairs]

    def is_failure(self, row: list[str]) -> bool:
        return row[1:] == self.failure("")[1:]

    def split(self, row: list[str]) -> Parts:
        """The parts of a row of this layout's width (ValueError for another width)."""
        if len(row) != self.columns:
            raise ValueError(f"{len(row)} columns, expected {self.columns}")
        if self.pairs is None:
            return Parts(row[0], [], row[1:])
        return Parts(row[0], row[1::2], row[2::2])
