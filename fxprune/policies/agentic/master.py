"""The Master agent: the agentic policy's loop.

Profile the problem (Profiling agent), seed the search with the strongest deterministic plan
(``global``), then ask the Analysis agent (Claude through the ``anthropic`` SDK, or the offline
analyst) for per-bucket allocations. Each proposal is untrusted data: it has been validated by
the parser; here it is projected onto the MAC band by the budget solver, scored with the quality
signal, recorded, and the best is kept. The loop stops on divergence:

* **repeat** -- the projected plan (keep counts and criterion) was already evaluated;
* **oscillation** -- the plan equals the one two attempts earlier (A, B, A);
* **no improvement** in ``patience`` scored attempts;
* **budget** -- attempts, LLM calls or tokens spent;
* the analyst became unavailable twice (after the first failure it is replaced by the offline
  analyst; the run never crashes and never loses the best result).

Every attempt goes to the report, in order: proposal, projected plan, MACs, quality, analyst.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fxprune.policies.agentic.offline import OfflineAnalyst
from fxprune.policies.agentic.profiling import Profile, build_profile
from fxprune.policies.base import PruningPlan, PruningProblem, SearchContext
from fxprune.policies.solver import project

__all__ = ["AgenticPolicy"]

logger = logging.getLogger(__name__)


class AgenticPolicy:
    """``policy="agentic"``: LLM- or offline-analyst-guided allocation under the budget solver.

    Options (``compile(..., policy_options={...})``):
        llm: "auto" (Claude when an API key or client is available, else offline), "claude", "offline".
        model, temperature, max_tokens, timeout, api_key, base_url, client: passed to the Claude analyst.
        llm_first_reply_timeout: seconds to wait for Claude's first reply, SDK retries included
            (default 30; 120 for models that think first); a silent endpoint costs this long.
        llm_time_budget: total seconds of waiting on Claude in the run (default 600). When either
            runs out the offline analyst takes over, with a line on stderr.
        max_attempts: proposals evaluated (default 10, not counting the baseline and profiling).
        max_calls: LLM calls (default 8); max_total_tokens: stop when exceeded (default 200k).
        patience: stop after this many scored attempts without improvement (default 4).
        sensitivity: keep ratios for the per-bucket sensitivity curves (default (0.25, 0.5, 0.75)).
        max_buckets: buckets shown to the analyst (default 12).
        baseline: evaluate the ``global`` plan first (default True).
    """

    name = "agentic"

    def __init__(self, **options: Any):
        self.options = options

    def _opt(self, ctx: SearchContext, key: str, default: Any) -> Any:
        return ctx.options.get(key, self.options.get(key, default))

    def _analyst(self, ctx: SearchContext, problem: PruningProblem, profile: Profile):
        mode = self._opt(ctx, "llm", "auto")
        offline = OfflineAnalyst(problem, profile.buckets)
        if mode == "offline":
            return offline, offline, "offline (requested)"
        from fxprune.policies.agentic.llm import ClaudeAnalyst

        kwargs = {k: ctx.options[k] for k in ("model", "temperature", "max_tokens", "timeout", "api_key",
                                              "base_url", "client", "max_retries", "max_invalid") if k in ctx.options}
        for option, arg in (("llm_time_budget", "time_budget"), ("llm_first_reply_timeout", "first_reply_timeout")):
            value = self._opt(ctx, option, None)
            if value is not None:
                kwargs[arg] = value
        if not ClaudeAnalyst.available(kwargs.get("api_key"), client=kwargs.get("client")):
            why = "no ANTHROPIC_API_KEY: using the offline analyst"
            if mode == "claude":
                logger.warning(why)
            return offline, offline, why
        return ClaudeAnalyst(**kwargs), offline, "claude"

    def select(self, problem: PruningProblem, ctx: SearchContext) -> PruningPlan:
        t0 = time.perf_counter()
        quality = ctx.quality
        profile = build_profile(
            problem, quality, model_name=str(ctx.options.get("model_name", "model")),
            quality_name=ctx.quality_name, ratios=tuple(self._opt(ctx, "sensitivity", (0.25, 0.5, 0.75))),
            max_buckets=int(self._opt(ctx, "max_buckets", 12)),
        )
        analyst, offline, analyst_note = self._analyst(ctx, problem, profile)
        max_attempts = int(self._opt(ctx, "max_attempts", 10))
        max_calls = int(self._opt(ctx, "max_calls", 8))
        max_tokens = int(self._opt(ctx, "max_total_tokens", 200_000))
        patience = int(self._opt(ctx, "patience", 4))
        history: list[dict[str, Any]] = []
        seen: dict[tuple, int] = {}
        plans: list[tuple] = []
        best: dict[str, Any] | None = None
        failures = 0
        stop = "max attempts reached"

        def record(att: dict[str, Any]) -> None:
            nonlocal best
            att["attempt"] = len(history) + 1
            if att.get("quality") is not None and (best is None or att["quality"] > best["quality"]):
                best = att
                for h in history:
                    h["best_so_far"] = False
                att["best_so_far"] = True
            else:
                att["best_so_far"] = False
            history.append(att)
            ctx.log({k: v for k, v in att.items() if k != "_keep"})

        def evaluate(keep: np.ndarray, criterion: str, analyst_name: str, proposal: dict, notes: list[str]) -> bool:
            key = (keep.tobytes(), criterion)
            plan = PruningPlan({g.id: int(k) for g, k in zip(problem.groups, keep)}, self.name, criterion=criterion)
            att = {"analyst": analyst_name, "proposal": proposal,
                   "projected": {"ratios": profile.bucket_ratios(problem, keep), "criterion": criterion},
                   "macs": int(problem.cost(keep[None, :])[0]), "solver_note": "; ".join(notes)[:300]}
            att["in_band"] = problem.lower <= att["macs"] <= problem.budget
            if key in seen:
                att["quality"] = None
                att["repeat_of"] = seen[key]
                record(att)
                return False
            att["quality"] = float(quality(plan)) if quality is not None else 0.0
            att["_keep"] = keep
            record(att)
            seen[key] = att["attempt"]
            plans.append(key)
            return True

        # seed: the deterministic global plan (the search only accepts improvements on it)
        if self._opt(ctx, "baseline", True):
            from fxprune.policies.heuristic import GlobalPolicy

            g = GlobalPolicy().select(problem, ctx)
            keep = problem.dense(g.keep)
            evaluate(keep, ctx.options.get("criterion", "l1"), "baseline:global",
                     {"ratios": profile.bucket_ratios(problem, keep), "criterion": ctx.options.get("criterion", "l1")}, [])
        since_best = 0
        calls = 0
        for _ in range(max_attempts):
            stats = getattr(analyst, "stats", {})
            if analyst is not offline and (calls >= max_calls or
                                           stats.get("input_tokens", 0) + stats.get("output_tokens", 0) > max_tokens):
                stop = "LLM call/token budget spent"
                break
            public = [{k: v for k, v in h.items() if k != "_keep"} for h in history]
            try:
                calls += analyst is not offline
                proposal = analyst.propose(profile.data, public)
            except Exception as err:  # AnalystUnavailable, or anything unexpected: fall back, never crash
                failures += 1
                reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
                logger.warning("analyst %s failed (%s); switching to the offline analyst", getattr(analyst, "name", "?"), reason)
                record({"analyst": getattr(analyst, "name", "?"), "error": str(reason)[:300], "quality": None,
                        "fallback": "offline"})
                if analyst is offline or failures >= 2:
                    stop = f"analyst unavailable: {reason}"
                    break
                analyst = offline
                analyst_note = f"claude failed ({str(reason)[:80]}); offline analyst took over"
                continue
            targets = profile.bucket_targets(problem, proposal.ratios)
            proj = project(problem, targets)
            improved_before = best
            fresh = evaluate(proj.keep, proposal.criterion, getattr(analyst, "name", "analyst"),
                             {"ratios": dict(proposal.ratios), "criterion": proposal.criterion,
                              "rationale": proposal.rationale[:300]}, list(proposal.notes) + proj.notes)
            if not fresh:
                if len(plans) and history[-1].get("repeat_of") and sum(1 for h in history if h.get("repeat_of")) >= 2:
                    stop = "repeated proposals"
                    break
                continue
            if len(plans) >= 3 and plans[-1] == plans[-3]:
                stop = "oscillation between two plans"
                break
            if best is improved_before:
                since_best += 1
                if since_best >= patience:
                    stop = f"no improvement in {patience} attempts"
                    break
            else:
                since_best = 0
        if best is None:
            from fxprune.policies.heuristic import GlobalPolicy

            return GlobalPolicy().select(problem, ctx)
        seconds = time.perf_counter() - t0
        ctx.log({"attempt": "summary", "analyst": analyst_note, "stop": stop, "best_attempt": best["attempt"],
                 "best_quality": best["quality"], "evaluations": sum(1 for h in history if h.get("quality") is not None)
                 + profile.evaluations, "profiling_evaluations": profile.evaluations,
                 "llm_stats": {k: v for k, v in getattr(analyst, "stats", {}).items() if k != "api_key"},
                 "seconds": round(seconds, 2)})
        keep = best["_keep"]
        return PruningPlan({g.id: int(k) for g, k in zip(problem.groups, keep)}, self.name,
                           f"agentic ({analyst_note}): best of {len(history)} attempts is #{best['attempt']} "
                           f"({best['analyst']}, quality {best['quality']:.4f}); stopped: {stop}",
                           criterion=best["projected"]["criterion"])
