"""--compile: the model under torch.compile gives the eager model's classes, never recompiles for the short last
batch, and falls back to eager with a warning where it cannot compile."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

Run = Callable[..., tuple[int, list[list[str]]]]


def test_a_model_that_cannot_compile_runs_eagerly_with_a_warning(
    harness_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_compiler(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def fail(batch: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fail

    code, eager = harness_run("--batch-size", "8", name="eager.csv")
    assert code == 0
    monkeypatch.setattr(torch, "compile", no_compiler)
    code, rows = harness_run("--batch-size", "8", "--compile", name="compiled.csv")
    assert code == 0 and rows == eager
    warning = "torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found): running eagerly"
    assert warning in capsys.readouterr().err


def test_a_python_dynamo_refuses_runs_eagerly_with_a_warning(
    harness_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.compile itself raises where dynamo cannot run at all (an unsupported Python), before any call."""

    def unsupported(model: torch.nn.Module) -> None:
        raise RuntimeError("Dynamo is not supported on Python 3.99+")

    monkeypatch.setattr(torch, "compile", unsupported)
    code, _ = harness_run("--batch-size", "8", "--compile", name="compiled.csv")
    assert code == 0
    assert "torch.compile failed (RuntimeError: Dynamo is not supported on Python 3.99+): running eagerly" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_the_compiled_model_agrees_and_the_last_batch_does_not_recompile(
    harness_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """19 images in batches of 8: the last batch of 3 is padded to 8, so a recompile (an error here) never comes."""
    code, eager = harness_run("--batch-size", "8", name="eager.csv")
    assert code == 0
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    code, compiled = harness_run("--batch-size", "8", "--compile", name="compiled.csv")
    assert code == 0, capsys.readouterr().err
    assert "compiled the model in" in capsys.readouterr().err
    assert [row[:2] for row in compiled] == [row[:2] for row in eager]  # same file, same top-1 class
    for ours, theirs in zip(compiled, eager, strict=True):
        assert abs(float(ours[2]) - float(theirs[2])) < 1e-3
