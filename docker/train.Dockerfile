# TeleChat jobs (fine-tune, quantize): CUDA devel (nvcc for DeepSpeed's JIT ops) + torch + `train` and `quant`.
#   docker build -f docker/train.Dockerfile -t telechat-stack-train .    (from the repository root)
# compose.yaml runs it as `finetune` (python -m jobs.finetune) and `quant` (python -m jobs.quant).
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04

# CUDA flavour of the torch wheel; keep it equal to the base image's CUDA version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

# A PyPI mirror for the build (compose passes PIP_INDEX_URL / PIP_TRUSTED_HOST from .env; unset or empty =
# pip's default index). The torch line below uses TORCH_INDEX_URL instead; a plain-http one needs its host here.
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# python3-dev: DeepSpeed's JIT ops and GPTQModel's sdist build need the headers (gcc comes with the devel base).
# Ubuntu 24.04 ships user `ubuntu` with uid 1000; ours takes that uid so files written to ./models belong to the host user.
# The tag pins the distribution release; exact apt versions would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 telechat

WORKDIR /app
COPY pyproject.toml ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(grep -o 'torch==[0-9][0-9.]*' pyproject.toml)"
COPY README.md ./
COPY telechat ./telechat
COPY services ./services
COPY jobs ./jobs
# The project's own requirements: pinned in pyproject.toml (the one place for versions).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train,quant]"

# compose's finetune/quant entrypoint: runs the job as the owner of /models (no chown needed) and finetune
# under torchrun when NPROC_PER_NODE asks for more than one process.
COPY docker/train-entrypoint.sh /usr/local/bin/train-entrypoint

# Numeric (= telechat) so orchestrators can verify the image does not run as root.
USER 1000:1000
WORKDIR /models
CMD ["python", "-m", "telechat.cli", "--help"]
