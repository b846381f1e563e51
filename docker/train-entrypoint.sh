#!/bin/sh
# Entrypoint of compose's `finetune` and `quant` services: train-entrypoint JOB [ARGS...] runs
# `python -m jobs.JOB ARGS...` as the owner of /models, so the checkpoints it writes belong to whoever owns
# the host folder (MODELS_DIR) and no chown is ever needed. compose starts it as root only for that switch;
# a root-owned folder means the host user is root, so the job stays root there. Started as any other user
# (docker run --user, or the image's default), it runs as that user.
# finetune with NPROC_PER_NODE other than 1 runs under torchrun: a number, or `gpu` for every visible GPU.
set -eu
job=$1
shift
if [ "$job" = finetune ] && [ "${NPROC_PER_NODE:-1}" != 1 ]; then
    set -- torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" -m jobs.finetune "$@"
else
    set -- python -m "jobs.$job" "$@"
fi
if [ "$(id -u)" = 0 ] && [ "$(stat -c %u /models)" != 0 ]; then
    uid=$(stat -c %u /models)
    # The image's home belongs to uid 1000; another owner gets a fresh one for its caches.
    if [ "$uid" != 1000 ]; then
        export HOME="/tmp/home-$uid"
        mkdir -p "$HOME" && chown "$uid" "$HOME"
    fi
    exec setpriv --reuid "$uid" --regid "$(stat -c %g /models)" --clear-groups -- "$@"
fi
exec "$@"
