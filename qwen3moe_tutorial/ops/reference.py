"""Pure-PyTorch reference kernels for the torch_npu fused ops of the Qwen3-MoE decode recipe.

- One function per op, with torch_npu 2.13.0's name, parameters, defaults, return tuple, shapes and dtypes
  (tests/test_npu_conformance.py checks the signatures against the wheel's schemas). Semantics and limits come
  from torch_npu's op docs and Ascend's CPU golden tests (Ascend/op-plugin `docs/context/torch_npu-<op>.md`,
  `test/test_custom_ops/test_<op>.py`); the book's appendix "The fused operators" explains each op.
- Numerics follow Ascend's CPU golden functions: compute in float32, round once to the output dtype.
- Only what the recipe needs: quantisation, paged KV caches and drop/pad routing raise NotImplementedError.
- What the NPU kernels reject on Atlas A2/A3 (head dims, layouts, dtypes, list and group counts, index ranges),
  as the op docs and golden tests state it, raises OpInputError here too; each check names its source.
- No host syncs in the decode-path ops, so they trace under torch.compile(fullgraph=True); checks that read
  tensor values run in eager mode only.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
INT_TYPES = (int, torch.SymInt)   # host ints; symbolic under torch.compile(dynamic=True)
# ScalarType numbers that torch_npu accepts in an `int?` dtype slot (c10::ScalarType order).
_SCALAR_TYPE = {5: torch.float16, 6: torch.float32, 15: torch.bfloat16}
_FIA_MASK_SIZE = 2048          # sparse_mode 2/3 take this compressed lower-triangular template
_GMM_GATHER_BUDGET = 1 << 24   # elements of gathered expert weights per row chunk (64 MiB in fp32)
# op-plugin docs (npu_grouped_matmul, Atlas A2/A3): at most 128 tensors per list, 1024 groups in one 3-D
# weight, inner (stride-1) dims below 65536; without quantisation bias is fp16 for fp16 x, fp32 otherwise
_GMM_MAX_LIST = 128
_GMM_MAX_GROUPS = 1024
_GMM_INNER_LIMIT = 65536
_GMM_BIAS_DTYPE = {torch.float16: torch.float16, torch.bfloat16: torch.float32, torch.float32: torch.float32}
_SORT_LAST = 1 << 40           # a sort key above every expert id


class OpInputError(ValueError):
    """An op got arguments that torch_npu would reject; the message says which and why."""


# ---------------------------------------------------------------- input checks

def _eager() -> bool:
    """True outside torch.compile tracing: only then may a check read tensor values (a host sync)."""
    return not torch.compiler.is_compiling()


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched). Eagerly, the library's matmul. Under compile, a multiply-and-sum over the inner
    dimension, which inductor fuses with its neighbours into its own kernel: at decode sizes that
    streams the operands faster than a library call per product (chapter 9, lab log entry 9)."""
    if _eager():
        return a @ b
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _fail(op: str, msg: str):
    raise OpInputError(f"{op}: {msg}")


def _stable_rank(keys: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Where each entry of `keys` lands in a stable sort along the last dim, int64 [..., n].

    Under compile, torch.sort is a library call per use, outside inductor's kernels (two per MoE layer
    at decode: gating's top-k and routing's order). Counting, for each entry, the entries that sort
    before it (smaller, or equal and earlier) gives the same permutation as an n x n comparison that
    inductor fuses with its neighbours; at decode n is E (top-k) or K (routing). NaN sorts as the
    largest value, as in torch.sort."""
    a, b = keys.unsqueeze(-1), keys.unsqueeze(-2)                         # entry i [.., n, 1], j [.., 1, n]
    n = keys.shape[-1]
    idx = torch.arange(n, device=keys.device)
    earlier = idx.unsqueeze(0) < idx.unsqueeze(1)                          # [n, n]: j < i
    if keys.is_floating_point():
        a_nan, b_nan = a.isnan(), b.isnan()
        tie = (a == b) | (a_nan & b_nan)
        first = ((b > a) | (b_nan & ~a_nan)) if descending else ((b < a) | (a_nan & ~b_nan))
    else:
        tie = a == b
        first = (b > a) if descending else (b < a)
    return (first | (tie & earlier)).sum(-1)                               # [..., n]


def _sort(keys: torch.Tensor, descending: bool = False):
    """torch.sort(keys, stable=True) along the last dim -> (values, int64 order). Eagerly the library's
    sort; under compile the same permutation from `_stable_rank`, which inductor fuses (no library call)."""
    if _eager():
        return torch.sort(keys, dim=-1, descending=descending, stable=True)
    rank = _stable_rank(keys, descending)                                 # [..., n] destination of each entry
    n = keys.shape[-1]
    slots = torch.arange(n, device=keys.device)
    lands = rank.unsqueeze(-2) == slots.unsqueeze(-1)                     # [..., n slots, n entries]
    order = (lands * torch.arange(n, device=keys.device)).sum(-1)         # slot i <- entry order[i]
    return keys.gather(-1, order), order


def _top_k(probs: torch.Tensor, k: int):
    """The first k of a stable descending sort along the last dim -> (values, int32 ids): ties go to the
    lower id, NaN counts as the largest value. Eagerly the library's sort; under compile k rounds of
    argmax (which breaks ties and ranks NaN the same way), each masking its winner: k reductions over
    E that inductor fuses, instead of a library sort or an E x E comparison. The mask value -inf
    never wins because every probability is >= 0."""
    if _eager():
        y, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        return y[..., :k], idx[..., :k].to(torch.int32)
    ids, left = [], probs
    for _ in range(k):                                                     # a loop over k, not values
        i = left.argmax(-1, keepdim=True)                                  # [..., 1]
        ids.append(i)
        left = left.scatter(-1, i, float("-inf"))
    idx = torch.cat(ids, dim=-1)                                           # [..., k]
    return probs.gather(-1, idx), idx.to(torch.int32)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i for a 1-D permutation; under compile a compare-and-sum (fused), not a
    library scatter."""
    n = order.shape[0]
    i = torch.arange(n, device=order.device)
    if _eager():
        return torch.empty_like(order).scatter_(0, order, i)
    return ((order.unsqueeze(0) == i.unsqueeze(1)) * i.unsqueeze(0)).sum(-1)   # [n]: inv[f] = i where order[i] = f


def _cumsum(t: torch.Tensor) -> torch.Tensor:
    """t.cumsum(0) of a 1-D tensor; under compile a masked sum over the n x n lower triangle, which
    inductor fuses (no library call)."""
    if _eager():
        return t.cumsum(0)
    i = torch.arange(t.shape[0], device=t.device)
    return (t.unsqueeze(0) * (i.unsqueeze(0) <= i.unsqueeze(1))).sum(-1)


