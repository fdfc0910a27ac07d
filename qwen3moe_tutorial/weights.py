"""Checkpoints: read Hugging Face Qwen3-MoE safetensors lazily, and make small ones to learn on.

- `Checkpoint` opens single-file or sharded (`model.safetensors.index.json`) checkpoints, reads
  whole tensors or slices (`get_slice`), counts the bytes it read, and checks names and shapes
  against the config before anything is loaded. It never reads a tensor nobody asked for.
- `save_checkpoint` writes a real HF checkpoint (per-expert keys, tokenizer, generation config)
  through transformers; `make_tiny_checkpoint` uses it for random weights of any shape, and
  scripts/train_tiny.py for the trained default shipped in `data/tiny-trained/`.
- `default_checkpoint` copies that shipped checkpoint once into a cache, after checking every
  file against its SHA256SUMS; it never trains or downloads anything.
- Layout transforms (merged QKV, w13) live with the steps that introduce them, not here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import torch
from safetensors import safe_open

from .config import ConfigError, ModelConfig, preset

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # Qwen's, after the BPE vocabulary
DEFAULT_PRESET, DEFAULT_SEED = "tiny", 0
CHECKPOINT_FORMAT = 2            # bump when make_tiny_checkpoint or a preset changes what it writes (2: head_dim 64)
DEFAULT_FORMAT = 3               # the embedded default's cache version (3: trained, shipped; 2 was random weights)
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "data", "tiny-trained")
MANIFEST = "SHA256SUMS"          # `sha256sum -c` format: "<hex>  <file name>" a line
PROGRESS_BYTES = 256 << 20       # show a progress bar for loads above this


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an HF Qwen3-MoE checkpoint with its [out, in] shape."""
    H, V, D, I = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.moe_intermediate_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.q_size, H), p + "self_attn.k_proj.weight": (cfg.kv_size, H),
            p + "self_attn.v_proj.weight": (cfg.kv_size, H), p + "self_attn.o_proj.weight": (H, cfg.q_size),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate.weight": (cfg.num_experts, H),
        })
        for e in range(cfg.num_experts):
            q = f"{p}mlp.experts.{e}."
            shapes.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H),
                           q + "down_proj.weight": (H, I)})
    return shapes


class Checkpoint:
    """Lazy, slice-able access to the tensors of one HF checkpoint directory."""

    def __init__(self, model_dir: str, config: ModelConfig | None = None):
        self.dir = os.fspath(model_dir)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"model directory {self.dir!r} does not exist")
        self.config = config or ModelConfig.from_pretrained(self.dir)
        self._handles: dict[str, object] = {}       # file name -> open safetensors handle
        self.weight_map = self._weight_map()        # tensor name -> file name
        self.bytes_read = 0

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            for fname in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.dir, fname)):
                    raise CheckpointError(f"{index} names shard {fname!r}, which is missing from {self.dir}")
            return weight_map
        files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors file (or model.safetensors.index.json) in {self.dir}")
        return {name: fname for fname in files for name in self._open(fname).keys()}

    def _open(self, fname: str):
        if fname not in self._handles:
            path = os.path.join(self.dir, fname)
            try:
                self._handles[fname] = safe_open(path, framework="pt")
            except Exception as e:   # safetensors raises SafetensorError / OSError with terse text
                raise CheckpointError(f"cannot read {path}: corrupt or not a safetensors file ({e})") from None
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _slice_handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"checkpoint {self.dir} has no tensor {name!r} "
                                  f"(the config {self.config.name!r} needs it)")
        fname = self.weight_map[name]
        try:
            return self._open(fname).get_slice(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {fname}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice_handle(name).get_shape())

    def validate(self) -> None:
        """Check every tensor the config implies is present with the right shape (metadata only)."""
        missing, wrong = [], []
        for name, shape in expected_shapes(self.config).items():
            if name not in self.weight_map:
                missing.append(name)
            elif self.shape(name) != shape:
                wrong.append(f"{name}: checkpoint {list(self.shape(name))}, config implies {list(shape)}")
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"config.json does not match the weights in {self.dir}: missing "
                                  f"{', '.join(missing[:3])}{more}")
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise CheckpointError(f"config.json does not match the weights in {self.dir}: "
                                  f"{'; '.join(wrong[:3])}{more}")

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A whole tensor, converted to dtype."""
        return self.get_slice(name, 0, 0, None, dtype)

    def get_slice(self, name: str, dim: int, start: int, stop: int | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) along `dim` (0 or 1) of a tensor, reading only those bytes from disk."""
        sl = self._slice_handle(name)
        shape = sl.get_shape()
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(f"slice [{start}:{stop}] of dim {dim} is outside {name!r} of shape {shape}")
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, stop)
        try:
            t = sl[tuple(index)]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r}: corrupt data ({e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t if dtype is None else t.to(dtype)

    @contextmanager
    def progress(self, desc: str, total_bytes: int):
        """A tqdm bar over bytes for large loads; nothing for small ones."""
        if total_bytes < PROGRESS_BYTES:
            yield lambda: None
            return
        from tqdm.auto import tqdm
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc)
        last = self.bytes_read

        def update():
            nonlocal last
            bar.update(self.bytes_read - last)
            last = self.bytes_read
        try:
            yield update
        finally:
            bar.close()

    def total_bytes(self) -> int:
        """Size of all tensor files on disk (what a full, unsharded load would read)."""
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.weight_map.values()))


