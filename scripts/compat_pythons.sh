#!/usr/bin/env bash
# Slicer 5.8 runs Python 3.9, Slicer 5.10 and later 3.12. Where pyenv has those interpreters,
# make small environments of them (numpy, SimpleITK, packaging; no torch) in .venv/compat/<version>,
# in which Testing/test_python_versions.py runs the torch-free modules. Made once; a failure here
# only warns (that test then says what is missing, and fails on CI).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for version in 3.9 3.12; do
  target=".venv/compat/$version"
  [ -x "$target/bin/python" ] && continue
  python=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/python 2>/dev/null | sort -V | tail -n 1)
  [ -n "$python" ] || continue
  if ! { "$python" -m venv "$target" && "$target/bin/python" -m pip install --quiet numpy SimpleITK packaging; }; then
    echo "warning: could not make the Python $version environment in $target" >&2
    rm -rf "$target"
  fi
done
