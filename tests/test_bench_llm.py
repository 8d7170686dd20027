"""Smoke test of tools/bench_llm.py's pieces: the corpus split, the analytic MACs, the Torch-Pruning recipe."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_fxprune_tools_bench_llm", os.path.join(TOOLS, "bench_llm.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_corpus_is_the_standard_library_split_by_file(bench):
    a, b = bench.load_corpus(), bench.load_corpus()
    assert a.sha == b.sha and a.files_heldout > 0 and len(a.heldout) > 100_000 and len(a.train) > 5 * len(a.heldout)
    assert b"def " in a.heldout.tobytes()[:200_000]
    w = bench.eval_windows(a.heldout, 8)
    assert w.shape == (8, bench.SEQ) and w.dtype == torch.int64
    batches = bench.random_batches(a.train, 2, 3, seed=0)
    assert torch.equal(batches[0]["input_ids"], bench.random_batches(a.train, 2, 3, seed=0)[0]["input_ids"])


def test_analytic_macs_and_the_torch_pruning_recipe(bench):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    cfg = bench.model_config(quick=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, bench.SEQ))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert fxprune.count_macs(model, x) == bench.llama_macs(model.config)
    pruned = bench.tp_prune(model, 0.25)
    assert pruned.config.hidden_size < cfg.hidden_size and pruned.config.intermediate_size < cfg.intermediate_size
    assert fxprune.count_macs(pruned, x) == bench.llama_macs(pruned.config) < bench.llama_macs(model.config)
    with torch.no_grad():
        assert np.isfinite(bench.perplexity(pruned, ids.repeat(2, 1)))
    assert model.config.hidden_size == cfg.hidden_size  # the recipe works on a copy
