"""fxprune keeps its contract with careless and unusual callers (issue 13, items 4-8, 10-15).

Data loss (failed writes leave the previous file, finetune never returns a silently broken model,
analyses never touch the caller's buffers or inputs, files get the umask mode), silent wrong
results (``ignore=`` typos, the printed report), stock PyTorch modules that crashed (the
``nn.Transformer`` family, ``nn.MultiheadAttention`` in other dtypes, weight-normed convolutions)
and raw exceptions where an ``FxpruneError`` belongs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune._compile import open_session
from fxprune.cli import main
from fxprune.errors import ConfigError, ExportError, FxpruneError, InvalidBudgetError, SerializationError
from fxprune.testing.zoo import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def residual():
    return tiny_model("residual")


# ------------------------------------------------------------------ 4. failed writes keep the old file

WRITE_UNDER_LIMIT = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch, fxprune
    from fxprune.export import export_onnx
    from fxprune.errors import FxpruneError
    from fxprune.testing.zoo import tiny_model

    onnx_path, fxp_path, report_path = sys.argv[1:4]
    model, x = tiny_model("residual")
    big = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 3), torch.nn.Conv2d(256, 256, 3))  # ~2.4 MB of weights
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    out = {}
    for name, write in [("onnx", lambda: export_onnx(big, torch.randn(1, 3, 8, 8), onnx_path, exporter="torchscript")),
                        ("fxp", lambda: fxprune.save(big, fxp_path))]:
        try:
            write()
            out[name] = "written"
        except FxpruneError as err:
            out[name] = type(err).__name__
    from fxprune._io import atomic_write
    try:
        atomic_write(report_path, "x" * 300_000)
        out["report"] = "written"
    except OSError as err:
        out["report"] = "OSError"
    print(json.dumps(out))
    """
)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    paths = [tmp_path / "m.onnx", tmp_path / "m.fxp", tmp_path / "r.json"]
    for i, p in enumerate(paths):
        p.write_bytes(f"previous file {i}".encode())
    script = tmp_path / "w.py"
    script.write_text(WRITE_UNDER_LIMIT)
    proc = subprocess.run([sys.executable, str(script), *map(str, paths)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "onnx": "ExportError", "fxp": "SerializationError", "report": "OSError"}
    for i, p in enumerate(paths):
        assert p.read_bytes() == f"previous file {i}".encode()
    assert sorted(os.listdir(tmp_path)) == ["m.fxp", "m.onnx", "r.json", "w.py"]  # no temp files left


def test_export_checks_the_target_before_exporting(residual, tmp_path):
    model, x = residual
    (tmp_path / "dir.onnx").mkdir()
    from fxprune.export import export_onnx

    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, x, tmp_path / "dir.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")


def test_latency_cache_is_written_through_the_atomic_helper(tmp_path, monkeypatch):
    from fxprune import _io
    from fxprune.cost_models.latency import LatencyCache, LatencyCostModel

    calls = []
    real = _io.atomic_write
    monkeypatch.setattr(_io, "atomic_write", lambda path, data: calls.append(path) or real(path, data))
    cache = LatencyCache(tmp_path)
    model = LatencyCostModel.__new__(LatencyCostModel)
    monkeypatch.setattr(model, "to_json", lambda: {"key": {"a": 1}}, raising=False)
    monkeypatch.setattr(model, "key", {"a": 1}, raising=False)
    path = cache.save(model)
    assert calls == [path] and json.loads(path.read_text()) == {"key": {"a": 1}}


# ------------------------------------------------------------------ 5. finetune

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"lr": 0}, "lr must be a finite number > 0"),
    ({"lr": "0.1"}, "lr must be a finite number > 0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an int >= 1"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"epochs": "2"}, "epochs must be an int >= 1"),
    ({"max_steps": 0}, "max_steps"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"kd_temperature": float("inf")}, "kd_temperature"),
    ({"kd_alpha": "half"}, "kd_alpha"),
    ({"device": "gpu7"}, "device must be a torch device"),
])
def test_finetune_refuses_bad_options_before_touching_the_model(kwargs, match):
    model = _mlp()
    before = _state(model)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(ConfigError, match=match):
        fxprune.finetune(model, (x, y), progress=False, **kwargs)
    assert _same(before, _state(model)) and model.training  # not trained, not switched to eval


