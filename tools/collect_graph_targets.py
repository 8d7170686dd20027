"""Collect every name a saved fxprune model refers to, over real captured and pruned models.

The ``.fxp`` loader resolves call targets, method names, ``getattr`` attribute names and module
classes against the exact allow-list in ``fxprune/_allowlist.py``. This tool captures (and, with
``--compile``, prunes at 50%) the torchvision classification models, the timm coverage models, small
Hugging Face BERT/ViT/DeiT configurations and fxprune's tiny zoo, encodes each graph module the way
``fxprune.save`` does, and prints what the manifests name, marking the names the allow-list lacks.
Run it after adding a model family or a rewrite that emits new ops::

    python tools/collect_graph_targets.py                      # capture only, all families
    python tools/collect_graph_targets.py --compile --json out.json
    python tools/collect_graph_targets.py --families tiny hf   # a subset
    python tools/collect_graph_targets.py --compile --round-trip   # and save/load/compare every graph

Exit status 1 when something is missing from the allow-list.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn


def _torchvision() -> Iterator[tuple[str, Callable[[], nn.Module], Any]]:
    import torchvision.models as tvm
    from torchvision.models import get_model_weights, list_models

    from fxprune.models import torchvision_model

    for name in sorted(list_models(module=tvm)):
        size = getattr(get_model_weights(name).DEFAULT.transforms(), "crop_size", [224])[0]
        yield (f"torchvision:{name}", lambda name=name: torchvision_model(name)[0],
               lambda size=size: (torch.randn(1, 3, size, size),))


def _timm() -> Iterator[tuple[str, Callable[[], nn.Module], Any]]:
    from fxprune.testing.timm_cases import MODELS, oracle_model

    for name in MODELS:
        yield f"timm:{name}", (lambda name=name: oracle_model(name)[0]), (lambda name=name: oracle_model(name)[1])


def _hf() -> Iterator[tuple[str, Callable[[], nn.Module], Any]]:
    import transformers

    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

    def ids() -> dict[str, torch.Tensor]:
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[0, -3:] = 0
        return {"input_ids": torch.randint(1, 100, (2, 16)), "attention_mask": mask}

    yield ("hf:bert", lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=100, max_position_embeddings=64, **kw)).eval(), ids)
    yield ("hf:vit", lambda: transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **kw)).eval(),
           lambda: (torch.randn(2, 3, 32, 32),))
    yield ("hf:deit", lambda: transformers.DeiTModel(transformers.DeiTConfig(image_size=32, patch_size=8, **kw)).eval(),
           lambda: (torch.randn(2, 3, 32, 32),))
    dec = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
    yield "hf:llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**dec)).eval(), ids
    yield ("hf:qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**dec, num_key_value_heads=2)).eval(),
           ids)
    yield ("hf:gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval(), ids)


def _tiny() -> Iterator[tuple[str, Callable[[], nn.Module], Any]]:
    from fxprune.testing.zoo import TINY_MODELS, tiny_model

    for name in TINY_MODELS:
        yield f"tiny:{name}", (lambda name=name: tiny_model(name)[0]), (lambda name=name: tiny_model(name)[1])
    enc = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()  # noqa: E731
    yield "torch:TransformerEncoder", enc, lambda: (torch.randn(2, 5, 32),)


FAMILIES = {"tiny": _tiny, "torchvision": _torchvision, "timm": _timm, "hf": _hf}


def walk_manifest(entry: Any, out: dict[str, set[str]]) -> None:
    """Record the references of one encoded module tree (the ``root`` of a manifest)."""
    if isinstance(entry, dict):
        tag = entry.get("$")
        if tag == "ref":
            out["ref"].add(entry["path"])
        elif tag == "op":
            out["op"].add(entry["name"])
        elif tag == "enum":
            out["enum"].add(entry["class"])
        if entry.get("kind") == "module":
            out["module_class"].add(entry["class"])
        if entry.get("kind") == "graph_module":
            for node in entry["graph"]["nodes"]:
                if node["op"] == "call_method":
                    out["method"].add(node["target"])
                target = node["target"]
                if (node["op"] == "call_function" and isinstance(target, dict)
                        and target.get("path") == "builtins:getattr" and len(node["args"]) > 1):
                    out["getattr"].add(str(node["args"][1]))
            for key in ("in_spec", "out_spec"):
                spec = entry["graph"]["codegen"].get(key)
                if spec:
                    _spec_types(json.loads(spec), out["spec_type"])
        for key, value in entry.items():
            if key == "type" and isinstance(value, dict):  # a node's type annotation (dropped if unknown)
                if value.get("$") == "ref":
                    out["annotation"].add(value["path"])
                continue
            walk_manifest(value, out)
    elif isinstance(entry, list):
        for value in entry:
            walk_manifest(value, out)


def _spec_types(obj: Any, out: set[str]) -> None:
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            out.add(obj["type"])
        for v in obj.values():
            _spec_types(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _spec_types(v, out)


def collect_model(model: nn.Module, out: dict[str, set[str]]) -> None:
    from fxprune.serialization import _manifest, _SaveContext

    walk_manifest(_manifest(model, _SaveContext())["root"], out)


def round_trip(gm: nn.Module, inputs: Any) -> None:
    """Save, load (in this process) and compare outputs; raises on any difference."""
    import tempfile
    from pathlib import Path

    import fxprune
    from torch.utils._pytree import tree_leaves

    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = fxprune.load(fxprune.save(gm, Path(tmp) / "m.fxp"))
    gm.eval()
    loaded.eval()
    with torch.no_grad():
        want, got = tree_leaves(gm(*args, **kwargs)), tree_leaves(loaded(*args, **kwargs))
    if len(want) != len(got) or not all(torch.equal(a, b) for a, b in zip(want, got)
                                        if isinstance(a, torch.Tensor)):
        raise AssertionError("the loaded model's outputs differ")


def missing(out: dict[str, set[str]]) -> dict[str, list[str]]:
    """The collected names the allow-list does not admit."""
    from fxprune import _allowlist as allow

    checks = {
        "ref": lambda p: allow.lookup_callable(p) is not None,
        "op": lambda name: allow.allowed_op(name),
        "enum": lambda p: allow.lookup_enum(p) is not None,
        "module_class": lambda p: allow.lookup_module_class(p) is not None,
        "method": lambda m: m in allow.TENSOR_METHODS,
        "getattr": lambda a: a in allow.GETATTR_NAMES,
        "spec_type": lambda t: allow.allowed_spec_type(t),
        "annotation": lambda p: allow.lookup_type(p) is not None,
    }
    return {kind: sorted(v for v in out.get(kind, ()) if not checks[kind](v)) for kind in checks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--compile", action="store_true", help="also collect from the models pruned at 50%%")
    ap.add_argument("--only", nargs="*", help="model labels to run (default: all of the families)")
    ap.add_argument("--json", help="write the collected names here")
    ap.add_argument("--round-trip", action="store_true",
                    help="also save and load every graph module and check that its outputs are unchanged")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import fxprune

    out: dict[str, set[str]] = defaultdict(set)
    failures = []
    for family in args.families:
        for label, build, inputs in FAMILIES[family]():
            if args.only and label not in args.only:
                continue
            try:
                torch.manual_seed(0)
                model, x = build(), inputs()
                gms = [fxprune.capture(model, x).gm]
                if args.compile:
                    gms.append(fxprune.compile(model, x, mac_budget="50%", tolerance=0.05).model)
                for gm in gms:
                    collect_model(gm, out)
                    if args.round_trip:
                        round_trip(gm, x)
                print(f"ok   {label}", file=sys.stderr)
            except Exception as err:  # report, keep going
                failures.append(label)
                print(f"FAIL {label}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
    gaps = missing(out)
    for kind in sorted(out):
        print(f"== {kind} ({len(out[kind])})")
        for name in sorted(out[kind]):
            flag = ("dropped on load (annotations are cosmetic) " if kind == "annotation" else "MISSING ")
            print(f"   {flag if name in gaps.get(kind, ()) else ''}{name}")
    gaps.pop("annotation", None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: sorted(v) for k, v in out.items()}, fh, indent=1)
    print(f"failures: {failures}", file=sys.stderr)
    return 1 if any(gaps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
