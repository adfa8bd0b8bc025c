"""Our attention kernel, in Triton: softmax(scale * Q Kᵀ [+ causal mask]) V in one pass.

Used two ways:
  * ahead of time: `compile_attention` turns it into PTX for one GPU architecture; the
    TensorRT plugin (clipexport.trt.plugin) hands that PTX to TensorRT, which bakes it
    into the engine, so the engine runs without Python or Triton;
  * directly from PyTorch: `attention(q, k, v)` launches it on CUDA tensors (tests, parity
    against torch.nn.functional.scaled_dot_product_attention).

Layout: Q, K, V and the output are contiguous [B, H, S, D] (batch, heads, tokens, head
width), all the same dtype (fp32, fp16 or bf16). Softmax runs in fp32 with the running
max/sum of the online ("flash") formulation, so no S x S matrix is ever stored.

Importing this module needs Triton but not a GPU: compiling for an explicit target works
on any machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Triton names element types like this in kernel signatures.
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
KERNEL_NAME = "clip_attention_fwd"
MAX_SHARED_MEM = 48 * 1024  # bytes a kernel may use without an opt-in attribute


@triton.jit
def clip_attention_fwd(  # type: ignore[no-untyped-def]  # Triton kernel: types are tl.constexpr / pointers
    q_ptr, k_ptr, v_ptr, seq_len, o_ptr,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # Argument order is the AOT plugin contract: inputs, then int32 scalars, then outputs.
    # grid: (cdiv(S, BLOCK_M), B * H); one program = BLOCK_M query rows of one (batch, head).
    start_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    base = head * seq_len * HEAD_DIM
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM  # head widths like 80 or 104 are padded to a power of two

    q = tl.load(q_ptr + base + rows[:, None] * HEAD_DIM + dims[None, :],
                mask=(rows[:, None] < seq_len) & dim_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = SCALE * 1.4426950408889634  # exp2 is cheaper than exp: fold log2(e) into the scale

    if CAUSAL:
        hi = tl.minimum(seq_len, (start_m + 1) * BLOCK_M)  # later keys are masked for every row here
    else:
        hi = seq_len
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + cols0
        kt = tl.load(k_ptr + base + cols[None, :] * HEAD_DIM + dims[:, None],
                     mask=(cols[None, :] < seq_len) & dim_ok[:, None], other=0.0)
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        valid = cols[None, :] < seq_len
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        # Every row sees key 0, so each row's max is finite after the first block (no NaN).
        qk = tl.where(valid, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + base + cols[:, None] * HEAD_DIM + dims[None, :],
                    mask=(cols[:, None] < seq_len) & dim_ok[None, :], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + base + rows[:, None] * HEAD_DIM + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < seq_len) & dim_ok[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """Everything baked into one compiled kernel (Triton constexprs)."""

    dtype: str  # "float32", "float16" or "bfloat16"
    head_dim: int
    scale: float
    causal: bool

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"attention kernel dtype {self.dtype!r}: expected one of {sorted(TRITON_DTYPES)}")
        if not 1 <= self.head_dim <= 256:
            raise ValueError(f"attention kernel head width {self.head_dim} is outside 1..256")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"attention scale {self.scale} must be a positive finite number")

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))  # tl.dot needs >= 16

    # Tiles are sized to stay under 48 KiB of shared memory (measured with Triton 3.8 for
    # sm_90: fp32 D<=128 36 KiB, 16-bit D<=128 24 KiB): above that a launch must opt in to
    # more, which a TensorRT AOT plugin cannot ask for.
    @property
    def block_m(self) -> int:
        return 32 if self.dtype == "float32" else 64

    @property
    def block_n(self) -> int:
        return 64 if self.block_d <= 64 and self.dtype != "float32" else 32

    @property
    def num_stages(self) -> int:
        return 1 if self.dtype == "float32" else 2

    @property
    def num_warps(self) -> int:
        return 4

    def constexprs(self) -> dict[str, Any]:
        return {
            "SCALE": float(self.scale), "CAUSAL": bool(self.causal), "HEAD_DIM": self.head_dim,
            "BLOCK_D": self.block_d, "BLOCK_M": self.block_m, "BLOCK_N": self.block_n,
            "IEEE_DOT": self.dtype == "float32",  # fp32 graphs must not silently get TF32 products
        }


def default_scale(head_dim: int) -> float:
    """1/sqrt(D), ONNX Attention's and PyTorch SDPA's default."""
    return 1.0 / math.sqrt(head_dim)


@dataclass(frozen=True)
class CompiledAttention:
    name: str  # the PTX entry's name
    ptx: str
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory per block
    block_m: int
    params: tuple[str, ...]  # the PTX entry's parameter names, in order


_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\((.*?)\)", re.DOTALL)
_PARAM = re.compile(r"\.param\s+[^,]*?([A-Za-z_$][\w$]*)\s*(?:,|$)")


def ptx_entry(ptx: str) -> tuple[str, list[str]]:
    """Name and parameter names of the one kernel entry in a PTX module."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise ValueError(f"expected one .entry in the PTX, found {len(entries)}")
    name, params = entries[0]
    return name, [m.group(1) for m in _PARAM.finditer(params.strip())]


