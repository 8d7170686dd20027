"""Pass infrastructure: passes, results, analyses and the pass manager.

The IR is a ``torch.fx.GraphModule``. A *pass* is a callable ``(gm, am) -> PassResult``; it may
rewrite the graph in place and says which cached analyses it kept valid (LLVM's rule: by default
none are preserved). An *analysis* computes facts about a graph without changing it; the
:class:`AnalysisManager` caches analyses by their key (the analysis object, so an analysis with
options is a frozen dataclass whose instance is the key).

The pass manager runs passes in order, invalidates analyses, recompiles and lints the graph after
each pass that modified it, notifies instruments, and turns an exception inside a pass into a
:class:`~fxprune.errors.PassError` that names the pass and the passes that ran before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Protocol, Sequence

import torch.fx

from fxprune.errors import FxpruneError, PassError

__all__ = [
    "Pass",
    "PassResult",
    "Analysis",
    "AnalysisManager",
    "PassManager",
    "Instrument",
    "TimingInstrument",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    Attributes:
        gm: the (possibly new) graph module.
        modified: whether the graph or its parameters changed.
        preserved: analysis keys that are still valid after the pass. Ignored when
            ``modified`` is False (then everything is preserved).
        info: a small, JSON-friendly summary for reports (counts, notes).
    """

    gm: torch.fx.GraphModule
    modified: bool
    preserved: frozenset = frozenset()
    info: dict[str, Any] = field(default_factory=dict)


class Analysis(Protocol):
    """An analysis: hashable, and ``run(gm, am)`` returns its result without mutating ``gm``."""

    def run(self, gm: torch.fx.GraphModule, am: "AnalysisManager") -> Any:
        ...


class AnalysisManager:
    """Caches analysis results for one graph module."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._cache: dict[Any, Any] = {}

    def get(self, analysis: Any) -> Any:
        """Return the cached result of ``analysis`` or compute and cache it."""
        if analysis not in self._cache:
            start = time.perf_counter()
            self._cache[analysis] = analysis.run(self.gm, self)
            logger.debug("analysis %s took %.3fs", type(analysis).__name__, time.perf_counter() - start)
        return self._cache[analysis]

    def cached(self, analysis: Any) -> Any | None:
        """Peek at a cached result without computing it."""
        return self._cache.get(analysis)

    def invalidate(self, preserved: Iterable[Any] = ()) -> None:
        keep = set(preserved)
        self._cache = {k: v for k, v in self._cache.items() if k in keep}

    def reset(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self._cache.clear()


class Pass:
    """Base class of graph passes: subclasses set ``name`` and implement ``call``.

    ``requires`` and ``ensures`` may raise ``PreconditionError`` / ``PostconditionError``.
    Options are dataclass fields on the subclass.
    """

    name: ClassVar[str] = "pass"

    def requires(self, gm: torch.fx.GraphModule) -> None:  # pragma: no cover - default no-op
        return None

    def call(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: torch.fx.GraphModule) -> None:  # pragma: no cover - default no-op
        return None

    def __call__(self, gm: torch.fx.GraphModule, am: AnalysisManager | None = None) -> PassResult:
        am = am if am is not None else AnalysisManager(gm)
        self.requires(gm)
        result = self.call(gm, am)
        self.ensures(result.gm)
        return result


class Instrument:
    """Hooks around each pass (TVM/MLIR style)."""

    def before_pass(self, p: Pass, gm: torch.fx.GraphModule) -> None:
        return None

    def after_pass(self, p: Pass, gm: torch.fx.GraphModule, result: PassResult, seconds: float) -> None:
        return None


class TimingInstrument(Instrument):
    """Records (pass name, seconds, modified) for every pass that ran."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def after_pass(self, p: Pass, gm: torch.fx.GraphModule, result: PassResult, seconds: float) -> None:
        self.records.append({"pass": p.name, "seconds": round(seconds, 4), "modified": result.modified, **result.info})


class PassManager:
    """Runs passes in order over one graph module."""

    def __init__(self, passes: Sequence[Pass], *, instruments: Sequence[Instrument] = (), verify: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager | None = None) -> PassResult:
        am = am if am is not None else AnalysisManager(gm)
        done: list[str] = []
        modified_any = False
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, gm)
            start = time.perf_counter()
            try:
                result = p(gm, am)
            except FxpruneError as err:
                if isinstance(err, PassError) or not done:
                    raise
                raise type(err)(f"{err} (in pass '{p.name}' after {done})") from err
            except Exception as err:  # a bug or an unexpected model construct: say where
                raise PassError(
                    f"pass '{p.name}' failed after {done}: {type(err).__name__}: {err}"
                ) from err
            seconds = time.perf_counter() - start
            if result.gm is not gm:
                am.reset(result.gm)
            elif result.modified:
                am.invalidate(result.preserved)
            gm = result.gm
            if result.modified:
                modified_any = True
                gm.recompile()
                if self.verify:
                    gm.graph.lint()
            for inst in self.instruments:
                inst.after_pass(p, gm, result, seconds)
            done.append(p.name)
        return PassResult(gm, modified_any)
