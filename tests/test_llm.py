"""Language models stay language models: Hugging Face decoders pruned into models that still generate.

Small configs with random weights and the default ``use_cache=True``: LLaMA (multi-head), Qwen2
(grouped-query attention, attention bias), Mistral (GQA), Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), GPT-2 (transformers' ``Conv1D``, tied embeddings), Gemma 2 (embeddings scaled by
sqrt(hidden_size), so the residual width stays whole), OLMo 2 (q/k norms over all heads), StableLM,
GPT-NeoX, OPT and Falcon (head_dim follows hidden_size // heads, so the residual is tied to the heads;
other layer naming, a fused head-interleaved ``query_key_value``, ``ffn_dim``, multi-query attention).
Each compiles at 50% of
its MACs, comes back through ``result.to_hf()`` as its own class with an updated config,
generates with the KV cache exactly what a full-prefix greedy loop on the pruned graph produces,
and round-trips through ``save_pretrained`` / ``from_pretrained`` with identical logits.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.errors import ConfigError  # noqa: E402
from fxprune.policies.base import GroupSpec, PruningProblem  # noqa: E402
from fxprune.tying import Tie, collapse, expand_keep, layer_ties  # noqa: E402

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
# mixtures of experts: twice as wide (the experts keep multiples of 8 channels: a 64-wide model is too coarse
# for the 1% band), 8 heads so head_dim stays 16
_MOE = dict(_COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=8)


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**_COMMON)
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**_COMMON, num_key_value_heads=2)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    if family == "mistral":
        cfg = transformers.MistralConfig(**_COMMON, num_key_value_heads=2)
        return transformers.MistralForCausalLM(cfg).eval()
    if family == "phi3":
        cfg = transformers.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0)
        return transformers.Phi3ForCausalLM(cfg).eval()
    if family == "gemma2":  # embeddings scaled by sqrt(hidden_size): the residual width stays whole
        cfg = transformers.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16, pad_token_id=0)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if family == "olmo2":  # q/k RMSNorm over all heads at once
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_COMMON, pad_token_id=0)).eval()
    if family == "stablelm":  # head_dim = hidden_size // num_attention_heads: residual tied to the heads
        cfg = transformers.StableLmConfig(**_COMMON, num_key_value_heads=4, pad_token_id=0)
        return transformers.StableLmForCausalLM(cfg).eval()
    if family == "gpt_neox":  # fused, head-interleaved query_key_value; attention.dense; dense_4h_to_h
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_COMMON)).eval()
    if family == "opt":  # fc1/fc2 directly in the layer; ffn_dim; word_embed_proj_dim follows the stream
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
        return transformers.OPTForCausalLM(cfg).eval()
    if family == "falcon":  # multi-query: [queries, one key, one value] fused; head_dim a read-only property
        cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
        return transformers.FalconForCausalLM(cfg).eval()
    if family == "mixtral":  # a mixture of experts: 3-D expert weights, grouped matmuls, top-2 routing
        cfg = transformers.MixtralConfig(**_MOE, num_key_value_heads=2, num_local_experts=4, pad_token_id=0)
        return transformers.MixtralForCausalLM(cfg).eval()
    if family == "qwen2_moe":  # experts sized by moe_intermediate_size, plus a gated shared expert
        cfg = transformers.Qwen2MoeConfig(**_MOE, num_key_value_heads=2, num_experts=4, moe_intermediate_size=128,
                                          shared_expert_intermediate_size=256, pad_token_id=0)
        return transformers.Qwen2MoeForCausalLM(cfg).eval()
    if family == "gpt_oss":  # interleaved gate/up experts with biases (x[..., ::2]), a learned sink per head
        cfg = transformers.GptOssConfig(**_MOE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                        head_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=1)
        return transformers.GptOssForCausalLM(cfg).eval()
    if family == "gpt_bigcode":  # StarCoder's layout: multi-query attention fused in an nn.Linear c_attn
        cfg = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            multi_query=True, bos_token_id=0, eos_token_id=1)
        return transformers.GPTBigCodeForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=1)
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise ValueError(family)


def tokens(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gpt2", "gemma2", "olmo2", "stablelm", "gpt_neox", "opt", "falcon",
            "mixtral", "qwen2_moe", "gpt_oss", "gpt_bigcode"]
_WIDTHS = ("n_embd", "n_head", "n_inner", "hidden_size", "num_attention_heads", "num_key_value_heads",
           "intermediate_size", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def _widths(cfg) -> dict:
    out = {k: getattr(cfg, k) for k in _WIDTHS if getattr(cfg, k, None) is not None}
    if "n_embd" in out:  # GPT-2 and GPT-J: n_inner None is 4 * n_embd
        out.setdefault("n_inner", 4 * out["n_embd"])
    return out


@functools.lru_cache(maxsize=None)
def _compile(family: str):
    from transformers.tokenization_utils_base import BatchEncoding

    model = make(family)
    assert model.config.use_cache  # the default: the capture turns it off on its own copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # LLaMA gets a tokenizer's BatchEncoding (any Mapping of tensors is keyword inputs)
    example = BatchEncoding(tokens()) if family == "llama" else tokens()
    res = fxprune.compile(model, example, mac_budget="50%")
    assert model.config.use_cache, "the caller's config must not change"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return family, model, res


@pytest.fixture(scope="module", params=FAMILIES)
def compiled(request):
    return _compile(request.param)


def test_decoder_compiles_in_band_and_rebuilds_as_its_own_class(compiled):
    family, model, res = compiled
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert any("layer_uniform" in n for n in res.report.notes)
    hf = res.to_hf()
    assert type(hf) is type(model)
    old, new = _widths(model.config), _widths(hf.config)
    assert new.keys() == old.keys() and new != old and all(new[k] <= old[k] for k in old), (old, new)
    assert hf.config.use_cache
    if family == "gpt2":  # what GPT-2's config can express: the attention width is the residual width
        assert hf.config.n_embd == hf.config.n_head * (model.config.n_embd // model.config.n_head)
    elif family in ("stablelm", "gpt_neox", "opt", "falcon", "gpt_bigcode"):  # head_dim = hidden_size // heads: tied
        assert hf.config.hidden_size == hf.config.num_attention_heads * 16
    else:
        assert hf.config.head_dim == 16
    if family == "gemma2":  # its embeddings are scaled by sqrt(hidden_size): the stream is left whole
        assert hf.config.hidden_size == 64
        assert any("left whole" in n and "input embeddings by 8" in n for n in res.report.notes), res.report.notes
    # every layer has the same widths (the config has one), and the per-layer groups agree
    by_role = {}
    for g in res.report.groups:
        if ".0." in g.name or ".1." in g.name:
            role = (g.kind, g.size, tuple(sorted({m.replace(".1.", ".0.") for m in g.members})))
            by_role.setdefault(role, set()).add(g.keep)
    assert by_role and all(len(v) == 1 for v in by_role.values()), by_role
    # the rebuilt model computes what the pruned graph computes, at other shapes too
    x = tokens(3, 11, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(**x).logits, res.model(**x).logits, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in hf.parameters()) < sum(p.numel() for p in model.parameters())
    if family in ("mixtral", "qwen2_moe", "gpt_oss"):  # the grouped-matmul kernels need widths in multiples of 8
        experts = hf.get_submodule("model.layers.0.mlp.experts")
        inter = 1 if experts.is_transposed else 2  # GPT-OSS stores down_proj as [E, I, H]
        assert experts.down_proj.shape[0] == 4 and experts.down_proj.shape[inter] % 8 == 0
        assert hf.config.hidden_size % 8 == 0
        if family != "qwen2_moe":  # their experts hold most of the MACs
            before = model.get_submodule("model.layers.0.mlp.experts").down_proj.shape[inter]
            assert experts.down_proj.shape[inter] < before


def test_generate_with_kv_cache_equals_a_full_prefix_greedy_loop(compiled):
    _, _, res = compiled
    hf = res.to_hf()
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    steps = 20
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, use_cache=True)
    seq = prompt
    with torch.no_grad():  # the pruned graph, no cache: the whole prefix every step
        for _ in range(steps):
            logits = res.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.shape == (1, 5 + steps)
    assert torch.equal(out, seq)
    # the rebuilt model is plain transformers code: it moves to another dtype (bf16) and still generates
    short = hf.to(torch.bfloat16).generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert short.shape == (1, 8)


def test_save_pretrained_from_pretrained_reproduces_the_logits(compiled, tmp_path):
    from fxprune.hf import save_pretrained

    family, model, res = compiled
    hf = res.to_hf()
    save_pretrained(res, tmp_path / "pruned")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(back) is type(model)
    x = tokens(2, 9, seed=3)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, hf(**x).logits)
    assert not list(tmp_path.glob(".pruned*")), "no temporary directory left behind"


# ------------------------------------------------------------------------------------------ GPT-2

def test_gpt2_conv1d_layers_are_prunable():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2Model(cfg).eval()  # no LM head: before the Conv1D rule it had 0 groups
    res = fxprune.compile(model, tokens(), mac_budget="50%")
    kinds = {(g.kind, g.name.split(".")[-1]) for g in res.report.groups}
    assert ("heads", "c_attn") in kinds and ("channels", "c_fc") in kinds
    assert fxprune.count_macs(res.model, tokens()) == res.macs
    hf = res.to_hf()
    assert type(hf) is transformers.GPT2Model
    with torch.no_grad():
        torch.testing.assert_close(hf(**tokens(2, 5)).last_hidden_state, res.model(**tokens(2, 5))[0],
                                   atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- to_hf errors

def test_to_hf_refuses_per_layer_widths_and_other_models():
    from fxprune._compile import open_session

    model = make("llama")
    session = open_session(model, tokens(), layer_uniform=False)
    assert session.layout is None
    keep = np.array([g.n for g in session.graph.groups])
    mlp = [i for i, g in enumerate(session.graph.groups) if g.name.endswith("gate_proj")]
    keep[mlp[0]] = 64  # layer 0 keeps half its MLP, layer 1 all of it
    gm, _ = session.materialize(keep)

    class Result:
        hf_source = session.hf_source
        model = gm

    with pytest.raises(ConfigError, match="per layer"):
        fxprune.hf.to_hf(Result())
    plain = fxprune.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8),
                            mac_budget="50%")
    with pytest.raises(ConfigError, match="Hugging Face"):
        plain.to_hf()


# ------------------------------------------------------------------------------- mixture of experts

def test_expert_macs_follow_the_routed_tokens():
    """Grouped matmuls are counted per routed row: top-2 routing costs one more pass of every token
    through an expert's three projections than top-1 (3 * hidden * intermediate per token and layer)."""
    from fxprune.testing.hf_cases import independent_macs

    counts = {}
    for k in (1, 2):
        torch.manual_seed(0)
        cfg = transformers.MixtralConfig(**_MOE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=k)
        model = transformers.MixtralForCausalLM(cfg).eval()
        counts[k] = fxprune.count_macs(model, tokens())
        # the independent count of what the model dispatches (grouped matmuls by their shapes) agrees
        assert counts[k] == independent_macs(model, tokens())
    n_tokens, hidden, inter, layers = 2 * 16, _MOE["hidden_size"], _MOE["intermediate_size"], 2
    assert counts[2] - counts[1] == n_tokens * 3 * hidden * inter * layers


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_mixture_of_experts_exports_to_onnx_with_parity(family, tmp_path):
    """histc and the grouped matmuls have no ONNX form: the export writes them with ops that do (one
    gather and one matmul per expert, row ranges computed in the graph), so ONNX Runtime matches
    PyTorch at other batch sizes and sequence lengths."""
    import onnxruntime as ort

    from fxprune.export import onnx_parity

    _, _, res = _compile(family)
    res.export_onnx(str(tmp_path / "moe.onnx"))
    par = onnx_parity(res.model, res.example_inputs, tmp_path / "moe.onnx", batch_sizes=(1, 3))
    assert par.ok, par.summary()
    sess = ort.InferenceSession(str(tmp_path / "moe.onnx"))
    x = tokens(2, 7, seed=5)
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, res.model(**x).logits.numpy(), atol=1e-4, rtol=1e-3)


