"""Train the embedded default checkpoint: a `tiny` Qwen3-MoE that writes (small-model) English.

- Corpus: the Python documentation every CPython install carries (pydoc_data's language-reference
  topics, then standard-library docstrings, a module a document, in sorted file order), PSF
  License 2. Code blocks and doctests are dropped, prose paragraphs joined to one line; ~3 % of
  documents are held out.
- Model: transformers' Qwen3MoeForCausalLM with the `tiny` preset's shapes, trained from scratch
  in float32 with the router load-balancing loss on; saved in bf16 with SHA256SUMS.
- Deterministic for a given Python stdlib (the corpus) and library versions: fixed seeds, fixed
  thread count, a fixed step count (`--minutes` only picks the step count from a timed probe).

    nice -n 19 python scripts/train_tiny.py --out qwen3moe_tutorial/data/tiny-trained --steps 1000 --threads 1 \\
        --result results/train-tiny.json
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import inspect
import itertools
import json
import math
import os
import platform as pyplatform
import re
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qwen3moe_tutorial.config import preset  # noqa: E402
from qwen3moe_tutorial.platform import git_commit  # noqa: E402
from qwen3moe_tutorial.weights import (Checkpoint, hf_model_config, make_tokenizer, save_checkpoint,  # noqa: E402
                                       write_manifest)

LICENSE = "Python Software Foundation License Version 2 (PSF-2.0)"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__", "ensurepip"}
THREADS = 2              # the default; with another job on the CPU, 1 thread under nice is ~18x faster
SEED = 0
HELD_OUT_PERCENT = 3
EXPERTS = "eager"        # transformers' per-expert loop: on 2 CPU threads as fast as any (8k tokens/s)


class UsageError(ValueError):
    """A command line that cannot run."""


# ---- corpus ---------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Prose only, one paragraph a line: drop indented blocks (code, grammar), doctests and rule
    lines (`****`), join each remaining paragraph's lines with single spaces."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text.expandtabs(8))):
        lines = [ln for ln in para.splitlines() if ln.strip() and not re.fullmatch(r"\s*[-=*~^+#_.]{3,}\s*", ln)]
        if not lines or lines[0].startswith("   ") or lines[0].lstrip().startswith((">>>", "...", "$ ")):
            continue
        joined = " ".join(" ".join(lines).split())
        if re.search(r"[A-Za-z]{2}", joined):
            paragraphs.append(joined)
    return "\n".join(paragraphs)


def stdlib_docstrings():
    """Per .py file of the standard library (sorted), its module, class and function docstrings:
    a generator, so a small corpus cap never parses the whole library."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield [doc for node in ast.walk(tree)
                   if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                   and (doc := ast.get_docstring(node, clean=False))]


