"""Throughput benchmark (not a test): how close a whole run comes to what the model and the decoder allow.

    python scripts/bench.py --model efficientnet_lite0 --images 512 [--markdown] [--json FILE] [-- HARNESS OPTIONS]

It makes a seeded ObjectNet-like data set from the photos in sample-images/ (PNG and JPEG mixed, long side
480..1280 px, a 2 px red frame), then measures, each in its own process with the same environment (malloc
settings only take effect when a process starts):

- model_only_ips: normalise + forward on ready device tensors at the run's batch size and precision;
- decode_only_ips: the harness's decode + frame strip + resize/crop in its DataLoader, every usable core, no model;
  both are measured before and after the end-to-end run and averaged (a shared machine's speed drifts);
- end_to_end_ips: `python entrypoint.py DIR OUT ...`, process start to CSV written;
- limit_ips: min(model, decode) on a GPU; on the CPU both share the cores, so 1 / (1/model + 1/decode);
- efficiency: end_to_end / limit; peak_rss_mb: the run's whole process tree (main + workers) and
  peak_rss_main_mb: the main process alone (its VmHWM), both polled from /proc every 0.1 s (the tree's PSS, for
  --against, less often: reading it costs the run CPU time, PSS_SPACING).

Options after `--` go to the harness in every phase (e.g. `-- --batch-size 32 --workers 1`).

    python scripts/bench.py --compare --png-share 1 [--template DIR] [--timm-inference FILE] [--runs N] [--markdown]

runs whole processes only, in turns: the harness, the ObjectNet challenge template (a checkout of it, copied, the
benchmark's model put in its model/ folder with its weights in a file, run with the template's own defaults, its
cpu_objectnet_eval.py on the CPU where it has one) and timm's inference.py (`-b 32 -j 2`, timm's model of the same
name, seeded random weights from a file); it reports the median seconds, the rows each wrote, their memory, and
the others' time over the harness's.

    python scripts/bench.py --against REF [--runs N] [--model resnet50] [--markdown] [-- HARNESS OPTIONS]

runs the working tree and the harness as it was at the git ref REF (checked out in a temporary worktree, its
model folder the same) in turns on the same images, and reports the working tree's wall time, CPU time (its
process tree's), model load (run.json) and peak memory (the tree's RSS summed, and its PSS: the RSS sum counts a
page the workers share with the main process once in each) over REF's, with the verdict: slower or bigger by more
than the rounds' own spread is a regression. Run it against the previous release before a stop that touches the
pipeline or the models; `--markdown` adds its row to docs/benchmarks.md (one a release).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.config import Config

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample-images"
MODELS = ("efficientnet_lite0", "resnet50")
FRAME_PX = 2
FRAME_RGB = (255, 0, 0)

RESNET50_PY = '''"""ResNet-50 from torchvision with seeded random weights: a benchmark stand-in for a heavier model."""

import torch
from torchvision.models import resnet50


class ResNet50(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = resnet50(weights=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
'''
RESNET50_YAML = """class_name: ResNet50
preprocess:
  border: 2
  input_size: 224
  resize_size: 256
  interpolation: bilinear
