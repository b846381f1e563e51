# TeleChat API: CUDA runtime + Python venv + torch (CUDA build) + the `serve` and `quant` extras.
#   docker build -f docker/api.Dockerfile -t telechat-stack-api .        (from the repository root)
# Versions live only in pyproject.toml; torch comes from the PyTorch CUDA index with that same pin.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

# CUDA flavour of the torch wheel; must match a CUDA version the host driver supports (cu126 needs driver >= 560).
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

# Ubuntu 24.04 ships user `ubuntu` with uid 1000; our user takes that uid to match typical host files.
# The tag pins the distribution release; exact apt versions would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 telechat \
 && mkdir -p /home/telechat/.cache/telechat-stack \
 && chown -R telechat:telechat /home/telechat/.cache

WORKDIR /app
COPY pyproject.toml ./
# torch first (its own, largest layer): the CUDA build of exactly the version pinned in pyproject.toml.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(grep -o 'torch==[0-9][0-9.]*' pyproject.toml)"
COPY README.md ./
COPY telechat ./telechat
COPY services ./services
COPY jobs ./jobs
# The pinned torch already satisfies `torch==X` (a +cuXXX local version matches), so pip keeps the CUDA build.
# The project's own requirements: pinned in pyproject.toml (the one place for versions).
# `quant` too: the API serves the GPTQ checkpoints the quant job writes (loading them needs gptqmodel, whose
# dependencies build C extensions: the compiler is installed for this step only and removed after it).
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3-dev \
 && pip install --no-cache-dir ".[serve,quant]" \
 && apt-get purge -y --auto-remove build-essential python3-dev \
 && rm -rf /var/lib/apt/lists/*

# Numeric (= telechat) so orchestrators can verify the image does not run as root.
USER 1000:1000
ENV API_HOST=0.0.0.0 \
    API_PORT=8070
EXPOSE 8070
# Healthcheck (/ready = model loaded): compose.yaml, the one place healthchecks are defined.
CMD ["python", "-m", "services.api"]
