#!/usr/bin/env bash
# GPU path check: run once on a GPU machine (<= 8 minutes) to see what the GPU buys each heavy stage.
#
#   bash benchmarks/gpu_check.sh                 # full sizes: ViT-L/14 + lite0 img/s, 1M x 256 IVF-PQ QPS,
#                                                # Ray embedding stage on 16,000 images + nvidia-smi utilisation
#   bash benchmarks/gpu_check.sh --small         # tiny sizes (CPU smoke run, ~30-60 s on 2 cores)
#   bash benchmarks/gpu_check.sh --json out.json # also write the table as JSON
#
# Prints one table: rows x (CPU, GPU, unit, note). On a machine without CUDA the GPU columns are skipped with
# a line saying so. See benchmarks/gpu_check.py for what each row measures.
#
# Python environment, in this order:
#   1. $VMEM_PYTHON if set;
#   2. ./.venv if it already imports the project (the usual `make install` venv);
#   3. otherwise a venv at ${VMEM_GPU_VENV:-~/.cache/vmem-gpu-venv}, created with --system-site-packages so that a CUDA
#      torch already on the machine is reused (no multi-GB download), and the project installed into it:
#        - VMEM_WHEELS=/path/to/wheels : offline, `pip install --no-index --find-links $VMEM_WHEELS`
#          (a bare GPU machine that can reach only a wheel folder you carried);
#        - VMEM_NO_DEPS=1               : install the project with --no-deps and then every wheel in
#          $VMEM_WHEELS with --no-deps (when the folder holds only what the machine lacks);
#        - otherwise the normal package index.
#      Then the GPU recipe, when `nvidia-smi -L` lists a GPU and faiss-gpu-cu12 is installable from that
#      source: `pip uninstall -y faiss-cpu` and `pip install faiss-gpu-cu12==1.12.0` (never both: each
#      provides the `faiss` module). If faiss-gpu is not installable, faiss-cpu stays and the faiss GPU row
#      is skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

have_project() { "$1" -c "import pipeline.config, torch, numpy" >/dev/null 2>&1; }

PY="${VMEM_PYTHON:-}"
if [ -z "$PY" ] && [ -x .venv/bin/python ] && have_project .venv/bin/python; then
  PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
  VENV="${VMEM_GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-gpu-venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "gpu_check: creating $VENV (--system-site-packages: reuses the machine's torch)"
    python3 -m venv --system-site-packages "$VENV"
  fi
  PY="$VENV/bin/python"
  # If python3 is itself a venv (common on GPU images), --system-site-packages reaches only the base
  # interpreter: link the parent venv's site-packages too, so its CUDA torch is seen.
  PARENT_SITE=$(python3 -c "import sys, sysconfig; print(sysconfig.get_paths()['purelib'] if sys.prefix != sys.base_prefix else '')")
  if [ -n "$PARENT_SITE" ]; then
    echo "$PARENT_SITE" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_vmem_parent_site.pth"
  fi
  PIP=("$PY" -m pip install -q --disable-pip-version-check)
  if [ -n "${VMEM_WHEELS:-}" ]; then
    PIP+=(--no-index --find-links "$VMEM_WHEELS")
  fi
  if ! have_project "$PY"; then
    if [ "${VMEM_NO_DEPS:-0}" = 1 ]; then
      echo "gpu_check: installing the project (--no-deps) and the wheels in ${VMEM_WHEELS:-<none>}"
      "${PIP[@]}" --no-deps --no-build-isolation -e . || echo "gpu_check: editable install failed; using PYTHONPATH"
      if [ -n "${VMEM_WHEELS:-}" ] && compgen -G "$VMEM_WHEELS/*.whl" >/dev/null; then
        "${PIP[@]}" --no-deps "$VMEM_WHEELS"/*.whl
      fi
    else
      echo "gpu_check: installing the project into $VENV"
      "${PIP[@]}" -e .
    fi
  fi
  # GPU recipe: swap faiss-cpu for faiss-gpu only where a GPU exists and the GPU wheel can be installed.
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
     && ! "$PY" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)" 2>/dev/null; then
    if "${PIP[@]}" --dry-run faiss-gpu-cu12==1.12.0 >/dev/null 2>&1; then
      echo "gpu_check: GPU recipe: faiss-cpu -> faiss-gpu-cu12==1.12.0"
      "$PY" -m pip uninstall -q -y faiss-cpu
      "${PIP[@]}" faiss-gpu-cu12==1.12.0
    else
      echo "gpu_check: faiss-gpu-cu12==1.12.0 is not installable from here; keeping faiss-cpu (faiss GPU row skipped)"
    fi
  fi
fi

# The source tree on the path as well: Ray workers started by this driver import `pipeline` from it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: python = $PY"
exec "$PY" benchmarks/gpu_check.py "$@"
