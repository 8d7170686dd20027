"""Analytical MACs of all torchvision classification models vs torchvision's own published GMACs.

torchvision ships each model's GMACs in ``get_model_weights(name).DEFAULT.meta["_ops"]`` (no
download needed). fxprune counts conv, linear, matmul/einsum and attention MACs over the traced
graph at the weights' resolution. A count passes when it is within 0.5% of the published figure or
equal at the figure's own 3-decimal precision (mobilenet_v3_small 0.057, shufflenet_v2_x0_5 0.040).

    python tools/mac_oracle_sweep.py            # all 80 models
    python tools/mac_oracle_sweep.py vit_h_14   # some
"""

from __future__ import annotations

import sys
import time
import warnings


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    import torch
    import torchvision
    from torchvision.models import get_model_weights, list_models

    import fxprune
    from fxprune.models import torchvision_model

    torch.set_grad_enabled(False)
    names = argv or list_models(module=torchvision.models)
    print(f"{'model':22s} {'input':>5s} {'published':>10s} {'fxprune':>10s} {'error %':>8s} {'count s':>7s}  result")
    passed, errors = 0, []
    for name in names:
        w = get_model_weights(name).DEFAULT
        ref = w.meta["_ops"]
        model, size = torchvision_model(name)
        x = torch.randn(1, 3, size, size)
        t = time.perf_counter()
        try:
            got = fxprune.count_macs(model, x) / 1e9
        except fxprune.FxpruneError as err:
            print(f"{name:22s} {size:5d} {ref:10.3f} {'-':>10s} {'-':>8s} {'-':>7s}  ERROR {err}")
            continue
        seconds = time.perf_counter() - t
        err = (got - ref) / ref * 100
        ok = abs(err) < 0.5 or round(got, 3) == ref
        passed += ok
        errors.append(abs(err))
        print(f"{name:22s} {size:5d} {ref:10.3f} {got:10.4f} {err:+8.3f} {seconds:7.2f}  "
              f"{'ok' if ok else 'FAIL'}{' (equal at 3 decimals)' if ok and abs(err) >= 0.5 else ''}", flush=True)
    errors.sort()
    print(f"\n{passed}/{len(names)} within 0.5% (or equal at the published precision); "
          f"|error| median {errors[len(errors) // 2]:.3f}%, max {errors[-1]:.3f}%")
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
