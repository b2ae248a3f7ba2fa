#!/usr/bin/env bash
# Make the two TRL environments that benchmarks/run.py compares tunelab against:
#   benchmarks/.venv-trl      trl==1.16.0 (requirements.txt: SFT, reward modeling, DPO)
#   benchmarks/.venv-trl-ppo  trl==1.12.0 (requirements-ppo.txt: the last release with a PPOTrainer)
# Each one also sees the packages of the Python that runs tunelab (torch, transformers, accelerate,
# datasets), so both tools train with the very same versions of those and only TRL differs.
# Usage: benchmarks/setup.sh [PYTHON]   (default: python3, the interpreter tunelab is installed in)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${1:-python3}
"$python" -c "import tunelab, torch, transformers" || {
    echo "setup.sh: $python cannot import tunelab, torch and transformers; install tunelab first (README)" >&2
    exit 1
}
shared=$("$python" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])')
for pair in ".venv-trl:requirements.txt" ".venv-trl-ppo:requirements-ppo.txt"; do
    venv=$here/${pair%%:*}
    requirements=$here/${pair##*:}
    echo "== $venv ($(cat "$requirements"))"
    "$python" -m venv --clear "$venv"
    own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\n' $shared | sort -u > "$own/tunelab-shared.pth"
    "$venv/bin/python" -m pip install -q -r "$requirements"
    "$venv/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
done
