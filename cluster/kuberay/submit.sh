#!/usr/bin/env bash
# Render rayjob_8x8.yaml and apply it with kubectl (DRY_RUN=1: print the manifest and the command).
#   cluster/kuberay/submit.sh {train|sweep} CONFIG.yaml [key.sub=value ...]
# Environment: IMAGE (container with this project + CUDA vLLM, see cluster/Dockerfile),
# NAMESPACE (default: default), PVC (claim mounted at /data for models and runs: rlhf-data),
# JOB_NAME (default: rlhf-<subcommand>-<timestamp>).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 {train|sweep} CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
SUBCOMMAND=$1; CONFIG=$2; shift 2
case "$SUBCOMMAND" in train|sweep) ;; *) echo "$0: subcommand must be train or sweep, got $SUBCOMMAND" >&2; exit 2;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=${IMAGE:-bai-rlhf:latest}
NAMESPACE=${NAMESPACE:-default}
PVC=${PVC:-rlhf-data}
JOB_NAME=${JOB_NAME:-rlhf-$SUBCOMMAND-$(date +%Y%m%d-%H%M%S)}
OVERRIDES="$*"
render() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line//'${JOB_NAME}'/$JOB_NAME}
    line=${line//'${SUBCOMMAND}'/$SUBCOMMAND}
    line=${line//'${CONFIG}'/$CONFIG}
    line=${line//'${OVERRIDES}'/$OVERRIDES}
    line=${line//'${IMAGE}'/$IMAGE}
    line=${line//'${PVC}'/$PVC}
    printf '%s\n' "$line"
  done < "$HERE/rayjob_8x8.yaml"
}
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# [dry-run] kubectl apply -n $NAMESPACE -f - <<manifest below>>"
  render
  exit 0
fi
render | kubectl apply -n "$NAMESPACE" -f -
echo "submitted RayJob $JOB_NAME; follow it with: kubectl get rayjob -n $NAMESPACE $JOB_NAME -w"
echo "logs: kubectl logs -n $NAMESPACE -l job-name=$JOB_NAME -f"
