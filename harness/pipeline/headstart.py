"""The head start: the first batches are decoded while torch and the model load.

Importing torch takes seconds on one core (docs/benchmarks.md) while the other cores idle. So
the run forks decoders before that import (this module and everything it imports are torch-free) and lets them
fill the first batches into shared memory; the DataLoader then starts where they stopped. Batches keep their
usual boundaries (multiples of the batch size) and every image goes through the same `decode_sample` as in the
DataLoader, so the CSV is byte-identical with or without the head start.
"""

from __future__ import annotations

import functools
import math
import mmap
import multiprocessing
import queue
import signal
import sys
import time
from collections.abc import Iterator

import numpy as np

from harness.config import Config
from harness.pipeline.decode import decode_sample
from harness.pipeline.decode_options import Decoding
from harness.pipeline.files import ImageFile
from harness.pipeline.host import keep_freed_memory, usable_cpus, yield_cores
from harness.pipeline.tracker import DecoderTracker
from harness.pipeline.transforms import geometry

# Each decoder works this far ahead at most. A ResNet-50 folder's start (torch, then torchvision and the model,
# on one core) outlasts 4 batches on the other core, which then idled (docs/benchmarks.md).
BATCHES_PER_PROCESS = 8
MAX_BYTES = 512 * 2**20  # of decoded images held in memory before the model takes them
POLL_S = 0.5  # how often a wait for a batch checks that the decoders are alive


def start_head(config: Config, files: list[ImageFile], decoding: Decoding) -> HeadStart | None:
    """Fork the decoders over the run's `files`, or None where a head start cannot pay or does not apply.

    It needs fork (Linux), a spare core beside the one importing torch, and the harness's own geometry (a model
    folder's transform needs torch). Resumed runs and torchrun ranks start where their partial files say, which
    is known only after the model loads; `--workers 0` asks for decoding in the main process only.
    """
    if (
        not files
        or not config.head_start
        or sys.platform != "linux"
        or config.resume
        or config.world_size > 1
        or config.workers == 0
        or decoding.transform_file is not None
        or 3 * config.preprocess.input_size**2 * config.batch_size > MAX_BYTES  # not even one batch fits
    ):
        return None
    processes = usable_cpus() - 1
    return HeadStart(config, files, decoding, processes) if processes >= 1 else None


