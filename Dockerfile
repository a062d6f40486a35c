# GPU image: the harness on an official PyTorch runtime image, which already holds CUDA, cuDNN, torch and
# torchvision. Build with scripts/build.sh (or `docker build -t harness:gpu .`); docs/docker.md explains every
# build argument. Dockerfile.cpu is the same image for machines without an NVIDIA GPU.

# Any image with Python >= 3.11 (python3) and torch + torchvision installed; the PyTorch images since 2.10 are
# Ubuntu 24.04 with Python 3.12. Its CUDA major must match onnxruntime-gpu's (13 for the lock's; ONNXRUNTIME_VERSION picks another).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# ---- source: the code and model as the image will hold them, checked before anything slow is built ----
FROM ${BASE_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml entrypoint.py constraints.txt ./
COPY scripts/image-requirements.py scripts/
COPY harness/ harness/
COPY model/ model/
ARG MODEL_CHECKPOINT=""
# Versions of the lock's to replace (empty: the lock's own, constraints.txt); docs/docker.md says when.
ARG ONNXRUNTIME_VERSION=""
# 1. Fail now, not after the dependencies, when the model folder or the checkpoint named by MODEL_CHECKPOINT is
#    missing. 2. Readable by any user (a checkpoint saved with umask 077 would otherwise fail at run time).
# 3. The pip files, written apart from the code so that a code change keeps the pip layer cached: the harness's
#    dependencies with its `onnx-gpu` extra (onnxruntime-gpu, the image's one ONNX runtime), the model's, and the
#    lock (constraints.txt) less the torch stack the base image holds and what the model or a build argument pins.
RUN set -eu; \
    if [ ! -f model/model.py ] && [ ! -f model/model_description.py ]; then \
        echo "build error: model/ holds neither model.py nor model_description.py (the model's class)." >&2; \
        exit 1; \
    fi; \
    if [ -n "${MODEL_CHECKPOINT}" ]; then \
        name="${MODEL_CHECKPOINT#/workspace/}"; name="${name#model/}"; \
        if [ ! -f "model/${name}" ]; then \
            echo "build error: MODEL_CHECKPOINT=${MODEL_CHECKPOINT} is not a file in model/." >&2; \
            echo "Put the checkpoint in model/ (next to model.py) and name it as it is there. Files in model/:" >&2; \
            ls -A model >&2; \
            exit 1; \
        fi; \
    fi; \
    chmod -R a+rX /src; \
    python3 -c "import sys; sys.version_info >= (3, 11) or sys.exit('build error: the base image needs Python >= 3.11')"; \
    python3 scripts/image-requirements.py --out /requirements --extra onnx-gpu --base-torch \
        --version "onnxruntime-gpu=${ONNXRUNTIME_VERSION}"; \
    rm -r scripts

# ---- the image ----
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/workspace \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch

# pip's settings, for the build only (an ARG is the environment of the RUNs below, not of the image). Empty means
# pip's own default. PIP_CERT is a path inside the build: pass the file as a build secret (scripts/build.sh
# --pip-cert FILE does both). PIP_BREAK_SYSTEM_PACKAGES: the PyTorch images' Python is marked externally managed.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""
ARG PIP_NO_INDEX=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_BREAK_SYSTEM_PACKAGES=1
ARG PIP_ROOT_USER_ACTION=ignore
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies before code: this layer is rebuilt only when a dependency list or a pip argument changes, everything
# at the lock's versions (constraints.txt) but torch's stack, which comes with the base image (its tag pins it) and
# is left as it is. Then the checks: one ONNX runtime only, the GPU build (onnxruntime and onnxruntime-gpu both
# install the `onnxruntime` module, and with both the CUDA provider can be lost), and its CUDA provider is there
# (get_available_providers() lists what was built in: it needs no GPU).
COPY --from=source /requirements/ /tmp/requirements/
RUN --mount=type=secret,id=pip_cert,target=/run/secrets/pip_cert \
    python3 -m pip install --no-cache-dir \
        -r /tmp/requirements/harness.txt \
        -r /tmp/requirements/model.txt \
        -c /tmp/requirements/constraints.txt \
    && python3 -c "import torch, torchvision, onnxruntime, PIL, numpy, yaml, tqdm" \
    && python3 -c "import importlib.metadata as m, sys; names = {d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()}; found = sorted(names & {'onnxruntime', 'onnxruntime-gpu'}); found == ['onnxruntime-gpu'] or sys.exit(f'build error: ONNX runtimes installed: {found}; want onnxruntime-gpu only (both install the onnxruntime module: does model/requirements.txt name onnxruntime?)')" \
    && python3 -c "import onnxruntime, sys; found = onnxruntime.get_available_providers(); 'CUDAExecutionProvider' in found or sys.exit(f'build error: onnxruntime has no CUDA provider, only {found}')" \
    && rm -rf /tmp/requirements

# The user the harness runs as: no login, no home of its own (caches go to /tmp, writable in a read-only container).
RUN groupadd --gid 10001 harness \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin harness

# The code runs from here, not from site-packages, so scripts/debug.sh can mount a checkout over it.
WORKDIR /workspace
COPY --from=source /src/ /workspace/

# The model's build arguments become the environment the harness reads (empty = not set).
ARG MODEL_CLASS_NAME=""
ARG MODEL_CHECKPOINT=""
ARG WORKERS=""
ARG BATCH_SIZE=""
ARG GPUS=""
ENV MODEL_CLASS_NAME=${MODEL_CLASS_NAME} \
    MODEL_CHECKPOINT=${MODEL_CHECKPOINT} \
    WORKERS=${WORKERS} \
    BATCH_SIZE=${BATCH_SIZE} \
    GPUS=${GPUS}

USER 10001:10001
# Exec form: Python is PID 1 and gets SIGTERM (docker stop) itself; arguments after the image name are the
# harness's (`docker run IMAGE --batch_size 64`). Without any, it reads /input and writes /output/predictions.csv.
ENTRYPOINT ["python3", "/workspace/entrypoint.py"]
CMD []

# Last, so that a new revision or date invalidates no cached layer.
ARG BASE_IMAGE
ARG VERSION=""
ARG REVISION=""
ARG CREATED=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="harness (GPU)" \
      org.opencontainers.image.description="Batch image classification: a folder of images in, predictions.csv out" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
