"""The dispatch point qwen3moe_tutorial.ops: provider choice and override, signatures, and that the decode-path
ops trace under torch.compile(fullgraph=True) (no host syncs, no data-dependent shapes)."""
import inspect
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from qwen3moe_tutorial import fused, ops
from qwen3moe_tutorial.ops import npu as npu_provider
from qwen3moe_tutorial.ops import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH_NPU = npu_provider.available()


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- provider selection

def test_every_op_is_exposed_with_the_reference_signature():
    for name in ops.OP_NAMES:
        fn = getattr(ops, name)
        assert inspect.signature(fn) == inspect.signature(getattr(R, name)), name
        assert fn.__doc__ == getattr(R, name).__doc__


def test_cpu_tensors_use_the_reference_in_auto_mode():
    assert ops.provider_setting() in ops.PROVIDERS
    assert ops.current_provider("cpu") == "reference"
    x = rand(3, 8)
    assert torch.equal(ops.npu_swiglu(x), R.npu_swiglu(x))


def test_use_provider_nests_and_restores():
    with ops.use_provider("reference"):
        assert ops.current_provider() == "reference"
        with ops.use_provider("auto"):
            assert ops.provider_setting() == "auto"
        assert ops.provider_setting() == "reference"
    with pytest.raises(ValueError, match="must be one of auto, reference, npu"):
        with ops.use_provider("cuda"):
            pass


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_forcing_npu_without_torch_npu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch_npu is not installed"):
        with ops.use_provider("npu"):
            pass
    assert ops.provider_setting() != "npu"


def run_with_env(code, value):
    env = dict(os.environ, QWEN3MOE_OPS=value, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


def test_environment_variable_sets_the_provider():
    code = ("from qwen3moe_tutorial import ops; import torch; print(ops.provider_setting(), "
            "ops.current_provider('cpu'))\n"
            "try:\n    ops.npu_swiglu(torch.ones(2, 4))\nexcept RuntimeError as e:\n    print('error:', e)")
    got = run_with_env(code, "reference")
    assert got.returncode == 0 and got.stdout.split() == ["reference", "reference"], got.stderr
    if not HAS_TORCH_NPU:
        got = run_with_env(code, "npu")
        assert got.returncode == 0 and "error: the 'npu' ops provider was requested" in got.stdout, got.stderr
    got = run_with_env(code, "gpu")
    assert got.returncode != 0 and "QWEN3MOE_OPS: ops provider must be one of" in got.stderr


# ---------------------------------------------------------------- torch.compile(fullgraph=True)

def compiled(fn, backend="eager", **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend, **kw)


E, K, H, I, N, NKV, D, S_MAX = 16, 4, 64, 8, 4, 2, 64, 24


def moe_block(x, logits, w13, w2):
    """The model's MoE chain itself (`fused.moe_v2`, what FusedRoutingGMM.forward runs), renormalised."""
    return fused.moe_v2(x, logits, w13, w2, top_k=K, norm_topk_prob=True)


def attention_block(h, residual, gamma, wqkv, cos, sin, cache_k, cache_v, kv_len, lengths):
    y, _, residual = ops.npu_add_rms_norm(residual, h, gamma, 1e-6)
    B = h.shape[0]
    q, k, v = (y @ wqkv).split([N * D, NKV * D, NKV * D], dim=-1)          # [B, 1, *]
    q, k = q.view(B, 1, N, D), k.view(B, 1, NKV, D)
    q = ops.npu_rms_norm(q, gamma[:D])[0]
    q, k = ops.npu_apply_rotary_pos_emb(q, k, cos, sin, "BSH")
    ops.scatter_update_(cache_k, kv_len, k.reshape(B, 1, NKV * D), -2)
    ops.scatter_update_(cache_v, kv_len, v, -2)
    out, _ = ops.npu_fused_infer_attention_score(
        q.reshape(B, 1, N * D), cache_k, cache_v, num_heads=N, num_key_value_heads=NKV, input_layout="BSH",
        scale=D ** -0.5, actual_seq_lengths_kv=lengths)
    return out, residual


def moe_inputs(T=2, dtype=torch.float32):
    return (rand(T, H, dtype=dtype), rand(T, E, dtype=dtype, seed=1) * 3,
            rand(E, H, 2 * I, dtype=dtype, seed=2) / 6, rand(E, I, H, dtype=dtype, seed=3) / 3)


def attention_inputs(B=2):
    return (rand(B, 1, H), rand(B, 1, H, seed=1), rand(H, seed=2), rand(H, (N + 2 * NKV) * D, seed=3) / 6,
            rand(B, 1, 1, D, seed=4), rand(B, 1, 1, D, seed=5), torch.zeros(B, S_MAX, NKV * D),
            torch.zeros(B, S_MAX, NKV * D), torch.tensor([3, 9]))


def test_moe_decode_path_traces_as_one_graph():
    args = moe_inputs()
    want = moe_block(*args)
    counter = CompileCounter()
    fn = compiled(moe_block, backend=counter)
    # traced, the reference grouped matmul is a multiply-and-sum (one fused kernel under inductor)
    # instead of a gathered bmm: the same products, summed in another order
    torch.testing.assert_close(fn(*args), want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_attention_decode_path_traces_and_mutates_the_cache():
    args = attention_inputs()
    want_out, want_res = attention_block(*args, [4, 10])
    fresh = attention_inputs()
    counter = CompileCounter()
    fn = compiled(attention_block, backend=counter, dynamic=True)
    out, res = fn(*fresh, [4, 10])
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)   # traced: multiply-and-sum, not bmm
    assert torch.equal(fresh[6], args[6]) and fresh[6][1, 9].abs().sum() > 0     # cache written in place
    fresh[8].add_(1)                                               # next decode step: positions move
    fn(*fresh, [5, 11])
    assert counter.frame_count == 1                                # new lengths: no retrace


def test_decode_path_under_aot_autograd_functionalization():
    args = attention_inputs()
    want_out, _ = attention_block(*args, [4, 10])
    fresh = attention_inputs()
    out, _ = compiled(attention_block, backend="aot_eager")(*fresh, [4, 10])
    torch.testing.assert_close(out, want_out)
    assert torch.equal(fresh[7], args[7])


def test_moe_block_compiles_with_inductor():
    args = moe_inputs(T=3)
    fn = compiled(moe_block, backend="inductor")
    torch.testing.assert_close(fn(*args), moe_block(*args), rtol=1e-4, atol=1e-5)


def test_grouped_matmul_large_m_traces_without_host_reads():
    x, w = rand(300, 8), rand(4, 8, 6, seed=1)
    counts = torch.tensor([100, 0, 150, 40])                       # 10 rows past the total

    def f(x, w, counts):
        return ops.npu_grouped_matmul([x], [w], group_list=counts, group_type=0, group_list_type=1)[0]

    torch.testing.assert_close(compiled(f)(x, w, counts), f(x, w, counts))
