"""The fxprune exception tree.

Every error fxprune raises on purpose is an :class:`FxpruneError`. A message says what failed,
where (fx node, module path, file), why, and what the user can do next. Errors that are also a
standard Python category subclass it too (``InvalidBudgetError`` is a ``ValueError``), so callers
that already catch the builtin keep working.
"""

from __future__ import annotations

__all__ = [
    "FxpruneError",
    "TraceError",
    "InvalidBudgetError",
    "BudgetUnreachableError",
    "BandUnreachableError",
    "PassError",
    "PreconditionError",
    "PostconditionError",
    "PolicyError",
    "ExportError",
    "BenchmarkError",
    "DataError",
    "LLMError",
    "ModelSpecError",
    "SerializationError",
]


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be captured as a torch.fx graph.

    Attributes:
        module_path: dotted path of the module whose forward failed ("" for the top level).
        construct: short description of the construct that failed (e.g. "data-dependent control flow").
    """

    def __init__(self, message: str, *, module_path: str = "", construct: str = ""):
        super().__init__(message)
        self.module_path = module_path
        self.construct = construct


class InvalidBudgetError(FxpruneError, ValueError):
    """A MAC or latency budget that fxprune does not understand."""


class BudgetUnreachableError(FxpruneError):
    """The budget is below the smallest model fxprune can build under the constraints.

    Attributes:
        min_macs: MACs of the smallest reachable model (every prunable group at its minimum keep).
        budget: the requested budget in MACs.
    """

    def __init__(self, message: str, *, min_macs: int, budget: float):
        super().__init__(message)
        self.min_macs = int(min_macs)
        self.budget = budget


class BandUnreachableError(FxpruneError):
    """No plan lands in the tolerance band: the allowed keep counts are too coarse for it.

    Attributes:
        best_macs: the largest achievable MACs at or below the budget.
        budget / lower: the band.
        needed_tolerance: the tolerance that ``best_macs`` would satisfy.
    """

    def __init__(self, message: str, *, best_macs: int, budget: int, lower: int):
        super().__init__(message)
        self.best_macs = int(best_macs)
        self.budget = int(budget)
        self.lower = int(lower)
        self.needed_tolerance = 1.0 - best_macs / budget if budget else 1.0


class PassError(FxpruneError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class PreconditionError(PassError):
    """A pass was given a graph it cannot work on."""


class PostconditionError(PassError):
    """A pass produced a graph that breaks an invariant it promised."""


class PolicyError(FxpruneError):
    """A ratio-selection policy failed or returned an invalid plan."""


class ExportError(FxpruneError):
    """ONNX export, checking or parity failed."""


class BenchmarkError(FxpruneError):
    """A latency benchmark could not run (missing file, bad model, unavailable provider, ...)."""


class ConfigError(FxpruneError, ValueError):
    """An option value fxprune does not understand (unknown criterion, metric, epochs < 1, ...)."""


class DataError(FxpruneError, ValueError):
    """Calibration or training data that does not fit the model."""


class LLMError(FxpruneError):
    """The LLM analyst failed in a way the caller asked to see (normally it falls back instead)."""


class ModelSpecError(FxpruneError, ValueError):
    """A command-line model spec (``torchvision:NAME``, ``timm:NAME``, ``file.py:factory``) is invalid."""


class SerializationError(FxpruneError):
    """A saved fxprune model could not be written or read."""
