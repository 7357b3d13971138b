#!/usr/bin/env bash
# Copies a single host's workdir to the bucket (when --bucket is given), then deletes the TPU.
#   launch/teardown.sh --name NAME --zone ZONE --accelerator v5litepod-8 [--bucket gs://B/runs] [--queued] [--dry_run]
set -euo pipefail
here="$(dirname "$0")"
actions=(delete)
for arg in "$@"; do [[ "$arg" == --bucket* ]] && actions=(copy delete); done
exec python3 "$here/tpu.py" "${actions[@]}" "$@"
