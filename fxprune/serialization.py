"""Save and load pruned models without pickle and without the user's Python classes.

A pruned model is a ``torch.fx.GraphModule`` whose code is generated from its graph, so the graph
plus the state of its leaf modules is the whole model. ``save`` writes them to a zip file (``.fxp``
by convention)::

    manifest.json          format name and version, fxprune/torch/python versions, the module tree
                           (class paths, plain attributes, parameter/buffer names, children) and, for
                           every graph module in it, the graph as a node list
    tensors.safetensors    every parameter, buffer and tensor attribute, in the safetensors format
                           (stored uncompressed)
    code.py                the generated forward(), for people to read; never read by ``load``

Threat model: ``load`` treats the file as hostile. It never unpickles and never runs code from the
file; the only callables a loaded graph can reach are the ones on the exact allow-list in
:mod:`fxprune._allowlist` (ATen operators, ``torch`` / ``torch.nn.functional`` tensor functions,
tensor methods, ``operator``, ``math``, fxprune's own ops, ``torch.nn`` layer classes and a few named
torchvision/timm helpers). A name is looked up in those tables, never by module prefix, and
resolving it never imports a module the file chose. Before anything is parsed the archive is
checked: only the three members above, a size cap on the manifest (compressed and uncompressed:
no zip bombs), a nesting-depth cap on every JSON document (no ``RecursionError``), tensors stored
uncompressed (so their size is bounded by the file's). After parsing, every tensor is checked
against the manifest's dtype/shape index and every ``torch.nn`` layer's parameters against its
hyper-parameters (a ``Conv2d`` weight must be ``out x in/groups x kh x kw``). What ``load`` does
not promise: a hostile file can still describe a model that computes garbage, allocates a lot of
memory when it is *called* (``torch.zeros`` of a huge size), or is slow; run models from untrusted
sources with the usual resource limits. Code outside the allow-list (a user's own leaf module
class) loads only when the caller names its module in ``trusted_prefixes``.

Modules are rebuilt without calling their ``__init__``: the object of the allow-listed class is
created with ``cls.__new__``, the ``nn.Module`` base is initialised, then its plain attributes,
parameters (with ``requires_grad``; tied parameters stay one object), buffers (persistent or not),
children and ``training`` flag are restored.

Manifest schema (version 2; version 1 differs only in keeping the tensors in ``tensors.pt``,
written by ``torch.save`` and read back with ``torch.load(weights_only=True)``)::

    {"format": "fxprune.model", "format_version": 2, "fxprune_version": str, "torch_version": str,
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
           memory_format, layout, size, tensor, ref (function/class path), op (torch.ops
           overload), enum

The safetensors member holds one tensor per key of ``"tensors"`` (same dtype and shape), with the
metadata ``{"format": "fxprune.model"}``.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import io
import json
import keyword
import logging
import math
import os
import platform
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune import _allowlist as allow
from fxprune._io import atomic_path, check_writable
from fxprune.errors import SerializationError

__all__ = [
    "save",
    "load",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_TRUSTED_PREFIXES",
    "MAX_MANIFEST_BYTES",
    "MAX_JSON_DEPTH",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "fxprune.model"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"
LEGACY_TENSORS_NAME = "tensors.pt"  # format version 1
CODE_NAME = "code.py"
_MEMBERS = frozenset({MANIFEST_NAME, TENSORS_NAME, LEGACY_TENSORS_NAME, CODE_NAME})

#: Kept for compatibility: the allow-list is now exact (see :mod:`fxprune._allowlist`), so no
#: module prefix is trusted by default; ``load(trusted_prefixes=...)`` adds the caller's own.
DEFAULT_TRUSTED_PREFIXES: tuple[str, ...] = ()

#: Largest uncompressed manifest ``load`` reads (a 2-layer BERT graph takes 33 KB, Swin-T 104 KB).
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
#: Deepest nesting of ``[``/``{`` in any JSON document of the file (real manifests: about 20-25).
MAX_JSON_DEPTH = 200

_NODE_OPS = frozenset({"placeholder", "get_attr", "call_function", "call_module", "call_method", "output"})
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
                 "float8_e5m2")
    if isinstance(getattr(torch, name, None), torch.dtype)
}


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


# =========================================================================== import paths (save)

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _import_attr(path: str) -> Any:
    """Import ``module:qualname`` (save time only: the object is the caller's own)."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _candidate_paths(obj: Any) -> list[str]:
    """Paths that may name ``obj``, the most public first."""
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
    """The ``module:qualname`` path under which ``obj`` can be found again.

    Raises:
        SerializationError: ``obj`` is a lambda, a local function/class or not importable.
    """
    for path in _candidate_paths(obj):
        if "<" in path:
            continue
        if allow.lookup_callable(path) is obj or allow.lookup_module_class(path) is obj:
            return path
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


def _allow_listed(path: str) -> bool:
    return any(lookup(path) is not None for lookup in (allow.lookup_callable, allow.lookup_module_class,
                                                        allow.lookup_type, allow.lookup_enum))


def _warn_unlisted(path: str, what: str) -> None:
    if not _allow_listed(path):
        logger.warning("%s refers to %s, which is not on fxprune's load allow-list; loading the file will "
                       "need trusted_prefixes=(%r,)", what, path, path.partition(":")[0])


# =========================================================================== resolving names (load)

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


class _Resolver:
    """Resolves stored names against the exact allow-list, plus the caller's trusted modules."""

    def __init__(self, trusted_prefixes: Iterable[str]):
        self.user_prefixes = _normalize_prefixes(trusted_prefixes)
        self.cache: dict[tuple[str, str], Any] = {}

    def _user_trusts(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.user_prefixes)

    def _refuse(self, path: Any, where: str, why: str = "is not on fxprune's allow-list") -> SerializationError:
        module = path.partition(":")[0] if isinstance(path, str) else "?"
        return SerializationError(
            f"refusing to load {where}: {path!r} {why}. A saved model may only call the tensor functions, "
            "operators and torch.nn layers listed in fxprune._allowlist; nothing else is imported or run. "
            f"If you trust this file and the code it names, pass trusted_prefixes=({module!r},) to "
            "fxprune.load (the module must be importable)."
        )

    def _user_object(self, path: Any, where: str) -> Any:
        """``module:qualname`` from a module the caller trusts (imported), or ``None``."""
        if not isinstance(path, str) or path.count(":") != 1:
            raise SerializationError(f"corrupt manifest: {where} has the invalid path {path!r}.")
        module_name, _, qualname = path.partition(":")
        if not self.user_prefixes or not self._user_trusts(module_name):
            return None
        parts = qualname.split(".")
        mod_parts = module_name.split(".")
        if not all(_is_identifier(p) and not p.startswith("__") for p in parts + mod_parts):
            raise self._refuse(path, where, "is not a plain module-level name")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as err:
            raise SerializationError(f"cannot load {where}: importing {module_name!r} failed ({err}).") from err
        for i, part in enumerate(parts):
            if i > 0 and not isinstance(obj, type):
                raise self._refuse(path, where, "walks through a non-class attribute")
            try:
                obj = getattr(obj, part)
            except AttributeError as err:
                raise SerializationError(
                    f"cannot load {where}: {path!r} does not exist in the installed {mod_parts[0]} (the file "
                    "was saved with other library versions?).") from err
            if inspect.ismodule(obj):
                raise self._refuse(path, where, "names a module, not a function or class")
        return obj

    def _lookup(self, kind: str, path: Any, where: str, *lookups: Any) -> Any:
        key = (kind, path if isinstance(path, str) else repr(path))
        if key in self.cache:
            return self.cache[key]
        obj = None
        for lookup in lookups:
            obj = lookup(path)
            if obj is not None:
                break
        if obj is None:
            obj = self._user_object(path, where)
        if obj is None:
            raise self._refuse(path, where)
        self.cache[key] = obj
        return obj

    def function(self, path: Any, where: str) -> Any:
        """A call target."""
        return self._lookup("function", path, where, allow.lookup_callable)

    def value(self, path: Any, where: str) -> Any:
        """A function or class stored as a value (an attribute ``activation=F.relu``, an argument)."""
        return self._lookup("value", path, where, allow.lookup_callable, allow.lookup_module_class,
                            allow.lookup_type)

    def module_class(self, path: Any, where: str) -> type[nn.Module]:
        cls = self._lookup("class", path, where, allow.lookup_module_class)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise SerializationError(f"corrupt manifest: {where} names {path!r}, which is not an nn.Module class.")
        return cls

    def enum_class(self, path: Any, where: str) -> type[enum.Enum]:
        cls = self._lookup("enum", path, where, allow.lookup_enum)
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise SerializationError(f"corrupt manifest: {where} names {path!r}, which is not an Enum.")
        return cls

    def annotation(self, path: Any) -> type | None:
        """A node's type annotation; anything not on the list is dropped (annotations are cosmetic)."""
        found = allow.lookup_type(path)
        if found is None and isinstance(path, str) and self.user_prefixes:
            try:
                found = self._user_object(path, "a type annotation")
            except SerializationError:
                return None
        return found if isinstance(found, type) else None

    def op(self, name: Any, overload: Any, where: str) -> Any:
        """A ``torch.ops`` operator such as ``aten::add`` / overload ``Tensor``."""
        if not isinstance(name, str) or name.count("::") != 1:
            raise SerializationError(f"corrupt manifest: {where} has the invalid operator name {name!r}.")
        namespace, _, op_name = name.partition("::")
        trusted = self._user_trusts(f"torch.ops.{namespace}")
        if not (allow.allowed_op(name) or trusted) or not _is_identifier(op_name) or not _is_identifier(namespace):
            raise self._refuse(f"torch.ops.{namespace}:{op_name}", where, "is not an allow-listed operator")
        if overload is not None and (not _is_identifier(overload) or overload.startswith("_")):
            raise SerializationError(f"refusing to load {where}: invalid operator overload {overload!r}.")
        try:
            packet = getattr(getattr(torch.ops, namespace), op_name)
            result = packet if overload is None else getattr(packet, overload)
        except (AttributeError, RuntimeError) as err:
            raise SerializationError(f"cannot load {where}: operator {name}.{overload} does not exist here.") from err
        if not isinstance(result, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise self._refuse(f"torch.ops.{namespace}:{op_name}", where, "is not an operator")
        return result


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
        path = _import_path(type(value), f"enum {name}")
        _warn_unlisted(path, f"enum {name}")
        return {"$": "enum", "class": path, "name": value.name}
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
        path = _import_path(value, name)
        _warn_unlisted(path, name)
        return {"$": "ref", "path": path}
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
            obj = self.objects[key]
            if parameter != isinstance(obj, nn.Parameter):
                raise SerializationError(f"refusing to load {where}: tensor {key!r:.80} is used both as a "
                                         "parameter and as a buffer or constant.")
            return obj
        if not isinstance(key, str) or key not in self.tensors:
            raise SerializationError(f"corrupt file: {where} refers to tensor {key!r}, which the file does not hold.")
        tensor = self.tensors[key]
        if parameter:
            if requires_grad and not (tensor.is_floating_point() or tensor.is_complex()):
                raise SerializationError(
                    f"refusing to load {where}: parameter tensor {key!r} has dtype {tensor.dtype}; a trainable "
                    "parameter must be floating point.")
            obj = nn.Parameter(tensor, requires_grad=bool(requires_grad))
        else:
            obj = tensor
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
    value = getattr(torch, name, None) if isinstance(name, str) and _is_identifier(name) else None
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
        if not isinstance(data["value"], str) or len(data["value"]) > 64:
            raise ValueError(f"invalid device {data['value']!r:.80}")
        return torch.device(data["value"])
    if tag == "size":
        return torch.Size([_plain_int(v) for v in data["items"]])
    if tag == "tensor":
        return ctx.tensor(data["key"], where)
    if tag == "ref":
        return ctx.resolver.value(data["path"], where)
    if tag == "op":
        return ctx.resolver.op(data["name"], data["overload"], where)
    if tag == "enum":
        cls = ctx.resolver.enum_class(data["class"], where)
        return cls[data["name"]]
    raise ValueError(f"unknown value tag {tag!r:.40}")


def _plain_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid size {value!r:.40}")
    return value


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


def _decode_type(data: Any, ctx: _LoadContext) -> Any:
    """Inverse of :func:`_encode_type`; annotations that are not allow-listed are dropped."""
    if not isinstance(data, dict) or data.get("$") != "ref":
        return None
    return ctx.resolver.annotation(data.get("path"))


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
        if node.op == "call_method" and node.target not in allow.TENSOR_METHODS:
            logger.warning("%s calls the method %r, which is not on fxprune's load allow-list: the saved file "
                           "will not load", here, node.target)
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
        in_spec = _load_spec(data["in_spec"]) if data["in_spec"] is not None else None
        out_spec = _load_spec(data["out_spec"]) if data["out_spec"] is not None else None
        orig_args = [_check_identifier(a, "a pytree graph input name", stars=True) for a in data["orig_args"]]
        info = torch.fx.graph._PyTreeInfo(orig_args, in_spec, out_spec)
        return torch.fx.graph._PyTreeCodeGen(info)
    raise ValueError(f"unknown code generator {kind!r:.40}")


# A pytree spec is JSON in a string. torch's own ``treespec_loads`` imports modules named in it (a
# defaultdict's default factory, an enum in a context), so specs are decoded here instead: only
# plain containers and registered output types (Hugging Face ModelOutput classes, whose modeling
# module is imported to register them, see ``_allowlist.spec_type_module``), contexts plain JSON.
def _load_spec(text: Any) -> Any:
    import torch.utils._pytree as pytree

    if not isinstance(text, str):
        raise ValueError("a pytree spec must be a JSON string")
    protocol, schema = _parse_json(text.encode("utf-8"), "a pytree spec")
    if protocol != 1:
        raise ValueError(f"unknown pytree spec protocol {protocol!r:.20}")
    return _spec_node(schema, pytree)


def _spec_node(node: Any, pytree: Any) -> Any:
    if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        raise ValueError("corrupt pytree spec node")
    type_name, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        raise ValueError("corrupt pytree spec children")
    if type_name is None and context is None and not children:
        return getattr(pytree, "_LEAF_SPEC", None) or pytree.LeafSpec()
    typ = _spec_type(type_name)
    node_def = pytree.SUPPORTED_SERIALIZED_TYPES[typ]
    if not isinstance(context, str):
        raise ValueError("corrupt pytree spec context")
    if node_def.from_dumpable_context is None:
        ctx_value = _parse_json(context.encode("utf-8"), "a pytree spec context", plain=True)
    elif node_def.from_dumpable_context is pytree._namedtuple_deserialize:
        ctx_value = node_def.from_dumpable_context(context)  # a registry lookup, nothing imported
    else:
        raise SerializationError(f"refusing to load a pytree spec of type {type_name!r}: its context needs code "
                                 "to decode.")
    return pytree.TreeSpec(typ, ctx_value, [_spec_node(c, pytree) for c in children])


def _spec_type(name: Any) -> type:
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE as registry

    if not allow.allowed_spec_type(name) or name == "collections.defaultdict":
        raise SerializationError(
            f"refusing to load a pytree spec naming the type {name!r:.120}: only tuples, lists, dicts and "
            "Hugging Face model outputs (transformers.modeling_outputs / transformers.models.*.modeling_*) are "
            "allowed.")
    if name not in registry:
        module = allow.spec_type_module(name)
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    if name not in registry:
        raise SerializationError(f"cannot load a pytree spec naming the type {name!r}: it is not registered here "
                                 "(is the library that defines it installed?).")
    return registry[name]


# torch.fx pastes placeholder/method/keyword names and attribute paths into the Python source it
# generates for forward(), so everything the manifest supplies there must be a plain identifier.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _is_identifier(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= 256 and bool(_IDENTIFIER.match(text)) and not keyword.iskeyword(text)


def _check_identifier(text: Any, what: str, *, stars: bool = False) -> str:
    bare = text
    if stars and isinstance(text, str) and len(text) - len(text.lstrip("*")) <= 2:
        bare = text.lstrip("*")
    if not _is_identifier(bare):
        raise SerializationError(f"refusing to load {what}: {text!r:.120} is not a plain Python identifier.")
    return text


# Module, parameter and buffer names. torch.fx writes a part that is not an identifier as
# ``getattr(self.a, "block1-0")`` (torchvision's RegNet names its blocks so), inside double quotes:
# letters, digits, "_" and "-" cannot leave that string literal, a quote or a backslash could.
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}\Z")


def _is_member_name(text: Any) -> bool:
    return isinstance(text, str) and bool(_MEMBER_NAME.match(text)) and not text.startswith("__")


def _check_member_name(text: Any, what: str) -> str:
    if not _is_member_name(text):
        raise SerializationError(f"refusing to load {what}: {text!r:.120} is not a plain module, parameter or "
                                 "buffer name (letters, digits, '_' and '-').")
    return text


def _check_attr_path(target: Any, what: str) -> str:
    """A dotted path of module/parameter/buffer names (see ``_MEMBER_NAME``), no dunder parts."""
    parts = target.split(".") if isinstance(target, str) else [""]
    if not all(_is_member_name(p) for p in parts):
        raise SerializationError(f"refusing to load {what}: {target!r:.120} is not a plain attribute path.")
    return target


def _decode_target(nd: dict, ctx: _LoadContext, where: str) -> Any:
    op, target = nd["op"], nd["target"]
    if op not in _NODE_OPS:
        raise ValueError(f"unknown node op {op!r:.40}")
    if op == "call_function":
        if not isinstance(target, dict) or target.get("$") not in ("ref", "op"):
            raise ValueError(f"call_function target must be a function reference, got {target!r:.80}")
        if target["$"] == "op":
            fn = ctx.resolver.op(target["name"], target["overload"], where)
        else:
            fn = ctx.resolver.function(target["path"], where)
        if not callable(fn):
            raise ValueError(f"call_function target {target!r:.80} is not callable")
        return fn
    if op == "call_method":
        if not isinstance(target, str) or target not in allow.TENSOR_METHODS:
            raise SerializationError(
                f"refusing to load {where}: method {target!r:.80} may not be called from a saved graph (not on "
                "fxprune's allow-list of tensor methods).")
        return target
    if op in ("get_attr", "call_module"):
        return _check_attr_path(target, where)
    if op == "placeholder":
        return _check_identifier(target, where, stars=True)
    if target != "output":
        raise ValueError(f"output node target must be 'output', got {target!r:.80}")
    return target


def _check_getattr_node(fn: Any, args: tuple, kwargs: dict, where: str) -> None:
    import builtins

    if fn is not builtins.getattr:
        return
    name = args[1] if len(args) >= 2 else None
    if len(args) not in (2, 3) or kwargs or not isinstance(name, str) or name not in allow.GETATTR_NAMES:
        raise SerializationError(
            f"refusing to load {where}: getattr with the attribute {name!r:.80}; only the constant attribute "
            f"names {sorted(allow.GETATTR_NAMES)} are allowed."
        )


def _decode_graph(data: dict, ctx: _LoadContext, where: str) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    graph._codegen = _decode_codegen(data["codegen"])
    nodes: dict[str, torch.fx.Node] = {}
    for nd in data["nodes"]:
        name = _check_identifier(nd["name"], f"a node name of {where or 'the root graph module'}")
        here = f"node {name!r} of {where or 'the root graph module'}"
        target = _decode_target(nd, ctx, here)
        args = tuple(_decode(a, ctx, here, nodes) for a in nd["args"])
        kwargs = {_check_identifier(k, f"keyword of {here}"): _decode(v, ctx, here, nodes)
                  for k, v in nd["kwargs"].items()}
        if nd["op"] == "call_function":
            _check_getattr_node(target, args, kwargs, here)
        if name in nodes:
            raise ValueError(f"duplicate node name {name!r}")
        node_type = _decode_type(nd.get("type"), ctx)
        node = graph.create_node(nd["op"], target, args, kwargs, name=name, type_expr=node_type)
        if nd.get("meta", {}).get("is_wrapped") is True:
            node.meta["is_wrapped"] = True
        nodes[name] = node
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
    if allow.lookup_module_class(cls_path) is None:
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
        class_name = _check_identifier(entry["class_name"], f"the class name of {where}")
        return torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), class_name)
    if entry["kind"] != "module":
        raise ValueError(f"unknown module kind {entry['kind']!r:.40}")
    cls = ctx.resolver.module_class(entry["class"], where)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _decode_module(entry: dict, path: str, ctx: _LoadContext, built: dict[str, nn.Module]) -> nn.Module:
    if entry["kind"] == "alias":
        if not isinstance(entry["target"], str) or entry["target"] not in built:
            raise ValueError(f"alias to unknown module {entry['target']!r:.80}")
        return built[entry["target"]]
    module = _new_module(entry, path, ctx)
    built[path] = module
    where = f"module {path or '<root>'!r}"
    _restore_tensors(module, entry, ctx, where)
    _restore_attributes(module, entry, ctx, where)
    for child in entry["children"]:
        name = child["name"]
        if not isinstance(name, str) or "." in name:
            raise SerializationError(f"refusing to load {where}: child module name {name!r:.80} is not allowed.")
        _check_attr_path(name, where)
        sub = child["module"]
        module._modules[name] = None if sub is None else _decode_module(sub, _join(path, name), ctx, built)
    _check_layer(module, where)
    if entry["kind"] == "graph_module":
        _install_graph(module, _decode_graph(entry["graph"], ctx, path), where)
    return module


