"""Per-architecture export recipes: TOML files loaded into frozen, validated dataclasses.

A recipe says, for one architecture family: the towers' input/output names, dtypes and
shapes, the dynamic batch range, the ONNX opset and attention lowering, what stays fp32
in fp16/bf16 graphs, what int8/fp8 quantizes, and the parity tolerance per precision.
An unknown or missing key is an error that names the file and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tomllib

from clipexport.errors import RecipeError, UnsupportedModelError, UsageError
from clipexport.manifest import MAX_BATCH
from clipexport.models.architecture import HF_TEXT, Families

TOWERS = ("image", "text")
INPUT_DTYPES = ("float32", "int64", "int32")
# Symbolic dimensions a recipe may use in an input shape; resolved from the model config.
SHAPE_SYMBOLS = ("batch", "image_size", "context_length")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# How attention blocks are lowered: "onnx" = one ONNX Attention node per block (opset >= 23),
# "none" = plain MatMul/Softmax/MatMul.
ATTENTION_LOWERINGS = ("onnx", "none")


@dataclass(frozen=True)
class BatchRange:
    """Dynamic batch range of a tower: TensorRT's min/opt/max profile, ONNX's dynamic axis bounds."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 1:
            raise UsageError(f"batch range {self}: the smallest batch must be at least 1")
        if not self.min <= self.opt <= self.max:
            raise UsageError(f"batch range {self}: need MIN <= OPT <= MAX")
        if self.max > MAX_BATCH:
            raise UsageError(f"batch range {self}: the largest batch clipexport builds is {MAX_BATCH}, since every "
                             "build verifies parity at its MAX batch; use a MAX of at most that")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """Parse `MIN:OPT:MAX`, e.g. `1:8:64`."""
        parts = text.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"--batch {text!r}: expected MIN:OPT:MAX with three whole numbers, e.g. 1:8:64")
        lo, opt, hi = (int(p) for p in parts)
        return cls(lo, opt, hi)


@dataclass(frozen=True)
class TowerSpec:
    """Input and output of one tower as the ONNX graph exposes them."""

    input_name: str
    input_dtype: str
    input_shape: tuple[str | int, ...]
    output_name: str
    # Text only: export token ids as [batch, sequence] so the runtime can trim after EOT,
    # where the model's pooling makes that exact (causal mask + argmax pooling).
    dynamic_sequence: bool = False


@dataclass(frozen=True)
class Tolerance:
    """Parity bounds against the fp32 PyTorch reference, per embedding."""

    cosine_min: float
    max_rel_err: float
    # Fraction of zero-shot top-1 choices the candidate must share with the reference (None: not checked).
    top1_agreement_min: float | None = None


@dataclass(frozen=True)
class PrecisionSpec:
    """fp16/bf16 policy: which ops keep fp32 arithmetic."""

    keep_fp32_ops: tuple[str, ...]
    keep_final_projection: bool
    fp16_headroom: float  # keep a node fp32 when calibration saw |x| > 65504 / headroom


@dataclass(frozen=True)
class QuantizeSpec:
    """int8/fp8 policy: what gets Q/DQ, and the calibration set size."""

    op_types: tuple[str, ...]
    quantize_embedding: bool
    keep_final_projection: bool
    activation_quantile: float
    calibration_size: int


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    summary: str
    # A recipe may cover several image families when nothing else differs (hf_text: ViT or timm).
    image_families: tuple[str, ...]
    text_family: str
    opset: int
    attention: str
    batch: BatchRange
    towers: Mapping[str, TowerSpec]
    parity_batch_sizes: tuple[int, ...]
    tolerances: Mapping[str, Tolerance]
    precision: PrecisionSpec
    quantize: QuantizeSpec
    # Whether the model may (True) or may not (False) also have CoCa's multimodal caption decoder,
    # which is never exported: (False,) for plain CLIPs; (True,) for recipes/coca.toml.
    multimodal: tuple[bool, ...] = (False,)

    @property
    def image_family(self) -> str:
        """The image families as one display string, e.g. `vision-transformer|timm`."""
        return "|".join(self.image_families)

    def covers(self, families: Families) -> bool:
        return (
            families.multimodal in self.multimodal
            and families.image in self.image_families
            and families.text == self.text_family
        )

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return self.tolerances[precision]
        except KeyError:
            known = ", ".join(sorted(self.tolerances))
            raise RecipeError(
                f"recipe {self.name!r} ({self.path}) has no parity tolerance for {precision!r}; it has: {known}"
            ) from None


