#!/usr/bin/env bash
# Run the whole test suite on CPU (no GPU, no Slicer application needed).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