def _restore_tensors(module: nn.Module, entry: dict, ctx: _LoadContext, where: str) -> None:
    """Parameters (one object per stored tensor, so ties survive) and buffers, persistent or not."""
    for p in entry["parameters"]:
        name = _check_member_name(p["name"], f"a parameter name of {where}")
        key = p["tensor"]
        module._parameters[name] = None if key is None else ctx.tensor(
            key, f"parameter {name!r} of {where}", parameter=True, requires_grad=p["requires_grad"] is True)
    for b in entry["buffers"]:
        name = _check_member_name(b["name"], f"a buffer name of {where}")
        module._buffers[name] = None if b["tensor"] is None else ctx.tensor(b["tensor"], f"buffer {name!r} of {where}")
        if not b["persistent"]:
            module._non_persistent_buffers_set.add(name)


_MISSING = object()


def _restore_attributes(module: nn.Module, entry: dict, ctx: _LoadContext, where: str) -> None:
    internals = _GRAPH_MODULE_INTERNALS if entry["kind"] == "graph_module" else _MODULE_INTERNALS
    cls = type(module)
    for name, value in entry["attributes"].items():
        if name in internals or not _is_identifier(name) or name.startswith("__"):
            raise SerializationError(f"refusing to load {where}: attribute name {name!r:.80} is not allowed.")
        on_class = inspect.getattr_static(cls, name, _MISSING)
        if on_class is not _MISSING and (callable(on_class) or hasattr(type(on_class), "__get__")):
            raise SerializationError(
                f"refusing to load {where}: attribute {name!r} would replace the method or property "
                f"{cls.__name__}.{name}.")
        module.__dict__[name] = _decode(value, ctx, f"attribute {name!r} of {where}", None)
    module.__dict__["training"] = entry["training"] is True


