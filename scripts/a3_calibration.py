"""Write results/a3-calibration.json: the A3 model's prediction for every published batch-1 figure.

    python scripts/a3_calibration.py

Rows: config, source, published_ms, predicted_ms, ratio, comparable, reason
(qwen3moe_tutorial.roofline.calibration; the book's chapter 0 renders this file, and a test checks
that it is what the model computes now). Nothing is measured: the figures are published ones.
"""
from __future__ import annotations

import json
import os
import sys

from qwen3moe_tutorial import roofline


def main() -> int:
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "a3-calibration.json")
    rows = roofline.calibration()
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        pred = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f} ms (x{r['ratio']:.2f})"
        print(f"{r['published_ms']:6.2f} ms  predicted {pred:20s}  {r['config'][:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