"""


# ---- data set ----


def make_dataset(folder: Path, count: int, png_share: float, seed: int) -> Path:
    """`count` framed images from the sample photos, sizes and formats drawn from `seed`; reused when present."""
    from PIL import Image

    target = folder / f"objectnet-like-n{count}-png{png_share:g}-s{seed}"
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.iterdir()) if p.suffix in (".png", ".jpg")]
    sources = [s for s in sources if min(s.size) >= 256]  # skip icons
    rng = random.Random(seed)
    for i in range(count):
        source = rng.choice(sources)
        long_side = rng.randint(480, 1280)
        scale = long_side / max(source.size)
        size = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
        image = source.resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        framed = Image.new("RGB", (size[0] + 2 * FRAME_PX, size[1] + 2 * FRAME_PX), FRAME_RGB)
        framed.paste(image, (FRAME_PX, FRAME_PX))
        if rng.random() < png_share:
            framed.save(target / f"{i:06d}.png", compress_level=6)
        else:
            framed.save(target / f"{i:06d}.jpg", quality=rng.randint(75, 95))
    (target / ".complete").write_text("")
    return target


def model_folder(name: str, scratch: Path, root: Path = REPO) -> Path:
    """The benchmark's model: the example in `root`'s model folder (as that checkout ships it), or ResNet-50."""
    if name == "efficientnet_lite0":
        return root / "model"
    folder = scratch / "model-resnet50"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(RESNET50_PY)
    (folder / "config.yaml").write_text(RESNET50_YAML)
    return folder


# ---- phases, each run in a child process ----


def _config(model_dir: str, data: str, harness_args: list[str]):
    from harness.options import run_config

    return run_config([*harness_args, "--model-dir", model_dir, "--input-dir", data], os.environ)


def phase_model(model_dir: str, data: str, harness_args: list[str], seconds: float) -> float:
    from harness.pipeline.host import shorten_omp_spin

    config = _config(model_dir, data, harness_args)
    shorten_omp_spin(config.omp_spin_count, os.environ)  # as the run does, before torch loads
    import torch

    from harness.models.load import load_model
    from harness.pipeline.decode_options import Decoding
    from harness.pipeline.devices import tune_process
    from harness.pipeline.files import discover
    from harness.pipeline.loader import ImageDataset
    from harness.pipeline.placement import place_model

    tune_process(config)
    files = discover(config.input_dir)
    dataset = ImageDataset.of(files, Decoding.of(config))
    placed = place_model(config, load_model(config), dataset, len(files))  # as the run does
    forward, plan, batch_size = placed.forward, placed.forward.plan, placed.batch_size
    size = config.preprocess.input_size
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8).to(plan.device)

    def step() -> None:
        forward(images).float().softmax(1)
        if plan.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    done, start = 0, time.perf_counter()
    while done < 3 or time.perf_counter() - start < seconds:
        step()
        done += 1
    return done * batch_size / (time.perf_counter() - start)


def phase_decode(model_dir: str, data: str, harness_args: list[str]) -> float:
    from harness.pipeline.decode_options import Decoding
    from harness.pipeline.devices import tune_process
    from harness.pipeline.files import discover
    from harness.pipeline.host import usable_cpus
    from harness.pipeline.loader import PREFETCH, ImageDataset, make_loader
    from harness.pipeline.runner import loader_timeout

    config = _config(model_dir, data, harness_args)
    tune_process(config)
    files = discover(config.input_dir)
    workers = usable_cpus()
    dataset = ImageDataset.of(files, Decoding.of(config))
    timeout = loader_timeout(config.decode_timeout)
    loader = make_loader(dataset, config.batch_size, workers, PREFETCH, False, timeout, config.idle_decoders)
    start, done = time.perf_counter(), 0
    for batch in loader:
        done += len(batch.indices)
    return done / (time.perf_counter() - start)


# ---- the parent: runs each phase as a child and watches the end-to-end run's memory ----


def _tree_memory_bytes(root: int, proportional: bool = True) -> tuple[int, int]:
    """Resident bytes of `root` and all its descendants (the DataLoader workers), from /proc: summed (a page the
    workers share with the main process, as forked, counts once in each) and, where `proportional`, PSS (each
    shared page split among the processes sharing it, what the run takes from the machine; else 0)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, pss, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        pss += _proc_bytes(pid, "smaps_rollup", "Pss") if proportional else 0
        stack.extend(children.get(pid, []))
    return total, pss


