"""Will a build fit in this machine's memory? Decided before any weight is loaded.

A build that runs out of memory is killed by the kernel minutes in, with no message. The tower
sizes are known up front (counted on the meta device), and so is the least memory each way of
building must hold at once; when even that exceeds what the machine has free, the build is
refused with the figures and the way out. The bounds are deliberately low (what the build
measured on this project's machines is 1.2x to 3x higher), so a build that could fit is never
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipexport.errors import InsufficientMemoryError

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MemoryNeed:
    least_bytes: int
    why: str  # which weights must be resident at once, in words


def least_memory(parameters: dict[str, int], towers: tuple[str, ...], large_tower_bytes: int,
                 per_tower: bool) -> MemoryNeed:
    """The least memory a fp32 build of `towers` holds at its peak, from the towers' parameter counts.

    - one tower at a time (a built-in CLIP with a large tower): that tower's weights, which stay in
      PyTorch until its reference outputs are taken, and then ONNX Runtime's copy (the tower is freed
      between the two): at least the largest tower.
    - loaded whole with a large tower (timm, Hugging Face text): the whole model stays in PyTorch while
      ONNX Runtime loads the large tower's external data.
    - loaded whole (every tower under the large-tower size): PyTorch's model, the ONNX graph held in
      memory with its weights, and ONNX Runtime's session of the tower being verified.
    """
    weights = {t: 4 * parameters[t] for t in towers}
    total = 4 * sum(parameters.values())  # PyTorch holds every tower of a model loaded whole
    largest = max(weights.values())
    gb = 1e9
    if per_tower:
        return MemoryNeed(largest, f"one tower at a time; the largest holds {largest / gb:.1f} GB of fp32 weights")
    large = [w for w in weights.values() if w > large_tower_bytes]
    if large:
        need = total + max(large)
        return MemoryNeed(need, f"the model loads whole, {total / gb:.1f} GB of fp32 weights, while ONNX Runtime "
                                f"loads a {max(large) / gb:.1f} GB tower; this model class is not built tower by tower")
    need = total + 2 * largest
    return MemoryNeed(need, f"{total / gb:.1f} GB of fp32 weights in PyTorch, and the largest tower "
                            f"({largest / gb:.1f} GB) once in its ONNX graph and once in ONNX Runtime")


def available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """Memory a new build can use now (MemAvailable plus free swap); None where /proc/meminfo is missing."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        kib = int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])
    except (OSError, KeyError, ValueError):
        return None
    return kib * 1024


def check_fits(name: str, need: MemoryNeed, available: int | None) -> None:
    """Refuse, in one line, a build whose least memory exceeds what is available."""
    if available is None or need.least_bytes <= available:
        return
    raise InsufficientMemoryError(
        f"{name}: this build needs at least {need.least_bytes / 1e9:.1f} GB of memory ({need.why}), and this "
        f"machine has {available / 1e9:.1f} GB available; build it on a machine with more memory, or pass "
        "--no-memory-check to try anyway.")