def _tensor(op: str, name: str, t, dtypes=None, dims=None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        want = (f"{dims.start}-{dims.stop - 1}-D" if isinstance(dims, range)
                else " or ".join(f"{d}-D" for d in dims))
        _fail(op, f"{name} must be {want}, got shape {tuple(t.shape)}")


def _unsupported(op: str, **given) -> None:
    """Raise for arguments of features this reference does not model (quantisation, paging, ...)."""
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise NotImplementedError(f"{op}: the reference kernel does not implement {', '.join(used)} "
                                  f"(quantised / paged / prefix variants); pass None")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------- activation and norms

def npu_swiglu(self, dim=-1):
    """SwiGLU: split `self` in halves A | B along `dim`, return silu(A) * B.

    In the recipe A is the gate (w1) and B the up (w3) projection: `[T*K, 2*I_r] -> [T*K, I_r]`.
    Computed in float32 and rounded once to the input dtype (the swiglu golden computes in fp32).
    """
    op = "npu_swiglu"
    _tensor(op, "self", self, FLOAT_DTYPES, dims=range(1, 9))     # op-plugin docs: 1-8 dims
    if self.numel() == 0 or not self.is_contiguous():                  # op-plugin docs: no empty, no strided input
        _fail(op, f"self must be a non-empty contiguous tensor (got shape {tuple(self.shape)}, "
                  f"contiguous={self.is_contiguous()}); call .contiguous() first")
    if not -self.dim() <= dim < self.dim():
        _fail(op, f"dim={dim} is out of range for a {self.dim()}-D input")
    if self.shape[dim] % 2:
        _fail(op, f"size {self.shape[dim]} along dim {dim} is odd; it must split into two equal halves")
    a, b = self.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(self.dtype)


def _rms_norm(op, x, gamma, epsilon):
    """The normalisation shared by rms_norm and add_rms_norm, after each op's own input checks."""
    _tensor(op, "gamma", gamma, FLOAT_DTYPES)
    if gamma.dtype != x.dtype:                                 # op-plugin docs: gamma has the input's dtype
        _fail(op, f"gamma dtype {gamma.dtype} must equal the input dtype {x.dtype}")
    g = gamma.dim()
    if not 1 <= g <= x.dim() or tuple(x.shape[-g:]) != tuple(gamma.shape):
        _fail(op, f"gamma of shape {tuple(gamma.shape)} must equal the trailing dims of x {tuple(x.shape)}")
    dims = tuple(range(-g, 0))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=dims, keepdim=True) + epsilon)   # [..., 1] float32
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """RMSNorm over the last gamma.dim() axes: y = x * rsqrt(mean(x^2) + eps) * gamma.

    Returns (y, rstd): y has x's shape and dtype; rstd is float32 with shape x.shape[:-g] + (1,)*g.
    Everything, the gamma multiply included, runs in float32 with one final rounding (HF rounds twice).
    The kernel takes 2-8-D inputs and a gamma of the input's dtype.
    """
    op = "npu_rms_norm"
    _tensor(op, "self", self, FLOAT_DTYPES, dims=range(2, 9))  # op-plugin docs (npu_rms_norm): 2-8 dims
    return _rms_norm(op, self, gamma, epsilon)


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """Residual add fused with RMSNorm: x = x1 + x2 (rounded to the input dtype), then the RMSNorm of x.

    Returns (y, rstd, x): **the third output is the sum**, i.e. the new residual stream.
    x1, x2 and gamma share one dtype; inputs are 1-8-D.
    """
    op = "npu_add_rms_norm"
    _tensor(op, "x1", x1, FLOAT_DTYPES, dims=range(1, 9))      # aclnnAddRmsNorm: 1-8 dims
    _tensor(op, "x2", x2, FLOAT_DTYPES, dims=range(1, 9))
    if x1.shape != x2.shape or x1.dtype != x2.dtype:
        _fail(op, f"x1 {tuple(x1.shape)} {x1.dtype} and x2 {tuple(x2.shape)} {x2.dtype} must match")
    if epsilon < 0:                                            # aclnnAddRmsNorm: epsilon >= 0
        _fail(op, f"epsilon must be >= 0, got {epsilon}")
    x = x1 + x2                                                             # rounded to the input dtype
    y, rstd = _rms_norm(op, x, gamma, epsilon)
    return y, rstd, x


# ---------------------------------------------------------------- MoE routing

def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """Softmax over all E experts, then the top k.

    Returns (y [T, k] x.dtype, expert_idx [T, k] int32, row_idx [T, k] int32), T = all leading dims.
    - probabilities are computed in float32, rounded to x's dtype, then ranked by a stable descending sort,
      so among equal rounded probabilities the lower expert id comes first;
    - no renormalisation (Qwen3 divides by the sum outside the op);
    - row_idx[i, j] = j*T + i is **k-major**, the layout npu_moe_init_routing (v1) expects;
    - rows with finished=True get expert id E.
    """
    op = "npu_moe_gating_top_k_softmax"
    _tensor(op, "x", x, FLOAT_DTYPES, dims=(2, 3))
    E = x.shape[-1]
    if not (isinstance(k, INT_TYPES) and 0 < k <= min(E, 1024)):
        _fail(op, f"k must be an int with 0 < k <= min(E={E}, 1024), got {k!r}")
    lead = tuple(x.shape[:-1])
    probs = torch.softmax(x.float(), dim=-1).to(x.dtype)                   # [T, E], rounded like y
    y, expert_idx = _top_k(probs, k)                                       # [T, k]; lower id first on ties
    if finished is not None:
        _tensor(op, "finished", finished, (torch.bool,))
        if tuple(finished.shape) != lead:
            _fail(op, f"finished must have shape x.shape[:-1] = {lead}, got {tuple(finished.shape)}")
        expert_idx = expert_idx.masked_fill(finished.unsqueeze(-1), E)
    T = x[..., 0].numel()
    row_idx = torch.arange(T * k, dtype=torch.int32, device=x.device).view(k, T).t().reshape(*lead, k)
    return y, expert_idx, row_idx


def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    """Permute token rows so that rows of the same expert are contiguous (v1).

    Inputs: x [N, H]; row_idx [N, K] int32 in the **k-major** layout j*N + i (gating's third output);
    expert_idx [N, K] int32. Rows are sorted stably by expert id over the row-major flattening.
    Returns (expanded_x [min(N, active_num)*K, H], expanded_row_idx [N*K] int32, expanded_expert_idx [N*K] int32):
    expanded_row_idx is indexed by the k-major source id j*N + i and gives the destination row;
    expanded_x[i] = x[source_i mod N]. Pair with finalize drop_pad_mode=0.
    """
    op = "npu_moe_init_routing"
    _tensor(op, "x", x, FLOAT_DTYPES, dims=(2,))
    _tensor(op, "row_idx", row_idx, (torch.int32,), dims=(2,))
    _tensor(op, "expert_idx", expert_idx, (torch.int32,), dims=(2,))
    N, K = expert_idx.shape
    if row_idx.shape != expert_idx.shape or N != x.shape[0]:
        _fail(op, f"row_idx {tuple(row_idx.shape)} and expert_idx {tuple(expert_idx.shape)} must both be "
                  f"[N, K] with N = x.shape[0] = {x.shape[0]}")
    if not isinstance(active_num, INT_TYPES) or active_num < 0:
        _fail(op, f"active_num must be a non-negative int, got {active_num!r}")
    sorted_expert, order = _sort(expert_idx.reshape(-1))                   # [N*K] by expert id, stable
    dst_to_src = row_idx.reshape(-1)[order]                                # k-major source ids, [N*K]
    expanded_row_idx = torch.full_like(dst_to_src, -1)
    expanded_row_idx.scatter_(0, dst_to_src.long(), torch.arange(N * K, dtype=torch.int32, device=x.device))
    rows = min(N, active_num) * K
    expanded_x = x[(dst_to_src[:rows] % N).long()]                         # [rows, H]
    return expanded_x, expanded_row_idx, sorted_expert


def _expert_range(op, active_expert_range, expert_num, kind):
    # op-plugin docs (npu_moe_init_routing_v2): expert_num in [0, 5120] in key_value mode (count type 2),
    # else in [0, 10240]; the range lies in [0, 10240] (meta function) and its end is at most expert_num
    limit = 5120 if kind == 2 else 10240
    if expert_num > limit:
        _fail(op, f"expert_num must be <= {limit} with expert_tokens_num_type={kind}, got {expert_num}")
    if len(active_expert_range) == 0:
        return 0, (expert_num if expert_num > 0 else None)
    if len(active_expert_range) != 2 or not isinstance(active_expert_range, list):
        _fail(op, f"active_expert_range must be a list [start, end] (the NPU's meta function rejects "
                  f"other sequences), got {active_expert_range!r}")
    start, end = (operator.index(v) for v in active_expert_range)
    if not 0 <= start < end <= 10240:
        _fail(op, f"active_expert_range must be increasing within [0, 10240], got {[start, end]}")
    if expert_num >= 0 and end > expert_num:
        _fail(op, f"active_expert_range end {end} must not exceed expert_num = {expert_num}")
    return start, end


