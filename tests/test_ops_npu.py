"""Each fused torch_npu kernel on an Ascend NPU against its CPU reference, at the recipe's shapes
(D = 128, E = 128, K = 8). Skipped where torch_npu or an NPU is missing; run with `pytest -m npu`.

Tolerances: bf16/fp16 1e-2 relative, fp32 1e-4; integer outputs (routing indices, counts) must be equal.
These tests also settle what torch_npu's docs leave open: FIA's GQA head mapping and top-k tie order.
"""
import math

import pytest
import torch

from qwen3moe_tutorial import fused, ops
from qwen3moe_tutorial.ops import reference as R
from qwen3moe_tutorial.platform import npu_available

pytestmark = [pytest.mark.npu,
              pytest.mark.skipif(not npu_available(), reason="needs torch_npu and an Ascend NPU")]

DEV = "npu:0"
LOW = dict(rtol=1e-2, atol=1e-2)
FP32 = dict(rtol=1e-4, atol=1e-4)
E, K, D, H, I_R = 128, 8, 128, 1024, 96


@pytest.fixture(autouse=True)
def _auto_provider():
    with ops.use_provider("auto"):                       # NPU tensors -> torch_npu, CPU tensors -> reference
        yield


def rand(*shape, dtype=torch.bfloat16, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def on_npu(*tensors):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in tensors]


def close(npu_out, cpu_out, tol):
    torch.testing.assert_close(npu_out.cpu().float(), cpu_out.float(), **tol)


def test_provider_follows_the_device():
    assert ops.current_provider(DEV) == "npu" and ops.current_provider("cpu") == "reference"


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, LOW), (torch.float32, FP32)])
def test_swiglu(dtype, tol):
    x = rand(K, 2 * I_R, dtype=dtype)
    close(ops.npu_swiglu(x.to(DEV)), R.npu_swiglu(x), tol)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, LOW), (torch.float32, FP32)])
def test_rms_norm_and_add_rms_norm(dtype, tol):
    x1, x2, gamma = rand(2, 3, H, dtype=dtype), rand(2, 3, H, dtype=dtype, seed=1), rand(H, dtype=dtype, seed=2)
    y, rstd = ops.npu_rms_norm(*on_npu(x1, gamma), 1e-6)
    y_ref, rstd_ref = R.npu_rms_norm(x1, gamma, 1e-6)
    close(y, y_ref, tol)
    assert rstd.dtype == torch.float32 and rstd.shape == rstd_ref.shape
    close(rstd, rstd_ref, FP32)
    y, rstd, s = ops.npu_add_rms_norm(*on_npu(x1, x2, gamma), 1e-6)
    y_ref, _, s_ref = R.npu_add_rms_norm(x1, x2, gamma, 1e-6)
    close(y, y_ref, tol)
    assert torch.equal(s.cpu(), s_ref)                                     # the residual sum


def test_q_norm_over_head_dim():
    q, gamma = rand(1, 1, 4, D), rand(D, seed=1)
    close(ops.npu_rms_norm(*on_npu(q, gamma), 1e-6)[0], R.npu_rms_norm(q, gamma, 1e-6)[0], LOW)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gating_top_k_softmax(dtype):
    x = rand(16, E, dtype=dtype, scale=2.0)
    y, idx, row_idx = ops.npu_moe_gating_top_k_softmax(x.to(DEV), k=K)
    y_ref, idx_ref, row_ref = R.npu_moe_gating_top_k_softmax(x, k=K)
    assert idx.dtype == row_idx.dtype == torch.int32 and y.dtype == dtype
    assert torch.equal(row_idx.cpu(), row_ref)                             # k-major j*T + i
    close(y, y_ref, LOW if dtype != torch.float32 else FP32)
    # any difference in the chosen ids may only swap experts whose rounded probabilities are equal
    probs = torch.softmax(x.float(), -1).to(dtype)
    torch.testing.assert_close(probs.gather(1, idx.cpu().long()), probs.gather(1, idx_ref.long()), rtol=0, atol=0)


def test_gating_tie_order_lower_id_first():
    _, idx, _ = ops.npu_moe_gating_top_k_softmax(torch.zeros(2, E, dtype=torch.bfloat16, device=DEV), k=K)
    assert idx.cpu().tolist() == [list(range(K))] * 2                      # ties: lower id first, as the CPU golden sorts


def test_init_routing_v2_recipe_call():
    T = 4
    x = rand(T, H)
    idx = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:K] for t in range(T)]).int()
    kw = dict(active_num=T * K, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
              active_expert_range=[0, E])
    ex, eri, counts, _ = ops.npu_moe_init_routing_v2(*on_npu(x, idx), **kw)
    ex_ref, eri_ref, counts_ref, _ = R.npu_moe_init_routing_v2(x, idx, **kw)
    assert eri.dtype == torch.int32 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), counts_ref)
    assert torch.equal(eri.cpu(), eri_ref)                                 # stable order inside an expert
    assert torch.equal(ex.cpu(), ex_ref)


def test_init_routing_v1_and_compute_expert_tokens():
    T = 5
    x = rand(T, H)
    _, idx, row_idx = R.npu_moe_gating_top_k_softmax(rand(T, E, seed=1, scale=2.0), k=K)
    ex, eri, sorted_e = ops.npu_moe_init_routing(*on_npu(x, row_idx, idx), T)
    ex_ref, eri_ref, sorted_ref = R.npu_moe_init_routing(x, row_idx, idx, T)
    assert torch.equal(sorted_e.cpu(), sorted_ref) and torch.equal(eri.cpu(), eri_ref)
    assert torch.equal(ex.cpu(), ex_ref)
    ends = ops.npu_moe_compute_expert_tokens(sorted_e, E)
    assert torch.equal(ends.cpu(), R.npu_moe_compute_expert_tokens(sorted_ref, E))


