"""timm models for fxprune's coverage checks: the list, small oracle inputs, and an independent MAC count.

Used by ``tools/sweep_timm.py`` and ``tests/test_timm.py``. Needs timm (random weights only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["MODELS", "PUBLISHED_GMACS", "ORACLE_INPUTS", "randomize_constant_tensors", "reference_macs",
           "oracle_model", "eligibility", "small_config", "check_case", "STAGES", "MAX_PARAMS", "MAX_MACS",
           "CI_SAMPLE"]

MODELS = (
    "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_nano", "regnetx_016",
    "vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "rexnet_100",
    "ghostnet_100", "levit_128s",
)

# Published GMACs, for the report only. resnet50d, efficientnet_b0, convnext_nano, vit_small, deit_tiny
# and swin_tiny are timm's/the papers' rounded figures; the others are the papers' numbers (MobileNetV3
# 219M MAdds, RegNetX-1.6GF, ReXNet-1.0 0.40G, GhostNet-1.0 141M, LeViT-128S 305M) quoted from memory.
PUBLISHED_GMACS = {
    "resnet50d": 4.35, "efficientnet_b0": 0.4, "mobilenetv3_large_100": 0.219, "convnext_nano": 2.5,
    "regnetx_016": 1.6, "vit_small_patch16_224": 4.6, "deit_tiny_patch16_224": 1.3,
    "swin_tiny_patch4_window7_224": 4.5, "rexnet_100": 0.40, "ghostnet_100": 0.141, "levit_128s": 0.305,
}

# Small inputs for the equivalence oracle: (create_model kwargs, image size). CNNs take any size;
# ViT/DeiT/LeViT resize their position tables with img_size; Swin-T needs whole windows at every
# stage, so at 64 px it gets 2x2 windows (shifted windows, masks and the bias table all remain).
ORACLE_INPUTS: dict[str, tuple[dict[str, Any], int]] = {
    "vit_small_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64),
    "levit_128s": ({"img_size": 128}, 128),
}


def randomize_constant_tensors(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give random values to every floating parameter/buffer whose elements are all equal.

    timm initialises many tensors to a constant (BatchNorm weights of 0 at the end of residual
    branches, zero attention biases, layer scales, running statistics). With them, whole branches
    compute zero and the equivalence oracle would compare nothing; random values make every
    channel matter. Running variances stay positive.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2 or not bool((t == t.flatten()[0]).all()):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return model


def oracle_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model (random, non-constant weights, eval) and a small input for the equivalence oracle."""
    import timm

    kwargs, size = ORACLE_INPUTS.get(name, ({}, 96))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    randomize_constant_tensors(model, seed)
    return model, (torch.randn(1, 3, size, size),)


def reference_macs(name: str, x: torch.Tensor, *, fused_attn: bool = False, **kwargs: Any) -> int:
    """MACs counted by ``torch.utils.flop_counter.FlopCounterMode`` (autograd on), halved.

    timm's fused attention is switched off for this run (``fused_attn=False``): on CPU the fused
    SDPA kernel has no FLOP formula and counts as 0, also with autograd enabled (it does not fall
    back to the math path). ``fused_attn=True`` keeps timm's default, to show that gap.
    """
    import timm
    from timm.layers import config as timm_config
    from torch.utils.flop_counter import FlopCounterMode

    fused = timm_config._USE_FUSED_ATTN
    if not fused_attn:
        timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    finally:
        timm_config._USE_FUSED_ATTN = fused
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2


