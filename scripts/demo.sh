#!/usr/bin/env bash
# Explain the bundled demo models on the bundled MNI152 T1 and write heatmaps and pictures.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
seghirescam demo --out "${1:-demo-output}"
