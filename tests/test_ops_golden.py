"""Reference kernels against Ascend's CPU golden semantics (Ascend/op-plugin test/test_custom_ops/), re-derived.

Each expected value here is computed independently with plain loops over rows, positions or groups in
float64, from the semantics the golden functions and op docs define (nothing is copied from them), at the
shapes and parameters op-plugin's own tests use (scaled down where a full size would take minutes on a CPU;
the comment says so). The cases are the ones where the reference used to differ from the golden:
- FIA: pre_tokens/next_tokens with sparse_mode 0 (a band counted from the top-left corner), softmax_lse;
- init_routing_v2: active_num < T*K and an active_expert_range that leaves experts out (row_idx_type 0 and 1,
  expanded_x, counts of every type, expanded_scale), and what finalize_routing accepts afterwards;
- grouped_matmul: several x with split_item 2/3 (with and without group_type=0), the int-list group_list.
"""
import math

import pytest
import torch

from qwen3moe_tutorial.ops import reference as R
from qwen3moe_tutorial.ops.reference import OpInputError

FP16 = dict(rtol=2e-3, atol=2e-3)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


# ---------------------------------------------------------------- FIA

def loop_attention(q, k, v, scale, allowed=None, cast=None):
    """q [N, S, D], k/v [N, S_kv, D] (one batch, N == Nkv), allowed [S, S_kv] bool or None.

    Row by row in float64: scores over the allowed keys, softmax (optionally rounded to `cast` before @V, as the
    golden does), and the log-sum-exp max + log(sum(exp(s - max))). A row without allowed keys gives lse -inf
    and is marked in the returned `empty` [S] list."""
    N, S, D = q.shape
    out = torch.zeros(N, S, v.shape[-1], dtype=torch.float64)
    lse = torch.full((N, S), float("-inf"), dtype=torch.float64)
    empty = []
    for i in range(S):
        keys = [j for j in range(k.shape[1]) if allowed is None or bool(allowed[i, j])]
        if not keys:
            empty.append(i)
            continue
        for h in range(N):
            s = torch.stack([(q[h, i].double() * k[h, j].double()).sum() * scale for j in keys])
            m = s.max()
            e = torch.exp(s - m)
            p = e / e.sum()
            if cast is not None:
                p = p.to(cast).double()
            out[h, i] = sum(p[n] * v[h, j].double() for n, j in enumerate(keys))
            lse[h, i] = m + torch.log(e.sum())
    return out, lse, empty


def test_fia_op_plugin_incremental_case_with_pre_next_tokens_and_lse():
    """op-plugin's IFA case: q [1, 32, 1, 128], k/v [1, 32, 2048, 128] fp16, BNSD, scale 1/0.0078125,
    pre_tokens = next_tokens = 65535 (which the incremental kernel ignores), with and without softmax_lse."""
    q = randn(1, 32, 1, 128, dtype=torch.float16)
    k = randn(1, 32, 2048, 128, dtype=torch.float16, seed=1)
    v = randn(1, 32, 2048, 128, dtype=torch.float16, seed=2)
    call = dict(num_heads=32, input_layout="BNSD", scale=1 / 0.0078125, pre_tokens=65535, next_tokens=65535)
    out, lse = R.npu_fused_infer_attention_score(q, k, v, softmax_lse_flag=True, **call)
    assert out.shape == (1, 32, 1, 128) and out.dtype == torch.float16
    assert lse.shape == (1, 32, 1, 1) and lse.dtype == torch.float32
    scores = (q[0].double() @ k[0].double().transpose(-1, -2)) * 128          # [32, 1, 2048]
    want_lse = torch.stack([torch.logsumexp(scores[h, 0], 0) for h in range(32)])
    torch.testing.assert_close(lse.double().view(32), want_lse, rtol=1e-5, atol=1e-3)
    want, _, _ = loop_attention(q[0], k[0], v[0], 128, cast=torch.float16)
    torch.testing.assert_close(out[0].double(), want, **FP16)
    plain, placeholder = R.npu_fused_infer_attention_score(q, k, v, **call)
    assert torch.equal(plain, out) and placeholder.dtype == torch.float32 and placeholder.numel() <= 1


