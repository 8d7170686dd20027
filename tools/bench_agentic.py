"""Agentic policy (offline analyst) vs global, at 30% and 50% of the MACs, on two models:

* a CNN trained on ``sklearn.datasets.load_digits`` (quality = accuracy; the search sees the
  validation split, the table reports the test split, no fine-tune);
* torchvision resnet18 with random weights (quality = KL fidelity to the original on random
  calibration images; reported on a separate held-out set).

Prints quality, achieved MACs, band, attempts and time for each run.

    python tools/bench_agentic.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def run_digits(seed: int, budgets):
    import fxprune
    from fxprune.testing.digits import evaluate_accuracy, load_digits_data, train_digits_cnn

    data = load_digits_data(seed)
    n_val = len(data.x_test) // 2
    x_val, y_val = data.x_test[:n_val], data.y_test[:n_val]
    x_te, y_te = data.x_test[n_val:], data.y_test[n_val:]
    model, _ = train_digits_cnn(data, seed=seed)
    rows = []
    for budget in budgets:
        for policy in ("global", "agentic"):
            t = time.perf_counter()
            res = fxprune.compile(model, (data.x_train[:1],), mac_budget=budget, policy=policy,
                                  evaluate=lambda m: evaluate_accuracy(m, x_val, y_val),
                                  calibration_data=[x_val], seed=seed)
            rows.append(dict(model="digits-cnn", seed=seed, budget=budget, policy=policy,
                             macs=res.macs / res.base_macs, in_band=res.report.in_band,
                             quality=evaluate_accuracy(res.model, x_te, y_te), metric="test accuracy",
                             attempts=sum(1 for a in res.report.attempts if a.get("attempt") != "summary"),
                             seconds=time.perf_counter() - t))
    return rows, evaluate_accuracy(model, x_te, y_te)


def run_resnet18(seed: int, budgets):
    import torchvision

    import fxprune
    from fxprune.quality import fidelity

    torch.manual_seed(seed)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 112, 112)
    calib = [torch.randn(16, 3, 112, 112)]
    held = [torch.randn(32, 3, 112, 112)]
    rows = []
    for budget in budgets:
        for policy in ("global", "agentic"):
            t = time.perf_counter()
            res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, calibration_data=calib, seed=seed,
                                  policy_options={"max_attempts": 8})
            rows.append(dict(model="resnet18 (random)", seed=seed, budget=budget, policy=policy,
                             macs=res.macs / res.base_macs, in_band=res.report.in_band,
                             quality=fidelity(model, res.model, held), metric="KL fidelity (held-out)",
                             attempts=sum(1 for a in res.report.attempts if a.get("attempt") != "summary"),
                             seconds=time.perf_counter() - t))
    return rows


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    budgets = ("30%", "50%")
    rows = []
    for seed in range(args.seeds):
        r, base_acc = run_digits(seed, budgets)
        print(f"digits-cnn seed {seed}: unpruned test accuracy {base_acc:.4f}", flush=True)
        rows += r
        if not args.skip_resnet:
            rows += run_resnet18(seed, budgets)
    print(f"\n{'model':18s} {'seed':>4s} {'budget':>6s} {'policy':8s} {'MACs':>6s} {'band':>4s} {'quality':>8s} "
          f"{'attempts':>8s} {'time s':>7s}  metric")
    for r in rows:
        print(f"{r['model']:18s} {r['seed']:4d} {r['budget']:>6s} {r['policy']:8s} {r['macs']:6.3f} "
              f"{'ok' if r['in_band'] else 'NO':>4s} {r['quality']:8.4f} {r['attempts']:8d} {r['seconds']:7.1f}  {r['metric']}")
    print("\nagentic - global (mean over seeds):")
    for model in sorted({r["model"] for r in rows}):
        for budget in budgets:
            d = [a["quality"] - g["quality"] for a in rows for g in rows
                 if a["model"] == g["model"] == model and a["budget"] == g["budget"] == budget
                 and a["seed"] == g["seed"] and a["policy"] == "agentic" and g["policy"] == "global"]
            if d:
                print(f"  {model:18s} {budget}: {np.mean(d):+.4f} (min {min(d):+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
