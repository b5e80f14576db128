# syntax=docker/dockerfile:1
# The re-ID service (and, with another command, training); docs/DEPLOY.md explains its use. Two images:
#   docker build .                 the default (last) target, `runtime`: for a CUDA host
#   docker build --target cpu .    `cpu`: no CUDA base and CPU wheels only (torch's CPU build, faiss-cpu,
#                                  ONNX Runtime and OpenVINO), for hosts without a GPU (docker-compose.cpu.yml)
#
# CUDA: torch 2.14.1's PyPI wheels are its CUDA 13.0 build and bring their own CUDA 13.0 libraries as
# nvidia-* wheels (cuda-runtime 13.0.96 = CUDA 13.0 update 2); faiss-gpu 1.15 (the `gpu` extra) brings its
# CUDA 12 ones. The base image therefore only has to match CUDA 13.0 and carry what the NVIDIA Container
# Toolkit reads (NVIDIA_REQUIRE_CUDA, NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES): the `base` flavour of
# the CUDA 13.0.2 runtime images does, without a second copy of cuBLAS and friends. Host driver: >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
# The CPU image's base, and the build stages' for both images: the same Ubuntu release as the CUDA image, so that
# a virtual environment built on it runs unchanged on either (Python 3.12 at the same path). No CUDA in it.
ARG CPU_IMAGE=ubuntu:24.04

# ---- python: the interpreter and an empty virtual environment, shared by the build stages below ----
FROM ${CPU_IMAGE} AS python

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Ubuntu 24.04's own Python 3.12: the runtime stage installs the same interpreter at the same path, so the
# virtual environment copied there works unchanged.
# DL3008 (pin apt versions) is ignored on purpose: Ubuntu's archive drops superseded versions, so a pin
# breaks the build at the next security update; the base image tag pins the release (24.04, Python 3.12).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# ---- requirements: the dependency lists of pyproject.toml, so that only a change to it rebuilds the next layers ----
FROM python AS requirements
WORKDIR /build
# CUDA image (requirements.txt): faiss-cpu is swapped for the `gpu` extra (faiss-gpu): both provide the `faiss`
# module, never install both. CPU image (requirements-cpu.txt): the dependencies as they are, with torch and
# torchvision (requirements-torch.txt) taken first from PyTorch's CPU index instead of PyPI's CUDA build.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
reqs = [r for r in p['dependencies'] if not r.startswith('faiss-cpu')] + p['optional-dependencies']['gpu']; \
open('requirements.txt', 'w').write('\n'.join(reqs) + '\n'); \
open('requirements-cpu.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
torch = [r for r in p['dependencies'] if r.startswith(('torch>', 'torchvision>'))]; \
open('requirements-torch.txt', 'w').write('\n'.join(torch) + '\n')"

# ---- builder: every dependency in a cached layer, then the code; pip and build tools stay in this stage ----
FROM python AS builder
WORKDIR /build
COPY --from=requirements /build/requirements.txt ./
RUN pip install --requirement requirements.txt

# Then the code, installed without dependencies (they are all above; this also keeps faiss-cpu out).
COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY app ./app
RUN pip install --no-deps . \
    && python -c "import faiss, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'faiss', faiss.__version__)"

# ---- cpu-builder: the CPU image's dependencies (no CUDA library anywhere), then the same code ----
FROM python AS cpu-builder
WORKDIR /build
COPY --from=requirements /build/requirements-torch.txt /build/requirements-cpu.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu --requirement requirements-torch.txt \
    && pip install --requirement requirements-cpu.txt

COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY app ./app
RUN pip install --no-deps . \
    && python -c "import faiss, torch; assert torch.version.cuda is None, torch.version.cuda; print('torch', torch.__version__, 'faiss', faiss.__version__)"

# ---- cpu: the CPU image (docker build --target cpu), otherwise as the CUDA image below ----
FROM ${CPU_IMAGE} AS cpu

LABEL org.opencontainers.image.title="reid-gam-cpu" \
      org.opencontainers.image.description="Person re-identification with generated attention masks, CPU image: FastAPI + FAISS service (ONNX Runtime, OpenVINO) and training" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REID_DATA_DIR=/data \
    REID_WEIGHTS=/weights/reid.safetensors \
    REID_DEVICE=cpu \
    REID_HOST=0.0.0.0 \
    REID_PORT=8000

# DL3008 ignored for the reason given in the python stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin reid \
    && mkdir -p /data /weights /datasets /runs \
    && chown reid:reid /data /runs

COPY --from=cpu-builder /opt/venv /opt/venv

WORKDIR /srv/reid
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]

# ---- runtime: the CUDA image (the default target): the interpreter, the virtual environment, a non-root user ----
FROM ${CUDA_IMAGE} AS runtime

LABEL org.opencontainers.image.title="reid-gam" \
      org.opencontainers.image.description="Person re-identification with generated attention masks: FastAPI + FAISS service and training" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REID_DATA_DIR=/data \
    REID_WEIGHTS=/weights/reid.safetensors \
    REID_HOST=0.0.0.0 \
    REID_PORT=8000

# DL3008 ignored for the reason given in the python stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin reid \
    && mkdir -p /data /weights /datasets /runs \
    && chown reid:reid /data /runs

COPY --from=builder /opt/venv /opt/venv

# /data (FAISS index, crops) and /runs are written by the service and training: named volumes mounted there
# start with this ownership. /weights and /datasets are read-only mounts.
WORKDIR /srv/reid
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# The README's command; training runs in the same image: `docker run IMAGE python -m training ...`.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
