"""Smoke test of tools/bench_scale.py on tiny configurations (the measurements themselves are the
tool's job on a quiet machine; here: it runs, and the memory-mapped checkpoint path is sound)."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    from fxprune import progress

    spec = importlib.util.spec_from_file_location("bench_scale", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    yield mod
    # the tool's child sets these for its whole (fresh) process: undo them for the other tests
    progress.set_enabled(None)
    torch.set_num_threads(threads)


def test_checkpoint_is_written_tensor_by_tensor_and_loads_memory_mapped(bench, tmp_path):
    ck = bench.write_checkpoint("llama-tiny", tmp_path / "ck")
    raw = (ck / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous, no holes
    assert ends[-1][1] == len(raw) - 8 - n
    assert bench.write_checkpoint("llama-tiny", tmp_path / "ck") == ck  # reused, not rewritten
    rec = bench.child_compile("llama-tiny", "bf16", 16, 1, False, str(ck))
    assert rec["in_band"] and rec["shares_storage_with_user"] == 0
    assert rec["weights_bytes"] > 0 and rec["peak"]["VmRSS"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16)
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and w.abs().sum() > 0


def test_meta_plan_and_fit(bench):
    rec = bench.child_compile("llama-tiny", "fp32", 16, 1, True, None)
    assert rec["plan_only"] and rec["macs"] <= rec["base_macs"] // 2
    recs = [{"model": str(i), "nodes": n, "seconds": 0.01 * n + 0.5, "params": 1e6 * i} for i, n in
            enumerate([10, 50, 100, 400, 800], 1)]
    fit = bench.fit_zoo(recs)
    assert fit["slope_ms_per_node"] == pytest.approx(10.0) and fit["r2"] == pytest.approx(1.0)
