#!/usr/bin/env bash
# Run the whole test suite on CPU (no GPU, no Slicer application needed).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash scripts/compat_pythons.sh  # Python 3.9 / 3.12 environments for Testing/test_python_versions.py
python -m pytest -q "$@"