def test_expert_widths_keep_kernel_alignment_even_per_layer():
    """The grouped-matmul kernels need 16-byte strides: the experts keep multiples of 8 channels
    (a hard constraint the band never relaxes, unlike channel_multiple), per layer too."""
    res = fxprune.compile(make("mixtral"), tokens(), mac_budget="40%", layer_uniform=False, channel_multiple=1)
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    widths = [p.shape[-1] for n, p in res.model.named_parameters() if n.endswith("experts.down_proj")]
    assert len(widths) == 2 and all(w % 8 == 0 for w in widths) and min(widths) < 256, widths
    with torch.no_grad():  # the pruned graph runs on CPU (the capture's integer histc was legalised)
        assert res.model(**tokens(1, 7, seed=4)).logits.shape == (1, 7, VOCAB)


def test_a_tensor_the_config_sizes_by_another_field_keeps_its_group_whole():
    """BitNet normalises the attention output with a norm sized by hidden_size (``attn_sub_norm``):
    its config cannot express pruned heads, so the heads stay whole (measured on the meta device,
    not assumed) while the rest is pruned, and to_hf() rebuilds what the graph computes."""
    torch.manual_seed(0)
    cfg = transformers.BitNetConfig(**_COMMON, num_key_value_heads=2, pad_token_id=0)
    model = transformers.BitNetForCausalLM(cfg).eval()
    res = fxprune.compile(model, tokens(), mac_budget="50%")
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert any("attn_sub_norm" in n and "left whole" in n for n in res.report.notes), res.report.notes
    hf = res.to_hf()
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (4, 2)
    assert hf.config.intermediate_size < 128
    x = tokens(2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(**x).logits, res.model(**x).logits, atol=1e-5, rtol=1e-4)


