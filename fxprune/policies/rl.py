"""``policy="rl"``: a multi-agent policy-gradient allocator (AutoSculpt / ARLP, re-designed).

One **agent** per prunable group (or per isomorphic bucket, merged by stage, when a model has
more than ``max_agents`` groups) decides how much of the pruning its groups take. The agents
are the tokens of a small **transformer encoder**. Each token carries zero-cost features of its
groups that the :class:`~fxprune.policies.base.PruningProblem` already holds: size, minimum keep,
MAC share and MACs per unit, importance statistics, position in graph order and the ``global``
plan's keep ratio. Two more come from the exact cost model: the MAC coupling with the other
agents, which also biases attention towards coupled agents (a soft graph over producer/consumer
pairs).

**Action.** The network outputs, per agent, the mean of a Gaussian over a *log pruning weight*
``z``. The agents' weights ``exp(z - max z)`` are the relative amounts of pruning asked of each
group, and the budget solver scales them onto the MAC band (``project``), as it does for every
proposal. The result does not depend on the overall level of the weights, so the policy only
shapes the allocation and the budget holds by construction. (A policy over keep ratios drifts
along that level, which the reward cannot see, until its ratios sit at their bounds and the
noise stops changing the plan.) ``z`` is bounded (``Z_RANGE``), and the noise never falls below
what moves the mean plan by half an allowed step.

**Training.** PPO-clip (per-agent probability ratios, one shared reward, mirrored samples,
advantages against the batch mean), in two phases:

1. **proxy pre-training** (``proxy_episodes``, no model evaluation): the reward is a zero-cost
   proxy computed from the per-unit importance, after the allocation is scaled onto the budget
   (a vectorised, continuous version of the solver's scaling step). See :class:`ImportanceProxy`.
2. **real episodes**: the reward is ``ctx.quality`` of the projected plan (the user's
   ``evaluate`` or label-free fidelity). At most ``max_evaluations`` distinct plans are scored in
   the whole run: the ``global`` plan first (``baseline``), the policy's mean allocation after
   pre-training, the sampled allocations, and the final mean allocation (one evaluation is kept
   for it). A plan that was already scored is not scored again: its reward is reused, and while
   batches bring no new plan, the exploration noise grows (up to 4x).

Each agent has its own learned offset besides the shared network (with a larger learning rate),
so a few real rewards can move single agents; the transformer carries what pre-training learned
from the features. The best scored plan is returned; every scored plan is logged through
``ctx.log``, followed by one summary record. Randomness comes from one ``torch.Generator``
seeded with ``ctx.seed`` (the global RNG is never drawn from), so the same problem, quality
signal and seed give the same plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import PolicyError
from fxprune.policies.base import PruningPlan, PruningProblem, SearchContext
from fxprune.policies.solver import project

__all__ = ["RLPolicy", "ImportanceProxy", "agent_features", "FEATURES", "PROXIES"]

DEFAULTS: dict[str, Any] = {
    "max_evaluations": 24,   # distinct ctx.quality calls in the whole run (baseline included)
    "episodes": None,        # real-reward episodes, repeats included; default 10 x max_evaluations
    "proxy_episodes": 256,   # cheap-reward pre-training episodes
    "proxy": "log_mass",     # the zero-cost reward (see PROXIES)
    "proxy_batch": 16,
    "batch": 2,              # real-reward episodes per policy update (one mirrored pair)
    "ppo_epochs": 4,
    "clip": 0.2,
    "lr": 0.01,
    "agent_lr_scale": 10.0,  # learning rate of each agent's own offset, relative to lr
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "sigma": 0.35,           # exploration noise of the real phase (log pruning weight)
    "proxy_sigma": 0.35,     # initial exploration noise of the pre-training (learned there)
    "baseline": True,        # score the global plan first (the result is then never worse on quality)
    "prior": "global",       # the policy's initial allocation: the global plan's, or "uniform"
    "max_agents": 24,
    "agents": "auto",        # "groups", "buckets" or "auto" (groups when there are at most max_agents)
    "log_buckets": 16,       # buckets the attempt log reports ratios for
}

FEATURES = (
    "min_keep", "log_units_z", "mac_share", "log_mac_share_z", "log_mac_per_unit_z", "heads", "exact",
    "imp_cv", "imp_p10", "imp_p50", "imp_p90", "mass_bottom25", "mass_bottom50", "log_imp_scale_z",
    "position", "groups_frac", "bucket_frac", "steps_per_unit", "coupled_share", "neighbours_frac",
    "prior_ratio",
)

PROXIES = ("log_mass", "unit_log_mass", "share_log_mass", "mass")
Z_RANGE = 3.0  # |log pruning weight| <= Z_RANGE


# ------------------------------------------------------------------------------------- agents

@dataclass
class _Agents:
    groups: list[list[int]]
    index: np.ndarray      # [G] agent of each group
    lo: np.ndarray         # [A] smallest keep ratio every group of the agent allows
    kind: str              # "groups" or "buckets"


def _make_agents(problem: PruningProblem, mode: str, max_agents: int) -> _Agents:
    G = len(problem.groups)
    if mode == "groups" or (mode == "auto" and G <= max_agents):
        groups = [[g] for g in range(G)]
        kind = "groups"
    else:
        from fxprune.policies.agentic.profiling import make_buckets

        groups = [list(b.groups) for b in make_buckets(problem, max_agents)]
        kind = "buckets"
    index = np.zeros(G, dtype=np.int64)
    for a, gs in enumerate(groups):
        index[gs] = a
    lo = np.array([max(problem.groups[g].allowed[0] / max(problem.groups[g].size, 1) for g in gs)
                   for gs in groups])
    return _Agents(groups, index, np.minimum(lo, 0.999), kind)


def _coupling(problem: PruningProblem, chunk: int = 4096) -> np.ndarray:
    """[G, G] fraction of the base MACs in terms that multiply group g's and group h's keep counts.

    The cost is multilinear in the keep counts, so the second difference between "full" and
    "half" for a pair isolates the terms in which both appear (producer/consumer pairs).
    """
    G = len(problem.groups)
    out = np.zeros((G, G))
    if G < 2 or G > 300:
        return out
    full = problem.sizes.astype(np.float64)
    half = full / 2
    singles = np.repeat(full[None, :], G, axis=0)
    singles[np.arange(G), np.arange(G)] = half
    c_full = float(problem.cost(full[None, :])[0])
    c_one = problem.cost(singles).astype(np.float64)
    ii, jj = np.triu_indices(G, 1)
    for s in range(0, len(ii), chunk):
        a, b = ii[s:s + chunk], jj[s:s + chunk]
        K = np.repeat(full[None, :], len(a), axis=0)
        K[np.arange(len(a)), a] = half[a]
        K[np.arange(len(a)), b] = half[b]
        c_two = problem.cost(K).astype(np.float64)
        inter = (c_full - c_one[a] - c_one[b] + c_two) * 4.0 / max(problem.base_macs, 1)
        out[a, b] = out[b, a] = np.maximum(inter, 0.0)
    return out


def _zscore(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if len(x) > 1 and s > 1e-9 else np.zeros_like(x)


def agent_features(problem: PruningProblem, agents: _Agents, prior: np.ndarray,
                   coupling: np.ndarray | None = None) -> np.ndarray:
    """[A, len(FEATURES)] zero-cost feature tokens, one per agent, from what the problem carries."""
    G = len(problem.groups)
    A = len(agents.groups)
    buckets = problem.buckets()
    coupling = _coupling(problem) if coupling is None else coupling
    agent_coupling = np.zeros((A, A))
    np.add.at(agent_coupling, (agents.index[:, None], agents.index[None, :]), coupling)
    rows = []
    for a, gs in enumerate(agents.groups):
        specs = [problem.groups[g] for g in gs]
        units = float(sum(s.size for s in specs))
        imp = np.concatenate([np.asarray(s.importance if s.importance is not None else np.ones(s.size),
                                         dtype=np.float64) for s in specs])
        mean = imp.mean() if imp.size and imp.mean() > 0 else 1.0
        v = np.sort(imp / mean)
        total = max(v.sum(), 1e-12)
        share = float(sum(s.mac_share for s in specs))
        others = agent_coupling[a].copy()
        others[a] = 0.0
        rows.append([
            agents.lo[a],
            math.log(units / len(specs) + 1.0),
            min(share, 1.0),
            math.log(share + 1e-6),
            math.log(share / units + 1e-9),
            np.mean([s.kind == "heads" for s in specs]),
            np.mean([s.exact for s in specs]),
            float(v.std()),
            float(np.percentile(v, 10)),
            float(np.percentile(v, 50)),
            float(np.percentile(v, 90)),
            float(v[: max(len(v) // 4, 1)].sum() / total),
            float(v[: max(len(v) // 2, 1)].sum() / total),
            math.log(max(float(np.mean([s.importance_scale for s in specs])), 1e-12)),
            float(np.mean(gs)) / max(G - 1, 1),
            len(gs) / G,
            float(np.mean([len(buckets[s.bucket]) for s in specs])) / G,
            float(np.mean([len(s.allowed) / max(s.size, 1) for s in specs])),
            min(float(others.sum()), 1.0),
            float((others > 1e-9).sum()) / max(A - 1, 1),
            float(prior[a]),
        ])
    X = np.asarray(rows, dtype=np.float64)
    for name in ("log_units_z", "log_mac_share_z", "log_mac_per_unit_z", "log_imp_scale_z"):
        j = FEATURES.index(name)
        X[:, j] = _zscore(X[:, j])
    return X


# -------------------------------------------------------------------------------------- proxy

class ImportanceProxy:
    """Zero-cost reward of allocations, from the per-unit importance the problem carries.

    ``fit`` scales an allocation's pruning onto the budget (continuous keep counts, no snapping;
    a batch at a time). ``score`` rates keep counts by the fraction of each group's importance
    mass they keep (the most important units are the ones kept):

    * ``log_mass`` (default): the mean over groups of log(mass kept). Groups act in series, so
      the log keeps any one group from collapsing.
    * ``unit_log_mass`` / ``share_log_mass``: the same, weighted by group size / MAC share.
    * ``mass``: the unit-weighted mass kept (what the ``global`` greedy maximises per MAC).
    """

    def __init__(self, problem: PruningProblem, kind: str = "log_mass"):
        if kind not in PROXIES:
            raise PolicyError(f"unknown proxy {kind!r}; choose one of {PROXIES}")
        self.problem = problem
        self.kind = kind
        self.sizes = problem.sizes.astype(np.float64)
        self.min_keep = np.array([g.allowed[0] for g in problem.groups], dtype=np.float64)
        if kind == "log_mass":
            w = np.ones(len(self.sizes))
        elif kind == "share_log_mass":
            w = np.array([max(g.mac_share, 1e-9) for g in problem.groups])
        else:
            w = self.sizes.copy()
        self.weights = w / max(w.sum(), 1e-12)
        self.cum = []
        for g in problem.groups:
            imp = np.asarray(g.importance if g.importance is not None else np.ones(g.size), dtype=np.float64)
            imp = np.sort(np.maximum(imp, 0.0))[::-1]
            c = np.concatenate([[0.0], np.cumsum(imp)])
            self.cum.append(c / c[-1] if c[-1] > 0 else np.linspace(0.0, 1.0, g.size + 1))

    def fit(self, prune: np.ndarray, iters: int = 32) -> np.ndarray:
        """[N, G] relative pruning (>= 0, any scale) -> [N, G] continuous keep counts at the budget."""
        p = np.maximum(np.asarray(prune, dtype=np.float64), 0.0)
        p = p / np.maximum(p.max(axis=1, keepdims=True), 1e-12)
        p = np.maximum(p, 1e-9)
        n = p.shape[0]

        def keep(alpha):
            return np.clip(self.sizes * (1.0 - alpha[:, None] * p), self.min_keep, self.sizes)

        lo = np.zeros(n)
        hi = 1.0 / p.min(axis=1)  # every group at its minimum keep
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            ok = self.problem.cost(keep(mid)) <= self.problem.budget
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        return keep(hi)

    def score(self, keep: np.ndarray) -> np.ndarray:
        """[N, G] keep counts -> [N] proxy reward (higher is better)."""
        keep = np.atleast_2d(np.asarray(keep, dtype=np.float64))
        mass = np.empty_like(keep)
        for g, c in enumerate(self.cum):
            mass[:, g] = np.interp(keep[:, g], np.arange(len(c)), c)
        if self.kind == "mass":
            return mass @ self.weights
        return np.log(np.maximum(mass, 1e-6)) @ self.weights

    def __call__(self, prune: np.ndarray) -> np.ndarray:
        return self.score(self.fit(prune))


# ------------------------------------------------------------------------------------ network

class _PolicyNet(nn.Module):
    """Feature tokens -> transformer encoder -> per-agent mean log pruning weight; one noise scale."""

    def __init__(self, n_features: int, n_agents: int, hidden: int, layers: int, heads: int,
                 device: str | torch.device = "cpu"):
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        heads = max(1, min(heads, hidden))
        while hidden % heads:
            heads -= 1
        self.embed = nn.Sequential(nn.Linear(n_features, hidden, **kw), nn.GELU(),
                                   nn.Linear(hidden, hidden, **kw))
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True, **kw)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden, **kw)
        self.mu = nn.Linear(hidden, 1, **kw)
        self.agent_bias = nn.Parameter(torch.zeros(n_agents, **kw))  # each agent's own offset
        self.log_std = nn.Parameter(torch.zeros((), **kw))

    @classmethod
    def create(cls, n_features: int, n_agents: int, hidden: int, layers: int, heads: int,
               generator: torch.Generator) -> "_PolicyNet":
        """Built on the meta device and initialised from ``generator``: the global RNG is not used."""
        net = cls(n_features, n_agents, hidden, layers, heads, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name in ("log_std", "agent_bias") or name.endswith("bias"):
                    p.zero_()
                elif p.dim() >= 2:
                    nn.init.xavier_uniform_(p, generator=generator)
                else:  # LayerNorm scales
                    p.fill_(1.0)
            net.mu.weight.zero_()  # the initial mean is the prior
        return net

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None,
                prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.embed(x)[None], mask=attn_bias)
        raw = prior + self.mu(self.norm(h))[0, :, 0] + self.agent_bias
        # bounded (weights within e^(2 * Z_RANGE) of each other): an agent the reward tells to stop
        # pruning saturates instead of drifting out of the noise's reach
        z = Z_RANGE * torch.tanh(raw / Z_RANGE)
        return z, self.log_std.clamp(math.log(0.02), math.log(2.0))


class _OneThread:
    """Run the (tiny) network on one intra-op thread, then restore the caller's setting: on a few
    busy cores, several threads on ops over a dozen tokens cost ~10x in synchronisation."""

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        if self.saved != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.saved != 1:
            torch.set_num_threads(self.saved)


def _rank(q: float) -> float:
    return q if math.isfinite(q) else -math.inf


def _log_prob(u: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((u - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------- policy

class RLPolicy:
    """``policy="rl"``: transformer multi-agent PPO over pruning allocations, with the budget solver.

    Options (``compile(..., policy_options={...})``, or keyword arguments here):
        max_evaluations: distinct quality evaluations in the run, baseline included (default 24).
        episodes: real-reward episodes, repeats of a scored plan included (default 10 x max_evaluations).
        proxy_episodes: zero-cost-proxy pre-training episodes (default 256; 0 turns it off).
        proxy: the zero-cost reward, one of :data:`PROXIES` (default "log_mass").
        lr, hidden, layers, heads: Adam learning rate and transformer size (0.01, 32, 2, 4).
        agent_lr_scale: learning rate of the per-agent offsets relative to ``lr`` (10).
        batch / proxy_batch: episodes per update in each phase (2 / 16); ppo_epochs, clip (4, 0.2).
        sigma: exploration noise of the real phase, in log pruning weight (0.35).
        baseline: score the ``global`` plan first (default True).
        prior: the policy's initial allocation, "global" (default) or "uniform".
        agents: "auto" (one per group up to ``max_agents`` = 24, else per merged isomorphic bucket),
            "groups" or "buckets".
    """

    name = "rl"

    def __init__(self, **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise PolicyError(f"unknown rl options: {sorted(unknown)}")
        self.options = options

    def _opt(self, ctx: SearchContext, key: str) -> Any:
        return ctx.options.get(key, self.options.get(key, DEFAULTS[key]))

    # -------------------------------------------------------------------------------- select
    def select(self, problem: PruningProblem, ctx: SearchContext) -> PruningPlan:
        t0 = time.perf_counter()
        opt = {k: self._opt(ctx, k) for k in DEFAULTS}
        max_evals = max(0, int(opt["max_evaluations"]))
        episodes = int(opt["episodes"]) if opt["episodes"] is not None else 10 * max_evals
        batch = max(2, int(opt["batch"]) // 2 * 2)
        proxy_batch = max(2, int(opt["proxy_batch"]) // 2 * 2)
        sizes = problem.sizes.astype(np.float64)
        gen = torch.Generator().manual_seed(int(ctx.seed) & 0x7FFF_FFFF_FFFF_FFFF)
        proxy = ImportanceProxy(problem, str(opt["proxy"]))
        agents = _make_agents(problem, str(opt["agents"]), int(opt["max_agents"]))
        A = len(agents.groups)
        from fxprune.policies.agentic.profiling import make_buckets

        log_buckets = make_buckets(problem, int(opt["log_buckets"]))

        def bucket_ratios(keep: np.ndarray) -> dict[str, float]:
            return {b.id: round(float(sum(keep[g] for g in b.groups)
                                      / max(sum(sizes[g] for g in b.groups), 1)), 4) for b in log_buckets}

        def agent_ratio(keep: np.ndarray) -> np.ndarray:
            return np.array([keep[gs].sum() / max(sizes[gs].sum(), 1) for gs in agents.groups])

        # ---- the global plan: the seed attempt and (by default) the policy's prior
        from fxprune.policies.heuristic import GlobalPolicy

        global_keep = problem.dense(GlobalPolicy().select(problem, ctx).keep).astype(np.int64)
        prior_ratio = agent_ratio(global_keep) if opt["prior"] == "global" else np.full(A, 0.5)
        prune = 1.0 - prior_ratio
        if prune.max() <= 0:
            prune = np.ones(A)
        prune = np.maximum(prune / prune.max(), 0.1)  # nobody starts out of reach
        # the network's output goes through Z_RANGE * tanh(. / Z_RANGE): start exactly at log(prune)
        prior_z = torch.tensor(Z_RANGE * np.arctanh(np.log(prune) / Z_RANGE), dtype=torch.float32)

        coupling = _coupling(problem)
        X = agent_features(problem, agents, prior_ratio, coupling)
        agent_coupling = np.zeros((A, A))
        np.add.at(agent_coupling, (agents.index[:, None], agents.index[None, :]), coupling)
        adjacent = (agent_coupling > 1e-9) | np.eye(A, dtype=bool)
        attn_bias = torch.tensor(np.where(adjacent, 0.0, -1.0), dtype=torch.float32)
        x = torch.tensor(X, dtype=torch.float32)
        # a change of one allowed step, in keep-ratio units (sets the least useful noise)
        step = np.array([np.mean([np.median(np.diff(problem.groups[g].allowed)) / problem.groups[g].size
                                  if len(problem.groups[g].allowed) > 1 else 0.0 for g in gs])
                         for gs in agents.groups])

        net = _PolicyNet.create(X.shape[1], A, int(opt["hidden"]), int(opt["layers"]), int(opt["heads"]), gen)
        net.train()  # dropout is 0; one code path (no inference fast path) for both phases
        shared = [q for n, q in net.named_parameters() if n != "agent_bias"]
        agent_lr = float(opt["lr"]) * float(opt["agent_lr_scale"])
        optim = torch.optim.Adam([{"params": shared, "lr": float(opt["lr"])},
                                  {"params": [net.agent_bias], "lr": agent_lr}])
        with torch.no_grad():
            net.log_std.fill_(math.log(float(opt["proxy_sigma"])))
        explore = {"boost": 1.0}

        def policy() -> tuple[torch.Tensor, torch.Tensor]:
            with _OneThread():
                return net(x, attn_bias, prior_z)

        def mean_z() -> np.ndarray:
            with torch.no_grad():
                return policy()[0].double().numpy()

        def prune_of(z: np.ndarray) -> np.ndarray:
            """[..., A] log weights -> [..., G] relative pruning in (0, 1] (max 1)."""
            z = np.asarray(z, dtype=np.float64)
            return np.exp(z - z.max(axis=-1, keepdims=True))[..., agents.index]

        def noise_floor(z: np.ndarray) -> torch.Tensor:
            """Per agent, half the change of log weight that moves the mean plan by one step."""
            kept = agent_ratio(proxy.fit(prune_of(z)[None])[0])
            pruned = np.maximum(1.0 - kept, 0.02)
            return torch.tensor(0.5 * np.log1p(step / pruned), dtype=torch.float32)

        def std_of(log_std: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
            return explore["boost"] * torch.maximum(log_std.exp().expand(A), floor)

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """n mirrored samples: (log weights [n, A], their log-probs [n, A], the noise floor [A])."""
            with torch.no_grad():
                mean, log_std = policy()
                floor = noise_floor(mean.double().numpy())
                eps = torch.randn((n // 2, A), generator=gen)
                u = mean + std_of(log_std, floor) * torch.cat([eps, -eps])
                lp = _log_prob(u, mean, std_of(log_std, floor))
            return u, lp, floor

        def update(u: torch.Tensor, old_lp: torch.Tensor, floor: torch.Tensor, rewards: np.ndarray,
                   scale: float, learn_std: bool) -> None:
            adv = torch.tensor((rewards - rewards.mean()) / max(scale, 1e-8), dtype=torch.float32)[:, None]
            for _ in range(int(opt["ppo_epochs"])):
                mean, log_std = policy()
                if not learn_std:
                    log_std = log_std.detach()
                ratio = torch.exp(_log_prob(u, mean, std_of(log_std, floor)) - old_lp)
                clipped = ratio.clamp(1.0 - float(opt["clip"]), 1.0 + float(opt["clip"]))
                loss = -torch.minimum(ratio * adv, clipped * adv).mean()
                with _OneThread():
                    optim.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    optim.step()

        # ---- 1. proxy pre-training (zero cost)
        proxy_before = float(proxy(prune_of(mean_z())[None])[0])
        initial_state = {k: v.clone() for k, v in net.state_dict().items()}
        n_proxy = max(0, int(opt["proxy_episodes"])) // proxy_batch * proxy_batch
        # the mean allocation is checkpointed on the proxy: pre-training hands the real phase the best
        # mean it saw (never worse than the prior; PPO noise can drift away from a prior that is
        # already near the proxy's optimum, as the ``global`` plan often is)
        proxy_best, proxy_state = proxy_before, initial_state
        for _ in range(n_proxy // proxy_batch):
            u, lp, floor = sample(proxy_batch)
            rew = proxy(prune_of(u.double().numpy()))
            if rew.std() > 1e-12:
                update(u, lp, floor, rew, float(rew.std()), learn_std=True)
                now = float(proxy(prune_of(mean_z())[None])[0])
                if now > proxy_best:
                    proxy_best, proxy_state = now, {k: v.clone() for k, v in net.state_dict().items()}
        proxy_last = float(proxy(prune_of(mean_z())[None])[0])
        if proxy_last < proxy_best:
            net.load_state_dict(proxy_state)
        proxy_after = float(proxy(prune_of(mean_z())[None])[0])

        # ---- 2. real episodes
        quality = ctx.quality
        history: list[dict[str, Any]] = []
        scored: dict[bytes, dict[str, Any]] = {}
        best: dict[str, Any] | None = None
        state = {"evals": 0, "episodes": 0, "repeats": 0, "updates": 0}

        def projected(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
            target = sizes * (1.0 - prune_of(z))
            proj = project(problem, target)
            return np.asarray(proj.keep, dtype=np.int64), target, proj.notes

        def score(keep: np.ndarray, phase: str, target: np.ndarray | None, notes: list[str],
                  limit: int = max_evals) -> float | None:
            """Reward of a projected plan: cached, else a quality call (None when ``limit`` is spent)."""
            nonlocal best
            key = keep.tobytes()
            if key in scored:
                state["repeats"] += 1
                return scored[key]["quality"]
            if quality is not None and state["evals"] >= limit:
                return None
            plan = PruningPlan({g.id: int(k) for g, k in zip(problem.groups, keep)}, self.name)
            if quality is not None:
                q = float(quality(plan))
                state["evals"] += 1
            else:
                q = float(proxy.score(keep[None].astype(np.float64))[0])
            macs = int(problem.cost(keep[None, :])[0])
            att: dict[str, Any] = {
                "attempt": len(history) + 1, "source": "rl", "phase": phase, "episode": state["episodes"],
                "update": state["updates"], "ratios": bucket_ratios(keep), "macs": macs,
                "in_band": bool(problem.lower <= macs <= problem.budget), "quality": q,
                "reward": "quality" if quality is not None else f"proxy:{proxy.kind}"}
            if target is not None:
                att["proposal"] = {"ratios": bucket_ratios(target)}
            if notes:
                att["solver_note"] = "; ".join(notes)[:300]
            if best is None or _rank(q) > _rank(best["quality"]):
                best = att
                for h in history:
                    h["best_so_far"] = False
                att["best_so_far"] = True
            else:
                att["best_so_far"] = False
            att["_keep"] = keep
            history.append(att)
            scored[key] = att
            return q

        if opt["baseline"]:
            score(global_keep, "baseline:global", None, [])
        initial_keep, target, notes = projected(mean_z())
        score(initial_keep, "policy-mean", target, notes)
        with torch.no_grad():
            net.log_std.fill_(math.log(float(opt["sigma"])))
        real_rewards: list[float] = [h["quality"] for h in history]  # the spread normalises advantages
        reserve = 1 if quality is not None else 0
        stop = f"{episodes} episodes"
        while state["episodes"] + batch <= episodes:
            if quality is not None and state["evals"] + reserve >= max_evals:
                stop = "max_evaluations reached"
                break
            u, lp, floor = sample(batch)
            fresh = len(history)
            rewards = []
            for row in u.double().numpy():
                keep, target, notes = projected(row)
                state["episodes"] += 1
                q = score(keep, "sample", target, notes, limit=max_evals - reserve)
                if q is None:
                    break
                rewards.append(q)
            n = len(rewards)
            real_rewards += rewards
            finite = [r for r in real_rewards if math.isfinite(r)]
            worst = min(finite) if finite else 0.0  # a failed (NaN/inf) evaluation counts as the worst seen
            rw = np.array([r if math.isfinite(r) else worst for r in rewards])
            spread = float(np.std(finite)) if finite else 0.0
            if n >= 2 and rw.std() > 1e-12 and spread > 1e-12:
                update(u[:n], lp[:n], floor, rw, spread, learn_std=False)
                state["updates"] += 1
            # batches of plans already scored teach little: look further until new plans appear
            if len(history) > fresh:
                explore["boost"] = max(1.0, explore["boost"] / 1.25)
            else:
                explore["boost"] = min(4.0, explore["boost"] * 1.25)
            if n < batch:
                stop = "max_evaluations reached"
                break
        final_keep, target, notes = projected(mean_z())
        score(final_keep, "policy-mean", target, notes)

        seconds = time.perf_counter() - t0
        if best is None:  # no evaluation allowed at all: the policy's mean plan
            best = {"attempt": None, "quality": None, "phase": "policy-mean", "_keep": final_keep}
        for h in history:
            ctx.log({k: v for k, v in h.items() if k != "_keep"})
        ctx.log({"attempt": "summary", "source": "rl", "stop": stop, "agents": A, "agent_kind": agents.kind,
                 "evaluations": state["evals"], "max_evaluations": max_evals, "episodes": state["episodes"],
                 "repeats": state["repeats"], "updates": state["updates"], "proxy_episodes": n_proxy,
                 "proxy": {"kind": proxy.kind, "before": round(proxy_before, 5),
                           "after": round(proxy_after, 5)},
                 "best_attempt": best["attempt"], "best_quality": best["quality"],
                 "best_phase": best["phase"],
                 "initial_keep": [int(k) for k in initial_keep], "learned_keep": [int(k) for k in final_keep],
                 "initial_ratios": bucket_ratios(initial_keep), "learned_ratios": bucket_ratios(final_keep),
                 "buckets": {b.id: b.label for b in log_buckets}, "seconds": round(seconds, 3)})
        keep = best["_keep"]
        q = best["quality"]
        why = (f"rl ({A} {agents.kind} agents, transformer PPO): best of {len(history)} scored plans is "
               f"#{best['attempt']} ({best['phase']}" + (f", quality {q:.4f})" if q is not None else ")")
               + f"; {state['episodes']} episodes, {state['evals']} evaluations")
        return PruningPlan({g.id: int(k) for g, k in zip(problem.groups, keep)}, self.name, why)
