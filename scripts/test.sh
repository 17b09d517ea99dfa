#!/usr/bin/env bash
# Run the whole test suite on CPU (no GPU, no Slicer application needed).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The report's 3D view is tested in a real browser: Debian's chromium (about 1 minute to install;
# Playwright drives it, installed with the test extra, and downloads no browser of its own).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "+ apt-get install chromium (for the browser test of the evaluation report)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash scripts/compat_pythons.sh  # Python 3.9 / 3.12 environments for Testing/test_python_versions.py
python -m pytest -q "$@"
