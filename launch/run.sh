#!/usr/bin/env bash
# Starts the experiment on every worker (detached) and follows worker 0's log (Ctrl-C stops only
# the following). Rerunning it resumes the run from its workdir. With --stage LOCAL=DEST it first
# copies LOCAL to DEST (gs://... or ~/PATH on every worker); see README.md.
#   launch/run.sh --name NAME --zone ZONE --accelerator v5p-32 --config experiments/X.py \
#     --bucket gs://BUCKET/runs [--stage ckpt=gs://BUCKET/ckpt] [--override config.rlvr.group_size=16] [--dry_run]
set -euo pipefail
actions=(run logs)
for arg in "$@"; do [[ "$arg" == --stage* ]] && actions=(stage run logs); done
exec python3 "$(dirname "$0")/tpu.py" "${actions[@]}" "$@"
