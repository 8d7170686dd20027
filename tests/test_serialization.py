"""Tests of fxprune.serialization: the pickle-free .fxp format for captured / pruned graph modules."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

import fxprune.serialization as serialization
from fxprune.capture import capture
from fxprune.errors import SerializationError
from fxprune.serialization import load, save

REPO = Path(__file__).resolve().parents[1]

# name -> (builder, example input shape, has dropout / stochastic depth, has BatchNorm)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool, bool]] = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), (2, 3, 32, 32), False, True),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32), True, True),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), (2, 3, 32, 32), False, True),
    "convnext_like": (
        lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.3,
                         num_classes=10),
        (2, 3, 32, 32), True, False),
    "vit_tiny": (
        lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                      mlp_dim=64, dropout=0.1, num_classes=10),
        (2, 3, 32, 32), True, False),
    "swin_tiny": (
        lambda: SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], stochastic_depth_prob=0.3, num_classes=10),
        (2, 3, 64, 64), True, False),
}


def calibrated_capture(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """Capture ``model`` and make its outputs O(1): perturb constant-initialised parameters (zero
    heads, unit norms, tiny layer scales) and set BatchNorm statistics from one random batch."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    gm = capture(model, x).gm
    with torch.no_grad():
        for p in gm.parameters():
            if is_constant(p):
                p.add_(0.1 * torch.randn_like(p))
        bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        gm.train()
        gm(torch.randn(8, *shape[1:]))
        for m in bns:
            m.momentum = 0.1
    gm.eval()
    return gm, x


def is_constant(t: torch.Tensor) -> bool:
    return bool((t == t.flatten()[0]).all())


