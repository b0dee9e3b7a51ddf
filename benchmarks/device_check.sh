#!/usr/bin/env bash
# One command for the first GPU qreg meets (at most ~8 minutes on one GPU):
#   1. the CUDA test tier (`pytest -m cuda`: quantizers bitwise against the CPU, bf16/16-mixed fits, compile,
#      exact resume, a sync-free training step, YOLOv5n, DDP on one GPU);
#   2. benchmarks/device_throughput.py: training images/s per model, method and mode, the projected wall time
#      of a 200-epoch cell and of the 49-cell grid, corrupted-evaluation and YOLOv5n throughput;
#      the table, headed by the GPU's name, is appended to docs/benchmarks.md.
#
#   benchmarks/device_check.sh             # on the GPU
#   benchmarks/device_check.sh --dry-run   # anywhere, in about a minute on CPU: tiny sizes, CUDA parts skipped,
#                                          # the table goes to $QREG_DEVICE_CHECK_REPORT (default: not written)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export WANDB_MODE="${WANDB_MODE:-disabled}"

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) echo "device_check.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done

started=$SECONDS
if [ "$dry_run" = 1 ]; then
    echo "== dry run: CUDA tests collected, not run (no GPU needed) =="
    "$PYTHON" -m pytest -q -m cuda --collect-only tests/test_cuda.py | tail -1
    report=()
    [ -n "${QREG_DEVICE_CHECK_REPORT:-}" ] && report=(--report "$QREG_DEVICE_CHECK_REPORT")
    "$PYTHON" benchmarks/device_throughput.py --dry-run --device cpu "${report[@]}"
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check.sh: no CUDA device (use --dry-run)')"
    echo "== CUDA test tier =="
    tier=0
    timeout 240 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider || tier=$?
    echo "== throughput =="
    "$PYTHON" benchmarks/device_throughput.py --budget 180 --report docs/benchmarks.md
    if [ "$tier" != 0 ]; then
        echo "device_check.sh: the CUDA test tier failed (status $tier); the figures above were still measured" >&2
        exit 1
    fi
fi
echo "device check done in $((SECONDS - started)) s"
