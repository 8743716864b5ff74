#!/usr/bin/env bash
# Builds the AdapterHub parity fixtures under tests/fixtures/adapterhub/.
#
# AdapterHub's `adapters` library pins an older transformers (FACTS.md), so it cannot share the
# project's environment: this script makes a side virtual environment (.venv-adapterhub, not
# committed) with adapters 1.3.0, and runs scripts/make_adapterhub_fixtures.py in it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAPTERHUB_VENV:-.venv-adapterhub}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  # The CPU torch wheel on disk when there is one (no large download), else the registry's.
  TORCH_WHEEL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "${TORCH_WHEEL:-torch==2.13.0}" "transformers~=4.57.6" \
    "adapters==1.3.0" safetensors
fi
"$VENV/bin/python" scripts/make_adapterhub_fixtures.py "$@"
