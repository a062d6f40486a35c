"""The benchmark script runs all its phases on a tiny data set (a smoke test: no speed is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, env_without_build_args


@pytest.mark.slow
def test_bench_runs_every_phase_and_reports_the_figures(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "--images",
            "8",
            "--seconds",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            str(tmp_path / "bench.json"),
            "--",
            "--batch-size",
            "4",
        ],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "bench.json").read_text())
    for name in ("model_only_ips", "decode_only_ips", "end_to_end_ips", "limit_ips", "efficiency", "peak_rss_mb"):
        assert figures[name] > 0, name
    assert figures["limit_ips"] == pytest.approx(  # the figures are written to 2 decimals
        1 / (1 / figures["model_only_ips"] + 1 / figures["decode_only_ips"]), rel=1e-3, abs=0.01
    )


FAKE_TEMPLATE = '''"""Stands in for the template's objectnet_eval.py: positionals, model folder, checkpoint."""
import argparse, csv, glob, os, sys

import torch

sys.path.insert(0, "model")
import model_description
from data_transform_description import data_transform

parser = argparse.ArgumentParser()
for name in ("images", "output_file", "model_class_name", "model_checkpoint"):
    parser.add_argument(name)
args = parser.parse_args()
assert not os.path.exists(args.output_file)
model = getattr(model_description, args.model_class_name)()
model.load_state_dict(torch.load(args.model_checkpoint))
data_transform().getTransform()
with open(args.output_file, "w") as f:
    for path in sorted(glob.glob(args.images + "/**/*.png", recursive=True)):
        csv.writer(f).writerow([os.path.basename(path), 1, 1.0])
'''
FAKE_TIMM = '''"""Stands in for timm's inference.py: its options, a results CSV with a header."""
import argparse, csv, glob, os

import torch

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("--model")
parser.add_argument("--checkpoint")
parser.add_argument("-b", type=int)
parser.add_argument("-j", type=int)
parser.add_argument("--device")
parser.add_argument("--results-dir")
args = parser.parse_args()
torch.load(args.checkpoint)
with open(os.path.join(args.results_dir, f"{args.model}-224.csv"), "w") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "index"])
    for path in sorted(glob.glob(args.data + "/*.png")):
        writer.writerow([os.path.basename(path), 1])
'''


@pytest.mark.slow
def test_compare_runs_the_template_and_timm_as_their_command_lines_ask(tmp_path: Path) -> None:
    """Stand-ins with the template's and timm's command lines (the real ones are not in this repository): the
    model and its weights must reach them where they look, and every system must see every image."""
    template = tmp_path / "template"
    template.mkdir()
    (template / "objectnet_eval.py").write_text(FAKE_TEMPLATE)
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(
        "import torch\n\n\ndef create_model(name):\n    return torch.nn.Linear(2, 2)\n"
    )
    (tmp_path / "inference.py").write_text(FAKE_TIMM)
    command = [sys.executable, "scripts/bench.py", "--compare", "--images", "4", "--png-share", "1", "--runs", "1"]
    command += ["--template", str(template), "--timm-inference", str(tmp_path / "inference.py")]
    command += ["--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "compare.json")]
    env = {**env_without_build_args(), "PYTHONPATH": str(tmp_path)}  # the stand-in timm package
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    systems = json.loads((tmp_path / "compare.json").read_text())["systems"]
    assert sorted(systems) == ["harness", "template", "timm"]
    assert all(figures["rows"] == 4 and figures["median_s"] > 0 for figures in systems.values())
    assert systems["harness"]["over_harness"] == 1


@pytest.mark.slow
def test_against_runs_the_working_tree_and_a_ref_in_turns_and_judges_them(tmp_path: Path) -> None:
    """HEAD against itself: both run whole on every image, the figures and their ratios are reported, and the
    temporary worktree is gone afterwards."""
    command = [sys.executable, "scripts/bench.py", "--against", "HEAD", "--images", "4", "--png-share", "1"]
    command += ["--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "against.json")]
    result = subprocess.run(command, cwd=REPO, env=env_without_build_args(), capture_output=True, text=True)
    figures = json.loads((tmp_path / "against.json").read_text())
    assert figures["rows"] == {"working tree": 4, "HEAD": 4}
    assert sorted(figures["figures"]) == ["cpu", "model load", "peak memory", "peak memory (PSS)", "wall"]
    assert all(len(each["working_tree"]) == 2 and each["ratio"] > 0 for each in figures["figures"].values())
    assert result.returncode == (1 if figures["verdict"] else 0) and "| wall |" in result.stderr
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert "harness-bench-" not in worktrees


def test_against_markdown_adds_one_row_a_release_under_its_own_heading(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "BENCHMARKS", tmp_path / "benchmarks.md")
    ratios = (0.98, 0.99, 3.2, 1.07, 0.9)
    figures = {figure: {"ratio": ratio} for figure, ratio in zip(bench.AGAINST_FIGURES, ratios, strict=True)}
    result = {"machine": "m", "torch": "t", "against": "a124840", "model": "resnet50", "images": 512, "runs": 3}
    for verdict in ([], ["model load 3.20x a124840's"]):
        bench.against_row({**result, "figures": figures, "verdict": verdict})
    lines = (tmp_path / "benchmarks.md").read_text().splitlines()
    assert lines.count(bench.AGAINST_HEADING) == 1
    cells = "| a124840 | resnet50 | 512 | 3 | 0.980 | 0.990 | 3.200 | 1.070 | 0.900 |"
    rows = [line for line in lines if cells in line]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == ["no regression", "model load 3.20x a124840's"]


def test_a_compare_row_says_the_png_share_and_who_wrote_fewer_rows(tmp_path: Path, monkeypatch) -> None:
    """The template reads PNGs only: on a mixed set it writes fewer rows, and its seconds are for less work."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "BENCHMARKS", tmp_path / "benchmarks.md")
    systems = {
        "harness": {"median_s": 8.81, "over_harness": 1.0, "rows": 512, "peak_rss_main_mb": 1138.9},
        "template": {"median_s": 25.44, "over_harness": 2.886, "rows": 265, "peak_rss_main_mb": 837.0},
    }
    result = {"machine": "m", "device": "cpu", "model": "efficientnet_lite0", "images": 512, "png_share": 0.5}
    row = bench.compare_row({**result, "runs": 3, "systems": systems})
    assert "| efficientnet_lite0 | 512, 50% PNG | 3 | 8.8 | 25.4 (265 rows) | - | 2.89 | - | 1139, 837, - |" in row
    assert row in (tmp_path / "benchmarks.md").read_text()


def test_the_memory_probe_reads_the_costly_pss_spaced_by_its_own_cost(tmp_path: Path, monkeypatch) -> None:
    """Read every 0.1 s, smaps_rollup took a sixth of two cores from the run it measured: a read that takes 50 ms
    waits 2.5 s for the next, while the cheap figures are polled every 0.1 s."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)
    spec.loader.exec_module(bench)
    reads: dict[str, int] = {}
    real = bench._proc_bytes

    def counted(pid: int, file: str, field: str) -> int:
        reads[file] = reads.get(file, 0) + 1
        if file == "smaps_rollup":
            time.sleep(0.05)
        return real(pid, file, field)

    monkeypatch.setattr(bench, "_proc_bytes", counted)
    measured = bench.measured_run([sys.executable, "-c", "import time; time.sleep(1.5)"], tmp_path)
    assert reads["smaps_rollup"] == 1 and reads["status"] >= 8
    assert measured.pss_mb > 0 and measured.peak_mb > 0
