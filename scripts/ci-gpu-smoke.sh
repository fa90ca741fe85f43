#!/usr/bin/env bash
# GPU smoke check for CI runners: does the model still fit its batch, train at its speed, within
# its memory? Exit 0 pass, 1 regression, 2 bad spec, 3 no GPU, 130 interrupted.
#
#   scripts/ci-gpu-smoke.sh configs/resnet50.yaml [baseline.json]
#
# With a baseline file that does not exist yet, it is written (commit it); afterwards every run
# compares against it. JUnit XML goes to $BATCHPROBE_JUNIT (default batchprobe-junit.xml); on
# GitHub Actions a summary is appended to $GITHUB_STEP_SUMMARY.
set -euo pipefail

spec=${1:?usage: ci-gpu-smoke.sh SPEC.yaml [BASELINE.json]}
baseline=${2:-}
junit=${BATCHPROBE_JUNIT:-batchprobe-junit.xml}
# Each probe in its own process: an OOM-killer SIGKILL, a hang or a sticky CUDA error on a shared
# runner becomes a failed probe, not a crashed job.
args=(check --config "$spec" --require-gpu --isolate --junit "$junit" --output batchprobe-check.json)

batchprobe env
if [[ -n "$baseline" && ! -f "$baseline" ]]; then
  echo "no baseline at $baseline: measuring one"
  exec batchprobe "${args[@]}" --update-baseline "$baseline"
fi
if [[ -n "$baseline" ]]; then
  args+=(--baseline "$baseline")
fi
exec batchprobe "${args[@]}"