# A seeded sample of 40 architectures from the sweep's eligible list (at most 100 M parameters and
# 30 GMACs at the default input size), each with the small configuration the CI checks it at
# (create_model kwargs, input shape: ~64 px where the model accepts it). Regenerate with
#   python tools/sweep_timm.py --ci-sample 40 --seed 0 --small 64
CI_SAMPLE: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    'resnet101d': ({}, (3, 64, 64)),
    'regnetz_b16_evos': ({}, (3, 64, 64)),
    'crossvit_18_240': ({}, (3, 64, 64)),
    'efficientnetv2_s': ({}, (3, 64, 64)),
    'tf_efficientnetv2_b3': ({}, (3, 64, 64)),
    'cs3darknet_focus_x': ({}, (3, 64, 64)),
    'resnext101_64x4d': ({}, (3, 64, 64)),
    'vit_betwixt_patch16_gap_256': ({'img_size': 64}, (3, 64, 64)),
    'deit3_small_patch16_384': ({'img_size': 64}, (3, 64, 64)),
    'bat_resnext26ts': ({}, (3, 256, 256)),
    'nextvit_large': ({}, (3, 64, 64)),
    'vit_base_patch32_224': ({'img_size': 64}, (3, 64, 64)),
    'maxxvit_rmlp_small_rw_256': ({'img_size': 64}, (3, 64, 64)),
    'tf_efficientnetv2_m': ({}, (3, 64, 64)),
    'vit_base_patch16_224': ({'img_size': 64}, (3, 64, 64)),
    'nf_seresnet26': ({}, (3, 64, 64)),
    'dla102x2': ({}, (3, 64, 64)),
    'tiny_vit_11m_224': ({}, (3, 64, 64)),
    'mobileone_s2': ({}, (3, 64, 64)),
    'mvitv2_tiny': ({}, (3, 64, 64)),
    'densenet161': ({}, (3, 64, 64)),
    'resnet33ts': ({}, (3, 64, 64)),
    'efficientformerv2_s2': ({'img_size': 64}, (3, 64, 64)),
    'maxvit_pico_rw_256': ({'img_size': 64}, (3, 64, 64)),
    'efficientvit_l1': ({}, (3, 64, 64)),
    'twins_svt_base': ({}, (3, 64, 64)),
    'resnetv2_50d': ({}, (3, 64, 64)),
    'efficientnet_el_pruned': ({}, (3, 64, 64)),
    'coatnet_0_rw_224': ({'img_size': 64}, (3, 64, 64)),
    'vit_small_patch16_18x2_224': ({'img_size': 64}, (3, 64, 64)),
    'tf_efficientnet_b2': ({}, (3, 64, 64)),
    'res2net101_26w_4s': ({}, (3, 64, 64)),
    'efficientnet_b3_g8_gn': ({}, (3, 64, 64)),
    'crossvit_tiny_240': ({}, (3, 64, 64)),
    'maxvit_rmlp_pico_rw_256': ({'img_size': 64}, (3, 64, 64)),
    'tiny_vit_5m_224': ({}, (3, 64, 64)),
    'hgnet_tiny': ({}, (3, 64, 64)),
    'nest_base': ({'img_size': 64}, (3, 64, 64)),
    'resnext101_32x8d': ({}, (3, 64, 64)),
    'regnetx_006': ({}, (3, 64, 64)),
}


# ------------------------------------------------------------------------------ sweep over timm

#: models over either limit at their default input size are skipped by the sweep
MAX_PARAMS = 100_000_000
MAX_MACS = 30_000_000_000

STAGES = ("create", "compile", "count", "verify", "batch", "size", "onnx")


def eligibility(name: str) -> dict[str, Any]:
    """Parameters and MACs of ``name`` at its default input size, on the meta device (no memory, no
    arithmetic): ``{"params", "macs", "input_size", "eligible", "reason"}``. ``macs`` is None when the
    model cannot run on meta tensors (it is then eligible on its parameter count alone)."""
    import timm

    from fxprune.cost_models.measured import MacMeter

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    shape = tuple(model.pretrained_cfg.get("input_size") or (3, 224, 224))
    macs = None
    try:
        with torch.device("meta"):
            x = torch.empty(1, *shape)
        meter = MacMeter()
        with torch.enable_grad(), meter:
            model.eval()(x)
        macs = meter.macs
    except Exception:
        pass
    reason = ""
    if params > MAX_PARAMS:
        reason = f"{params / 1e6:.1f} M parameters > {MAX_PARAMS / 1e6:.0f} M"
    elif macs is not None and macs > MAX_MACS:
        reason = f"{macs / 1e9:.1f} GMACs > {MAX_MACS / 1e9:.0f} GMACs at {shape}"
    return {"params": int(params), "macs": macs, "input_size": list(shape), "eligible": not reason, "reason": reason}


