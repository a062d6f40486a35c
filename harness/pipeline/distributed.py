"""One process per GPU (or per node) under torchrun: each rank classifies a contiguous slice of the sorted file
list into its own part files, then rank 0 merges the parts in rank order and checks one row per image.

    torchrun --nproc_per_node=N entrypoint.py IN OUT ...                 # one machine
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=RUN entrypoint.py IN OUT ...  # M machines, same IN and OUT folder

Slices are whole batches, never overlap and are not padded (DistributedSampler would repeat images to even them
out). The ranks only exchange small status objects over gloo, so this works on CPUs and GPUs alike; across
machines the output folder must be shared (the part files meet there).
"""

from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta

import torch.distributed as dist

from harness.config import Config
from harness.console import say
from harness.errors import ConfigError, HarnessError, PipelineError, describe_user_error, error_type
from harness.pipeline.decode_options import Decoding
from harness.pipeline.files import Discovery, shard
from harness.pipeline.host import usable_cpus
from harness.pipeline.runner import finish, prepare
from harness.results.gate import make_folder, remove_folder, replace_output
from harness.results.outputs import part_output, parts_folder
from harness.results.report import RunReport
from harness.results.writer import AtomicCsvWriter, iter_rows, partial_path


def part_config(config: Config) -> Config:
    """This rank's run: its own output folder and its share of the cores for decoding. Torch threads are left to
    torchrun (OMP_NUM_THREADS=1 per process unless set) or --threads: on the CPU the thread count changes the last
    digit of some scores, so the merged CSV equals a single run's with the same --threads."""
    cores = max(1, usable_cpus() // config.local_world_size)
    return dataclasses.replace(
        config,
        output_file=part_output(config.output_file, config.rank),
        workers=cores if config.workers is None else config.workers,
        progress=config.progress and config.rank == 0,
    )


def reopen_finished_part(part: Config) -> None:
    """A rank that finished its part before another rank failed has committed it (and kept its resume record):
    for `--resume` that part is a partial file holding every row, so the rank checks it was written by the same
    model and settings and redoes at most its last short batch, instead of its whole share."""
    for path in (part.output_file, part.errors_csv):
        if path.exists() and not partial_path(path).exists():
            replace_output(path, partial_path(path))


FINISH_TIMEOUT = timedelta(hours=6)  # how long a rank that finished its share waits for the slowest one


def _meet(config: Config) -> dist.ProcessGroup:
    """Join the other ranks, waiting at most --dist-timeout for them (a missing one is exit 2, never a hang), in a
    thread: the main thread stays free to take SIGTERM (docker stop) while it waits. The group returned, for the
    final exchange, waits up to FINISH_TIMEOUT: the ranks finish their shares at different times."""
    joined: dict[str, object] = {}

    def join() -> None:
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=config.dist_timeout))
            joined["group"] = dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT)
        except Exception as error:  # the store's or gloo's own timeout or refusal
            joined["error"] = error

    where = f"{config.master_addr}:{config.master_port}"
    who = f"rank {config.rank} of {config.world_size}"
    say(f"{who}: meeting the others at {where} (--dist-timeout {config.dist_timeout:g} s)")
    thread = threading.Thread(target=join, name="rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in joined:
        raise ConfigError(
            f"{who} could not meet the others at {where} within --dist-timeout "
            f"{config.dist_timeout:g} s ({describe_user_error(joined['error'])}): start every rank (torchrun), or "
            "give them longer"
        )
    group = joined["group"]
    assert isinstance(group, dist.ProcessGroup)
    return group


def run_sharded(config: Config, found: Discovery, decoding: Decoding) -> RunReport:
    """Classify this rank's share of the files (every rank found the same sorted list); rank 0 then merges the
    parts and judges the whole run. A rank that failed makes every rank fail with its error and exit code."""
    group = _meet(config)
    try:
        part = part_config(config)
        try:
            make_folder(part.output_file.parent)
            if config.resume:
                reopen_finished_part(part)
            mine = Discovery(shard(found.files, config.rank, config.world_size, config.batch_size), [])
            report, error = prepare(part, mine, decoding).classify(), None
        except HarnessError as failure:
            report, error = None, failure
        outcome = {"rank": config.rank, "error": str(error) if error else None}
        outcome["exit_code"] = error.exit_code if error else 0
        if report is not None:
            outcome.update(images=report.images, failures=report.failures)
        outcomes: list[dict] = [{} for _ in range(config.world_size)]
        try:
            dist.all_gather_object(outcomes, outcome, group=group)
        except RuntimeError as gone:  # gloo's word for a peer that died: this rank says so, in one line
            if error is not None:
                raise error from gone
            raise PipelineError(
                f"rank {config.rank} of {config.world_size} finished its share, but another rank stopped answering "
                f"({describe_user_error(gone).split('. ')[0][:160]}): that rank's own line says why; rerun every rank "
                "with --resume"
            ) from gone
        if error is not None:
            raise error
        failed = [o for o in outcomes if o["error"]]
        if failed:
            raise error_type(failed[0]["exit_code"])(f"rank {failed[0]['rank']} failed: {failed[0]['error']}")
        assert report is not None
        if config.rank == 0:
            report = merge(config, report, outcomes, found)
        dist.barrier(group=group)
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def merge(config: Config, report: RunReport, outcomes: list[dict], found: Discovery) -> RunReport:
    """Concatenate the part files in rank order into the real outputs, after checking that every image came out
    exactly once and in input order, and add the folders that were skipped; then judge the whole run."""
    folder = parts_folder(config.output_file)
    expected = [image.key for image in found.files]
    keys: list[str] = []
    with AtomicCsvWriter(config.output_file) as predictions, AtomicCsvWriter(config.errors_csv) as errors:
        for rank in range(config.world_size):
            part = folder / f"rank{rank}"
            for name, writer in ((config.output_file.name, predictions), (config.errors_csv.name, errors)):
                for row in iter_rows(part / name):
                    writer.write(row)
                    if writer is predictions:
                        keys.append(row[0])
        if keys != expected:
            raise HarnessError(
                f"the ranks wrote {len(keys)} rows for {len(expected)} images, not exactly one per image in order; "
                f"the parts are kept in {folder}"
            )
        for key, reason in found.unreadable:
            errors.write([key, reason])
        predictions.commit()
        errors.commit()
    remove_folder(folder)
    report.images = sum(o["images"] for o in outcomes)
    report.failures = sum(o["failures"] for o in outcomes) + len(found.unreadable)
    report.total = len(found.files) + len(found.unreadable)
    report.skipped = found.skipped
    report.output = str(config.output_file)
    report.config = config.to_dict()
    return finish(config, report, expected)
