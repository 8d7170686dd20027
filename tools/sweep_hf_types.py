"""Every base model type of the installed transformers (``AutoModel``), tried as a new user would.

The decoder sweep (``sweep_decoders.py``) covers the causal language models and ``sweep_hf.py`` 34
hand-built families; this one takes every other ``model_type`` of ``MODEL_MAPPING_NAMES``
(encoders, encoder-decoders, vision, audio, multimodal) with its default config made small
(``sweep_decoders.small_config``, nested configs too; images 64 px) and the inputs its forward
asks for (``input_ids``/``attention_mask``/``decoder_input_ids``, ``pixel_values``,
``input_values``, ``input_features``). Each type runs in its own subprocess with a timeout:

build -> one forward (a config transformers itself cannot run, or inputs this generic recipe cannot
make, is recorded as ``build`` and skipped) -> independent MAC count of the original
(``FlopCounterMode`` halved, math SDPA) -> ``fxprune.compile(mac_budget="50%")`` -> independent count
of the pruned model inside the band -> the pruned model at batch 3 (output shapes of the original)
-> optional ONNX Runtime parity (``--onnx``).

What it looks for: exceptions other than fxprune's own out of ``compile`` (the error contract), a
base count that differs from the independent one (silent under-counts), misses of the band.

    python tools/sweep_hf_types.py --jobs 2                  # every type, results in hf_types.jsonl (resumable)
    python tools/sweep_hf_types.py t5 swin --onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from sweep_decoders import MARK, error_class, error_text, run_types, small_config  # noqa: E402

_EXTRA = dict(image_size=64, num_channels=3, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, num_decoder_layers=2, d_ff=256,
              d_kv=16, num_mel_bins=16, max_source_positions=32, max_target_positions=64)


def _stages(cfg) -> None:
    """Hierarchical vision configs (``depths`` per stage): one block per stage, ``num_layers`` the stage
    count again (the generic two-layer setting broke it)."""
    import transformers as T

    for c in [cfg] + [v for v in vars(cfg).values() if isinstance(v, T.PretrainedConfig)]:
        depths = getattr(c, "depths", None)
        if isinstance(depths, (list, tuple)) and depths:
            c.depths = [1] * len(depths)
            if isinstance(getattr(c, "window_size", None), int):
                c.window_size = 4  # windows that tile every stage
                patch = getattr(c, "patch_size", 4)
                c.image_size = (patch if isinstance(patch, int) else 4) * 4 * 2 ** (len(depths) - 1)
            for k in ("num_layers", "num_stages"):
                if isinstance(getattr(c, k, None), int):
                    setattr(c, k, len(depths))
SEQ, DEC_SEQ, AUDIO = 16, 8, 8000


def _inputs(model, cfg, batch: int, seed: int = 0) -> dict:
    """The keyword inputs ``model.forward`` asks for, from the config's sizes."""
    import inspect

    import torch

    g = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = int(getattr(text_cfg, "vocab_size", 128) or 128)
    out: dict = {}

    def side(c) -> int:
        s = getattr(c, "image_size", 64)
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    if "input_ids" in params:
        out["input_ids"] = torch.randint(3, max(4, min(vocab, 128)), (batch, SEQ), generator=g)
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(batch, SEQ, dtype=torch.long)
        if "decoder_input_ids" in params and getattr(cfg, "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, 128)), (batch, DEC_SEQ), generator=g)
    if "pixel_values" in params and (main == "pixel_values" or "input_ids" in out):
        vcfg = getattr(cfg, "vision_config", None) or cfg
        ch = int(getattr(vcfg, "num_channels", 3) or 3)
        out["pixel_values"] = torch.randn(batch, ch, side(vcfg), side(vcfg), generator=g)
    if main == "input_values" and "input_values" in params:
        out = {"input_values": torch.randn(batch, AUDIO, generator=g)}
    if main == "input_features" and "input_features" in params:
        bins = int(getattr(cfg, "num_mel_bins", None) or getattr(cfg, "feature_size", None) or 80)
        frames = 2 * int(getattr(cfg, "max_source_positions", 0) or 0) or 64
        out = {"input_features": torch.randn(batch, bins, frames, generator=g)}
        if "decoder_input_ids" in params and getattr(cfg, "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, 128)), (batch, DEC_SEQ), generator=g)
    return out


def _shapes(out) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _one(model_type: str, scale: int, onnx: bool) -> dict:
    """Runs in the subprocess."""
    import time
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers as T

    import fxprune
    from fxprune.errors import FxpruneError
    from fxprune.testing.hf_cases import independent_macs

    rec: dict = {"type": model_type}
    try:
        cfg = small_config(model_type, scale, extra=_EXTRA, nested=True)
        _stages(cfg)
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        torch.manual_seed(0)
        model = T.AutoModel.from_config(cfg).eval()
        ex = _inputs(model, cfg, 2)
        if not ex:
            raise ValueError("no input this recipe can make")
        with torch.no_grad():
            want = _shapes(model(**ex))
        rec["ref_base"] = independent_macs(model, ex)
    except Exception as err:  # noqa: BLE001 - transformers cannot build/run this config with these inputs
        rec["build"] = f"{type(err).__name__}: {str(err)[:200]}"
        return rec
    rec["class"] = type(model).__name__
    rec["inputs"] = {k: list(v.shape) for k, v in ex.items()}
    rec["params"] = sum(p.numel() for p in model.parameters())
    t = time.time()
    try:
        res = fxprune.compile(model, ex, mac_budget="50%")
    except FxpruneError as err:
        rec["refused"] = f"{type(err).__name__}: {str(err)[:400]}"
        return rec
    except Exception as err:  # noqa: BLE001 - the error contract is broken
        import traceback

        rec["raw"] = error_text(err, 300)
        rec["where"] = traceback.format_exc()[-600:]
        return rec
    rec["seconds"] = round(time.time() - t, 1)
    r = res.report
    rec.update(base=int(res.base_macs), macs=int(res.macs), exact=bool(getattr(res.base_macs, "exact", True)),
               lower=int(r.lower_macs), budget=int(r.budget_macs),
               pruned=sum(1 for g in r.groups if g.keep < g.size), groups=len(r.groups))
    try:
        rec["ref"] = independent_macs(res.model, ex)
        rec["band_ok"] = r.lower_macs <= rec["ref"] <= r.budget_macs
        alt = _inputs(model, cfg, 3, seed=1)
        with torch.no_grad():
            rec["batch_ok"] = _shapes(res.model(**alt)) == _shapes(model(**alt))
        rec["shapes_ok"] = _shapes(res.model(**ex)) == want
    except Exception as err:  # noqa: BLE001
        rec["after"] = error_text(err, 300)
        return rec
    if onnx:
        try:
            from fxprune.export import onnx_parity

            par = onnx_parity(res.model, ex, res.export_onnx(), batch_sizes=(1, 3))
            rec["onnx_ok"] = bool(par.ok)
        except Exception as err:  # noqa: BLE001
            rec["onnx"] = error_text(err, 300)
    return rec


def _kind(rec: dict) -> str:
    if "timeout" in rec:
        return "timeout"
    if "build" in rec:
        return "does not run with the generic config/inputs"
    if "raw" in rec:
        return "RAW EXCEPTION from compile: " + error_class(rec["raw"])
    if "refused" in rec:
        return "clear error: " + rec["refused"].split(":")[0]
    if "after" in rec:
        return "pruned model FAILS: " + error_class(rec["after"])
    bad = []
    if rec["ref_base"] != rec["base"]:
        bad.append("base count " + ("UNDER" if rec["base"] < rec["ref_base"] else "over") + "-counted"
                   + ("" if rec["exact"] else " (flagged inexact)"))
    if not rec["band_ok"]:
        bad.append("OUTSIDE the band")
    if not rec["batch_ok"] or not rec["shapes_ok"]:
        bad.append("output shapes differ")
    if rec.get("onnx_ok") is False or "onnx" in rec:
        bad.append("ONNX " + ("parity" if "onnx" not in rec else error_class(rec["onnx"])))
    if rec["pruned"] == 0 and not bad:
        return "compiled, nothing pruned"
    return "; ".join(bad) or "pass"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", help="model types (default: every AutoModel type that is not a causal LM)")
    ap.add_argument("--scale", type=int, default=2, help="width multiplier of the small configs (default 2)")
    ap.add_argument("--onnx", action="store_true", help="also export and check ONNX Runtime parity")
    ap.add_argument("--out", default="hf_types.jsonl")
    ap.add_argument("--fresh", action="store_true", help="start over instead of skipping the types in --out")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1, help="subprocesses at once")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(MARK + json.dumps(_one(args.one, args.scale, args.onnx)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    types = args.types or sorted(t for t in MODEL_MAPPING_NAMES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if os.path.exists(args.out) and not args.fresh:  # resume: the types already in the file are done
        with open(args.out) as f:
            done = {json.loads(line)["type"] for line in f if line.strip()}
        types = [t for t in types if t not in done]
    elif os.path.exists(args.out):
        os.remove(args.out)

    run_types(types, lambda t: [__file__, "--one", t, "--scale", str(args.scale)] + (["--onnx"] if args.onnx else []),
              _kind, args.out, args.jobs, args.timeout, "raw")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
