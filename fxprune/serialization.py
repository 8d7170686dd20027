"""Save and load pruned models without pickle and without the user's Python classes.

A pruned model is a ``torch.fx.GraphModule`` whose code is generated from its graph, so the graph
plus the state of its leaf modules is the whole model. ``save`` writes them to a zip file (``.fxp``
by convention)::

    manifest.json   format name and version, fxprune/torch/python versions, the module tree
                    (class import paths, plain attributes, parameter/buffer names, children) and,
                    for every graph module in it, the graph as a node list
    tensors.pt      torch.save of one flat {key: tensor} dict (parameters, buffers, tensor attributes)
    code.py         the generated forward(), for people to read; never executed by ``load``

``load`` never unpickles: the manifest is JSON and the tensors are read with
``torch.load(..., weights_only=True)``. Functions and module classes are stored by import path
(``module:qualname``) and resolved on load only when the module is in an allow-list
(:data:`DEFAULT_TRUSTED_PREFIXES` plus the caller's ``trusted_prefixes``). Inside the allow-list,
entry points that read or write files, download or run code (``torch.load``, ``torch.hub``,
``torchvision.io``, ``from_pretrained``, ``operator.methodcaller`` ...) are refused as well, and
graph attribute/method names may not be private or dunder names. This keeps a crafted file from
doing more than tensor maths; it is defence in depth, not a sandbox.

Modules are rebuilt without calling their ``__init__``: the object of the allow-listed class is
created with ``cls.__new__``, the ``nn.Module`` base is initialised, then its plain attributes,
parameters (with ``requires_grad``; tied parameters stay one object), buffers (persistent or not),
children and ``training`` flag are restored.

Manifest schema (version 1), in short::

    {"format": "fxprune.model", "format_version": 1, "fxprune_version": str, "torch_version": str,
     "python_version": str,
     "tensors": {key: {"dtype": "float32", "shape": [int, ...]}},
     "root": MODULE}
    MODULE = {"kind": "graph_module", "class_name": str, "graph": GRAPH, ...COMMON}
           | {"kind": "module", "class": "pkg.mod:Qualname", ...COMMON}
           | {"kind": "alias", "target": "dotted.path.of.first.occurrence"}
    COMMON = {"training": bool, "attributes": {name: VALUE},
              "parameters": [{"name": str, "tensor": key | null, "requires_grad": bool}],
              "buffers": [{"name": str, "tensor": key | null, "persistent": bool}],
              "children": [{"name": str, "module": MODULE | null}]}
    GRAPH = {"codegen": {"kind": "python"} | {"kind": "pytree", "orig_args": [str],
                                              "in_spec": str | null, "out_spec": str | null},
             "nodes": [{"name": str, "op": str, "target": str | VALUE,
                        "args": [VALUE], "kwargs": {str: VALUE},
                        "type": {"$": "ref", "path": str} | {"$": "text", "value": str}  (optional),
                        "meta": {"is_wrapped": true}  (optional)}]}
    VALUE = null | bool | int | float | str | [VALUE] | {"$": TAG, ...}
    TAG in node, tuple, dict, slice, ellipsis, float (inf/nan), complex, dtype, device,
           memory_format, layout, size, tensor, ref (function/class import path), op (torch.ops
           overload), enum
"""

from __future__ import annotations

import builtins
import enum
import importlib
import io
import json
import keyword
import logging
import math
import os
import platform
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn as nn

from fxprune.errors import SerializationError

__all__ = [
    "save",
    "load",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_TRUSTED_PREFIXES",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "fxprune.model"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.pt"
CODE_NAME = "code.py"

#: Module prefixes whose functions and ``nn.Module`` classes a saved model may refer to.
DEFAULT_TRUSTED_PREFIXES: tuple[str, ...] = (
    "torch",
    "operator",
    "builtins",
    "math",
    "torchvision",
    "timm",
    "transformers",
    "fxprune",
)

# C modules that hold the objects of an allow-listed pure-Python module.
_MODULE_ALIASES = {"_operator": "operator"}
# Of ``builtins`` only these are allowed (unless the caller trusts "builtins" explicitly).
_SAFE_BUILTINS = frozenset({"getattr"})
# Dotted-path prefixes refused even inside the allow-list: file I/O, downloads, code loading,
# and callables that reach attributes by name (which would bypass the private-name rule).
_DENIED_PREFIXES = (
    "torch.load",
    "torch.save",
    "torch.from_file",
    "torch.serialization",
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.compile",
    "torch.library",
    "torch.classes",
    "torch.distributed",
    "torch.multiprocessing",
    "torch.utils.cpp_extension",
    "torch.utils.data",
    "torch.utils.model_zoo",
    "torch.utils.tensorboard",
    "torch._dynamo",
    "torch._inductor",
    "torch._ops",
    "torch.ops.aten.from_file",
    "torchvision.io",
    "torchvision.datasets",
    "torchvision.utils.save_image",
    "torchvision.models._api",
    "timm.models._hub",
    "timm.models._builder",
    "timm.models._factory",
    "timm.models._helpers",
    "timm.create_model",
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.call",
)
# Words (split at "_", "." and camelCase) of a function or class name that are refused anywhere.
_DENIED_WORDS = frozenset({
    "load", "save", "pretrained", "download", "hub", "open", "popen", "file", "pickle", "unpickle", "import",
    "exec", "eval", "compile", "script", "jit", "system", "spawn", "library", "dlopen", "preload",
})
# Tensor methods a graph may not call (file output, escaping to numpy, autograd hooks).
_DENIED_METHODS = frozenset({"numpy", "tofile", "dump", "dumps", "save", "register_hook", "storage",
                             "untyped_storage", "apply_", "map_", "map2_"})
_BUILTIN_TYPES = frozenset({"bool", "int", "float", "complex", "str", "bytes", "list", "tuple", "dict",
                            "slice"})
_DEFAULT_OP_NAMESPACES = frozenset({"aten", "prims"})
_NODE_OPS = frozenset({"placeholder", "get_attr", "call_function", "call_module", "call_method", "output"})


def _fxprune_version() -> str:
    try:
        import fxprune

        return str(getattr(fxprune, "__version__", "unknown"))
    except Exception:  # pragma: no cover - fxprune is always importable here
        return "unknown"


def _internal_keys() -> tuple[frozenset[str], frozenset[str]]:
    """``__dict__`` keys that ``nn.Module`` / ``GraphModule`` create for themselves."""
    module_keys = frozenset(vars(nn.Module()))
    gm_keys = frozenset(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph())))
    pytree_keys = frozenset({"_in_spec", "_out_spec"})  # set by recompile() from a pytree code generator
    return module_keys, gm_keys | module_keys | pytree_keys