class NaNAfterSteps(torch.optim.SGD):
    """An optimiser whose third step writes NaN into the weights (the loss before it is finite)."""

    def __init__(self, params):
        super().__init__(params, lr=0.01)
        self.steps = 0

    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        if self.steps == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))


@pytest.mark.parametrize("kwargs", [{"optimizer": NaNAfterSteps, "max_steps": 3}, {"lr": 1e300, "max_steps": 2}])
def test_finetune_that_diverges_raises_and_restores_the_model(kwargs):
    model = _mlp()
    before = _state(model)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.raises(FxpruneError, match="restored to its weights before fine-tuning"):
        fxprune.finetune(model, (x, y), batch_size=8, progress=False, **kwargs)
    assert _same(before, _state(model))  # BatchNorm statistics included
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ 6. buffers and inputs

class Counter(nn.Module):
    """A forward that counts its calls in a buffer and updates its input in place."""

    def __init__(self, inplace: bool = False, touch_input: bool = False):
        super().__init__()
        self.inplace, self.touch_input = inplace, touch_input
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        if self.touch_input:
            x.add_(1.0)
        if self.inplace:
            self.count.add_(1)
        else:
            self.count += 1
        return self.fc(F.relu(self.conv(x)).mean((2, 3))) + self.count


@pytest.mark.parametrize("inplace", [False, True])
def test_counting_never_touches_the_callers_buffers_or_inputs(inplace):
    model = Counter(inplace, touch_input=True)
    x = torch.zeros(1, 3, 8, 8)
    assert fxprune.count_macs(model, x) == fxprune.profile_macs(model, x).total == 8 * 8 * 16 * 27 + 64
    assert model.count.item() == 0 and torch.equal(x, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_keeps_the_buffer_update_and_never_applies_it_to_the_caller(inplace):
    torch.manual_seed(0)
    model = Counter(inplace, touch_input=True)
    x = torch.zeros(2, 3, 8, 8)
    res = fxprune.compile(model, x, mac_budget="50%")
    assert model.count.item() == 0 and torch.equal(x, torch.zeros(2, 3, 8, 8))  # caller untouched
    pruned = res.model
    assert pruned.count.item() == 0  # the analyses that ran the graph left its state as the user's
    assert any(n.op == "call_method" and n.target in ("copy_", "add_") for n in pruned.graph.nodes)
    pruned(torch.zeros(1, 3, 8, 8))
    pruned(torch.zeros(1, 3, 8, 8))
    assert pruned.count.item() == 2  # the update is part of the pruned model
    assert any("updates buffers in place" in n for n in res.report.notes) or inplace


# ------------------------------------------------------------------ 7. file modes

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_umask_mode(residual, tmp_path, umask, mode):
    model, _ = residual
    old = os.umask(umask)
    try:
        path = fxprune.save(model, tmp_path / "m.fxp")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


# ------------------------------------------------------------------ 8. ignore=

def test_unknown_ignore_names_are_an_error_with_the_closest_names(residual):
    model, x = residual
    with pytest.raises(ConfigError, match=r"'c_2' \(closest: 'c2'.*\).*named_modules"):
        fxprune.compile(model, x, mac_budget="50%", ignore=["c_2"])
    with pytest.raises(ConfigError, match="'nothing_like_it'"):
        fxprune.compile(model, x, mac_budget="50%", ignore="nothing_like_it")
    session = open_session(model, x, ignore=["c2"])  # a real name still works
    assert any("'c2' is in ignore" in r for f in session.graph.frozen for r in f.reasons)


def test_ignore_accepts_module_prefixes():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    session = open_session(model, x, ignore=["0"])  # prefix of "0.0"
    assert any("'0.0' is in ignore" in r for f in session.graph.frozen for r in f.reasons)
    with pytest.raises(ConfigError, match="'00'"):
        open_session(model, x, ignore=["00"])


# ------------------------------------------------------------------ 10. the printed report

def test_report_for_a_budget_above_the_original_says_unchanged(residual):
    model, x = residual
    res = fxprune.compile(model, x, mac_budget=fxprune.count_macs(model, x) * 2)
    text = str(res.report)
    assert "model returned unchanged" in text and "OUT OF BAND" not in text
    data = res.report.to_json()
    assert data["unchanged"] is True and data["in_band"] is True and res.macs == res.base_macs


def test_report_prints_channel_multiple_not_honoured(residual):
    model, x = residual
    res = fxprune.compile(model, x, mac_budget=2.5e6)
    assert any("channel_multiple not honoured" in n for n in res.report.solver_notes)
    assert "channel_multiple not honoured" in str(res.report)


# ------------------------------------------------------------------ 11-13. stock PyTorch modules

def _encoder_layer_macs(n, s, d, ff):
    return 4 * n * s * d * d + 2 * n * s * s * d + 2 * n * s * d * ff


class EncoderWithMasks(nn.Module):
    def __init__(self, batch_first, norm_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, norm_first=norm_first,
                                           dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        self.batch_first = batch_first

    def forward(self, x, pad):
        s = x.shape[1] if self.batch_first else x.shape[0]
        causal = nn.Transformer.generate_square_subsequent_mask(s)
        return self.encoder(x, mask=causal, src_key_padding_mask=pad)


@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, True)])
def test_stock_transformer_encoder_counts_compiles_and_matches(batch_first, norm_first):
    torch.manual_seed(0)
    model = EncoderWithMasks(batch_first, norm_first).eval()
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -2:] = True
    assert fxprune.count_macs(model, (x, pad)) == 2 * _encoder_layer_macs(2, 6, 32, 64)
    cap = fxprune.capture(model, (x, pad))
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(x, pad), model(x, pad))
    res = fxprune.compile(model, (x, pad), mac_budget="50%")
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert {g.kind for g in res.report.groups} >= {"heads"}
    with torch.no_grad():
        assert res.model(x, pad).shape == x.shape


