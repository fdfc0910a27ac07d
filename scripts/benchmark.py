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
import json
import os
import sys

import torch

from qwen3moe_tutorial import platform, roofline
from qwen3moe_tutorial.benchmark import LLAMA_CPP, PEERS, measure_peer, measure_step, summarize
from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.steps import STEP_NAMES
from qwen3moe_tutorial.weights import generated_checkpoint

PROMPT = "The Ascend NPU decodes one token at a time."


def provenance(args) -> dict:
    """platform.provenance() (commit, versions, env, host, timestamp) with the run's settings; the
    host's cpu, cpus and torch_threads also at the top level, where the result files have them.
    Every measurement of this script runs on the CPU (float32), whatever accelerator the host has."""
    common = platform.provenance()
    host = common["host"]
    return {"commit": common["commit"], "device": "cpu", "cpu": host["cpu"], "cpus": host["cpus"],
            "torch_threads": host["torch_threads"], "versions": common["versions"], "env": common["env"],
            "dtype": "float32", "batch": 1, "new_tokens": args.tokens, "repeats": args.repeats,
            "protocol": "median decode step after the first, best of repeats",
            "load_average_at_start": os.getloadavg()[0], "timestamp": common["timestamp"], "host": host}


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
    p.add_argument("--llama-cpp", nargs="?", const="", default=None, metavar="DIR",
                   help="also run llama.cpp (built by scripts/llama_cpp_peer.py build, in DIR or its default) on "
                        "the same checkpoint at f32 with the same thread count, interleaved with the last step")
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
    peers = [] if (args.no_peers or args.tp != 1) else list(PEERS)
    for name in peers + (args.steps or list(STEP_NAMES)):
        print(f"== {args.preset} tp={args.tp} {name}", file=sys.stderr, flush=True)
        if name in PEERS:
            row = measure_peer(name, model_path, prompt_ids, args.tokens, args.repeats, max_len)
        else:
            row = measure_step(name, model_path, prompt_ids, args.tokens, tp=args.tp, repeats=args.repeats,
                               max_len=max_len, count_ops=args.tp == 1)
        row = {**meta, **row}
        rows.append(row)
        with open(os.path.join(args.out, f"{prefix}-{name}.json"), "w") as f:
            json.dump(row, f, indent=1)
        print(f"   {row['decode_ms_per_token']:.2f} ms/token, compile {row['compile_s']:.1f} s", file=sys.stderr)
        probes.append(roofline.measure_read_bandwidth(repeats=10))

    interleaved = []
    if args.llama_cpp is not None:
        import llama_cpp_peer as peer

        root = args.llama_cpp or peer.default_dir()
        gguf = os.path.join(os.path.dirname(model_path), f"{os.path.basename(model_path)}-f32.gguf")
        if not os.path.isfile(gguf):
            peer.convert(root, model_path, gguf)
        last = (args.steps or list(STEP_NAMES))[-1]
        threads = torch.get_num_threads()
        for _ in range(args.repeats):          # one run of each per round: both see the same machine state
            print(f"== {args.preset} interleaved: {last} and {LLAMA_CPP}", file=sys.stderr, flush=True)
            ours = measure_step(last, model_path, prompt_ids, args.tokens, tp=args.tp, repeats=1,
                                max_len=max_len, count_ops=False)["decode_ms_per_token"]
            theirs = peer.bench(root, gguf, threads, args.tokens, repeats=1)
            interleaved.append({"step": last, "ours_ms": ours, "llama_cpp_ms": theirs["decode_ms_per_token"]})
        with open(os.path.join(root, "build_info.json")) as f:
            build_info = json.load(f)
        best = min(interleaved, key=lambda r: r["llama_cpp_ms"])
        row = {**meta, "step": LLAMA_CPP, "tp": 1, "token_ids": None, "prefill_ms": None,
               "decode_ms_per_token": best["llama_cpp_ms"], "decode_ms": [r["llama_cpp_ms"] for r in interleaved],
               "first_decode_ms": None, "compile_s": 0.0, "ops_per_token": None,
               "llama_cpp": {**{k: v for k, v in theirs.items() if k not in ("decode_ms_per_token",
                                                                              "samples_ms_per_token")},
                             "build": build_info, "gguf": os.path.basename(gguf), "outtype": "f32"},
               "interleaved_with": last, "interleaved": interleaved}
        rows.append(row)
        with open(os.path.join(args.out, f"{prefix}-{LLAMA_CPP}.json"), "w") as f:
            json.dump(row, f, indent=1)

    summary = summarize(meta, rows, floor_bytes["total"], probes)
    if interleaved:
        summary["interleaved_vs_llama_cpp"] = interleaved
    with open(os.path.join(args.out, f"{prefix}-summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"floor {summary['floor_ms']:.2f} ms/token ({summary['read_bandwidth_GBps']:.1f} GB/s, "
          f"{summary['bytes_per_token'] / 1e6:.1f} MB/token)")
    for e in summary["rows"]:
        extra = " ".join(f"{k}={v:.2f}" for k, v in e.items() if k.startswith("speedup"))
        print(f"{e['step']:20s} {e['decode_ms_per_token']:8.2f} ms  x_floor={e['x_floor']:.2f} "
              f"tokens_ok={e['tokens_ok']} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
