"""One error hierarchy: everything a user can cause is a ClipExportError.

The CLI prints these as one line without a traceback and exits with status 1;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ClipExportError(Exception):
    """Base class of every error caused by input, environment or data (not by a bug)."""


class UsageError(ClipExportError):
    """Bad arguments: a batch range, an output directory that exists, an unknown option value."""


class InsufficientMemoryError(UsageError):
    """A build that cannot fit this machine's memory, refused before anything loads."""


class RecipeError(ClipExportError):
    """A recipe file is malformed, or no recipe covers a model."""


class UnknownModelError(ClipExportError):
    """A model name that open_clip does not know."""


class UnsupportedModelError(ClipExportError):
    """A model open_clip knows but no clipexport recipe covers (yet)."""


class WeightsError(ClipExportError):
    """Weights cannot be had: offline download, missing/corrupt checkpoint, wrong architecture."""


class ExportError(ClipExportError):
    """torch.onnx could not export a tower."""


class ParityError(ClipExportError):
    """An exported tower does not match the PyTorch reference within the recipe's tolerance."""


class ArtifactError(ClipExportError):
    """An artifact directory is missing files, or a file does not match its manifest."""


class InputError(ClipExportError):
    """An image or text given to the runtime cannot be used: unreadable, truncated, too large, wrong type."""


class BackendUnavailableError(ClipExportError):
    """A requested backend (TensorRT, a CUDA GPU) is not installed or not usable here."""


class EngineError(ClipExportError):
    """A TensorRT engine cannot be built, or a stored engine does not fit this machine/graph."""


class PassError(ClipExportError):
    """A graph pass could not do what the build asked: a fusion that matched fewer blocks than
    the model has, a precision or quantization that produced an invalid graph."""