def build_corpus(max_chars: int, min_doc_chars: int = 80) -> tuple[list[str], list[str], dict]:
    """(train documents, held-out documents, corpus record). A document is one reference topic or
    one module's docstrings (long documents: few end-of-text tokens, so greedy text goes on).
    Topics first, then modules, exact duplicates dropped, stopped at `max_chars`; the documents
    with the smallest sha256 are held out."""
    import pydoc_data.topics

    sources = itertools.chain(([pydoc_data.topics.topics[k]] for k in sorted(pydoc_data.topics.topics)),
                              stdlib_docstrings())
    docs, seen, total = [], set(), 0
    for texts in sources:
        doc = "\n".join(p for p in map(normalise, texts) if p)
        if len(doc) < min_doc_chars or doc in seen:
            continue
        if total + len(doc) > max_chars:
            break
        seen.add(doc)
        docs.append(doc)
        total += len(doc)
    n_held = max(1, round(len(docs) * HELD_OUT_PERCENT / 100))
    held = set(sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).hexdigest())[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    blob = "\x00".join(docs).encode()
    record = {
        "source": f"CPython {pyplatform.python_version()} documentation shipped with the interpreter: "
                  f"pydoc_data.topics.topics ({len(pydoc_data.topics.topics)} language-reference topics) and "
                  f"docstrings (ast.get_docstring) of the .py files under sysconfig stdlib, sorted, skipping "
                  f"{', '.join(sorted(SKIP_DIRS))}",
        "license": LICENSE,
        "normalisation": "per topic or docstring: inspect.cleandoc; paragraphs split on blank lines; indented "
                         "blocks, doctests and rule lines dropped; each paragraph joined to one line with single "
                         "spaces. A document is one topic or one module's docstrings (a paragraph a line); "
                         f"documents under {min_doc_chars} chars and exact duplicates dropped",
        "max_chars": max_chars, "chars": total, "documents": len(docs),
        "train_documents": len(train), "held_out_documents": len(val),
        "held_out_rule": f"the max(1, round({HELD_OUT_PERCENT} % of documents)) documents with the smallest "
                         f"sha256(text)",
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    return train, val, record


def tokenize(tokenizer, docs: list[str]) -> torch.Tensor:
    """One stream: every document followed by <|endoftext|>."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for enc in tokenizer(docs)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ---- training -------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine down to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def held_out_loss(model, val: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token loss over the held-out stream cut into consecutive windows (no aux loss)."""
    model.eval()
    n = (len(val) - 1) // seq_len
    x = val[:n * seq_len].view(n, seq_len)                         # [n, S]
    y = val[1:n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i:i + batch], output_router_logits=False).logits   # [b, S, V]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch].flatten(),
                                                   reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the embedded tiny Qwen3-MoE on the Python docs.")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --minutes)")
    p.add_argument("--minutes", type=float, default=18.0,
                   help="time budget used to pick --steps from a timed probe (default: %(default)s)")
    p.add_argument("--result", help="write the result record (JSON) here")
    p.add_argument("--quick", action="store_true", help="a smoke run: small corpus, short sequences, 3 steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=4_000_000,
                   help="corpus size cap in characters (default: %(default)s)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads; results depend on it (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period (default: %(default)s)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.steps = args.steps or 3
        args.batch, args.seq_len, args.max_chars, args.eval_every = 4, 64, min(args.max_chars, 150_000), 2
    for name in ("steps", "batch", "seq_len", "max_chars", "eval_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0 or not args.minutes > 0:
        raise UsageError(f"--lr and --minutes must be positive, got {args.lr} and {args.minutes}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out} exists and is not an empty directory")
    return args


def train(args) -> dict:
    """Train, save and verify; the result record. Leaves torch's thread count and deterministic
    flag as it found them (tests call this in-process)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args) -> dict:
    import tokenizers
    import transformers
    from transformers import Qwen3MoeForCausalLM

    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = True
    except RuntimeError:
        deterministic = False
    cfg = preset("tiny")

    train_docs, val_docs, corpus = build_corpus(args.max_chars)
    if not val_docs or len(train_docs) < 2:
        raise UsageError(f"--max-chars {args.max_chars} leaves too few documents to hold some out")
    tokenizer = make_tokenizer(cfg.vocab_size, corpus=train_docs)
    train_ids, val_ids = tokenize(tokenizer, train_docs), tokenize(tokenizer, val_docs)
    if len(val_ids) <= args.seq_len:
        raise UsageError(f"the held-out set ({len(val_ids)} tokens) is shorter than --seq-len {args.seq_len}")
    corpus.update(tokens=len(train_ids) + len(val_ids), train_tokens=len(train_ids), held_out_tokens=len(val_ids),
                  tokenizer=f"byte-level BPE (weights.make_tokenizer), {len(tokenizer)} tokens, trained on "
                            f"the training documents")

    torch.manual_seed(SEED)
    hf_cfg = hf_model_config(cfg.replace(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    hf_cfg.output_router_logits, hf_cfg.router_aux_loss_coef = True, 0.01
    model = Qwen3MoeForCausalLM(hf_cfg).float().train()
    model.set_experts_implementation(EXPERTS)
    decays = {n: p.dim() >= 2 and "embed" not in n for n, p in model.named_parameters()}   # matrices, not the embedding
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    hparams = {"seq_len": args.seq_len, "batch": args.batch, "peak_lr": args.lr, "min_lr_ratio": 0.1,
               "schedule": "linear warm-up, cosine", "optimizer": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8,
               "weight_decay": 0.1, "weight_decay_on": "matrices except the embedding", "grad_clip": 1.0,
               "router_aux_loss_coef": hf_cfg.router_aux_loss_coef, "output_router_logits": True,
               "init": f"transformers' _init_weights (initializer_range {hf_cfg.initializer_range})",
               "experts_implementation": EXPERTS, "train_dtype": "float32", "saved_dtype": "bfloat16",
               "eval_every": args.eval_every}

    def new_optimizer():
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    opt = new_optimizer()
    gen = torch.Generator().manual_seed(SEED)

    def step_fn(step: int, steps: int, warmup: int) -> tuple[float, float]:
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])        # [B, S]
        y = torch.stack([train_ids[s + 1:s + args.seq_len + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup)
        out = model(input_ids=x, output_router_logits=True)        # logits [B, S, V], aux_loss scalar
        lm_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        (lm_loss + hf_cfg.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return lm_loss.item(), out.aux_loss.item()

    steps = args.steps
    probe = None
    if steps is None:                       # time a few steps on a throwaway copy of the state
        state = ({k: v.clone() for k, v in model.state_dict().items()}, gen.get_state())
        t0 = time.perf_counter()
        for i in range(3):
            step_fn(i, 100, 10)
        per_step = (time.perf_counter() - t0) / 3
        model.load_state_dict(state[0])
        gen.set_state(state[1])
        opt = new_optimizer()
        n_evals_cost = 0.15                  # evaluation and saving take about this share of the budget
        steps = max(1, int(args.minutes * 60 * (1 - n_evals_cost) / per_step))
        probe = {"seconds_per_step": round(per_step, 3), "steps_chosen": steps}
        print(f"probe: {per_step:.2f} s/step -> {steps} steps for {args.minutes} min", file=sys.stderr, flush=True)
    warmup = max(1, min(100, steps // 10))
    hparams.update(steps=steps, warmup_steps=warmup, tokens_per_step=args.batch * args.seq_len)

    curve, evals = [], [{"step": 0, "held_out_loss": held_out_loss(model, val_ids, args.seq_len, args.batch)}]
    t_train = time.perf_counter()
    for step in range(steps):
        loss, aux = step_fn(step, steps, warmup)
        if not math.isfinite(loss):
            raise RuntimeError(f"training loss is {loss} at step {step}")
        curve.append({"step": step + 1, "loss": round(loss, 4), "aux_loss": round(aux, 4)})
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            evals.append({"step": step + 1, "held_out_loss": held_out_loss(model, val_ids, args.seq_len, args.batch),
                          "elapsed_s": round(time.perf_counter() - t_train, 1)})
            print(f"step {step + 1}/{steps} train {loss:.3f} aux {aux:.3f} held-out "
                  f"{evals[-1]['held_out_loss']:.3f} ({evals[-1]['elapsed_s']} s)", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t_train

    save_checkpoint(model, cfg, tokenizer, args.out, max_shard_size="2MB", dtype=torch.bfloat16)
    sums = write_manifest(args.out)
    Checkpoint(args.out).validate()
    shipped = Qwen3MoeForCausalLM.from_pretrained(args.out, dtype=torch.float32, experts_implementation=EXPERTS)
    bf16_loss = held_out_loss(shipped, val_ids, args.seq_len, args.batch)
    final = evals[-1]["held_out_loss"]
    return {
        "what": "scripts/train_tiny.py: the embedded default checkpoint (tiny preset) trained from scratch",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join(["python", "scripts/train_tiny.py", *args.argv]),
        "versions": {"python": pyplatform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "processor": pyplatform.processor()
                    or pyplatform.machine(), "nice": os.nice(0)},
        "deterministic_algorithms": deterministic, "seeds": {"torch": SEED, "batch_sampler": SEED},
        "model": {**cfg.to_hf_dict(), "parameters": sum(p.numel() for p in model.parameters())},
        "hyper_parameters": hparams, "probe": probe, "corpus": corpus,
        "train_loss": curve, "held_out": evals,
        "final": {"held_out_loss": final, "held_out_perplexity": math.exp(final),
                  "held_out_loss_saved_bf16": bf16_loss, "held_out_perplexity_saved_bf16": math.exp(bf16_loss)},
        "wall_s": {"training": round(train_s, 1), "total": round(time.perf_counter() - t_start, 1)},
        "checkpoint": {"dir": os.path.relpath(args.out), "bytes": sum(os.path.getsize(os.path.join(args.out, f))
                                                                      for f in sums), "sha256": sums},
    }


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        result = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.result:
        os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    fin = result["final"]
    print(f"held-out loss {fin['held_out_loss']:.3f} (perplexity {fin['held_out_perplexity']:.1f}); "
          f"saved bf16 {fin['held_out_loss_saved_bf16']:.3f}; {result['checkpoint']['bytes'] / 1e6:.1f} MB in "
          f"{args.out}; {result['wall_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
