"""A seeded sample of 40 timm architectures through every check of the timm sweep
(``tools/sweep_timm.py --all``), at small input sizes where the model allows.

For each model (random weights): compile to 50% of its MACs -> the original's count equals the
independent count (``torch.utils.flop_counter`` on meta tensors) and is exact -> the band holds by
the independent count of the pruned model, which equals ``result.macs`` -> the pruned model runs at
batch size 2 and at another input size where the original accepts one -> ONNX Runtime matches at
batch sizes 1 and 2. The sample is drawn by ``tools/sweep_timm.py --ci-sample 40 --seed 0``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from fxprune.testing.timm_cases import CI_SAMPLE, check_case  # noqa: E402


@pytest.mark.parametrize("name", sorted(CI_SAMPLE))
def test_timm_sample(name):
    kwargs, shape = CI_SAMPLE[name]
    rec = check_case(name, create_kwargs=kwargs, input_size=shape)
    assert rec["status"] == "pass", {k: rec.get(k) for k in ("status", "stage", "failed", "errors", "reason",
                                                             "healed", "err_pct")}
    assert not rec.get("healed"), rec["healed"]  # the safety net is not what makes the sample pass


def test_tf_same_padding_stays_dynamic_in_onnx(tmp_path):
    """timm's TF-"SAME" padding computes its pad from the input size (``max(ceil(x/s)...-x, 0)``);
    the TorchScript exporter hands sizes out as 0-d tensors, and the ONNX keeps height and width
    symbolic and matches at another size."""
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    import fxprune

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0").eval()
    res = fxprune.compile(model, (torch.randn(1, 3, 64, 64),), mac_budget="50%")
    path = tmp_path / "m.onnx"
    res.export_onnx(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [d if isinstance(d, str) else None for d in sess.get_inputs()[0].shape[2:]] == ["height", "width"]
    x = torch.randn(2, 3, 75, 90)
    with torch.no_grad():
        want = res.model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_leaf_recorded_with_torch_export_follows_the_input_size():
    """TinyViT's blocks are opaque to torch.fx and take ``[B, H, W, C]``; the spliced torch.export
    record keeps H and W symbolic (found by running at other input sizes, not by layout), and is
    recorded at a size where the padding path runs when the example skips it (224 px: the last
    stage is exactly one 7x7 window)."""
    import timm
    import torch

    from fxprune.capture import capture

    torch.manual_seed(0)
    model = timm.create_model("tiny_vit_5m_224").eval()
    cap = capture(model, (torch.randn(1, 3, 224, 224),))
    gm = cap.gm if hasattr(cap, "gm") else cap
    assert not any(n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "TinyVitBlock"
                   for n in gm.graph.nodes)
    for side in (160, 256):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_timm_sweep_forks_each_model_from_the_preloaded_server(tmp_path):
    """tools/sweep_timm.py end to end on one small model: its process is forked from the server
    that preloaded torch/timm/fxprune, and the record comes back through the pipe; the summary file
    it appends to is resumable (a second run skips the model)."""
    import json
    import os
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "sweep_timm.py")
    out = tmp_path / "sweep.jsonl"
    cmd = [sys.executable, tool, "resnet10t", "--small", "64", "--no-onnx", "--results", str(out), "--timeout", "600"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["model"] == "resnet10t" and rec["status"] == "pass", rec
    assert rec["pruned_independent_macs"] == rec["macs"] <= rec["budget"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "1 already in" in again.stdout
    assert len(out.read_text().splitlines()) == 1
