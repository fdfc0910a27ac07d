"""Reference attention (FIA), in-place RoPE and the KV-cache writes against plain PyTorch on the CPU."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qwen3moe_tutorial.ops import reference as R
from qwen3moe_tutorial.ops.reference import OpInputError

FAST = settings(max_examples=20, deadline=None)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CAUSAL_2048 = ~torch.tril(torch.ones(2048, 2048, dtype=torch.bool))     # True = masked (the recipe's mask)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sdpa_bnsd(q, k, v, causal=False, valid_kv=None, scale=None, masks=None):
    """Plain attention with repeat_interleave GQA (HF's repeat_kv): q [B, N, S, D], k/v [B, Nkv, S_kv, D].
    masks: optional bool [B, S_kv] (True = masked) applied to every query row of that batch."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1).double(), v.repeat_interleave(G, dim=1).double()
    scores = q.double() @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    S, S_kv = scores.shape[-2:]
    if causal:
        scores = scores.masked_fill(torch.ones(S, S_kv, dtype=torch.bool).triu(1), float("-inf"))
    if valid_kv is not None:
        for b, n in enumerate(valid_kv):
            scores[b, ..., n:] = float("-inf")
    if masks is not None:
        for b in range(scores.shape[0]):
            scores[b, ..., masks[b]] = float("-inf")
    return torch.softmax(scores, -1) @ v


def to_bsh(t):                                    # [B, N, S, D] -> [B, S, N*D]
    B, N, S, D = t.shape
    return t.transpose(1, 2).reshape(B, S, N * D)


# ---------------------------------------------------------------- FIA prefill

@FAST
@given(B=st.integers(1, 2), S=st.integers(1, 9), Nkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_fia_prefill_bsh_causal_matches_sdpa(B, S, Nkv, G, dtype, seed):
    N, D = Nkv * G, 16                                                   # the prompt kernel needs D % 16 == 0
    q, k, v = (rand(B, n, S, D, dtype=dtype, seed=seed + i) for i, n in enumerate((N, Nkv, Nkv)))
    out, lse = R.npu_fused_infer_attention_score(
        to_bsh(q), to_bsh(k), to_bsh(v), num_heads=N, num_key_value_heads=Nkv, input_layout="BSH",
        scale=1 / math.sqrt(D), atten_mask=CAUSAL_2048, sparse_mode=2, next_tokens=0)
    assert out.shape == (B, S, N * D) and out.dtype == dtype
    assert lse.shape == (0,)                                             # placeholder: callers ignore it
    torch.testing.assert_close(out.double(), to_bsh(sdpa_bnsd(q, k, v, causal=True)), **TOL[dtype])


def test_fia_bsnd_bnsd_and_sparse_mode_0_full_mask():
    B, S, N, Nkv, D = 2, 5, 4, 2, 16
    q, k, v = rand(B, N, S, D), rand(B, Nkv, S, D, seed=1), rand(B, Nkv, S, D, seed=2)
    want = sdpa_bnsd(q, k, v, causal=True)
    common = dict(num_heads=N, num_key_value_heads=Nkv, scale=D ** -0.5)
    out, _ = R.npu_fused_infer_attention_score(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               input_layout="BSND", atten_mask=CAUSAL_2048, sparse_mode=2,
                                               **common)
    torch.testing.assert_close(out.transpose(1, 2).double(), want, **TOL[torch.float32])
    full = torch.ones(S, S, dtype=torch.bool).triu(1)
    out, _ = R.npu_fused_infer_attention_score(q, k, v, input_layout="BNSD", atten_mask=full, **common)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    out, _ = R.npu_fused_infer_attention_score(q, k, v, input_layout="BNSD", **common)   # no mask at all
    torch.testing.assert_close(out.double(), sdpa_bnsd(q, k, v), **TOL[torch.float32])


def test_fia_sparse_mode_3_aligns_causal_to_the_bottom_right():
    q, kv = rand(1, 1, 2, 16), rand(1, 1, 5, 16, seed=1)
    out, _ = R.npu_fused_infer_attention_score(q, kv, kv, input_layout="BNSD", atten_mask=CAUSAL_2048,
                                               sparse_mode=3, scale=0.5)
    mask = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)   # query i sees keys <= i + 3
    want, _ = R.npu_fused_infer_attention_score(q, kv, kv, input_layout="BNSD", atten_mask=mask, scale=0.5)
    torch.testing.assert_close(out, want)


def test_fia_gqa_query_head_h_reads_kv_head_h_div_group():
    B, S, N, Nkv, D = 1, 3, 8, 2, 16
    q, k = rand(B, N, S, D), rand(B, Nkv, S, D, seed=1)
    v = torch.arange(Nkv, dtype=torch.float32).view(1, Nkv, 1, 1).expand(B, Nkv, S, D)   # V = kv-head id
    out, _ = R.npu_fused_infer_attention_score(to_bsh(q), to_bsh(k), to_bsh(v.contiguous()), num_heads=N,
                                               num_key_value_heads=Nkv)
    per_head = out.view(B, S, N, D)[0, 0, :, 0]
    torch.testing.assert_close(per_head, torch.tensor([0., 0, 0, 0, 1, 1, 1, 1]))   # h // (N / Nkv)


# ---------------------------------------------------------------- FIA decode over a static cache

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fia_decode_attends_over_each_batch_length(dtype):
    B, S_max, N, Nkv, D = 3, 16, 4, 1, 8
    lengths = [1, 7, 16]
    q = rand(B, N, 1, D, dtype=dtype)
    k, v = rand(B, Nkv, S_max, D, dtype=dtype, seed=1), rand(B, Nkv, S_max, D, dtype=dtype, seed=2)
    for b, n in enumerate(lengths):                                      # stale cache rows: must not count
        k[b, :, n:], v[b, :, n:] = 30.0, 1e4
    out, _ = R.npu_fused_infer_attention_score(to_bsh(q), to_bsh(k), to_bsh(v), num_heads=N,
                                               num_key_value_heads=Nkv, scale=D ** -0.5,
                                               actual_seq_lengths_kv=lengths)
    assert out.shape == (B, 1, N * D)
    want = to_bsh(sdpa_bnsd(q, k, v, valid_kv=lengths))
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    # one length broadcasts to every batch; the incremental kernel ignores sparse_mode and its mask
    one, _ = R.npu_fused_infer_attention_score(to_bsh(q), to_bsh(k), to_bsh(v), num_heads=N,
                                               num_key_value_heads=Nkv, scale=D ** -0.5, sparse_mode=2,
                                               atten_mask=CAUSAL_2048, actual_seq_lengths_kv=[1])
    torch.testing.assert_close(one.double(), to_bsh(sdpa_bnsd(q, k, v, valid_kv=[1, 1, 1])), **TOL[dtype])


def test_fia_decode_never_reads_past_the_length():
    """Rows past actual_seq_lengths_kv are not read at all: a NaN there (an uninitialised cache) must
    not reach the output, eagerly or compiled with a symbolic length."""
    B, S_max, N, Nkv, D = 1, 32, 4, 2, 8
    q, k, v = rand(B, N, 1, D), rand(B, Nkv, S_max, D, seed=1), rand(B, Nkv, S_max, D, seed=2)
    k[:, :, 9:], v[:, :, 9:] = float("nan"), float("nan")

    def attend(q, k, v, n):
        return R.npu_fused_infer_attention_score(to_bsh(q), to_bsh(k), to_bsh(v), num_heads=N,
                                                 num_key_value_heads=Nkv, scale=D ** -0.5,
                                                 actual_seq_lengths_kv=[n])[0]

    compiled = torch.compile(attend, dynamic=True, fullgraph=True)
    for n in (9, 5):
        want = to_bsh(sdpa_bnsd(q[..., :, :], k[:, :, :n], v[:, :, :n]))
        torch.testing.assert_close(attend(q, k, v, n).double(), want, **TOL[torch.float32])
        torch.testing.assert_close(compiled(q, k, v, n).double(), want, **TOL[torch.float32])


def test_fia_softmax_cast_to_input_dtype_before_v_and_lse():
    q, k, v = (rand(1, 2, 3, 16, dtype=torch.bfloat16, seed=i) for i in range(3))
    out, lse = R.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BNSD", scale=0.3,
                                                 softmax_lse_flag=True)
    scores = q.float() @ k.float().transpose(-1, -2) * 0.3
    probs = torch.softmax(scores, -1).to(torch.bfloat16)
    assert torch.equal(out, (probs.float() @ v.float()).to(torch.bfloat16))
    assert lse.shape == (1, 2, 3, 1) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1, keepdim=True))


