"""policy="rl": the transformer multi-agent PPO allocator, on hand-built problems and end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxprune
from fxprune.policies.base import GroupSpec, PruningProblem, SearchContext
from fxprune.policies.rl import FEATURES, ImportanceProxy, RLPolicy, _coupling, _make_agents, agent_features
from fxprune.policies.solver import allowed_keeps
from fxprune.testing.zoo import tiny_model


def chain_problem(sizes=(16, 32, 32, 64, 64, 128), spatial=(256, 256, 64, 64, 16, 16), *, budget_frac=0.5,
                  budget=None, tolerance=0.02, multiple=1, seed=0) -> PruningProblem:
    """A plain conv chain: MACs = sum_g 9 * k_{g-1} * k_g * HW_g + a classifier (quadratic in the keeps)."""
    G = len(sizes)
    n = np.asarray(sizes, dtype=np.float64)
    hw = np.asarray(spatial, dtype=np.float64)

    def cost(K):
        K = np.atleast_2d(np.asarray(K, dtype=np.float64))
        prev = np.concatenate([np.full((K.shape[0], 1), 3.0), K[:, :-1]], axis=1)
        return np.rint((9.0 * prev * K * hw).sum(axis=1) + 10.0 * K[:, -1]).astype(np.int64)

    base = int(cost(n)[0])
    without = np.repeat(n[None], G, axis=0)
    without[np.arange(G), np.arange(G)] = 0
    shares = (base - cost(without)) / base
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(G):
        imp = rng.gamma(2.0, 1.0, int(n[g]))
        allowed = allowed_keeps(int(n[g]), multiple=multiple)
        groups.append(GroupSpec(g, f"layer{g}", "channels", int(n[g]), 1, allowed, f"bucket{g}",
                                (f"layer{g}",), float(shares[g]), tuple((imp / imp.mean()).tolist())))
    mins = np.array([s.allowed[0] for s in groups])
    b = int(base * budget_frac) if budget is None else int(budget)
    return PruningProblem(tuple(groups), base, b, int(np.ceil(b * (1 - tolerance))), int(cost(mins)[0]),
                          int(cost(np.zeros(G))[0]), cost)


class Counter:
    """A quality signal that counts its calls: minus the squared distance of the ratios to ``optimum``."""

    def __init__(self, problem, optimum):
        self.problem, self.optimum, self.calls = problem, np.asarray(optimum), 0

    def __call__(self, plan):
        self.calls += 1
        r = self.problem.dense(plan.keep) / self.problem.sizes
        return -float(((r - self.optimum) ** 2).sum())


def run(problem, quality, seed=0, **options):
    logs = []
    ctx = SearchContext(quality=quality, seed=seed, log=logs.append, options=options)
    plan = RLPolicy().select(problem, ctx)
    attempts = [a for a in logs if a["attempt"] != "summary"]
    summary = [a for a in logs if a["attempt"] == "summary"]
    assert len(summary) == 1 and logs[-1] is summary[0]
    return plan, attempts, summary[0]


def in_band(problem, keep):
    return problem.lower <= problem.macs(keep) <= problem.budget


OPTIMUM = np.array([0.9, 0.3, 0.8, 0.35, 0.75, 0.5])


@pytest.fixture(scope="module")
def known_optimum():
    """A chain whose band holds the allocation OPTIMUM; the reward peaks there."""
    p = chain_problem()
    target = p.cost(np.round(p.sizes * OPTIMUM))[0]
    return chain_problem(budget=int(target / 0.99))


def test_plan_in_band_bounded_evaluations_and_log(known_optimum):
    p = known_optimum
    q = Counter(p, OPTIMUM)
    plan, attempts, summary = run(p, q, max_evaluations=9, proxy_episodes=32)
    assert plan.policy == "rl" and in_band(p, plan.keep)
    assert q.calls <= 9 and summary["evaluations"] == q.calls == len(attempts)
    assert attempts[0]["phase"] == "baseline:global"
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    for a in attempts:
        assert a["source"] == "rl" and a["in_band"] and p.lower <= a["macs"] <= p.budget
        assert set(a["ratios"]) == set(summary["buckets"]) and isinstance(a["quality"], float)
    best = max(attempts, key=lambda a: a["quality"])
    assert summary["best_quality"] == best["quality"] and best["best_so_far"]
    assert sum(a["best_so_far"] for a in attempts) == 1
    assert np.isclose(q(plan), best["quality"])  # the returned plan is the best one scored


@pytest.mark.parametrize("max_evaluations", [0, 1, 2])
def test_tiny_evaluation_budgets(known_optimum, max_evaluations):
    p = known_optimum
    q = Counter(p, OPTIMUM)
    plan, attempts, summary = run(p, q, max_evaluations=max_evaluations, proxy_episodes=16)
    assert q.calls <= max_evaluations and in_band(p, plan.keep)
    if max_evaluations == 1:
        assert [a["phase"] for a in attempts] == ["baseline:global"]


def test_deterministic_and_leaves_global_rng_alone(known_optimum):
    p = known_optimum
    torch.manual_seed(123)
    np.random.seed(7)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = run(p, Counter(p, OPTIMUM), seed=3, max_evaluations=10, proxy_episodes=32)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
    b = run(p, Counter(p, OPTIMUM), seed=3, max_evaluations=10, proxy_episodes=32)
    assert a[0].keep == b[0].keep
    assert [x["quality"] for x in a[1]] == [x["quality"] for x in b[1]]
    assert a[2]["learned_keep"] == b[2]["learned_keep"]
    c = run(p, Counter(p, OPTIMUM), seed=4, max_evaluations=10, proxy_episodes=32)
    assert [x["ratios"] for x in c[1]] != [x["ratios"] for x in a[1]]


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_learns_towards_the_known_optimum(known_optimum, seed):
    """Real-reward learning only (no proxy): the policy's mean allocation moves to OPTIMUM (not only the
    best sample does)."""
    p = known_optimum
    q = Counter(p, OPTIMUM)
    plan, attempts, summary = run(p, q, seed=seed, max_evaluations=80, proxy_episodes=0)
    sizes = p.sizes
    start = np.abs(np.array(summary["initial_keep"]) / sizes - OPTIMUM).sum()
    learned = np.abs(np.array(summary["learned_keep"]) / sizes - OPTIMUM).sum()
    assert start > 1.0  # the global plan is far from it ...
    # ... and the policy itself got much closer (from the global plan of 2026-12-05: 0.49-0.52 of the
    # starting distance after 80 evaluations; the learned mean is noisy, 0.2-0.55 across budgets)
    assert learned < 0.6 * start
    assert summary["updates"] >= 10 and q.calls <= 80
    # the reward is <= 0 and peaks (near 0) at OPTIMUM: the best plan closes most of the global seed's gap
    seed_quality = attempts[0]["quality"]
    assert attempts[0]["phase"] == "baseline:global" and seed_quality < -0.1
    assert summary["best_quality"] > 0.25 * seed_quality


def test_failed_evaluations_never_win(known_optimum):
    p = known_optimum
    inner = Counter(p, OPTIMUM)

    def flaky(plan):
        q = inner(plan)
        return float("nan") if inner.calls % 3 == 2 else q

    plan, attempts, summary = run(p, flaky, max_evaluations=12, proxy_episodes=16)
    assert in_band(p, plan.keep) and np.isfinite(summary["best_quality"])
    assert any(np.isnan(a["quality"]) for a in attempts)
    assert summary["best_quality"] == max(a["quality"] for a in attempts if np.isfinite(a["quality"]))


def test_proxy_pretraining_without_quality_signal():
    """No quality signal: the zero-cost proxy is the reward throughout; pre-training from a uniform prior
    closes most of the gap to the global plan (which the log-mass proxy rates near its optimum), and
    from the global prior it never hands on a worse mean than it started from."""
    p = chain_problem(budget_frac=0.35, seed=1)
    proxy = ImportanceProxy(p)
    global_score = None
    for prior in ("uniform", "global"):
        plan, attempts, summary = run(p, None, proxy_episodes=256, episodes=24, prior=prior)
        before, after = summary["proxy"]["before"], summary["proxy"]["after"]
        baseline = [a for a in attempts if a["phase"] == "baseline:global"]
        global_score = baseline[0]["quality"]
        if prior == "uniform":
            assert before < global_score - 0.005  # a real gap to close
            assert after - before > 0.75 * (global_score - before)
        else:
            assert after >= before
        assert in_band(p, plan.keep) and summary["evaluations"] == 0
    assert all(a["reward"] == "proxy:log_mass" for a in attempts)
    best = max(a["quality"] for a in attempts)
    assert best >= global_score
    assert np.isclose(proxy.score(p.dense(plan.keep)[None])[0], best)


def test_proxy_fit_lands_on_the_budget():
    p = chain_problem(budget_frac=0.4)
    rng = np.random.default_rng(0)
    keep = ImportanceProxy(p).fit(rng.random((64, len(p.groups))))
    costs = p.cost(keep)
    assert (costs <= p.budget).all() and (costs >= 0.995 * p.budget).all()
    mins = np.array([g.allowed[0] for g in p.groups])
    assert (keep >= mins - 1e-9).all() and (keep <= p.sizes + 1e-9).all()


def test_features_and_coupling_from_the_problem():
    p = chain_problem()
    C = _coupling(p)
    G = len(p.groups)
    for g in range(G - 1):
        assert C[g, g + 1] > 0 and C[g + 1, g] == C[g, g + 1]  # producer/consumer pairs share MAC terms
    for g in range(G - 2):
        assert C[g, g + 2] == 0
    agents = _make_agents(p, "auto", 24)
    X = agent_features(p, agents, np.full(G, 0.5), C)
    assert X.shape == (G, len(FEATURES)) and np.isfinite(X).all()


def test_many_groups_use_bucket_agents():
    sizes = tuple([16, 32] * 15)
    p = chain_problem(sizes, tuple([64] * 30), budget_frac=0.45, multiple=8)
    q = Counter(p, np.full(30, 0.5))
    plan, attempts, summary = run(p, q, max_evaluations=6, proxy_episodes=32, max_agents=8)
    assert summary["agent_kind"] == "buckets" and summary["agents"] <= 8
    assert in_band(p, plan.keep) and q.calls <= 6
    assert all(a["in_band"] for a in attempts)


def test_unknown_option_is_a_policy_error():
    model, inputs = tiny_model("residual")
    with pytest.raises(fxprune.errors.PolicyError):
        fxprune.compile(model, inputs, mac_budget="50%", policy="rl", policy_options={"init": {"bogus": 1}})


def test_compile_end_to_end_lists_attempts():
    model, inputs = tiny_model("residual")
    res = fxprune.compile(model, inputs, mac_budget="50%", policy="rl")
    r = res.report
    assert r.in_band and r.policy == "rl"
    attempts = [a for a in r.attempts if a.get("attempt") != "summary"]
    summary = [a for a in r.attempts if a.get("attempt") == "summary"]
    assert attempts and attempts[0]["phase"] == "baseline:global" and len(summary) == 1
    assert all(a["source"] == "rl" and a["in_band"] and a["quality"] is not None for a in attempts)
    assert summary[0]["evaluations"] <= 24
    assert any("rl (" in n for n in r.notes)
    r.dumps()  # the report (attempts included) is JSON


def test_compile_with_evaluate_is_bounded_and_deterministic():
    model, inputs = tiny_model("residual")
    calls = []

    def evaluate(m):
        calls.append(1)
        with torch.no_grad():
            return -float((m(*inputs) - model(*inputs)).pow(2).mean())

    kw = dict(mac_budget="40%", policy="rl", channel_multiple=1, tolerance=0.02, evaluate=evaluate,
              policy_options={"max_evaluations": 8, "proxy_episodes": 64})
    a = fxprune.compile(model, inputs, **kw)
    n = len(calls)
    assert a.report.in_band and n <= 8
    b = fxprune.compile(model, inputs, **kw)
    assert a.keep == b.keep
    assert [x.get("quality") for x in a.report.attempts] == [x.get("quality") for x in b.report.attempts]
