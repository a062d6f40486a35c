"""The CSV is streamed to a partial file and appears under its name only when complete."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import ConfigError, OutputError
from harness.pipeline.decode import seen
from harness.pipeline.files import ImageFile
from harness.pipeline.resume import LOST_REASON, resume_point
from harness.results.outputs import ledger_path
from harness.results.rows import Layout, Parts, Prediction, format_score
from harness.results.writer import AtomicCsvWriter, check_writable, partial_path
from tests.helpers import SAMPLES, read_rows

AWKWARD = [
    "plain.png",
    "comma,name.png",
    'quote"name.png',
    "new\nline.png",
    "carriage\rreturn.png",
    "\r",
    "späce ü.png",
    "bad-\udcff-byte.png",
]


def test_awkward_names_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    with AtomicCsvWriter(out) as writer:
        for name in AWKWARD:
            writer.write([name, "1", "0.5"])
        writer.commit()
    assert [row[0] for row in read_rows(out)] == AWKWARD


def test_final_file_appears_only_on_commit_and_partial_survives_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text("old,complete,file\n")
    with pytest.raises(RuntimeError), AtomicCsvWriter(out) as writer:
        writer.write(["a.png", "1", "0.5"])
        writer.flush()
        assert out.read_text() == "old,complete,file\n"
        raise RuntimeError("crash mid-run")
    assert out.read_text() == "old,complete,file\n"
    assert (tmp_path / "p.csv.partial").read_text() == "a.png,1,0.5\n"


def test_unwritable_output_is_reported_before_any_work(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "deeper" / "p.csv")  # missing folders are created
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path)
    if os.getuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_writable(locked / "p.csv")


def _interrupted(output: Path, rows: list[list[str]]) -> None:
    """Leave `output`'s partial file holding `rows`, as a run stopped after flushing them leaves it."""
    with AtomicCsvWriter(output) as writer:
        for row in rows:
            writer.write(row)
        writer.flush()


def _read_as_recorded(output: Path, files: list[ImageFile]) -> None:
    """Each image written and its ledger row recorded, as a run records an image it read."""
    with AtomicCsvWriter(ledger_path(output)) as ledger:
        for image in files:
            Path(image.path).write_bytes(b"png")
            ledger.write([image.key, seen(image.path)])
        ledger.flush()


def test_resume_keeps_awkward_rows_byte_for_byte(tmp_path: Path) -> None:
    """Resuming rewrites the kept rows in the writer's own dialect, so a name with a lone CR stays one row."""
    out = tmp_path / "p.csv"
    _interrupted(out, [[name, "1", "0.5"] for name in AWKWARD])
    partial = out.with_name("p.csv.partial")
    written = partial.read_bytes()
    images = tmp_path / "images"
    images.mkdir()
    files = [ImageFile(str(images / f"{i}.png"), name) for i, name in enumerate([*AWKWARD, "next.png"])]
    _read_as_recorded(out, files)
    assert resume_point(out, tmp_path / "errors.csv", files, Layout(1), 1) == (len(AWKWARD), 0, 0)
    assert partial.read_bytes() == written
    assert resume_point(out, tmp_path / "errors.csv", files, Layout(1), 1) == (len(AWKWARD), 0, 0)
    Path(files[1].path).write_bytes(b"another image")  # replaced since it was read: its row and those after go
    assert resume_point(out, tmp_path / "errors.csv", files, Layout(1), 1) == (1, 0, len(AWKWARD) - 1)


def test_a_partial_file_of_other_rows_is_refused_naming_the_first_row_that_does_not_fit(tmp_path: Path) -> None:
    """Nothing to resume without a partial file; with one, each row must be the next image's with the layout's
    width (topk 1: 3 fields), else the message names the row, what it holds and what was expected."""
    out = tmp_path / "p.csv"
    files = [ImageFile(str(tmp_path / f"{i}.png"), f"{i}.png") for i in range(2)]
    assert resume_point(out, tmp_path / "errors.csv", files, Layout(1), 1) == (0, 0, 0)
    for rows, said in (
        ([["0.png", "1", "0.5"], ["2.png", "1", "0.5"]], "row 2 is '2.png' with 3 fields, expected '1.png' with 3"),
        ([["0.png", "1", "0.5", "2"]], "row 1 is '0.png' with 4 fields, expected '0.png' with 3"),
        (
            [["0.png", "1", "0.5"], ["1.png", "1", "0.5"], ["2.png", "1", "0.5"]],
            "row 3 is '2.png' with 3 fields, expected 'no more images' with 3",
        ),
        ([["0.png", "1", "0.5"], []], "row 2 is 'an empty row' with 0 fields, expected '1.png' with 3"),
    ):
        _interrupted(out, rows)
        with pytest.raises(ConfigError) as refused:
            resume_point(out, tmp_path / "errors.csv", files, Layout(1), 1)
        assert str(refused.value) == (
            f"--resume: {out}.partial does not belong to this run: {said}. Delete it, or run without --resume to "
            "start over."
        )


