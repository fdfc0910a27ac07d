"""The runnable reference: `python -m qwen3moe_tutorial.final` (CLI and JSON contract: README, "The result JSON").

- Loads a Hugging Face Qwen3-MoE checkpoint (or the embedded default), builds the ladder up to
  `--upto`, generates greedily, prints the text, and writes a result record with provenance.
- Bad input (unknown step, missing checkpoint, corrupt file, mismatched config) ends with one
  line on stderr and exit status 2, never a deep traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import launch, parallel, platform
from .config import ConfigError, ModelConfig
from .model import DEFAULT_MAX_LEN as DEFAULT_MAX_SEQ_LEN
from .platform import git_commit  # noqa: F401  (part of this module's interface since the first release)
from .roofline import hardware
from .steps import STEP_NAMES, check_parallel, first_step, recipe_upto
from .weights import Checkpoint, CheckpointError, cache_root, default_checkpoint

DEFAULT_PROMPT = "The Ascend NPU decodes one token at a time."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_DEFAULT_TP = 2        # gloo ranks on a CPU: enough to exercise every collective, cheap on 2 cores


class UsageError(ValueError):
    """An argument combination that cannot run."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m qwen3moe_tutorial.final",
        description="Greedy batch-1 generation with Qwen3-MoE, up to a chosen step of the optimization ladder.")
    p.add_argument("--model-path", help="Hugging Face checkpoint directory (default: the embedded tiny "
                   "checkpoint trained on Python's documentation, copied to the cache on first use)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: %(default)r)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of --prompt "
                   "(for checkpoints without tokenizer files)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"KV-cache capacity in positions; prompt + new tokens must fit (default: {DEFAULT_MAX_SEQ_LEN}, "
                        f"or prompt + new tokens if more, capped by the model's max_position_embeddings)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: torchrun's world size; else every NPU/GPU here; on a "
                        f"CPU {CPU_DEFAULT_TP} gloo ranks when the config allows; 1 for steps before "
                        f"{first_step('tensor_parallel').name})")
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
    if args.compile_cache and not recipe_upto(args.upto).cached_graph:
        p.error(f"--compile-cache needs the {first_step('cached_graph').name} step, but --upto {args.upto} "
                f"stops before it")
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
    if not recipe.tensor_parallel:
        return 1
    size = platform.device_count(device_kind) if device_kind != "cpu" else CPU_DEFAULT_TP
    try:
        check_parallel(recipe, cfg, size)
    except ValueError:
        return 1
    return size


def default_dtype(device_kind: str) -> str:
    """bfloat16 on an accelerator (the recipe's dtype; 235B in float32 does not fit a die even at
    TP 16), float32 on a CPU (the reference for the token-equality proofs)."""
    return "float32" if device_kind == "cpu" else "bfloat16"


def resolve_device(requested: str) -> str:
    """The device kind for `--device`; one clear error when the requested accelerator is missing.
    (The launcher's NPU environment goes in just before torch_npu is imported: platform.torch_npu_module.)"""
    try:
        return platform.detect_device(requested)
    except RuntimeError as e:                        # e.g. --device npu without an NPU
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> dict | None:
    """Everything after argument parsing; returns the result record (None on torchrun ranks > 0)."""
    model_path = args.model_path or default_checkpoint()
    recipe = recipe_upto(args.upto)
    device_kind = resolve_device(args.device)
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
    job = launch.GenerationJob(
        model_path=model_path, prompt_ids=prompt_ids, max_new_tokens=args.max_new_tokens, upto=args.upto,
        tp=args.tp, device_kind=device_kind, dtype=DTYPES[args.dtype], max_len=args.max_seq_len,
        eos_token_id=None if args.ignore_eos else getattr(tokenizer, "eos_token_id", None),
        compile_cache=args.compile_cache or os.path.join(cache_root(), "compile"),
        profile_dir=os.path.abspath(args.profile) if args.profile else None, progress=sys.stderr.isatty())
    gen = launch.run(job)
    if gen is None:                                  # torchrun rank > 0: rank 0 reports
        return None
    devices = args.tp if device_kind != "cpu" else 0
    record = {
        "token_ids": gen["token_ids"], "text": tokenizer.decode(gen["token_ids"]) if tokenizer else None,
        "prompt": None if args.prompt_ids else args.prompt, "prompt_token_ids": prompt_ids,
        **{k: gen[k] for k in ("prefill_ms", "decode_ms_per_token", "decode_ms", "first_decode_ms",
                               "compile_s", "bytes_read_per_rank", "compile_cache_hit", "profile")},
        "steps": list(recipe.steps), "upto": args.upto, "engine": recipe.engine,
        "world_size": args.tp, "tp": args.tp, "devices": devices,
        "cards": devices / hardware("a3-die").devices_per_package if device_kind == "npu" else None,
    }
    record.update(compile_cache=job.compile_cache if recipe.cached_graph else None,
                  launcher="torchrun" if parallel.launched_by_torchrun() else ("spawn" if args.tp > 1 else "single"),
                  device=device_kind, dtype=args.dtype, model_path=os.path.abspath(model_path),
                  max_new_tokens=args.max_new_tokens, max_seq_len=args.max_seq_len)
    record.update(platform.provenance(env=gen["env"]))            # commit, versions, env, host, timestamp
    record["host"]["rank0_cpu_affinity"] = gen["cpu_affinity"]
    return record


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
