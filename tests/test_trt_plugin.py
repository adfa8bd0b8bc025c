"""The tensorrt.plugin registration of our attention plugin, driven through a fake
`tensorrt.plugin` module: what TensorRT would receive from register / autotune / aot_impl
(output description, PTX, launch grid, scalar arguments). The Triton compile is real."""

from __future__ import annotations

import inspect
import types

import pytest

from clipexport.errors import EngineError
from clipexport.trt import env, plugin
from clipexport.trt.attention_kernel import ptx_entry


class Sym:
    """A stand-in for tensorrt.plugin's symbolic ints (shape expressions)."""

    def __init__(self, value: int | str) -> None:
        self.value = value

    @property
    def is_constant(self) -> bool:
        return isinstance(self.value, int)

    @property
    def constant_value(self) -> int:
        assert isinstance(self.value, int)
        return self.value

    def __mul__(self, other: Sym) -> Sym:
        return Sym(f"({self.value}*{other.value})")


class Desc:
    def __init__(self, shape: list[int | str], dtype: str) -> None:
        self.shape_expr = [Sym(d) for d in shape]
        self.dtype = dtype

    def like(self) -> Desc:
        return Desc([s.value for s in self.shape_expr], self.dtype)


def _fakes():
    captured: dict[str, object] = {}

    def deco(kind: str):
        def outer(plugin_id: str):
            def inner(fn):
                captured[kind] = (plugin_id, fn)
                return fn
            return inner
        return outer

    trtp = types.SimpleNamespace(
        TensorDesc=Desc, register=deco("register"), autotune=deco("autotune"), aot_impl=deco("aot_impl"),
        AutoTuneCombination=lambda types_, layout: (types_, layout),
        KernelLaunchParams=types.SimpleNamespace,
        cdiv=lambda a, b: ("cdiv", a.value, b),
        SymInt32=lambda e: ("int32", e.value),
        SymIntExprs=types.SimpleNamespace(from_tuple=lambda items: list(items)),
    )
    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")
    return trt, trtp, captured


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(env, "cuda_gpu", lambda device=0: env.GpuInfo("fake H100", (9, 0)))
    trt, trtp, captured = _fakes()
    plugin._register(trt, trtp)
    return captured


def test_register_describes_tensors_and_attributes(registered):
    plugin_id, describe = registered["register"]
    assert plugin_id == "clipexport::clip_attention" == plugin.PLUGIN_ID
    sig = inspect.signature(describe)
    assert [p.annotation for p in sig.parameters.values()] == [Desc, Desc, Desc, float, int]
    assert sig.return_annotation is Desc
    out = describe(Desc(["B", 12, "S", 64], "f16"), None, None, 0.0, 1)
    assert [s.value for s in out.shape_expr] == ["B", 12, "S", 64] and out.dtype == "f16"
    assert registered["autotune"][1](None, None, None, None)[0][1] == "LINEAR"


@pytest.mark.parametrize("dtype, causal", [("f16", 1), ("f32", 0)])
def test_aot_impl_hands_tensorrt_ptx_grid_and_token_count(registered, dtype, causal):
    _, aot = registered["aot_impl"]
    q = Desc(["B", 12, "S", 64], dtype)
    name, ptx, launch, extra = aot(q, q, q, 0.0, causal, [q.like()])
    assert name == b"clip_attention_fwd" and ptx_entry(ptx.decode())[0] == "clip_attention_fwd"
    assert len(ptx_entry(ptx.decode())[1]) == 5 and b".target sm_90" in ptx
    block_m = 64 if dtype == "f16" else 32
    assert launch.grid_x == ("cdiv", "S", block_m) and launch.grid_y.value == "(B*12)"
    assert launch.block_x == 128 and 0 < launch.shared_mem <= 48 * 1024
    assert extra == [("int32", "S")]  # the kernel's one scalar: the token count, resolved per launch


def test_aot_impl_refuses_a_dynamic_head_width_and_other_dtypes(registered):
    _, aot = registered["aot_impl"]
    with pytest.raises(EngineError, match="head width"):
        q = Desc(["B", 12, "S", "D"], "f16")
        aot(q, q, q, 0.0, 0, [q])
    with pytest.raises(EngineError, match="fp32, fp16 and bf16"):
        q = Desc(["B", 12, "S", 64], "int8")
        aot(q, q, q, 0.0, 0, [q])


def test_registering_without_aot_plugins_is_a_clear_error(monkeypatch):
    from clipexport.errors import BackendUnavailableError

    fake = types.SimpleNamespace(__version__="10.8.0.43", Builder=object)
    monkeypatch.setattr(env, "load_tensorrt", lambda: fake)
    monkeypatch.setattr(env, "has_aot_python_plugins", lambda trt: False)
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(BackendUnavailableError, match="10.8.0.43 has no ahead-of-time Python plugins"):
        plugin.register_attention_plugin()