def _proc_bytes(pid: int, file: str, field: str) -> int:
    """A memory figure of the process from /proc/PID/FILE (its `field:` line, in kB) in bytes, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:")), 0)
    except OSError:
        return 0


@dataclass
class Measured:
    """One whole process run: wall seconds and resident memory in MB, of its tree (summed, polled) and of the
    main process alone (its own high-water mark); the tree's peak in the run's first and second half."""

    seconds: float
    peak_mb: float
    main_mb: float
    halves_mb: list[float]
    cpu_s: float = 0.0  # the process and the workers it reaped (user + system)
    pss_mb: float = 0.0  # the tree's peak proportional memory (shared pages split among their sharers)
    load_s: float = 0.0  # the model load, from the run's run.json


# The tree's PSS is read after this many times as long as its last read took: /proc/PID/smaps_rollup walks each
# process's page tables, 63 ms of CPU a read of a ResNet-50 run's four processes on the 2-core VM, and
# read every 0.1 s it took a sixth of the two cores from the run it measured (docs/benchmarks.md).
PSS_SPACING = 50


def measured_run(command: list[str], cwd: Path) -> Measured:
    """Run `command` to its end, polling its memory every 0.1 s; a failure stops the benchmark."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL)
    samples: list[tuple[float, int]] = []
    main_peak, pss_peak = [0], [0]
    finished = threading.Event()

    def watch() -> None:
        next_pss = 0.0
        while not finished.is_set():
            polled = time.perf_counter()
            summed, proportional = _tree_memory_bytes(process.pid, proportional=polled >= next_pss)
            if polled >= next_pss:  # PSS walks the page tables: tens of ms of kernel time a read
                next_pss = polled + PSS_SPACING * (time.perf_counter() - polled)
            samples.append((polled, summed))
            pss_peak[0] = max(pss_peak[0], proportional)
            main_peak[0] = max(main_peak[0], _proc_bytes(process.pid, "status", "VmHWM"))  # its own peak
            finished.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    finished.set()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bench: the run failed with exit code {process.returncode}: {' '.join(command)}")
    middle = start + seconds / 2
    halves = [max((rss for t, rss in samples if (t < middle) == first), default=0) / 2**20 for first in (True, False)]
    cpu_s = usage.ru_utime + usage.ru_stime
    return Measured(seconds, max(halves), main_peak[0] / 2**20, halves, cpu_s, pss_peak[0] / 2**20)


def end_to_end(model_dir: Path, data: Path, out: Path, harness_args: list[str]) -> Measured:
    """One whole harness run into the folder `out`, process start to CSV written: a second half above the first
    means memory grows with the images."""
    system = harness_system(model_dir, data, harness_args)
    return measured_run(system.command(out), system.cwd)


def child(phase: str, model_dir: Path, data: Path, harness_args: list[str], seconds: float) -> float:
    command = [sys.executable, __file__, "--phase", phase, "--model-dir", str(model_dir), "--data", str(data)]
    command += ["--seconds", str(seconds), "--", *harness_args]
    result = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def machine() -> str:
    from harness.pipeline.host import cpu_name, usable_cpus

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu_name()}, {usable_cpus()} usable cores, {memory:.0f} GiB"


BENCHMARKS = REPO / "docs" / "benchmarks.md"
ROWS_HEADING = "## Rows appended by `python scripts/bench.py --markdown`"
ROWS_HEADER = (
    "| date | machine | device | torch | model | images | settings | model_only | decode_only | limit | end_to_end | "
    "efficiency | peak RSS MB | main peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
COMPARE_HEADING = "## Side by side: `python scripts/bench.py --compare --markdown`"
COMPARE_HEADER = (
    "| date | machine | device | model | images | runs | harness s | template s | timm s | template / harness | "
    "timm / harness | main peak MB (harness, template, timm) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def append_row(heading: str, header: str, row: str) -> None:
    """Add `row` at the end of the table under `heading` in docs/benchmarks.md, starting that section (and the
    file) where there is none, so each kind of row keeps its own table."""
    text = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    if heading + "\n" not in lines:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{header}{row}"
    else:
        end = lines.index(heading + "\n") + 1
        while end < len(lines) and not lines[end].startswith("|"):  # to the table
            end += 1
        while end < len(lines) and lines[end].startswith("|"):  # past its last row
            end += 1
        text = "".join([*lines[:end], row, *lines[end:]])
    BENCHMARKS.parent.mkdir(exist_ok=True)
    BENCHMARKS.write_text(text, encoding="utf-8")


def markdown_row(result: dict) -> str:
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {result['machine']} | {result['device']} | {result['torch']} | "
        f"{result['model']} | {result['images']} | {result['settings'] or 'defaults'} | "
        f"{result['model_only_ips']:.1f} | {result['decode_only_ips']:.1f} | {result['limit_ips']:.1f} | "
        f"{result['end_to_end_ips']:.1f} | {result['efficiency']:.2f} | {result['peak_rss_mb']:.0f} | "
        f"{result['peak_rss_main_mb']:.0f} |\n"
    )
    append_row(ROWS_HEADING, ROWS_HEADER, row)
    return row


# ---- --compare: the same data set through the ObjectNet template and timm's inference.py, whole processes ----

TEMPLATE_TRANSFORM = '''"""The model's preprocessing as the ObjectNet template takes it (scripts/bench.py --compare)."""

from torchvision import transforms


class data_transform:
    def getTransform(self):
        return transforms.Compose(
            [
                transforms.Resize({resize}, interpolation=transforms.InterpolationMode.{interpolation}),
                transforms.CenterCrop({crop}),
                transforms.ToTensor(),
                transforms.Normalize(mean={mean}, std={std}),
            ]
        )
'''
TIMM_OPTIONS = ["-b", "32", "-j", "2"]  # as the comparison in issue 14 ran it


@dataclass
class System:
    """One way of classifying the data set, run whole: its command line for an output folder, the folder to run
    it in, and how many rows it wrote there."""

    command: Callable[[Path], list[str]]
    cwd: Path
    rows: Callable[[Path], int]


def _csv_rows(path: Path, header: bool = False) -> int:
    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.reader(f)) - int(header)


