"""The forward pass: batches of model inputs through the model to N x C scores, with what the device may demand of
it (smaller pieces after running out of memory, one padded shape for a compiled model) and the one probe that
learns the model's output width before any real work."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from harness.console import say
from harness.errors import HarnessError, ModelError, describe_user_error, is_dataloader_failure
from harness.models.outputs import as_logits, same_scores
from harness.pipeline.devices import DeviceNormalizer, DevicePlan, inference_context


def probe_classes(model: nn.Module, normalize: DeviceNormalizer, blank: torch.Tensor, plan: DevicePlan) -> int:
    """Run one blank image through the model to learn its output width before any real work."""
    try:
        with inference_context(plan):
            output = model(normalize(blank.unsqueeze(0).to(plan.device)))
    except HarnessError:
        raise
    except (Exception, SystemExit) as error:
        raise ModelError(
            f"the model failed on one {tuple(blank.shape)} input image: {describe_user_error(error)}. "
            "Check input_size in model/config.yaml."
        ) from error
    return as_logits(output, 1).shape[1]


# Images the model sees at once on the CPU: activation memory grows with the piece, and past a few dozen images
# the CPU's throughput does not (measured in docs/benchmarks.md). A batch of up to 32 still runs whole, so the pinned
# predictions (tests/golden/) stay byte for byte what they were.
CPU_PIECE = 32


def first_piece(plan: DevicePlan, batch_size: int) -> int:
    """How many images of a batch go through the model at once: all of them on a GPU, at most CPU_PIECE on the CPU."""
    return batch_size if plan.device.type == "cuda" else min(batch_size, CPU_PIECE)


@dataclass
class Forward:
    """Runs batches through the model, halving the piece size for good after a CUDA out-of-memory error.

    With `pad` (a compiled model), a short piece is padded with blank images to the piece size, so the compiled
    graph sees one shape and never recompiles for the last batch.
    """

    model: nn.Module
    normalize: DeviceNormalizer
    plan: DevicePlan
    piece: int
    classes: int  # the output width the probe found: every batch must keep it
    pad: bool = False
    torch_graph: bool = True  # the model's layers are PyTorch's (its kind says: harness/models/kinds.py)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs, start = [], 0
        while start < len(images):
            piece = images[start : start + self.piece]
            count = len(piece)
            if self.pad and count < self.piece:
                piece = torch.cat([piece, piece.new_zeros((self.piece - count, *piece.shape[1:]))])
            try:
                with inference_context(self.plan):
                    # a copy: a model may hand back one buffer it overwrites on its next call (as static-shape
                    # runtimes do), which would change this piece's scores before they are read
                    scores = as_logits(self.model(self.normalize(piece)), len(piece))[:count].clone()
            except torch.OutOfMemoryError:
                if self.piece == 1:
                    raise ModelError("the device ran out of memory on a single image") from None
                self.piece = max(1, self.piece // 2)
                if self.plan.device.type == "cuda":
                    torch.cuda.empty_cache()
                say(f"out of device memory: running batches in pieces of {self.piece} from now on")
                continue
            except HarnessError:
                raise
            except (Exception, SystemExit) as error:  # the user's forward, on a real batch
                if is_dataloader_failure(error):  # a worker's death, raised wherever the main process is
                    raise
                raise ModelError(
                    f"the model failed on a batch of {count} images: {describe_user_error(error)}; the rows of the "
                    "batches before it are kept in the .partial file"
                ) from error
            if scores.shape[1] != self.classes:
                raise ModelError(
                    f"the model returned {scores.shape[1]} classes for a batch of {count} images, after "
                    f"{self.classes} for the first image: its output must keep one width"
                )
            outputs.append(scores)
            start += count
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def compiled_forward(forward: Forward, sample: torch.Tensor) -> Forward:
    """`forward` with its model under torch.compile, compiled now on the check images (harness/pipeline/loader.py:
    check_sample) padded to the piece size, so the wait and any failure come before the first image; kept only
    where the compiled model gives the eager model's scores on them. Otherwise the eager `forward`, with one line."""
    if not forward.torch_graph or isinstance(forward.model, nn.DataParallel):
        say("--compile applies to one PyTorch model on one device: running eagerly (use torchrun for several GPUs)")
        return forward
    started = time.perf_counter()
    pieces = sample.repeat(-(-forward.piece // len(sample)), 1, 1, 1)[: forward.piece].to(forward.plan.device)
    try:  # the compiler's own error, not Forward's message for a model failing on real images
        model = torch.compile(forward.model)  # refuses at once where dynamo cannot run (an unsupported Python)
        with inference_context(forward.plan):
            images = forward.normalize(pieces)  # made as a run makes its batches: the compiled guards hold then
            compiled = as_logits(model(images), len(images)).float()
            eager = as_logits(forward.model(images), len(images)).float()
    except Exception as error:  # a missing C++ compiler, an operator the compiler cannot take, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        say(f"torch.compile failed ({type(error).__name__}: {first_line[:200]}): running eagerly")
        return forward
    if not same_scores(compiled, eager):
        say("torch.compile changed the model's scores on the check images: running eagerly")
        return forward
    say(f"compiled the model in {time.perf_counter() - started:.1f} s")
    return dataclasses.replace(forward, model=model, pad=True)
