"""--resume continues only the model that wrote the partial file: every file of the model folder and every file
loading it read count (a helper module, weights a class loads itself), and the failures it carries over are the
predictions' own failure rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from harness import __version__
from harness.cli import main
from harness.config import PREPROCESS_FIELDS, RUN_FIELDS, SETTINGS
from harness.errors import ConfigError
from harness.parsers import metavar
from harness.pipeline.identity import ROW_NEUTRAL, file_digest, model_files, recorded_settings
from harness.pipeline.resume import (
    LOST_REASON,
    check_identity,
    record_identity,
    record_path,
    recorded_choice,
    run_identity,
)
from harness.results.outputs import run_outputs
from harness.results.writer import partial_path
from harness.sources import build_config
from tests.helpers import SAMPLES, read_rows

MODEL = """import os
import torch
from made_helper import GAIN


class Made(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1000)
        self.fc.load_state_dict(torch.load(WEIGHTS))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("MADE_FAIL_FROM") and self.calls > int(os.environ["MADE_FAIL_FROM"]):
            raise ValueError("stopped on purpose")
        return self.fc(x.float().mean((2, 3))) * GAIN
"""


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path]:
    """(the model folder, the weights file its class loads from outside it)."""
    weights = tmp_path / "elsewhere" / "fc.pt"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(3, 1000).state_dict(), weights)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL.replace("WEIGHTS", repr(str(weights))))
    (folder / "made_helper.py").write_text("GAIN = 1.0\n")
    (folder / "config.yaml").write_text("class_name: Made\n")
    return folder, weights


def images(folder: Path, bad: tuple[int, ...] = ()) -> Path:
    folder.mkdir()
    for index in range(8):
        path = folder / f"{index}.png"
        if index in bad:
            path.write_bytes(b"not a png")
        else:
            shutil.copy(SAMPLES / "coffee.png", path)
    return folder


def run(inputs: Path, output: Path, model: Path, *options: str) -> int:
    common = ["--batch-size", "4", "--workers", "0", "--progress", "false"]
    return main([str(inputs), str(output), "--model-dir", str(model), *common, *options])


def interrupted(inputs: Path, output: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Run until the model fails after its first batch: the partial file keeps that batch's 4 rows."""
    monkeypatch.setenv("MADE_FAIL_FROM", "2")
    assert run(inputs, output, model) == 4
    monkeypatch.delenv("MADE_FAIL_FROM")
    partial = output.with_name(output.name + ".partial")
    assert len(read_rows(partial)) == 4
    return partial.read_bytes()


