"""Progress bars for stages that can take more than a few seconds.

One rule everywhere (API and CLI): bars go to stderr, only when stderr is a terminal, and never when
progress is switched off (``fxprune.progress.set_enabled(False)``, the CLI's ``--quiet``, or
``FXPRUNE_PROGRESS=0`` in the environment). Library code asks for a bar with :func:`bar` and
updates it like a ``tqdm`` object; when bars are off it gets a silent stand-in with the same
methods, so call sites never branch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterable, Iterator

__all__ = ["bar", "stage", "enabled", "set_enabled", "disabled", "status_enabled"]

_enabled: bool | None = None  # None: decide from the environment and the terminal


def set_enabled(value: bool | None) -> None:
    """Switch progress bars on (``True``), off (``False``) or back to automatic (``None``)."""
    global _enabled
    _enabled = value


def enabled() -> bool:
    """Whether a bar started now would be shown."""
    if _enabled is not None:
        return _enabled and _stderr_is_tty()
    if os.environ.get("FXPRUNE_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _stderr_is_tty()


def status_enabled() -> bool:
    """Whether one-line status messages (a long wait starting, a fallback) go to stderr: unless progress
    is switched off, also when stderr is not a terminal (they are lines, not redrawn bars)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("FXPRUNE_PROGRESS", "").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Switch bars off for the duration of a block (restores the previous setting)."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


class _Silent:
    """The no-op bar: the subset of tqdm's interface fxprune uses."""

    def __init__(self, iterable: Iterable | None = None, **_: Any):
        self._iterable = iterable
        self.n = 0

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *_: Any, **__: Any) -> None:
        return None

    def set_description_str(self, *_: Any, **__: Any) -> None:
        return None

    def close(self) -> None:
        return None


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        leave: bool = False) -> Any:
    """A tqdm bar on stderr when bars are enabled, otherwise a silent stand-in."""
    if not enabled():
        return _Silent(iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                dynamic_ncols=True)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[Any]:
    """A one-step bar shown while a stage runs (``with progress.stage("capture"): ...``).

    For stages that are one long call (``torch.export``, ONNX export): the bar says what is
    running and for how long; stages with a loop inside show their own bar under it.
    """
    with bar(total=1, desc=desc, unit="stage") as b:
        yield b
        b.update(1)
