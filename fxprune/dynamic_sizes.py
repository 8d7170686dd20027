"""Input sizes a captured model accepts: which dims stay symbolic, and proof by probing.

A pruned model and its ONNX should accept every input size the original accepts: other sequence
lengths, image heights and widths, audio lengths. Batch and token sequence dims were always
captured as dynamic; this module adds the *size dims* of dense inputs and checks each claim:

* **Roles.** :func:`size_roles` names the non-batch dims that may vary: dim 1 of 2-D integer/bool
  inputs (``sequence``: token ids, masks), dims 2 and 3 of 4-D float inputs (``height``,
  ``width``: images), dims 2-4 of 5-D float inputs (``time``, ``height``, ``width``: video), dim 1
  of 2-D float inputs (``time``: raw audio) and the last dim of 3-D float inputs (``time``:
  spectrogram frames, 1-D signals). ``torch.export`` is asked for ``Dim.AUTO`` on them: symbolic
  where the model allows it, specialised where it does not.
* **Probes.** A symbolic dim is not yet proof: torch.export records a size-dependent Python branch
  (``if pad > 0``: pad-and-crop in Swin's windows, ``if size != table: interpolate`` in DINOv2 and
  MobileViT) as a guard on the example's branch, and fxprune drops those guards. So the captured
  graph is run at other sizes (:func:`probe_inputs`: the example inputs narrowed or tiled along
  the dims of one size class: all dims of the same role family and example size, e.g. every
  sequence dim, or height and width) and compared with the original model there
  (:func:`reproduces`). Probe sizes: sequence ``L-1`` (``L-2``; token sequences longer than 16
  are tried at 15 first, a tenth of the cost on a large decoder), image sides ``S*3/4`` rounded to a
  multiple of 8 and ``S*5/4`` rounded to 4 mod 8 (odd patch counts, where windowed models pad),
  time ``T*4/5`` and ``T*5/4 + 1``.
* **Settling** (:func:`settle_sizes`): a size class is dynamic when the graph reproduces the
  original at every probe size the original accepts. When it does not, the model is captured
  again at a probe size (the irregular one first), where such branches take their general path
  (pad by a symbolic amount and crop, interpolate to the symbolic size), and that graph is kept if
  it reproduces the original at the example and at every accepted probe. Otherwise the class stays
  fixed at the example's sizes, with a note. A class no probe size of which the original accepts
  is fixed by the model itself (ViT's position table at one resolution): fixed, with a note.

The settled dims are recorded on the graph module (``gm.meta["fxprune.dynamic_dims"]``,
``{input name: [dims]}``, batch included) with one accepted probe per dim
(``gm.meta["fxprune.size_probe"]``, ``{input name: {dim: size}}``), which the ONNX export uses for
its dynamic axes and to check parity at another size.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "META_SIZE_PROBE",
    "ROLE_FAMILY",
    "SizeClass",
    "size_roles",
    "size_classes",
    "probe_sizes",
    "probe_inputs",
    "reproduces",
    "settle_sizes",
    "resize",
]

logger = logging.getLogger(__name__)

#: ``gm.meta`` key: ``{input name: {dim: a size the captured graph was checked to accept}}``.
META_SIZE_PROBE = "fxprune.size_probe"

#: Dims of one family and one example size vary together in a probe (token ids, their mask and
#: an audio signal of the same length are one length).
ROLE_FAMILY = {"sequence": "length", "time": "length", "height": "spatial", "width": "spatial"}


def size_roles(t: Any) -> dict[int, str]:
    """The non-batch dims of an input that may vary between calls, with their role."""
    if not isinstance(t, torch.Tensor):
        return {}
    floating = t.dtype.is_floating_point or t.dtype.is_complex
    nd = t.dim()
    if not floating:
        return {1: "sequence"} if nd == 2 else {}
    if nd == 2:
        return {1: "time"}
    if nd == 3:  # [B, features, T] (Whisper) or [B, T, features] (Speech2Text): whichever varies
        return {1: "time", 2: "time"}
    if nd == 4:
        return {2: "height", 3: "width"}
    if nd == 5:
        return {2: "time", 3: "height", 4: "width"}
    return {}


@dataclass
class SizeClass:
    """Input dims that vary together: one role family, one example size (``dims``: (input, dim))."""

    family: str
    size: int
    dims: list[tuple[int, int]] = field(default_factory=list)
    roles: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def tokens(self) -> bool:
        """Every dim of the class is a token sequence (``size_roles``: integer/bool ``[B, L]``)."""
        return bool(self.roles) and all(r == "sequence" for r in self.roles.values())

    @property
    def label(self) -> str:
        roles = []
        for r in self.roles.values():
            if r not in roles:
                roles.append(r)
        return "/".join(roles)


def size_classes(inputs: Sequence[Any], dims: dict[int, Sequence[int]] | None = None) -> list[SizeClass]:
    """Group the size dims of ``inputs`` (optionally only ``dims[i]``) into classes.

    Height and width of one image are one class even when they differ (non-square images scale
    together); otherwise dims of the same family share a class when their example sizes are equal
    (``input_ids`` and ``attention_mask`` both of length L).
    """
    out: dict[tuple, SizeClass] = {}
    for i, t in enumerate(inputs):
        roles = size_roles(t)
        spatial = tuple(int(t.shape[d]) for d, r in roles.items() if ROLE_FAMILY[r] == "spatial")
        for d, role in roles.items():
            if dims is not None and d not in dims.get(i, ()):
                continue
            family = ROLE_FAMILY[role]
            size = int(t.shape[d])
            key = (family, size) if family != "spatial" else (family, spatial)
            cls = out.setdefault(key, SizeClass(family, size))
            cls.dims.append((i, d))
            cls.roles[(i, d)] = role
    return list(out.values())


def _round(x: float, multiple: int, offset: int = 0) -> int:
    return max(multiple + offset, int(round((x - offset) / multiple)) * multiple + offset)


#: token sequences longer than this are probed at a short odd length first: a probe runs the
#: original model and the graph, and a 1.1B decoder at 127 tokens costs seconds where 15 cost a tenth
SHORT_SEQUENCE_PROBE = 15


def probe_sizes(size: int, family: str, tokens: bool = False) -> list[int]:
    """Other sizes to try for a dim of example size ``size`` (the irregular one last).

    ``tokens``: every dim of the class is a token sequence (ids, masks), whose length any other
    length tests as well as ``L-1``: long examples are probed at a short length first.
    """
    if family == "length":
        cands = [size - 1, size - 2, size + 1]
        if tokens and size > SHORT_SEQUENCE_PROBE + 1:
            cands = [SHORT_SEQUENCE_PROBE, SHORT_SEQUENCE_PROBE - 1] + cands
    elif family == "spatial":
        # 3/4 of the example; 8 * (2^n + 1), odd at every halving after a stride of 8 (MobileViT
        # interpolates odd patch grids); 5/4 rounded to 1 mod 8: odd pixels (models pad to whole
        # patches) and an odd grid after a stride of 4 (Swin pads its windows and patch merges)
        odd = min((8 * (2 ** n + 1) for n in range(2, 12)), key=lambda v: (abs(v - size), v))
        cands = [_round(size * 3 / 4, 8), odd, _round(size * 5 / 4, 8, 1)]
    else:
        cands = [size - 1, size + 1]
    out = []
    for c in cands:
        if c >= 2 and c != size and c not in out:
            out.append(c)
    return out


def resize(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """``t`` with dim ``d`` narrowed or tiled to ``sizes[d]`` (values keep the example's range)."""
    for d, n in sizes.items():
        cur = t.shape[d]
        if n <= cur:
            t = t.narrow(d, 0, n)
        else:
            reps = [1] * t.dim()
            reps[d] = -(-n // cur)
            t = t.repeat(*reps).narrow(d, 0, n)
    return t.contiguous()


def _scaled(cls: SizeClass, inputs: Sequence[Any], target: int) -> dict[tuple[int, int], int]:
    """New size per dim of ``cls`` when its reference size becomes ``target`` (height/width scale alike)."""
    out = {}
    for i, d in cls.dims:
        example = int(inputs[i].shape[d])
        if cls.family == "spatial" and example != cls.size:
            out[(i, d)] = max(2, int(round(example * target / cls.size)))
        else:
            out[(i, d)] = target
    return out


def probe_inputs(cls: SizeClass, inputs: Sequence[Any], target: int) -> tuple[list[Any], dict[tuple[int, int], int]]:
    """The example inputs with the dims of ``cls`` resized for the reference size ``target``."""
    sizes = _scaled(cls, inputs, target)
    out = list(inputs)
    per_input: dict[int, dict[int, int]] = {}
    for (i, d), n in sizes.items():
        per_input.setdefault(i, {})[d] = n
    for i, s in per_input.items():
        out[i] = resize(inputs[i], s)
    return out, sizes


def _leaves(out: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _call(model: nn.Module, inputs: Sequence[Any], n_args: int, kw_names: Sequence[str]) -> Any:
    """``model(*args, **kwargs)`` without gradients; what torch.fx prints when generated code
    raises goes to the debug log (a probe that fails is an answer, not an error)."""
    args = tuple(inputs[:n_args])
    kwargs = dict(zip(kw_names, inputs[n_args:]))
    sink = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(sink):
            return model(*args, **kwargs)
    finally:
        if sink.getvalue().strip():
            logger.debug("%s", sink.getvalue().strip())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float = 1e-4,
          rtol: float = 1e-3) -> str | None:
    """None when the outputs match (shapes exactly, values to float32 rounding), else why not."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for k, (a, b) in enumerate(zip(got, want)):
        if tuple(a.shape) != tuple(b.shape):
            return f"output {k} has shape {list(a.shape)} instead of {list(b.shape)}"
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return f"output {k} differs"
            continue
        a64, b64 = a.double(), b.double()
        finite = b64[torch.isfinite(b64)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        diff = (a64 - b64).abs()
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        bad = ~both_nan & ~(diff <= atol * scale + rtol * b64.abs())
        if bool(bad.any()):
            return f"output {k} differs by up to {float(diff[bad].max()):.3g}"
    return None


def reproduces(gm: nn.Module, model: nn.Module, inputs: Sequence[Any], n_args: int,
               kw_names: Sequence[str], want: Any = None) -> str | None:
    """None when ``gm`` computes what ``model`` computes on ``inputs``, else the reason it does not."""
    try:
        if want is None:
            want = _call(model, inputs, n_args, kw_names)
        got = _call(gm, inputs, n_args, kw_names)
    except Exception as err:
        return _first_line(err)
    return close(_leaves(got), _leaves(want))


@dataclass
class _Probe:
    cls: SizeClass
    target: int
    inputs: list[Any]
    sizes: dict[tuple[int, int], int]
    want: Any


def _fmt(cls: SizeClass, inputs: Sequence[Any], sizes: dict[tuple[int, int], int] | None = None) -> str:
    if cls.family == "spatial":
        i = cls.dims[0][0]
        hw = [sizes[(i, d)] if sizes else int(inputs[i].shape[d]) for (j, d) in cls.dims if j == i]
        return "x".join(str(v) for v in hw)
    i, d = cls.dims[0]
    return str(sizes[(i, d)] if sizes else int(inputs[i].shape[d]))


def settle_sizes(model: nn.Module, gm: nn.Module, inputs: Sequence[Any], names: Sequence[str],
                 n_args: int, symbolic: dict[int, Sequence[int]], notes: list[str],
                 recapture: Callable[[list[Any]], nn.Module] | None = None
                 ) -> tuple[nn.Module, dict[int, list[int]], dict[int, dict[int, int]]]:
    """Decide which symbolic size dims of a captured graph really are dynamic (see module doc).

    Args:
        model: the model that was captured (eval mode; a private copy).
        gm: the captured graph module.
        inputs: example inputs in placeholder order (``n_args`` positional, then keyword ``names[n_args:]``).
        names: a name per input (for notes).
        symbolic: ``{input index: [dims symbolic in gm]}``.
        notes: capture notes are appended here.
        recapture: ``recapture(inputs)`` captures the model again at other example inputs (at most
            once per call).

    Returns:
        ``(gm, dynamic, probes)``: the graph module to keep (``gm`` or a re-capture), the size dims
        that are dynamic per input index, and one accepted probe size per such dim.
    """
    kw_names = list(names[n_args:])
    classes = size_classes(inputs, symbolic)
    accepted_by: dict[int, list[_Probe]] = {}
    fixed: set[int] = set()
    for k, cls in enumerate(classes):
        accepted: list[_Probe] = []
        rejected: list[str] = []
        for target in probe_sizes(cls.size, cls.family, cls.tokens):
            new_inputs, sizes = probe_inputs(cls, inputs, target)
            try:
                want = _call(model, new_inputs, n_args, kw_names)
            except Exception as err:
                rejected.append(f"{_fmt(cls, inputs, sizes)}: {_first_line(err)}")
                continue
            accepted.append(_Probe(cls, target, new_inputs, sizes, want))
            if cls.family == "length":
                break  # one other length the model accepts is enough
        accepted_by[k] = accepted
        if not accepted:
            fixed.add(k)
            notes.append(f"{cls.label} fixed at {_fmt(cls, inputs)} ({_where(cls, names)}): the model accepts "
                         f"no other size tried ({'; '.join(rejected)[:300]})")

    def failures(g):
        return {k: [(p, r) for p in accepted_by[k]
                    if (r := reproduces(g, model, p.inputs, n_args, kw_names, p.want))]
                for k in accepted_by if k not in fixed}

    failing = failures(gm)
    why_not = ""  # why no re-capture was kept, beyond not reproducing the probes
    if any(failing.values()) and recapture is not None:
        probes_all = [p for k in accepted_by for p in accepted_by[k]]
        bad = [p for k in failing for p, _ in failing[k]]
        gm2, at = _recapture(model, inputs, bad, probes_all, n_args, kw_names, recapture)
        if gm2 is None:
            why_not = at
        else:
            k0 = next(k for k in failing if failing[k])
            p0, r0 = failing[k0][0]
            cls0 = classes[k0]
            notes.append(f"{cls0.label} ({_where(cls0, names)}): the graph captured at {_fmt(cls0, inputs)} "
                         f"follows a size-dependent branch of the model ({_fmt(cls0, inputs, p0.sizes)}: "
                         f"{r0[:160]}); captured again at {at}, which reproduces the model at every size tried")
            gm = gm2
            failing = failures(gm)
    dynamic: dict[int, list[int]] = {}
    probes: dict[int, dict[int, int]] = {}
    for k, cls in enumerate(classes):
        if k in fixed:
            continue
        if failing.get(k):
            p, reason = failing[k][0]
            example = _fmt(cls, inputs)
            notes.append(f"{cls.label} specialised to {example} ({_where(cls, names)}): the model accepts "
                         f"{_fmt(cls, inputs, p.sizes)} but the captured graph does not reproduce it there "
                         f"({reason[:200]}{why_not}); the pruned model and its ONNX take {example} only")
            continue
        for (i, d) in cls.dims:
            dynamic.setdefault(i, []).append(d)
            probes.setdefault(i, {})[d] = int(accepted_by[k][0].sizes[(i, d)])
    return gm, dynamic, probes


def _where(cls: SizeClass, names: Sequence[str]) -> str:
    return ", ".join(f"{names[i]!r} dim {d}" for i, d in cls.dims)


def _counted_call(model: nn.Module, inputs: Sequence[Any], n_args: int, kw_names: Sequence[str]) -> tuple[Any, int]:
    """``_call`` and the FLOPs it dispatched (``cost_models.measured.MacMeter``)."""
    from fxprune.cost_models.measured import MacMeter

    with MacMeter() as meter:
        out = _call(model, inputs, n_args, kw_names)
    return out, meter.flops


def _recapture(model, inputs, bad: list[_Probe], everything: list[_Probe], n_args, kw_names, recapture):
    """A capture at one of the failing probe sizes that reproduces the model at the example and at
    every accepted probe, with the size it was captured at; else ``None`` and why a capture that
    reproduced them was refused (or ``""``).

    It must also do no more work than the model at the example: a capture at a size that takes a
    "pad to a multiple" branch pads by ``c - x % c`` unconditionally, so at the example (a multiple)
    it pads ``c`` where the model pads nothing; when later strides drop the padding its outputs
    still agree, but its MACs are not the model's (FocalNet at 64 px: 24% more) and a budget taken
    from it would not be one of the user's model.
    """
    example_want = example_flops = None
    rejected = ""
    for p in reversed(bad):  # the irregular sizes first
        try:
            gm2 = recapture(p.inputs)
        except Exception as err:
            logger.debug("re-capture at %s failed: %s", p.sizes, err)
            continue
        if example_want is None:
            example_want, example_flops = _counted_call(model, inputs, n_args, kw_names)
        try:
            got, flops = _counted_call(gm2, inputs, n_args, kw_names)
        except Exception as err:
            logger.debug("re-capture at %s fails at the example: %s", p.sizes, err)
            continue
        if close(_leaves(got), _leaves(example_want)):
            continue
        if not all(reproduces(gm2, model, q.inputs, n_args, kw_names, q.want) is None for q in everything):
            continue
        if flops <= example_flops:
            return gm2, _fmt(p.cls, inputs, p.sizes)
        extra = 100.0 * (flops - example_flops) / max(example_flops, 1)
        rejected = (f"; a capture at {_fmt(p.cls, inputs, p.sizes)} reproduces every size tried but does "
                    f"{extra:.0f}% more work than the model at {_fmt(p.cls, inputs)}: a size-dependent branch "
                    f"taken at {_fmt(p.cls, inputs, p.sizes)} is unconditional in it")
    return None, rejected


# ------------------------------------------------------------------------------- ONNX export side

@dataclass
class SizeProbe:
    """One size class at another size: the inputs there, and the model's outputs there."""

    cls: SizeClass
    inputs: list[Any]
    sizes: dict[tuple[int, int], int]
    outputs: list[torch.Tensor]


def find_probes(model: nn.Module, inputs: Sequence[Any], n_args: int, kw_names: Sequence[str],
                dims: dict[int, Sequence[int]] | None = None,
                known: dict[int, dict[int, int]] | None = None) -> list[SizeProbe]:
    """For each size class of ``inputs`` (only ``dims`` when given), inputs at another size that
    ``model`` accepts, with its outputs there.

    ``known`` (``{input index: {dim: size}}``, from the capture) gives the size to use; otherwise
    the :func:`probe_sizes` are tried in turn. A class the model accepts at no other size is left
    out: its dims are fixed.
    """
    out = []
    for cls in size_classes(inputs, dims):
        targets = probe_sizes(cls.size, cls.family, cls.tokens)
        if known:
            i, d = cls.dims[0]
            k = (known.get(i) or {}).get(d)
            if k is not None:
                targets = [int(k)]  # the class's reference size is that of its first dim
        for target in targets:
            new_inputs, sizes = probe_inputs(cls, inputs, target)
            try:
                outputs = _leaves(_call(model, new_inputs, n_args, kw_names))
            except Exception as err:
                logger.debug("probe %s at %s: %s", cls.label, sizes, _first_line(err))
                continue
            out.append(SizeProbe(cls, new_inputs, sizes, outputs))
            break
    return out