def _token_counts(flat, in_range, start, n_exp, expert_num, kind):
    """Per-expert counts (kind 1), their cumulative sum (0), or (expert id, count) pairs (2); all int64."""
    local = (flat - start).clamp(0, n_exp - 1)
    if _eager():
        counts = torch.zeros(n_exp, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, local, in_range.long())                     # [n_exp]
    else:       # the same histogram as a compare-and-sum over [n_exp, T*K]: fused, no library scatter
        experts = torch.arange(n_exp, device=flat.device).unsqueeze(1)
        counts = ((local.unsqueeze(0) == experts) & in_range.unsqueeze(0)).sum(-1)
    if kind == 1:
        return counts
    if kind == 0:
        return _cumsum(counts)
    present_first = _sort((counts == 0).to(torch.int8))[1]
    ids = torch.arange(start, start + n_exp, device=flat.device)[present_first]
    pairs = torch.stack((ids, counts[present_first]), dim=-1)              # [n_exp, 2]
    pairs = pairs * (counts[present_first] > 0).unsqueeze(-1)
    return F.pad(pairs, (0, 0, 0, max(expert_num - n_exp, 0)))             # [expert_num, 2]


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                            expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=(),
                            row_idx_type=0, x_dtype=None):
    """Permute token rows by expert, with **row-major** source ids t*K + k (v2).

    x [T, H], expert_idx [T, K] int32. Rows are sorted stably by expert id; experts below the active
    range go last, experts at or above its end sort after the in-range ones (and, like them, by id).
    Let n = the number of in-range entries and R = T*K if active_num <= 0 else min(active_num, T*K).
    Returns (expanded_x, expanded_row_idx, expert_token_cumsum_or_count, expanded_scale), as Ascend's CPU golden:
    - expanded_x [R, H]: expanded_x[i] = x[src_i // K] for i < min(R, n); the rest is undefined on the NPU and
      **zero here**;
    - expanded_row_idx [T*K] int32: row_idx_type 0 ("gather") gives the destination row of source t*K + k for
      every in-range entry, even past R (active_num cuts expanded_x, not the index), and -1 for out-of-range
      experts; row_idx_type 1 ("scatter") is the whole sort order: entry i is the source of destination i,
      out-of-range entries included (they fill positions n..T*K-1);
    - counts int64 over in-range entries: type 1 per-expert counts [end - start], type 0 their cumsum, type 2
      (id, count) pairs of the experts present, then zero rows, [expert_num, 2]; a 0-d tensor when
      expert_tokens_num_flag is False (the NPU leaves it uninitialised);
    - expanded_scale float32 [R]: scale[src_i // K] if scale is given (zero past n), else zeros (undefined on
      the NPU).
    Pair with finalize drop_pad_mode=2 and grouped matmul group_list_type=1 (counts).
    """
    op = "npu_moe_init_routing_v2"
    if quant_mode != -1:
        raise NotImplementedError(f"{op}: quant_mode={quant_mode} (quantised routing) is not implemented")
    _unsupported(op, offset=offset, x_dtype=x_dtype)
    if drop_pad_mode != 0:
        if drop_pad_mode == 1:
            raise NotImplementedError(f"{op}: drop_pad_mode=1 (expert capacity) is not implemented")
        _fail(op, f"drop_pad_mode must be 0 or 1, got {drop_pad_mode!r}")
    if row_idx_type not in (0, 1) or expert_tokens_num_type not in (0, 1, 2):
        _fail(op, f"row_idx_type must be 0/1 and expert_tokens_num_type 0/1/2, got "
                  f"{row_idx_type!r}/{expert_tokens_num_type!r}")
    _tensor(op, "x", x, FLOAT_DTYPES, dims=(2,))
    _tensor(op, "expert_idx", expert_idx, (torch.int32,), dims=(2,))
    T, K = expert_idx.shape
    if x.shape[0] != T:
        _fail(op, f"x has {x.shape[0]} rows but expert_idx has {T}; both are per token")
    start, end = _expert_range(op, active_expert_range, expert_num, expert_tokens_num_type)
    if expert_tokens_num_flag and (end is None or (expert_tokens_num_type == 2 and expert_num <= 0)):
        _fail(op, "expert_tokens_num_flag=True needs expert_num > 0 (or an active_expert_range)")
    # op-plugin docs: expert ids must lie below the expert count (a value check: eager only)
    if _eager() and expert_num > 0 and expert_idx.numel() and \
            bool(((expert_idx < 0) | (expert_idx >= expert_num)).any()):
        _fail(op, f"expert_idx values must lie in [0, expert_num = {expert_num}), got "
                  f"[{int(expert_idx.min())}, {int(expert_idx.max())}]")
    rows = T * K if active_num <= 0 else min(active_num, T * K)

    flat = expert_idx.reshape(-1).long()                                    # [T*K], source f = t*K + k
    in_range = flat >= start if end is None else (flat >= start) & (flat < end)
    order = _sort(torch.where(flat < start, _SORT_LAST, flat))[1]          # dst i <- src order[i]
    if row_idx_type == 0:
        dst = _inverse_permutation(order)                                   # [T*K] dst of each source
        expanded_row_idx = torch.where(in_range, dst, -1).to(torch.int32)
    else:
        expanded_row_idx = order.to(torch.int32)

    src = order[:rows]                                                       # [R]
    defined = in_range[src].unsqueeze(-1)                                    # the first min(R, n) rows
    expanded_x = torch.where(defined, x[src // K], 0)                       # [R, H]
    if scale is not None:
        # op-plugin docs: without quantisation scale is a float32 [T] tensor
        _tensor(op, "scale", scale, (torch.float32,), dims=(1,))
        if scale.shape[0] != T:
            _fail(op, f"scale must be [T] = [{T}], got {tuple(scale.shape)}")
        expanded_scale = torch.where(defined[:, 0], scale[src // K], 0)
    else:
        expanded_scale = torch.zeros(rows, dtype=torch.float32, device=x.device)
    if expert_tokens_num_flag:
        counts = _token_counts(flat, in_range, start, end - start, expert_num, expert_tokens_num_type)
    else:
        counts = torch.zeros((), dtype=torch.int64, device=x.device)
    return expanded_x, expanded_row_idx, counts, expanded_scale


def npu_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert):
    """Cumulative end offset of each expert in a sorted expert list.

    out[e] = number of entries <= e, i.e. searchsorted(sorted, e, side="right"); [num_expert] int32.
    Example: [0, 0, 0, 1, 1, 2] with 3 experts -> [3, 5, 6]. Feed it to grouped matmul as group_list_type=0.
    """
    op = "npu_moe_compute_expert_tokens"
    s = sorted_expert_for_source_row
    _tensor(op, "sorted_expert_for_source_row", s, (torch.int32,), dims=(1,))
    # aclnnMoeComputeExpertTokens (ops-transformer README): fewer than 2**24 entries, 0 < num_expert <= 2048
    if s.numel() >= 1 << 24:
        _fail(op, f"sorted_expert_for_source_row must have fewer than 2**24 entries, got {s.numel()}")
    if not isinstance(num_expert, INT_TYPES) or not 0 < num_expert <= 2048:
        _fail(op, f"num_expert must be an int in (0, 2048], got {num_expert!r}")
    if _eager() and s.numel() > 1 and bool((s[1:] < s[:-1]).any()):
        _fail(op, "sorted_expert_for_source_row must be sorted ascending (use init_routing's third output)")
    experts = torch.arange(num_expert, dtype=s.dtype, device=s.device)
    return torch.searchsorted(s, experts, right=True).to(torch.int32)


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """Un-permute expert outputs and take the weighted sum over each token's K experts.

    out[t] = skip1[t] + skip2[t] + sum_j scales[t, j] * (rows[idx(t, j)] + bias[export_for_source_row[t, j]])
    with idx(t, j) = expanded_src_to_dst_row[j*T + t] for drop_pad_mode 0 (k-major, init_routing v1) or
    [t*K + j] for drop_pad_mode 2 (row-major, init_routing_v2). In these two modes rows are [T*K, H] and every
    index lies in [0, T*K - 1] (the op doc; -1, "dropped", belongs to the drop/pad modes 1 and 3), so an
    init_routing_v2 index with -1 entries (a partial active_expert_range) is rejected eagerly; traced, such an
    entry adds no row (bias still counts). scales, skips and bias have the rows' dtype. Output [T, H] in the
    rows' dtype; float32 accumulation, one rounding.
    """
    op = "npu_moe_finalize_routing"
    rows, idx = expanded_permuted_rows, expanded_src_to_dst_row
    mode = 0 if drop_pad_mode is None else drop_pad_mode
    if mode in (1, 3):
        raise NotImplementedError(f"{op}: drop_pad_mode={mode} (drop/pad, rows [E, C, H]) is not implemented")
    if mode not in (0, 2):
        _fail(op, f"drop_pad_mode must be 0 (k-major, v1) or 2 (row-major, v2), got {drop_pad_mode!r}")
    _tensor(op, "expanded_permuted_rows", rows, FLOAT_DTYPES, dims=(2,))
    _tensor(op, "expanded_src_to_dst_row", idx, (torch.int32,), dims=(1,))     # op-plugin docs: int32
    if scales is not None:
        _tensor(op, "scales", scales, dims=(2,))
        if scales.dtype != rows.dtype:
            _fail(op, f"scales must have the dtype of expanded_permuted_rows ({rows.dtype}), got {scales.dtype}; "
                      f"cast the top-k weights with .to(rows.dtype)")
        T, K = scales.shape
    else:
        K = 1 if k is None else k
        if K <= 0 or idx.numel() % K:
            _fail(op, f"without scales, k={k!r} must be positive and divide len(expanded_src_to_dst_row)")
        T = idx.numel() // K
    if idx.numel() != T * K:
        _fail(op, f"expanded_src_to_dst_row has {idx.numel()} entries, expected T*K = {T}*{K}")
    if rows.shape[0] != T * K:                 # op-plugin docs: rows are [T*K, H] in drop_pad_mode 0 and 2
        _fail(op, f"expanded_permuted_rows must have T*K = {T * K} rows in drop_pad_mode {mode}, got "
                  f"{tuple(rows.shape)}; init_routing_v2 must run with active_num = T*K")
    H = rows.shape[1]
    if skip2 is not None and skip1 is None:
        _fail(op, "skip2 may be given only together with skip1")
    for name, skip in (("skip1", skip1), ("skip2", skip2)):
        if skip is not None:                   # op-plugin docs: the output's shape, the rows' dtype
            _tensor(op, name, skip, dims=(2,))
            if tuple(skip.shape) != (T, H) or skip.dtype != rows.dtype:
                _fail(op, f"{name} must be [{T}, {H}] {rows.dtype}, got {tuple(skip.shape)} {skip.dtype}")
    if bias is not None:
        if export_for_source_row is None:
            _fail(op, "bias needs export_for_source_row (the expert of each (token, k) pair)")
        _tensor(op, "bias", bias, dims=(2,))   # op-plugin docs: [E, H], the rows' dtype
        if bias.shape[1] != H or bias.dtype != rows.dtype:
            _fail(op, f"bias must be [E, {H}] {rows.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if export_for_source_row is not None:      # op-plugin docs: int32 [T, K], values in [0, E-1]
        _tensor(op, "export_for_source_row", export_for_source_row, (torch.int32,), dims=(2,))
        if tuple(export_for_source_row.shape) != (T, K):
            _fail(op, f"export_for_source_row must be [{T}, {K}], got {tuple(export_for_source_row.shape)}")
        if _eager() and bias is not None and export_for_source_row.numel() and bool(
                ((export_for_source_row < 0) | (export_for_source_row >= bias.shape[0])).any()):
            _fail(op, f"export_for_source_row values must lie in [0, E = {bias.shape[0]})")
    if _eager() and idx.numel() and bool(((idx < 0) | (idx >= T * K)).any()):
        _fail(op, f"expanded_src_to_dst_row values must lie in [0, T*K - 1 = {T * K - 1}] in drop_pad_mode "
                  f"{mode}, got [{int(idx.min())}, {int(idx.max())}] (-1 entries come from a partial "
                  f"active_expert_range in init_routing_v2; use the full range [0, E])")

    dst = idx.view(K, T).t() if mode == 0 else idx.view(T, K)              # [T, K] destination rows
    picked = rows[dst.clamp(min=0).long()].float()                          # [T, K, H]
    picked = torch.where((dst >= 0).unsqueeze(-1), picked, 0)
    if bias is not None:
        picked = picked + bias.float()[export_for_source_row.long()]        # [T, K, H]
    if scales is not None:
        picked = picked * scales.float().unsqueeze(-1)
    out = picked.sum(dim=1)                                                 # [T, H]
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(rows.dtype)


# ---------------------------------------------------------------- grouped matmul

def _resolve_dtype(op, output_dtype, default):
    if output_dtype is None:
        return default
    dtype = _SCALAR_TYPE.get(output_dtype) if isinstance(output_dtype, int) else output_dtype
    if dtype not in FLOAT_DTYPES:
        raise NotImplementedError(f"{op}: output_dtype={output_dtype!r}; only fp16/bf16/fp32 outputs are "
                                  f"implemented (int outputs belong to quantised matmuls)")
    return dtype


def _group_ends(op, group_list, group_list_type, G, M, device):
    """Cumulative end row of each group, [G] int64, from counts (type 1) or cumulative offsets (type 0)."""
    if group_list is None:
        _fail(op, "group_type=0 needs group_list (per-expert counts or cumulative offsets)")
    if not isinstance(group_list, torch.Tensor):
        group_list = torch.tensor(list(group_list), dtype=torch.int64, device=device)
    _tensor(op, "group_list", group_list, INDEX_DTYPES, dims=(1,))
    if group_list.shape[0] != G:
        _fail(op, f"group_list has {group_list.shape[0]} entries but the weights hold {G} groups")
    if group_list_type not in (0, 1):
        _fail(op, f"group_list_type must be 0 (cumulative) or 1 (counts), got {group_list_type!r}")
    if group_list_type == 1 and G == 1:        # op-plugin docs: a counts group_list may not have length 1
        _fail(op, "a counts group_list (group_list_type=1) may not have length 1; use group_list_type=0 "
                  "(cumulative) for a single group")
    if group_list_type == 0:
        ends = group_list.long()
    else:
        ends = _cumsum(group_list.long())
    if _eager() and G:
        if group_list_type == 1 and bool((group_list < 0).any()):
            _fail(op, f"group_list counts must be non-negative, got {group_list.tolist()}")
        if group_list_type == 0 and (bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0):
            _fail(op, f"cumulative group_list must be non-decreasing and >= 0, got {group_list.tolist()}")
        if int(ends[-1]) > M:
            _fail(op, f"group_list covers {int(ends[-1])} rows but x has only M = {M}")
    return ends


def _gmm_gathered(x, w, ends, bias):
    """Per-row gathered matmul: row r uses weight w[group(r)]; no host sync, any M (row chunks)."""
    M, G, (_, Kd, N) = x.shape[0], w.shape[0], w.shape
    rows = torch.arange(M, device=x.device)
    if _eager():
        gid = torch.searchsorted(ends, rows, right=True)                    # [M], G = past the last group
    else:                                                                   # the same count, fused by inductor
        gid = (ends.unsqueeze(0) <= rows.unsqueeze(1)).sum(-1)
    valid = gid < G
    gid = gid.clamp(max=G - 1)
    chunk = max(1, _GMM_GATHER_BUDGET // max(Kd * N, 1))
    parts = []
    for s in range(0, M, chunk):                                            # a loop over shapes, not values
        g = gid[s:s + chunk]
        y = _matmul(x[s:s + chunk].float().unsqueeze(1), w[g].float()).squeeze(1)        # [c, N]
        if bias is not None:
            y = y + bias.float()[g]
        parts.append(y)
    y = torch.cat(parts) if parts else x.new_zeros((0, N), dtype=torch.float32)
    return torch.where(valid.unsqueeze(-1), y, 0)                           # rows past the total -> 0


def _gmm_sliced(x, w, ends, bias):
    """Per-group slices x[s:e] @ w[g]: reads each used weight once; reads the group list on the host."""
    out = x.new_zeros((x.shape[0], w.shape[2]), dtype=torch.float32)
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            y = x[start:end].float() @ w[g].float()
            out[start:end] = y if bias is None else y + bias[g].float()
        start = end
    return out


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """Grouped matmul over lists of tensors. Returns a list of tensors.

    - group_type=0 (split M), one x [M, K]: weight = [w [G, K, N]] (or G tensors [K, N]); rows
      ends[g-1]:ends[g] of x use w[g], ends = cumsum(group_list) for group_list_type=1 (counts) or group_list
      itself for group_list_type=0 (cumulative). Zero-count groups are fine; rows past the last end are
      never read as part of a group and come out as **zeros** (garbage on the NPU).
    - group_type=0, several x (x_i [M_i, K_i] with weight_i [K_i, N]), split_item 2/3: one output, the products
      x_i @ weight_i stacked along M; a group_list, if given, must describe the M_i.
    - group_type=-1: no grouping, y_i = x_i @ weight_i for each pair, split_item 0/1 (one output per pair).
    - group_type=None, the legacy .List overload: group_list is an int list of cumulative row offsets
      (non-decreasing, not of length 1) splitting one x over the weights, or None for pairs as above; split_item
      2/3 stack the outputs along M into one tensor (so do several x without a group_list).
    Float32 accumulation, rounded once to x's dtype (output_dtype may only repeat it). Quantisation raises.
    """
    op = "npu_grouped_matmul"
    _unsupported(op, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                 antiquant_offset=antiquant_offset, per_token_scale=per_token_scale,
                 activation_input=activation_input, activation_quant_scale=activation_quant_scale,
                 activation_quant_offset=activation_quant_offset, x_dtype=x_dtype, weight_dtype=weight_dtype,
                 scale_dtype=scale_dtype, per_token_scale_dtype=per_token_scale_dtype)
    if act_type not in (0, None):
        raise NotImplementedError(f"{op}: act_type={act_type} (fused activation) is not implemented")
    for name, seq in (("x", x), ("weight", weight)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence) or len(seq) == 0:
            _fail(op, f"{name} must be a non-empty list of tensors, e.g. [{name}]")
        if len(seq) > _GMM_MAX_LIST:
            _fail(op, f"{name} holds {len(seq)} tensors; the kernel takes at most {_GMM_MAX_LIST}")
        for t in seq:
            _tensor(op, name + "[i]", t, FLOAT_DTYPES)
    if split_item not in (0, 1, 2, 3):
        _fail(op, f"split_item must be 0, 1, 2 or 3, got {split_item!r}")
    xdt = x[0].dtype
    if any(t.dtype != xdt for t in (*x, *weight)):
        _fail(op, f"without quantisation every x and weight tensor must have one dtype, got "
                  f"{sorted({str(t.dtype) for t in (*x, *weight)})}")
    dtype = _resolve_dtype(op, output_dtype, xdt)
    if dtype != xdt:                           # op-plugin docs: unquantised output dtype is None or x's dtype
        _fail(op, f"output_dtype must be None or x's dtype {xdt} without quantisation, got {output_dtype!r}")
    if bias is not None:
        if isinstance(bias, torch.Tensor) or not isinstance(bias, Sequence):
            _fail(op, "bias must be a list of tensors, e.g. [b]")
        for t in bias:
            _tensor(op, "bias[i]", t, (_GMM_BIAS_DTYPE[xdt],))
    for i, t in enumerate(x):
        if t.dim() < 2:
            _fail(op, f"x[{i}] must be at least 2-D, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:    # op-plugin docs: x may not be transposed
            _fail(op, f"x[{i}] {tuple(t.shape)} with strides {t.stride()} is transposed; the kernel reads x "
                      f"row-major only (call .contiguous())")
        if t.shape[-1] >= _GMM_INNER_LIMIT:
            _fail(op, f"x[{i}] inner dim {t.shape[-1]} must be below {_GMM_INNER_LIMIT}")
    for i, w in enumerate(weight):
        if w.dim() not in (2, 3):
            _fail(op, f"weight[{i}] must be 2-D or 3-D, got shape {tuple(w.shape)}")
        inner = w.shape[-1] if w.stride(-1) == 1 or w.shape[-1] == 1 else w.shape[-2]   # transposed: K
        if inner >= _GMM_INNER_LIMIT:
            _fail(op, f"weight[{i}] inner (stride-1) dim {inner} must be below {_GMM_INNER_LIMIT}")
    if group_list is not None and not isinstance(group_list, torch.Tensor):
        return _gmm_list_overload(op, x, weight, bias, group_list, split_item, group_type, group_list_type,
                                  dtype)
    if group_type in (None, -1):
        return _gmm_ungrouped(op, x, weight, bias, group_list, split_item, dtype, group_type)
    if group_type == 2:
        raise NotImplementedError(f"{op}: group_type=2 (split K) is not implemented")
    if group_type != 0:
        _fail(op, f"group_type must be None, -1, 0 or 2, got {group_type!r}")
    if group_list_type == 2:                   # op-plugin docs: [E, 2] pairs only for int8 x and weight
        _fail(op, "group_list_type=2 ([E, 2] index/size pairs) is supported for int8 inputs only; pass counts (1)")
    if xdt == torch.float32 and (len(x) > 1 or len(weight) > 1 or split_item == 1):
        # op-plugin docs: float32 only when x, weight and y are single tensors
        _fail(op, "float32 inputs need a single x, a single (3-D) weight and a single output (split_item 2/3)")
    if len(x) > 1:
        return _gmm_multi_x(op, x, weight, bias, group_list, group_list_type, split_item, dtype)
    return _gmm_grouped_m(op, x, weight, bias, group_list, group_list_type, split_item, dtype)


def _gmm_bias(op, bias, G, N):
    """The bias list as one [G, N] float32 tensor (or None)."""
    if bias is None:
        return None
    b = bias[0] if len(bias) == 1 and bias[0].dim() == 2 else torch.stack(list(bias))
    if tuple(b.shape) != (G, N):
        _fail(op, f"bias must hold one [N] = [{N}] vector per weight ({G}), got {[tuple(t.shape) for t in bias]}")
    return b.float()


def _gmm_same_n(op, weight):
    if len({w.shape[-1] for w in weight}) > 1:  # op-plugin docs: one output tensor needs one N
        _fail(op, f"a single output needs every weight to have the same N, got {[tuple(w.shape) for w in weight]}")


def _gmm_pairs(op, x, weight, bias, split_item, dtype):
    """y_i = x_i @ weight_i (+ bias_i); split_item 2/3 stack them along M into one tensor."""
    if len(x) != len(weight):
        _fail(op, f"without grouping x and weight pair up; got {len(x)} x and {len(weight)} weights")
    if any(w.dim() != 2 for w in weight):
        _fail(op, "without grouping each weight must be 2-D [K, N]")
    if split_item in (2, 3):
        if any(t.dim() != 2 for t in x):
            _fail(op, "split_item 2/3 need 2-D x tensors")
        _gmm_same_n(op, weight)
    elif len({t.dim() for t in x}) > 1 or x[0].dim() > 6:  # op-plugin docs: one rank, 2-6 dims
        _fail(op, f"x tensors must share one rank of 2-6 dims, got {[tuple(t.shape) for t in x]}")
    if bias is not None and (len(bias) != len(weight) or
                             any(tuple(bi.shape) != (wi.shape[-1],) for bi, wi in zip(bias, weight))):
        _fail(op, f"bias must hold one [N_i] vector per weight, got {[tuple(t.shape) for t in bias]}")
    b = bias
    outs = []
    for i, (xi, wi) in enumerate(zip(x, weight)):
        if xi.shape[-1] != wi.shape[0]:
            _fail(op, f"x[{i}] {tuple(xi.shape)} @ weight[{i}] {tuple(wi.shape)}: weight must be [K, N] "
                      f"with K = x's last dim")
        y = xi.float() @ wi.float()
        outs.append(y if b is None else y + b[i].float())
    if split_item in (2, 3):
        return [torch.cat(outs).to(dtype)]
    return [o.to(dtype) for o in outs]


def _gmm_ungrouped(op, x, weight, bias, group_list, split_item, dtype, group_type):
    if group_list is not None:
        _fail(op, "a group_list tensor needs group_type=0 (split M by groups)")
    if group_type == -1 and split_item not in (0, 1):
        # op-plugin docs: group_type=-1 is the "many x, many weight, many y" case only
        _fail(op, f"group_type=-1 returns one output per pair: split_item must be 0 or 1, got {split_item}; "
                  f"for one stacked output use group_type=None (or 0)")
    if group_type == -1 and x[0].dtype == torch.float32 and (len(x) > 1 or len(weight) > 1):
        _fail(op, "float32 inputs need a single x and a single weight")
    return _gmm_pairs(op, x, weight, bias, split_item, dtype)


def _gmm_list_overload(op, x, weight, bias, group_list, split_item, group_type, group_list_type, dtype):
    """The .List overload: int-list group_list of cumulative row offsets (op-plugin docs, golden test)."""
    offsets = [operator.index(v) for v in group_list]
    if group_type is not None or group_list_type not in (0, None):
        _fail(op, "an int-list group_list (the .List overload) takes group_type=None and cumulative offsets; "
                  "pass a tensor group_list for group_type=0 / group_list_type=1")
    if len(offsets) == 1 or any(v < 0 for v in offsets) or any(b < a for a, b in zip(offsets, offsets[1:])):
        _fail(op, f"an int-list group_list must be non-negative, non-decreasing and not of length 1, got {offsets}")
    if any(w.dim() != 2 for w in weight) or any(t.dim() != 2 for t in x):
        _fail(op, "with an int-list group_list x and weight tensors must be 2-D")
    sizes = [b - a for a, b in zip([0] + offsets, offsets)]
    if len(x) > 1:                             # several x: the offsets describe their row counts
        if split_item in (0, 1):
            _fail(op, "with several x and a group_list, split_item must be 2 or 3")
        if sizes != [t.shape[0] for t in x]:
            _fail(op, f"group_list {offsets} must be the cumulative row counts of x {[t.shape[0] for t in x]}")
        return _gmm_pairs(op, x, weight, bias, split_item, dtype)
    if len(offsets) != len(weight):
        _fail(op, f"group_list has {len(offsets)} offsets but there are {len(weight)} weights")
    xm = x[0]
    if split_item in (2, 3) and offsets[-1] != xm.shape[0]:
        _fail(op, f"group_list must end at x's row count {xm.shape[0]}, got {offsets}")
    if offsets[-1] > xm.shape[0]:
        _fail(op, f"group_list covers {offsets[-1]} rows but x has only {xm.shape[0]}")
    parts = list(xm[:offsets[-1]].split(sizes))
    return _gmm_pairs(op, parts, weight, bias, split_item, dtype)


def _gmm_multi_x(op, x, weight, bias, group_list, group_list_type, split_item, dtype):
    """group_type=0 with several x: x_i @ weight_i stacked along M (op-plugin docs and golden)."""
    if split_item not in (2, 3):
        _fail(op, f"group_type=0 with several x returns one stacked output: split_item must be 2 or 3, "
                  f"got {split_item}")
    if any(t.dim() != 2 for t in x):
        _fail(op, "group_type=0 with several x takes 2-D x tensors")
    ws = list(weight[0]) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
    if len(ws) != len(x):
        _fail(op, f"{len(x)} x tensors need as many weights, got {len(ws)}")
    if group_list is not None:
        _tensor(op, "group_list", group_list, INDEX_DTYPES, dims=(1,))
        if group_list.shape[0] != len(x):
            _fail(op, f"group_list has {group_list.shape[0]} entries for {len(x)} x tensors")
        if group_list_type not in (0, 1):
            _fail(op, f"group_list_type must be 0 (cumulative) or 1 (counts), got {group_list_type!r}")
        if _eager():
            rows = torch.tensor([t.shape[0] for t in x], dtype=torch.int64)
            want = rows.cumsum(0) if group_list_type == 0 else rows
            if not torch.equal(group_list.cpu().long(), want):
                _fail(op, f"group_list {group_list.tolist()} must describe the rows of x {rows.tolist()} "
                          f"({'cumulative' if group_list_type == 0 else 'counts'})")
    return _gmm_pairs(op, x, ws, bias, split_item, dtype)


def _gmm_grouped_m(op, x, weight, bias, group_list, group_list_type, split_item, dtype):
    if x[0].dim() != 2:
        _fail(op, "group_type=0 takes a single 2-D x: [x of shape [M, K]]")
    xm = x[0]
    if len(weight) == 1 and weight[0].dim() == 3:
        w = weight[0]                                                       # [G, K, N]
        if w.shape[0] > _GMM_MAX_GROUPS:
            _fail(op, f"a 3-D weight holds {w.shape[0]} groups; the kernel takes at most {_GMM_MAX_GROUPS}")
    elif all(t.dim() == 2 for t in weight):
        _gmm_same_n(op, weight)
        w = torch.stack(list(weight))                                       # [G, K, N] (a copy: prefer 3-D)
    else:
        _fail(op, "weight must be [w of shape [G, K, N]] or G tensors of shape [K, N]")
    G, Kd, N = w.shape
    if xm.shape[1] != Kd:
        _fail(op, f"x is [M, {xm.shape[1]}] but each weight is [{Kd}, {N}]")
    b = _gmm_bias(op, bias, G, N)
    M = xm.shape[0]
    ends = _group_ends(op, group_list, group_list_type, G, M, xm.device)
    if _eager() and M > G:
        y = _gmm_sliced(xm, w, ends, b)
    else:
        y = _gmm_gathered(xm, w, ends, b)
    y = y.to(dtype)                                                         # [M, N]
    if split_item != 1:
        return [y]
    if not _eager():
        _fail(op, "split_item=1 (one output per group) has data-dependent shapes; use 2 or 3 under compile")
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    return list(y[:int(ends[-1])].split(sizes))


# ---------------------------------------------------------------- attention

def _heads_view(op, t, layout, n_heads, name):
    """Return t as [B, N, S, D] for layout BSH / BSND / BNSD."""
    if layout == "BSH":
        _tensor(op, name, t, dims=(3,))
        B, S, H = t.shape
        if H % n_heads:
            _fail(op, f"{name} has {H} channels, not a multiple of its {n_heads} heads")
        return t.view(B, S, n_heads, H // n_heads).transpose(1, 2)
    _tensor(op, name, t, dims=(4,))
    heads = t.shape[2] if layout == "BSND" else t.shape[1]
    if heads != n_heads:
        _fail(op, f"{name} has {heads} heads in layout {layout} but {n_heads} were declared")
    return t.transpose(1, 2) if layout == "BSND" else t


def _check_seq_lengths(op, lengths, B, S_kv):
    """The lengths to use: one for all batches, or the first B (FIA docs: a longer list is cut to B)."""
    if isinstance(lengths, torch.Tensor) or not isinstance(lengths, Sequence):
        _fail(op, "actual_seq_lengths_kv must be a list of ints (schema SymInt[]), e.g. kv_len.tolist()")
    if len(lengths) != 1 and len(lengths) < B:       # (not `in (1, B)`: B may be symbolic)
        _fail(op, f"actual_seq_lengths_kv has {len(lengths)} entries; expected 1 or at least B = {B}")
    if len(lengths) != 1 and len(lengths) != B:
        lengths = list(lengths)[:B]
    if _eager():
        for n in lengths:
            if not 0 <= operator.index(n) <= S_kv:
                _fail(op, f"actual_seq_lengths_kv entry {n} is outside [0, S_kv = {S_kv}]")
    return lengths


def _seq_lengths_mask(lengths, B, S_kv, device):
    """[B, 1, 1, S_kv] True where a cache position is at or past that batch's length."""
    pos = torch.arange(S_kv, device=device)
    if len(lengths) == 1:
        return (pos >= lengths[0]).view(1, 1, 1, S_kv)
    lens = torch.tensor(list(lengths), device=device)
    return (pos.view(1, S_kv) >= lens.view(B, 1)).view(B, 1, 1, S_kv)


def _band_mask(op, pre_tokens, next_tokens, S, S_kv, device):
    """[S, S_kv] True outside the band i - pre_tokens <= j <= i + next_tokens, or None if it covers everything.

    sparse_mode 0 counts both limits from the top-left corner: query row i and key column j, whatever S and
    S_kv are (mode 4, not implemented here, counts from the bottom-right).
    """
    # CANN sparse-mode reference (docs/zh/context/sparse_mode参数说明.md): a negative next_tokens needs
    # pre_tokens >= -next_tokens and -next_tokens < S_kv; a negative pre_tokens needs next_tokens >= -pre_tokens
    # and -pre_tokens < S
    if next_tokens < 0 and not (pre_tokens >= -next_tokens and -next_tokens < S_kv):
        _fail(op, f"next_tokens={next_tokens} < 0 needs pre_tokens >= {-next_tokens} and |next_tokens| < "
                  f"S_kv = {S_kv}; got pre_tokens={pre_tokens}")
    if pre_tokens < 0 and not (next_tokens >= -pre_tokens and -pre_tokens < S):
        _fail(op, f"pre_tokens={pre_tokens} < 0 needs next_tokens >= {-pre_tokens} and |pre_tokens| < S = {S}; "
                  f"got next_tokens={next_tokens}")
    if pre_tokens >= S - 1 and next_tokens >= S_kv - 1:
        return None
    i = torch.arange(S, device=device).view(S, 1)
    j = torch.arange(S_kv, device=device).view(1, S_kv)
    return (j > i + next_tokens) | (j < i - pre_tokens)


def _full_mask(op, atten_mask, B, S, S_kv):
    """A user mask of sparse_mode 0/1 as a bool [S, S_kv], [b, 1, S, S_kv] tensor (b = 1 or B)."""
    m = atten_mask
    if S == 1 and m.dim() == 2:                # FIA docs, Q_S = 1: (B, KV_S), (B, 1, KV_S), (B, 1, 1, KV_S)
        m = m.view(m.shape[0], 1, 1, m.shape[1])
    # FIA docs, Q_S > 1: (Q_S, KV_S), (B or 1, Q_S, KV_S), (B or 1, 1, Q_S, KV_S); both S axes may be padded
    # up to an aligned length, so only the top-left [S, S_kv] corner is read
    if m.dim() not in (2, 3, 4) or m.shape[-2] < S or m.shape[-1] < S_kv or \
            (m.dim() >= 3 and m.shape[0] != 1 and m.shape[0] != B) or (m.dim() == 4 and m.shape[1] != 1):
        _fail(op, f"atten_mask must be [S, S_kv], [B or 1, S, S_kv] or [B or 1, 1, S, S_kv] with S = {S}, "
                  f"S_kv = {S_kv} (or padded beyond), got {tuple(m.shape)}")
    m = m[..., :S, :S_kv].bool()
    return m.unsqueeze(1) if m.dim() == 3 else m


def _attention_mask(op, atten_mask, sparse_mode, pre_tokens, next_tokens, B, N, S, S_kv, device):
    """Boolean mask broadcastable to [B, N, S, S_kv], True = not attended, or None."""
    if atten_mask is not None:
        _tensor(op, "atten_mask", atten_mask, (torch.bool, torch.int8, torch.uint8))
    if S == 1:
        # FIA docs: with Q_S = 1 (and no rope inputs) sparse_mode, pre_tokens and next_tokens have no effect
        if sparse_mode in (2, 3, 4) or atten_mask is None:
            return None                        # (the compressed causal template means nothing to one row)
        return _full_mask(op, atten_mask, B, S, S_kv)
    if sparse_mode not in (0, 1, 2, 3, 4):     # FIA docs: Q_S > 1 supports sparse_mode 0-4, others raise
        _fail(op, f"sparse_mode must be 0, 1, 2, 3 or 4, got {sparse_mode!r}")
    if sparse_mode in (0, 1):
        if atten_mask is None:
            if sparse_mode == 1:               # FIA docs: allMask needs the full [S, S_kv] mask
                _fail(op, "sparse_mode=1 (allMask) needs a full atten_mask [.., S, S_kv]")
            return None                        # FIA docs: no mask -> pre/next_tokens are ignored (INT_MAX)
        m = _full_mask(op, atten_mask, B, S, S_kv)
        if sparse_mode == 1:
            return m                           # FIA docs: sparse_mode 1 ignores pre/next_tokens
        band = _band_mask(op, pre_tokens, next_tokens, S, S_kv, device)
        return m if band is None else m | band
    if sparse_mode in (2, 3):
        # FIA docs: the compressed template is (2048, 2048), (1, 2048, 2048) or (1, 1, 2048, 2048)
        size = (_FIA_MASK_SIZE, _FIA_MASK_SIZE)
        if atten_mask is None or tuple(atten_mask.shape[-2:]) != size or \
                any(d != 1 for d in atten_mask.shape[:-2]) or atten_mask.dim() > 4:
            got = None if atten_mask is None else tuple(atten_mask.shape)
            _fail(op, f"sparse_mode={sparse_mode} needs the compressed causal mask: a "
                      f"{_FIA_MASK_SIZE}x{_FIA_MASK_SIZE} bool tensor, True above the diagonal; got {got}")
        q = torch.arange(S, device=device).view(S, 1)
        k = torch.arange(S_kv, device=device).view(1, S_kv)
        shift = 0 if sparse_mode == 2 else S_kv - S    # 2: aligned top-left, 3: aligned bottom-right
        return k > q + shift                                                   # [S, S_kv]
    raise NotImplementedError(f"{op}: sparse_mode=4 (band from the bottom-right) is not implemented "
                              f"(0-3 are)")


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None, dequant_scale1=None,
                                    quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                                    quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
                                    key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None,
                                    query_padding_size=None, kv_padding_size=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """softmax(scale * Q K^T + mask) V over a batch, prefill or decode.

    - layouts BSH [B, S, N*D], BSND, BNSD; output in the query's layout and dtype;
    - GQA: query head h reads KV head h // (N / Nkv) (num_key_value_heads=0 means Nkv = N);
    - masks: True = masked. sparse_mode 0 takes a full [.., S, S_kv] mask or None; with a mask it also keeps
      only the band i - pre_tokens <= j <= i + next_tokens (query row i, key column j, counted from the
      top-left; without a mask pre/next_tokens are ignored); 1 needs a full mask and ignores the band;
      2 (top-left causal) and 3 (bottom-right causal) take the compressed 2048x2048 template; with S = 1
      sparse_mode, pre_tokens and next_tokens have no effect;
    - decode: actual_seq_lengths_kv (list of ints, 1 or >= B entries, the first B used) limits batch b to cache
      rows [0, len_b);
    - the softmax runs in float32 and is cast to the input dtype before the @V (as the golden does); a query row
      with every key masked gives zeros (the kernel's is undefined unless inner_precise asks for row fixing).
    Returns (attention_out, softmax_lse). softmax_lse (softmax_lse_flag=True) is float32 [B, N, S, 1]: the
    log-sum-exp of the scaled, masked scores of each query row, max + log(sum(exp(scores - max))) as the golden
    computes it; -inf for a row with every key masked (not documented). With the flag off it is an empty [0]
    tensor (the eager kernel returns an uninitialised [1] one, the newer meta function [0]): **callers must
    ignore it**.
    Kernel limits checked (FIA docs, Atlas A2/A3): B <= 65536, N <= 256, D <= 512, N/Nkv <= 64; S > 1: D a
    multiple of 16 and S, S_kv <= 20971520; S = 1: S_kv <= 262144. (The kernel also takes only fp16/bf16
    query and key/value; float32 is accepted here so CPU runs can use a float32 yardstick.)
    """
    op = "npu_fused_infer_attention_score"
    _unsupported(op, pse_shift=pse_shift, actual_seq_lengths=actual_seq_lengths, dequant_scale1=dequant_scale1,
                 quant_scale1=quant_scale1, dequant_scale2=dequant_scale2, quant_scale2=quant_scale2,
                 quant_offset2=quant_offset2, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                 key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
                 value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
                 block_table=block_table, query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                 key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                 actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
                 key_rope_antiquant_scale=key_rope_antiquant_scale)
    if input_layout not in ("BSH", "BSND", "BNSD"):
        raise NotImplementedError(f"{op}: input_layout={input_layout!r}; BSH, BSND and BNSD are implemented")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _tensor(op, name, t, FLOAT_DTYPES)
    if not query.dtype == key.dtype == value.dtype:
        _fail(op, f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    N = num_heads
    Nkv = num_key_value_heads or N
    if N <= 0 or N % Nkv or N // Nkv > 64:
        _fail(op, f"num_heads={N} must be a positive multiple of num_key_value_heads={Nkv}, ratio <= 64")
    q = _heads_view(op, query, input_layout, N, "query")                    # [B, N, S, D]
    k = _heads_view(op, key, input_layout, Nkv, "key")                      # [B, Nkv, S_kv, D]
    v = _heads_view(op, value, input_layout, Nkv, "value")
    B, _, S, D = q.shape
    S_kv = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        _fail(op, f"key {tuple(k.shape)} / value {tuple(v.shape)} (as [B, Nkv, S_kv, D]) do not fit "
                  f"query {tuple(q.shape)} (as [B, N, S, D])")
    # FIA docs (Atlas A2/A3): B <= 65536, N <= 256, D <= 512; Q_S > 1: D % 16 == 0 (fp16/bf16) and
    # S <= 20971520 (20M); Q_S == 1: KV S <= 262144
    if B > 65536 or N > 256 or D > 512:
        _fail(op, f"B = {B}, num_heads = {N}, head dim D = {D} exceed the kernel's limits (B <= 65536, N <= 256, "
                  f"D <= 512)")
    if S > 1 and (D % 16 or max(S, S_kv) > 20971520):
        _fail(op, f"the prompt kernel (S > 1) needs D a multiple of 16 and S, S_kv <= 20971520; got D = {D}, "
                  f"S = {S}, S_kv = {S_kv}")
    if S == 1 and S_kv > 262144:
        _fail(op, f"the incremental kernel (S = 1) takes S_kv <= 262144, got {S_kv}")
    G = N // Nkv
    mask = _attention_mask(op, atten_mask, sparse_mode, pre_tokens, next_tokens, B, N, S, S_kv, q.device)
    lengths = actual_seq_lengths_kv
    if lengths is not None:
        lengths = _check_seq_lengths(op, lengths, B, S_kv)
        if len(lengths) == 1 and mask is None:
            # One length for the whole batch and no other mask: positions past it are never attended,
            # so read only [0, length), as the NPU kernel does (stale rows cannot leak in, not even as
            # 0 * NaN). Under compile the length stays symbolic: the work follows the tokens in the
            # cache, not its capacity.
            k, v, S_kv, lengths = k[:, :, : lengths[0]], v[:, :, : lengths[0]], lengths[0], None
    # [B, Nkv, G*S, D] @ [B, Nkv, D, S_kv]: head h = kvh*G + g shares KV head kvh = h // G
    scores = _matmul((q.float() * scale).reshape(B, Nkv, G * S, D), k.float().transpose(-1, -2))
    scores = scores.view(B, N, S, S_kv)
    if lengths is not None:
        len_mask = _seq_lengths_mask(lengths, B, S_kv, q.device)
        mask = len_mask if mask is None else mask | len_mask
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:                                                    # fully masked rows -> 0, not NaN
        probs = torch.nan_to_num(probs, nan=0.0)
    probs = probs.to(query.dtype).float().view(B, Nkv, G * S, S_kv)
    out = _matmul(probs, v.float()).view(B, N, S, D).to(query.dtype)        # [B, N, S, D]
    if input_layout == "BSH":
        out = out.transpose(1, 2).reshape(B, S, N * D)
    elif input_layout == "BSND":
        out = out.transpose(1, 2)
    if softmax_lse_flag:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)                 # [B, N, S, 1] float32
    else:
        lse = torch.empty(0, dtype=torch.float32, device=query.device)
    return out, lse


# ---------------------------------------------------------------- rotary embedding and KV cache

def npu_apply_rotary_pos_emb(query, key, cos, sin, layout='BSND', rotary_mode='half'):
    """Rotate-half RoPE, **in place**: x <- x*cos + rotate_half(x)*sin for query and key.

    Returns (query, key), the same tensor objects, now rotated; like the NPU kernel this writes into the
    inputs, so code must not reuse their pre-rotation values. Layout "TND" means 3-D tensors [T, N, D]; "BNSD"
    and "SBND" exist but Atlas A2/A3 reject them; every other string (the recipe passes "BSH") means BSND:
    query [B, S, N, D], key [B, S, Nkv, D], cos/sin [B, S, 1, D] (no broadcasting over B or S). All four share
    one dtype and a head dim D of 64 or 128. Computed in float32, rounded once.
    """
    op = "npu_apply_rotary_pos_emb"
    if rotary_mode != "half":                  # apply_rotary_pos_emb docs: A2/A3 support only "half"
        _fail(op, f"rotary_mode={rotary_mode!r}; Atlas A2/A3 support only 'half' (rotate-half, NeoX style)")
    if layout in ("BNSD", "SBND"):             # apply_rotary_pos_emb docs: A2/A3 take BSND (4-D) and TND (3-D)
        _fail(op, f"layout={layout!r} is not supported on Atlas A2/A3; use 'BSND' ([B, S, N, D]; 'BSH' maps "
                  f"to it) or 'TND'")
    tnd = layout == "TND"
    dims = (3,) if tnd else (4,)
    for name, t in (("query", query), ("key", key), ("cos", cos), ("sin", sin)):
        _tensor(op, name, t, FLOAT_DTYPES, dims=dims)
        if t.numel() == 0:                     # aclnnApplyRotaryPosEmbV2: no empty tensors
            _fail(op, f"{name} is empty (shape {tuple(t.shape)})")
    if not query.dtype == key.dtype == cos.dtype == sin.dtype:
        _fail(op, f"query, key, cos and sin must share one dtype, got {query.dtype}, {key.dtype}, "
                  f"{cos.dtype}, {sin.dtype} (build the cos/sin tables in the model dtype)")
    D = query.shape[-1]
    if D not in (64, 128) or key.shape[-1] != D or cos.shape[-1] != D:
        # apply_rotary_pos_emb docs (A2/A3): query/key D equal and 64 or 128, cos/sin D the same
        _fail(op, f"head dim D must be 64 or 128 and equal in query, key, cos and sin; got query "
                  f"{tuple(query.shape)}, key {tuple(key.shape)}, cos {tuple(cos.shape)}")
    lead = 1 if tnd else 2                     # the [T] or [B, S] axes, equal in all four tensors
    want = tuple(query.shape[:lead]) + (1, D)
    if cos.shape != sin.shape or tuple(cos.shape) != want or tuple(key.shape[:lead]) != tuple(query.shape[:lead]):
        form = "[T, 1, D]" if tnd else "[B, S, 1, D]"
        _fail(op, f"cos/sin must both be {form} = {list(want)} and key must share query's leading dims; got "
                  f"query {tuple(query.shape)}, key {tuple(key.shape)}, cos {tuple(cos.shape)}, "
                  f"sin {tuple(sin.shape)} (layout {layout!r})")
    c, s = cos.float(), sin.float()
    for t in (query, key):
        t32 = t.float()
        t.copy_(t32 * c + _rotate_half(t32) * s)
    return query, key


def scatter_update_(self, indices, updates, axis):
    """In-place KV-cache write: for each batch b, self[b] along `axis` at indices[b] .. indices[b]+L-1 is
    overwritten by updates[b], L = updates.shape[axis]. Returns `self`.

    The recipe writes k/v [B, q_len, Nkv*D] into the cache [B, S_max, Nkv*D] with axis=-2 at kv_len.
    Each batch may use a different position. The NPU does not bounds-check; this reference raises.
    """
    op = "scatter_update_"
    _tensor(op, "self", self)
    _tensor(op, "updates", updates)
    _tensor(op, "indices", indices, INDEX_DTYPES)
    nd = self.dim()
    if indices.dim() != 1:
        raise NotImplementedError(f"{op}: only 1-D indices [B] (one start position per batch) are implemented")
    if updates.dim() != nd or nd < 2:
        _fail(op, f"self {tuple(self.shape)} and updates {tuple(updates.shape)} must have the same rank >= 2")
    if not -nd <= axis < nd or axis % nd == 0:
        _fail(op, f"axis={axis} must name a non-batch dimension of a {nd}-D tensor")
    ax = axis % nd
    B, L = self.shape[0], updates.shape[ax]
    if indices.shape[0] != B or any(updates.shape[d] != self.shape[d] for d in range(nd) if d != ax) \
            or L > self.shape[ax]:
        _fail(op, f"updates {tuple(updates.shape)} must equal self {tuple(self.shape)} except along axis "
                  f"{axis} (at most as long), and indices must have B = {B} entries, got {tuple(indices.shape)}")
    if updates.dtype != self.dtype:
        _fail(op, f"updates dtype {updates.dtype} must match the cache dtype {self.dtype}")
    if _eager() and B and bool(((indices < 0) | (indices + L > self.shape[ax])).any()):
        _fail(op, f"positions {indices.tolist()} + {L} rows run outside [0, {self.shape[ax]}) along axis {axis}")
    # index_put_ of the rows [B, L] into self viewed with `axis` second: a compiler writes just those
    # rows in place (for a scatter_ inductor copies the whole cache, updates the copy, copies it back)
    rows = indices.long().view(B, 1) + torch.arange(L, device=self.device)            # [B, L]
    batch = torch.arange(B, device=self.device).view(B, 1).expand(B, L)                # [B, L]
    self.movedim(ax, 1).index_put_((batch, rows), updates.movedim(ax, 1))
    return self


def npu_scatter_nd_update_(self, indices, updates):
    """In-place scatter-ND: self[indices[i, :a]] = updates[i], with indices [n, a] (the recipe's newer paged cache).

    updates has shape indices.shape[:-1] + self.shape[a:]; e.g. a paged cache [slots, Nkv, D] with
    slot_mapping.view(-1, 1). Returns `self`.
    """
    op = "npu_scatter_nd_update_"
    _tensor(op, "self", self)
    _tensor(op, "indices", indices, INDEX_DTYPES)
    _tensor(op, "updates", updates)
    a = indices.shape[-1]
    expected = tuple(indices.shape[:-1]) + tuple(self.shape[a:])
    if indices.dim() < 1 or a > self.dim() or tuple(updates.shape) != expected:
        _fail(op, f"updates must have shape indices.shape[:-1] + self.shape[a:] = {expected}, "
                  f"got {tuple(updates.shape)}")
    if updates.dtype != self.dtype:
        _fail(op, f"updates dtype {updates.dtype} must match self dtype {self.dtype}")
    return self.index_put_(tuple(indices[..., i].long() for i in range(a)), updates)


def npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    """Change a tensor's internal NPU memory format (29 = FRACTAL_NZ for matmul weights).

    The logical shape and values do not change, so off the NPU this returns `self` unchanged.
    """
    op = "npu_format_cast"
    _tensor(op, "self", self)
    if not isinstance(acl_format, INT_TYPES):
        _fail(op, f"acl_format must be an int (2 = ND, 29 = FRACTAL_NZ), got {acl_format!r}")
    _unsupported(op, customize_dtype=customize_dtype, input_dtype=input_dtype)
    return self