@pytest.fixture(scope="module")
def captured() -> Callable[[str], tuple[torch.fx.GraphModule, torch.Tensor]]:
    cache: dict[str, tuple[torch.fx.GraphModule, torch.Tensor]] = {}

    def get(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
        if name not in cache:
            builder, shape, _, _ = MODELS[name]
            cache[name] = calibrated_capture(builder(), shape)
        return cache[name]

    return get


def round_trip(model: nn.Module, tmp_path: Path, name: str = "model.fxp", **load_kwargs) -> nn.Module:
    path = tmp_path / name
    save(model, path)
    return load(path, **load_kwargs)


def other_batch(x: torch.Tensor, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn((n,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ round trips on real models

@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_in_eval(name, captured, tmp_path):
    gm, x = captured(name)
    loaded = round_trip(gm, tmp_path)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert type(loaded).__name__ == type(gm).__name__
    assert not loaded.training
    assert loaded.code == gm.code
    ref_state, new_state = gm.state_dict(), loaded.state_dict()
    assert list(ref_state) == list(new_state)
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    assert [type(m).__name__ for m in gm.modules()] == [type(m).__name__ for m in loaded.modules()]
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == {
        n: p.requires_grad for n, p in loaded.named_parameters()}
    with torch.no_grad():
        for inp in (x, other_batch(x, 3), other_batch(x, 1)):
            assert torch.equal(gm(inp), loaded(inp))


@pytest.mark.parametrize("name", list(MODELS))
def test_train_mode_training_step_and_resave(name, captured, tmp_path):
    gm, x = captured(name)
    _, _, stochastic, has_bn = MODELS[name]
    original = copy.deepcopy(gm).train()
    model = round_trip(gm, tmp_path, "first.fxp").train()
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        torch.manual_seed(123)
        want = original(x)
        torch.manual_seed(123)
        assert torch.equal(want, model(x))
    if has_bn:  # the train-mode forward updated BatchNorm statistics exactly as in the original
        for (n, a), (_, b) in zip(original.named_buffers(), model.named_buffers()):
            assert torch.equal(a, b), n
        stat = next(n for n, _ in gm.named_buffers() if n.endswith("running_mean"))
        assert not torch.equal(model.get_buffer(stat), gm.get_buffer(stat))
    if stochastic:  # dropout / stochastic depth is live in train mode
        with torch.no_grad():
            torch.manual_seed(0)
            outs = [model(x) for _ in range(8)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])

    # a plain training loop: gradients reach every parameter, the optimizer changes them
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    xb = torch.cat([x, other_batch(x, 2)])
    labels = torch.arange(xb.shape[0]) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), labels)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    # eval mode is deterministic again, and the trained model saves and loads bit-exactly
    model.eval()
    again = round_trip(model, tmp_path, "second.fxp")
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all() and torch.equal(out, model(x)) and torch.equal(out, again(x))


# ------------------------------------------------------------------------ a user's own class

class TinyUserNet(nn.Module):
    """A user model with tied weights, a non-persistent buffer, a tensor constant, dropout and BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight  # tied
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)
        self.register_buffer("offset", torch.linspace(-1, 1, 8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = x.mean(dim=(2, 3)) + self.offset
        x = self.fc2(F.gelu(self.fc1(x))) * torch.tensor(0.5)  # becomes a _tensor_constant
        return self.head(self.drop(x))


def test_tied_parameters_buffers_and_constants_survive(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = capture(TinyUserNet(), x).gm
    assert any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in gm.graph.nodes)
    loaded = round_trip(gm, tmp_path)
    assert loaded.fc1.weight is loaded.fc2.weight
    assert loaded.fc1.bias is not loaded.fc2.bias
    assert "offset" in dict(loaded.named_buffers()) and "offset" not in loaded.state_dict()
    assert torch.equal(loaded._tensor_constant0, gm._tensor_constant0)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    # training keeps the tie: one parameter, updated once
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(x).sum().backward()
    opt.step()
    assert loaded.fc1.weight is loaded.fc2.weight
    assert len(list(loaded.parameters())) == len(list(gm.parameters()))


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from fxprune.serialization import load, save

    path, data = sys.argv[1], sys.argv[2]
    blob = torch.load(data, weights_only=True)
    model = load(path)
    out = {"class": type(model).__name__, "is_graph_module": isinstance(model, torch.fx.GraphModule)}
    with torch.no_grad():
        out["equal"] = bool(torch.equal(model(blob["x"]), blob["y"]))
        out["batch5_shape"] = list(model(torch.randn(5, 3, 8, 8)).shape)
    model.train()
    torch.manual_seed(0)
    a = model(blob["x"])
    out["dropout_active"] = not torch.equal(a, model(blob["x"]))
    a.sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    out["tied"] = model.fc1.weight is model.fc2.weight
    save(model, path + ".again")
    out["resaved"] = isinstance(load(path + ".again"), torch.fx.GraphModule)
    out["user_module_imported"] = [m for m in sys.modules if "test_serialization" in m]
    print(json.dumps(out))
    """
)


