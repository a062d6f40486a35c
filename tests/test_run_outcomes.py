"""Each way a run can end has its documented exit code and one line: exit 0 only with a CSV right to submit; a
fault the user can fix (numbers that are not numbers, unlistable folders, a full disk, damaged zips, a failing
model) is never a traceback, and never a wrong CSV that looks fine."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import harness.pipeline.files
from harness.cli import main
from harness.config import DEFAULT_MAX_FAILURES
from harness.errors import CheckFailedError, TooManyFailuresError
from harness.results.verdict import Verdict, failure_limit, judge
from harness.results.writer import output_folder_lock
from harness.tools.validate import validate_predictions
from tests.helpers import REPO, SAMPLES, env_without_build_args, read_rows

# A small 1000-class model, fast on the CPU: it returns NaN for bright images (mean input above 1 after the
# ImageNet normalisation; a white image is about 2), and fails from its second batch on when asked to.
TINY_MODEL = """import os
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 1000)
        self.batches = 0
        if os.environ.get("TINY_EXIT"):
            raise SystemExit(int(os.environ["TINY_EXIT"]))

    def forward(self, x):
        self.batches += 1
        if os.environ.get("TINY_FAIL_FROM") and self.batches > int(os.environ["TINY_FAIL_FROM"]):
            raise ValueError("the weights went missing")
        out = self.fc(x.float().mean((2, 3)))
        bright = x.float().mean((1, 2, 3)) > 1.0
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)
"""


def tiny_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(TINY_MODEL)
    (folder / "config.yaml").write_text("class_name: Tiny\n")
    return folder


def image_set(folder: Path, kinds: list[str]) -> Path:
    """One file per kind, in order: 'good' (a real photo), 'bad' (unreadable bytes), 'white' (NaN for Tiny)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, kind in enumerate(kinds):
        path = folder / f"{index:03d}-{kind}.png"
        if kind == "good":
            shutil.copy(SAMPLES / "coffee.png", path)
        elif kind == "bad":
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    return folder


def run(images: Path, output: Path, model: Path, *options: str) -> int:
    return main([str(images), str(output), "--model-dir", str(model), "--progress", "false", *options])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model")