def test_stock_transformer_and_decoder_count_and_compile():
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    enc = _encoder_layer_macs(2, 7, 32, 64)
    dec = (4 * 2 * 5 * 32 * 32 + 2 * 2 * 5 * 5 * 32  # self-attention
           + 2 * 2 * 5 * 32 * 32 + 2 * 2 * 7 * 32 * 32 + 2 * 2 * 5 * 7 * 32  # cross-attention
           + 2 * 2 * 5 * 32 * 64)
    assert fxprune.count_macs(model, (src, tgt)) == enc + dec
    cap = fxprune.capture(model, (src, tgt))
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(src, tgt), model(src, tgt))
    res = fxprune.compile(model, (src, tgt), mac_budget="60%", tolerance=0.05)
    assert res.macs <= res.report.budget_macs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_multihead_attention_in_other_dtypes(dtype):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Attn().to(dtype).eval()
    x = torch.randn(2, 5, 32, dtype=dtype)
    assert fxprune.count_macs(model, x) == 4 * 2 * 5 * 32 * 32 + 2 * 2 * 5 * 5 * 32 + 2 * 5 * 32 * 8
    cap = fxprune.capture(model, x)
    assert {p.dtype for p in cap.gm.parameters()} == {dtype}
    with torch.no_grad():
        tol = {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float64 else {}
        torch.testing.assert_close(cap.gm(x), model(x), **tol)
    res = fxprune.compile(model, x, mac_budget="60%", tolerance=0.1)
    with torch.no_grad():
        assert res.model(x).dtype == dtype


@pytest.mark.parametrize("style", ["hooks", "parametrizations"])
def test_weight_normed_convolutions_compile(style):
    from torch.nn.utils import weight_norm
    from torch.nn.utils.parametrizations import weight_norm as weight_norm_p

    wrap = weight_norm if style == "hooks" else weight_norm_p
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Conv2d(3, 16, 3, padding=1)), nn.ReLU(), wrap(nn.Conv2d(16, 16, 3, padding=1)),
                          nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert fxprune.count_macs(model, x) == 144 * (16 * 27 + 16 * 144 + 8 * 16)
    cap = fxprune.capture(model, x)
    assert any("weight_norm" in n or "WeightNorm" in n for n in cap.notes)
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(x), model(x))
    res = fxprune.compile(model, x, mac_budget="50%", tolerance=0.05)
    assert res.macs <= res.report.budget_macs
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()  # still weight-normed
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), cap.gm(x))  # the user's (parametrized) model still works


# ------------------------------------------------------------------ 14. FxpruneError, never a raw one