def test_loads_in_a_fresh_process_without_the_user_class(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = capture(TinyUserNet(), x).gm
    with torch.no_grad():
        y = gm(x)
    save(gm, tmp_path / "user.fxp")
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    script = tmp_path / "load_it.py"
    script.write_text(SUBPROCESS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "user.fxp"), str(tmp_path / "data.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "class": "TinyUserNet", "is_graph_module": True, "equal": True, "batch5_shape": [5, 4],
        "dropout_active": True, "tied": True, "resaved": True, "user_module_imported": [],
    }


class CustomLeaf(nn.Module):
    """A leaf module kept opaque by capture: its class is needed to run the graph."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight * self.scale


def test_user_leaf_class_needs_trusted_prefixes(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), CustomLeaf(3.0))
    x = torch.randn(2, 4)
    gm = capture(model, x, leaf_modules=[CustomLeaf]).gm
    assert any(isinstance(m, CustomLeaf) for m in gm.modules())
    save(gm, tmp_path / "leaf.fxp")
    with pytest.raises(SerializationError) as info:
        load(tmp_path / "leaf.fxp")
    message = str(info.value)
    assert f"{CustomLeaf.__module__}:CustomLeaf" in message and "trusted_prefixes" in message
    loaded = load(tmp_path / "leaf.fxp", trusted_prefixes=(CustomLeaf.__module__,))
    leaf = next(m for m in loaded.modules() if isinstance(m, CustomLeaf))
    assert leaf.scale == 3.0 and isinstance(leaf.weight, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


# ------------------------------------------------------------------------ argument encodings

class Exotic(nn.Module):
    def forward(self, x: torch.Tensor):
        y = x[..., 1::2]
        y = y.to(torch.float64).to(dtype=torch.float32, device=torch.device("cpu"))
        y = torch.clamp(y, min=-math.inf, max=math.inf)
        y = y.contiguous(memory_format=torch.contiguous_format)
        z = torch.full_like(y, math.nan)
        w = x.new_zeros(torch.Size([2, 3]), dtype=torch.int64, layout=torch.strided) + 7
        y = torch.clamp(y, max=1e30)
        return y.reshape(y.shape[0], -1), {"nan": z, "sum": y.sum(dim=(1, 2)), "w": w}


def test_exotic_argument_values_round_trip(tmp_path):
    gm = torch.fx.symbolic_trace(Exotic())
    loaded = round_trip(gm, tmp_path)
    x = torch.randn(2, 3, 6)
    want, got = gm(x), loaded(x)
    assert torch.equal(want[0], got[0])
    for k in want[1]:
        assert torch.equal(want[1][k], got[1][k]) or torch.allclose(want[1][k], got[1][k], equal_nan=True)
    # the manifest is strict JSON: no NaN/Infinity literals
    with zipfile.ZipFile(tmp_path / "model.fxp") as zf:
        json.loads(zf.read("manifest.json"), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_shared_submodule_and_plain_module_root(tmp_path):
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    loaded = round_trip(model, tmp_path)
    assert type(loaded) is nn.Sequential and loaded[1] is loaded[3]
    x = torch.randn(2, 3)
    assert torch.equal(model(x), loaded(x))


def test_aten_level_graph_from_torch_export_round_trips(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.eval()
    exported = torch.export.export(model, (x,), strict=False).module()
    graph = copy.deepcopy(exported.graph)
    for node in list(graph.nodes):  # torch.export's input guard is not part of the model
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    gm = torch.fx.GraphModule(exported, graph)
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    loaded = round_trip(gm, tmp_path)
    assert type(loaded.graph._codegen).__name__ == "_PyTreeCodeGen" and loaded.code == gm.code
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    with zipfile.ZipFile(tmp_path / "model.fxp") as zf:
        assert '"$":"op","name":"aten::' in zf.read("manifest.json").decode()


# ------------------------------------------------------------------------ refusing unsafe input

def rewrite_manifest(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "manifest.json":
                manifest = json.loads(data)
                edit(manifest)
                data = json.dumps(manifest).encode()
            zout.writestr(item, data)
    return dst


@pytest.fixture()
def small_file(tmp_path) -> Path:
    x = torch.randn(2, 3, 8, 8)
    gm = capture(TinyUserNet(), x).gm
    return save(gm, tmp_path / "small.fxp")


def first_node(manifest: dict, op: str) -> dict:
    return next(n for n in manifest["root"]["graph"]["nodes"] if n["op"] == op)


@pytest.mark.parametrize(
    "path",
    [
        "os:system",
        "subprocess:run",
        "builtins:eval",
        "torch:load",
        "torch.hub:load",
        "torchvision.io:read_file",
        "operator:methodcaller",
        "torch.nn.functional:torch.load",
        "torch._ops:_Ops.load_library",
        "torch.nn.functional:torch.relu",
        "torchvision.models.resnet:__builtins__",
        "fxprune.serialization:json.dumps",
    ],
)
def test_refuses_functions_outside_the_allow_list(small_file, tmp_path, path):
    def edit(manifest):
        first_node(manifest, "call_function")["target"] = {"$": "ref", "path": path}

    bad = rewrite_manifest(small_file, tmp_path / "bad.fxp", edit)
    with pytest.raises(SerializationError) as info:
        load(bad)
    assert repr(path) in str(info.value) and "not on fxprune's allow-list" in str(info.value), str(info.value)
    assert "trusted_prefixes" in str(info.value)


def test_refuses_module_classes_outside_the_allow_list(small_file, tmp_path):
    def edit(manifest):
        manifest["root"]["children"][0]["module"]["class"] = "collections:OrderedDict"

    with pytest.raises(SerializationError, match="collections:OrderedDict"):
        load(rewrite_manifest(small_file, tmp_path / "bad.fxp", edit))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: first_node(m, "call_method").__setitem__("target", "__class__"), "may not be called"),
        (lambda m: first_node(m, "call_method").__setitem__("target", "numpy"), "may not be called"),
        (lambda m: first_node(m, "get_attr").__setitem__("target", "__class__.__init__"), "plain attribute path"),
        (lambda m: first_node(m, "call_function").update(
            target={"$": "ref", "path": "builtins:getattr"}, args=[{"$": "node", "name": "x"}, "__class__"]),
         "getattr"),
    ],
)
def test_refuses_private_attribute_access(small_file, tmp_path, edit, match):
    with pytest.raises(SerializationError, match=match):
        load(rewrite_manifest(small_file, tmp_path / "bad.fxp", edit))


# torch.fx pastes these strings into the forward() source it generates: they must be identifiers
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: first_node(m, "placeholder").__setitem__("target", "x=__import__('os').system('echo pwned')"),
        lambda m: first_node(m, "call_method").__setitem__("target", "mean(); __import__('os').system('x'); x.mean"),
        lambda m: first_node(m, "get_attr").__setitem__("target", 'a")+__import__("os").getcwd()+getattr(self, "b'),
        lambda m: first_node(m, "call_function")["kwargs"].__setitem__("inplace=print('pwned'), x", False),
        lambda m: first_node(m, "call_module").__setitem__("target", "conv;print(1)"),
        lambda m: m["root"]["children"][0].__setitem__("name", "a.b"),
        lambda m: m["root"]["attributes"].__setitem__("_parameters", None),
    ],
)
def test_refuses_code_injection_through_names(small_file, tmp_path, edit):
    with pytest.raises(SerializationError, match="refusing to load"):
        load(rewrite_manifest(small_file, tmp_path / "bad.fxp", edit))


def test_missing_non_zip_wrong_format_newer_version_and_corrupt_files(small_file, tmp_path):
    with pytest.raises(SerializationError, match="no such file"):
        load(tmp_path / "missing.fxp")
    text = tmp_path / "text.fxp"
    text.write_text("not a zip")
    with pytest.raises(SerializationError, match="not a zip"):
        load(text)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(SerializationError, match="unexpected archive member 'hello.txt'"):
        load(other)
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("code.py", "print(1)")
    with pytest.raises(SerializationError, match="no manifest.json"):
        load(other)
    with pytest.raises(SerializationError, match="not an fxprune model"):
        load(rewrite_manifest(small_file, tmp_path / "f.fxp", lambda m: m.__setitem__("format", "onnx")))
    with pytest.raises(SerializationError, match="Upgrade fxprune"):
        load(rewrite_manifest(small_file, tmp_path / "v.fxp", lambda m: m.__setitem__("format_version", 99)))
    with pytest.raises(SerializationError, match="corrupt"):
        load(rewrite_manifest(small_file, tmp_path / "c.fxp", lambda m: m["root"].pop("children")))
    with pytest.raises(SerializationError, match="corrupt"):
        load(rewrite_manifest(small_file, tmp_path / "n.fxp",
                              lambda m: first_node(m, "call_module")["args"].__setitem__(0, {"$": "node", "name": "nope"})))
    broken = tmp_path / "broken.fxp"
    with zipfile.ZipFile(small_file) as zin, zipfile.ZipFile(broken, "w") as zout:
        zout.writestr("manifest.json", zin.read("manifest.json")[:-10])
        zout.writestr("tensors.safetensors", zin.read("tensors.safetensors"))
    with pytest.raises(SerializationError, match="manifest.json is corrupt"):
        load(broken)


class NotATensor:
    pass


def legacy_file(src: Path, dst: Path, tensors: dict) -> Path:
    """A format-version-1 file (tensors in tensors.pt, written by torch.save) with ``src``'s manifest."""
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        manifest = json.loads(zin.read("manifest.json"))
        manifest["format_version"] = 1
        zout.writestr("manifest.json", json.dumps(manifest))
        zout.writestr("tensors.pt", buf.getvalue())
    return dst


def test_tensors_are_safetensors_and_nothing_is_unpickled(small_file, tmp_path, monkeypatch):
    from safetensors.torch import load as st_load

    with zipfile.ZipFile(small_file) as zf:
        info = zf.getinfo("tensors.safetensors")
        assert info.compress_type == zipfile.ZIP_STORED
        stored = st_load(zf.read("tensors.safetensors"))
    model = load(small_file)
    assert torch.equal(stored["fc1.weight"], model.fc1.weight)
    # loading a version-2 file never calls torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    load(small_file)
    monkeypatch.undo()
    # version-1 files (tensors.pt) still load, with weights_only=True ...
    with zipfile.ZipFile(small_file) as zf:
        tensors = st_load(zf.read("tensors.safetensors"))
    old = legacy_file(small_file, tmp_path / "old.fxp", tensors)
    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load(old)(x), model(x))
    assert calls == [True]
    # ... and a tensors.pt holding an arbitrary object is refused by weights_only loading
    with pytest.raises(SerializationError, match="tensors.pt"):
        load(legacy_file(small_file, tmp_path / "evil.fxp", {"x": NotATensor()}))
    source = Path(serialization.__file__).read_text()
    assert "weights_only=False" not in source
    assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle)\b", source, re.M)
    assert all("weights_only=True" in line for line in source.splitlines() if "torch.load(" in line)


