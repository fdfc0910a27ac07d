"""The runnable reference: `python -m qwen3moe_tutorial.final` (CLI and JSON contract: README, "The result JSON").

- Loads a Hugging Face Qwen3-MoE checkpoint (or the embedded default), builds the ladder up to
  `--upto`, generates greedily, prints the text, and writes a result record with provenance.
- Bad input (unknown step, missing checkpoint, corrupt file, mismatched config) ends with one
  line on stderr and exit status 2, never a deep traceback.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as _platform
import subprocess
import sys

import torch

from . import parallel, platform
from .config import ConfigError, ModelConfig
from .steps import STEP_NAMES, check_parallel, generate_on_rank, launcher_env, recipe_upto
from .weights import Checkpoint, CheckpointError, cache_root, default_checkpoint

DEFAULT_PROMPT = "The Ascend NPU decodes one token at a time."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_DEFAULT_TP = 2        # gloo ranks on a CPU: enough to exercise every collective, cheap on 2 cores
DEFAULT_MAX_SEQ_LEN = 512   # a fixed cache size by default: another prompt length keeps the compiled graph


class UsageError(ValueError):
    """An argument combination that cannot run."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m qwen3moe_tutorial.final",
        description="Greedy batch-1 generation with Qwen3-MoE, up to a chosen step of the optimization ladder.")
    p.add_argument("--model-path", help="Hugging Face checkpoint directory (default: the embedded tiny "
                   "checkpoint, generated on first use)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: %(default)r)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of --prompt "
                   "(for checkpoints without tokenizer files)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"KV-cache capacity in positions; prompt + new tokens must fit (default: {DEFAULT_MAX_SEQ_LEN}, "
                        f"or prompt + new tokens if more, capped by the model's max_position_embeddings)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: torchrun's world size; else every NPU/GPU here; on a "
                        f"CPU {CPU_DEFAULT_TP} gloo ranks when the config allows; 1 for steps before attention_tp)")
    p.add_argument("--upto", choices=STEP_NAMES, default=STEP_NAMES[-1],
                   help="last step of the ladder to enable (default: all, %(default)s)")
    p.add_argument("--device", choices=("auto", *platform.DEVICE_KINDS), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weights and activations (default: bfloat16 on an NPU or GPU, float32 on a CPU)")
    p.add_argument("--json", metavar="FILE", help="write the result record to FILE")
    p.add_argument("--profile", metavar="DIR", help="write a profiler trace per rank to DIR")
    p.add_argument("--compile-cache", metavar="DIR", help="compiled-graph cache directory (graph steps)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "max_seq_len", "tp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.compile_cache and STEP_NAMES.index(args.upto) < STEP_NAMES.index("compile_cache"):
        p.error(f"--compile-cache needs the compile_cache step, but --upto {args.upto} stops before it")
    return args


def encode_prompt(args, model_path: str) -> tuple[list[int], object]:
    """Prompt token ids, and the tokenizer (None when ids were given and no tokenizer exists)."""
    tokenizer = None
    has_tokenizer = any(os.path.isfile(os.path.join(model_path, f))
                        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return ids, tokenizer
    if tokenizer is None:
        raise UsageError(f"{model_path} has no tokenizer files (tokenizer.json); pass --prompt-ids instead")
    return tokenizer(args.prompt)["input_ids"], tokenizer


def default_tp(recipe, cfg, device_kind: str) -> int:
    """torchrun's world size; else one rank per visible NPU/GPU; else a few gloo ranks on a CPU."""
    if parallel.launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if "attention_tp" not in recipe.steps:
        return 1
    size = platform.device_count(device_kind) if device_kind != "cpu" else CPU_DEFAULT_TP
    try:
        check_parallel(recipe, cfg, size)
    except ValueError:
        return 1
    return size


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def default_dtype(device_kind: str) -> str:
    """bfloat16 on an accelerator (the recipe's dtype; 235B in float32 does not fit a die even at
    TP 16), float32 on a CPU (the reference for the token-equality proofs)."""
    return "float32" if device_kind == "cpu" else "bfloat16"


def resolve_device(requested: str, recipe) -> str:
    """The device kind, with the launcher's environment in place before torch_npu starts: the
    recipe's HCCL / task-queue / allocator settings are read when the NPU runtime initialises, so on
    a machine with torch_npu they are set before it is imported, and taken back if no NPU is used."""
    added = {}
    if requested in ("auto", "npu") and platform.torch_npu_installed():
        added = platform.apply_env(launcher_env(recipe, "npu"))
    try:
        device_kind, problem = platform.detect_device(requested), None
    except RuntimeError as e:                        # e.g. --device npu without an NPU
        device_kind, problem = None, e
    if device_kind != "npu":
        for k in added:
            os.environ.pop(k, None)
    if problem is not None:
        raise UsageError(str(problem))
    platform.apply_env(launcher_env(recipe, device_kind))   # before any process group exists (aiv step)
    return device_kind


def run(args: argparse.Namespace) -> dict | None:
    """Everything after argument parsing; returns the result record (None on torchrun ranks > 0)."""
    model_path = args.model_path or default_checkpoint()
    recipe = recipe_upto(args.upto)
    device_kind = resolve_device(args.device, recipe)
    args.dtype = args.dtype or default_dtype(device_kind)
    cfg = ModelConfig.from_pretrained(model_path)                      # fails first, and clearly
    Checkpoint(model_path, cfg).validate()        # headers and shapes of every shard, before any rank starts
    prompt_ids, tokenizer = encode_prompt(args, model_path)
    if any(not 0 <= i < cfg.vocab_size for i in prompt_ids):
        raise UsageError(f"prompt token ids must lie in [0, {cfg.vocab_size}); got {prompt_ids}")
    needed = len(prompt_ids) + args.max_new_tokens
    if args.max_seq_len is None:                     # a default never makes a valid model fail
        if needed > cfg.max_position_embeddings:
            raise UsageError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
        args.max_seq_len = min(cfg.max_position_embeddings, max(DEFAULT_MAX_SEQ_LEN, needed))
    if needed > args.max_seq_len:
        raise UsageError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) "
                         f"exceeds the KV-cache capacity --max-seq-len ({args.max_seq_len})")
    if args.max_seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    args.tp = args.tp or default_tp(recipe, cfg, device_kind)
    check_parallel(recipe, cfg, args.tp)
    job = {"model_path": model_path, "upto": args.upto, "dtype": DTYPES[args.dtype], "device_kind": device_kind,
           "max_len": args.max_seq_len, "prompt_ids": prompt_ids, "max_new_tokens": args.max_new_tokens,
           "eos_token_id": None if args.ignore_eos else getattr(tokenizer, "eos_token_id", None),
           "compile_cache": args.compile_cache or os.path.join(cache_root(), "compile"),
           "profile_dir": os.path.abspath(args.profile) if args.profile else None,
           "progress": sys.stderr.isatty()}
    gen = parallel.run_on_ranks(generate_on_rank, args.tp, (job,), device_kind)
    if gen is None:                                  # torchrun rank > 0: rank 0 reports
        return None
    devices = args.tp if device_kind != "cpu" else 0
    return {
        "token_ids": gen["token_ids"], "text": tokenizer.decode(gen["token_ids"]) if tokenizer else None,
        "prompt": None if args.prompt_ids else args.prompt, "prompt_token_ids": prompt_ids,
        **{k: gen[k] for k in ("prefill_ms", "decode_ms_per_token", "decode_ms", "first_decode_ms",
                               "compile_s", "bytes_read_per_rank", "compile_cache_hit", "profile")},
        "steps": list(recipe.steps), "upto": args.upto, "engine": recipe.engine,
        "world_size": args.tp, "tp": args.tp, "devices": devices,
        "cards": devices / 2 if device_kind == "npu" else None,        # an A3 card holds 2 dies
        "compile_cache": job["compile_cache"] if "compile_cache" in recipe.steps else None,
        "launcher": "torchrun" if parallel.launched_by_torchrun() else ("spawn" if args.tp > 1 else "single"),
        "device": device_kind, "dtype": args.dtype, "model_path": os.path.abspath(model_path),
        "max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len,
        "env": platform.relevant_env(), "versions": platform.versions(), "commit": git_commit(),
        "host": {"hostname": _platform.node(), "machine": _platform.machine(), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "rank0_cpu_affinity": gen.get("cpu_affinity")},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0            # torchrun: only rank 0 speaks
    try:
        result = run(args)
    except (UsageError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (parallel.RankError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result is None:
        return 0
    print(result["text"] if result["text"] is not None else result["token_ids"])
    ms = result["decode_ms_per_token"]
    print(f"[{result['upto']}] {result['device']} {result['dtype']} tp={result['tp']}: "
          f"prefill {result['prefill_ms']:.1f} ms, decode "
          f"{'n/a' if ms is None else f'{ms:.2f} ms/token'} ({len(result['token_ids'])} tokens)", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
