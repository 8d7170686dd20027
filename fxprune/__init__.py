"""fxprune: compile any PyTorch model to a hard multiply-accumulate (MAC) budget."""

from __future__ import annotations

from fxprune.errors import (
    BenchmarkError,
    BudgetUnreachableError,
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

__all__ = [
    "__version__",
    "FxpruneError",
    "TraceError",
    "InvalidBudgetError",
    "BudgetUnreachableError",
    "PassError",
    "PolicyError",
    "ExportError",
    "BenchmarkError",
    "DataError",
    "LLMError",
    "ModelSpecError",
    "SerializationError",
]