@pytest.mark.parametrize("mode", [0, 2])
def test_finalize_routing(mode):
    T = 3
    rows, scales = rand(T * K, H), rand(T, K, seed=1)
    idx = torch.randperm(T * K, generator=torch.Generator().manual_seed(2)).int()
    out = ops.npu_moe_finalize_routing(*on_npu(rows, None, None, None, scales, idx, None), drop_pad_mode=mode)
    close(out, R.npu_moe_finalize_routing(rows, None, None, None, scales, idx, None, drop_pad_mode=mode), LOW)


@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("counts", [[0] * 40 + [1, 2] + [0] * 80 + [3, 0, 0, 1, 0, 1],       # decode: 8 rows
                                    [37, 0, 0, 250, 5] + [2] * 123])                          # prefill-like
def test_grouped_matmul(counts, group_list_type):
    M = sum(counts)
    x, w = rand(M, H, scale=0.1), rand(E, H, 2 * I_R, seed=1, scale=0.1)
    gl = torch.tensor(counts) if group_list_type == 1 else torch.tensor(counts).cumsum(0)
    kw = dict(group_list=gl, group_type=0, group_list_type=group_list_type, split_item=3)
    (y,) = ops.npu_grouped_matmul([x.to(DEV)], [w.to(DEV)], **{**kw, "group_list": gl.to(DEV)})
    close(y, R.npu_grouped_matmul([x], [w], **kw)[0], LOW)


def test_moe_block_v2_end_to_end():
    T = 2
    x, logits = rand(T, H), rand(T, E, seed=1, scale=2.0)
    w13, w2 = rand(E, H, 2 * I_R, seed=2, scale=0.03), rand(E, I_R, H, seed=3, scale=0.1)

    kw = dict(top_k=K, norm_topk_prob=True)                    # the model's chain (FusedRoutingGMM.forward)
    close(fused.moe_v2(*on_npu(x, logits, w13, w2), **kw), fused.moe_v2(x, logits, w13, w2, **kw), LOW)


CAUSAL_2048 = ~torch.tril(torch.ones(2048, 2048, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fia_prefill_bsh_causal(dtype):
    B, S, N, NKV = 2, 64, 8, 2
    q, k, v = rand(B, S, N * D, dtype=dtype), rand(B, S, NKV * D, dtype=dtype, seed=1), \
        rand(B, S, NKV * D, dtype=dtype, seed=2)
    kw = dict(num_heads=N, num_key_value_heads=NKV, input_layout="BSH", scale=1 / math.sqrt(D),
              sparse_mode=2, next_tokens=0)
    out, _ = ops.npu_fused_infer_attention_score(*on_npu(q, k, v), atten_mask=CAUSAL_2048.to(DEV), **kw)
    ref, _ = R.npu_fused_infer_attention_score(q, k, v, atten_mask=CAUSAL_2048, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    close(out, ref, LOW)


def test_fia_decode_static_cache_with_lengths_and_gqa_mapping():
    B, S_MAX, N, NKV = 3, 256, 8, 2
    lengths = [1, 100, 256]
    q = rand(B, 1, N * D)
    k, v = rand(B, S_MAX, NKV * D, seed=1), rand(B, S_MAX, NKV * D, seed=2)
    kw = dict(num_heads=N, num_key_value_heads=NKV, input_layout="BSH", scale=1 / math.sqrt(D),
              actual_seq_lengths_kv=lengths)
    out, _ = ops.npu_fused_infer_attention_score(*on_npu(q, k, v), **kw)
    close(out, R.npu_fused_infer_attention_score(q, k, v, **kw)[0], LOW)
    # V = KV-head id everywhere: query head h must read KV head h // (N / Nkv)  (HF's repeat_kv convention)
    v_id = torch.arange(NKV, dtype=torch.bfloat16).repeat_interleave(D).expand(B, S_MAX, NKV * D).contiguous()
    out, _ = ops.npu_fused_infer_attention_score(*on_npu(q, k, v_id), **kw)
    heads = out.cpu().view(B, N, D)[:, :, 0].float()
    expected = torch.tensor([[h // (N // NKV) for h in range(N)]] * B, dtype=torch.float32)
    torch.testing.assert_close(heads, expected, **LOW)


def test_rope_is_in_place_on_npu():
    B, S, N = 2, 6, 4
    q, k = rand(B, S, N, D), rand(B, S, 1, D, seed=1)
    cos, sin = rand(B, S, 1, D, seed=2), rand(B, S, 1, D, seed=3)
    qn, kn = on_npu(q, k)
    ptr = qn.data_ptr()
    q_out, k_out = ops.npu_apply_rotary_pos_emb(qn, kn, *on_npu(cos, sin), "BSH")
    R.npu_apply_rotary_pos_emb(q, k, cos, sin, "BSH")
    assert q_out.data_ptr() == ptr
    close(qn, q, LOW)
    close(kn, k, LOW)


def test_scatter_update_per_batch_positions():
    B, S_MAX = 3, 32
    cache = rand(B, S_MAX, 2 * D)
    new = rand(B, 1, 2 * D, seed=1)
    pos = torch.tensor([0, 17, 31])
    cache_npu = cache.to(DEV)
    ops.scatter_update_(cache_npu, pos.to(DEV), new.to(DEV), -2)
    R.scatter_update_(cache, pos, new, -2)
    assert torch.equal(cache_npu.cpu(), cache)


def test_format_cast_keeps_values():
    w = rand(H, 2 * I_R)
    assert torch.equal(ops.npu_format_cast(w.to(DEV), 29).cpu(), ops.npu_format_cast(w, 29))
