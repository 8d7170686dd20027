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