def _save_state_dict(code: str, path: Path) -> Path:
    """Save the state_dict of the `model` that `code` builds, in a child of this Python: the template and timm's
    inference.py both load their weights from a file."""
    script = f"import torch\n{code}\ntorch.save(model.state_dict(), {str(path)!r})"
    subprocess.run([sys.executable, "-c", script], check=True)
    return path


def harness_system(model_dir: Path, data: Path, harness_args: list[str], root: Path = REPO) -> System:
    """The harness of the checkout at `root` (its own package: the entry point's folder comes first on the path)."""

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            str(root / "entrypoint.py"),
            str(data),
            str(out / "predictions.csv"),
            "--model-dir",
            str(model_dir),
            "--progress",
            "false",
            *harness_args,
        ]

    return System(command, root, lambda out: _csv_rows(out / "predictions.csv"))


def template_system(template: Path, scratch: Path, model_dir: Path, data: Path, config: Config, device: str) -> System:
    """A copy of the template checkout with the benchmark's model where the template looks for it
    (model/model_description.py and model/data_transform_description.py, the class by name, its weights in a
    file), run as the template's README runs it, with its own defaults: its objectnet_eval.py asserts a GPU, so
    on the CPU its cpu_objectnet_eval.py where the checkout has one (the cpu_only branch's is objectnet_eval.py)."""
    script = "objectnet_eval.py"
    if device == "cpu" and (template / "cpu_objectnet_eval.py").is_file():
        script = "cpu_objectnet_eval.py"
    folder = scratch / "template"
    shutil.copytree(template, folder, ignore=shutil.ignore_patterns(".git"))
    (folder / "model").mkdir(exist_ok=True)
    shutil.copy(model_dir / "model.py", folder / "model" / "model_description.py")
    pre = config.preprocess
    scale = 255.0 if pre.value_scale == 255 else 1.0  # ToTensor gives 0..1
    mean = [m / scale for m in pre.mean] if pre.mean else [0.0, 0.0, 0.0]
    std = [v / scale for v in pre.std] if pre.std else [1.0, 1.0, 1.0]
    (folder / "model" / "data_transform_description.py").write_text(
        TEMPLATE_TRANSFORM.format(
            resize=pre.resize_to, interpolation=pre.interpolation.upper(), crop=pre.input_size, mean=mean, std=std
        )
    )
    load = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('bench_model', {str(model_dir / 'model.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
        f"model = module.{config.class_name}()"
    )
    weights = _save_state_dict(load, scratch / "template-weights.pth")

    def command(out: Path) -> list[str]:  # images, output file, model class, checkpoint
        return [sys.executable, script, str(data), str(out / "predictions.csv"), str(config.class_name), str(weights)]

    return System(command, folder, lambda out: _csv_rows(out / "predictions.csv"))


def timm_system(inference: Path, scratch: Path, model: str, data: Path, device: str) -> System:
    """timm's inference.py on the benchmark's model by timm's name, seeded random weights from a file (without
    --checkpoint it downloads pretrained ones), on the harness's device."""
    weights = _save_state_dict(
        f"import timm\ntorch.manual_seed(0)\nmodel = timm.create_model({model!r})", scratch / "timm-weights.pth"
    )

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            str(inference),
            str(data),
            "--model",
            model,
            "--checkpoint",
            str(weights),
            *TIMM_OPTIONS,
            "--device",
            device,
            "--results-dir",
            str(out),
        ]

    return System(command, REPO, lambda out: sum(_csv_rows(path, header=True) for path in out.glob("*.csv")))


Runs = dict[str, list[Measured]]


def in_turns(systems: dict[str, System], scratch: Path, rounds: int) -> tuple[Runs, dict[str, int]]:
    """Whole runs of each system in turns, the order reversed every other round (so drift on a shared machine falls
    on each alike): each one's runs, and the rows it wrote."""
    runs: Runs = {}
    rows: dict[str, int] = {}
    names = list(systems)
    for round_ in range(rounds):
        for number, name in enumerate(names if round_ % 2 == 0 else names[::-1]):
            out = scratch / f"run-{round_}-{number}"
            out.mkdir()
            runs.setdefault(name, []).append(measured_run(systems[name].command(out), systems[name].cwd))
            runs[name][-1].load_s = _load_seconds(out / "run.json")
            rows[name] = systems[name].rows(out)
    return runs, rows


def _load_seconds(report: Path) -> float:
    """The model load's seconds as the run's own report gives them (0 where it gives none)."""
    try:
        return float(json.loads(report.read_text())["timings"]["load_model_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def compare(args: argparse.Namespace, data: Path, harness_args: list[str]) -> dict:
    """Whole runs of the harness, the template and timm on `data`, in turns, the order reversed every other round
    (so drift on a shared machine falls on each alike), `args.runs` rounds: seconds, rows written and memory."""
    import torch

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as folder:
        scratch = Path(folder)
        model_dir = model_folder(args.model, scratch)
        systems = {"harness": harness_system(model_dir, data, harness_args)}
        if args.template:
            config = _config(str(model_dir), str(data), harness_args)
            systems["template"] = template_system(args.template.resolve(), scratch, model_dir, data, config, device)
        if args.timm_inference:
            systems["timm"] = timm_system(args.timm_inference.resolve(), scratch, args.model, data, device)
        runs, rows = in_turns(systems, scratch, args.runs)
    harness_s = statistics.median(m.seconds for m in runs["harness"])
    result: dict = {"model": args.model, "images": args.images, "png_share": args.png_share, "device": device}
    result.update(machine=machine(), torch=torch.__version__, runs=args.runs, systems={})
    for name, each in runs.items():
        median = statistics.median(m.seconds for m in each)
        result["systems"][name] = {
            "seconds": [round(m.seconds, 2) for m in each],
            "median_s": round(median, 2),
            "images_per_s": round(args.images / median, 2),
            "over_harness": round(median / harness_s, 3),
            "rows": rows[name],  # fewer than the images: that system skipped some (the template's file pattern?)
            "peak_rss_main_mb": round(max(m.main_mb for m in each), 1),
            "peak_rss_mb": round(max(m.peak_mb for m in each), 1),
        }
    return result


# ---- --against REF: the working tree beside an earlier version of itself ----

AGAINST_FIGURES = {
    "wall": "seconds",
    "cpu": "cpu_s",
    "model load": "load_s",
    "peak memory": "peak_mb",  # the tree's summed RSS
    "peak memory (PSS)": "pss_mb",
}
NOISE_FLOOR = 0.03  # the least spread a verdict allows: two runs of one version rarely agree closer


def against(args: argparse.Namespace, data: Path, harness_args: list[str]) -> dict:
    """The working tree and `args.against` (a temporary git worktree, each with its own model folder) in turns;
    per figure the working tree's median over REF's, and the verdict."""
    import torch

    with tempfile.TemporaryDirectory(prefix="harness-bench-") as folder:
        scratch = Path(folder)
        tree = scratch / "ref"
        git = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*git, "add", "--detach", "--quiet", str(tree), args.against], check=True)
        try:
            systems = {
                "working tree": harness_system(model_folder(args.model, scratch), data, harness_args),
                args.against: harness_system(model_folder(args.model, scratch, tree), data, harness_args, tree),
            }
            runs, rows = in_turns(systems, scratch, args.runs)
        finally:
            subprocess.run([*git, "remove", "--force", str(tree)], check=False)
    result: dict = {"model": args.model, "images": args.images, "png_share": args.png_share, "against": args.against}
    result.update(machine=machine(), torch=torch.__version__, runs=args.runs, rows=rows, figures={}, verdict=[])
    new, old = runs["working tree"], runs[args.against]
    for figure, field in AGAINST_FIGURES.items():
        mine, theirs = ([getattr(m, field) for m in each] for each in (new, old))
        ratio = statistics.median(mine) / statistics.median(theirs) if statistics.median(theirs) else float("nan")
        noise = max(NOISE_FLOOR, _spread(mine), _spread(theirs))
        result["figures"][figure] = {"working_tree": _rounded(mine), args.against: _rounded(theirs)}
        result["figures"][figure].update(ratio=round(ratio, 3), noise=round(noise, 3))
        if ratio > 1 + noise:
            result["verdict"].append(f"{figure} {ratio:.2f}x {args.against}'s (beyond the runs' spread of {noise:.0%})")
    return result


def _spread(values: list[float]) -> float:
    """How far one version's runs lie apart, over their median."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else 0.0


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


def against_table(result: dict) -> str:
    """The figures as a table for a closing note, the verdict last."""
    ref = result["against"]
    lines = [f"| figure | working tree (median) | {ref} (median) | ratio | spread |", "|---|---|---|---|---|"]
    for figure, values in result["figures"].items():
        mine, theirs = statistics.median(values["working_tree"]), statistics.median(values[ref])
        lines.append(f"| {figure} | {mine:.2f} | {theirs:.2f} | {values['ratio']:.3f} | {values['noise']:.0%} |")
    verdict = "; ".join(result["verdict"]) or f"no regression against {ref}"
    return "\n".join([*lines, "", f"verdict: {verdict}"])


AGAINST_HEADING = "## Against the previous release: `python scripts/bench.py --against REF --markdown`"
AGAINST_HEADER = (
    "| date | machine | torch | commit | against | model | images | runs | wall | cpu | model load | peak memory "
    "| peak memory (PSS) | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def against_row(result: dict) -> str:
    """One row a release: the working tree's commit, each figure's ratio over REF's (medians), the verdict."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    ratios = " | ".join(f"{result['figures'][figure]['ratio']:.3f}" for figure in AGAINST_FIGURES)
    verdict = "; ".join(result["verdict"]) or "no regression"
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {result['machine']} | {result['torch']} | {commit} | {result['against']} | "
        f"{result['model']} | {result['images']} | {result['runs']} | {ratios} | {verdict} |\n"
    )
    append_row(AGAINST_HEADING, AGAINST_HEADER, row)
    return row