def test_fia_errors_are_specific():
    q, kv = rand(1, 4, 64), rand(1, 4, 32)                              # D = 16
    with pytest.raises(OpInputError, match="compressed causal mask"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=2, sparse_mode=2)
    with pytest.raises(OpInputError, match="compressed causal mask"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=2, sparse_mode=2,
                                          atten_mask=torch.ones(4, 4, dtype=torch.bool).triu(1))
    with pytest.raises(OpInputError, match="multiple of num_key_value_heads"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=3)
    with pytest.raises(OpInputError, match="do not fit"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=4)
    with pytest.raises(OpInputError, match="list of ints"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=2,
                                          actual_seq_lengths_kv=torch.tensor([4]))
    with pytest.raises(OpInputError, match="outside"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=2,
                                          actual_seq_lengths_kv=[5])
    with pytest.raises(NotImplementedError, match="block_table"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, block_table=torch.zeros(1, 1))
    with pytest.raises(NotImplementedError, match="TND"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, input_layout="TND")
    with pytest.raises(NotImplementedError, match="sparse_mode=4"):
        R.npu_fused_infer_attention_score(q, kv, kv, num_heads=4, num_key_value_heads=2, sparse_mode=4,
                                          atten_mask=CAUSAL_2048)


def test_fia_rejects_what_the_kernel_rejects():
    heads = dict(num_heads=4, num_key_value_heads=2)
    q, kv = rand(1, 4, 4 * 24), rand(1, 4, 2 * 24)                     # D = 24: not a multiple of 16
    with pytest.raises(OpInputError, match="multiple of 16"):
        R.npu_fused_infer_attention_score(q, kv, kv, **heads)
    out, _ = R.npu_fused_infer_attention_score(q[:, :1], kv, kv, **heads)   # the incremental kernel takes it
    assert out.shape == (1, 1, 96)
    with pytest.raises(OpInputError, match="D <= 512"):
        R.npu_fused_infer_attention_score(rand(1, 1, 1, 528), rand(1, 1, 2, 528), rand(1, 1, 2, 528),
                                          input_layout="BNSD")
    with pytest.raises(OpInputError, match="N <= 256"):
        R.npu_fused_infer_attention_score(rand(1, 258, 1, 16), rand(1, 6, 2, 16), rand(1, 6, 2, 16),
                                          num_heads=258, num_key_value_heads=6, input_layout="BNSD")
    with pytest.raises(OpInputError, match="ratio <= 64"):
        R.npu_fused_infer_attention_score(rand(1, 65, 1, 16), rand(1, 1, 2, 16), rand(1, 1, 2, 16),
                                          num_heads=65, num_key_value_heads=1, input_layout="BNSD")
    big = torch.zeros(1, 1, 262145, 16)
    with pytest.raises(OpInputError, match="262144"):
        R.npu_fused_infer_attention_score(rand(1, 1, 1, 16), big, big, input_layout="BNSD")
    q, kv = rand(1, 4, 64), rand(1, 4, 32)
    with pytest.raises(OpInputError, match="sparse_mode must be"):
        R.npu_fused_infer_attention_score(q, kv, kv, **heads, sparse_mode=5)
    with pytest.raises(OpInputError, match="allMask"):
        R.npu_fused_infer_attention_score(q, kv, kv, **heads, sparse_mode=1)
    with pytest.raises(OpInputError, match="atten_mask must be"):
        R.npu_fused_infer_attention_score(q, kv, kv, **heads, atten_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(OpInputError, match="at least B"):               # 1 or >= B lengths
        R.npu_fused_infer_attention_score(rand(3, 1, 64), rand(3, 4, 32), rand(3, 4, 32), **heads,
                                          actual_seq_lengths_kv=[2, 2])
    # the CANN sparse-mode rules for a negative limit
    mask = torch.zeros(4, 4, dtype=torch.bool)
    with pytest.raises(OpInputError, match="next_tokens=-2 < 0 needs pre_tokens >= 2"):
        R.npu_fused_infer_attention_score(q, kv, kv, **heads, atten_mask=mask, pre_tokens=1, next_tokens=-2)
    with pytest.raises(OpInputError, match="pre_tokens=-4 < 0"):       # |pre_tokens| must stay below S = 4
        R.npu_fused_infer_attention_score(q, kv, kv, **heads, atten_mask=mask, pre_tokens=-4, next_tokens=8)


def test_fia_mask_forms_the_doc_lists():
    B, S, N, D = 2, 3, 2, 16
    q, k, v = rand(B, N, S, D), rand(B, N, 5, D, seed=1), rand(B, N, 5, D, seed=2)
    m2 = torch.rand(S, 5, generator=torch.Generator().manual_seed(3)) > 0.6
    m2[:, 0] = False                                                     # no fully masked row
    want, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", atten_mask=m2)
    padded = torch.ones(16, 16, dtype=torch.bool)                        # S axes padded to an aligned size
    padded[:S, :5] = m2
    for m in (m2[None], m2[None, None], m2.expand(B, S, 5), m2.expand(B, 1, S, 5), padded, m2.to(torch.uint8)):
        out, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", atten_mask=m)
        torch.testing.assert_close(out, want)
    # sparse_mode 1 (allMask) uses the mask as given and ignores pre/next_tokens
    out, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", atten_mask=m2,
                                               sparse_mode=1, pre_tokens=0, next_tokens=0)
    torch.testing.assert_close(out, want)
    # the compressed template also comes as [1, 2048, 2048] and [1, 1, 2048, 2048]
    causal, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD",
                                                  atten_mask=CAUSAL_2048, sparse_mode=3)
    for m in (CAUSAL_2048[None], CAUSAL_2048[None, None]):
        out, _ = R.npu_fused_infer_attention_score(q, k, v, num_heads=N, input_layout="BNSD", atten_mask=m,
                                                   sparse_mode=3)
        torch.testing.assert_close(out, causal)
    # decode (S = 1): a [B, S_kv] mask; a lengths list longer than B is cut to its first B entries
    qd = q[:, :, :1]
    md = torch.tensor([[False, False, True, True, True], [False, True, False, True, True]])
    out, _ = R.npu_fused_infer_attention_score(qd, k, v, num_heads=N, input_layout="BNSD", atten_mask=md)
    want = sdpa_bnsd(qd, k, v, scale=1.0, masks=md)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    cut, _ = R.npu_fused_infer_attention_score(qd, k, v, num_heads=N, input_layout="BNSD",
                                               actual_seq_lengths_kv=[2, 4, 1])
    ref, _ = R.npu_fused_infer_attention_score(qd, k, v, num_heads=N, input_layout="BNSD",
                                               actual_seq_lengths_kv=[2, 4])
    torch.testing.assert_close(cut, ref)


