#!/usr/bin/env bash
# Create (once) a cached virtualenv for the AutoGen AgentChat and CrewAI examples.
#
# They cannot share the project's .venv: autogen-core 0.7 pins protobuf~=5.29 (the training extra's
# tensorboard needs protobuf>=6.31), and crewai 1.15 pins pydantic 2.12 and openai 2.x (the project runs
# pydantic 2.14 and openai 3.x). `pip install --dry-run` into .venv shows both downgrades. The examples import
# nothing from trainwire (they talk to it over HTTP only), so a venv of their own is all they need.
# Idempotent: when the venv is complete (marker file with the same specs) this returns at once.
#
#   examples/setup_frameworks_venv.sh          # prints the venv path on the last line
#   TRAINWIRE_FRAMEWORKS_VENV=/some/dir examples/setup_frameworks_venv.sh
#   examples/setup_frameworks_venv.sh --force  # rebuild
#
# Then: "$VENV/bin/python" examples/autogen_agent.py ... / examples/crewai_agent.py ...
set -euo pipefail

VENV="${TRAINWIRE_FRAMEWORKS_VENV:-$HOME/.cache/trainwire/frameworks-venv}"
SPECS=("autogen-agentchat==0.7.5" "autogen-ext[openai]==0.7.5" "crewai==1.15.30")
MARKER="$VENV/.trainwire-frameworks-complete"
PYTHON="${TRAINWIRE_FRAMEWORKS_PYTHON:-}"
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup_frameworks_venv] $*" >&2; }
want="${SPECS[*]}"
complete() { [[ -f "$MARKER" && -x "$VENV/bin/python" ]] && [[ "$(cat "$MARKER")" == "$want" ]]; }

if [[ $FORCE == 0 ]] && complete; then
  echo "$VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"  # two test sessions at once: the second waits for the first
flock 9
if [[ $FORCE == 0 ]] && complete; then
  echo "$VENV"
  exit 0
fi

if [[ -z "$PYTHON" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
start=$(date +%s)
rm -rf "$VENV"
log "creating $VENV with $("$PYTHON" --version 2>&1); installing ${want} (about 1-2 min)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "${SPECS[@]}" >&2
log "checking the installation"
"$VENV/bin/python" - <<'EOF'
import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
import autogen_agentchat.agents  # noqa: F401
import autogen_ext.models.openai  # noqa: F401
import crewai  # noqa: F401
EOF
echo "$want" >"$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
log "done in $(( $(date +%s) - start )) s"
echo "$VENV"