class _Table:
    """A TOML table that remembers which keys were read, so leftovers can be reported."""

    def __init__(self, data: Mapping[str, Any], path: Path, where: str) -> None:
        self.data, self.path, self.where = data, path, where
        self.seen: set[str] = set()

    def _err(self, msg: str) -> RecipeError:
        return RecipeError(f"{self.path}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        self.seen.add(key)
        full = f"{self.where}{key}"
        if key not in self.data:
            raise self._err(f"missing key {full!r}")
        value = self.data[key]
        # bool is an int in Python; a recipe saying `opset = true` is a mistake.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self._err(f"key {full!r} must not be a boolean")
        if not isinstance(value, kind):
            raise self._err(f"key {full!r} has type {type(value).__name__}, expected {_type_names(kind)}")
        return value

    def table(self, key: str) -> _Table:
        return _Table(self.get(key, dict), self.path, f"{self.where}{key}.")

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise self._err(f"unknown key '{self.where}{extra[0]}'")


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _tower(table: _Table) -> TowerSpec:
    dtype = table.get("input_dtype", str)
    if dtype not in INPUT_DTYPES:
        raise table._err(f"{table.where}input_dtype {dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
    shape = table.get("input_shape", list)
    for dim in shape:
        if isinstance(dim, bool) or not (
            (isinstance(dim, int) and dim > 0) or (isinstance(dim, str) and dim in SHAPE_SYMBOLS)
        ):
            raise table._err(
                f"{table.where}input_shape entry {dim!r} must be a positive integer or one of {SHAPE_SYMBOLS}"
            )
    if not shape or shape[0] != "batch":
        raise table._err(f"{table.where}input_shape must start with 'batch' (the dynamic axis)")
    dynamic_sequence = table.get("dynamic_sequence", bool) if "dynamic_sequence" in table.data else False
    if dynamic_sequence and (table.where != "towers.text." or list(shape) != ["batch", "context_length"]):
        raise table._err(f"{table.where}dynamic_sequence needs the text tower with input_shape [batch, context_length]")
    spec = TowerSpec(
        input_name=table.get("input_name", str),
        input_dtype=dtype,
        input_shape=tuple(shape),
        output_name=table.get("output_name", str),
        dynamic_sequence=dynamic_sequence,
    )
    table.done()
    return spec


def load_recipe(path: Path) -> Recipe:
    """Load and validate one recipe file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    top = _Table(data, path, "")
    match = top.table("match")
    export = top.table("export")
    batch = top.table("batch")
    towers = top.table("towers")
    parity = top.table("parity")
    tolerance = parity.table("tolerance")

    try:
        batch_range = BatchRange(batch.get("min", int), batch.get("opt", int), batch.get("max", int))
    except UsageError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    batch.done()

    tower_specs = {}
    for name in towers.data:
        if name not in TOWERS:
            raise RecipeError(f"{path}: unknown tower 'towers.{name}' (known: {', '.join(TOWERS)})")
        tower_specs[name] = _tower(towers.table(name))
    towers.done()

    tolerances = {}
    for precision in tolerance.data:
        if precision not in PRECISIONS:
            raise RecipeError(f"{path}: unknown precision 'parity.tolerance.{precision}' (known: {', '.join(PRECISIONS)})")
        t = tolerance.table(precision)
        cosine = float(t.get("cosine_min", (float, int)))
        rel = float(t.get("max_rel_err", (float, int)))
        if not 0.0 < cosine <= 1.0 or rel <= 0:
            raise RecipeError(f"{path}: parity.tolerance.{precision} needs 0 < cosine_min <= 1 and max_rel_err > 0")
        top1 = float(t.get("top1_agreement_min", (float, int))) if "top1_agreement_min" in t.data else None
        if top1 is not None and not 0.0 < top1 <= 1.0:
            raise RecipeError(f"{path}: parity.tolerance.{precision}.top1_agreement_min must be in (0, 1]")
        tolerances[precision] = Tolerance(cosine_min=cosine, max_rel_err=rel, top1_agreement_min=top1)
        t.done()
    if "fp32" not in tolerances:
        raise RecipeError(f"{path}: missing key 'parity.tolerance.fp32'")
    tolerance.done()

    batch_sizes = parity.get("batch_sizes", list)
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
        raise RecipeError(f"{path}: parity.batch_sizes must be a non-empty list of positive integers")
    parity.done()

    opset = export.get("opset", int)
    if not 17 <= opset <= 23:
        raise RecipeError(f"{path}: export.opset {opset} is outside the supported range 17..23")
    attention = export.get("attention", str)
    if attention not in ATTENTION_LOWERINGS:
        raise RecipeError(f"{path}: export.attention {attention!r} is not one of {', '.join(ATTENTION_LOWERINGS)}")
    if attention == "onnx" and opset < 23:
        raise RecipeError(f"{path}: export.attention 'onnx' needs export.opset >= 23 (ONNX Attention)")
    export.done()

    prec = top.table("precision")
    keep = prec.get("keep_fp32", list)
    if not all(isinstance(op, str) and op for op in keep):
        raise RecipeError(f"{path}: precision.keep_fp32 must be a list of ONNX op types")
    headroom = float(prec.get("fp16_headroom", (float, int)))
    if headroom < 1.0:
        raise RecipeError(f"{path}: precision.fp16_headroom must be >= 1")
    precision_spec = PrecisionSpec(tuple(keep), prec.get("keep_final_projection", bool), headroom)
    prec.done()

    quant = top.table("quantize")
    op_types = quant.get("op_types", list)
    if not op_types or not set(op_types) <= {"MatMul", "Gemm", "Conv"}:
        raise RecipeError(f"{path}: quantize.op_types must be a non-empty subset of MatMul, Gemm, Conv")
    quantile = float(quant.get("activation_quantile", (float, int)))
    size = quant.get("calibration_size", int)
    if not 0.9 <= quantile <= 1.0 or size < 1:
        raise RecipeError(f"{path}: quantize needs 0.9 <= activation_quantile <= 1 and calibration_size >= 1")
    quantize_spec = QuantizeSpec(tuple(op_types), quant.get("embedding", bool),
                                 quant.get("keep_final_projection", bool), quantile, size)
    quant.done()

    recipe = Recipe(
        name=top.get("name", str),
        path=path,
        summary=top.get("summary", str),
        image_families=_image_families(match),
        text_family=match.get("text", str),
        opset=opset,
        attention=attention,
        batch=batch_range,
        towers=tower_specs,
        parity_batch_sizes=tuple(batch_sizes),
        tolerances=tolerances,
        precision=precision_spec,
        quantize=quantize_spec,
        multimodal=_multimodal(match),
    )
    match.done()
    top.done()
    if recipe.name != path.stem:
        raise RecipeError(f"{path}: recipe name {recipe.name!r} must equal the file name {path.stem!r}")
    return recipe


def _image_families(match: _Table) -> tuple[str, ...]:
    """`match.image`: one family name, or a non-empty list of them."""
    value = match.get("image", (str, list))
    names = [value] if isinstance(value, str) else value
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise match._err("match.image must be a family name or a non-empty list of distinct family names")
    return tuple(names)


def _multimodal(match: _Table) -> tuple[bool, ...]:
    """`match.multimodal`: true, false, or [false, true] (both); absent: false."""
    if "multimodal" not in match.data:
        return (False,)
    value = match.get("multimodal", (bool, list))
    values = [value] if isinstance(value, bool) else value
    if not values or not all(isinstance(v, bool) for v in values) or len(set(values)) != len(values):
        raise match._err("match.multimodal must be true, false or [false, true]")
    return tuple(values)


def recipes_dir() -> Path:
    """Where the recipe files are: inside an installed wheel, or at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"no recipes directory found next to {here} (looked for _recipes/ and ../recipes/)")


@cache
def load_recipes(directory: Path | None = None) -> dict[str, Recipe]:
    """All recipes of a directory, by name. Two recipes for the same families is an error."""
    directory = directory or recipes_dir()
    recipes: dict[str, Recipe] = {}
    for path in sorted(directory.glob("*.toml")):
        recipe = load_recipe(path)
        for other in recipes.values():
            if (other.text_family == recipe.text_family and set(other.multimodal) & set(recipe.multimodal)
                    and set(other.image_families) & set(recipe.image_families)):
                raise RecipeError(f"{path}: recipes {other.name!r} and {recipe.name!r} match the same families")
        recipes[recipe.name] = recipe
    if not recipes:
        raise RecipeError(f"no recipe files (*.toml) in {directory}")
    return recipes


def recipe_for(families: Families, model: str, directory: Path | None = None) -> Recipe:
    """The one recipe covering a model's families, or an UnsupportedModelError saying why none does."""
    recipes = load_recipes(directory)
    for recipe in recipes.values():
        if recipe.covers(families):
            return recipe
    supported = ", ".join(f"{r.name} ({r.image_family} + {r.text_family})" for r in recipes.values())
    raise UnsupportedModelError(
        f"{model}: unsupported: {unsupported_reason(families)}. Recipes cover: {supported}. "
        "Run `clipexport list` to see every supported model."
    )


def unsupported_reason(families: Families) -> str:
    """One line saying why no recipe covers these families."""
    if families.multimodal:
        return (f"CoCa with a {families.image} image tower and a {families.text} text tower: no recipe covers "
                "this pair yet (recipes coca and hf_text cover CoCa on the open_clip ViT)")
    parts = []
    if families.text == HF_TEXT:
        parts.append("its text tower is a Hugging Face transformer")
    elif families.hf_tokenizer:
        # recipes/hf_tokenizer_text.toml covers ViT and timm image towers with this text tower
        parts.append(f"its {families.image} image tower with a text tower reading the Hugging Face tokenizer "
                     f"{families.hf_tokenizer!r}")
    detail = " and ".join(parts) or f"no recipe matches {families.describe()}"
    return f"{detail}; no recipe covers this family yet"
