"""The files a run writes, named once: the predictions, errors.csv and run.json beside them, the resume record,
`--save-probs`, and under torchrun each rank's part of them, so the run can hand the whole list to the gate
(harness/results/gate.py) before it loads anything."""

from __future__ import annotations

from pathlib import Path

from harness.config import Config
from harness.results.gate import OutputFiles


def record_path(output: Path) -> Path:
    """The resume record: what wrote `output`'s partial file (harness/pipeline/resume.py)."""
    return output.with_name(output.name + ".resume.json")


def ledger_path(output: Path) -> Path:
    """Each finished row's image as it was read (size and time, harness/pipeline/decode.py: seen), kept beside the
    partial file while the run works, so `--resume` redoes a row whose image was replaced since."""
    return output.with_name(output.name + ".images.csv")


def parts_folder(output: Path) -> Path:
    """Where torchrun's ranks write their parts before rank 0 merges them."""
    return output.with_name(f".{output.name}.parts")


def part_output(output: Path, rank: int) -> Path:
    return parts_folder(output) / f"rank{rank}" / output.name


def beside(output: Path) -> list[Path]:
    """A predictions CSV and what a run writes beside it."""
    return [
        output,
        output.with_name("errors.csv"),
        output.with_name("run.json"),
        record_path(output),
        ledger_path(output),
    ]


def run_outputs(config: Config) -> OutputFiles:
    """Every file the run may write, each also as its .partial: its own, and under torchrun every rank's part (rank
    0 reads and removes them all when it merges)."""
    files = beside(config.output_file)
    if config.save_probs is not None:
        files.append(config.save_probs)
    folders: list[Path] = []
    if config.world_size > 1:
        folders.append(parts_folder(config.output_file))
        for rank in range(config.world_size):
            part = part_output(config.output_file, rank)
            folders.append(part.parent)
            files.extend(beside(part))
    return OutputFiles.of(files, folders)
