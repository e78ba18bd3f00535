#!/usr/bin/env bash
# Thin wrapper: the launcher needs only Python 3 and gcloud, not the training environment.
# Usage: launch/tpu_pod.sh --name=... --accelerator_type=v5p-64 --zone=... [--dry_run] --gin_file=...
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tpu_pod.py" "$@"
