#!/bin/sh
# Set up .venv with what the project needs and build the fused CPU training kernel.
#   sh setup.sh          runtime dependencies
#   sh setup.sh --dev    also the test tools and the optional extras (requirements-tune.txt: Optuna)
# Safe to run again: it only installs what is missing and rebuilds the kernel when its source changed.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --dev or --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "pytest>=8" -r requirements-tune.txt
fi
# `python -m paddlerec.run` from any directory: put this checkout on the venv's path
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/gru4rec_paddle.pth"
OMP_NUM_THREADS=1 .venv/bin/python -c 'import sys; from csrc import kernel; sys.exit(kernel.build())' 2>&1 | grep -v -i "ccache\|warnings.warn\|using custom operator" || true
