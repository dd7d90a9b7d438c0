#!/usr/bin/env bash
# The GPU report: the test suite on the GPU and the GPU benchmarks, one markdown table (OUT_DIR/report.md).
#   bash bench/gpu_report.sh [OUT_DIR]
# Without CUDA it prints one line and exits 0. See bench/gpu_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_report.py "$@"