_MODULE_INTERNALS, _GRAPH_MODULE_INTERNALS = _internal_keys()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# =========================================================================== import paths

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _import_attr(path: str) -> Any:
    """Import ``module:qualname`` without any allow-list check (used at save time)."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _candidate_paths(obj: Any) -> list[str]:
    """Import paths that may name ``obj``, the most public first."""
    name = getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    out: list[str] = []
    if isinstance(name, str):
        for public in ("torch", "torch.nn.functional", "operator", "math", "builtins"):
            out.append(f"{public}:{name}")
    if isinstance(module, str) and isinstance(qualname, str):
        out.append(f"{module}:{qualname}")
    if isinstance(module, str) and isinstance(name, str):
        out.append(f"{module}:{name}")
    return out


def _import_path(obj: Any, what: str) -> str:
    """The ``module:qualname`` path under which ``obj`` can be imported again.

    Raises:
        SerializationError: ``obj`` is a lambda, a local function/class or not importable.
    """
    for path in _candidate_paths(obj):
        if "<" in path:
            continue
        try:
            found = _import_attr(path)
        except Exception:
            continue
        if found is obj:
            return path
    raise SerializationError(
        f"cannot save {what}: {obj!r} has no import path (module {getattr(obj, '__module__', None)!r}, "
        f"qualname {getattr(obj, '__qualname__', None)!r}). Lambdas and functions or classes defined "
        "inside a function cannot be saved; move it to module level in an importable package."
    )


def _dotted(path: str) -> str:
    return path.replace(":", ".")


def _denied(module: str, qualname: str) -> bool:
    """Whether ``module:qualname`` is on the deny-list (file I/O, downloads, code loading)."""
    dotted = f"{module}.{qualname}"
    if any(dotted == p or dotted.startswith(p + ".") for p in _DENIED_PREFIXES):
        return True
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", qualname)
    return any(word.lower() in _DENIED_WORDS for word in words)


class _Resolver:
    """Resolves stored import paths, honouring the allow-list."""

    def __init__(self, trusted_prefixes: Iterable[str]):
        extra = _normalize_prefixes(trusted_prefixes)
        self.user_prefixes = extra
        self.prefixes = DEFAULT_TRUSTED_PREFIXES + extra
        self.cache: dict[str, Any] = {}

    def _allowed_module(self, module: str) -> bool:
        module = _MODULE_ALIASES.get(module, module)
        return any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def _user_trusts(self, dotted: str) -> bool:
        return any(dotted == p or dotted.startswith(p + ".") for p in self.user_prefixes)

    def _refuse(self, path: str, where: str, why: str) -> SerializationError:
        module = path.partition(":")[0]
        return SerializationError(
            f"refusing to load {where}: {path!r} {why}. A saved model may only refer to functions and "
            f"module classes from {', '.join(self.prefixes)}. If you trust this file and the code it names, "
            f"pass trusted_prefixes=({module!r},) to fxprune.serialization.load (the module must be "
            "importable)."
        )

    def resolve(self, path: str, where: str) -> Any:
        """Resolve ``module:qualname`` if the allow-list permits it."""
        if path in self.cache:
            return self.cache[path]
        if not isinstance(path, str) or path.count(":") != 1:
            raise SerializationError(f"corrupt manifest: {where} has the invalid import path {path!r}.")
        module_name, _, qualname = path.partition(":")
        parts = qualname.split(".")
        if not module_name or not all(parts) or any(p.startswith("__") or "<" in p for p in parts):
            raise self._refuse(path, where, "is not a plain module-level name")
        if not self._allowed_module(module_name):
            raise self._refuse(path, where, "is outside the allow-list")
        if module_name == "builtins" and qualname not in _SAFE_BUILTINS and not self._user_trusts("builtins"):
            raise self._refuse(path, where, "is a builtin other than getattr")
        if _denied(module_name, qualname) and not self._user_trusts(_dotted(path)):
            raise self._refuse(path, where, "can read or write files, download or run code")
        obj = self._walk(path, module_name, parts, where)
        self.cache[path] = obj
        return obj

    def _walk(self, path: str, module_name: str, parts: list[str], where: str) -> Any:
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as err:
            raise SerializationError(
                f"cannot load {where}: importing {module_name!r} failed ({err}).") from err
        for i, part in enumerate(parts):
            if i > 0 and not isinstance(obj, type):
                raise self._refuse(path, where, "walks through a non-class attribute")
            try:
                obj = getattr(obj, part)
            except AttributeError as err:
                raise SerializationError(
                    f"cannot load {where}: {path!r} does not exist in the installed "
                    f"{module_name.split('.')[0]} "
                    f"(the file was saved with other library versions?)."
                ) from err
            if isinstance(obj, type(importlib)):
                raise self._refuse(path, where, "names a module, not a function or class")
        own_module = getattr(obj, "__module__", None)
        own_qualname = str(getattr(obj, "__qualname__", ""))
        own = f"{own_module}.{own_qualname}" if isinstance(own_module, str) else ""
        if own and not self._allowed_module(own_module):
            raise self._refuse(path, where, f"is an alias of {own!r}, which is outside the allow-list")
        if own and _denied(own_module, own_qualname) and not self._user_trusts(own):
            raise self._refuse(path, where,
                               f"is an alias of {own!r}, which can read or write files or run code")
        return obj

    def resolve_class(self, path: str, where: str) -> type[nn.Module]:
        cls = self.resolve(path, where)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise SerializationError(
                f"corrupt manifest: {where} names {path!r}, which is not an nn.Module class.")
        return cls

    def resolve_op(self, name: str, overload: str | None, where: str) -> Any:
        """Resolve a ``torch.ops`` operator such as ``aten::add`` / overload ``Tensor``."""
        if not isinstance(name, str) or name.count("::") != 1:
            raise SerializationError(f"corrupt manifest: {where} has the invalid operator name {name!r}.")
        namespace, _, op_name = name.partition("::")
        if namespace not in _DEFAULT_OP_NAMESPACES and not self._user_trusts(f"torch.ops.{namespace}"):
            raise self._refuse(f"torch.ops.{namespace}:{op_name}", where, "is an operator outside aten/prims")
        plain = _is_identifier(op_name) and not op_name.startswith("__")
        if not plain or _denied(f"torch.ops.{namespace}", op_name):
            raise self._refuse(f"torch.ops.{namespace}:{op_name}", where, "can read or write files")
        if overload is not None and (not _is_identifier(overload) or overload.startswith("_")):
            raise SerializationError(f"refusing to load {where}: invalid operator overload {overload!r}.")
        try:
            packet = getattr(getattr(torch.ops, namespace), op_name)
            return packet if overload is None else getattr(packet, overload)
        except (AttributeError, RuntimeError) as err:
            raise SerializationError(
                f"cannot load {where}: operator {name}.{overload} does not exist here.") from err


def _normalize_prefixes(prefixes: Iterable[str] | str | None) -> tuple[str, ...]:
    if prefixes is None:
        return ()
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    out = []
    for p in prefixes:
        if not isinstance(p, str) or not p.strip(". :"):
            raise SerializationError(
                f"trusted_prefixes must be module names such as 'mypackage.layers', got {p!r}.")
        out.append(p.strip().rstrip(".").replace(":", "."))
    return tuple(out)


# ========================================================================== value encoding

class _SaveContext:
    """State of one ``save``: the flat tensor table (deduplicated by object identity)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys_by_id: dict[int, str] = {}
        self.keep_alive: list[torch.Tensor] = []

    def tensor_key(self, tensor: torch.Tensor, name: str) -> str:
        key = self.keys_by_id.get(id(tensor))
        if key is not None:
            return key
        key, i = name, 1
        while key in self.tensors:
            key, i = f"{name}#{i}", i + 1
        self.keys_by_id[id(tensor)] = key
        self.keep_alive.append(tensor)
        self.tensors[key] = tensor.detach()
        return key


