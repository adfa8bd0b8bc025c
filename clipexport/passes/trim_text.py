"""Exact text-length trimming: the text graph's token ids have a dynamic 'sequence' axis.

The trimmable text tower (models/towers.py) slices its positional embedding and causal
mask to the input length at export; this pass checks the result: token ids typed as
integers with shape [batch, sequence]. (Parity then runs trimmed ids against the full
77-token reference, which is the real test of exactness.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from clipexport.errors import PassError

if TYPE_CHECKING:
    from clipexport.passes import PassConfig

SEQUENCE_AXIS = "sequence"
_INTEGER_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def trim_text(model: onnx.ModelProto, cfg: PassConfig) -> onnx.ModelProto:
    """Validate the dynamic sequence axis of a trimmable text graph; other graphs pass through."""
    if cfg.tower != "text" or not cfg.trim_text:
        return model
    (ids,) = model.graph.input
    tensor = ids.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    # The batch axis is "batch", or a fixed size when the build asked for a fixed batch (MIN == MAX).
    if len(dims) != 2 or dims[1] != SEQUENCE_AXIS or not (dims[0] == "batch" or isinstance(dims[0], int)):
        raise PassError(f"trimmable text graph: token ids have shape {dims}, expected ['batch', '{SEQUENCE_AXIS}']")
    if tensor.elem_type not in _INTEGER_TYPES:
        raise PassError("trimmable text graph: token ids are not integers")
    return model