def test_resume_refuses_an_edited_helper_or_outside_weights_and_continues_the_same(
    tmp_path: Path, made: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, weights = made
    inputs = images(tmp_path / "in")
    reference = tmp_path / "ref" / "p.csv"
    assert run(inputs, reference, folder) == 0
    output = tmp_path / "out" / "p.csv"
    kept = interrupted(inputs, output, folder, monkeypatch)
    partial = output.with_name("p.csv.partial")
    original = weights.read_bytes()
    for edit, named in [
        (lambda: (folder / "made_helper.py").write_text("GAIN = 2.0\n"), "made_helper.py"),
        (lambda: torch.save(torch.nn.Linear(3, 1000).state_dict(), weights), str(weights.resolve())),
        (lambda: (folder / "notes.txt").write_text("a file the class never reads is part of the model too"), "notes"),
    ]:
        edit()
        capsys.readouterr()
        assert run(inputs, output, folder, "--resume") == 2
        assert named in capsys.readouterr().err and partial.read_bytes() == kept
        (folder / "made_helper.py").write_text("GAIN = 1.0\n")
        weights.write_bytes(original)
        (folder / "notes.txt").unlink(missing_ok=True)
    assert run(inputs, output, folder, "--resume") == 0
    assert output.read_bytes() == reference.read_bytes()


def test_an_image_replaced_after_its_row_was_written_is_done_again(
    tmp_path: Path, made: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each finished row records its image as it was read: an already classified image replaced under the same name
    gets a new row on --resume, from its batch on (was: the old image's row kept), and the CSV is what a fresh run
    over the new folder writes."""
    folder, _ = made
    inputs = images(tmp_path / "in")
    output = tmp_path / "out" / "p.csv"
    interrupted(inputs, output, folder, monkeypatch)
    shutil.copy(SAMPLES / "chelsea.png", inputs / "2.png")  # its row is among the 4 kept
    capsys.readouterr()
    assert run(inputs, output, folder, "--resume") == 0
    assert "4 finished row(s) are done again: an image among them changed" in capsys.readouterr().err
    reference = tmp_path / "ref" / "p.csv"
    assert run(inputs, reference, folder) == 0
    assert output.read_bytes() == reference.read_bytes()
    assert not output.with_name("p.csv.images.csv.partial").exists()


def test_failures_carried_over_are_the_predictions_failure_rows(
    tmp_path: Path, made: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed between its two writes left the failure row but not its reason: the resumed run still counts
    it (exit 7 with --max-failures 0) and errors.csv says the reason was lost."""
    folder, _ = made
    inputs = images(tmp_path / "in", bad=(1,))
    output = tmp_path / "out" / "p.csv"
    interrupted(inputs, output, folder, monkeypatch)
    errors_partial = output.with_name("errors.csv.partial")
    errors_partial.write_text("")
    assert run(inputs, output, folder, "--resume", "--max-failures", "0") == 7
    assert read_rows(output.with_name("errors.csv")) == [["1.png", LOST_REASON]]
    assert read_rows(output)[1] == ["1.png", *["", "0"] * 5]


@pytest.mark.parametrize("record", ["null", "[]", '"x"', "{", "7"])
def test_a_resume_record_that_is_not_one_is_exit_2(
    tmp_path: Path,
    made: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    record: str,
) -> None:
    folder, _ = made
    inputs = images(tmp_path / "in")
    output = tmp_path / "out" / "p.csv"
    kept = interrupted(inputs, output, folder, monkeypatch)
    output.with_name("p.csv.resume.json").write_text(record)
    capsys.readouterr()
    assert run(inputs, output, folder, "--resume") == 2
    assert "no readable record" in capsys.readouterr().err
    assert output.with_name("p.csv.partial").read_bytes() == kept


# ---- the record, complete by construction ----


def _another(name: str, value: object) -> object:
    """A different valid value for a setting, found through the setting's own parser (its metavar names its
    choices), so the test covers every recorded setting without listing any by hand."""
    parse = SETTINGS[name].metadata["parse"]
    candidates: list[object] = [*metavar(parse).split("|"), "true", "false", 1, 2, 3, 0.5, "0.25", "1,1,1", "x", "y"]
    for candidate in candidates:
        try:
            parsed = parse(candidate)
        except (ValueError, TypeError):
            continue
        if parsed != value and parsed is not None:
            return parsed
    raise AssertionError(f"no other value found for {name}")


def test_every_setting_that_can_change_a_row_is_in_the_resume_record_and_refused_when_changed(
    tmp_path: Path,
) -> None:
    """Walks every setting: each is declared row-neutral (with why) or recorded, and changing any recorded one
    between an interrupted run and its resume is refused, naming it (never continued, never mixed)."""
    assert set(ROW_NEUTRAL) <= set(RUN_FIELDS), set(ROW_NEUTRAL) - set(RUN_FIELDS)
    assert all(len(why) > 10 for why in ROW_NEUTRAL.values())
    output = tmp_path / "p.csv"
    base = build_config({"output_file": str(output)}, {}, {})
    model = {"class": "Model", "source": None, "checkpoint": None}
    placed = {"device": "cpu", "batch_size_total": 64, "channels_last": False}
    record_identity(output, run_identity(base, model, [], placed))
    recorded = recorded_settings(base)
    assert set(recorded) == (set(RUN_FIELDS) - set(ROW_NEUTRAL)) | set(PREPROCESS_FIELDS)
    for name, value in recorded.items():
        other = _another(name, value)
        if name in PREPROCESS_FIELDS:
            changed = dataclasses.replace(base, preprocess=dataclasses.replace(base.preprocess, **{name: other}))
        else:
            changed = dataclasses.replace(base, **{name: other})
        with pytest.raises(ConfigError, match=rf"settings {name}: "):
            check_identity(output, run_identity(changed, model, [], placed))


def test_a_zipped_model_whose_labels_file_is_inside_it_resumes(
    tmp_path: Path, made: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zip unpacks to a new private folder at each start: its labels file is recorded by its contents, not its
    path there, so the resume goes on (was: refused, the path differed every time)."""
    import zipfile

    folder, _ = made
    (folder / "labels.txt").write_text("".join(f"class{index}\n" for index in range(1000)))
    (folder / "config.yaml").write_text("class_name: Made\nlabel_map: labels.txt\n")
    archive = tmp_path / "made.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in folder.iterdir():
            zipped.write(path, f"made/{path.name}")
    inputs = images(tmp_path / "in")
    output = tmp_path / "out" / "p.csv"
    common = [str(inputs), str(output), "--model", str(archive), "--batch-size", "4", "--workers", "0"]
    monkeypatch.setenv("MADE_FAIL_FROM", "2")
    assert main([*common, "--progress", "false"]) == 4
    monkeypatch.delenv("MADE_FAIL_FROM")
    assert main([*common, "--progress", "false", "--resume"]) == 0
    assert read_rows(output)[0][1].startswith("class")


def test_the_runs_own_files_in_the_model_folder_are_never_model_files(tmp_path: Path) -> None:
    """--model DIR/model.onnx with the output in DIR: the predictions, run.json and the records are the run's, not
    the model's, so they never make a resume look like another model (was: never resumable)."""
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    output = tmp_path / "p.csv"
    for name in ("p.csv.partial", "run.json", "p.csv.resume.json", "errors.csv.partial"):
        (tmp_path / name).write_text("written by the run")
    config = build_config({"output_file": str(output), "model_dir": str(tmp_path)}, {}, {})
    recorded = model_files(tmp_path, [], outputs=run_outputs(config).files)
    assert list(recorded) == ["model.onnx"]


def test_a_refused_resume_names_what_differs_with_digests_cut_short_and_records_in_key_order(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    digest, other = "0123456789abcdef" * 4, "f" * 64
    recorded = {"model": {"weights.pt": digest}, "extra": {"b": 1, "a": 2}, "name": "x" * 63}
    record_path(output).write_text(json.dumps(recorded), encoding="utf-8")
    current = {"model": {"weights.pt": other}, "extra": None, "name": "y" * 63}
    with pytest.raises(ConfigError) as refused:
        check_identity(output, current)
    assert str(refused.value) == (
        f"--resume: {output}.partial was written by another model or other settings "
        f'(extra: {{"a": 2, "b": 1}} then, null now; '
        f'model weights.pt: "0123456789a... then, "fffffffffff... now; '
        f'name: "{"x" * 63}" then, "{"y" * 63}" now). '
        "Resume with the same ones, or run without --resume to start over."
    )


def test_a_setting_only_one_side_has_is_a_difference_and_four_are_shown_at_most(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    recorded = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "path": str(tmp_path)}
    record_path(output).write_text(json.dumps(recorded), encoding="utf-8")
    check_identity(output, {**recorded, "path": tmp_path})  # a Path is recorded as its text: the same
    with pytest.raises(ConfigError, match=r"\(amp: null then, \"bf16\" now\)"):
        check_identity(output, {**recorded, "amp": "bf16"})
    with pytest.raises(ConfigError, match=r"\(e: 5 then, null now\)"):
        check_identity(output, {key: value for key, value in recorded.items() if key != "e"})
    with pytest.raises(ConfigError) as five:
        check_identity(output, {**recorded, "a": 0, "b": 0, "c": 0, "d": 0, "e": 0})
    assert "(a: 1 then, 0 now; b: 2 then, 0 now; c: 3 then, 0 now; d: 4 then, 0 now)" in str(five.value)


def test_a_resumed_run_takes_only_a_layout_the_record_holds_as_true_or_false(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    partial_path(output).write_text("", encoding="utf-8")
    for placed, taken in ((True, True), (False, False), ("true", None), (1, None), (None, None)):
        record_path(output).write_text(json.dumps({"placed": {"channels_last": placed}}), encoding="utf-8")
        assert recorded_choice(output, "channels_last", (False, True)) is taken


def test_a_partial_file_without_a_readable_record_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    for record in (None, "{not json", "[1]"):
        record_path(output).unlink(missing_ok=True)
        if record is not None:
            record_path(output).write_text(record, encoding="utf-8")
        with pytest.raises(ConfigError) as refused:
            check_identity(output, {"a": 1})
        assert str(refused.value) == (
            f"--resume: {output}.partial has no readable record of the model and settings that wrote it "
            f"({record_path(output)}), so it cannot be continued safely. Delete it, or run without --resume to "
            "start over."
        )


RECORD_FIELDS = {
    "harness_version",
    "settings",
    "placed",
    "model_class",
    "model_files",
    "software",
    "model_source",
    "checkpoint",
    "weights",
    "transform_file",
    "label_map",
    "labels_file",
}


def test_each_thing_a_row_depends_on_is_its_own_field_of_the_record_and_changes_only_it(tmp_path: Path) -> None:
    """The record's fields, as a refused resume names them; each file by its contents (read, not None), and each
    input changed alone changes its own fields alone."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.yaml").write_text("class_name: Model\n", encoding="utf-8")
    config = build_config({"output_file": str(tmp_path / "p.csv"), "model_dir": str(folder)}, {}, {})
    files = {name: tmp_path / "elsewhere" / name for name in ("model.py", "weights.pt", "labels.txt")}
    files["model.py"].parent.mkdir()
    files["transform"] = config.transform_file
    config = dataclasses.replace(config, label_map=str(files["labels.txt"]))
    for name, path in files.items():
        path.write_text(f"the {name}\n", encoding="utf-8")
    model = {"class": "Model", "source": str(files["model.py"]), "checkpoint": str(files["weights.pt"])}
    placed = {"device": "cpu", "batch_size_total": 4, "channels_last": False}
    identity = run_identity(config, model, [], placed)
    assert set(identity) == RECORD_FIELDS and set(identity["software"]) == {"python", "packages", "installed"}
    assert identity["harness_version"] == __version__ and identity["placed"] == placed
    assert identity["model_class"] == "Model" and set(identity["model_files"]) == {
        "config.yaml",
        files["transform"].name,
    }
    for field, name in [("model_source", "model.py"), ("checkpoint", "weights.pt"), ("transform_file", "transform")]:
        assert identity[field] == file_digest(files[name]) != file_digest(files["labels.txt"]), field
    assert identity["label_map"] == "a labels file" and identity["labels_file"] == file_digest(files["labels.txt"])
    assert identity["weights"] is None
    named = run_identity(dataclasses.replace(config, label_map="objectnet"), model, [], placed)
    assert (named["label_map"], named["labels_file"]) == ("objectnet", None)
    assert run_identity(config, {**model, "weights": "ema"}, [], placed)["weights"] == "ema"
    for fields, name in [
        (["model_source"], "model.py"),
        (["checkpoint"], "weights.pt"),
        (["model_files", "transform_file"], "transform"),
        (["labels_file"], "labels.txt"),
    ]:
        files[name].write_text("edited\n", encoding="utf-8")
        changed = run_identity(config, model, [], placed)
        assert sorted(key for key in RECORD_FIELDS if changed[key] != identity[key]) == fields, name
        files[name].write_text(f"the {name}\n", encoding="utf-8")


def test_the_model_files_are_every_file_of_its_folder_but_hidden_ones_and_caches_and_every_file_it_read(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "model"
    for name in (".hidden", "__pycache__/m.cpython-311.pyc", "a.py", "sub/b.bin", ".git/config", "sub/.cache/x"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name, encoding="utf-8")
    outside = tmp_path / "outside.pt"
    outside.write_text("weights read from elsewhere", encoding="utf-8")
    read = [str(folder.resolve() / "sub" / "b.bin"), str(outside)]
    found = model_files(folder, read)
    assert found == {
        "a.py": file_digest(folder / "a.py"),
        "sub/b.bin": file_digest(folder / "sub" / "b.bin"),
        str(outside): file_digest(outside),
    }
    assert len(set(found.values())) == 3


@pytest.mark.parametrize(
    ("files", "bytes_max", "listed"),
    [
        (2, 10**6, True),  # as many files as allowed
        (3, 10**6, False),  # one more
        (2, 12, True),  # exactly the bytes allowed (two of 6)
        (2, 11, False),  # their sum over it, each under it
        (3, 10**6 * 2**10, False),  # too many files, few bytes
    ],
)
def test_a_model_folder_past_its_bounds_counts_only_the_files_loading_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int, bytes_max: int, listed: bool
) -> None:
    from harness.pipeline import identity

    monkeypatch.setattr(identity, "FOLDER_FILES_MAX", 2)
    monkeypatch.setattr(identity, "FOLDER_BYTES_MAX", bytes_max)
    folder = tmp_path / "model"
    folder.mkdir()
    for index in range(files):
        (folder / f"{index}.bin").write_text("6bytes", encoding="utf-8")
    read = str(folder.resolve() / "0.bin")
    expected = {f"{index}.bin" for index in range(files)} if listed else {"0.bin"}
    assert set(model_files(folder, [read])) == expected


def test_a_files_digest_is_its_contents_sha256_and_none_for_no_file(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    contents = bytes(range(256)) * 5000  # more than one block read
    path.write_bytes(contents)
    assert file_digest(path) == hashlib.sha256(contents).hexdigest()
    assert file_digest(None) is None and file_digest(tmp_path / "missing") is None and file_digest(tmp_path) is None


def test_a_path_in_the_record_is_written_as_its_text(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    record_identity(output, {"model": tmp_path / "m.py"})
    assert json.loads(record_path(output).read_text(encoding="utf-8")) == {"model": str(tmp_path / "m.py")}


def test_the_record_leaves_out_the_runs_own_files_and_reads_no_file_named_like_a_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    output = folder / "p.csv"
    config = build_config({"output_file": str(output), "model_dir": str(folder), "label_map": "objectnet"}, {}, {})
    output.write_text("the run's own predictions")
    model = {"class": "Model", "source": None, "checkpoint": None}
    identity = run_identity(config, model, [], {}, run_outputs(config).files)
    assert list(identity["model_files"]) == ["model.onnx"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "objectnet").write_text("a file that happens to share the map's name")
    assert run_identity(config, model, [], {})["labels_file"] is None