class _Unsupported(Exception):
    """A value the format cannot hold; carries the offending type for the error message."""

    def __init__(self, value: Any):
        super().__init__(type(value).__name__)
        self.value = value


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {"$": "float", "value": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _encode(value: Any, ctx: _SaveContext, name: str, nodes: set[str] | None) -> Any:
    """Encode ``value`` as JSON-compatible data (``nodes``: names of graph nodes, or None outside graphs)."""
    if isinstance(value, torch.fx.Node):
        if nodes is None or value.name not in nodes:
            raise _Unsupported(value)
        return {"$": "node", "name": value.name}
    if isinstance(value, enum.Enum):
        return {"$": "enum", "class": _import_path(type(value), f"enum {name}"), "name": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _encode_float(float(value))
    if isinstance(value, complex):
        return {"$": "complex", "real": _encode_float(value.real), "imag": _encode_float(value.imag)}
    if isinstance(value, torch.Size):
        return {"$": "size", "items": [int(v) for v in value]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"$": "tuple", "items": [_encode(v, ctx, f"{name}[{i}]", nodes) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, ctx, f"{name}[{i}]", nodes) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = [[_encode(k, ctx, name, nodes), _encode(v, ctx, f"{name}[{k!r}]", nodes)]
                 for k, v in value.items()]
        return {"$": "dict", "items": items}
    return _encode_special(value, ctx, name, nodes)


def _encode_special(value: Any, ctx: _SaveContext, name: str, nodes: set[str] | None) -> Any:
    if isinstance(value, slice):
        parts = {k: _encode(getattr(value, k), ctx, name, nodes) for k in ("start", "stop", "step")}
        return {"$": "slice", **parts}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, torch.dtype):
        return {"$": "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$": "device", "value": str(value)}
    if isinstance(value, torch.memory_format):
        return {"$": "memory_format", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"$": "layout", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        if isinstance(value, nn.Parameter) or type(value) is not torch.Tensor:
            raise _Unsupported(value)
        return {"$": "tensor", "key": ctx.tensor_key(value, name)}
    if isinstance(value, torch._ops.OpOverload):
        return {"$": "op", "name": value._schema.name, "overload": value._overloadname}
    if isinstance(value, torch._ops.OpOverloadPacket):
        return {"$": "op", "name": value._qualified_op_name, "overload": None}
    if callable(value) and (isinstance(value, type) or hasattr(value, "__qualname__")):
        return {"$": "ref", "path": _import_path(value, name)}
    raise _Unsupported(value)


class _LoadContext:
    """State of one ``load``: tensors, the allow-list resolver and the built objects."""

    def __init__(self, tensors: dict[str, torch.Tensor], resolver: _Resolver):
        self.tensors = tensors
        self.resolver = resolver
        self.objects: dict[str, torch.Tensor] = {}

    def tensor(self, key: Any, where: str, parameter: bool = False,
               requires_grad: bool = False) -> torch.Tensor:
        """The tensor stored under ``key``; one object per key, so tied tensors stay tied."""
        if key in self.objects:
            return self.objects[key]
        if not isinstance(key, str) or key not in self.tensors:
            raise SerializationError(
                f"corrupt file: {where} refers to tensor {key!r}, which is not in {TENSORS_NAME}.")
        tensor = self.tensors[key]
        obj = nn.Parameter(tensor, requires_grad=bool(requires_grad)) if parameter else tensor
        self.objects[key] = obj
        return obj


def _decode_float(value: Any) -> float:
    if isinstance(value, str):
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"invalid float {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid float {value!r}")
    return float(value)


def _decode(data: Any, ctx: _LoadContext, where: str, nodes: dict[str, torch.fx.Node] | None) -> Any:
    """Inverse of :func:`_encode`."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, ctx, where, nodes) for v in data]
    if not isinstance(data, dict) or "$" not in data:
        raise ValueError(f"untagged JSON object {str(data)[:80]}")
    tag = data["$"]
    if tag == "node":
        if nodes is None or data["name"] not in nodes:
            raise ValueError(f"reference to unknown or later node {data.get('name')!r}")
        return nodes[data["name"]]
    if tag == "tuple":
        return tuple(_decode(v, ctx, where, nodes) for v in data["items"])
    if tag == "dict":
        return {_decode(k, ctx, where, nodes): _decode(v, ctx, where, nodes) for k, v in data["items"]}
    return _decode_special(tag, data, ctx, where, nodes)


def _torch_enum(name: Any, kind: type, what: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(value, kind):
        raise ValueError(f"unknown {what} {name!r}")
    return value


def _decode_special(tag: str, data: dict, ctx: _LoadContext, where: str, nodes: Any) -> Any:
    if tag == "float":
        return _decode_float(data["value"])
    if tag == "complex":
        return complex(_decode_float(data["real"]), _decode_float(data["imag"]))
    if tag == "slice":
        return slice(*(_decode(data[k], ctx, where, nodes) for k in ("start", "stop", "step")))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _torch_enum(data["name"], torch.dtype, "dtype")
    if tag == "memory_format":
        return _torch_enum(data["name"], torch.memory_format, "memory format")
    if tag == "layout":
        return _torch_enum(data["name"], torch.layout, "layout")
    if tag == "device":
        return torch.device(data["value"])
    if tag == "size":
        return torch.Size([int(v) for v in data["items"]])
    if tag == "tensor":
        return ctx.tensor(data["key"], where)
    if tag == "ref":
        return ctx.resolver.resolve(data["path"], where)
    if tag == "op":
        return ctx.resolver.resolve_op(data["name"], data["overload"], where)
    if tag == "enum":
        cls = ctx.resolver.resolve(data["class"], where)
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise ValueError(f"{data['class']!r} is not an Enum")
        return cls[data["name"]]
    raise ValueError(f"unknown value tag {tag!r}")


# ========================================================================== graphs

def _encode_target(node: torch.fx.Node, ctx: _SaveContext, where: str) -> Any:
    if node.op != "call_function":
        return node.target
    try:
        return _encode_special(node.target, ctx, where, None)
    except _Unsupported:
        raise SerializationError(
            f"cannot save node {node.name!r} of {where}: its target {node.target!r} is not a function "
            "with an import path."
        ) from None


def _encode_type(annotation: Any) -> Any:
    """A node's type annotation: an import path for plain classes, else its text (informative only)."""
    if isinstance(annotation, type):
        try:
            return {"$": "ref", "path": _import_path(annotation, "type annotation")}
        except SerializationError:
            pass
    return {"$": "text", "value": str(annotation)}


def _decode_type(data: Any, ctx: _LoadContext, where: str) -> Any:
    """Inverse of :func:`_encode_type`; annotations that do not resolve are dropped (they are cosmetic)."""
    if not isinstance(data, dict) or data.get("$") != "ref":
        return None
    path = data.get("path")
    if isinstance(path, str) and path.startswith("builtins:") and path.partition(":")[2] in _BUILTIN_TYPES:
        return getattr(builtins, path.partition(":")[2])
    try:
        annotation = ctx.resolver.resolve(path, where)
    except SerializationError as err:
        logger.debug("dropping the type annotation of %s: %s", where, err)
        return None
    return annotation if isinstance(annotation, type) else None


def _encode_codegen(graph: torch.fx.Graph, where: str) -> dict:
    codegen = graph._codegen
    if type(codegen) is torch.fx.graph.CodeGen:
        return {"kind": "python"}
    if type(codegen) is torch.fx.graph._PyTreeCodeGen:
        from torch.utils._pytree import treespec_dumps

        info = codegen.pytree_info
        return {
            "kind": "pytree",
            "orig_args": list(info.orig_args),
            "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    raise SerializationError(
        f"cannot save {where}: its graph uses the code generator {type(codegen).__name__}; only the default "
        "and the pytree code generators are supported."
    )


def _encode_graph(graph: torch.fx.Graph, ctx: _SaveContext, where: str) -> dict:
    names: set[str] = set()
    nodes = []
    for node in graph.nodes:
        here = f"node {node.name!r} ({node.op} {node.target}) of {where}"
        try:
            args = [_encode(a, ctx, f"{node.name}.arg{i}", names) for i, a in enumerate(node.args)]
            kwargs = {k: _encode(v, ctx, f"{node.name}.{k}", names) for k, v in node.kwargs.items()}
        except _Unsupported as err:
            raise SerializationError(
                f"cannot save {here}: an argument of type {type(err.value).__name__} ({err.value!r:.80}) "
                "is not supported. Supported: nodes, None, bool, int, float, str, tuple, list, dict, slice, "
                "Ellipsis, "
                "torch dtype/device/memory_format/layout/Size, plain tensors, importable functions."
            ) from None
        entry = {"name": node.name, "op": node.op, "target": _encode_target(node, ctx, here),
                 "args": args, "kwargs": kwargs}
        if node.type is not None:
            entry["type"] = _encode_type(node.type)
        if node.meta.get("is_wrapped"):  # torch.fx.wrap'ed leaf function: keeps re-tracing working
            entry["meta"] = {"is_wrapped": True}
        nodes.append(entry)
        names.add(node.name)
    return {"codegen": _encode_codegen(graph, where), "nodes": nodes}


def _decode_codegen(data: dict) -> torch.fx.graph.CodeGen:
    kind = data["kind"]
    if kind == "python":
        return torch.fx.graph.CodeGen()
    if kind == "pytree":
        from torch.utils._pytree import treespec_loads

        for spec in (data["in_spec"], data["out_spec"]):
            _import_spec_types(spec)
        in_spec = treespec_loads(data["in_spec"]) if data["in_spec"] is not None else None
        out_spec = treespec_loads(data["out_spec"]) if data["out_spec"] is not None else None
        orig_args = [_check_identifier(a, "a pytree graph input name", stars=True) for a in data["orig_args"]]
        info = torch.fx.graph._PyTreeInfo(orig_args, in_spec, out_spec)
        return torch.fx.graph._PyTreeCodeGen(info)
    raise ValueError(f"unknown code generator {kind!r}")


# Output containers of these libraries register their pytree type when their module is imported
# (transformers' ModelOutput subclasses, for example). A spec that names such a type is loadable
# once that module is imported; modules outside these installed libraries are never imported.
_SPEC_TYPE_LIBRARIES = ("transformers.", "timm.", "torchvision.")


def _import_spec_types(spec: str | None) -> None:
    """Import the (allow-listed) modules whose pytree types a serialized spec names."""
    if spec is None:
        return
    import importlib.util

    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    names: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("type"), str):
                names.add(obj["type"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    try:
        walk(json.loads(spec))
    except ValueError:
        return  # treespec_loads reports the corrupt spec
    for name in sorted(names - set(SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        module = name.rpartition(".")[0]
        if not module.startswith(_SPEC_TYPE_LIBRARIES) or not all(map(_is_identifier, module.split("."))):
            continue
        try:
            if importlib.util.find_spec(module.split(".")[0]) is not None:
                importlib.import_module(module)
        except ImportError:
            continue  # treespec_loads then says which type is not registered


# torch.fx pastes placeholder/method/keyword names and attribute paths into the Python source it
# generates for forward(), so everything the manifest supplies there must be a plain identifier.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _is_identifier(text: Any) -> bool:
    return isinstance(text, str) and bool(_IDENTIFIER.match(text)) and not keyword.iskeyword(text)


def _check_identifier(text: Any, what: str, *, stars: bool = False) -> str:
    bare = text
    if stars and isinstance(text, str) and len(text) - len(text.lstrip("*")) <= 2:
        bare = text.lstrip("*")
    if not _is_identifier(bare):
        raise SerializationError(f"refusing to load {what}: {text!r} is not a plain Python identifier.")
    return text


def _check_attr_path(target: Any, what: str) -> str:
    """A dotted attribute path: identifiers (or digits, as in nn.Sequential), no dunder parts."""
    parts = target.split(".") if isinstance(target, str) else [""]
    plain = [(_is_identifier(p) or (p.isdigit() and p.isascii())) and not p.startswith("__") for p in parts]
    if not all(plain):
        raise SerializationError(f"refusing to load {what}: {target!r} is not a plain attribute path.")
    return target


def _decode_target(nd: dict, ctx: _LoadContext, where: str) -> Any:
    op, target = nd["op"], nd["target"]
    if op not in _NODE_OPS:
        raise ValueError(f"unknown node op {op!r}")
    if op == "call_function":
        if not isinstance(target, dict) or target.get("$") not in ("ref", "op"):
            raise ValueError(f"call_function target must be a function reference, got {target!r:.80}")
        fn = _decode_special(target["$"], target, ctx, where, None)
        if not callable(fn):
            raise ValueError(f"call_function target {target!r:.80} is not callable")
        return fn
    if op == "call_method":
        if not _is_identifier(target) or target.startswith("_") or target in _DENIED_METHODS:
            raise SerializationError(
                f"refusing to load {where}: method {target!r} may not be called from a saved graph.")
        return target
    if op in ("get_attr", "call_module"):
        return _check_attr_path(target, where)
    if op == "placeholder":
        return _check_identifier(target, where, stars=True)
    if target != "output":
        raise ValueError(f"output node target must be 'output', got {target!r:.80}")
    return target


def _check_getattr_node(fn: Any, args: tuple, where: str) -> None:
    public = len(args) >= 2 and isinstance(args[1], str) and not args[1].startswith("_")
    if fn is builtins.getattr and not public:
        raise SerializationError(
            f"refusing to load {where}: getattr with the attribute {args[1] if len(args) > 1 else None!r}; "
            "only public attribute names given as constants are allowed."
        )


def _decode_graph(data: dict, ctx: _LoadContext, where: str) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    graph._codegen = _decode_codegen(data["codegen"])
    nodes: dict[str, torch.fx.Node] = {}
    for nd in data["nodes"]:
        here = f"node {nd['name']!r} of {where or 'the root graph module'}"
        target = _decode_target(nd, ctx, here)
        args = tuple(_decode(a, ctx, here, nodes) for a in nd["args"])
        kwargs = {_check_identifier(k, f"keyword of {here}"): _decode(v, ctx, here, nodes)
                  for k, v in nd["kwargs"].items()}
        if nd["op"] == "call_function":
            _check_getattr_node(target, args, here)
        if nd["name"] in nodes:
            raise ValueError(f"duplicate node name {nd['name']!r}")
        node_type = _decode_type(nd.get("type"), ctx, here)
        node = graph.create_node(nd["op"], target, args, kwargs, name=str(nd["name"]), type_expr=node_type)
        if nd.get("meta", {}).get("is_wrapped") is True:
            node.meta["is_wrapped"] = True
        nodes[nd["name"]] = node
    return graph


# ========================================================================== modules

def _check_hooks(module: nn.Module, path: str) -> None:
    for attr in _HOOK_DICTS:
        if getattr(module, attr, None):
            raise SerializationError(
                f"cannot save module {path or '<root>'!r} ({type(module).__name__}): it has "
                f"{attr.strip('_')} "
                "registered, which the file format cannot hold. Remove the hooks before saving."
            )


def _module_header(module: nn.Module, path: str, ctx: _SaveContext) -> tuple[dict, frozenset[str]]:
    if isinstance(module, torch.fx.GraphModule):
        if type(module).__mro__[1] is not torch.fx.GraphModule:
            logger.warning("module %r is a %s; it is saved as a plain GraphModule", path,
                           type(module).__mro__[1].__name__)
        entry = {"kind": "graph_module", "class_name": type(module).__name__,
                 "graph": _encode_graph(module.graph, ctx, f"graph module {path or '<root>'!r}")}
        return entry, _GRAPH_MODULE_INTERNALS
    cls_path = _import_path(type(module), f"module {path or '<root>'!r}")
    if cls_path.partition(":")[0].split(".")[0] not in DEFAULT_TRUSTED_PREFIXES:
        logger.warning("module %r has the class %s; loading the file will need trusted_prefixes=(%r,)",
                       path, cls_path, cls_path.partition(":")[0])
    return {"kind": "module", "class": cls_path}, _MODULE_INTERNALS


def _encode_attributes(module: nn.Module, path: str, skip: frozenset[str], ctx: _SaveContext) -> dict:
    out = {}
    for name, value in vars(module).items():
        if name in skip:
            continue
        if not _is_identifier(name):
            raise SerializationError(
                f"cannot save attribute {name!r} of module {path or '<root>'!r}: not a Python identifier.")
        try:
            out[name] = _encode(value, ctx, _join(path, name), None)
        except _Unsupported as err:
            raise SerializationError(
                f"cannot save attribute {name!r} of module {path or '<root>'!r} ({type(module).__name__}): "
                f"values of type {type(err.value).__name__} are not supported (plain Python values, tuples, "
                "lists, "
                "dicts, torch dtypes/devices, plain tensors and importable functions/classes are). Delete or "
                "convert that attribute before saving."
            ) from None
    return out


def _encode_module(module: nn.Module, path: str, ctx: _SaveContext, seen: dict[int, str]) -> dict:
    if id(module) in seen:
        return {"kind": "alias", "target": seen[id(module)]}
    seen[id(module)] = path
    _check_hooks(module, path)
    entry, skip = _module_header(module, path, ctx)
    entry["training"] = bool(module.training)
    entry["attributes"] = _encode_attributes(module, path, skip, ctx)
    entry["parameters"] = [_encode_parameter(name, p, path, ctx) for name, p in module._parameters.items()]
    entry["buffers"] = [
        {"name": name, "tensor": None if b is None else ctx.tensor_key(b, _join(path, name)),
         "persistent": name not in module._non_persistent_buffers_set}
        for name, b in module._buffers.items()
    ]
    entry["children"] = [
        {"name": name, "module": _encode_child(child, _join(path, name), ctx, seen)}
        for name, child in module._modules.items()
    ]
    return entry


def _encode_child(child: nn.Module | None, path: str, ctx: _SaveContext, seen: dict[int, str]) -> dict | None:
    return None if child is None else _encode_module(child, path, ctx, seen)


def _encode_parameter(name: str, param: Any, path: str, ctx: _SaveContext) -> dict:
    if param is None:
        return {"name": name, "tensor": None, "requires_grad": False}
    if type(param) is not nn.Parameter:
        raise SerializationError(
            f"cannot save parameter {_join(path, name)!r}: it is a {type(param).__name__}, not a plain "
            "nn.Parameter "
            "(lazy modules must run once before saving)."
        )
    key = ctx.tensor_key(param, _join(path, name))
    return {"name": name, "tensor": key, "requires_grad": bool(param.requires_grad)}


def _new_module(entry: dict, path: str, ctx: _LoadContext) -> nn.Module:
    where = f"module {path or '<root>'!r}"
    if entry["kind"] == "graph_module":
        return torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), str(entry["class_name"]))
    if entry["kind"] != "module":
        raise ValueError(f"unknown module kind {entry['kind']!r}")
    cls = ctx.resolver.resolve_class(entry["class"], where)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _decode_module(entry: dict, path: str, ctx: _LoadContext, built: dict[str, nn.Module]) -> nn.Module:
    if entry["kind"] == "alias":
        if entry["target"] not in built:
            raise ValueError(f"alias to unknown module {entry['target']!r}")
        return built[entry["target"]]
    module = _new_module(entry, path, ctx)
    built[path] = module
    where = f"module {path or '<root>'!r}"
    _restore_tensors(module, entry, ctx, where)
    _restore_attributes(module, entry, ctx, where)
    for child in entry["children"]:
        name = child["name"]
        if not isinstance(name, str) or "." in name:
            raise SerializationError(f"refusing to load {where}: child module name {name!r} is not allowed.")
        _check_attr_path(name, where)
        sub = child["module"]
        module._modules[name] = None if sub is None else _decode_module(sub, _join(path, name), ctx, built)
    if entry["kind"] == "graph_module":
        _install_graph(module, _decode_graph(entry["graph"], ctx, path), where)
    return module


def _restore_tensors(module: nn.Module, entry: dict, ctx: _LoadContext, where: str) -> None:
    """Parameters (one object per stored tensor, so ties survive) and buffers, persistent or not."""
    for p in entry["parameters"]:
        key = p["tensor"]
        module._parameters[str(p["name"])] = None if key is None else ctx.tensor(
            key, where, parameter=True, requires_grad=p["requires_grad"])
    for b in entry["buffers"]:
        name = str(b["name"])
        module._buffers[name] = None if b["tensor"] is None else ctx.tensor(b["tensor"], where)
        if not b["persistent"]:
            module._non_persistent_buffers_set.add(name)


def _restore_attributes(module: nn.Module, entry: dict, ctx: _LoadContext, where: str) -> None:
    internals = _GRAPH_MODULE_INTERNALS if entry["kind"] == "graph_module" else _MODULE_INTERNALS
    for name, value in entry["attributes"].items():
        if name in internals or not _is_identifier(name):
            raise SerializationError(f"refusing to load {where}: attribute name {name!r} is not allowed.")
        module.__dict__[name] = _decode(value, ctx, f"attribute {name!r} of {where}", None)
    module.__dict__["training"] = bool(entry["training"])


def _install_graph(module: torch.fx.GraphModule, graph: torch.fx.Graph, where: str) -> None:
    module.graph = graph
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                _get_attr(module, node.target)
            except AttributeError as err:
                raise SerializationError(
                    f"corrupt file: node {node.name!r} of {where} refers to {node.target!r}, which the "
                    "module "
                    "tree does not contain."
                ) from err
    graph.lint()


def _get_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ========================================================================== public API

def _tensor_index(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _manifest(model: nn.Module, ctx: _SaveContext) -> dict:
    root = _encode_module(model, "", ctx, {})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fxprune_version": _fxprune_version(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "tensors": _tensor_index(ctx.tensors),
        "root": root,
    }


def _write_zip(path: Path, manifest_text: str, tensor_bytes: bytes, code: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            zf.writestr(MANIFEST_NAME, manifest_text, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(TENSORS_NAME, tensor_bytes, compress_type=zipfile.ZIP_STORED)
            if code:
                zf.writestr(CODE_NAME, code, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a (pruned) model so that :func:`load` can rebuild it without its Python class.

    Args:
        model: normally the ``torch.fx.GraphModule`` fxprune returns; any ``nn.Module`` whose
            classes and attributes the format can hold works too.
        path: file to write (``.fxp`` by convention); written atomically (temp file + rename).

    Returns:
        The path written.

    Raises:
        SerializationError: a module holds something the format cannot store safely (the message
            names the module and the attribute), has hooks, refers to a function or class without an
            import path, or the file cannot be written.
    """
    if not isinstance(model, nn.Module):
        raise SerializationError(f"save needs a torch.nn.Module, got {type(model).__name__}.")
    path = Path(path)
    ctx = _SaveContext()
    manifest = _manifest(model, ctx)
    try:
        manifest_text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:  # pragma: no cover - the encoder only emits JSON types
        raise SerializationError(
            f"cannot save {type(model).__name__}: manifest is not JSON ({err}).") from err
    buffer = io.BytesIO()
    torch.save(ctx.tensors, buffer)
    code = model.code if isinstance(model, torch.fx.GraphModule) else ""
    try:
        _write_zip(path, manifest_text, buffer.getvalue(), code)
    except OSError as err:
        raise SerializationError(
            f"cannot write {path}: {err}. Check that the directory exists and is writable.") from err
    logger.info("saved %s to %s (%d tensors, %d bytes of tensor data)", type(model).__name__, path,
                len(ctx.tensors), len(buffer.getvalue()))
    return path


def _read_manifest(zf: zipfile.ZipFile, path: Path) -> dict:
    if MANIFEST_NAME not in zf.namelist():
        raise SerializationError(f"{path} is a zip file but not an fxprune model: it has no {MANIFEST_NAME}.")
    try:
        manifest = json.loads(zf.read(MANIFEST_NAME).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as err:
        raise SerializationError(f"{path}: {MANIFEST_NAME} is corrupt ({err}).") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SerializationError(
            f"{path} is not an fxprune model file (format {found!r}, expected {FORMAT_NAME!r}).")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SerializationError(f"{path}: corrupt manifest, invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"{path} uses fxprune model format version {version} (written by fxprune "
            f"{manifest.get('fxprune_version', '?')}); this fxprune reads up to version {FORMAT_VERSION}. "
            "Upgrade fxprune to load it."
        )
    if manifest.get("torch_version") != str(torch.__version__):
        logger.info("%s was saved with torch %s, loading with torch %s", path, manifest.get("torch_version"),
                    torch.__version__)
    return manifest


def _read_tensors(zf: zipfile.ZipFile, path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    if TENSORS_NAME not in zf.namelist():
        raise SerializationError(f"{path} is corrupt: it has no {TENSORS_NAME}.")
    try:
        data = zf.read(TENSORS_NAME)
        tensors = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise SerializationError(
            f"{path}: cannot read {TENSORS_NAME} ({type(err).__name__}: {err}).") from err
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise SerializationError(f"{path}: {TENSORS_NAME} is not a flat dict of tensors.")
    return tensors


def _check_tensor_index(manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    index = manifest.get("tensors", {})
    if not isinstance(index, dict):
        raise SerializationError(f"{path}: corrupt manifest, 'tensors' is not an object.")
    for key, info in index.items():
        tensor = tensors.get(key)
        if tensor is None:
            raise SerializationError(f"{path} is corrupt: tensor {key!r} listed in the manifest is missing.")
        if list(tensor.shape) != info.get("shape") or _dtype_name(tensor.dtype) != info.get("dtype"):
            raise SerializationError(
                f"{path} is corrupt: tensor {key!r} is {tensor.dtype}{list(tensor.shape)}, the manifest says "
                f"{info.get('dtype')}{info.get('shape')}."
            )


def load(
    path: str | os.PathLike,
    *,
    trusted_prefixes: Iterable[str] = (),
    map_location: Any = "cpu",
) -> nn.Module:
    """Load a model written by :func:`save`, without pickle and without the model's original class.

    Args:
        path: file written by :func:`save`.
        trusted_prefixes: extra module prefixes (e.g. ``("mypackage.layers",)``) whose functions and
            ``nn.Module`` classes the file may refer to, beyond :data:`DEFAULT_TRUSTED_PREFIXES`.
        map_location: where to put the tensors, as for ``torch.load`` (default ``"cpu"``).

    Returns:
        The rebuilt model: a ``torch.fx.GraphModule`` when a graph module was saved, with the same
        parameters, buffers, train/eval flags and outputs.

    Raises:
        SerializationError: the file is missing, not a zip, not an fxprune model, of a newer format
            version, corrupt, or refers to a function or class outside the allow-list (the message
            names it and says how to trust it).
    """
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"cannot load {path}: no such file.")
    if not zipfile.is_zipfile(path):
        raise SerializationError(f"cannot load {path}: not an fxprune model file (not a zip archive).")
    resolver = _Resolver(trusted_prefixes)
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = _read_manifest(zf, path)
            tensors = _read_tensors(zf, path, map_location)
    except zipfile.BadZipFile as err:
        raise SerializationError(f"cannot load {path}: damaged zip archive ({err}).") from err
    _check_tensor_index(manifest, tensors, path)
    ctx = _LoadContext(tensors, resolver)
    try:
        model = _decode_module(manifest["root"], "", ctx, {})
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SyntaxError) as err:
        raise SerializationError(f"{path}: corrupt manifest ({type(err).__name__}: {err}).") from err
    logger.info("loaded %s from %s", type(model).__name__, path)
    return model
