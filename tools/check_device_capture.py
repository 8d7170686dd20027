"""Count, compile and save/load models that live on a device (CUDA by default), in several dtypes.

Issue 13 item 12: a model on CUDA must capture and compile like one on the CPU (the decomposed
``nn.MultiheadAttention`` projections are created in the original's dtype on its device). Prints one
line per case, ``ok`` or the error, and exits 1 on any failure::

    python tools/check_device_capture.py                  # cuda, float32/float16/bfloat16
    python tools/check_device_capture.py --device cpu     # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


def cases():
    yield "MultiheadAttention", Attn, lambda: (torch.randn(2, 9, 64),)
    yield "TransformerEncoder", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2, enable_nested_tensor=False), \
        lambda: (torch.randn(2, 9, 64),)
    yield "Transformer", lambda: nn.Transformer(64, 4, 1, 1, 128, batch_first=True), \
        lambda: (torch.randn(2, 9, 64), torch.randn(2, 5, 64))

    def conv():
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    yield "resnet18", conv, lambda: (torch.randn(2, 3, 64, 64),)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import fxprune

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here; use --device cpu for a smoke test")
        return 2
    device = torch.device(args.device)
    failures = 0
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for name, build, inputs in cases():
            torch.manual_seed(0)
            model = build().to(device=device, dtype=dtype).eval()
            x = tuple(t.to(device=device, dtype=dtype) for t in inputs())
            try:
                macs = fxprune.count_macs(model, x)
                res = fxprune.compile(model, x, mac_budget="50%", tolerance=0.05)
                with torch.no_grad():
                    y = res.model(*x)
                devices = {p.device for p in res.model.parameters()}
                dtypes = {p.dtype for p in res.model.parameters()}
                assert devices == {device} or devices == {torch.device(device.type, 0)}, devices
                assert dtypes == {dtype}, dtypes
                with tempfile.TemporaryDirectory() as tmp:
                    path = fxprune.save(res.model, Path(tmp) / "m.fxp")
                    loaded = fxprune.load(path, map_location=device)
                    with torch.no_grad():
                        assert torch.equal(loaded(*x), y)
                print(f"ok    {dtype_name:9s} {name:20s} {macs:>12,} -> {res.macs:>12,} MACs")
            except Exception as err:  # report every case
                failures += 1
                print(f"FAIL  {dtype_name:9s} {name:20s} {type(err).__name__}: {str(err)[:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