def _install_graph(module: torch.fx.GraphModule, graph: torch.fx.Graph, where: str) -> None:
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                found = _state_lookup(module, node.target)
            except LookupError as err:
                raise SerializationError(
                    f"corrupt file: node {node.name!r} of {where} refers to {node.target!r}, which the module "
                    f"tree does not hold ({err})."
                ) from None
            if node.op == "call_module" and not isinstance(found, nn.Module):
                raise SerializationError(
                    f"refusing to load {where}: node {node.name!r} calls {node.target!r}, which is not a module.")
    graph.lint()
    module.graph = graph


def _state_lookup(module: nn.Module, target: str) -> Any:
    """``target`` read from the modules' own state (parameters, buffers, children, stored attributes),
    never from class attributes, so a graph cannot reach a bound method such as ``to_folder``."""
    obj: Any = module
    for part in target.split("."):
        if not isinstance(obj, nn.Module):
            raise LookupError(f"{part!r} is read from a {type(obj).__name__}, not a module")
        for table in (obj._parameters, obj._buffers, obj._modules, obj.__dict__):
            if part in table:
                obj = table[part]
                break
        else:
            raise LookupError(f"no {part!r}")
    return obj


# Parameter shapes the torch.nn layer classes imply from their hyper-parameters.
def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    m = module
    if isinstance(m, nn.Linear):
        return {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}
    if isinstance(m, nn.Bilinear):
        return {"weight": (m.out_features, m.in1_features, m.in2_features), "bias": (m.out_features,)}
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
            raise ValueError(f"groups={m.groups} does not divide the channels {m.in_channels}/{m.out_channels}")
        k = tuple(m.kernel_size)
        w = ((m.in_channels, m.out_channels // m.groups) + k if m.transposed
             else (m.out_channels, m.in_channels // m.groups) + k)
        return {"weight": w, "bias": (m.out_channels,)}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        n = (m.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n, "num_batches_tracked": ()}
    if isinstance(m, nn.LayerNorm) or isinstance(m, getattr(nn, "RMSNorm", ())):
        shape = tuple(m.normalized_shape)
        return {"weight": shape, "bias": shape}
    if isinstance(m, nn.GroupNorm):
        if m.num_groups < 1 or m.num_channels % m.num_groups:
            raise ValueError(f"num_groups={m.num_groups} does not divide num_channels={m.num_channels}")
        return {"weight": (m.num_channels,), "bias": (m.num_channels,)}
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return {"weight": (m.num_embeddings, m.embedding_dim)}
    return {}


def _check_layer(module: nn.Module, where: str) -> None:
    """A ``torch.nn`` layer's tensors agree with its hyper-parameters (a tampered file is refused here,
    not with an obscure error at the first forward)."""
    if type(module).__module__.split(".")[:2] != ["torch", "nn"]:
        return
    try:
        expected = _expected_shapes(module)
    except (AttributeError, TypeError, ValueError) as err:
        raise SerializationError(f"refusing to load {where} ({type(module).__name__}): inconsistent "
                                 f"hyper-parameters ({err}).") from None
    tensors = {**module._parameters, **module._buffers}
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise SerializationError(
                f"refusing to load {where} ({type(module).__name__}): {name} has the shape {tuple(t.shape)}, but "
                f"the layer's hyper-parameters say {tuple(shape)}.")
    for name, p in module._parameters.items():
        if p is not None and not (p.is_floating_point() or p.is_complex()):
            raise SerializationError(f"refusing to load {where}: parameter {name!r} has the dtype {p.dtype}.")


# ========================================================================== archive checks

_JSON_ESCAPE = re.compile(rb"\\.", re.S)


def _json_depth(data: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, found without parsing it (brackets inside strings
    do not count): escapes are dropped, then a quote count tells string from structure."""
    arr = np.frombuffer(_JSON_ESCAPE.sub(b"", data), dtype=np.uint8)
    if not arr.size:
        return 0
    outside = (np.cumsum(arr == 0x22) % 2) == 0
    opens = ((arr == 0x5B) | (arr == 0x7B)) & outside
    closes = ((arr == 0x5D) | (arr == 0x7D)) & outside
    return int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max(initial=0))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _refuse_enum_hook(obj: dict) -> dict:
    if "__enum__" in obj:
        raise SerializationError("refusing to load a pytree spec that names an enum (it would import a module).")
    return obj


def _parse_json(data: bytes, what: str, *, plain: bool = False, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON ``data`` after checking its nesting depth; raises ``SerializationError`` on anything odd."""
    depth = _json_depth(data)
    if depth > max_depth:
        raise SerializationError(f"refusing to load {what}: its JSON is nested {depth} deep (at most {max_depth}).")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                          object_hook=_refuse_enum_hook if plain else None)
    except SerializationError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SerializationError(f"{what} is corrupt ({type(err).__name__}: {str(err)[:200]}).") from None


def _member_infos(zf: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > len(_MEMBERS):
        raise SerializationError(f"refusing to load {path}: {len(infos)} archive members (an .fxp holds at most "
                                 f"{len(_MEMBERS)}).")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename not in _MEMBERS:
            raise SerializationError(
                f"refusing to load {path}: unexpected archive member {info.filename!r:.120} (an .fxp holds only "
                f"{', '.join(sorted(_MEMBERS))}).")
        if info.filename in out:
            raise SerializationError(f"refusing to load {path}: the member {info.filename!r} appears twice.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            raise SerializationError(f"refusing to load {path}: member {info.filename!r} uses an unsupported "
                                     "compression or encryption.")
        out[info.filename] = info
    return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """The member's bytes, refusing it when it is (or decompresses to) more than ``limit`` bytes."""
    if info.file_size > limit or info.compress_size > limit:
        raise SerializationError(
            f"refusing to load {path}: {info.filename} would be {info.file_size:,} bytes uncompressed "
            f"(limit {limit:,}; pass a larger max_manifest_bytes= if you trust this file).")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SerializationError(f"refusing to load {path}: {info.filename} is larger than {limit:,} bytes.")
    return data


def _read_manifest(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], path: Path, limit: int) -> dict:
    if MANIFEST_NAME not in members:
        raise SerializationError(f"{path} is a zip file but not an fxprune model: it has no {MANIFEST_NAME}.")
    data = _read_member(zf, members[MANIFEST_NAME], limit, path)
    manifest = _parse_json(data, f"{path}: {MANIFEST_NAME}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SerializationError(
            f"{path} is not an fxprune model file (format {found!r:.80}, expected {FORMAT_NAME!r}).")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SerializationError(f"{path}: corrupt manifest, invalid format_version {version!r:.40}.")
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"{path} uses fxprune model format version {version} (written by fxprune "
            f"{str(manifest.get('fxprune_version', '?'))[:40]}); this fxprune reads up to version {FORMAT_VERSION}. "
            "Upgrade fxprune to load it."
        )
    if manifest.get("torch_version") != str(torch.__version__):
        logger.info("%s was saved with torch %s, loading with torch %s", path,
                    str(manifest.get("torch_version"))[:40], torch.__version__)
    return manifest


def _read_tensors(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], version: int,
                  path: Path) -> dict[str, torch.Tensor]:
    name = TENSORS_NAME if version >= 2 else LEGACY_TENSORS_NAME
    if name not in members:
        raise SerializationError(f"{path} is corrupt: it has no {name}.")
    info = members[name]
    if info.compress_type != zipfile.ZIP_STORED:
        raise SerializationError(f"refusing to load {path}: {name} is compressed (fxprune stores tensors "
                                 "uncompressed, so their size is bounded by the file's).")
    data = _read_member(zf, info, os.path.getsize(path), path)
    try:
        if version >= 2:
            from safetensors.torch import load as safetensors_load

            tensors = safetensors_load(data)
        else:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise SerializationError(f"{path}: cannot read {name} ({type(err).__name__}: {str(err)[:200]}).") from err
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and type(v) is torch.Tensor
                                                for k, v in tensors.items()):
        raise SerializationError(f"{path}: {name} is not a flat dict of tensors.")
    return tensors


