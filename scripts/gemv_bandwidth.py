"""How fast one-row matmuls stream their weights on this CPU: library kernels vs inductor's own.

    python scripts/gemv_bandwidth.py [--preset mini] [--threads 1 2] [--json FILE]

At batch 1 every projection is a matrix-vector product, so its speed is the speed at which it
reads its weights. For a preset's shapes (`mini`: weights far larger than the caches) this prints,
per torch thread count, GB/s of weights read by (`qwen3moe_tutorial.benchmark.gemv_bandwidth`):
- dense layers (each layer's [q|k|v] and o projections, then the LM head): eager `F.linear` (the
  BLAS library), `torch.compile` of the same (inductor calls the library), and `torch.compile`
  with `compile.DecodeGEMV` (inductor generates a multiply-and-sum kernel);
- the grouped matmul of one token's routed rows: eager gather + bmm, compiled gather + bmm,
  compiled multiply-and-sum over [E, in, out] contiguous weights, and the same over a transposed
  view of [E, out, in] memory (what `fused.grouped_matmul_weight` keeps on a CPU);
and, for scale, `torch.sum` over 256 MiB (the read bandwidth the memory floor uses).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from qwen3moe_tutorial.benchmark import format_gemv_bandwidth, gemv_bandwidth
from qwen3moe_tutorial.config import preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = gemv_bandwidth(preset(args.preset), threads=args.threads)
    print(format_gemv_bandwidth(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "torch": torch.__version__, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