def test_positional_example_inputs_rebuild_too():
    model = make("qwen2")
    ids = tokens()["input_ids"]
    res = fxprune.compile(model, (ids,), mac_budget="50%")
    hf = res.to_hf()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, res.model(ids).logits, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ tying

def _spec(i, name, size, allowed, members, imp=None):
    return GroupSpec(i, name, "channels", size, 1, tuple(allowed), "b", tuple(members), 0.0,
                     tuple(imp) if imp is not None else None, True, 1, 1.0)


def test_collapsed_problem_costs_what_its_expansion_costs():
    # three groups: MLP of layer 0 and 1 (tied), residual tied to them with multiplier 2
    coef = np.array([3, 5, 7])

    def cost(k):
        k = np.atleast_2d(k)
        return (k * coef).sum(1) + k[:, 0] * k[:, 2]

    groups = (_spec(0, "l.0.fc", 8, range(1, 9), ["l.0.fc"], np.arange(8, 0, -1)),
              _spec(1, "l.1.fc", 8, range(1, 9), ["l.1.fc"]),
              _spec(2, "res", 16, range(2, 17, 2), ["emb"]))
    full = np.array([8, 8, 16])
    problem = PruningProblem(groups, int(cost(full)[0]), 100, 90, 0, 0, cost)
    ties = layer_ties(groups)
    assert [t.members for t in ties] == [((0, 1), (1, 1))]
    tied = collapse(problem, [Tie(ties[0].members + ((2, 2),))])
    assert len(tied.groups) == 1 and tied.groups[0].allowed == tuple(range(1, 9))
    for x in range(1, 9):
        keep = expand_keep(tied, np.array([x]))
        assert keep.tolist() == [x, x, 2 * x]
        assert tied.cost(np.array([[x]]))[0] == cost(keep)[0]
    # the tie ranks units by the summed, sorted importance of its members (most important first)
    imp = np.asarray(tied.groups[0].importance)
    assert np.all(np.diff(imp) <= 1e-12)
    untied = collapse(problem, [])
    assert untied is problem and expand_keep(untied, full).tolist() == full.tolist()


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_layer_uniform_on_any_model_keeps_one_count_per_role():
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(4, 32)
    free = fxprune.compile(model, x, mac_budget="50%")
    tied = fxprune.compile(model, x, mac_budget="50%", layer_uniform=True)
    assert tied.report.lower_macs <= tied.macs <= tied.report.budget_macs
    keeps = {g.keep for g in tied.report.groups if g.name.startswith("blocks.")}
    assert len(keeps) == 1 and keeps != {64}
    assert len({g.keep for g in free.report.groups}) >= 1  # (the untied plan may differ per block)
    assert fxprune.count_macs(tied.model, x) == tied.macs


