"""Our Triton attention kernel: compiled ahead of time to PTX here (no GPU needed), and,
on a CUDA GPU, checked against torch's scaled_dot_product_attention and timed."""

from __future__ import annotations

import re
import time

import pytest

from clipexport.trt.attention_kernel import (
    MAX_SHARED_MEM,
    KernelConfig,
    compile_attention,
    default_scale,
    drop_unused_trailing_params,
    ptx_entry,
)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.mark.parametrize("config, sm", [
    (KernelConfig("float16", 64, 0.125, False), (9, 0)),  # ViT-B/L image tower
    (KernelConfig("float16", 64, 0.125, True), (8, 0)),  # causal text tower
    (KernelConfig("float32", 80, default_scale(80), True), (9, 0)),  # ViT-H width, fp32 graph
    (KernelConfig("bfloat16", 104, default_scale(104), False), (8, 9)),  # ViT-bigG width
])
def test_kernel_compiles_to_ptx_with_the_plugin_argument_contract(config, sm):
    compiled = compile_attention(config, sm)
    name, params = ptx_entry(compiled.ptx)
    # TensorRT launches AOT plugins with (inputs..., int32 scalars..., outputs...): q, k, v, seq_len, out.
    assert name == compiled.name == "clip_attention_fwd"
    assert len(params) == 5 and compiled.params == tuple(params)
    entry = compiled.ptx[compiled.ptx.index(".entry"):compiled.ptx.index(")")]
    assert [bool(re.search(r"\.u32", line)) for line in entry.split(",")] == [False, False, False, True, False]
    assert f".target sm_{sm[0]}{sm[1]}" in compiled.ptx
    assert 0 < compiled.shared_mem <= MAX_SHARED_MEM
    assert compiled.num_warps == 4 and compiled.block_m in (32, 64)


_PTX = """//
.version 8.8
.target sm_90a
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b32 \t%r1, [k_param_1];
\tld.param.b64 \t%rd2, [k_param_2];
\tret;
}
"""


def test_unused_hidden_scratch_parameters_are_dropped():
    fixed = drop_unused_trailing_params(_PTX, keep=3)
    assert ptx_entry(fixed) == ("k", ["k_param_0", "k_param_1", "k_param_2"])
    assert "ld.param.b64 \t%rd2, [k_param_2];" in fixed
    assert drop_unused_trailing_params(_PTX, keep=4) == _PTX


def test_a_read_hidden_parameter_is_an_error():
    used = _PTX.replace("\tret;", "\tld.param.b64 \t%rd3, [k_param_3];\n\tret;")
    with pytest.raises(ValueError, match="k_param_3"):
        drop_unused_trailing_params(used, keep=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8", "head_dim": 64, "scale": 0.1, "causal": False}, "dtype"),
    ({"dtype": "float16", "head_dim": 512, "scale": 0.1, "causal": False}, "head width"),
    ({"dtype": "float16", "head_dim": 64, "scale": 0.0, "causal": False}, "scale"),
])
def test_kernel_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelConfig(**kwargs)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 2e-2), ("float32", 2e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, dim", [(50, 64), (77, 64), (257, 80), (1, 64)])
def test_triton_attention_matches_torch_sdpa(dtype, tol, causal, seq, dim):
    import torch
    import torch.nn.functional as F

    from clipexport.trt.attention_kernel import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 12, seq, dim, device="cuda", dtype=getattr(torch, dtype)) for _ in range(3))
    got = attention(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert got.shape == q.shape and got.dtype == q.dtype
    err = (got.float() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max abs error {err}"


@pytest.mark.requires_cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_timing_against_sdpa(causal, capsys):
    import torch
    import torch.nn.functional as F

    from clipexport.trt.attention_kernel import attention

    q, k, v = (torch.randn(64, 16, 257, 64, device="cuda", dtype=torch.float16) for _ in range(3))

    def timed(fn) -> float:
        for _ in range(3):  # warm up (and compile)
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()  # GPU work is asynchronous: time it only after it finished
        return (time.perf_counter() - start) / 20

    ours = timed(lambda: attention(q, k, v, causal=causal))
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    with capsys.disabled():
        print(f"\n[attention timing] B64 H16 S257 D64 fp16 causal={causal}: triton {ours * 1e3:.3f} ms, "
              f"sdpa {sdpa * 1e3:.3f} ms, ratio {ours / sdpa:.2f}x ({torch.cuda.get_device_name()})")
    assert ours > 0 and sdpa > 0
