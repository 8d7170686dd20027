"""The compile report: every decision fxprune made, as JSON for pipelines and as tables for people."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from fxprune.budget import format_macs

__all__ = ["GroupDecision", "FrozenInfo", "Report"]


@dataclass(frozen=True)
class GroupDecision:
    """What happened to one dependency group."""

    id: int
    name: str
    kind: str
    bucket: str
    size: int
    keep: int
    unit: int
    mac_share: float
    exact: bool
    members: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        return self.keep / self.size if self.size else 1.0


@dataclass(frozen=True)
class FrozenInfo:
    name: str
    size: int
    reasons: tuple[str, ...]


@dataclass
class Report:
    """Everything about one compile run (``to_json()`` for pipelines, ``str()`` for people)."""

    model: str = ""
    policy: str = ""
    criterion: str = ""
    budget_spec: str = ""
    budget_macs: int = 0
    lower_macs: int = 0
    tolerance: float = 0.0
    channel_multiple: int = 8
    base_macs: int = 0
    macs: int = 0
    estimated_macs: int = 0
    base_params: int = 0
    params: int = 0
    seed: int = 0
    groups: list[GroupDecision] = field(default_factory=list)
    frozen: list[FrozenInfo] = field(default_factory=list)
    solver_notes: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mac_error(self) -> float:
        """(achieved - budget) / budget; never positive when the budget holds."""
        return (self.macs - self.budget_macs) / self.budget_macs if self.budget_macs else 0.0

    @property
    def unchanged(self) -> bool:
        """The budget is at or above the original's MACs: the model was returned unchanged."""
        return bool(self.base_macs) and self.budget_macs >= self.base_macs and self.macs == self.base_macs

    @property
    def in_band(self) -> bool:
        return self.lower_macs <= self.macs <= self.budget_macs or self.unchanged

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = "fxprune.report/1"
        d["mac_error"] = self.mac_error
        d["in_band"] = self.in_band
        d["unchanged"] = self.unchanged
        d["macs_ratio"] = self.macs / self.base_macs if self.base_macs else 1.0
        return d

    def dumps(self, indent: int = 2) -> str:
        return json.dumps(self.to_json(), indent=indent, default=str)

    # ---------------------------------------------------------------- human-readable summaries
    def stages(self, depth: int = 1) -> list[tuple[str, int, int]]:
        """(stage, kept units, total units) aggregated by the first ``depth`` components of group names."""
        agg: dict[str, list[int]] = {}
        for g in self.groups:
            key = ".".join(g.name.split(".")[:depth]) or g.name
            a = agg.setdefault(key, [0, 0])
            a[0] += g.keep * g.unit
            a[1] += g.size * g.unit
        return [(k, v[0], v[1]) for k, v in agg.items()]

    def summary_table(self) -> str:
        rows = [
            ("MACs", format_macs(self.base_macs), format_macs(self.macs), f"{self.macs / max(self.base_macs, 1):.3f}x"),
            ("params", f"{self.base_params / 1e6:.3f} M", f"{self.params / 1e6:.3f} M",
             f"{self.params / max(self.base_params, 1):.3f}x"),
        ]
        lines = [f"{'':8s} {'original':>14s} {'pruned':>14s} {'ratio':>8s}"]
        lines += [f"{a:8s} {b:>14s} {c:>14s} {d:>8s}" for a, b, c, d in rows]
        if self.unchanged:
            lines.append(f"budget {format_macs(self.budget_macs)} is at or above the original's "
                         f"{format_macs(self.base_macs)} MACs: model returned unchanged")
        else:
            lines.append(
                f"budget {format_macs(self.budget_macs)} (band {format_macs(self.lower_macs)} .. "
                f"{format_macs(self.budget_macs)}, tolerance {self.tolerance:.2%}); achieved {self.mac_error:+.3%} "
                f"vs budget; {'IN BAND' if self.in_band else 'OUT OF BAND'}"
            )
        return "\n".join(lines)

    def stage_table(self, depth: int = 1) -> str:
        lines = [f"{'stage':28s} {'kept':>8s} {'total':>8s} {'kept %':>7s}"]
        for name, kept, total in self.stages(depth):
            lines.append(f"{name[:28]:28s} {kept:8d} {total:8d} {kept / max(total, 1):7.1%}")
        return "\n".join(lines)

    def group_table(self, limit: int | None = None) -> str:
        lines = [f"{'#':>3s} {'group':34s} {'kind':8s} {'kept/total':>11s} {'MAC share':>9s}"]
        for g in self.groups[:limit]:
            lines.append(f"{g.id:3d} {g.name[:34]:34s} {g.kind:8s} {g.keep:5d}/{g.size:<5d} {g.mac_share:9.2%}")
        if limit is not None and len(self.groups) > limit:
            lines.append(f"... {len(self.groups) - limit} more groups")
        return "\n".join(lines)

    def latency_line(self) -> str:
        """One line on the measured latency (``fxprune.latency/1`` record in ``self.latency``)."""
        lat = self.latency or {}
        target = str(lat.get("target") or "")
        if target.startswith("torch"):
            where = f"{target} {lat.get('dtype')}, batch {lat.get('batch')}"
        else:
            where = (f"ONNX Runtime {lat.get('provider')}, batch {lat.get('batch')}, {lat.get('threads')} "
                     f"thread(s), opt {lat.get('opt_level')}")
        line = (f"latency ({where}): original {lat['original_median_ms']:.3f} ms, pruned "
                f"{lat['pruned_median_ms']:.3f} ms median -> {lat['speedup']:.2f}x faster for "
                f"{lat['mac_reduction']:.2f}x fewer MACs")
        budget = lat.get("budget")
        if budget:
            line += (f"; budget {budget['spec']} = {budget['budget_ms']:.3f} ms "
                     f"{'met' if budget['met'] else 'MISSED'} (calibration cache {budget['cache']})")
        model = lat.get("model")
        if isinstance(model, dict) and model.get("median_abs_error") is not None:
            line += (f"; per-layer latency model: {model.get('units')} units, median prediction error "
                     f"{model['median_abs_error']:.1%}")
        return line

    def __str__(self) -> str:
        parts = [
            f"fxprune compile: {self.model} | policy {self.policy}"
            + (f" | importance {self.criterion}" if self.criterion else ""),
            self.summary_table(),
        ]
        if self.groups:
            parts.append(self.stage_table())
        if self.frozen:
            parts.append(f"frozen: {len(self.frozen)} group(s), e.g. "
                         + "; ".join(f"{f.name} ({f.reasons[0] if f.reasons else '?'})" for f in self.frozen[:3]))
        if self.latency:
            parts.append(self.latency_line())
        if self.timings:
            parts.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        for w in self.warnings:
            parts.append(f"warning: {w}")
        return "\n".join(parts)


def environment() -> dict[str, str]:
    import torch

    import fxprune

    return {"fxprune": fxprune.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}