# ---------------------------------------------------------------------------------- ONNX + KV cache

@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2", "gpt_neox"])
def test_onnx_runtime_greedy_generation_with_kv_cache_matches_pytorch(family, tmp_path):
    from fxprune.kv_onnx import OrtDecoder, export_decoder_onnx

    _, _, res = _compile(family)
    hf = res.to_hf()
    path = export_decoder_onnx(res, tmp_path / f"{family}.onnx")
    dec = OrtDecoder(path)
    assert dec.n_layers == 2
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False)
    got = dec.generate(prompt, 32)
    assert got.shape == (2, 38)
    np.testing.assert_array_equal(got, want.numpy())


def test_cli_save_pretrained_writes_a_loadable_model(tmp_path, capsys):
    from fxprune.cli import main

    src = tmp_path / "tiny-llama"
    make("llama").save_pretrained(src)
    out = tmp_path / "pruned"
    assert main(["compile", f"hf:{src}", "--mac-budget", "50%", "--input-shape", "1,16",
                 "--save-pretrained", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    # the CLI loads hf: models as the class their config names: the LM head is pruned with them
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    orig = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert type(back) is type(orig) is type(make("llama"))
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in orig.parameters())
    with torch.no_grad():
        assert back(**tokens(1, 7)).logits.shape[:2] == (1, 7)
    prompt = tokens(1, 5)["input_ids"]
    assert back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         min_new_tokens=4, do_sample=False).shape == (1, 9)