def test_fia_op_plugin_prompt_case_with_pre_next_tokens_and_lse():
    """op-plugin's PFA case: S = S_kv = 2048, D = 128, fp16, BNSD, scale 1/0.0078125, pre/next 65535 and no mask
    (so the band is ignored). 2 heads instead of 32 to keep the CPU time short; the per-head math is the same."""
    N, S, D = 2, 2048, 128
    q, k, v = (randn(1, N, S, D, dtype=torch.float16, seed=s) for s in (3, 4, 5))
    out, lse = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", scale=1 / 0.0078125,
                                                 pre_tokens=65535, next_tokens=65535, softmax_lse_flag=True)
    assert lse.shape == (1, N, S, 1)
    scores = (q[0].double() @ k[0].double().transpose(-1, -2)) * 128          # [N, S, S_kv]
    rows = [0, 1, 777, 2047]                                                 # spot rows, each computed by hand
    for h in range(N):
        for i in rows:
            s = scores[h, i]
            m = s.max()
            torch.testing.assert_close(lse[0, h, i, 0].double(), m + torch.log(torch.exp(s - m).sum()),
                                       rtol=1e-5, atol=1e-3)
            p = torch.softmax(s, 0).to(torch.float16).double()
            torch.testing.assert_close(out[0, h, i].double(), p @ v[0, h].double(), **FP16)


BANDS = [(2, 1), (0, 0), (3, 0), (9, -3), (-2, 5), (20, 20)]


@pytest.mark.parametrize("pre_tokens,next_tokens", BANDS)
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_sparse_mode_0_band_counts_from_the_top_left(pre_tokens, next_tokens, layout):
    """sparse_mode 0 with a full mask: query row i sees key j only if the mask allows it and
    i - pre_tokens <= j <= i + next_tokens, with i and j counted from 0 even when S != S_kv."""
    N, S, S_kv, D = 2, 6, 11, 128
    q = randn(1, N, S, D, dtype=torch.float16, seed=6)
    k = randn(1, N, S_kv, D, dtype=torch.float16, seed=7)
    v = randn(1, N, S_kv, D, dtype=torch.float16, seed=8)
    mask = torch.rand(S, S_kv, generator=gen(9)) < 0.2                          # True = masked
    allowed = torch.zeros(S, S_kv, dtype=torch.bool)
    for i in range(S):
        for j in range(S_kv):
            allowed[i, j] = (not mask[i, j]) and i - pre_tokens <= j <= i + next_tokens
    want, want_lse, empty = loop_attention(q[0], k[0], v[0], D ** -0.5, allowed, cast=torch.float16)
    args = (q, k, v) if layout == "BNSD" else tuple(t.transpose(1, 2).reshape(1, t.shape[2], -1) for t in (q, k, v))
    out, lse = R.npu_fused_infer_attention_score(*args, num_heads=N, input_layout=layout, scale=D ** -0.5,
                                                 atten_mask=mask, pre_tokens=pre_tokens, next_tokens=next_tokens,
                                                 softmax_lse_flag=True)
    if layout == "BSH":
        out = out.view(1, S, N, D).transpose(1, 2)
    live = [i for i in range(S) if i not in empty]
    assert live, "the case must leave rows to compare"
    torch.testing.assert_close(out[0][:, live].double(), want[:, live], **FP16)
    torch.testing.assert_close(lse[0, :, live, 0].double(), want_lse[:, live], rtol=1e-5, atol=1e-4)
    # a row whose band holds no key: no NaN in the output, lse -inf (the log of an empty sum)
    assert not out.isnan().any()
    if empty:
        assert (lse[0, :, empty] == float("-inf")).all()