def drop_unused_trailing_params(ptx: str, keep: int) -> str:
    """Remove parameters after the first `keep` when the kernel body never reads them.

    Triton (3.3+) appends hidden `global_scratch` / `profile_scratch` pointers to every
    kernel. TensorRT's AOT plugin path launches with exactly inputs + scalars + outputs,
    so a kernel declaring two more parameters would read past the argument array. When
    the kernel needs no scratch the pointers are never read and can be dropped safely;
    if one is read, that is an error, not a silent launch with garbage.
    """
    name, params = ptx_entry(ptx)
    extra = params[keep:]
    if not extra:
        return ptx
    body = ptx[ptx.index(name):]
    body = body[body.index(")") + 1:]
    used = [p for p in extra if re.search(rf"\[{re.escape(p)}\]|\b{re.escape(p)}\b", body)]
    if used:
        raise ValueError(f"kernel {name} reads its hidden parameters {used}; it needs Triton scratch memory, "
                         "which TensorRT's AOT plugins do not provide")
    head, rest = ptx.split(f"{name}(", 1)
    plist, tail = rest.split(")", 1)
    kept = [line for line in plist.split(",") if not any(re.search(rf"\b{re.escape(p)}\s*$", line.strip())
                                                          for p in extra)]
    return f"{head}{name}(" + ",".join(kept).rstrip() + "\n)" + tail


def compile_attention(config: KernelConfig, compute_capability: tuple[int, int]) -> CompiledAttention:
    """PTX of the kernel for one configuration and one GPU architecture (no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    t = TRITON_DTYPES[config.dtype]
    signature = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "seq_len": "i32", "o_ptr": f"*{t}"}
    constexprs = config.constexprs()
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=clip_attention_fwd, signature=signature, constexprs=constexprs)
    major, minor = compute_capability
    compiled = triton.compile(source, target=GPUTarget("cuda", major * 10 + minor, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(meta, scratch, 0) or 0) != 0:
            raise ValueError(f"the attention kernel needs Triton {scratch.replace('_size', '')} memory; "
                             "TensorRT AOT plugins cannot provide it")
    if int(meta.shared) > MAX_SHARED_MEM:
        raise ValueError(f"the attention kernel for {config} needs {meta.shared} bytes of shared memory "
                         f"(limit {MAX_SHARED_MEM})")
    ptx = drop_unused_trailing_params(compiled.asm["ptx"], keep=5)
    name, params = ptx_entry(ptx)
    return CompiledAttention(name=name, ptx=ptx, num_warps=int(meta.num_warps), shared_mem=int(meta.shared),
                             block_m=config.block_m, params=tuple(params))


def attention(q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None) -> Any:
    """Launch the kernel on CUDA tensors [B, H, S, D] (same dtype); returns a new tensor like q.

    The PyTorch twin of what the TensorRT plugin runs, for testing and timing.
    """
    import torch

    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one [B, H, S, D] shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k and v must have the same dtype")
    batch, heads, seq, dim = (int(s) for s in q.shape)
    config = KernelConfig(str(q.dtype).removeprefix("torch."), dim, scale or default_scale(dim), causal)
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    clip_attention_fwd[grid](q, k, v, seq, out, **config.constexprs(), num_warps=config.num_warps,
                             num_stages=config.num_stages)
    return out