# ---------------------------------------------------------------- RoPE (in place)

def hf_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def rope_tables(S, D, theta=1e6):
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()                                          # [S, D]


@pytest.mark.parametrize("layout", ["BSND", "BSH"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_in_place_and_returns_the_inputs(layout, dtype):
    B, S, N, Nkv, D = 2, 5, 4, 2, 64
    cos, sin = (t.view(1, S, 1, D).expand(B, S, 1, D).to(dtype) for t in rope_tables(S, D))
    q, k = rand(B, S, N, D, dtype=dtype), rand(B, S, Nkv, D, dtype=dtype, seed=1)
    q0, k0 = q.clone(), k.clone()
    q_out, k_out = R.npu_apply_rotary_pos_emb(q, k, cos, sin, layout)
    assert q_out is q and k_out is k                                     # same objects, overwritten
    assert not torch.equal(q, q0)
    want_q = hf_rope(q0.float(), cos.float(), sin.float()).to(dtype)    # fp32 math, one rounding
    assert torch.equal(q, want_q)
    torch.testing.assert_close(k.double(), hf_rope(k0.double(), cos.double(), sin.double()), **TOL[dtype])


def test_rope_writes_through_views_and_tnd():
    D = 128
    qkv = rand(1, 3, 2 * D + D)
    q = qkv[..., :2 * D].view(1, 3, 2, D)
    k = qkv[..., 2 * D:].view(1, 3, 1, D)
    cos, sin = (t.view(1, 3, 1, D) for t in rope_tables(3, D))
    before = qkv.clone()
    R.npu_apply_rotary_pos_emb(q, k, cos, sin, "BSH")
    assert torch.equal(qkv[..., :2 * D].view(1, 3, 2, D), hf_rope(before[..., :2 * D].view(1, 3, 2, D), cos, sin))
    q3, k3 = rand(4, 2, 64), rand(4, 1, 64, seed=1)
    c3, s3 = (t.view(4, 1, 64) for t in rope_tables(4, 64))
    want = hf_rope(q3, c3, s3)
    R.npu_apply_rotary_pos_emb(q3, k3, c3, s3, "TND")
    torch.testing.assert_close(q3, want)


def test_rope_errors():
    D = 64
    q, k = rand(1, 2, 2, D), rand(1, 2, 1, D)
    cos, sin = (t.view(1, 2, 1, D) for t in rope_tables(2, D))
    with pytest.raises(OpInputError, match="share one dtype"):
        R.npu_apply_rotary_pos_emb(q, k, cos.bfloat16(), sin.bfloat16())
    with pytest.raises(OpInputError, match="only 'half'"):
        R.npu_apply_rotary_pos_emb(q, k, cos, sin, rotary_mode="interleave")
    with pytest.raises(OpInputError, match="4-D"):
        R.npu_apply_rotary_pos_emb(q[0], k[0], cos[0], sin[0], "BSH")
    with pytest.raises(OpInputError, match=r"\[B, S, 1, D\]"):          # N of cos/sin must be 1
        R.npu_apply_rotary_pos_emb(q, k, cos.expand(1, 2, 3, D).contiguous(), sin.expand(1, 2, 3, D).contiguous())


def test_rope_rejects_what_atlas_a2_a3_reject():
    for D in (32, 96, 256):                                              # head dim 64 or 128 only
        q, k = rand(1, 2, 2, D), rand(1, 2, 1, D)
        cos, sin = (t.view(1, 2, 1, D) for t in rope_tables(2, D))
        with pytest.raises(OpInputError, match="64 or 128"):
            R.npu_apply_rotary_pos_emb(q, k, cos, sin)
    B, S, D = 2, 3, 64
    q, k = rand(B, S, 2, D), rand(B, S, 1, D)
    cos, sin = (t.view(1, S, 1, D) for t in rope_tables(S, D))
    for layout in ("BNSD", "SBND"):                                      # only BSND (and BSH) and TND
        with pytest.raises(OpInputError, match="not supported on Atlas A2/A3"):
            R.npu_apply_rotary_pos_emb(q, k, cos.expand(B, S, 1, D), sin.expand(B, S, 1, D), layout)
    with pytest.raises(OpInputError, match=r"\[B, S, 1, D\]"):          # no broadcast over B
        R.npu_apply_rotary_pos_emb(q, k, cos, sin)
    with pytest.raises(OpInputError, match="leading dims"):              # key shares query's B and S
        R.npu_apply_rotary_pos_emb(q, k[:, :2], cos.expand(B, S, 1, D), sin.expand(B, S, 1, D))
    with pytest.raises(OpInputError, match="empty"):
        R.npu_apply_rotary_pos_emb(q[:0], k[:0], cos[:0], sin[:0])
    q3, k3 = rand(4, 2, D), rand(4, 1, D)
    c3, s3 = (t.view(4, 1, D) for t in rope_tables(4, D))
    with pytest.raises(OpInputError, match=r"\[T, 1, D\]"):
        R.npu_apply_rotary_pos_emb(q3, k3, c3[:2], s3[:2], "TND")
    out_q, _ = R.npu_apply_rotary_pos_emb(q3, k3, c3, s3, "TND")
    assert out_q is q3


# ---------------------------------------------------------------- KV-cache writes

@FAST
@given(B=st.integers(1, 4), S_max=st.integers(4, 12), L=st.integers(1, 3), data=st.data(),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_scatter_update_writes_each_batch_at_its_own_position(B, S_max, L, data, idx_dtype):
    H = 6
    starts = data.draw(st.lists(st.integers(0, S_max - L), min_size=B, max_size=B))
    cache = rand(B, S_max, H)
    updates = rand(B, L, H, seed=1)
    want = cache.clone()
    for b, s in enumerate(starts):
        want[b, s:s + L] = updates[b]
    out = R.scatter_update_(cache, torch.tensor(starts, dtype=idx_dtype), updates, -2)
    assert out is cache and torch.equal(cache, want)


def test_scatter_update_other_axis_and_errors():
    cache = torch.zeros(2, 3, 8, 4)                                      # [B, Nkv, S_max, D]
    R.scatter_update_(cache, torch.tensor([1, 5]), torch.ones(2, 3, 2, 4), 2)
    assert cache[0, :, 1:3].eq(1).all() and cache[1, :, 5:7].eq(1).all() and cache.sum() == 2 * 3 * 2 * 4
    kv = torch.zeros(2, 8, 4)
    with pytest.raises(OpInputError, match="outside"):
        R.scatter_update_(kv, torch.tensor([0, 8]), torch.ones(2, 1, 4), -2)
    with pytest.raises(OpInputError, match="non-batch"):
        R.scatter_update_(kv, torch.tensor([0, 1]), torch.ones(2, 8, 4), 0)
    with pytest.raises(OpInputError, match="cache dtype"):
        R.scatter_update_(kv, torch.tensor([0, 1]), torch.ones(2, 1, 4, dtype=torch.bfloat16), -2)
    with pytest.raises(NotImplementedError, match="1-D indices"):
        R.scatter_update_(kv, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 1, 4), -2)


def test_scatter_nd_update_and_format_cast():
    cache = torch.zeros(6, 2, 3)                                         # [slots, Nkv, D]
    slots = torch.tensor([4, 1]).view(-1, 1)
    key = torch.arange(12.0).view(2, 2, 3)
    assert R.npu_scatter_nd_update_(cache, slots, key) is cache
    assert torch.equal(cache[4], key[0]) and torch.equal(cache[1], key[1]) and cache.sum() == key.sum()
    with pytest.raises(OpInputError, match="indices.shape"):
        R.npu_scatter_nd_update_(cache, slots, key[:, :1])
    w = rand(4, 3)
    assert R.npu_format_cast(w, 29) is w                                 # NZ is an NPU memory layout only