def _check_tensor_index(manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    index = manifest.get("tensors", {})
    if not isinstance(index, dict):
        raise SerializationError(f"{path}: corrupt manifest, 'tensors' is not an object.")
    extra = sorted(set(tensors) - set(index))
    if extra:
        raise SerializationError(f"{path} is corrupt: it holds tensors the manifest does not list ({extra[:3]}).")
    for key, info in index.items():
        tensor = tensors.get(key)
        if tensor is None:
            raise SerializationError(f"{path} is corrupt: tensor {key!r:.80} listed in the manifest is missing.")
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if dtype not in _DTYPES:
            raise SerializationError(f"refusing to load {path}: tensor {key!r:.80} has the unknown dtype {dtype!r:.40}.")
        if list(tensor.shape) != shape or tensor.dtype != _DTYPES[dtype]:
            raise SerializationError(
                f"{path} is corrupt: tensor {key!r:.80} is {tensor.dtype}{list(tensor.shape)}, the manifest says "
                f"{dtype}{str(shape)[:80]}."
            )


def _as_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)):
        raise SerializationError(f"{what} needs a file path (str or pathlib.Path), got {path!r:.80}.")
    return Path(path)


def _device(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    try:
        return torch.device(map_location)
    except (TypeError, RuntimeError) as err:
        raise SerializationError(
            f"map_location must be a device such as 'cpu' or 'cuda:0', got {map_location!r}.") from err


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


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors encoding of ``tensors`` (dense CPU copies; storage shared between keys is split)."""
    from safetensors.torch import save as safetensors_save

    payload: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in tensors.items():
        if t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise SerializationError(f"cannot save tensor {key!r}: {t.layout} / quantized / meta tensors are not "
                                     "supported.")
        if _dtype_name(t.dtype) not in _DTYPES:
            raise SerializationError(f"cannot save tensor {key!r}: dtype {t.dtype} is not supported.")
        t = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.numel() == 0:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        payload[key] = t
    try:
        return safetensors_save(payload, metadata={"format": FORMAT_NAME})
    except Exception as err:
        raise SerializationError(f"cannot encode the tensors ({type(err).__name__}: {err}).") from err


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a (pruned) model so that :func:`load` can rebuild it without its Python class.

    Args:
        model: normally the ``torch.fx.GraphModule`` fxprune returns; any ``nn.Module`` whose
            classes and attributes the format can hold works too.
        path: file to write (``.fxp`` by convention); written atomically (temp file + rename), with
            the permissions ``open(path, "w")`` would give it.

    Returns:
        The path written.

    Raises:
        SerializationError: a module holds something the format cannot store safely (the message
            names the module and the attribute), has hooks, refers to a function or class without an
            import path, or the file cannot be written.
    """
    if not isinstance(model, nn.Module):
        raise SerializationError(f"save needs a torch.nn.Module, got {type(model).__name__}.")
    path = _as_path(path, "save")
    problem = check_writable(path, "output file")
    if problem:
        raise SerializationError(f"cannot write {path}: {problem}.")
    ctx = _SaveContext()
    manifest = _manifest(model, ctx)
    try:
        manifest_text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:  # pragma: no cover - the encoder only emits JSON types
        raise SerializationError(
            f"cannot save {type(model).__name__}: manifest is not JSON ({err}).") from err
    tensor_bytes = _tensor_bytes(ctx.tensors)
    code = model.code if isinstance(model, torch.fx.GraphModule) else ""
    try:
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(MANIFEST_NAME, manifest_text, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(TENSORS_NAME, tensor_bytes, compress_type=zipfile.ZIP_STORED)
            if code:
                zf.writestr(CODE_NAME, code, compress_type=zipfile.ZIP_DEFLATED)
    except OSError as err:
        raise SerializationError(
            f"cannot write {path}: {err}. Check that the directory exists and is writable.") from err
    logger.info("saved %s to %s (%d tensors, %d bytes of tensor data)", type(model).__name__, path,
                len(ctx.tensors), len(tensor_bytes))
    return path


def load(
    path: str | os.PathLike,
    *,
    trusted_prefixes: Iterable[str] = (),
    map_location: Any = "cpu",
    max_manifest_bytes: int = MAX_MANIFEST_BYTES,
) -> nn.Module:
    """Load a model written by :func:`save`, without pickle and without the model's original class.

    The file is treated as untrusted (see the module docstring): every function, method and class it
    names must be on fxprune's exact allow-list, sizes and nesting are capped before parsing, and
    tensors are checked against the manifest and the layers before the model is returned.

    Args:
        path: file written by :func:`save`.
        trusted_prefixes: modules (e.g. ``("mypackage.layers",)``) whose functions and ``nn.Module``
            classes the file may refer to beyond the allow-list; these modules are imported.
        map_location: device to put the tensors on (default ``"cpu"``).
        max_manifest_bytes: largest uncompressed manifest to read (default 32 MiB).

    Returns:
        The rebuilt model: a ``torch.fx.GraphModule`` when a graph module was saved, with the same
        parameters, buffers, train/eval flags and outputs.

    Raises:
        SerializationError: the file is missing, not a zip, not an fxprune model, of a newer format
            version, corrupt, too large or too deeply nested, or refers to something outside the
            allow-list (the message names it and says how to trust it).
    """
    path = _as_path(path, "load")
    device = _device(map_location)
    if not path.is_file():
        raise SerializationError(f"cannot load {path}: no such file.")
    if not zipfile.is_zipfile(path):
        raise SerializationError(f"cannot load {path}: not an fxprune model file (not a zip archive).")
    resolver = _Resolver(trusted_prefixes)
    try:
        with zipfile.ZipFile(path) as zf:
            members = _member_infos(zf, path)
            manifest = _read_manifest(zf, members, path, int(max_manifest_bytes))
            tensors = _read_tensors(zf, members, manifest["format_version"], path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as err:
        raise SerializationError(f"cannot load {path}: damaged zip archive ({type(err).__name__}: {err}).") from err
    _check_tensor_index(manifest, tensors, path)
    if device is not None and device != torch.device("cpu"):
        tensors = {k: v.to(device) for k, v in tensors.items()}
    ctx = _LoadContext(tensors, resolver)
    try:
        model = _decode_module(manifest["root"], "", ctx, {})
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SyntaxError,
            NotImplementedError, RecursionError) as err:
        raise SerializationError(f"{path}: corrupt manifest ({type(err).__name__}: {str(err)[:300]}).") from err
    if not isinstance(model, nn.Module):  # pragma: no cover - _decode_module builds modules only
        raise SerializationError(f"{path}: corrupt manifest (the root is not a module).")
    logger.info("loaded %s from %s", type(model).__name__, path)
    return model
