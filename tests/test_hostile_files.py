"""Hostile ``.fxp`` files: every one is refused with ``SerializationError`` or loads as plain data.

Each case is a tampered copy of a real saved model whose payload, if it ran, would create its own
marker file (a shell command, Python code, a file write, an import of a probe module that writes
the marker). All cases are loaded in one fresh subprocess, so a payload that runs cannot hide behind
the test process's state; the subprocess also runs the models that load (forward, deepcopy) and
records which modules the hostile loads imported. The test asserts every outcome, that no marker
exists, that nothing new was imported, and that nothing raised anything but ``SerializationError``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fxprune.capture import capture
from fxprune.serialization import MAX_MANIFEST_BYTES, save

REPO = Path(__file__).resolve().parents[1]
PROBE = "fxprune_hostile_probe"  # a module on the subprocess's path that writes a marker when imported


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)) * x.shape[1])


# ------------------------------------------------------------------------------- file surgery

class Case:
    def __init__(self, name: str, expect: str = "refused"):
        self.name, self.expect = name, expect


def read(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with zipfile.ZipFile(src) as zf:
        return json.loads(zf.read("manifest.json")), st_load(zf.read("tensors.safetensors"))


def write(dst: Path, manifest: dict | bytes, tensors: dict | bytes, *, extra: dict[str, bytes] | None = None,
          manifest_compress: int = zipfile.ZIP_DEFLATED, tensors_compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(dst, "w") as zf:
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        zf.writestr("manifest.json", data, compress_type=manifest_compress)
        zf.writestr("tensors.safetensors", tensors if isinstance(tensors, bytes) else st_save(tensors),
                    compress_type=tensors_compress)
        for name, blob in (extra or {}).items():
            zf.writestr(name, blob)
    return dst


def nodes(m: dict) -> list[dict]:
    return m["root"]["graph"]["nodes"]


def node(m: dict, op: str) -> dict:
    return next(n for n in nodes(m) if n["op"] == op)


def add_node(m: dict, entry: dict) -> dict:
    """Insert ``entry`` before the output node (torch.fx emits every node, used or not)."""
    nodes(m).insert(len(nodes(m)) - 1, {"args": [], "kwargs": {}, **entry})
    return m


def call(m: dict, target: dict, *args, name: str = "payload", **kwargs) -> dict:
    return add_node(m, {"name": name, "op": "call_function", "target": target, "args": list(args),
                        "kwargs": kwargs})


def ref(path: str) -> dict:
    return {"$": "ref", "path": path}


def x_node() -> dict:
    return {"$": "node", "name": "x"}


def module_entry(m: dict, name: str) -> dict:
    return next(c for c in m["root"]["children"] if c["name"] == name)["module"]


def edits(marker: str, tmp: Path) -> dict[str, tuple[Case, Callable[[dict, dict], tuple]]]:
    """name -> (case, edit(manifest, tensors) -> (manifest, tensors[, write kwargs]))."""
    sh = f"touch {marker}"
    py = f"open({marker!r}, 'w').close()"
    hub = tmp / "hubrepo"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"{py}\ndef entry():\n    return None\n")
    out: dict[str, tuple[Case, Callable]] = {}

    def case(name: str, expect: str = "refused"):
        def register(fn):
            out[name] = (Case(name, expect), fn)
            return fn
        return register

    # ---- call targets that run shell commands, Python code or write files
    targets = {
        "collect_env_run": ("torch.utils.collect_env:run", [sh]),
        "forward_from_src": ("torch.fx.graph_module:_forward_from_src", [f"{py}\ndef forward(self): pass", {"$": "dict", "items": []}]),
        "method_from_src": ("torch.fx.graph_module:_method_from_src", ["forward", f"{py}\ndef forward(self): pass", {"$": "dict", "items": []}]),
        "fxprune_main": ("fxprune.__main__:main", []),
        "model_dump_main": ("torch.utils.model_dump.__main__:main", []),
        "torch_save": ("torch:save", [x_node(), marker]),
        "torch_serialization_save": ("torch.serialization:save", [x_node(), marker]),
        "onnx_export": ("torch.onnx:export", [{"$": "node", "name": "conv"}, {"$": "tuple", "items": [x_node()]}, marker]),
        "onnx_utils_export": ("torch.onnx.utils:export", [{"$": "node", "name": "conv"}, {"$": "tuple", "items": [x_node()]}, marker]),
        "load_inline": ("torch.utils.cpp_extension:load_inline", ["probe", f"// {marker}", "", ["int f(){return 0;}"]]),
        "cpp_extension_load": ("torch.utils.cpp_extension:load", ["probe", [marker]]),
        "hub_load": ("torch.hub:load", [str(hub), "entry"], ),
        "hub_download": ("torch.hub:download_url_to_file", [f"file://{hub / 'hubconf.py'}", marker]),
        "importlib_import": ("importlib:import_module", [PROBE]),
        "builtins_import": ("builtins:__import__", [PROBE]),
        "dynamo_optimize": ("torch._dynamo:optimize", ["eager"]),
        "torch_compile": ("torch:compile", [{"$": "node", "name": "conv"}]),
        "jit_load": ("torch.jit:load", [marker]),
        "torch_load": ("torch:load", [marker]),
        "package_importer": ("torch.package:PackageImporter", [marker]),
        "eval": ("builtins:eval", [py]),
        "exec": ("builtins:exec", [py]),
        "open": ("builtins:open", [marker, "w"]),
        "compile": ("builtins:compile", [py, "x", "exec"]),
        "breakpoint": ("builtins:breakpoint", []),
        "os_system": ("os:system", [sh]),
        "posix_system": ("posix:system", [sh]),
        "subprocess_run": ("subprocess:run", [["touch", marker]]),
        "subprocess_popen": ("subprocess:Popen", [["touch", marker]]),
        "pathlib_touch": ("pathlib:Path.touch", [marker]),
        "attrgetter": ("operator:attrgetter", ["__class__.__init__.__globals__"]),
        "methodcaller": ("operator:methodcaller", ["__reduce__"]),
        "operator_call": ("operator:call", [ref("builtins:exec"), py]),
        "itemgetter": ("operator:itemgetter", ["__builtins__"]),
        "functools_partial": ("functools:partial", [ref("builtins:exec"), py]),
        "torch_from_file_fn": ("torch:from_file", [marker, True, 16]),
        "set_default_device": ("torch:set_default_device", ["meta"]),
        "manual_seed": ("torch:manual_seed", [0]),
        "ops_load_library": ("torch.ops:load_library", [marker]),
        "checkpoint": ("torch.utils.checkpoint:checkpoint", [ref("builtins:exec"), py]),
        "vmap": ("torch:vmap", [ref("builtins:exec")]),
        "fx_wrap_alias": ("torch.nn.functional:torch.load", [marker]),
        "module_walk": ("torch.nn.functional:torch.utils.collect_env.run", [sh]),
        "dunder_builtins": ("torchvision.models.resnet:__builtins__", []),
        "probe_function": (f"{PROBE}:run", []),
        "not_a_path": ("torch", []),
    }
    for name, (path, args) in targets.items():
        case(f"call:{name}")(lambda m, t, path=path, args=args: (call(m, ref(path), *args), t))

    # ---- torch.ops
    for name, (op, overload, args) in {
        "aten_from_file": ("aten::from_file", None, [marker, True, 16]),
        "aten_set": ("aten::set_", "source_Tensor", [x_node(), x_node()]),
        "aten_as_strided": ("aten::as_strided", None, [x_node(), [1000000], [1]]),
        "aten_unsafe_index": ("aten::_unsafe_index", "Tensor", [x_node(), [None]]),
        "aten_index_put_impl": ("aten::_index_put_impl_", None, [x_node(), [None], x_node(), False, True]),
        "custom_namespace": (f"{PROBE}::run", None, []),
        "bad_overload": ("aten::add", "__call__", [x_node(), 1]),
    }.items():
        case(f"op:{name}")(lambda m, t, op=op, ov=overload, args=args: (
            call(m, {"$": "op", "name": op, "overload": ov}, *args), t))

    # ---- methods and attribute reads
    @case("method:to_folder_on_nested_graph_module")
    def _(m, t):
        m["root"]["children"].append({"name": "sub", "module": copy.deepcopy(m["root"])})
        add_node(m, {"name": "sub", "op": "get_attr", "target": "sub"})
        add_node(m, {"name": "payload", "op": "call_method", "target": "to_folder",
                     "args": [{"$": "node", "name": "sub"}, str(tmp / "folder"), "M"]})
        return m, t

    for method, args in {"type": [PROBE + ".T"], "apply_": [ref("builtins:exec")], "untyped_storage": [],
                         "register_hook": [ref("builtins:exec")], "numpy": [], "share_memory_": [],
                         "__reduce_ex__": [2], "set_": [x_node()], "backward": [], "format": []}.items():
        case(f"method:{method}")(lambda m, t, method=method, args=args: (add_node(m, {
            "name": "payload", "op": "call_method", "target": method, "args": [x_node(), *args]}), t))

    @case("get_attr:bound_method")
    def _(m, t):
        add_node(m, {"name": "fn", "op": "get_attr", "target": "conv.register_forward_hook"})
        return m, t

    @case("get_attr:class_attribute")
    def _(m, t):
        add_node(m, {"name": "fn", "op": "get_attr", "target": "conv.__class__"})
        return m, t

    @case("call_module:not_a_module")
    def _(m, t):
        node(m, "call_module")["target"] = "training"
        return m, t

    for attr in ("__class__", "__globals__", "forward", "to_folder"):
        case(f"getattr:{attr}")(lambda m, t, attr=attr: (call(m, ref("builtins:getattr"), x_node(), attr), t))

    @case("getattr:computed_name")
    def _(m, t):
        call(m, ref("builtins:getattr"), x_node(), {"$": "node", "name": "x"})
        return m, t

    # ---- module classes and attributes
    for name, cls in {"data_parallel": "torch.nn.parallel.data_parallel:DataParallel",
                      "sync_bn": "torch.nn.modules.batchnorm:SyncBatchNorm",
                      "graph_module_as_class": "torch.fx.graph_module:GraphModule",
                      "fxprune_main": "fxprune.__main__:main", "probe": f"{PROBE}:Net",
                      "wrong_module_path": "torch.nn.modules.conv:Linear",
                      "collections": "collections:OrderedDict"}.items():
        def edit(m, t, cls=cls):
            module_entry(m, "conv")["class"] = cls
            return m, t
        case(f"class:{name}")(edit)

    @case("attr:dunder_deepcopy")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["__deepcopy__"] = ref("torch:relu")
        return m, t

    @case("attr:shadows_forward")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["forward"] = ref("torch:relu")
        return m, t

    @case("attr:non_identifier")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["x=__import__('os').system('touch m')"] = 1
        return m, t

    @case("attr:graph_module_code")
    def _(m, t):
        m["root"]["attributes"]["_code"] = f"{py}\n"
        return m, t

    @case("attr:ref_exec")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["hook"] = ref("builtins:exec")
        return m, t

    @case("attr:enum_from_probe")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["mode"] = {"$": "enum", "class": f"{PROBE}:E", "name": "A"}
        return m, t

    @case("attr:payload_string", expect="loaded")
    def _(m, t):
        module_entry(m, "fc")["attributes"]["note"] = f"__import__('os').system('{sh}')"
        return m, t

    @case("type:annotation_from_probe", expect="loaded")
    def _(m, t):
        node(m, "call_module")["type"] = ref(f"{PROBE}:T")
        return m, t

    @case("name:child_path")
    def _(m, t):
        m["root"]["children"][0]["name"] = "../conv"
        return m, t

    @case("name:class_name_code")
    def _(m, t):
        m["root"]["class_name"] = "X(); __import__('os').system('x')"
        return m, t

    @case("name:node_name_code")
    def _(m, t):
        node(m, "call_module")["name"] = "a = __import__('os')"
        return m, t

    # ---- pytree specs (torch's own loader would import modules named in them)
    leaf = {"type": None, "context": None, "children_spec": []}
    for name, spec in {
        "spec_probe_type": [1, {"type": f"{PROBE}.T", "context": "null", "children_spec": [leaf]}],
        "spec_defaultdict": [1, {"type": "collections.defaultdict", "children_spec": [leaf], "context": json.dumps(
            {"default_factory_module": PROBE, "default_factory_name": "run", "dict_context": ["x"]})}],
        "spec_enum_context": [1, {"type": "builtins.dict", "children_spec": [leaf], "context": json.dumps(
            [{"__enum__": True, "fqn": f"{PROBE}:E", "name": "A"}])}],
        "spec_deep": "[" * 100_000 + "]" * 100_000,
    }.items():
        def edit(m, t, spec=spec):
            m["root"]["graph"]["codegen"] = {"kind": "pytree", "orig_args": ["x"],
                                             "in_spec": spec if isinstance(spec, str) else json.dumps(spec),
                                             "out_spec": None}
            return m, t
        case(f"spec:{name}")(edit)

    # ---- tensors
    @case("tensor:shape_vs_manifest")
    def _(m, t):
        t["fc.weight"] = torch.zeros(5, 8)
        return m, t

    @case("tensor:shape_vs_layer")
    def _(m, t):
        t["conv.weight"] = torch.zeros(8, 3, 5, 5)
        m["tensors"]["conv.weight"]["shape"] = [8, 3, 5, 5]
        return m, t

    @case("tensor:groups_do_not_divide")
    def _(m, t):
        module_entry(m, "conv")["attributes"]["groups"] = 5
        return m, t

    @case("tensor:dtype_vs_manifest")
    def _(m, t):
        t["fc.weight"] = t["fc.weight"].double()
        return m, t

    @case("tensor:integer_parameter")
    def _(m, t):
        t["fc.weight"] = t["fc.weight"].long()
        m["tensors"]["fc.weight"]["dtype"] = "int64"
        return m, t

    @case("tensor:unknown_dtype")
    def _(m, t):
        m["tensors"]["fc.weight"]["dtype"] = "os.system"
        return m, t

    @case("tensor:missing")
    def _(m, t):
        del t["fc.weight"]
        return m, t

    @case("tensor:unlisted")
    def _(m, t):
        t["extra"] = torch.zeros(3)
        return m, t

    @case("tensor:param_and_buffer")
    def _(m, t):
        module_entry(m, "bn")["buffers"][0]["tensor"] = "bn.weight"
        return m, t

    @case("tensor:safetensors_header_lies")
    def _(m, t):
        blob = bytearray(st_save(t))
        n = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8:8 + n])
        header["fc.weight"]["data_offsets"] = [0, 1 << 40]
        text = json.dumps(header).encode()
        return m, struct.pack("<Q", len(text)) + text + bytes(blob[8 + n:])

    # ---- archives
    @case("zip:path_traversal")
    def _(m, t):
        return m, t, {"extra": {"../../" + os.path.basename(marker): b"x", "/abs/" + os.path.basename(marker): b"x"}}

    @case("zip:extra_member")
    def _(m, t):
        return m, t, {"extra": {"payload.py": py.encode()}}

    @case("zip:huge_stored_manifest")
    def _(m, t):
        return json.dumps(m).encode() + b" " * (MAX_MANIFEST_BYTES + 1), t, {"manifest_compress": zipfile.ZIP_STORED}

    @case("zip:compressed_tensors")
    def _(m, t):
        return m, t, {"tensors_compress": zipfile.ZIP_DEFLATED}

    @case("json:deep_manifest")
    def _(m, t):
        return b"[" * 100_000 + b"]" * 100_000, t

    @case("json:deep_value")
    def _(m, t):
        node(m, "call_module")["args"].append(json.loads("[" * 400 + "]" * 400))
        return m, t

    @case("json:huge_int")
    def _(m, t):
        text = json.dumps(m).replace('"format_version": 2', '"format_version": ' + "9" * 100_000)
        return text.encode(), t

    @case("json:nan_constant")
    def _(m, t):
        return json.dumps(m).replace('"training": false', '"training": NaN', 1).encode(), t

    return out


def lying_sizes(src: Path, dst: Path) -> Path:
    """A manifest whose zip headers claim 100 bytes while it inflates to 50 MB."""
    manifest = b'{"format": "fxprune.model"}' + b" " * 50_000_000
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        zout.writestr("manifest.json", manifest, compress_type=zipfile.ZIP_DEFLATED)
        zout.writestr("tensors.safetensors", zin.read("tensors.safetensors"))
    blob = bytearray(dst.read_bytes())
    real = struct.pack("<I", len(manifest))
    fake = struct.pack("<I", 100)
    start = 0
    while (i := blob.find(real, start)) != -1:  # uncompressed-size fields (local header, central directory)
        blob[i:i + 4] = fake
        start = i + 4
    dst.write_bytes(bytes(blob))
    return dst


def zip_bomb(src: Path, dst: Path) -> Path:
    """A 1 MB file whose manifest inflates to 1 GiB of spaces."""
    chunk = b" " * (1 << 20)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        with zout.open("manifest.json", "w", force_zip64=True) as fh:
            for _ in range(1024):
                fh.write(chunk)
        zout.writestr("tensors.safetensors", zin.read("tensors.safetensors"), compress_type=zipfile.ZIP_STORED)
    return dst


def legacy_file(src: Path, dst: Path, tensors: dict) -> Path:
    """A format-version-1 file (tensors in ``tensors.pt`` by torch.save) with ``src``'s manifest."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        manifest = json.loads(zin.read("manifest.json"))
        manifest["format_version"] = 1
        zout.writestr("manifest.json", json.dumps(manifest))
        zout.writestr("tensors.pt", buf.getvalue())
    return dst


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def legacy_pickle_bomb(src: Path, dst: Path, marker: str) -> Path:
    buf = io.BytesIO()
    torch.save({"fc.weight": Payload(marker)}, buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        manifest = json.loads(zin.read("manifest.json"))
        manifest["format_version"] = 1
        zout.writestr("manifest.json", json.dumps(manifest))
        zout.writestr("tensors.pt", buf.getvalue())
    return dst


RUNNER = textwrap.dedent(
    """
    import json, os, sys, copy
    import torch, fxprune
    from fxprune.errors import SerializationError

    cases = json.load(open(sys.argv[1]))
    x = torch.randn(2, 3, 8, 8)
    for valid in cases["_valid"]:  # warm up: whatever valid loads import (version 2 and version 1)
        fxprune.load(valid)(x)
    before = set(sys.modules)
    results = {}
    for name, (path, marker) in cases.items():
        if name == "_valid":
            continue
        rec = {}
        try:
            model = fxprune.load(path)
        except SerializationError as err:
            rec = {"outcome": "refused", "message": str(err)[:400]}
        except BaseException as err:  # SystemExit included: a payload must never get that far
            rec = {"outcome": "error", "message": f"{type(err).__name__}: {str(err)[:400]}"}
        else:
            rec = {"outcome": "loaded"}
            try:
                with torch.no_grad():
                    model(x)
                copy.deepcopy(model)(x)
                rec["forward"] = "ok"
            except BaseException as err:
                rec["forward"] = f"{type(err).__name__}: {str(err)[:200]}"
        rec["marker"] = os.path.exists(marker)
        results[name] = rec
    new = sorted(m for m in set(sys.modules) - before)
    print(json.dumps({"results": results, "new_modules": new}))
    """
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hostile")
    markers = tmp / "markers"
    markers.mkdir()
    torch.manual_seed(0)
    gm = capture(Net(), torch.randn(2, 3, 8, 8)).gm
    valid = save(gm, tmp / "valid.fxp")
    base_manifest, base_tensors = read(valid)
    legacy = legacy_file(valid, tmp / "valid_v1.fxp", base_tensors)
    cases: dict[str, list[str]] = {"_valid": [str(valid), str(legacy)]}
    expected: dict[str, str] = {}
    for name, (case, edit) in edits(str(markers / "MARKER"), tmp).items():
        marker = str(markers / name.replace(":", "_"))
        case_edit = edits(marker, tmp)[name][1]
        result = case_edit(copy.deepcopy(base_manifest), dict(base_tensors))
        manifest, tensors, kwargs = (*result, {})[:3]
        path = write(tmp / f"{name.replace(':', '_')}.fxp", manifest, tensors, **kwargs)
        cases[name] = [str(path), marker]
        expected[name] = case.expect
    for name, build in {"zip:lying_sizes": lambda p, mk: lying_sizes(valid, p),
                        "zip:bomb": lambda p, mk: zip_bomb(valid, p),
                        "legacy:pickle_payload": lambda p, mk: legacy_pickle_bomb(valid, p, mk)}.items():
        marker = str(markers / name.replace(":", "_"))
        cases[name] = [str(build(tmp / f"{name.replace(':', '_')}.fxp", marker)), marker]
        expected[name] = "refused"
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "run.py").write_text(RUNNER)
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    (probe_dir / f"{PROBE}.py").write_text(
        f"open({str(markers / 'probe_imported')!r}, 'w').close()\n"
        "def run(*a, **k):\n    pass\nclass T:\n    pass\nclass Net:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(probe_dir)]), "FXPRUNE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(tmp / "run.py"), str(tmp / "cases.json")], cwd=tmp,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["expected"] = expected
    report["markers"] = sorted(os.listdir(markers))
    report["tmp"] = tmp
    return report


def test_print_outcomes(hostile):
    """Not a check: the table of cases and outcomes, for the log (pytest -s)."""
    for name, rec in sorted(hostile["results"].items()):
        print(f"{name:45s} {rec['outcome']:8s} {rec.get('forward', '')[:20]:20s} {rec.get('message', '')[:150]}")


def test_no_payload_ran_and_nothing_was_imported(hostile):
    assert hostile["markers"] == [], hostile["markers"]
    assert not (hostile["tmp"] / "folder").exists()
    assert hostile["new_modules"] == [], hostile["new_modules"]
    assert len(hostile["results"]) >= 100


def test_every_case_is_refused_or_loads_as_plain_data(hostile):
    wrong = {name: rec for name, rec in hostile["results"].items() if rec["outcome"] != hostile["expected"][name]}
    assert not wrong, json.dumps(wrong, indent=1)
    for name, rec in hostile["results"].items():
        assert not rec["marker"], name
        if rec["outcome"] == "loaded":
            assert rec["forward"] == "ok", (name, rec)


@pytest.mark.parametrize("group, words", [
    ("call:", "not on fxprune's allow-list|invalid path"),
    ("op:", "allow-listed operator|invalid operator overload"),
    ("method:", "may not be called"),
    ("class:", "not on fxprune's allow-list"),
    ("zip:", "refusing to load|damaged zip"),
    ("json:", "nested|corrupt"),
])
def test_refusals_say_what_and_why(hostile, group, words):
    import re

    for name, rec in hostile["results"].items():
        if name.startswith(group) and rec["outcome"] == "refused":
            assert re.search(words, rec["message"]), (name, rec["message"])


def test_zip_bomb_is_refused_before_it_is_inflated(hostile):
    assert (hostile["tmp"] / "zip_bomb.fxp").stat().st_size < 2 * 1024 * 1024
    msg = hostile["results"]["zip:bomb"]["message"]
    assert "1,073,741,824 bytes uncompressed" in msg and "max_manifest_bytes" in msg
    assert "nested 100000 deep" in hostile["results"]["json:deep_manifest"]["message"]
