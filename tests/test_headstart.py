"""The head start: decoders forked before torch loads must give exactly the DataLoader's batches, hand over to it
without a gap or an overlap, and never hang or hide a decoder that died."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import harness.pipeline.headstart
from harness.cli import main
from harness.config import Config
from harness.errors import PipelineError
from harness.pipeline.decode_options import DecodeOptions, Decoding
from harness.pipeline.files import discover
from harness.pipeline.headstart import HeadStart, start_head
from harness.pipeline.loader import ImageDataset
from harness.sources import build_config
from tests.helpers import REPO, SAMPLES, read_rows

BATCH = 4


def _folder(tmp_path: Path) -> Path:
    """The sample images plus two that fail: a truncated PNG in the first batch and a text file in the last."""
    folder = tmp_path / "images"
    shutil.copytree(SAMPLES, folder)
    (folder / "SOURCES.md").unlink()
    (folder / "000-truncated.png").write_bytes((SAMPLES / "coffee.png").read_bytes()[:2000])
    (folder / "zz-not-an-image.jpg").write_text("not a JPEG")
    return folder


def _config(folder: Path, **settings: object) -> Config:
    cli = {"input_dir": str(folder), "batch_size": str(BATCH), **{k: str(v) for k, v in settings.items()}}
    return build_config(cli, {})


def _finished(head: HeadStart) -> HeadStart:
    """Let every decoder run to the head start's limit, so how many batches it covers does not depend on timing."""
    for process in head._processes:
        process.join(timeout=60)
    return head


@pytest.mark.equivalence
@pytest.mark.parametrize(("processes", "run_batch", "covered"), [(2, BATCH, 21), (1, BATCH, 16), (1, 3 * BATCH, 12)])
def test_batches_equal_the_dataloaders_samples_errors_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, processes: int, run_batch: int, covered: int
) -> None:
    """With four chunks a decoder, two decoders finish all 21 images; one stops at four chunks (16), of which a run
    with batches of 12 (three GPUs under DataParallel) takes the one whole batch."""
    monkeypatch.setattr(harness.pipeline.headstart, "BATCHES_PER_PROCESS", 4)
    config = _config(_folder(tmp_path))
    files = discover(config.input_dir)
    head = _finished(HeadStart(config, files, Decoding.of(config), processes))
    try:
        assert head.stop(run_batch) == covered
        dataset = ImageDataset(files, Decoding.of(config))
        seen, failed = [], []
        for indices, images, errors, _ in head.batches(timeout=30):
            assert len(indices) == min(run_batch, covered - len(seen))
            assert images.shape == (len(indices), 3, 224, 224) and images.dtype == np.uint8
            for index, image, error in zip(indices, images, errors, strict=True):
                expected_index, expected, expected_error, _ = dataset[index]
                assert index == expected_index and error == expected_error
                assert np.array_equal(image, expected.numpy())
                failed += [files[index].key] if error else []
            seen += indices
        assert seen == list(range(covered))
        assert failed == ["000-truncated.png", "zz-not-an-image.jpg"][: 2 if covered == len(files) else 1]
    finally:
        head.close()


@pytest.mark.equivalence
def test_a_run_with_a_head_start_writes_the_same_files_as_one_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness.pipeline.headstart, "usable_cpus", lambda: 2)  # one decoder,
    monkeypatch.setattr(harness.pipeline.headstart, "BATCHES_PER_PROCESS", 4)  # at most 16 of the 21 images ahead
    folder = _folder(tmp_path)
    outputs = {}
    for head_start in ("true", "false"):
        out = tmp_path / head_start / "predictions.csv"
        argv = [str(folder), str(out), "--batch-size", str(BATCH), "--progress", "false", "--head-start", head_start]
        argv += ["--max-failures", "none"]
        assert main(argv) == 0
        details = json.loads(out.with_name("run.json").read_text())
        outputs[head_start] = (read_rows(out), read_rows(out.with_name("errors.csv")), details["head_start_images"])
    with_head, without = outputs["true"], outputs["false"]
    assert with_head[:2] == without[:2]
    assert [row[0] for row in with_head[1]] == ["000-truncated.png", "zz-not-an-image.jpg"]
    # the head start covered some batches and the DataLoader the rest
    assert without[2] == 0 and with_head[2] % BATCH == 0 and 0 < with_head[2] < len(with_head[0])


def test_the_decoding_is_described_once_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One frozen description of the decoding a run, not one an image: decoding in the main process (--workers 0),
    every image goes through the run's one Decoding, built once."""
    made: list[object] = []
    described = DecodeOptions.of.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(DecodeOptions, "of", classmethod(lambda cls, pre: made.append(pre) or described(cls, pre)))
    out = tmp_path / "predictions.csv"
    assert main([str(SAMPLES), str(out), "--workers", "0", "--progress", "false"]) == 0
    assert len(read_rows(out)) == len(discover(SAMPLES)) > 1
    assert len(made) == 1


@pytest.mark.parametrize(
    ("kill", "what"),
    [(True, "was killed by signal 9"), pytest.param(False, "stopped answering", marks=pytest.mark.slow)],  # a timeout
)
def test_a_decoder_that_dies_or_hangs_is_an_error_naming_its_file(tmp_path: Path, kill: bool, what: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(SAMPLES / "coffee.png", folder / "a.png")
    os.mkfifo(folder / "b-stuck.png")  # opening it blocks: the decoder is caught holding this file
    config = _config(folder, decode_timeout=600)
    head = HeadStart(config, discover(folder), Decoding.of(config), processes=1)
    try:
        deadline = time.monotonic() + 30
        while head._tracker.held() != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
        if kill:
            os.kill(head._processes[0].pid, signal.SIGKILL)
        head.stop(BATCH)
        with pytest.raises(PipelineError, match=rf"{what} while decoding: b-stuck\.png"):
            list(head.batches(timeout=1))
    finally:
        head.close()


def test_close_before_stop_ends_a_stuck_decoder_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    os.mkfifo(folder / "stuck.png")
    config = _config(folder, decode_timeout=600)
    head = HeadStart(config, discover(folder), Decoding.of(config), processes=1)
    started = time.monotonic()
    head.close()
    assert time.monotonic() - started < 10
    assert all(not process.is_alive() for process in head._processes)


@pytest.mark.parametrize(
    "settings",
    [
        {"head_start": "false"},
        {"resume": "true"},
        {"workers": "0"},
        {"world_size": "2", "rank": "1", "master_addr": "127.0.0.1", "master_port": "29500"},
    ],
)
def test_no_head_start_where_it_does_not_apply(tmp_path: Path, settings: dict[str, str]) -> None:
    config = _config(SAMPLES, **settings)
    assert start_head(config, discover(SAMPLES), Decoding.of(config)) is None


def test_no_head_start_with_the_model_folders_own_transform(tmp_path: Path) -> None:
    (tmp_path / "data_transform_description.py").write_text("")
    config = dataclasses.replace(_config(SAMPLES), model_dir=tmp_path)
    assert start_head(config, discover(SAMPLES), Decoding.of(config)) is None


def test_the_command_line_the_head_start_and_validate_load_without_torch() -> None:
    """The head start only pays if it forks before torch loads; an import of torch here would silently undo it.
    `harness validate` is promised torch-free too (README)."""
    modules = "harness.cli, harness.options, harness.pipeline.headstart, harness.tools.validate"
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_no_head_start_for_an_empty_folder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert start_head(config, [], Decoding.of(config)) is None
