#!/usr/bin/env bash
# Re-create and execute the .ipynb of each MyST notebook (all, or the ones named), in place, and write
# the commit it ran at into each notebook's metadata (qwen3moe_tutorial.commit), which the results
# page prints and tests/test_book_consistency.py checks: the book is one execution, from one commit.
# Usage: bash scripts/execute_notebooks.sh [notebooks/NN_name.md ...]
# A checkout with uncommitted changes to tracked files (the .ipynb outputs aside) is refused (EXECUTE_DIRTY=1 runs anyway, for
# drafts: the commit is then recorded with "-dirty" and the consistency test fails until a clean run).
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(notebooks/[0-9a-z]*.md)
commit=$(git rev-parse HEAD)
# the executed .ipynb files are this script's own output: their changes do not count
if [ -n "$(git status --porcelain --untracked-files=no -- . ':(exclude)notebooks/*.ipynb')" ]; then
  [ "${EXECUTE_DIRTY:-0}" = 1 ] || { echo "uncommitted changes to tracked files: commit first (or EXECUTE_DIRTY=1 for a draft)"; exit 1; }
  commit="$commit-dirty"
fi
echo "executing at commit $commit"
export QWEN3MOE_BOOK_COMMIT="$commit"          # what the results page prints
for md in "${files[@]}"; do
  echo "== $md"
  nb="${md%.md}.ipynb"
  jupytext --to ipynb --output "$nb" "$md" >/dev/null          # sources from the .md, outputs cleared
  jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 "$nb" 2>&1 \
    | grep -v -e "Kernel is running over TCP" -e "USDT:" || true
  python - "$nb" "$commit" <<'PY'
import json, sys
path, commit = sys.argv[1], sys.argv[2]
nb = json.load(open(path))
if not all(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"):
    sys.exit(f"{path}: not every code cell executed")
nb["metadata"]["qwen3moe_tutorial"] = {"commit": commit}
with open(path, "w") as f:
    json.dump(nb, f, indent=1, ensure_ascii=False)
    f.write("\n")
PY
done
