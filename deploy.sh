#!/usr/bin/env bash
# One-click local launch on Linux/macOS: the API, then the web UI; Ctrl+C stops both.
#   ./deploy.sh [--model PATH] [--gpu 0,1] [--api-port 8070] [--web-port 8501] [other deploy.py flags]
#   ./deploy.sh --backend vllm --tensor-parallel-size 2 --model PATH    (vLLM backend, see README)
# The first run installs the dependencies into .venv (see bootstrap.py). ./deploy.sh --help lists every flag.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
  python=python3
else
  echo "error: python3 (3.10 or newer) is needed; install it first" >&2
  exit 2
fi
# exec: Ctrl+C and SIGTERM go straight to deploy.py, which stops its children.
exec "$python" "$here/deploy.py" "$@"