def compare_row(result: dict) -> str:
    systems = result["systems"]

    def cell(name: str, key: str, form: str) -> str:
        return format(systems[name][key], form) if name in systems else "-"

    def seconds(name: str) -> str:  # a system that wrote fewer rows than there are images did less of the work
        rows = systems.get(name, {}).get("rows", result["images"])
        return cell(name, "median_s", ".1f") + (f" ({rows} rows)" if rows != result["images"] else "")

    mains = ", ".join(cell(name, "peak_rss_main_mb", ".0f") for name in ("harness", "template", "timm"))
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {result['machine']} | {result['device']} | {result['model']} | "
        f"{result['images']}, {result['png_share']:.0%} PNG | {result['runs']} | {seconds('harness')} | "
        f"{seconds('template')} | {seconds('timm')} | "
        f"{cell('template', 'over_harness', '.2f')} | {cell('timm', 'over_harness', '.2f')} | {mains} |\n"
    )
    append_row(COMPARE_HEADING, COMPARE_HEADER, row)
    return row


def main() -> None:
    sys.path.insert(0, str(REPO))
    args = _parser().parse_args()
    if args.phase:
        if args.phase == "model":
            value = phase_model(args.model_dir, args.data, args.harness_args, args.seconds)
        else:
            value = phase_decode(args.model_dir, args.data, args.harness_args)
        print(value)
        return
    harness_args = ["--device", args.device, *args.harness_args]
    load_before = os.getloadavg()[0]
    data = make_dataset(args.cache, args.images, args.png_share, args.seed)
    if args.against:
        result = against(args, data, harness_args)
        result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        report(result, args.json, against_row if args.markdown else None)
        print(against_table(result), file=sys.stderr)
        sys.exit(1 if result["verdict"] else 0)
    if args.compare:
        result = compare(args, data, harness_args)
        result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        report(result, args.json, compare_row if args.markdown else None)
        return
    result = measure(args, data, harness_args)
    result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # other work on the machine skews it
    report(result, args.json, markdown_row if args.markdown else None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="efficientnet_lite0")
    parser.add_argument("--device", default="auto", help="the harness's --device")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--png-share", type=float, default=0.5, help="fraction of the images saved as PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "harness-bench")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to time model_only")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--markdown", action="store_true", help="append a row to docs/benchmarks.md")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="whole runs only: the harness beside the ObjectNet template and timm's inference.py (those given)",
    )
    parser.add_argument("--template", type=Path, help="with --compare: a checkout of the ObjectNet template")
    parser.add_argument("--timm-inference", type=Path, help="with --compare: timm's inference.py (timm installed)")
    parser.add_argument(
        "--against", metavar="REF", help="whole runs only: the working tree beside the harness at git ref REF"
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="with --compare or --against: rounds of runs, medians reported"
    )
    parser.add_argument("--phase", choices=("model", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("harness_args", nargs="*", help="options passed to the harness (after --)")
    return parser


def measure(args: argparse.Namespace, data: Path, harness_args: list[str]) -> dict:
    """The model alone and the decoders alone, each before and after one whole run, and that run: its speed
    against the slower of the two (the two's sum of times on a CPU, which runs both), and its memory."""
    import torch

    with tempfile.TemporaryDirectory(prefix="harness-bench-") as scratch:
        model_dir = model_folder(args.model, Path(scratch))
        # The limits are measured on both sides of the run and averaged: a shared machine's speed drifts, and a
        # limit taken only before the run would judge it against other conditions.
        model_each = [child("model", model_dir, data, harness_args, args.seconds)]
        decode_each = [child("decode", model_dir, data, harness_args, args.seconds)]
        run = end_to_end(model_dir, data, Path(scratch) / "out", harness_args)
        model_each.append(child("model", model_dir, data, harness_args, args.seconds))
        decode_each.append(child("decode", model_dir, data, harness_args, args.seconds))
        report = json.loads((Path(scratch) / "out" / "run.json").read_text())
    device, engine = report["devices"]["device"], report.get("engine", {})
    model_ips, decode_ips = statistics.mean(model_each), statistics.mean(decode_each)
    end_ips = args.images / run.seconds
    gpu = device.startswith("cuda")
    limit = min(model_ips, decode_ips) if gpu else 1 / (1 / model_ips + 1 / decode_ips)
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    png_share = [] if args.png_share == 0.5 else [f"--png-share {args.png_share:g}"]  # the data set, when not half
    result = {
        "model": args.model,
        "images": args.images,
        "png_share": args.png_share,
        "device": device,
        "machine": machine(),
        "torch": torch.__version__,
        "settings": " ".join([*png_share, *args.harness_args, *(f"{k}={v}" for k, v in malloc_env.items())]),
        "model_only_ips": round(model_ips, 2),
        "decode_only_ips": round(decode_ips, 2),
        "model_only_before_after": [round(ips, 2) for ips in model_each],
        "decode_only_before_after": [round(ips, 2) for ips in decode_each],
        "end_to_end_ips": round(end_ips, 2),
        "end_to_end_s": round(run.seconds, 2),
        "limit_ips": round(limit, 2),
        "efficiency": round(end_ips / limit, 3),
        "peak_rss_mb": round(run.peak_mb, 1),
        "peak_rss_main_mb": round(run.main_mb, 1),
        "peak_rss_halves_mb": [round(mb, 1) for mb in run.halves_mb],
        # the run's engine and its export: made now ("written"), taken from the export cache ("read"), or none
        "engine": {name: engine.get(name) for name in ("engine", "cache", "export_s")},
    }
    return result


def report(result: dict, json_path: Path | None, markdown: Callable[[dict], str] | None) -> None:
    text = json.dumps(result)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
    if markdown:
        markdown(result)


if __name__ == "__main__":
    main()
