"""fxprune: compile any PyTorch model to a hard multiply-accumulate (MAC) budget."""

from __future__ import annotations

from fxprune.errors import (
    BandUnreachableError,
    BenchmarkError,
    BudgetUnreachableError,
    ConfigError,
    DataError,
    ExportError,
    FxpruneError,
    InvalidBudgetError,
    LLMError,
    ModelSpecError,
    PassError,
    PolicyError,
    SerializationError,
    TraceError,
)

__version__ = "0.1.0"

from fxprune._compile import CompileResult, compile  # noqa: E402
from fxprune.capture import capture  # noqa: E402
from fxprune.counting import MacProfile, count_macs, profile_macs  # noqa: E402


def save(model, path, **kwargs):
    """Save a (pruned) model so it loads without its original Python class; see ``fxprune.serialization``."""
    from fxprune.serialization import save as _save

    return _save(model, path, **kwargs)


def load(path, **kwargs):
    """Load a model written by :func:`save` (no pickle is ever unpickled)."""
    from fxprune.serialization import load as _load

    return _load(path, **kwargs)


# Imported eagerly, not wrapped: importing the submodule ``fxprune.finetune`` sets the package
# attribute of the same name to the module, which would shadow a lazy wrapper after first use.
from fxprune.finetune import FinetuneResult, finetune  # noqa: E402

__all__ = [
    "__version__",
    "compile",
    "CompileResult",
    "count_macs",
    "profile_macs",
    "MacProfile",
    "capture",
    "save",
    "load",
    "finetune",
    "FinetuneResult",
    "FxpruneError",
    "TraceError",
    "InvalidBudgetError",
    "BudgetUnreachableError",
    "BandUnreachableError",
    "PassError",
    "PolicyError",
    "ExportError",
    "BenchmarkError",
    "ConfigError",
    "DataError",
    "LLMError",
    "ModelSpecError",
    "SerializationError",
]