# ------------------------------------------------------------------------ save-time errors

def test_save_refuses_unserialisable_attributes_and_hooks(tmp_path):
    gm = capture(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.randn(1, 2)).gm
    leaf = gm.get_submodule("0")
    leaf.cache = object()
    with pytest.raises(SerializationError, match=r"attribute 'cache' of module '0' \(Linear\)"):
        save(gm, tmp_path / "a.fxp")
    leaf.cache = lambda t: t
    with pytest.raises(SerializationError, match="Lambdas"):
        save(gm, tmp_path / "a.fxp")
    del leaf.cache
    handle = leaf.register_forward_hook(lambda *a: None)
    with pytest.raises(SerializationError, match="forward_hooks"):
        save(gm, tmp_path / "a.fxp")
    handle.remove()
    assert not (tmp_path / "a.fxp").exists()
    save(gm, tmp_path / "a.fxp")
    with pytest.raises(SerializationError, match="cannot write"):
        save(gm, tmp_path / "no" / "such" / "dir.fxp")


def test_file_layout(small_file):
    with zipfile.ZipFile(small_file) as zf:
        assert sorted(zf.namelist()) == ["code.py", "manifest.json", "tensors.safetensors"]
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format"] == "fxprune.model" and manifest["format_version"] == 2
    assert manifest["torch_version"] == str(torch.__version__)
    assert manifest["root"]["kind"] == "graph_module" and manifest["root"]["class_name"] == "TinyUserNet"
    ops = {n["op"] for n in manifest["root"]["graph"]["nodes"]}
    assert {"placeholder", "call_module", "call_function", "get_attr", "output"} <= ops