# ---- making checkpoints --------------------------------------------------------------------------
def _corpus() -> list[str]:
    path = os.path.join(os.path.dirname(__file__), "data", "tokenizer_corpus.txt")
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def make_tokenizer(vocab_size: int, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer in Qwen's style, trained deterministically on `corpus` (default:
    the small bundled one).

    Regular tokens come first, then Qwen's special tokens; the model's vocab_size may be larger
    (as in Qwen3, whose embedding has padding rows past the tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(SPECIAL_TOKENS), 257),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@torch.no_grad()
def _init_weights(model, seed: int) -> None:
    """Weights with O(1) activations (std 1/sqrt(fan_in)) so logits and router scores are well
    separated: random but decisive, so greedy tokens do not hinge on rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:                                     # [..., out, in]: fan_in is the last dim
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def hf_model_config(cfg: ModelConfig):
    """transformers' Qwen3MoeConfig for `cfg` (the fields config.json carries, minus the file's own keys)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                             if k not in ("architectures", "model_type", "torch_dtype")})


def save_checkpoint(model, cfg: ModelConfig, tokenizer, out_dir: str, max_shard_size: str = "2MB",
                    dtype: torch.dtype = torch.bfloat16) -> str:
    """Write `model` (a Qwen3MoeForCausalLM for `cfg`) as a released-style HF checkpoint.

    Safetensors in `dtype` with per-expert keys (transformers converts its fused expert tensors
    back on save), config.json in the released models' spelling rather than transformers 5's
    rewrite, generation_config.json (greedy, end-of-text as bos/eos/pad) and the tokenizer.
    Converts `model` to `dtype` in place."""
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    os.makedirs(out_dir, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**cfg.replace(bos_token_id=eos, eos_token_id=eos).to_hf_dict(),
                   "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=2)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_checkpoint(out_dir: str, preset_name: str | ModelConfig = "tiny", seed: int = 0,
                         max_shard_size: str = "2MB", dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a real Hugging Face Qwen3-MoE checkpoint with random weights to `out_dir`.

    config.json (released-model format), sharded safetensors with per-expert keys and an index,
    generation_config.json and a tokenizer loadable by AutoTokenizer. Same inputs, same bytes."""
    from transformers import Qwen3MoeForCausalLM

    cfg = preset(preset_name) if isinstance(preset_name, str) else preset_name
    tokenizer = make_tokenizer(cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = cfg.replace(bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf_model_config(cfg))
    model = model.to_empty(device="cpu")
    _init_weights(model, seed)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        n_text = len(tokenizer) - len(SPECIAL_TOKENS)
        with torch.no_grad():   # special and padding rows: near-silent logits, as in a trained model
            model.lm_head.weight[n_text:] *= 0.05
    return save_checkpoint(model, cfg, tokenizer, out_dir, max_shard_size, dtype)


# ---- SHA256SUMS ----------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(model_dir: str) -> dict[str, str]:
    """Write SHA256SUMS over every file in `model_dir` (sorted by name); return {file: sha256}."""
    sums = {f: file_sha256(os.path.join(model_dir, f)) for f in sorted(os.listdir(model_dir))
            if f != MANIFEST and os.path.isfile(os.path.join(model_dir, f))}
    with open(os.path.join(model_dir, MANIFEST), "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sums.items())
    return sums


def read_manifest(model_dir: str) -> dict[str, str]:
    path = os.path.join(model_dir, MANIFEST)
    try:
        with open(path) as f:
            rows = [line.split(None, 1) for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    if not rows or any(len(r) != 2 or len(r[0]) != 64 for r in rows):
        raise CheckpointError(f"{path} is not a SHA256SUMS file (\"<sha256>  <file>\" per line)")
    return {name.lstrip("*"): digest.lower() for digest, name in rows}


def verify_manifest(model_dir: str, sums: dict[str, str] | None = None) -> None:
    """Check every file listed in SHA256SUMS (or `sums`) against its sha256; raise CheckpointError
    naming the first missing or differing file."""
    for name, digest in (read_manifest(model_dir) if sums is None else sums).items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        actual = file_sha256(path)
        if actual != digest:
            raise CheckpointError(f"{path} has sha256 {actual[:16]}..., {MANIFEST} says {digest[:16]}...: "
                                  f"the file is corrupt or was changed")


def cache_root() -> str:
    """Where generated checkpoints live: $QWEN3MOE_TUTORIAL_CACHE, else ~/.cache/qwen3moe_tutorial."""
    return os.environ.get("QWEN3MOE_TUTORIAL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qwen3moe_tutorial")


def generated_checkpoint(preset_name: str = DEFAULT_PRESET, seed: int = DEFAULT_SEED, quiet: bool = False) -> str:
    """Path of a generated checkpoint, creating it on first use (atomically: safe for many ranks)."""
    target = os.path.join(cache_root(), f"{preset_name}-seed{seed}-v{CHECKPOINT_FORMAT}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    if not quiet:
        print(f"Creating the {preset_name!r} checkpoint (seed {seed}) once, in {target} ...",
              file=sys.stderr, flush=True)
    tmp = tempfile.mkdtemp(prefix=f".{preset_name}-", dir=cache_root())
    try:
        size = "2MB" if preset_name == "tiny" else "1GB"
        make_tiny_checkpoint(tmp, preset_name, seed, max_shard_size=size)
        try:
            os.rename(tmp, target)                  # atomic; loses the race gracefully
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"... done: {target}", file=sys.stderr, flush=True)
    return target


def default_checkpoint(quiet: bool = False) -> str:
    """The embedded default: the trained `tiny` checkpoint shipped in data/tiny-trained/, copied
    once into the cache (atomically: safe for many ranks) after its sha256 sums are checked. The
    cached copy is checked again on every call (about 5 MB to hash)."""
    sums = read_manifest(SHIPPED_DIR)
    tag = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:12]
    target = os.path.join(cache_root(), f"tiny-trained-v{DEFAULT_FORMAT}-{tag}")   # a retrain gets a new path
    if not os.path.isfile(os.path.join(target, MANIFEST)):
        verify_manifest(SHIPPED_DIR, sums)
        os.makedirs(cache_root(), exist_ok=True)
        if not quiet:
            print(f"Copying the embedded checkpoint once, to {target}", file=sys.stderr, flush=True)
        tmp = tempfile.mkdtemp(prefix=".tiny-trained-", dir=cache_root())
        try:
            for name in (*sums, MANIFEST):        # the manifest last: its presence marks a whole copy
                shutil.copyfile(os.path.join(SHIPPED_DIR, name), os.path.join(tmp, name))
            try:
                os.rename(tmp, target)              # atomic; loses the race gracefully
            except OSError:
                if not os.path.isfile(os.path.join(target, MANIFEST)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        verify_manifest(target, sums)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (delete {target} to copy it again)") from None
    return target


MODEL_PATH_ENV = "QWEN3MOE_MODEL_PATH"


def book_checkpoint() -> str:
    """The checkpoint the notebooks use: $QWEN3MOE_MODEL_PATH (a real model on an A3 node), else
    the embedded default."""
    return os.environ.get(MODEL_PATH_ENV) or default_checkpoint()


def tensor_digest(ckpt: Checkpoint) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: identifies a checkpoint's content."""
    h = hashlib.sha256()
    for name in sorted(ckpt.keys()):
        t = ckpt.get(name)
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()
