#!/usr/bin/env bash
# Create (once) a cached virtualenv with Arize Phoenix, the tracing backend tests/test_otel_vllm_e2e.py exports
# trainwire's spans to. Phoenix pins its own FastAPI, SQLAlchemy and OpenTelemetry versions, so it lives apart
# from the project's venv. Idempotent; prints the venv path on the last line.
#
#   scripts/setup_phoenix_venv.sh
#   TRAINWIRE_PHOENIX_VENV=/some/dir scripts/setup_phoenix_venv.sh
set -euo pipefail

VENV="${TRAINWIRE_PHOENIX_VENV:-$HOME/.cache/trainwire/phoenix-venv}"
SPEC="arize-phoenix==20.26.1"
MARKER="$VENV/.trainwire-phoenix-complete"
if [[ -f "$MARKER" && -x "$VENV/bin/phoenix" ]] && grep -qx "$SPEC" "$MARKER"; then
  echo "$VENV"
  exit 0
fi
PYTHON="${TRAINWIRE_PHOENIX_PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "$SPEC"
echo "$SPEC" > "$MARKER"
echo "$VENV"
