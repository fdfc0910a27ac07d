"""Reference kernels (qwen3moe_tutorial.ops.reference) against plain, unfused PyTorch math on the CPU.

Covers activation, norms, gating, v1/v2 routing, expert-token counts, finalize and grouped matmul, plus an
end-to-end MoE block for both routing paths. Attention, RoPE and the KV-cache write are in
test_ops_attention.py; dispatch and torch.compile tracing in test_ops_dispatch.py.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from qwen3moe_tutorial import fused
from qwen3moe_tutorial.ops import reference as R
from qwen3moe_tutorial.ops.reference import OpInputError

FAST = settings(max_examples=25, deadline=None)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


# ---------------------------------------------------------------- swiglu

@FAST
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), half=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_swiglu_is_silu_of_first_half_times_second(lead, half, dtype, seed):
    x = rand(*lead, 2 * half, dtype=dtype, seed=seed)
    a, b = x.double()[..., :half], x.double()[..., half:]
    out = R.npu_swiglu(x)
    assert out.shape == (*lead, half) and out.dtype == dtype
    torch.testing.assert_close(out.double(), (F.silu(a) * b), **TOL[dtype], check_dtype=False)


def test_swiglu_other_dim_and_one_rounding():
    x = rand(6, 4, 3, dtype=torch.bfloat16)
    out = R.npu_swiglu(x, dim=1)
    a, b = x.float()[:, :2], x.float()[:, 2:]
    assert torch.equal(out, (F.silu(a) * b).to(torch.bfloat16))      # fp32 math, one rounding


def test_swiglu_rejects_odd_size_and_ints():
    with pytest.raises(OpInputError, match="odd"):
        R.npu_swiglu(torch.zeros(2, 5))
    with pytest.raises(OpInputError, match="dtype"):
        R.npu_swiglu(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(OpInputError, match="contiguous"):            # the kernel reads contiguous input only
        R.npu_swiglu(torch.zeros(4, 6).t())
    with pytest.raises(OpInputError, match="non-empty"):
        R.npu_swiglu(torch.zeros(0, 4))
    with pytest.raises(OpInputError, match="1-8-D"):
        R.npu_swiglu(torch.zeros([1] * 9 + [2]))


# ---------------------------------------------------------------- rms_norm / add_rms_norm

@FAST
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), h=st.integers(1, 33),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_rms_norm_matches_formula(lead, h, dtype, seed):
    x, gamma = rand(*lead, h, dtype=dtype, seed=seed), rand(h, dtype=dtype, seed=seed + 1)
    y, rstd = R.npu_rms_norm(x, gamma, 1e-6)
    x64 = x.double()
    want_rstd = 1 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    assert rstd.dtype == torch.float32 and rstd.shape == (*lead, 1)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), x64 * want_rstd * gamma.double(), **TOL[dtype])


def test_rms_norm_rounds_once_unlike_hf():
    x, gamma = rand(64, 128, dtype=torch.bfloat16, seed=3), rand(128, dtype=torch.bfloat16, seed=4)
    y, _ = R.npu_rms_norm(x, gamma)
    x32 = x.float()
    normed32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(y, (normed32 * gamma.float()).to(torch.bfloat16))
    hf = gamma * normed32.to(torch.bfloat16)                                  # HF: two roundings
    assert not torch.equal(y, hf)
    torch.testing.assert_close(y.float(), hf.float(), rtol=2e-2, atol=2e-2)


def test_rms_norm_multi_axis_gamma_and_errors():
    x, gamma = rand(3, 4, 5), rand(4, 5, seed=1)
    y, rstd = R.npu_rms_norm(x, gamma)
    assert rstd.shape == (3, 1, 1)
    want = x / torch.sqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * gamma
    torch.testing.assert_close(y, want)
    with pytest.raises(OpInputError, match="trailing dims"):
        R.npu_rms_norm(x, rand(4))
    with pytest.raises(OpInputError, match="2-8-D"):                   # the op doc: 2-8-D inputs
        R.npu_rms_norm(rand(8), rand(8))
    with pytest.raises(OpInputError, match="gamma dtype"):             # gamma has the input's dtype
        R.npu_rms_norm(x, gamma.bfloat16())


def test_add_rms_norm_third_output_is_the_residual_sum():
    x1, x2 = rand(2, 3, 16, dtype=torch.bfloat16), rand(2, 3, 16, dtype=torch.bfloat16, seed=1)
    gamma = rand(16, dtype=torch.bfloat16, seed=2)
    y, rstd, s = R.npu_add_rms_norm(x1, x2, gamma)
    assert s.dtype == torch.bfloat16 and torch.equal(s, x1 + x2)         # summed in the input dtype
    y_ref, rstd_ref = R.npu_rms_norm(x1 + x2, gamma)
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    with pytest.raises(OpInputError, match="must match"):
        R.npu_add_rms_norm(x1, x2.float(), gamma)
    with pytest.raises(OpInputError, match="gamma dtype"):
        R.npu_add_rms_norm(x1, x2, gamma.float())
    with pytest.raises(OpInputError, match="epsilon"):
        R.npu_add_rms_norm(x1, x2, gamma, -1e-6)


# ---------------------------------------------------------------- gating top-k softmax

@FAST
@given(T=st.integers(1, 6), E=st.integers(2, 40), data=st.data(), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_gating_top_k_matches_softmax_then_sort(T, E, data, seed, dtype):
    k = data.draw(st.integers(1, E))
    x = rand(T, E, dtype=dtype, seed=seed)
    y, idx, row_idx = R.npu_moe_gating_top_k_softmax(x, k=k)
    assert y.dtype == dtype and idx.dtype == torch.int32 and row_idx.dtype == torch.int32
    assert y.shape == idx.shape == row_idx.shape == (T, k)
    probs = torch.softmax(x.double(), -1)
    # values: the top-k probabilities (rounded to x's dtype), descending
    torch.testing.assert_close(y.double(), probs.gather(-1, idx.long()), **TOL[dtype])
    assert (y[:, :-1] >= y[:, 1:]).all()
    # no unchosen expert beats a chosen one (ties allowed)
    kth = y[:, -1:].double()
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert (probs.to(dtype).double()[~chosen].view(T, E - k) <= kth).all()
    # row_idx is k-major: row_idx[i, j] = j*T + i
    i, j = torch.meshgrid(torch.arange(T), torch.arange(k), indexing="ij")
    assert torch.equal(row_idx, (j * T + i).int())


def test_gating_ties_rank_lower_id_first_after_rounding():
    x = torch.zeros(2, 8)
    _, idx, _ = R.npu_moe_gating_top_k_softmax(x, k=3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    # fp32 probabilities differ (expert 5 slightly larger) but round to the same bf16 value
    x = torch.zeros(1, 8)
    x[0, 5] = 1e-4
    _, idx32, _ = R.npu_moe_gating_top_k_softmax(x, k=2)
    _, idx16, _ = R.npu_moe_gating_top_k_softmax(x.bfloat16(), k=2)
    assert idx32.tolist() == [[5, 0]] and idx16.tolist() == [[0, 1]]


def test_gating_3d_finished_and_errors():
    x = rand(2, 3, 10)
    finished = torch.tensor([[False, True, False], [False, False, True]])
    y, idx, row_idx = R.npu_moe_gating_top_k_softmax(x, finished, k=4)
    assert y.shape == idx.shape == row_idx.shape == (2, 3, 4)
    assert (idx[finished] == 10).all() and (idx[~finished] < 10).all()
    assert row_idx.reshape(6, 4)[:, 1].tolist() == [6, 7, 8, 9, 10, 11]
    with pytest.raises(OpInputError, match="0 < k"):
        R.npu_moe_gating_top_k_softmax(x, k=11)
    with pytest.raises(OpInputError, match="0 < k"):
        R.npu_moe_gating_top_k_softmax(x, k=0)
    with pytest.raises(OpInputError, match="1024"):                    # the op doc: k <= 1024 whatever E is
        R.npu_moe_gating_top_k_softmax(torch.zeros(1, 2048), k=1025)
    with pytest.raises(OpInputError, match="2-D or 3-D"):
        R.npu_moe_gating_top_k_softmax(torch.zeros(5), k=1)


# ---------------------------------------------------------------- init routing v1 and v2

def loop_routing(expert_idx, order="row"):
    """Plain routing: destinations ordered by expert, then by flat source (t*K + k), as a python loop."""
    T, K = expert_idx.shape
    pairs = sorted(((int(expert_idx[t, k]), t * K + k) for t in range(T) for k in range(K)))
    return [(e, f // K, f % K) for e, f in pairs]                      # per destination: expert, token, slot


@FAST
@given(T=st.integers(1, 7), K=st.integers(1, 4), E=st.integers(1, 9), seed=st.integers(0, 999))
def test_init_routing_v1_is_k_major(T, K, E, seed):
    x = rand(T, 5, seed=seed)
    expert_idx = torch.randint(0, E, (T, K), generator=gen(seed), dtype=torch.int32)
    row_idx = torch.arange(T * K, dtype=torch.int32).view(K, T).t()
    ex, eri, eei = R.npu_moe_init_routing(x, row_idx, expert_idx, T)
    assert ex.shape == (T * K, 5) and eri.dtype == eei.dtype == torch.int32
    for dst, (e, t, k) in enumerate(loop_routing(expert_idx)):
        assert eei[dst] == e and torch.equal(ex[dst], x[t])
        assert eri[k * T + t] == dst                                       # indexed by k-major source id


def test_init_routing_v1_active_num_cuts_rows():
    x = rand(4, 3)
    expert_idx = torch.tensor([[1, 0], [0, 2], [2, 1], [0, 0]], dtype=torch.int32)
    row_idx = torch.arange(8, dtype=torch.int32).view(2, 4).t()
    ex, _, eei = R.npu_moe_init_routing(x, row_idx, expert_idx, 2)
    assert ex.shape == (4, 3) and eei.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


@FAST
@given(T=st.integers(1, 7), K=st.integers(1, 4), E=st.integers(1, 9), seed=st.integers(0, 999))
def test_init_routing_v2_is_row_major_with_counts(T, K, E, seed):
    x = rand(T, 5, seed=seed)
    expert_idx = torch.randint(0, E, (T, K), generator=gen(seed), dtype=torch.int32)
    ex, eri, counts, scale = R.npu_moe_init_routing_v2(
        x, expert_idx, active_num=T * K, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, E])
    assert ex.shape == (T * K, 5) and eri.dtype == torch.int32 and counts.dtype == torch.int64
    assert scale.dtype == torch.float32 and scale.shape == (T * K,)
    for dst, (e, t, k) in enumerate(loop_routing(expert_idx)):
        assert torch.equal(ex[dst], x[t]) and eri[t * K + k] == dst      # indexed by row-major source id
    assert torch.equal(counts, torch.bincount(expert_idx.flatten().long(), minlength=E))
    cum = R.npu_moe_init_routing_v2(x, expert_idx, expert_num=E, expert_tokens_num_flag=True)[2]
    assert torch.equal(cum, counts.cumsum(0))


def test_init_routing_v2_count_kinds_flag_and_scatter_index():
    x = rand(3, 2)
    expert_idx = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
    _, eri, pairs, _ = R.npu_moe_init_routing_v2(x, expert_idx, expert_num=5, expert_tokens_num_type=2,
                                                 expert_tokens_num_flag=True)
    assert pairs.tolist() == [[0, 2], [2, 3], [3, 1], [0, 0], [0, 0]]     # present experts, then zero rows
    assert eri.tolist() == [2, 0, 3, 5, 1, 4]
    _, scatter, empty, _ = R.npu_moe_init_routing_v2(x, expert_idx, expert_num=5, row_idx_type=1)
    assert scatter.tolist() == [1, 4, 0, 2, 5, 3]                        # destination -> source
    assert empty.shape == () and empty.dtype == torch.int64              # flag False: a placeholder


def test_init_routing_v2_partial_expert_range_and_active_num():
    x = torch.arange(4.0).view(4, 1).expand(4, 2).contiguous()
    expert_idx = torch.tensor([[0, 3], [1, 4], [2, 1], [5, 3]], dtype=torch.int32)
    ex, eri, counts, _ = R.npu_moe_init_routing_v2(
        x, expert_idx, expert_num=6, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[1, 4])
    # in range [1, 4): (1: t1, t2), (2: t2), (3: t0, t3) -> 5 rows; 0 goes last, 4 and 5 sort after 3
    assert counts.tolist() == [2, 1, 2]
    assert ex[:5, 0].tolist() == [1, 2, 2, 0, 3] and (ex[5:] == 0).all()
    assert eri.tolist() == [-1, 3, 0, -1, 2, 1, -1, 4]
    # scatter index: the whole sort order, out-of-range entries included (4: src 3, 5: src 7, then 0: src 0, 6)
    _, order, _, _ = R.npu_moe_init_routing_v2(x, expert_idx, expert_num=6, active_expert_range=[1, 4],
                                               row_idx_type=1)
    assert order.tolist() == [2, 5, 4, 1, 7, 3, 6, 0]
    scale = torch.tensor([10.0, 11.0, 12.0, 13.0])
    ex, eri, _, es = R.npu_moe_init_routing_v2(x, expert_idx, scale=scale, active_num=3, expert_num=6)
    assert ex.shape == (3, 2) and es.tolist() == [10.0, 11.0, 12.0]      # expert 0 (t0), 1 (t1), 1 (t2)
    # active_num cuts expanded_x, not the gather index: every source keeps its destination row
    assert sorted(eri.tolist()) == list(range(8))


def test_init_routing_v2_errors():
    x, idx = rand(2, 4), torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="quant_mode"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=4, quant_mode=0)
    with pytest.raises(NotImplementedError, match="drop_pad_mode=1"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=4, drop_pad_mode=1)
    with pytest.raises(OpInputError, match="int32"):
        R.npu_moe_init_routing_v2(x, idx.long(), expert_num=4)
    with pytest.raises(OpInputError, match="rows"):
        R.npu_moe_init_routing_v2(rand(3, 4), idx, expert_num=4)
    with pytest.raises(OpInputError, match="increasing"):
        R.npu_moe_init_routing_v2(x, idx, active_expert_range=[3, 1])
    with pytest.raises(OpInputError, match="a list"):
        R.npu_moe_init_routing_v2(x, idx, active_expert_range=(0, 4))
    with pytest.raises(OpInputError, match="expert_num > 0"):
        R.npu_moe_init_routing_v2(x, idx, expert_tokens_num_flag=True)
    with pytest.raises(OpInputError, match="must not exceed expert_num"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=4, active_expert_range=[0, 8])
    with pytest.raises(OpInputError, match="expert_num must be <= 5120"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=6000, expert_tokens_num_type=2)
    with pytest.raises(OpInputError, match="expert_num must be <= 10240"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=10241)
    with pytest.raises(OpInputError, match=r"lie in \[0, expert_num = 4\)"):
        R.npu_moe_init_routing_v2(x, idx + 4, expert_num=4)
    with pytest.raises(OpInputError, match="float32"):
        R.npu_moe_init_routing_v2(x, idx, expert_num=4, scale=torch.ones(2, dtype=torch.bfloat16))


def test_compute_expert_tokens_is_cumulative():
    s = torch.tensor([0, 0, 0, 1, 1, 2], dtype=torch.int32)
    out = R.npu_moe_compute_expert_tokens(s, 3)
    assert out.dtype == torch.int32 and out.tolist() == [3, 5, 6]
    # experts without tokens repeat the previous offset
    assert R.npu_moe_compute_expert_tokens(torch.tensor([1, 1, 3], dtype=torch.int32), 5).tolist() \
        == [0, 2, 2, 3, 3]
    with pytest.raises(OpInputError, match="sorted"):
        R.npu_moe_compute_expert_tokens(torch.tensor([2, 0], dtype=torch.int32), 3)
    with pytest.raises(OpInputError, match="num_expert"):
        R.npu_moe_compute_expert_tokens(s, 0)
    with pytest.raises(OpInputError, match="num_expert"):
        R.npu_moe_compute_expert_tokens(s, 2049)
    with pytest.raises(OpInputError, match="fewer than 2\\*\\*24"):
        R.npu_moe_compute_expert_tokens(torch.zeros(1 << 24, dtype=torch.int32), 3)


# ---------------------------------------------------------------- finalize routing

def loop_finalize(rows, skip1, skip2, bias, scales, idx, export, mode):
    T, K = scales.shape
    out = torch.zeros(T, rows.shape[1], dtype=torch.float64)
    for t in range(T):
        out[t] += skip1[t].double() if skip1 is not None else 0
        out[t] += skip2[t].double() if skip2 is not None else 0
        for j in range(K):
            d = int(idx[j * T + t] if mode == 0 else idx[t * K + j])
            term = rows[d].double() if d >= 0 else torch.zeros(rows.shape[1], dtype=torch.float64)
            if bias is not None:
                term = term + bias[export[t, j]].double()
            out[t] += scales[t, j].double() * term
    return out


@FAST
@given(T=st.integers(1, 5), K=st.integers(1, 4), mode=st.sampled_from([0, 2]), extras=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_finalize_matches_loop(T, K, mode, extras, dtype, seed):
    H, E = 6, 5
    rows = rand(T * K, H, dtype=dtype, seed=seed)
    scales = rand(T, K, dtype=dtype, seed=seed + 1)
    idx = torch.randperm(T * K, generator=gen(seed)).int()
    skip1 = rand(T, H, dtype=dtype, seed=seed + 2) if extras else None
    skip2 = rand(T, H, dtype=dtype, seed=seed + 3) if extras else None
    bias = rand(E, H, dtype=dtype, seed=seed + 4) if extras else None
    export = torch.randint(0, E, (T, K), generator=gen(seed), dtype=torch.int32) if extras else None
    out = R.npu_moe_finalize_routing(rows, skip1, skip2, bias, scales, idx, export, drop_pad_mode=mode)
    assert out.shape == (T, H) and out.dtype == dtype
    want = loop_finalize(rows, skip1, skip2, bias, scales, idx, export, mode)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_finalize_scales_none_index_domain_and_errors():
    rows = torch.arange(12.0).view(4, 3)
    idx = torch.tensor([3, 2, 0, 1], dtype=torch.int32)
    out = R.npu_moe_finalize_routing(rows, None, None, None, None, idx, None, drop_pad_mode=2, k=2)
    assert out.tolist() == [(rows[3] + rows[2]).tolist(), (rows[0] + rows[1]).tolist()]
    # drop_pad_mode 0/2 take indices in [0, T*K - 1] only (op doc): -1 ("dropped") is a drop/pad-mode value
    with pytest.raises(OpInputError, match=r"lie in \[0, T\*K - 1 = 3\]"):
        R.npu_moe_finalize_routing(rows, None, None, None, None, torch.tensor([3, -1, 0, 1], dtype=torch.int32),
                                   None, drop_pad_mode=2, k=2)
    with pytest.raises(OpInputError, match="T\\*K = 4 rows"):                # rows are [T*K, H] in modes 0/2
        R.npu_moe_finalize_routing(rows[:3], None, None, None, None, idx, None, drop_pad_mode=2, k=2)
    with pytest.raises(OpInputError, match="int32"):
        R.npu_moe_finalize_routing(rows, None, None, None, None, idx.long(), None, drop_pad_mode=2, k=2)
    with pytest.raises(OpInputError, match="skip1 must be"):
        R.npu_moe_finalize_routing(rows, rows[:2].bfloat16(), None, None, None, idx, None, drop_pad_mode=2, k=2)
    scales = torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(OpInputError, match="dtype of expanded_permuted_rows"):
        R.npu_moe_finalize_routing(rows, None, None, None, scales, idx, None, drop_pad_mode=2)
    with pytest.raises(NotImplementedError, match="drop_pad_mode=1"):
        R.npu_moe_finalize_routing(rows, None, None, None, scales.float(), idx, None, drop_pad_mode=1)
    with pytest.raises(OpInputError, match="skip2"):
        R.npu_moe_finalize_routing(rows, None, rows[:2], None, scales.float(), idx, None, drop_pad_mode=2)


# ---------------------------------------------------------------- grouped matmul

def loop_gmm(x, w, counts):
    out, start = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64), 0
    for g, c in enumerate(counts):
        out[start:start + c] = x[start:start + c].double() @ w[g].double()
        start += c
    return out


@FAST
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=9), pad=st.integers(0, 3),
       list_type=st.sampled_from([0, 1]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 999))
def test_grouped_matmul_counts_and_cumulative(counts, pad, list_type, dtype, seed):
    if list_type == 1 and len(counts) == 1:
        counts = counts + [0]                                  # a counts list may not have length 1 (op doc)
    G, Kd, N = len(counts), 7, 5
    M = sum(counts) + pad                                      # `pad` rows past the group total
    x = rand(M, Kd, dtype=dtype, seed=seed)
    x[sum(counts):] = float("nan")                             # rows past the total must never be read
    w = rand(G, Kd, N, dtype=dtype, seed=seed + 1)
    gl = torch.tensor(counts) if list_type == 1 else torch.tensor(counts).cumsum(0)
    (y,) = R.npu_grouped_matmul([x], [w], group_list=gl, group_type=0, group_list_type=list_type, split_item=3)
    assert y.shape == (M, N) and y.dtype == dtype
    assert (y[sum(counts):] == 0).all() and not y.isnan().any()
    want = loop_gmm(x[:sum(counts)], w, counts)
    torch.testing.assert_close(y[:sum(counts)].double(), want, **TOL[dtype])


def test_grouped_matmul_gathered_and_sliced_paths_agree():
    counts = [0, 3, 0, 0, 2, 1]
    x, w = rand(6, 4), rand(6, 4, 3, seed=1)
    gl = torch.tensor(counts)
    few = R._gmm_gathered(x, w, gl.cumsum(0), None)            # the compile / small-M path
    many = R._gmm_sliced(x, w, gl.cumsum(0), None)             # the eager large-M path
    torch.testing.assert_close(few, many)
    torch.testing.assert_close(few.double(), loop_gmm(x, w, counts), **TOL[torch.float32])
    # large M (prefill-like) through the public op: M > G takes the sliced path
    counts = [40, 0, 25, 35]
    x, w = rand(100, 8, seed=2), rand(4, 8, 6, seed=3)
    (y,) = R.npu_grouped_matmul([x], [w], group_list=torch.tensor(counts), group_type=0, group_list_type=1)
    torch.testing.assert_close(y.double(), loop_gmm(x, w, counts), **TOL[torch.float32])


def test_grouped_matmul_decode_shape_recipe_call():
    E, H, I, K = 128, 64, 16, 8
    ids = torch.tensor([3, 7, 7, 19, 64, 100, 101, 127])
    counts = torch.bincount(ids, minlength=E)
    x, w = rand(K, H, dtype=torch.bfloat16), rand(E, H, 2 * I, dtype=torch.bfloat16, seed=1)
    (y,) = R.npu_grouped_matmul([x], [w], group_list=counts, group_type=0, group_list_type=1, split_item=3)
    want = torch.stack([x[r].float() @ w[ids[r]].float() for r in range(K)]).to(torch.bfloat16)
    assert torch.equal(y, want)


def test_grouped_matmul_list_forms_split_items_bias_and_dtype():
    x, w = rand(5, 4), rand(2, 4, 3, seed=1)
    counts = [2, 3]
    bias = rand(2, 3, seed=2)
    want = loop_gmm(x, w, counts) + torch.cat([bias[0].expand(2, 3), bias[1].expand(3, 3)]).double()
    (y,) = R.npu_grouped_matmul([x], [w], bias=[bias], group_list=torch.tensor(counts), group_type=0,
                                group_list_type=1, split_item=2)
    torch.testing.assert_close(y.double(), want, **TOL[torch.float32])
    # the legacy int-list group_list: cumulative offsets, group_type=None
    (y,) = R.npu_grouped_matmul([x], [w[0], w[1]], bias=[bias[0], bias[1]], group_list=[2, 5], split_item=2)
    torch.testing.assert_close(y.double(), want, **TOL[torch.float32])
    parts = R.npu_grouped_matmul([x.bfloat16()], [w.bfloat16()], group_list=torch.tensor(counts), group_type=0,
                                 group_list_type=1, split_item=1)             # (float32 needs a single output)
    assert [p.shape[0] for p in parts] == counts
    # no grouping: one matmul per (x, weight) pair
    a, b = rand(2, 4, seed=3), rand(3, 4, seed=4)
    outs = R.npu_grouped_matmul([a, b], [w[0], w[1]])
    torch.testing.assert_close(outs[1], b @ w[1])
    outs = R.npu_grouped_matmul([a], [w[0]], group_type=-1)
    torch.testing.assert_close(outs[0], a @ w[0])
    (cat,) = R.npu_grouped_matmul([a, b], [w[0], w[1]], split_item=3)
    torch.testing.assert_close(cat, torch.cat([a @ w[0], b @ w[1]]))
    (ybf,) = R.npu_grouped_matmul([x.bfloat16()], [w.bfloat16()], group_list=torch.tensor(counts),
                                  group_type=0, group_list_type=1, output_dtype=torch.bfloat16)
    assert ybf.dtype == torch.bfloat16


def test_grouped_matmul_errors():
    x, w = rand(4, 3), rand(2, 3, 5)
    ok = dict(group_type=0, group_list_type=1)
    with pytest.raises(OpInputError, match="covers 6 rows but x has only M = 4"):
        R.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 3]), **ok)
    with pytest.raises(OpInputError, match="non-empty list"):
        R.npu_grouped_matmul(x, [w], group_list=torch.tensor([2, 2]), **ok)
    with pytest.raises(OpInputError, match="3 entries but the weights hold 2"):
        R.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 1, 2]), **ok)
    with pytest.raises(OpInputError, match="non-negative"):
        R.npu_grouped_matmul([x], [w], group_list=torch.tensor([5, -1]), **ok)
    with pytest.raises(OpInputError, match="non-decreasing"):
        R.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 1]), group_type=0, group_list_type=0)
    with pytest.raises(OpInputError, match="needs group_list"):
        R.npu_grouped_matmul([x], [w], **ok)
    with pytest.raises(OpInputError, match=r"x is \[M, 2\]"):
        R.npu_grouped_matmul([rand(4, 2)], [w], group_list=torch.tensor([2, 2]), **ok)
    with pytest.raises(NotImplementedError, match="scale"):
        R.npu_grouped_matmul([x], [w], scale=[torch.ones(2)], group_list=torch.tensor([2, 2]), **ok)
    with pytest.raises(NotImplementedError, match="group_type=2"):
        R.npu_grouped_matmul([x], [w], group_list=torch.tensor([2, 2]), group_type=2)


def test_grouped_matmul_rejects_what_the_kernel_rejects():
    x, w = rand(4, 3), rand(2, 3, 5)
    ok = dict(group_list=torch.tensor([2, 2]), group_type=0, group_list_type=1, split_item=3)
    with pytest.raises(OpInputError, match="at most 1024"):
        R.npu_grouped_matmul([x], [rand(1025, 3, 5)], **{**ok, "group_list": torch.zeros(1025, dtype=torch.int64)})
    with pytest.raises(OpInputError, match="at most 128"):
        R.npu_grouped_matmul([x] * 129, [w[0]] * 129)
    with pytest.raises(OpInputError, match="below 65536"):
        R.npu_grouped_matmul([torch.zeros(1, 65536)], [torch.zeros(2, 65536, 1)], **ok)
    with pytest.raises(OpInputError, match="below 65536"):
        R.npu_grouped_matmul([x], [torch.zeros(2, 3, 65536)], **ok)
    with pytest.raises(OpInputError, match="transposed"):
        R.npu_grouped_matmul([rand(3, 4).t()], [w], **ok)
    (y,) = R.npu_grouped_matmul([x], [rand(2, 5, 3, seed=2).transpose(1, 2)], **ok)   # a transposed weight is fine
    assert y.shape == (4, 5)
    with pytest.raises(OpInputError, match="output_dtype"):
        R.npu_grouped_matmul([x.bfloat16()], [w.bfloat16()], **ok, output_dtype=torch.float32)
    with pytest.raises(OpInputError, match="one dtype"):
        R.npu_grouped_matmul([x.bfloat16()], [w], **ok)
    with pytest.raises(OpInputError, match="bias"):                       # bf16 x takes a float32 bias
        R.npu_grouped_matmul([x.bfloat16()], [w.bfloat16()], bias=[torch.zeros(2, 5, dtype=torch.bfloat16)], **ok)
    with pytest.raises(OpInputError, match="group_list_type=2"):
        R.npu_grouped_matmul([x], [w], **{**ok, "group_list_type": 2})
    with pytest.raises(OpInputError, match="may not have length 1"):
        R.npu_grouped_matmul([x], [w[:1]], **{**ok, "group_list": torch.tensor([4])})
    (y,) = R.npu_grouped_matmul([x], [w[:1]], **{**ok, "group_list": torch.tensor([4]), "group_list_type": 0})
    torch.testing.assert_close(y, x @ w[0])
    with pytest.raises(OpInputError, match="float32 inputs"):
        R.npu_grouped_matmul([x, x], [w[0], w[1]], **{**ok, "group_list": None})
    with pytest.raises(OpInputError, match="split_item must be 0 or 1"):
        R.npu_grouped_matmul([x], [w[0]], group_type=-1, split_item=3)
    with pytest.raises(OpInputError, match="group_type=None"):             # an int list is the .List overload
        R.npu_grouped_matmul([x], [w[0], w[1]], group_list=[2, 4], group_type=0)
    with pytest.raises(OpInputError, match="not of length 1"):
        R.npu_grouped_matmul([x], [w[0]], group_list=[4], split_item=3)
    with pytest.raises(OpInputError, match="must end at"):
        R.npu_grouped_matmul([x], [w[0], w[1]], group_list=[1, 3], split_item=3)


# ---------------------------------------------------------------- a whole MoE block, both routing paths

def dense_moe(x, logits, w13, w2, K):
    """Per-token loop: softmax, top-k, renormalise, SwiGLU expert, weighted sum (fp64)."""
    probs = torch.softmax(logits.double(), -1)
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=torch.float64)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], K)
        weights = top.values / top.values.sum()
        for wgt, e in zip(weights, top.indices):
            gate_up = x[t].double() @ w13[e].double()
            gate, up = gate_up.chunk(2)
            out[t] += wgt * ((F.silu(gate) * up) @ w2[e].double())
    return out


def moe_v2(x, logits, w13, w2, K):
    """The model's own MoE chain (fused.moe_v2: gating -> init_routing_v2 -> gmm -> swiglu -> gmm ->
    finalize(2)), run on the reference kernels."""
    return fused.moe_v2(x, logits, w13, w2, K, norm_topk_prob=True)


def moe_v1(x, logits, w13, w2, K):
    """The documented path: gating -> init_routing (k-major) -> compute_expert_tokens (cumsum) -> finalize(0)."""
    T, E = logits.shape
    w, idx, row_idx = R.npu_moe_gating_top_k_softmax(logits, k=K)
    w = w / (w.sum(-1, keepdim=True) + fused.RENORM_EPS)
    ex, eri, sorted_experts = R.npu_moe_init_routing(x, row_idx, idx, T)
    ends = R.npu_moe_compute_expert_tokens(sorted_experts, E).long()
    gmm = dict(group_list=ends, group_type=0, group_list_type=0, split_item=3)
    h = R.npu_grouped_matmul([ex], [w13], **gmm)[0]
    y = R.npu_grouped_matmul([R.npu_swiglu(h)], [w2], **gmm)[0]
    return R.npu_moe_finalize_routing(y, None, None, None, w.to(y.dtype), eri, None, drop_pad_mode=0)


@pytest.mark.parametrize("path", [moe_v1, moe_v2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 13])
def test_moe_block_equals_dense_loop(path, dtype, T):
    E, K, H, I = 16, 4, 24, 8
    x = rand(T, H, dtype=dtype, seed=T)
    logits = rand(T, E, seed=T + 1) * 3                          # well-separated: no near-ties in top-k
    w13 = (rand(E, H, 2 * I, seed=2) / H ** 0.5).to(dtype)
    w2 = (rand(E, I, H, seed=3) / I ** 0.5).to(dtype)
    out = path(x, logits.to(dtype), w13, w2, K)
    assert out.shape == (T, H) and out.dtype == dtype
    want = dense_moe(x, logits.to(dtype), w13, w2, K)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), want, **tol)


def test_v1_and_v2_index_layouts_are_not_interchangeable():
    T, E, K, H = 5, 8, 3, 4
    x, logits = rand(T, H), rand(T, E, seed=1) * 3
    w, idx, row_idx = R.npu_moe_gating_top_k_softmax(logits, k=K)
    rows = rand(T * K, H, seed=2)
    _, eri_v2, _, _ = R.npu_moe_init_routing_v2(x, idx, expert_num=E)
    right = R.npu_moe_finalize_routing(rows, None, None, None, w, eri_v2, None, drop_pad_mode=2)
    wrong = R.npu_moe_finalize_routing(rows, None, None, None, w, eri_v2, None, drop_pad_mode=0)
    assert not torch.allclose(right, wrong)


# ---------------------------------------------------------------- the traced formulations

def traced(monkeypatch, fn, *args, **kw):
    """Run an op with the formulations it uses under torch.compile (sorts, scatters and cumsums as fused
    comparisons and sums), here eagerly so every output can be compared exactly."""
    with monkeypatch.context() as m:
        m.setattr(R, "_eager", lambda: False)
        return fn(*args, **kw)


def assert_same(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)    # bit for bit (NaN where NaN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_traced_routing_is_the_library_sort_exactly(monkeypatch, dtype, seed):
    """Ties (bf16 rounding, repeated logits), NaN rows, every count kind and index type, partial ranges:
    the sort-free formulations give the library sort's permutation, bit for bit."""
    g = gen(seed)
    x = torch.randint(-2, 3, (6, 16), generator=g).to(dtype)                 # many equal probabilities
    x[1] = torch.randn(16, generator=g).to(dtype)
    x[2, 3] = float("nan")
    for k in (1, 4, 16):
        assert_same(R.npu_moe_gating_top_k_softmax(x, k=k), traced(monkeypatch, R.npu_moe_gating_top_k_softmax, x, k=k))
    finished = torch.tensor([False, True, False, False, True, False])
    assert_same(R.npu_moe_gating_top_k_softmax(x, finished, k=3),
                traced(monkeypatch, R.npu_moe_gating_top_k_softmax, x, finished, k=3))
    rows = rand(6, 3, seed=seed)
    experts = torch.randint(0, 9, (6, 4), generator=g, dtype=torch.int32)
    for kw in (dict(expert_num=9, expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, 9]),
               dict(expert_num=9, expert_tokens_num_type=0, expert_tokens_num_flag=True),
               dict(expert_num=9, expert_tokens_num_type=2, expert_tokens_num_flag=True),
               dict(expert_num=9, active_expert_range=[2, 7], expert_tokens_num_type=1, expert_tokens_num_flag=True),
               dict(expert_num=9, active_expert_range=[2, 7], row_idx_type=1, active_num=10)):
        assert_same(R.npu_moe_init_routing_v2(rows, experts, **kw),
                    traced(monkeypatch, R.npu_moe_init_routing_v2, rows, experts, **kw))
    _, experts_v1, row_idx = R.npu_moe_gating_top_k_softmax(x[:, :9].float().nan_to_num(), k=4)
    assert_same(R.npu_moe_init_routing(rows, row_idx, experts_v1, 6),
                traced(monkeypatch, R.npu_moe_init_routing, rows, row_idx, experts_v1, 6))
    counts = torch.bincount(experts.flatten().long(), minlength=9)
    w = rand(9, 3, 5, seed=seed)
    ex = R.npu_moe_init_routing_v2(rows, experts, expert_num=9)[0]
    kw = dict(group_list=counts, split_item=3, group_type=0, group_list_type=1)
    torch.testing.assert_close(traced(monkeypatch, R.npu_grouped_matmul, [ex], [w], **kw)[0],
                               R.npu_grouped_matmul([ex], [w], **kw)[0])


def test_stable_rank_orders_like_torch_sort():
    g = gen(7)
    for n in (1, 2, 9, 33):
        keys = torch.randint(0, 4, (5, n), generator=g).float()
        keys[0, :: 3] = float("nan")
        for descending in (False, True):
            order = torch.sort(keys, dim=-1, descending=descending, stable=True)[1]
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))
            assert torch.equal(R._stable_rank(keys, descending), rank)