def test_non_finite_outputs_are_failure_rows(tmp_path: Path, model: Path) -> None:
    images = image_set(tmp_path / "in", ["good", "white", "good"])
    output = tmp_path / "out" / "p.csv"
    assert run(images, output, model, "--max-failures", "1") == 0
    rows = read_rows(output)
    assert rows[1] == ["001-white.png", *["", "0"] * 5] and "nan" not in output.read_text()
    reason = "the model's output is not a finite number (NaN or infinity)"
    assert read_rows(output.with_name("errors.csv")) == [["001-white.png", reason]]
    assert json.loads(output.with_name("run.json").read_text())["failures"] == 1
    assert run(images, output, model, "--max-failures", "0") == 7


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--std", "nan"),
        ("--mean", "inf"),
        ("--max-failures", "nan"),
        ("--crop-pct", "nan"),
        ("--decode-timeout", "inf"),
        ("--decode-timeout", "nan"),
        ("--decode-timeout", "1e10"),
        ("--decode-timeout", "0"),
    ],
)
def test_numbers_that_are_not_numbers_are_refused_before_any_work(
    tmp_path: Path, model: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "p.csv"
    assert run(image_set(tmp_path / "in", ["good"]), output, model, option, value) == 2
    assert not output.parent.exists() or not any(output.parent.iterdir())
    assert option.strip("-").replace("-", "_") in capsys.readouterr().err


def test_a_timeout_of_none_switches_it_off(tmp_path: Path, model: Path) -> None:
    assert run(image_set(tmp_path / "in", ["good"]), tmp_path / "p.csv", model, "--decode-timeout", "none") == 0


def _unlistable(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Listing a folder called `name` fails as it does for a folder without read permission (root reads any)."""
    real = os.scandir

    def scandir(path: str):  # type: ignore[no-untyped-def]
        if os.path.basename(path) == name:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(harness.pipeline.files.os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_stops_the_run_or_is_skipped_and_counted(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = image_set(tmp_path / "in", ["good", "good"])
    image_set(images / "locked", ["good"])
    _unlistable(monkeypatch, "locked")
    output = tmp_path / "out" / "p.csv"
    assert run(images, output, model) == 3
    assert "locked/ (Permission denied)" in capsys.readouterr().err and not output.exists()
    assert run(images, output, model, "--skip-unreadable-folders", "--max-failures", "1") == 0
    assert read_rows(output.with_name("errors.csv")) == [["locked/", "folder cannot be listed: Permission denied"]]
    assert json.loads(output.with_name("run.json").read_text())["failures"] == 1
    assert run(images, output, model, "--skip-unreadable-folders", "--max-failures", "0") == 7
    if os.geteuid() != 0:  # the real thing, where permissions bind
        monkeypatch.undo()
        (images / "locked").chmod(0)
        assert run(images, output, model) == 3


def test_folders_nested_a_thousand_deep(tmp_path: Path, model: Path) -> None:
    (tmp_path / "in").mkdir()
    fd = os.open(tmp_path / "in", os.O_RDONLY)
    for _ in range(1000):  # relative to the last folder: pathlib and os.makedirs recurse per level themselves
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    with open(os.open("x.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write((SAMPLES / "coffee.png").read_bytes())
    os.close(fd)
    output = tmp_path / "p.csv"
    try:
        assert run(tmp_path / "in", output, model) == 0
        assert read_rows(output)[0][0] == "d/" * 1000 + "x.png"
    finally:  # pytest's own clean-up of old temporary folders recurses per level
        subprocess.run(["rm", "-rf", str(tmp_path / "in")], check=True)


@pytest.mark.equivalence
def test_resume_refuses_other_settings_and_continues_the_same(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    images = image_set(tmp_path / "in", ["good"] * 10)
    reference = tmp_path / "ref" / "p.csv"
    assert run(images, reference, model, "--batch-size", "4", "--workers", "0") == 0
    output = tmp_path / "out" / "p.csv"
    monkeypatch.setenv("TINY_FAIL_FROM", "2")  # after the probe and one batch: exit 4, the first batch's rows kept
    assert run(images, output, model, "--batch-size", "4", "--workers", "0") == 4
    assert "the weights went missing" in capsys.readouterr().err
    partial = output.with_name("p.csv.partial")
    kept = partial.read_bytes()
    assert len(read_rows(partial)) == 4
    monkeypatch.delenv("TINY_FAIL_FROM")
    for other, named in [
        (["--softmax", "false"], "softmax"),
        (["--label-map", "objectnet-legacy"], "label_map"),
        (["--topk", "3"], "topk"),
        (["--input-size", "200"], "settings input_size: 224 then, 200 now"),
        (["--batch-size", "2"], "batch_size_total"),
        (["--fold-batchnorm", "false"], "fold_batchnorm"),
    ]:
        options = ["--batch-size", "4", "--workers", "0", *other, "--resume"]
        assert run(images, output, model, *options) == 2, other
        assert named in capsys.readouterr().err and partial.read_bytes() == kept
    (model / "model.py").write_text(TINY_MODEL.replace("manual_seed(0)", "manual_seed(1)"))
    assert run(images, output, model, "--batch-size", "4", "--workers", "0", "--resume") == 2
    assert "model_source" in capsys.readouterr().err and partial.read_bytes() == kept
    (model / "model.py").write_text(TINY_MODEL)
    assert run(images, output, model, "--batch-size", "4", "--workers", "0", "--resume") == 0
    assert output.read_bytes() == reference.read_bytes()
    assert not output.with_name("p.csv.resume.json").exists()


def test_every_image_unreadable_is_exit_7_with_the_csv_written(tmp_path: Path, model: Path) -> None:
    output = tmp_path / "p.csv"
    assert run(image_set(tmp_path / "in", ["bad", "bad"]), output, model) == 7
    assert read_rows(output) == [[f"00{i}-bad.png", *["", "0"] * 5] for i in range(2)]
    assert json.loads(output.with_name("run.json").read_text())["status"] == "too many failures"


def _limited(limit: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.equivalence
def test_a_full_disk_is_exit_6_and_resume_goes_on(tmp_path: Path, model: Path) -> None:
    images = image_set(tmp_path / "in", ["good"] * 40)
    options = ["--model-dir", str(model), "--progress", "false", "--batch-size", "4", "--workers", "0"]
    reference = tmp_path / "ref" / "p.csv"
    assert main([str(images), str(reference), *options]) == 0
    output = tmp_path / "out" / "p.csv"
    command = [sys.executable, "entrypoint.py", str(images), str(output), *options]
    env = env_without_build_args()
    # Files may grow to 2400 bytes (Python ignores SIGXFSZ, so writing past it fails as a full disk does): the
    # resume record (about 1600 bytes) and six batches of about 350 bytes fit, the seventh does not.
    full = subprocess.run(command, cwd=REPO, env=env, preexec_fn=_limited(2400), capture_output=True, text=True)
    assert full.returncode == 6, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith("harness: error: cannot write") and "free on" in full.stderr
    assert "Traceback" not in full.stderr
    partial = output.with_name("p.csv.partial")
    assert partial.read_bytes() == reference.read_bytes()[: len(partial.read_bytes())]
    assert len(read_rows(partial)) == 24 and partial.read_bytes().endswith(b"\n")
    assert not output.with_name("run.json.partial").exists()
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert output.read_bytes() == reference.read_bytes()


def test_damaged_zips_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model/model.py", TINY_MODEL)
        archive.writestr("model/config.yaml", "class_name: Tiny\n")
    data = bytearray(good.read_bytes())
    position = data.index(b"class Tiny")
    data[position] ^= 0xFF  # one stored byte changed: the CRC no longer matches
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(tmp_path / "clash.zip", "w") as archive:
        archive.writestr("model/model.py", TINY_MODEL)
        archive.writestr("model/model.py/inner.txt", "a folder where the file is")
    for name, message in [("crc.zip", "is damaged"), ("clash.zip", "cannot be unpacked")]:
        code = main([str(SAMPLES), str(tmp_path / "p.csv"), "--model-dir", str(tmp_path / name), "--progress", "false"])
        err = capsys.readouterr().err
        assert code == 4 and message in err and "Traceback" not in err, err


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/model.py", TINY_MODEL)
        archive.writestr("model/weights.pth", bytes(64 * 2**20))  # 64 MiB of zeros in about 64 KiB
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    os.environ["TMPDIR"] = str(temporary)
    try:
        code = main([str(SAMPLES), str(tmp_path / "p.csv"), "--model-dir", str(bomb), "--progress", "false"])
    finally:
        del os.environ["TMPDIR"]
    assert code == 4 and "as a zip bomb does" in capsys.readouterr().err
    assert sum(f.stat().st_size for f in temporary.rglob("*") if f.is_file()) == 0


def test_a_model_that_fails_after_the_first_batch(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TINY_FAIL_FROM", "2")  # the probe's blank image, then one batch
    output = tmp_path / "p.csv"
    assert run(image_set(tmp_path / "in", ["good"] * 3), output, model, "--batch-size", "2", "--workers", "0") == 4
    err = capsys.readouterr().err
    assert "ValueError: the weights went missing" in err and "Traceback" not in err
    assert len(read_rows(output.with_name("p.csv.partial"))) == 2 and not output.exists()


def test_a_folder_where_a_file_is_written_is_found_before_any_work(tmp_path: Path, model: Path) -> None:
    output = tmp_path / "out" / "p.csv"
    (output.parent / "errors.csv").mkdir(parents=True)
    assert run(image_set(tmp_path / "in", ["good"]), output, model) == 6
    assert not output.exists() and not output.with_name("p.csv.partial").exists()


def test_a_second_run_on_the_same_output_is_refused_at_once(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "p.csv"
    output.parent.mkdir()
    with output_folder_lock(output.parent):  # a first run, still writing
        assert run(image_set(tmp_path / "in", ["good"]), output, model) == 6
    assert "another harness run is writing" in capsys.readouterr().err and not output.exists()


def test_a_model_calling_sys_exit_is_a_model_error(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TINY_EXIT", "3")
    assert run(image_set(tmp_path / "in", ["good"]), tmp_path / "p.csv", model) == 4
    assert "it called sys.exit(3)" in capsys.readouterr().err


def _validated(path: Path, images: Path | None = None) -> tuple[list[str], list[str]]:
    return validate_predictions(path, images)[1:]


def test_validate_and_score_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = "a.png,1,0.5,2,0.2,3,0.1,4,0.1,5,0.1"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"a.png": 1, "b.png": 2}))
    cases = {"bom": "\ufeff" + row + "\n", "blank": row + "\n\n", "plain": row + "\n"}
    for name, text in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text, encoding="utf-8")
        rejected, _ = _validated(path)
        validate_code = main(["validate", str(path)])
        score_code = main(["score", str(path), "--answers", str(answers)])
        assert (validate_code == 0) == (score_code == 0) == (not rejected), name
    images = image_set(tmp_path / "images", [])
    (images / "a.png").write_bytes(b"")
    (images / "b.png").write_bytes(b"")
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "plain.csv"), "--images", str(images)]) == 9
    err = capsys.readouterr().err
    assert "b.png has no row (scored as wrong)" in err and "would accept the file" in err and "reject" not in err
    documented = (REPO / "docs" / "tools.md").read_text()
    assert "trailing blank line" in documented and "byte-order mark" in documented


KINDS = st.lists(st.sampled_from(["good", "bad", "white"]), min_size=1, max_size=6)
LIMITS = st.sampled_from([None, "none", "0", "1", "2", "0.5", "0.01"])  # None: the option not given


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=KINDS, limit=LIMITS)
def test_exit_0_holds_exactly_when_the_csv_validates_and_the_failures_are_within_the_limit(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], limit: str | None
) -> None:
    root = tmp_path_factory.mktemp("case")
    model = tiny_model(root / "model")
    images = image_set(root / "in", kinds)
    output = root / "out" / "p.csv"
    options = ["--batch-size", "2", "--workers", "0"] + (["--max-failures", limit] if limit else [])
    code = run(images, output, model, *options)
    failures = sum(kind != "good" for kind in kinds)
    given = limit or str(DEFAULT_MAX_FAILURES)
    if given == "none":
        allowed = failures < len(kinds)
    else:
        number = float(given)
        allowed = failures <= (int(number) if number >= 1 or number == 0 else int(number * len(kinds)))
    valid = output.exists() and _validated(output, images) == ([], [])
    assert (code == 0) == (valid and allowed), (kinds, limit, code)
    assert code in (0, 7)


# ---- rows that can never be taken for others; the scorer's rules by the file's shape ----

SATURATED = """import torch


class Saturated(torch.nn.Module):
    def forward(self, x):
        if x.float().mean() > 1.0:
            raise ValueError("stopped on purpose")
        return torch.zeros(x.shape[0], 1)  # a sigmoid head saturated at exactly 0
"""


def test_a_score_of_zero_is_a_score_and_resumes_as_one(tmp_path: Path) -> None:
    """A one-score head's valid `key,0` can never be read as an image that failed (`key,` with no score): a resumed
    run keeps the zeros as rows, not as failures (was: exit 7, every zero counted as failed)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(SATURATED)
    (folder / "config.yaml").write_text("class_name: Saturated\n")
    images = image_set(tmp_path / "in", ["good", "good", "white", "good"])
    output = tmp_path / "out" / "p.csv"
    options = ["--batch-size", "2", "--workers", "0"]
    assert run(images, output, folder, *options) == 4  # the white image stops it after the first batch
    assert read_rows(output.with_name("p.csv.partial")) == [["000-good.png", "0"], ["001-good.png", "0"]]
    (images / "002-white.png").unlink()
    shutil.copy(SAMPLES / "coffee.png", images / "002-white.png")
    assert run(images, output, folder, *options, "--resume") == 0
    assert read_rows(output) == [[f"00{i}-{kind}.png", "0"] for i, kind in enumerate(["good", "good", "white", "good"])]
    assert json.loads(output.with_name("run.json").read_text())["failures"] == 0


OBJECTNET_HEAD = """import torch


class ObjectNetHead(torch.nn.Module):
    def forward(self, x):
        torch.manual_seed(0)
        return torch.randn(x.shape[0], 313)
"""


def test_a_file_of_the_challenges_shape_is_held_to_its_scorer_whatever_the_map_is_called(
    tmp_path: Path, capsys
) -> None:
    """A model with ObjectNet's own 313 classes writes ids 0..312 in five pairs (label map `none`): the scorer would
    reject two images sharing a basename in two folders, so the run is exit 9, not 0."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(OBJECTNET_HEAD)
    (folder / "config.yaml").write_text("class_name: ObjectNetHead\n")
    images = tmp_path / "in"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
        shutil.copy(SAMPLES / "coffee.png", images / sub / "same.png")
    output = tmp_path / "out" / "p.csv"
    assert run(images, output, folder) == 9
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "duplicate key same.png (first on line 1); the scorer rejects it" in said
    assert json.loads(output.with_name("run.json").read_text())["scorer_rules"] is True
    assert run(images, output, folder, "--topk", "3") == 0  # three pairs: not the challenge's file


# ---- every resource bounded, every call into the model's code its error ----


def test_an_aspect_ratio_bomb_fails_alone_before_it_is_resized(tmp_path: Path) -> None:
    """A 20000 x 1 PNG is 143 bytes and passes max_pixels, but brought to 256 on its shorter side it would be
    5,120,000 x 256: refused as that image's failure, in no time (was: 5.8 GB and 34 s for 20 of them)."""
    images = image_set(tmp_path / "in", ["good"])
    Image.new("RGB", (20000, 1), (0, 0, 0)).save(images / "strip.png")
    output = tmp_path / "out" / "p.csv"
    assert run(images, output, REPO / "model", "--max-failures", "1", "--border", "0") == 0
    reasons = dict(read_rows(output.with_name("errors.csv")))
    assert "20000 x 1 pixels resized to 256 on the shorter side would be 5120000 x 256" in reasons["strip.png"]


@pytest.mark.parametrize("option", ["--input-size", "--resize-size"])
def test_a_side_beyond_any_model_is_refused_in_one_line(tmp_path: Path, option: str, capsys) -> None:
    assert run(SAMPLES, tmp_path / "p.csv", REPO / "model", option, "30000") == 2
    assert "must be <= 8,192" in capsys.readouterr().err


MISBEHAVING = """import torch


class Misbehaving(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def WHAT(self, *args, **kwargs):
        raise RuntimeError("not today")

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)))
"""


@pytest.mark.parametrize("what", ["eval", "to"])
def test_a_model_that_raises_in_its_own_methods_is_its_error_in_one_line(tmp_path: Path, what: str, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(MISBEHAVING.replace("WHAT", what))
    (folder / "config.yaml").write_text("class_name: Misbehaving\n")
    assert run(SAMPLES, tmp_path / "p.csv", folder) == 4
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1].startswith(f"harness: error: the model's {what}(") and "RuntimeError: not today" in said[-1]


def test_a_run_stopped_while_the_model_loads_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    mark = Path("/dev/shm") / f"harness-test-{os.getpid()}-loading"
    (folder / "model.py").write_text(
        f"import pathlib, time, torch\n\nclass Slow(torch.nn.Module):\n    def __init__(self):\n"
        f"        super().__init__()\n        pathlib.Path({str(mark)!r}).touch()\n        time.sleep(60)\n"
    )
    (folder / "config.yaml").write_text("class_name: Slow\n")
    command = [sys.executable, "entrypoint.py", str(SAMPLES), str(tmp_path / "out" / "p.csv")]
    process = subprocess.Popen(
        [*command, "--model-dir", str(folder), "--progress", "false"],
        cwd=REPO,
        env=env_without_build_args(),
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):
        if mark.exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    mark.unlink(missing_ok=True)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "harness: terminated; no row was finished, so there is nothing to resume"


def test_export_onnx_refuses_a_model_folder_with_its_own_transform(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    shutil.copytree(REPO / "model", folder)
    (folder / "data_transform_description.py").write_text("class data_transform:\n    pass\n")
    assert main(["export-onnx", "--model-dir", str(folder), "--output", str(tmp_path / "m.onnx")]) == 4
    assert "is Python, which an ONNX file cannot carry" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_by_default_more_than_one_image_in_a_hundred_failing_is_exit_7(tmp_path: Path, model: Path, capsys) -> None:
    images = image_set(tmp_path / "in", ["good"] * 99 + ["bad"])
    assert run(images, tmp_path / "a" / "p.csv", model, "--batch-size", "50") == 0  # 1 of 100: within 1%
    (images / "098-good.png").write_bytes(b"broken too")
    assert run(images, tmp_path / "b" / "p.csv", model, "--batch-size", "50") == 7
    assert "2 of 100 images failed, more than --max-failures allows (1: pass" in capsys.readouterr().err


def _open_files(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


@pytest.mark.slow
def test_workers_are_fitted_to_the_open_files_limit_in_one_line(tmp_path: Path) -> None:
    """ulimit -n 48 with --workers 8: the run goes on with the workers that fit and says so (was: "Too many open
    files" from inside torch, a traceback)."""
    images = image_set(tmp_path / "in", ["good"] * 24)
    output = tmp_path / "out" / "p.csv"
    command = [sys.executable, "entrypoint.py", str(images), str(output), "--workers", "8", "--batch-size", "4"]
    done = subprocess.run(
        [*command, "--head-start", "false", "--progress", "false"],
        cwd=REPO,
        env=env_without_build_args(),
        preexec_fn=_open_files(48),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "the open-files limit (48, ulimit -n) allows 2 decoding worker(s) here, not 8" in done.stderr
    assert "Traceback" not in done.stderr and len(read_rows(output)) == 24


@pytest.mark.parametrize(
    ("given", "images", "limit"),
    [
        (None, 100, None),  # none given: any number but all
        (0, 100, 0),
        (1, 100, 1),
        (5, 100, 5),
        (1.5, 100, 1),  # a count, rounded down
        (0.01, 100, 1),  # a fraction of the images, rounded down
        (0.01, 99, 0),
        (0.5, 7, 3),
    ],
)
def test_max_failures_is_a_count_from_one_up_and_a_fraction_below_it(given: float | None, images: int, limit) -> None:
    assert failure_limit(given, images) == limit


def test_a_verdict_says_in_one_line_why_the_file_is_not_right_to_submit(tmp_path: Path) -> None:
    path, errors = tmp_path / "p.csv", tmp_path / "errors.csv"
    problems = [f"line {line}: x" for line in range(1, 6)]
    with pytest.raises(CheckFailedError) as caught:
        Verdict("invalid predictions", problems, 0, 5, 0).raise_unless_complete(path, errors)
    shown = "line 1: x; line 2: x; line 3: x (and 2 more)"
    assert str(caught.value) == f"{path} was written but is not right to submit: {shown}"
    with pytest.raises(CheckFailedError) as caught:
        Verdict("invalid predictions", problems[:3], 0, 5, 0).raise_unless_complete(path, errors)
    assert str(caught.value) == f"{path} was written but is not right to submit: line 1: x; line 2: x; line 3: x"
    with pytest.raises(TooManyFailuresError) as caught:
        Verdict("too many failures", [], 2, 5, 1).raise_unless_complete(path, errors)
    assert str(caught.value) == (
        "2 of 5 images failed, more than --max-failures allows (1: pass --max-failures N or a fraction to allow "
        f"more); the predictions were written, and {errors} says why each failed"
    )
    with pytest.raises(TooManyFailuresError) as caught:
        Verdict("too many failures", [], 5, 5, None).raise_unless_complete(path, None)
    assert str(caught.value) == (
        "every one of the 5 images failed (is the right folder mounted?); the predictions were written"
    )
    Verdict("complete", [], 1, 5, 1).raise_unless_complete(path, errors)


def test_four_problems_show_three_and_one_more(tmp_path: Path) -> None:
    problems = [f"line {line}: x" for line in range(1, 5)]
    with pytest.raises(CheckFailedError) as caught:
        Verdict("invalid predictions", problems, 0, 4, 0).raise_unless_complete(tmp_path / "p.csv", None)
    assert str(caught.value).endswith("line 1: x; line 2: x; line 3: x (and 1 more)")


@pytest.mark.parametrize(
    ("failures", "total", "max_failures", "status", "limit"),
    [
        (0, 0, None, "complete", None),  # nothing to classify: nothing failed
        (4, 5, None, "complete", None),  # no limit given: any number but all
        (5, 5, None, "too many failures", None),
        (1, 1, None, "too many failures", None),  # one image, and it failed
        (1, 5, 1, "complete", 1),
        (2, 5, 1, "too many failures", 1),
        (5, 5, 10, "complete", 10),  # a limit given allows even all
        (5, 5, 0.5, "too many failures", 2),
    ],
)
def test_a_verdict_is_the_file_the_failures_and_their_limit(
    tmp_path: Path, failures: int, total: int, max_failures: float | None, status: str, limit: int | None
) -> None:
    path = tmp_path / "p.csv"
    path.write_text("a.png,1,0.5,2,0.1,3,0.1,4,0.1,5,0.1\n")
    assert judge(path, ["a.png"], 11, True, failures, total, max_failures) == Verdict(
        status, [], failures, total, limit
    )


def test_a_file_that_breaks_the_scorers_rules_is_invalid_whatever_the_failures(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    row = ",1,0.5,2,0.1,3,0.1,4,0.1,5,0.1\n"
    path.write_text(f"x/a.png{row}y/a.png{row}")
    said = "line 2: duplicate key a.png (first on line 1); the scorer rejects it"
    keys = ["x/a.png", "y/a.png"]
    assert judge(path, keys, 11, True, 0, 2, None) == Verdict("invalid predictions", [said], 0, 2, None)
    assert judge(path, keys, 11, True, 2, 2, 1) == Verdict("invalid predictions", [said], 2, 2, 1)
    assert judge(path, keys, 11, False, 0, 2, None) == Verdict("complete", [], 0, 2, None)
