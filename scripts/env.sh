# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment in .venv with
# the CPU build of torch first, then everything else constrained to that same torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.seghirescam-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -c constraints.txt -e ".[test,monai,nnunet,cohort]"
  touch "$stamp"
fi
