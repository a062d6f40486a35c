"""Which image each decoding process holds right now, kept where the main process can read it after that process
died or hung, so the message names the file that did it. One tracker serves the DataLoader's workers and the head
start's decoders; torch-free, since the head start forks before torch is imported."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from pathlib import Path

from harness.errors import PipelineError
from harness.pipeline.files import ImageFile

FREE = -1


class DecoderTracker:
    """One shared slot per decoder holding the index of the image it is decoding, or FREE.

    Created before the decoders fork, so each inherits the same shared memory; a slot is written only by its own
    decoder and read by the main process only after something went wrong, so it needs no lock.
    """

    def __init__(self, decoders: int) -> None:
        self._slots = multiprocessing.get_context("fork").Array("q", [FREE] * max(1, decoders), lock=False)

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
