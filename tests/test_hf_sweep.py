"""A seeded sample of the Hugging Face family sweep (``tools/sweep_hf.py``) in CI.

Ten families drawn with a fixed seed from ``fxprune.testing.hf_cases`` (small configs, random
weights), each through the sweep's checks: compile at 50% of the MACs; the pruned model's MACs
counted independently (``FlopCounterMode``, halved, math SDPA) inside the band; the pruned model
runs at another batch size and, where the original accepts one, another sequence length / image
size / audio length; ONNX Runtime matches the pruned model at batch 1 and 3 and at that other size.

A family that fails only on a known limitation tracked elsewhere in fxprune (decoders built with
the default ``use_cache=True``, until capture disables the cache on its copy) is an expected
failure with that reason; once the limitation is lifted the case must pass.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from fxprune.testing.hf_cases import ci_sample, run_case  # noqa: E402

SAMPLE = ci_sample(10, seed=14)


@pytest.mark.parametrize("family", SAMPLE)
def test_hf_family_compiles_and_passes_every_check(family):
    rec = run_case(family, budget="50%")
    if "known_limitation" in rec:
        pytest.xfail(f"{family}: {rec['known_limitation']}")
    assert "error" not in rec, rec["error"]
    assert rec["band_ok"], (f"independent count {rec['ref_macs']:,} outside "
                            f"[{rec['lower_macs']:,}, {rec['budget_macs']:,}]")
    assert rec["count_equal"], f"fxprune counted {rec['macs']:,}, FlopCounterMode {rec['ref_macs']:,}"
    assert rec["batch_ok"]
    assert rec.get("size_ok", True), rec.get("size_error")
    assert rec["onnx_ok"], rec
    assert rec["pruned_groups"] > 0 and rec["macs"] < rec["base_macs"]


def test_sample_is_seeded_and_spans_the_kinds():
    from fxprune.testing.hf_cases import CASES

    assert ci_sample(10, seed=14) == SAMPLE  # the same list on every run
    assert len({CASES[f].kind for f in SAMPLE}) >= 3