def test_latency_budget_keeps_the_layer_ties_and_the_hf_class(tmp_path):
    """A latency budget on a decoder plans over the same per-layer ties as a MAC budget, so the
    result still rebuilds as its own class (fake runtime: deterministic, no timing)."""
    from fxprune.runtimes import FakeRuntime

    model = make("qwen2")
    rt = FakeRuntime(step=8, grid=8, mac_rate=2.5e6)
    res = fxprune.compile(model, tokens(), latency_budget="70%",
                          latency_options={"runtime": rt, "cache_dir": str(tmp_path)})
    assert res.macs < res.base_macs
    assert any("layer_uniform" in n for n in res.report.notes)
    hf = res.to_hf()
    assert type(hf) is type(model)
    ids = tokens()["input_ids"]
    assert torch.allclose(hf(input_ids=ids).logits, res.model(**tokens()).logits, atol=1e-4)


# ------------------------------------------------------------------- what the config can express

def _validates(cfg) -> bool:
    try:
        cfg.validate()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.parametrize("budget", ["35%", "50%", "65%"])
@pytest.mark.parametrize("family", ["llama", "gemma3-1kv"])
def test_config_validation_holds_so_save_pretrained_works(family, budget, tmp_path):
    """LLaMA's and Gemma 3's configs refuse hidden_size % num_attention_heads != 0 (at save_pretrained
    and from_pretrained) even with an explicit head_dim. LLaMA: the residual keeps head_dim channels
    per kept query head; Gemma 3 (residual whole: scaled embeddings, one KV head for 4 query heads):
    only query-head counts that divide the hidden size."""
    torch.manual_seed(0)
    if family == "llama":  # 6 heads of 16: the old plans kept 40 or 64 channels with 6 heads
        cfg = transformers.LlamaConfig(**{**_COMMON, "hidden_size": 96, "num_attention_heads": 6,
                                          "intermediate_size": 192})
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        cfg = transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=1, head_dim=32, pad_token_id=0)
        model = transformers.Gemma3ForCausalLM(cfg).eval()
    res = fxprune.compile(model, tokens(), mac_budget=budget)
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    hf = res.to_hf()
    assert hf.config.hidden_size % hf.config.num_attention_heads == 0, hf.config
    assert _validates(hf.config)
    assert any("multiple of num_attention_heads" in n for n in res.report.notes), res.report.notes
    hf.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(2, 9, seed=3)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, hf(**x).logits)


