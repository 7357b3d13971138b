#!/usr/bin/env bash
# Starts the experiment on every worker (detached) and follows worker 0's log (Ctrl-C stops only
# the following). Rerunning it resumes the run from its workdir.
#   launch/run.sh --name NAME --zone ZONE --accelerator v5p-32 --config experiments/X.py \
#     --bucket gs://BUCKET/runs [--override config.rlvr.group_size=16] [--dry_run]
set -euo pipefail
exec python3 "$(dirname "$0")/tpu.py" run logs "$@"
