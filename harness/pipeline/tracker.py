"""Which image each decoding process holds right now, kept where the main process can read it after that process
died or hung, so the message names the file that did it. One tracker serves the DataLoader's workers and the head
start's decoders; torch-free, since the head start forks before torch is imported."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

from harness.errors import PipelineError
from harness.pipeline.files import ImageFile

FREE = -1
SLOT_BYTES = 8  # one signed 64-bit index


class DecoderTracker:
    """One shared slot per decoder holding the index of the image it is decoding, or FREE.

    Created before the decoders fork, so each inherits the same anonymous shared mapping (no file in /dev/shm or
    TMPDIR, which may be full or tiny); a slot is written only by its own decoder and read by the main process only
    after something went wrong, so it needs no lock.
    """

    def __init__(self, decoders: int) -> None:
        count = max(1, decoders)
        self._map = mmap.mmap(-1, count * SLOT_BYTES)
        self._slots = memoryview(self._map).cast("q")
        for slot in range(count):
            self._slots[slot] = FREE

    def hold(self, slot: int, index: int) -> None:
        self._slots[slot] = index

    def release(self, slot: int) -> None:
        self._slots[slot] = FREE

    def held(self) -> list[int]:
        return [index for index in self._slots if index != FREE]

    def decoder_failed(self, what: str, files: Sequence[ImageFile], partial: Path | None) -> PipelineError:
        """The error for a decoder that died or stopped answering: what happened, the files it held, what to do."""
        in_hand = ", ".join(files[index].key for index in self.held()) or "unknown"
        if partial is None:
            advice = "Remove or fix that file and run again"
        else:
            advice = f"Finished rows are kept in {partial}: remove or fix that file and rerun with --resume"
        return PipelineError(f"a decoding process {what} while decoding: {in_hand}. {advice}")
