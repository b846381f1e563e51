# TeleChat web UI: slim Python + the `web` extra only (Streamlit, httpx, SQLAlchemy + Alembic, argon2, psycopg;
# no torch).
#   docker build -f docker/web.Dockerfile -t telechat-stack-web .        (from the repository root)
FROM python:3.11.13-slim-bookworm

# A PyPI mirror for the build (compose passes PIP_INDEX_URL / PIP_TRUSTED_HOST from .env; unset or empty =
# pip's default index). The torch line below uses TORCH_INDEX_URL instead; a plain-http one needs its host here.
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The chats' folder belongs to the page's user: an empty named volume mounted there takes this owner.
RUN useradd --create-home --uid 1000 telechat \
    && mkdir -p /var/lib/telechat-web \
    && chown 1000:1000 /var/lib/telechat-web

WORKDIR /app
COPY pyproject.toml README.md ./
COPY telechat ./telechat
COPY services ./services
COPY jobs ./jobs
# The project's own requirements: pinned in pyproject.toml (the one place for versions).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[web]"

# Numeric (= telechat) so orchestrators can verify the image does not run as root.
USER 1000:1000
ENV WEB_HOST=0.0.0.0 \
    WEB_PORT=8501 \
    API_URL=http://api:8070 \
    WEB_DATA_DIR=/var/lib/telechat-web
EXPOSE 8501
# Healthcheck (/_stcore/health): compose.yaml, the one place healthchecks are defined.
# `python -m services.web`, not `telechat web`: the `telechat` package imports torch, absent here.
CMD ["python", "-m", "services.web"]