@pytest.mark.parametrize("kwargs, error, match", [
    ({"min_keep_ratio": "0.1"}, InvalidBudgetError, "min_keep_ratio must be a number"),
    ({"min_keep_ratio": float("nan")}, InvalidBudgetError, "min_keep_ratio"),
    ({"policy_options": "x"}, ConfigError, "policy_options must be a dict"),
    ({"mac_budget": "1e400"}, InvalidBudgetError, "not a finite number"),
    ({"mac_budget": "1e400%"}, InvalidBudgetError, "not a finite percentage"),
    ({"mac_budget": 10 ** 400}, InvalidBudgetError, "positive, finite"),
    ({"mac_budget": None, "latency_budget": "1e400ms"}, InvalidBudgetError, "not understood"),
    ({"seed": "x"}, ConfigError, "seed must be an int"),
    ({"leaf_modules": [1]}, ConfigError, "leaf_modules"),
    ({"evaluate": 3}, ConfigError, "evaluate must be a function"),
    ({"ignore": 3}, ConfigError, "ignore must be"),
    ({"latency_options": "x", "mac_budget": None, "latency_budget": "10ms"}, ConfigError, "latency_options"),
    ({"channel_multiple": True}, InvalidBudgetError, "channel_multiple"),
    ({"importance": 3}, ConfigError, "importance must be"),
    ({"policy": "no-such-policy"}, FxpruneError, "unknown policy"),
])
def test_bad_options_raise_fxprune_errors(residual, kwargs, error, match):
    model, x = residual
    kwargs = {"mac_budget": "50%", **kwargs}
    with pytest.raises(error, match=match):
        fxprune.compile(model, x, **kwargs)


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "net.py"
    p.write_text("import torch.nn as nn\n\ndef build():\n"
                 "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))\n")
    return f"{p}:build"


@pytest.mark.parametrize("extra, match", [
    (["--report", "."], "--report '.' is a directory"),
    (["--report", "missing_dir/r.json"], "the directory 'missing_dir' does not exist"),
    (["-o", "outdir"], "-o/--output 'outdir' is a directory"),
    (["-o", "afile/m.onnx"], "'afile' is not a directory"),
    (["--save", "m.onnx", "-o", "m.onnx"], "must name different files"),
    (["--save-pretrained", "afile"], "exists and is not a directory"),
    (["--save-pretrained", "missing_dir/hf"], "does not exist"),
])
def test_cli_checks_outputs_before_compiling(model_file, tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("")
    compiled = []
    monkeypatch.setattr(fxprune, "compile", lambda *a, **k: compiled.append(1))
    code = main(["compile", model_file, "--input-shape", "1,3,12,12", "--mac-budget", "50%", *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Nothing was compiled" in err and not compiled


def test_cli_infinite_budget_is_a_clear_error(model_file, capsys):
    assert main(["compile", model_file, "--input-shape", "1,3,12,12", "--mac-budget", "1e400"]) == 2
    assert "not a finite number of MACs" in capsys.readouterr().err


# ------------------------------------------------------------------ 15. a silent LLM endpoint

class SilentServer:
    """Accepts TCP connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_agentic_falls_back_when_the_endpoint_never_answers(residual, capfd):
    pytest.importorskip("anthropic")
    model, x = residual
    server = SilentServer()
    try:
        res = fxprune.compile(model, x, mac_budget="50%", policy="agentic", policy_options={
            "llm": "claude", "api_key": "sk-ant-test-0123456789", "base_url": server.base_url,
            "llm_first_reply_timeout": 1.0, "max_attempts": 2})
    finally:
        server.close()
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    errors = [a for a in res.report.attempts if a.get("error")]
    assert len(errors) == 1 and "no first reply within 1s (llm_first_reply_timeout)" in errors[0]["error"]
    assert errors[0]["fallback"] == "offline"
    assert len(server.conns) == 1  # one request, abandoned: no SDK retries waited out
    err = capfd.readouterr().err
    assert "waiting at most 1s for a first reply" in err and "continuing with the offline analyst" in err


def test_llm_time_budget_options_are_validated():
    from fxprune.errors import LLMError
    from fxprune.policies.agentic.llm import ClaudeAnalyst

    for bad in (0, -1, "10", True, float("nan")):
        with pytest.raises(LLMError, match="must be a number of seconds"):
            ClaudeAnalyst(api_key="k" * 10, time_budget=bad)
    assert ClaudeAnalyst(api_key="k" * 10).first_reply_timeout == 30.0