def _runs(model: nn.Module, x: torch.Tensor, fake: bool) -> bool:
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
                model(mode.from_tensor(x))
            return True
        except Exception:
            return False
    try:
        with torch.no_grad():
            model(x)
        return True
    except Exception:
        return False


def small_config(name: str, target: int = 96) -> tuple[dict[str, Any], tuple[int, ...]]:
    """create_model kwargs and an input shape of about ``target`` px for a quick check.

    The default model at ``target`` px when it accepts that size (CNNs), else the model built with
    ``img_size=target`` (ViT-style position tables), else the model's default input size.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
    shape = tuple(model.pretrained_cfg.get("input_size") or (3, 224, 224))
    if max(shape[1:]) <= target:
        return {}, shape
    small = (shape[0], target, target)
    meta_x = torch.empty(1, *small, device="meta")
    if _runs(model, meta_x, fake=False):
        return {}, small
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, img_size=target).eval()
        if _runs(model, meta_x, fake=False):
            return {"img_size": target}, small
    except Exception:
        pass
    return {}, shape


def _other_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Another spatial size for the "runs at another input size" check (+32 px)."""
    return (shape[0],) + tuple(s + 32 for s in shape[1:])


def check_case(name: str, *, budget: Any = "50%", policy: str = "global", tolerance: float = 0.01,
               onnx: bool = True, small: int | None = None, create_kwargs: dict[str, Any] | None = None,
               input_size: tuple[int, ...] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every check of the timm sweep on one model; never raises. Returns a JSON-able record.

    ``status`` is "pass", "fail" (a check failed, or fxprune raised an ``FxpruneError``), "crash"
    (fxprune raised anything else) or "skipped" (the model cannot be created); ``stage`` is the
    first failing stage of :data:`STAGES`, ``failed`` all failing checks. Checks: compile at
    ``budget`` -> the original's MACs as counted (``count_macs`` runs the same count) equal the
    independent count (``torch.utils.flop_counter`` on fake tensors) and are exact -> the band holds by the independent count of the pruned model, which
    equals ``result.macs`` (a miss the report calls in band is a *silent miss*) -> the pruned model
    runs at batch size 2 -> and at another input size where the original accepts one -> ONNX export
    with a dynamic batch matches PyTorch through onnxruntime at batch sizes 1 and 2.
    """
    import time
    import warnings

    warnings.filterwarnings("ignore")
    import timm

    import fxprune
    from fxprune.cost_models.measured import measure_model
    from fxprune.errors import FxpruneError

    rec: dict[str, Any] = {"model": name, "status": "pass", "stage": "", "failed": []}
    t_start = time.perf_counter()

    def fail(stage: str, error: str = "", crash: bool = False) -> None:
        if stage not in rec["failed"]:
            rec["failed"].append(stage)
        if rec["status"] == "pass" or (crash and rec["status"] == "fail"):
            rec["status"] = "crash" if crash else "fail"
            rec["stage"] = stage
        if error:
            rec.setdefault("errors", {})[stage] = error[:600]

    def err_text(e: BaseException) -> str:
        return f"{type(e).__name__}: {str(e).strip()}"

    try:
        kwargs = dict(create_kwargs or {})
        shape = tuple(input_size) if input_size else None
        if small and shape is None:
            extra, shape = small_config(name, small)
            kwargs.update(extra)
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        if shape is None:
            shape = tuple(model.pretrained_cfg.get("input_size") or (3, 224, 224))
        x = torch.randn(1, *shape)
    except Exception as e:  # not fxprune's: timm cannot build it here
        rec.update(status="skipped", stage="create", reason=f"cannot be created: {err_text(e)[:300]}")
        return rec
    rec["input"] = list(shape)
    rec["create_kwargs"] = kwargs
    # -- compile
    t = time.perf_counter()
    try:
        res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, tolerance=tolerance, seed=seed)
    except FxpruneError as e:
        fail("compile", err_text(e))
        rec["seconds"] = round(time.perf_counter() - t_start, 2)
        return rec
    except Exception as e:
        fail("compile", err_text(e), crash=True)
        rec["seconds"] = round(time.perf_counter() - t_start, 2)
        return rec
    rec["compile_seconds"] = round(time.perf_counter() - t, 2)
    r = res.report
    rec.update(base_macs=res.base_macs, macs=res.macs, budget=r.budget_macs, lower=r.lower_macs,
               err_pct=round(100 * r.mac_error, 3), reported_in_band=r.in_band, groups=len(r.groups),
               head_groups=sum(1 for g in r.groups if g.kind == "heads"), frozen=len(r.frozen),
               healed=[f"{h['name']} ({h['stage']} at {h['node'] or 'bisection'})" for h in r.healed],
               measured_nodes=len(r.macs_measured), macs_exact=r.macs_exact, params=res.params,
               base_params=res.base_params)
    # -- count: the original's MACs as compiled (= count_macs) against the independent count
    try:
        indep, unmeasured = measure_model(model, x)
        rec["independent_macs"] = indep
        if res.base_macs != indep or not r.macs_exact:
            fail("count", f"count {res.base_macs:,} (exact={r.macs_exact}: {r.macs_uncounted[:2]}) vs independent "
                          f"{indep:,} {unmeasured}")
    except Exception as e:
        fail("count", err_text(e))
    # -- verify: the band by the independent count
    try:
        pruned_indep, _ = measure_model(res.model, x)
        rec["pruned_independent_macs"] = pruned_indep
        ok = pruned_indep == res.macs and r.lower_macs <= pruned_indep <= r.budget_macs
        if not ok:
            rec["silent_miss"] = bool(r.in_band)
            fail("verify", f"independent count of the pruned model {pruned_indep:,} vs result.macs {res.macs:,}, "
                           f"band [{r.lower_macs:,}, {r.budget_macs:,}]")
    except Exception as e:
        fail("verify", err_text(e))
    # -- another batch size
    try:
        with torch.no_grad():
            y = res.model(torch.randn(2, *shape))
        leaves = [t for t in (y if isinstance(y, (tuple, list)) else [y]) if isinstance(t, torch.Tensor)]
        if not leaves or leaves[0].shape[0] != 2 or not all(bool(torch.isfinite(t).all()) for t in leaves):
            fail("batch", "wrong or non-finite output at batch size 2")
    except Exception as e:
        fail("batch", err_text(e))
    # -- another input size, where the original accepts one
    other = _other_size(shape)
    xo = torch.randn(1, *other)
    if _runs(model, xo, fake=False):
        rec["other_size"] = list(other)
        if not _runs(res.model, xo, fake=False):
            fail("size", f"the pruned model does not run at {other} although the original does")
    # -- ONNX
    if onnx:
        from fxprune.export import onnx_parity

        t = time.perf_counter()
        try:
            proto = res.export_onnx()
            par = onnx_parity(res.model, (x,), proto, batch_sizes=(1, 2))
            rec["onnx_max_abs"] = max(par.max_abs_err.values()) if par.max_abs_err else 0.0
            if not par.ok:
                fail("onnx", f"ONNX Runtime differs: max abs err {rec['onnx_max_abs']:.3g}")
        except FxpruneError as e:
            fail("onnx", err_text(e))
        except Exception as e:
            fail("onnx", err_text(e), crash=True)
        rec["onnx_seconds"] = round(time.perf_counter() - t, 2)
    rec["only_size"] = rec["failed"] == ["size"]
    rec["seconds"] = round(time.perf_counter() - t_start, 2)
    return rec
