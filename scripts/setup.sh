#!/usr/bin/env bash
# Create or update the project venv (.venv). Idempotent: a second run with unchanged pyproject.toml,
# constraints.txt and this script only compares a stamp and returns at once.
#
# Order matters: torch goes in first (the CPU wheel on a CPU box, the usual CUDA wheel on a GPU cluster),
# then everything else under constraints.txt, which pins that same torch, so no dependency can pull another
# build. DeepSpeed compiles against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.launcher-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

pip_install() {
  # Some machines list package-index folders that do not exist; pip warns once per package. Hide only that.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
torch_pin=$(grep -E '^torch==' constraints.txt)
echo "[setup] installing $torch_pin into $VENV" >&2
pip_install "$torch_pin" setuptools wheel ninja packaging
# No DeepSpeed C++ op is prebuilt: on CPU the launcher uses torch's AdamW and gloo, so a normal run compiles
# nothing (measured in BENCHMARKS.md). On GPU, DeepSpeed builds what it needs on first use.
echo "[setup] installing deepspeed (no build isolation, against the torch above)" >&2
DS_BUILD_OPS=${DS_BUILD_OPS:-0} pip_install --no-build-isolation -c constraints.txt deepspeed
echo "[setup] installing launcher and its dependencies" >&2
pip_install -c constraints.txt -e ".[dev]"

"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(echo "$torch_pin" | cut -d= -f3)') else f'torch was replaced: {v}')"
echo "$want" >"$stamp"
echo "[setup] done: $VENV" >&2