def test_spec_types_are_never_imported_from_the_file(tmp_path, monkeypatch):
    """A saved pytree spec may name a type or an enum; nothing outside the allow-list is imported."""
    from fxprune.serialization import _load_spec

    marker = tmp_path / "imported"
    (tmp_path / "fxprune_probe_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    leaf = {"type": None, "context": None, "children_spec": []}
    for spec in (
        [1, {"type": "fxprune_probe_mod.Thing", "context": "null", "children_spec": []}],
        [1, {"type": "collections.defaultdict", "context": json.dumps({
            "default_factory_module": "fxprune_probe_mod", "default_factory_name": "x", "dict_context": []}),
            "children_spec": []}],
        [1, {"type": "builtins.dict", "context": json.dumps(
            [{"__enum__": True, "fqn": "fxprune_probe_mod:E", "name": "A"}]), "children_spec": [leaf]}],
    ):
        with pytest.raises(SerializationError, match="refusing"):
            _load_spec(json.dumps(spec))
    assert not marker.exists() and "fxprune_probe_mod" not in sys.modules
    with pytest.raises(SerializationError, match="corrupt"):
        _load_spec("{not json")
    ok = _load_spec(json.dumps([1, {"type": "builtins.dict", "context": '["a"]', "children_spec": [leaf]}]))
    assert ok.type is dict and ok.context == ["a"]


# ------------------------------------------------------------------------ the allow-list covers real graphs

def _collector():
    import importlib.util

    path = REPO / "tools" / "collect_graph_targets.py"
    spec = importlib.util.spec_from_file_location("_fxprune_tools_collect_graph_targets", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _assert_round_trip(gm: torch.fx.GraphModule, x, tmp_path: Path, collector) -> None:
    from collections import defaultdict

    names: dict[str, set[str]] = defaultdict(set)
    collector.collect_model(gm, names)
    gaps = collector.missing(names)
    gaps.pop("annotation", None)  # unknown type annotations are dropped on load (cosmetic)
    assert not any(gaps.values()), gaps
    loaded = round_trip(gm, tmp_path)
    with torch.no_grad():
        want, got = gm(*x), loaded(*x)
    assert torch.equal(want, got)


ZOO_COMPILE = ["resnet18", "mobilenet_v3_small", "vit_tiny", "swin_tiny"]


@pytest.mark.parametrize("name", ZOO_COMPILE)
def test_compiled_zoo_models_round_trip_through_the_allow_list(name, tmp_path):
    import fxprune

    builder, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    model, x = builder().eval(), (torch.randn(*shape),)
    res = fxprune.compile(model, x, mac_budget="50%", tolerance=0.05)
    collector = _collector()
    _assert_round_trip(res.original, x, tmp_path, collector)
    _assert_round_trip(res.model, x, tmp_path, collector)


def test_tiny_zoo_and_stock_transformers_round_trip_through_the_allow_list(tmp_path):
    import fxprune
    from fxprune.testing.zoo import TINY_MODELS, tiny_model

    collector = _collector()
    for name in TINY_MODELS:
        model, x = tiny_model(name)
        _assert_round_trip(fxprune.capture(model, x).gm, x, tmp_path, collector)
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    x = (torch.randn(2, 5, 32),)
    res = fxprune.compile(enc, x, mac_budget="50%", tolerance=0.05)
    _assert_round_trip(res.model, x, tmp_path, collector)


def test_layer_hyper_parameters_are_checked_against_the_tensors(small_file, tmp_path):
    def edit(manifest):
        conv = next(c for c in manifest["root"]["children"] if c["name"] == "conv")["module"]
        conv["attributes"]["out_channels"] = 9

    with pytest.raises(SerializationError, match=r"weight has the shape \(8, 3, 3, 3\), but the layer's "
                                                 r"hyper-parameters say \(9, 3, 3, 3\)"):
        load(rewrite_manifest(small_file, tmp_path / "bad.fxp", edit))


def test_module_names_that_are_not_identifiers_round_trip(tmp_path):
    """torchvision's RegNet names its blocks 'block1-0'; torch.fx writes getattr(..., "block1-0")."""
    model = tvm.regnet_y_400mf(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = capture(model, x).gm
    assert any("-" in name for name, _ in gm.named_modules())
    loaded = round_trip(gm, tmp_path)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


@pytest.mark.parametrize("name", ['a"+print(1)+"b', "a\\\\b", "a b", "__class__", ""])
def test_member_names_that_could_leave_a_string_literal_are_refused(small_file, tmp_path, name):
    def edit(manifest):
        manifest["root"]["children"][0]["name"] = name

    with pytest.raises(SerializationError, match="refusing to load"):
        load(rewrite_manifest(small_file, tmp_path / "bad.fxp", edit))