def test_fia_pre_next_tokens_need_a_mask_and_a_prompt():
    """Without atten_mask (sparse_mode 0) and with S = 1 the kernel ignores pre_tokens/next_tokens."""
    N, S, D = 2, 4, 64
    q, k, v = (randn(1, N, S, D, dtype=torch.float16, seed=s) for s in (10, 11, 12))
    full, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", scale=0.125)
    band, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", scale=0.125,
                                                pre_tokens=0, next_tokens=0)
    assert torch.equal(band, full)
    want, _, _ = loop_attention(q[0, :, :1], k[0], v[0], 0.125, cast=torch.float16)
    no_mask = torch.zeros(1, S, dtype=torch.bool)                              # [B, S_kv] decode mask
    one, _ = R.npu_fused_infer_attention_score(q[:, :, :1], k, v, num_heads=N, input_layout="BNSD", scale=0.125,
                                               atten_mask=no_mask, pre_tokens=0, next_tokens=-1)
    torch.testing.assert_close(one[0].double(), want, **FP16)


# ---------------------------------------------------------------- init_routing_v2 and finalize

def loop_routing_v2(x, expert_idx, start, end, active_num, scale):
    """The golden's semantics with python lists: sort (expert id, flat position) with ids below `start` last."""
    T, K = expert_idx.shape
    ids = expert_idx.reshape(-1).tolist()
    big = 1 << 40
    order = sorted(range(T * K), key=lambda f: (ids[f] if ids[f] >= start else big, f))
    n = sum(start <= e < end for e in ids)
    gather = [-1] * (T * K)
    for i in range(n):
        gather[order[i]] = i
    rows = n if active_num <= 0 else min(active_num, n)
    ex = torch.stack([x[order[i] // K] for i in range(rows)]) if rows else x[:0]
    es = [float(scale[order[i] // K]) for i in range(rows)] if scale is not None else None
    counts = [sum(e == g for e in ids) for g in range(start, end)]
    pairs = [[g, c] for g, c in zip(range(start, end), counts) if c]
    return dict(order=order, gather=gather, rows=rows, ex=ex, es=es, counts=counts, pairs=pairs)


@pytest.mark.parametrize("row_idx_type", [0, 1])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("h", [14, 200])
@pytest.mark.parametrize("with_scale", [False, True])
def test_init_routing_v2_op_plugin_case_partial_range(row_idx_type, kind, h, with_scale):
    """op-plugin's no-quant case: bs 32, k 5, expert ids in [0, 32), expert_num 32, active_expert_range [0, 16],
    active_num = bs*k, scale None or float32 [bs]."""
    bs, k, E, start, end = 32, 5, 32, 0, 16
    x = torch.rand(bs, h, generator=gen(h)) * 2 - 1
    idx = torch.randint(0, E, (bs, k), generator=gen(h + 1), dtype=torch.int32)
    scale = torch.rand(bs, generator=gen(h + 2)) * 2 - 1 if with_scale else None
    want = loop_routing_v2(x, idx, start, end, bs * k, scale)
    ex, eri, counts, es = R.npu_moe_init_routing_v2(
        x, idx, scale=scale, active_num=bs * k, expert_num=E, expert_tokens_num_type=kind,
        expert_tokens_num_flag=True, active_expert_range=[start, end], row_idx_type=row_idx_type)
    assert ex.shape == (bs * k, h) and es.shape == (bs * k,) and eri.dtype == torch.int32
    assert eri.tolist() == (want["gather"] if row_idx_type == 0 else want["order"])
    n = want["rows"]
    assert torch.equal(ex[:n], want["ex"])
    if with_scale:
        assert es[:n].tolist() == pytest.approx(want["es"])
    if kind == 1:
        assert counts.tolist() == want["counts"]
    elif kind == 0:
        assert counts.tolist() == torch.tensor(want["counts"]).cumsum(0).tolist()
    else:                                   # the golden: present (id, count) pairs, then one zero row
        assert counts.shape == (E, 2)
        assert counts[:len(want["pairs"]) + 1].tolist() == want["pairs"] + [[0, 0]]


@pytest.mark.parametrize("row_idx_type", [0, 1])
def test_init_routing_v2_active_num_and_range_start(row_idx_type):
    """active_num < T*K cuts expanded_x (and expanded_scale) but not the index; ids below the range start
    sort after everything else, in flat order."""
    T, K, E, start, end, active = 12, 4, 16, 3, 11, 20
    x = randn(T, 8, seed=20)
    idx = torch.randint(0, E, (T, K), generator=gen(21), dtype=torch.int32)
    scale = randn(T, seed=22)
    want = loop_routing_v2(x, idx, start, end, active, scale)
    ex, eri, counts, es = R.npu_moe_init_routing_v2(
        x, idx, scale=scale, active_num=active, expert_num=E, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, active_expert_range=[start, end], row_idx_type=row_idx_type)
    assert ex.shape == (active, 8) and es.shape == (active,)
    assert eri.tolist() == (want["gather"] if row_idx_type == 0 else want["order"])
    if row_idx_type == 0:                  # in-range sources past active_num keep their destination row
        assert max(eri.tolist()) >= active
    n = want["rows"]
    assert torch.equal(ex[:n], want["ex"]) and es[:n].tolist() == pytest.approx(want["es"])
    assert counts.tolist() == want["counts"]


def test_finalize_takes_only_full_routing_from_v2():
    """finalize's drop_pad_mode 2 takes rows [T*K, H] and indices in [0, T*K - 1]: the recipe's call (full range,
    active_num = T*K) is a permutation; a partial range (-1 entries) or a cut expanded_x is rejected."""
    T, K, E, H = 6, 2, 8, 4
    x = randn(T, H, seed=30)
    idx = torch.randint(0, E, (T, K), generator=gen(31), dtype=torch.int32)
    scales = randn(T, K, seed=32)
    ex, eri, _, _ = R.npu_moe_init_routing_v2(x, idx, active_num=T * K, expert_num=E, active_expert_range=[0, E])
    assert sorted(eri.tolist()) == list(range(T * K))
    out = R.npu_moe_finalize_routing(ex, None, None, None, scales, eri, None, drop_pad_mode=2)
    want = torch.stack([sum(scales[t, j].double() * x[t].double() for j in range(K)) for t in range(T)])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    ex, eri, _, _ = R.npu_moe_init_routing_v2(x, idx, active_num=T * K, expert_num=E, active_expert_range=[0, 3])
    if (eri < 0).any():
        with pytest.raises(OpInputError, match="full range"):
            R.npu_moe_finalize_routing(ex, None, None, None, scales, eri, None, drop_pad_mode=2)
    ex, eri, _, _ = R.npu_moe_init_routing_v2(x, idx, active_num=5, expert_num=E, active_expert_range=[0, E])
    with pytest.raises(OpInputError, match="active_num = T\\*K"):
        R.npu_moe_finalize_routing(ex, None, None, None, scales, eri, None, drop_pad_mode=2)


def test_finalize_op_plugin_case():
    """op-plugin's case: expert_num 16, H 5, top_k 4, 5 rows, fp32, skip1 + skip2 + bias, k-major index."""
    E, H, K, T = 16, 5, 4, 5
    rows, skip1, skip2 = randn(T * K, H, seed=40), randn(T, H, seed=41), randn(T, H, seed=42)
    bias, scales = randn(E, H, seed=43), randn(T, K, seed=44)
    idx = torch.randperm(T * K, generator=gen(45)).int()
    export = torch.randint(0, E, (T, K), generator=gen(46), dtype=torch.int32)
    out = R.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, idx, export)
    want = torch.zeros(T, H, dtype=torch.float64)
    for i in range(T):
        want[i] = skip1[i].double() + skip2[i].double()
        for j in range(K):
            want[i] += scales[i, j].double() * (rows[int(idx[j * T + i])].double() + bias[int(export[i, j])].double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- grouped matmul

def loop_matmul(x, w, b=None):
    """Row by row in float64."""
    w64 = w.double()
    out = torch.stack([x[r].double() @ w64 for r in range(x.shape[0])])
    return out if b is None else out + b.double()


def fp16(*shape, seed):
    return (torch.randn(*shape, generator=gen(seed)) * 0.1).half()


def test_grouped_matmul_op_plugin_pairs_split_item_0_and_2():
    """op-plugin cases 0 and 2: three x with three weights and fp16 biases, no group_list; split_item 0 gives
    one output per pair, 2 stacks them along M."""
    x = [fp16(256, 256, seed=1), fp16(1024, 256, seed=2), fp16(512, 1024, seed=3)]
    w = [fp16(256, 256, seed=4), fp16(256, 1024, seed=5), fp16(1024, 128, seed=6)]
    b = [fp16(256, seed=7), fp16(1024, seed=8), fp16(128, seed=9)]
    outs = R.npu_grouped_matmul(x, w, bias=b, split_item=0)
    assert [o.shape for o in outs] == [(256, 256), (1024, 1024), (512, 128)]
    for o, xi, wi, bi in zip(outs, x, w, b):
        torch.testing.assert_close(o.double(), loop_matmul(xi, wi, bi), **FP16)
    w2 = [fp16(256, 256, seed=10), fp16(256, 256, seed=11), fp16(1024, 256, seed=12)]
    b2 = [fp16(256, seed=13), fp16(256, seed=14), fp16(256, seed=15)]
    (y,) = R.npu_grouped_matmul(x, w2, bias=b2, split_item=2)
    assert y.shape == (1792, 256)
    torch.testing.assert_close(y.double(), torch.cat([loop_matmul(*t) for t in zip(x, w2, b2)]), **FP16)


def test_grouped_matmul_op_plugin_multi_dim_x():
    """op-plugin case 0_multi_dim: 3-D x with 2-D weights, split_item 0 (leading dim 7 and N cut to 512 from
    5120/8192 to keep the CPU time short)."""
    x = [fp16(7, 64, 96, seed=20), fp16(7, 64, 32, seed=21)]
    w = [fp16(96, 512, seed=22), fp16(32, 512, seed=23)]
    b = [fp16(512, seed=24), fp16(512, seed=25)]
    outs = R.npu_grouped_matmul(x, w, bias=b)
    for o, xi, wi, bi in zip(outs, x, w, b):
        assert o.shape == (*xi.shape[:-1], wi.shape[1])
        want = torch.stack([loop_matmul(xi[i], wi, bi) for i in range(xi.shape[0])])
        torch.testing.assert_close(o.double(), want, **FP16)


@pytest.mark.parametrize("split_item", [1, 3])
def test_grouped_matmul_op_plugin_int_list_group_list(split_item):
    """op-plugin cases 1 and 3: one x [1792, 1024] split by the cumulative list [256, 1280, 1792] over three
    weights (split_item 1: one output per group, with different N; 3: same N, stacked)."""
    x = fp16(1792, 1024, seed=30)
    ns = [256, 1024, 128] if split_item == 1 else [256, 256, 256]
    w = [fp16(1024, n, seed=31 + i) for i, n in enumerate(ns)]
    b = [fp16(n, seed=41 + i) for i, n in enumerate(ns)]
    offsets = [256, 1280, 1792]
    outs = R.npu_grouped_matmul([x], w, bias=b, group_list=offsets, split_item=split_item)
    wants, start = [], 0
    for end, wi, bi in zip(offsets, w, b):
        wants.append(loop_matmul(x[start:end], wi, bi))
        start = end
    if split_item == 3:
        wants = [torch.cat(wants)]
    assert len(outs) == len(wants)
    for o, want in zip(outs, wants):
        torch.testing.assert_close(o.double(), want, **FP16)


@pytest.mark.parametrize("split_item", [2, 3])
@pytest.mark.parametrize("group_list", [None, "counts", "cumulative"])
def test_grouped_matmul_group_type_0_with_several_x(split_item, group_list):
    """group_type 0 with x = [x1, x2], weight = [w1, w2]: one output, x_i @ w_i stacked along M (a group_list,
    if given, describes the rows of each x)."""
    x = [fp16(40, 64, seed=50), fp16(24, 32, seed=51)]
    w = [fp16(64, 48, seed=52), fp16(32, 48, seed=53)]
    gl, kind = None, 0
    if group_list == "counts":
        gl, kind = torch.tensor([40, 24]), 1
    elif group_list == "cumulative":
        gl, kind = torch.tensor([40, 64]), 0
    (y,) = R.npu_grouped_matmul(x, w, group_list=gl, group_type=0, group_list_type=kind, split_item=split_item)
    assert y.shape == (64, 48) and y.dtype == torch.float16
    torch.testing.assert_close(y.double(), torch.cat([loop_matmul(xi, wi) for xi, wi in zip(x, w)]), **FP16)
    with pytest.raises(OpInputError, match="must describe the rows"):
        R.npu_grouped_matmul(x, w, group_list=torch.tensor([32, 32]), group_type=0, group_list_type=1,
                             split_item=split_item)


# ---------------------------------------------------------------- RoPE and gating

def test_rope_op_plugin_case():
    """op-plugin's case: q and k [4, 1024, 16, 128] fp16, cos/sin [4, 1024, 1, 128] uniform in [0, 1), layout
    '1' (any unknown string means BSND); the op rotates q and k in place."""
    q = torch.rand(4, 1024, 16, 128, generator=gen(60)).half()
    k = torch.rand(4, 1024, 16, 128, generator=gen(61)).half()
    cos = torch.rand(4, 1024, 1, 128, generator=gen(62)).half()
    sin = torch.rand(4, 1024, 1, 128, generator=gen(63)).half()
    want = []
    for t in (q, k):
        t64, c, s = t.double(), cos.double(), sin.double()
        rotated = torch.cat((-t64[..., 64:], t64[..., :64]), dim=-1)
        want.append(t64 * c + rotated * s)
    q_out, k_out = R.npu_apply_rotary_pos_emb(q, k, cos, sin, "1")
    assert q_out is q and k_out is k
    torch.testing.assert_close(q.double(), want[0], **FP16)
    torch.testing.assert_close(k.double(), want[1], **FP16)
    with pytest.raises(OpInputError, match="64 or 128"):                # Atlas A2/A3: D must be 64 or 128
        R.npu_apply_rotary_pos_emb(q[..., :32], k[..., :32], cos[..., :32], sin[..., :32], "1")


@pytest.mark.parametrize("n,col,k,dtype", [(10, 200, 9, torch.float16), (430, 1256, 4, torch.float32)])
def test_gating_top_k_softmax_op_plugin_case(n, col, k, dtype):
    """op-plugin's case (two of its combinations): x uniform in [-1, 1), random `finished` rows."""
    x = (torch.rand(n, col, generator=gen(col)) * 2 - 1).to(dtype)
    finished = torch.rand(n, generator=gen(col + 1)) < 0.5
    y, expert_idx, row_idx = R.npu_moe_gating_top_k_softmax(x, finished, k=k)
    for t in range(n):
        probs = torch.softmax(x[t].float(), 0).to(dtype)                # softmax in fp32, rounded to x's dtype
        ranked = sorted(range(col), key=lambda e: (-float(probs[e]), e))[:k]   # stable descending
        assert y[t].tolist() == [float(probs[e]) for e in ranked]
        assert expert_idx[t].tolist() == ([col] * k if finished[t] else ranked)
        assert row_idx[t].tolist() == [j * n + t for j in range(k)]
    assert math.prod(y.shape) == n * k