def test_an_output_that_is_not_a_csv_file_the_harness_writes_is_never_replaced(tmp_path: Path, capsys) -> None:
    """An input photo given as the output, a device, a pipe or a link: exit 6 before any work, left as they were."""
    images = tmp_path / "in"
    images.mkdir()
    photo = images / "rocket.jpg"
    shutil.copy(SAMPLES / "rocket.jpg", photo)
    before = photo.read_bytes()
    assert main([str(images), str(photo), "--progress", "false"]) == 6
    assert photo.read_bytes() == before and "not a .csv file name" in capsys.readouterr().err

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "elsewhere.csv")
    assert main([str(images), str(fifo), "--progress", "false"]) == 6
    assert main([str(images), str(link), "--progress", "false"]) == 6
    assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink() and not (tmp_path / "elsewhere.csv").exists()
    assert main([str(images), "/dev/null", "--progress", "false"]) == 6
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    beside = tmp_path / "beside"
    beside.mkdir()
    os.symlink("/dev/null", beside / "errors.csv")
    assert main([str(images), str(beside / "predictions.csv"), "--progress", "false"]) == 6
    assert (beside / "errors.csv").is_symlink()


@pytest.mark.parametrize("planted", ["p.csv.resume.json.partial", "p.csv.images.csv.partial", "probs.npz.partial"])
def test_a_link_planted_at_any_output_name_is_refused_before_any_work(tmp_path: Path, planted: str, capsys) -> None:
    """Every file the run writes, each with its .partial (the resume record, the ledger, --save-probs), is
    checked before any work and opened only by the gate, never through a link: the link's target stays as it
    was (was: overwritten through the link)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(victim)
    argv = [str(SAMPLES), str(out / "p.csv"), "--progress", "false", "--save-probs", str(out / "probs.npz")]
    assert main(argv) == 6
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"harness: error: {out / planted} exists and is not a regular file (a link, a device, a pipe): " + (
        "move it away"
    )
    assert victim.read_text() == "mine\n"


def test_save_probs_under_a_file_is_refused_before_any_image(tmp_path: Path, capsys) -> None:
    """--save-probs's folder is checked with the CSV's, before the first image (was: found once every image had been
    classified)."""
    (tmp_path / "a-file").write_text("")
    argv = [str(SAMPLES), str(tmp_path / "out" / "p.csv"), "--progress", "false"]
    assert main([*argv, "--save-probs", str(tmp_path / "a-file" / "probs.npz")]) == 6
    assert "cannot create output folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_confidence_is_written_to_exactly_six_significant_digits() -> None:
    """The template's precision, pinned digit for digit: the goldens allow 2e-5 between CPUs, which a digit fewer
    would slip under."""
    values = (0.123456789, 0.99999951, 1234567.0, 1e-7, 0.5, -2.0)
    assert [format_score(value) for value in values] == ["0.123457", "1", "1.23457e+06", "1e-07", "0.5", "-2"]
    row = Layout(2).format("a.png", Prediction(("7", "3"), (0.87654321, 0.0123456789)))
    assert row == ["a.png", "7", "0.876543", "3", "0.0123457"]


def test_a_row_splits_into_its_key_ids_and_scores_in_either_layout() -> None:
    assert Layout(None).split(["a.png", "0.5"]) == Parts("a.png", [], ["0.5"])
    assert Layout(2).split(["a.png", "7", "0.9", "3", "0.1"]) == Parts("a.png", ["7", "3"], ["0.9", "0.1"])
    with pytest.raises(ValueError, match=r"^3 columns, expected 5$"):
        Layout(2).split(["a.png", "7", "0.9"])


def test_a_prediction_whose_ids_and_scores_differ_in_number_writes_no_row() -> None:
    with pytest.raises(ValueError):
        Layout(2).format("a.png", Prediction(("7", "3"), (0.9,)))


def test_resume_keeps_whole_batches_of_images_the_ledger_vouches_for_and_each_failures_reason(tmp_path: Path) -> None:
    """Five rows, batches of two: four kept while the ledger has all five; the failures among them keep the
    reasons errors.csv had (a row there of another shape is not one), a failure whose reason is gone says so.
    A ledger of three images keeps two rows; no ledger keeps none."""
    out, errors = tmp_path / "p.csv", tmp_path / "errors.csv"
    layout = Layout(1)
    files = [ImageFile(str(tmp_path / f"{i}.png"), f"{i}.png") for i in range(5)]
    rows = [["0.png", "1", "0.5"], layout.failure("1.png"), ["2.png", "1", "0.5"], layout.failure("3.png")]
    rows.append(["4.png", "1", "0.5"])

    def leave(vouched: int | None) -> None:
        _interrupted(out, rows)
        _interrupted(errors, [["1.png", "decode failed"], ["3.png", "a", "b"]])
        partial_path(ledger_path(out)).unlink(missing_ok=True)
        if vouched is not None:
            _read_as_recorded(out, files[:vouched])

    leave(5)
    assert resume_point(out, errors, files, layout, 2) == (4, 2, 0)
    assert read_rows(partial_path(out)) == rows[:4]
    assert read_rows(partial_path(errors)) == [["1.png", "decode failed"], ["3.png", LOST_REASON]]
    leave(5)
    partial_path(errors).unlink()  # stopped before errors.csv was first flushed
    assert resume_point(out, errors, files, layout, 2) == (4, 2, 0)
    assert read_rows(partial_path(errors)) == [["1.png", LOST_REASON], ["3.png", LOST_REASON]]
    leave(3)
    assert resume_point(out, errors, files, layout, 2) == (2, 1, 2)
    leave(None)
    assert resume_point(out, errors, files, layout, 2) == (0, 0, 4)
