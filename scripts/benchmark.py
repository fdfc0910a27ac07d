"""Benchmark the ladder and two Hugging Face peers on this machine; write results/*.json.

    python scripts/benchmark.py --preset mini --tp 1            # every step + HF peers, TP 1
    python scripts/benchmark.py --preset mini --tp 8 --steps aiv
    python scripts/benchmark.py --preset deep --tp 1            # the overhead-bound preset

Protocol (qwen3moe_tutorial.generate): float32, batch 1, a fixed prompt, N new tokens, the device
synchronised before each clock read, decode = median step after the first, best of --repeats
runs, compile time recorded separately. --threads sets torch's thread count for every
measurement, the read-bandwidth probes included (default: torch's own, one per core). Each
result file names the commit, machine, versions, threads and environment. The summary file compares against the memory-bandwidth floor
(activated bytes per token / measured read bandwidth) and the HF peers.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform as host
import sys

import torch

from qwen3moe_tutorial import platform, roofline
from qwen3moe_tutorial.benchmark import measure_step
from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.final import git_commit
from qwen3moe_tutorial.generate import greedy_generate
from qwen3moe_tutorial.hf import HFCompiledRunner, HFRunner, load_hf_model
from qwen3moe_tutorial.steps import STEP_NAMES
from qwen3moe_tutorial.weights import generated_checkpoint

PROMPT = "The Ascend NPU decodes one token at a time."


def provenance(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               host.processor()) if os.path.exists("/proc/cpuinfo") else host.processor()
    return {"commit": git_commit(), "device": platform.detect_device(), "cpu": cpu, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "versions": platform.versions(),
            "env": platform.relevant_env(), "dtype": "float32", "batch": 1, "new_tokens": args.tokens,
            "repeats": args.repeats, "protocol": "median decode step after the first, best of repeats",
            "load_average_at_start": os.getloadavg()[0],
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def hf_peer(kind: str, model_path: str, prompt_ids: list[int], tokens: int, repeats: int, max_len: int) -> dict:
    if kind == "hf_eager":
        runner = HFRunner(load_hf_model(model_path, experts_implementation="eager"))
    else:
        runner = HFCompiledRunner(load_hf_model(model_path, experts_implementation="grouped_mm"), max_len=max_len)
    runs = [greedy_generate(runner, prompt_ids, tokens) for _ in range(repeats)]
    best = min(runs, key=lambda g: g.decode_ms_per_token)
    return {"step": kind, "tp": 1, "token_ids": best.token_ids, "prefill_ms": best.prefill_ms,
            "decode_ms_per_token": best.decode_ms_per_token, "decode_ms": best.decode_ms,
            "first_decode_ms": best.first_decode_ms, "compile_s": runs[0].compile_s, "ops_per_token": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini", help="config preset of the generated checkpoint (default: mini)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", nargs="*", default=None, help="ladder steps (default: all); peers are added at TP 1")
    p.add_argument("--no-peers", action="store_true", help="skip the two Hugging Face peers")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every measurement (default: torch's own); ranks inherit it")
    args = p.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)            # spawned ranks start with it
    torch.manual_seed(0)
    model_path = generated_checkpoint(args.preset)
    from transformers import AutoTokenizer
    prompt_ids = AutoTokenizer.from_pretrained(model_path)(PROMPT)["input_ids"]
    cfg = preset(args.preset)
    os.makedirs(args.out, exist_ok=True)
    # files: <preset>-tp<N>[-t<threads> when --threads is given]-<step>.json
    prefix = f"{args.preset}-tp{args.tp}" + (f"-t{args.threads}" if args.threads is not None else "")
    meta = {"preset": args.preset, "tp": args.tp, "files_prefix": prefix, "config": dataclasses.asdict(cfg),
            **provenance(args)}
    max_len = len(prompt_ids) + args.tokens + 8

    probes = [roofline.measure_read_bandwidth(repeats=10)]    # again after every step: the best counts
    floor_bytes = roofline.bytes_per_token(cfg, args.tp, dtype_bytes=4, context_len=len(prompt_ids) + args.tokens)
    rows = []
    peers = [] if (args.no_peers or args.tp != 1) else ["hf_eager", "hf_best"]
    for name in peers + (args.steps or list(STEP_NAMES)):
        print(f"== {args.preset} tp={args.tp} {name}", file=sys.stderr, flush=True)
        if name in ("hf_eager", "hf_best"):
            row = hf_peer(name, model_path, prompt_ids, args.tokens, args.repeats, max_len)
        else:
            row = measure_step(name, model_path, prompt_ids, args.tokens, tp=args.tp, repeats=args.repeats,
                               max_len=max_len, count_ops=args.tp == 1)
        row = {**meta, **row}
        rows.append(row)
        with open(os.path.join(args.out, f"{prefix}-{name}.json"), "w") as f:
            json.dump(row, f, indent=1)
        print(f"   {row['decode_ms_per_token']:.2f} ms/token, compile {row['compile_s']:.1f} s", file=sys.stderr)
        probes.append(roofline.measure_read_bandwidth(repeats=10))

    bandwidth = max(probes)
    floor_ms = floor_bytes["total"] / bandwidth * 1e3
    reference_tokens = next((r["token_ids"] for r in rows if r["step"] in ("hf_eager", "hf_baseline")), None)
    summary = {**meta, "read_bandwidth_GBps": bandwidth / 1e9, "bytes_per_token": floor_bytes["total"],
               "read_bandwidth_probes_GBps": [round(b / 1e9, 2) for b in probes],
               "read_bandwidth_method": f"torch.sum over 256 MiB of float32, best of 10, {torch.get_num_threads()} "
                                        f"threads, before the first step and after each; the best probe counts",
               "floor_ms": floor_ms, "rows": []}
    for r in rows:
        entry = {"step": r["step"], "decode_ms_per_token": r["decode_ms_per_token"], "compile_s": r["compile_s"],
                 "ops_per_token": r["ops_per_token"], "x_floor": r["decode_ms_per_token"] / floor_ms,
                 "tokens_ok": None if reference_tokens is None else r["token_ids"] == reference_tokens}
        for peer in ("hf_eager", "hf_best"):
            base = next((q for q in rows if q["step"] == peer), None)
            if base:
                entry[f"speedup_vs_{peer}"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        summary["rows"].append(entry)
    with open(os.path.join(args.out, f"{prefix}-summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"floor {floor_ms:.2f} ms/token ({bandwidth / 1e9:.1f} GB/s, {floor_bytes['total'] / 1e6:.1f} MB/token)")
    for e in summary["rows"]:
        extra = " ".join(f"{k}={v:.2f}" for k, v in e.items() if k.startswith("speedup"))
        print(f"{e['step']:20s} {e['decode_ms_per_token']:8.2f} ms  x_floor={e['x_floor']:.2f} "
              f"tokens_ok={e['tokens_ok']} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