class HeadStart:
    """Decoders that claim chunks of `batch_size` images in order from a shared counter, so the finished ones are
    always the first N, and write them into one anonymous shared mapping the main process reads without a copy.
    Image i sits at i x its size in that mapping, so any run of images is one array."""

    def __init__(self, config: Config, files: list[ImageFile], decoding: Decoding, processes: int) -> None:
        if decoding.transform_file is not None:
            raise ValueError("the head start runs the harness's geometry only: a model folder's transform needs torch")
        pre = decoding.pre
        self.files = files
        self.chunk = config.batch_size
        self.shape = (3, pre.input_size, pre.input_size)
        self.sample_bytes = math.prod(self.shape)
        total = math.ceil(len(files) / self.chunk)
        self.limit = max(1, min(total, processes * BATCHES_PER_PROCESS, MAX_BYTES // (self.sample_bytes * self.chunk)))
        # MAP_SHARED and anonymous: the children write where the main process reads, and no /dev/shm is needed
        self._buffer: mmap.mmap | None = mmap.mmap(-1, self.limit * self.chunk * self.sample_bytes)
        self._decoding = decoding
        self._keep_freed_memory = config.keep_freed_memory
        self._idle = config.idle_decoders
        context = multiprocessing.get_context("fork")
        self._state = context.Array("q", 2)  # [next chunk to claim, stopped]; its lock orders claims and stop
        self._tracker = DecoderTracker(processes)
        self._done: multiprocessing.Queue[tuple[int, tuple[list[str], list[str]]]] = context.Queue()
        self._covered: int | None = None
        self._run_batch = self.chunk
        self._processes = [
            context.Process(target=self._decode, args=(slot,), name=f"head-start-{slot}", daemon=True)
            for slot in range(processes)
        ]
        for process in self._processes:
            process.start()

    def _decode(self, slot: int) -> None:
        """A decoder's life: claim the next chunk, fill it, report its errors; until stopped or at the limit."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process decides
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._keep_freed_memory:
            keep_freed_memory()
        if self._idle:  # the main process's start-up (the model's load, folds and trial) goes first
            yield_cores()
        transform = functools.partial(geometry, pre=self._decoding.pre)
        while True:
            with self._state.get_lock():
                chunk = self._state[0]
                if self._state[1] or chunk >= self.limit:
                    return
                self._state[0] = chunk + 1
            errors, seen = [], []
            for index in range(chunk * self.chunk, min((chunk + 1) * self.chunk, len(self.files))):
                self._tracker.hold(slot, index)
                path = self.files[index].path
                image, error, read = decode_sample(path, self._decoding, transform)
                self._view(index, 1)[0] = 0 if image is None else image
                errors.append(error)
                seen.append(read)
            self._tracker.release(slot)
            self._done.put((chunk, (errors, seen)))

    def _view(self, first: int, count: int) -> np.ndarray:
        flat = np.frombuffer(
            self._buffer, dtype=np.uint8, count=count * self.sample_bytes, offset=first * self.sample_bytes
        )
        return flat.reshape(count, *self.shape)

    def stop(self, run_batch: int) -> int:
        """No new chunks from now on; the ones in hand are finished. Returns how many images the run takes from
        the head start, where the DataLoader begins: whole batches of the run's size (`run_batch`, the per-GPU
        size times the GPUs, a multiple of the chunk) so every batch holds the images it would without the head
        start, or else every image."""
        with self._state.get_lock():
            self._state[1] = 1
            claimed = min(self._state[0], self.limit)
        covered = min(claimed * self.chunk, len(self.files))
        if covered < len(self.files):
            covered -= covered % run_batch
        self._covered, self._run_batch = covered, run_batch
        return covered

    def batches(self, timeout: float | None) -> Iterator[tuple[list[int], np.ndarray, list[str], list[str]]]:
        """The stopped head start's batches in order: indices, N x 3 x S x S uint8 (a view of shared memory),
        the errors ("" where an image decoded) and each file as it was read."""
        if self._covered is None:
            raise RuntimeError("HeadStart.batches() before stop()")
        arrived: dict[int, tuple[list[str], list[str]]] = {}
        for first in range(0, self._covered, self._run_batch):
            last = min(first + self._run_batch, self._covered)
            errors: list[str] = []
            seen: list[str] = []
            for chunk in range(first // self.chunk, math.ceil(last / self.chunk)):
                deadline = time.monotonic() + (math.inf if timeout is None else timeout)
                while chunk not in arrived:
                    arrived.update([self._receive(deadline)])
                chunk_errors, chunk_seen = arrived.pop(chunk)
                errors += chunk_errors
                seen += chunk_seen
            yield list(range(first, last)), self._view(first, last - first), errors, seen
        self._buffer = None  # unmapped once the model has let go of the last batch's view

    def _receive(self, deadline: float) -> tuple[int, tuple[list[str], list[str]]]:
        while True:
            try:
                return self._done.get(timeout=POLL_S)
            except queue.Empty:
                pass
            dead = [process.exitcode for process in self._processes if process.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                if not dead:
                    what = "stopped answering"
                elif dead[0] < 0:
                    what = f"was killed by signal {-dead[0]}"
                else:
                    what = f"died with exit code {dead[0]}"
                raise self._tracker.decoder_failed(f"of the head start {what}", self.files, None)

    def close(self) -> None:
        """Stop and reap the decoders; safe at any point, also when the run failed before `stop`."""
        with self._state.get_lock():
            self._state[1] = 1
        for process in self._processes:
            process.join(timeout=0 if self._covered is None else POLL_S)
            if process.is_alive():
                process.terminate()
                process.join()
        self._done.close()
        self._done.cancel_join_thread()