def test_a_budget_the_config_cannot_reach_is_planned_per_layer_and_to_hf_says_why():
    """GPTNeoXModel: its output is the residual stream (whole), and its head_dim is hidden // heads, so
    one width per role leaves only the MLP: 50% is below that. The compile plans per layer instead of
    failing, says so, and to_hf() refuses with the reason."""
    torch.manual_seed(0)
    model = transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**_COMMON)).eval()
    res = fxprune.compile(model, tokens(), mac_budget="50%")
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert any("planned per layer instead" in n for n in res.report.notes), res.report.notes
    with pytest.raises(ConfigError, match="planned per layer"):
        res.to_hf()
    with pytest.raises(fxprune.errors.BudgetUnreachableError):
        fxprune.compile(model, tokens(), mac_budget="50%", layer_uniform=True)


def test_a_band_the_config_cannot_land_in_is_planned_per_layer():
    """GPT-NeoX with two heads of 32 (head_dim = hidden_size // heads): the residual moves with the
    heads in steps of 32 of its 64 channels, and the MLP (32 wide) cannot fill the gap to the 1%
    band. The default layout gives way to a per-layer plan in the band, with a note; asked for
    explicitly (layer_uniform=True), it does not."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=128)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = fxprune.compile(model, x, mac_budget="50%")
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert any("lands in the band" in n and "planned per layer" in n for n in res.report.notes), res.report.notes
    with pytest.raises(ConfigError, match="planned per layer"):
        res.to_hf()
    with pytest.raises(fxprune.errors.BandUnreachableError):
        fxprune.compile(model, x, mac_budget="50%", layer_uniform=True)


@pytest.mark.parametrize("width,n_q,units", [(4096, 32, 8), (4096, 32, 32), (384, 6, 6), (2048, 32, 4), (96, 6, 6),
                                              (64, 4, 2), (2304, 8, 4), (3072, 24, 8)])
def test_dividing_widths_every_pair_divides(width, n_q, units):
    from fxprune.hf import _dividing_widths

    r = n_q // units
    ok, step = _dividing_widths(width, n_q, units, hidden_free=True)
    assert units in ok and len(ok) >= 2  # the full head count, and at least one cut
    hiddens = list(range(step, width + 1, step)) + [width]
    assert all(h % (k * r) == 0 for h in hiddens for k in ok)
    assert step <= max(n_q, width // 16)
    whole, _ = _dividing_widths(width, n_q, units, hidden_free=False)
    assert set(ok) <= set(whole) and all(width % (k * r) == 0 for k in whole)
