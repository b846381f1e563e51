# TeleChat v1 on vLLM (compose profile `vllm`): the pinned vLLM OpenAI image + our model plugin.
#   docker build -f docker/vllm.Dockerfile -t telechat-stack-vllm .        (from the repository root)
# The tag equals the vLLM pin of the `vllm` extra in pyproject.toml (tests/deploy/test_static.py checks it).
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TELECHAT_HOME=/home/telechat/.cache/telechat-stack

WORKDIR /app
COPY pyproject.toml README.md ./
COPY telechat ./telechat
COPY services ./services
COPY jobs ./jobs
# --no-deps: the image's vLLM already brings torch, transformers, sentencepiece and safetensors at the
# versions it was built and tested with; we add only the telechat package and its vllm.general_plugins
# entry point, plus pydantic-settings at our pin (the launcher's settings model; vLLM does not bring it).
# The import check fails the build at once if the plugin cannot load in this image.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m pip install --no-cache-dir "$(grep -o 'pydantic-settings[^"]*' pyproject.toml)" \
 && python3 -c "import telechat.vllm_plugin.model, telechat.vllm_plugin.serve" \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 telechat \
 && mkdir -p /home/telechat/.cache/telechat-stack \
 && chown -R telechat:telechat /home/telechat/.cache

# Numeric (= telechat) so orchestrators can verify the image does not run as root.
USER 1000:1000
ENV API_HOST=0.0.0.0 \
    API_PORT=8070
EXPOSE 8070
# Healthcheck (/health; vLLM listens only once the model is loaded): compose.yaml, the one place
# healthchecks are defined.
ENTRYPOINT []
CMD ["python3", "-m", "telechat.vllm_plugin.serve"]
