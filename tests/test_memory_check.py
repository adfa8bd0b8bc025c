"""A build that cannot fit in memory is refused up front, in one line, before any weight loads.

The parameter counts come from the meta device; they must equal the real model's, and the
least-memory bound of each loading path must add up as documented in clipexport/memory.py.
"""

from __future__ import annotations

import open_clip
import pytest
from click.testing import CliRunner

from clipexport import memory
from clipexport.build import LARGE_TOWER_BYTES, BuildOptions, plan_build
from clipexport.cli import cli
from clipexport.errors import InsufficientMemoryError
from clipexport.models.open_clip_source import canonical_name, load_reference, model_config
from clipexport.models.per_tower import count_parameters


@pytest.mark.parametrize("recipe", ["vit", "timm", "hf_text", "modified_resnet"])
def test_meta_device_counts_equal_the_real_models_parameters(twin, recipe):
    name = canonical_name(twin(recipe))
    counted = count_parameters(name, model_config(name))
    model = load_reference(name, "none", seed=0).model
    image = sum(p.numel() for p in model.visual.parameters())
    assert counted == {"image": image, "text": sum(p.numel() for p in model.parameters()) - image}
    assert counted["image"] > 0 and counted["text"] > 0


def test_least_memory_of_each_loading_path():
    params = {"image": 1_000_000_000, "text": 250_000_000}  # 4.0 GB + 1.0 GB of fp32 weights
    towers = ("image", "text")
    per_tower = memory.least_memory(params, towers, LARGE_TOWER_BYTES, per_tower=True)
    assert per_tower.least_bytes == 4_000_000_000 and "one tower at a time" in per_tower.why
    whole_large = memory.least_memory(params, towers, LARGE_TOWER_BYTES, per_tower=False)
    assert whole_large.least_bytes == 5_000_000_000 + 4_000_000_000
    small = {"image": 100_000_000, "text": 50_000_000}
    assert memory.least_memory(small, towers, LARGE_TOWER_BYTES, False).least_bytes == 600_000_000 + 2 * 400_000_000
    # only the text tower asked for: PyTorch still holds the whole model, ONNX Runtime only the text tower
    assert memory.least_memory(small, ("text",), LARGE_TOWER_BYTES, False).least_bytes == 600_000_000 + 2 * 200_000_000


def test_available_memory_reads_meminfo_and_counts_free_swap(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nSwapFree:        1000000 kB\n")
    assert memory.available_bytes(meminfo) == 21_000_000 * 1024
    assert memory.available_bytes(tmp_path / "missing") is None
    assert 0 < memory.available_bytes() < 10**15  # this machine's own


def test_plan_refuses_a_build_over_the_available_memory_on_a_simulated_small_machine(twin, tmp_path, monkeypatch):
    name = twin("vit")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)  # a machine with 1 kB free
    with pytest.raises(InsufficientMemoryError) as caught:
        plan_build(BuildOptions(model=name, pretrained="none", out=tmp_path / "out"))
    message = str(caught.value)
    assert "\n" not in message and "needs at least" in message and "--no-memory-check" in message
    assert not (tmp_path / "out").exists()
    plan_build(BuildOptions(model=name, pretrained="none", out=tmp_path / "out", memory_check=False))


def test_cli_refuses_a_model_that_cannot_fit_here_in_one_line(tmp_path):
    """EVA02-E-14 (timm image tower of 4.35 B parameters) loads whole: about 37 GB at least."""
    name = "EVA02-E-14"
    need = memory.least_memory(count_parameters(name, open_clip.get_model_config(name)), ("image", "text"),
                               LARGE_TOWER_BYTES, per_tower=False)
    available = memory.available_bytes()
    if available is None or available >= need.least_bytes:
        pytest.skip(f"this machine has {available} bytes free, enough for {name}'s least {need.least_bytes}")
    assert need.least_bytes > 35e9
    out = tmp_path / "eva"
    result = CliRunner().invoke(cli, ["build", name, "--pretrained", "none", "--out", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs at least" in lines[0] and "Traceback" not in result.output
    assert not out.exists()
