"""Grouped convs pruned by whole groups vs within their groups: accuracy and ONNX Runtime latency.

fxprune prunes a grouped conv with more groups than channels per group (RegNet, ResNeXt's early
stages) by **whole conv groups**: the channels per group stay and the group count shrinks. The
alternative keeps the group count and prunes **within** every group. This benchmark compares them
on a ResNeXt-style CNN trained on scikit-learn's digits (random init, fixed split):

* each mode (``compile(..., grouped_convs="whole" | "within")``) compiles the same trained model
  at each MAC budget with the ``uniform`` and the ``global`` policy;
* every pruned model gets the same recovery fine-tune (``fxprune.finetune``, the unpruned model as
  teacher) and its test accuracy is measured; with ``--seeds`` the model and the fine-tune change;
* each plan is timed once on ONNX Runtime CPU (1 thread, batch ``--batch``), interleaved.

    python tools/bench_grouped_conv.py                     # seeds 0 1 2, budgets 50% 30%
    python tools/bench_grouped_conv.py --seeds 0 --budgets 50%
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import torch.nn as nn
import torch.nn.functional as F


class DigitsResNeXt(nn.Module):
    """Stem, two bottleneck blocks with a 32-group 3x3 conv (4 channels per group), a head."""

    def __init__(self, width: int = 64, inner: int = 128, groups: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.Sequential(
                nn.Conv2d(width, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
                nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
                nn.Conv2d(inner, width, 1, bias=False), nn.BatchNorm2d(width)))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def train(data, seed: int, epochs: int) -> nn.Module:
    from fxprune.testing.digits import train_digits_cnn

    return train_digits_cnn(data, epochs=epochs, seed=seed, model_fn=DigitsResNeXt)[0]


def compile_mode(model, x, budget: str, policy: str, mode: str):
    import fxprune

    return fxprune.compile(model, (x,), mac_budget=budget, policy=policy, grouped_convs=mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", default=["50%", "30%"])
    p.add_argument("--policies", nargs="+", default=["uniform", "global"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from fxprune import progress
    from fxprune.cost_models.latency import Candidate
    from fxprune.finetune import finetune
    from fxprune.runtimes import OrtRuntime
    from fxprune.testing.digits import evaluate_accuracy, load_digits_data

    progress.set_enabled(False)
    data = load_digits_data(0)
    rows: dict[tuple, list] = {}
    for seed in args.seeds:
        model = train(data, seed, args.epochs)
        base_acc = evaluate_accuracy(model, data.x_test, data.y_test)
        rows.setdefault(("original", "", ""), []).append((base_acc, base_acc, None, 1.0))
        x = data.x_train[:args.batch]
        cands, labels = [Candidate("original", 0, model)], []
        for budget in args.budgets:
            for policy in args.policies:
                for mode in ("whole", "within"):
                    res = compile_mode(model, data.x_train[:1], budget, policy, mode)
                    pruned = res.model
                    before = evaluate_accuracy(pruned, data.x_test, data.y_test)
                    finetune(pruned, data.train_batches(seed=seed), teacher=model, epochs=args.ft_epochs, seed=seed,
                             progress=False)
                    after = evaluate_accuracy(pruned.eval(), data.x_test, data.y_test)
                    groups = [m.groups for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
                    key = (budget, policy, mode)
                    rows.setdefault(key, []).append((before, after, groups, res.macs / res.report.base_macs))
                    cands.append(Candidate("/".join(key), res.macs, pruned))
                    labels.append(key)
        rt = OrtRuntime("cpu", threads=1, example_inputs=(x,), warmup=5, rounds=10, runs_per_round=20)
        timings = rt.measure(cands)
        for key, t in zip(labels, timings[1:]):
            rows[key][-1] = rows[key][-1] + (t.median_ms / timings[0].median_ms,)
        print(f"[seed {seed} done]", file=sys.stderr, flush=True)

    print(f"\n## Grouped convs: whole groups vs within groups (digits ResNeXt-style CNN, {len(args.seeds)} seed(s), "
          f"{args.ft_epochs}-epoch KD fine-tune; ORT CPU 1 thread, batch {args.batch})\n")
    print("| budget | policy | mode | MACs kept | conv groups kept (seed 0) | test acc before FT | after FT (mean) | "
          "per seed | time vs original |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, vals in rows.items():
        if key[0] == "original":
            accs = [v[0] for v in vals]
            print(f"| original | | | 100% | | | {statistics.mean(accs):.4f} | "
                  f"{', '.join(f'{a:.4f}' for a in accs)} | 1.00 |")
            continue
        print(f"| {key[0]} | {key[1]} | {key[2]} | {statistics.mean(v[3] for v in vals):.1%} | {vals[0][2]} | "
              f"{statistics.mean(v[0] for v in vals):.4f} | **{statistics.mean(v[1] for v in vals):.4f}** | "
              f"{', '.join(f'{v[1]:.4f}' for v in vals)} | {statistics.mean(v[4] for v in vals):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
