"""Continuing an interrupted run from the rows its .partial file kept, and only a run that would write the same rows.

Rows are written in input order, so a partial file is a prefix of the final one. Resuming keeps that prefix, cut
back to a batch boundary: each later batch then holds the same images as in an uninterrupted run, and the model
gives the same numbers, so the final CSV is byte-identical to one written in a single go.

That holds only for the same model and the same settings. So a run records, when it starts, what shapes its rows
in `<output>.resume.json` beside the partial file: every setting but those declared row-neutral
(harness/pipeline/identity.py: ROW_NEUTRAL, each with why), what the run resolved the rest to (device, GPUs, the
batch the model sees, the memory layout, torch's threads), the model's files by content (never the run's own
outputs among them), which weights of its checkpoint, the harness's and the packages' versions; `--resume`
compares and refuses any difference, naming it, before anything is overwritten. A different batch size is refused
too: the batches would hold other images, and the model's numbers can depend on what else is in its batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import __version__
from harness.config import Config
from harness.errors import ConfigError
from harness.pipeline.decode import seen
from harness.pipeline.files import ImageFile
from harness.pipeline.identity import digests_once, installed_digest, model_files, recorded_settings
from harness.results.label_maps import is_named_map
from harness.results.outputs import ledger_path, record_path
from harness.results.report import software
from harness.results.rows import Layout
from harness.results.writer import (
    open_csv,
    partial_path,
    read_cut_rows,
    read_output_text,
    row_writer,
    write_atomic_text,
)


def _rewrite(path: Path, rows: list[list[str]]) -> None:
    with open_csv(path, "w") as f:
        write = row_writer(f)  # the writer's own dialect, so kept rows stay byte for byte what was written
        for row in rows:
            write(row)


LOST_REASON = "failed in the interrupted run; its reason was not saved before it stopped"


def resume_point(
    output: Path, errors: Path, files: list[ImageFile], layout: Layout, batch_size: int
) -> tuple[int, int, int]:
    """Leave the partial files holding exactly the rows to keep; return (rows kept, failures among them, rows
    redone because their image changed since it was read).

    The failures are counted from the predictions' own failure rows, the file that is submitted: errors.csv is
    flushed first, so a run stopped between the two writes leaves a reason too many (dropped here), never one too
    few; a failure row whose reason is missing all the same still counts, with a line saying its reason was lost.
    A row is kept only while its image is still as it was read (the ledger, written before the rows): from the
    first that is not (or that the ledger lacks), its batch on is done again."""
    partial = partial_path(output)
    if not partial.exists():
        return 0, 0, 0
    keys = [image.key for image in files]
    row_width = layout.columns
    rows, last_whole = read_cut_rows(partial)
    if rows and not last_whole:
        rows.pop()
    for position, row in enumerate(rows):
        if position >= len(keys) or len(row) != row_width or row[0] != keys[position]:
            shown = row[0] if row else "an empty row"
            expected = keys[position] if position < len(keys) else "no more images"
            raise ConfigError(
                f"--resume: {partial} does not belong to this run: row {position + 1} is {shown!r} with "
                f"{len(row)} fields, expected {expected!r} with {row_width}. Delete it, or run without --resume to "
                "start over."
            )
    whole = len(rows) - len(rows) % batch_size
    kept = _unchanged(ledger_path(output), files, whole, batch_size)
    _rewrite(partial, rows[:kept])
    _rewrite(partial_path(ledger_path(output)), [[image.key, seen(image.path)] for image in files[:kept]])
    failed = [row[0] for row in rows[:kept] if layout.is_failure(row)]
    errors_partial = partial_path(errors)
    reasons = {}
    if errors_partial.exists():
        reasons = {row[0]: row[1] for row in read_cut_rows(errors_partial)[0] if len(row) == 2}
    _rewrite(errors_partial, [[key, reasons.get(key, LOST_REASON)] for key in failed])
    return kept, len(failed), whole - kept


def _unchanged(ledger: Path, files: list[ImageFile], rows: int, batch_size: int) -> int:
    """How many of the first `rows` rows to keep: up to the batch of the first image that is no longer as the
    ledger says it was read (replaced, rewritten, or missing from the ledger)."""
    recorded = read_cut_rows(partial_path(ledger))[0] if partial_path(ledger).exists() else []
    for position in range(rows):
        entry = recorded[position] if position < len(recorded) else None
        image = files[position]
        if entry != [image.key, seen(image.path)] or not entry[1]:
            return position - position % batch_size
    return rows


def run_identity(
    config: Config,
    model: dict[str, Any],
    files_read: list[str],
    placed: dict[str, Any],
    outputs: frozenset[Path] = frozenset(),
) -> dict[str, Any]:
    """What shapes this run's rows: every setting not declared row-neutral, and what the run resolved the others to.
    `model` is run.json's description of the loaded model, `files_read` what loading it read, `placed` where and
    how it runs (device type, GPUs, the batch it sees, the layout chosen under `channels_last: auto`, torch's
    threads), `outputs` the run's own files, which are never the model's even when they lie in its folder."""
    label_map = config.label_map
    named = is_named_map(label_map)  # a named map is never read from a file, whatever the working folder holds
    installed = software()
    digest = digests_once()
    return {
        "harness_version": __version__,
        "settings": recorded_settings(config),
        "placed": placed,
        "model_class": model["class"],
        "model_files": model_files(config.model_dir, files_read, digest, outputs),
        # every installed package, not only the recorded ones: a model's code may load weights from any of them
        "software": {
            "python": installed["python"],
            "packages": installed["packages"],
            "installed": installed_digest(),
        },
        "model_source": digest(model["source"]),
        "checkpoint": digest(model["checkpoint"]),
        "weights": model.get("weights"),  # a training checkpoint's own or EMA weights
        "transform_file": digest(config.transform_file),
        "label_map": label_map if named else "a labels file",
        "labels_file": None if named else digest(label_map),
    }


def record_identity(output: Path, identity: dict[str, Any]) -> None:
    write_atomic_text(record_path(output), json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n")


def recorded_choice(output: Path, name: str, choices: tuple[object, ...]) -> object:
    """Which of `choices` the run that left `output`'s partial file made for `name` where it measured
    (`channels_last`, `engine`), for a resumed `auto` run to take rather than measure anew (the choices' scores differ
    in the last digits); None where unknown or not one of them (of the same type: 1 is no True)."""
    if not partial_path(output).exists():
        return None
    try:
        made = json.loads(read_output_text(record_path(output)))["placed"].get(name)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return next((choice for choice in choices if type(choice) is type(made) and choice == made), None)


def check_identity(output: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a partial file that another model or other settings wrote."""
    path = record_path(output)
    try:
        recorded = json.loads(read_output_text(path))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ConfigError(
            f"--resume: {partial_path(output)} has no readable record of the model and settings that wrote it "
            f"({path}), so it cannot be continued safely. Delete it, or run without --resume to start over."
        )
    differ = _differences(recorded, json.loads(json.dumps(identity, default=str)))
    if differ:
        shown = "; ".join(f"{key}: {_short(then)} then, {_short(now)} now" for key, then, now in differ[:4])
        raise ConfigError(
            f"--resume: {partial_path(output)} was written by another model or other settings ({shown}). Resume "
            "with the same ones, or run without --resume to start over."
        )


def _differences(recorded: dict[str, Any], current: dict[str, Any], within: str = "") -> list[tuple[str, Any, Any]]:
    """(name, then, now) for each difference, naming the file or package inside a nested record."""
    found = []
    for key in sorted(recorded.keys() | current.keys()):
        then, now, name = recorded.get(key), current.get(key), f"{within}{key}"
        if isinstance(then, dict) and isinstance(now, dict):
            found.extend(_differences(then, now, f"{name} "))
        elif then != now:
            found.append((name, then, now))
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text[:12] + "..." if isinstance(value, str) and len(value) == 64 else text
