#!/usr/bin/env bash
# Re-create and execute the .ipynb of each MyST notebook (all, or the ones named), in place.
# Usage: bash scripts/execute_notebooks.sh [notebooks/NN_name.md ...]
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(notebooks/[0-9a-z]*.md)
for md in "${files[@]}"; do
  echo "== $md"
  nb="${md%.md}.ipynb"
  jupytext --to ipynb --output "$nb" "$md" >/dev/null          # sources from the .md, outputs cleared
  jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 "$nb" 2>&1 \
    | grep -v -e "Kernel is running over TCP" -e "USDT:" || true
  test "$(python -c "import json,sys; nb=json.load(open(sys.argv[1])); print(all(c.get('execution_count') for c in nb['cells'] if c['cell_type']=='code'))" "$nb")" = True \
    || { echo "$nb: not every code cell executed"; exit 1; }
done
