#!/usr/bin/env bash
# Re-create and execute the .ipynb of each MyST notebook (all, or the ones named), in place.
# Usage: bash scripts/execute_notebooks.sh [notebooks/NN_name.md ...]
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(notebooks/[0-9a-z]*.md)
for md in "${files[@]}"; do
  echo "== $md"
  jupytext --sync "$md" >/dev/null
  jupytext --to ipynb --update --execute --run-path notebooks "$md" >/dev/null
done
