#!/usr/bin/env bash
# Creates the TPU VM (or queued resource) and installs this repo on every worker.
#   launch/create.sh --name NAME --zone ZONE --accelerator v5litepod-8 [--spot] [--queued] [--dry_run]
set -euo pipefail
exec python3 "$(dirname "$0")/tpu.py" create install "$@"
