"""What fxprune knows about each op: coupling of channel spaces, MACs and rewrite (see ``_base``).

Importing this package registers the built-in rules. Third-party ops can be taught to fxprune
with :func:`register` and an :class:`OpRule` subclass.
"""

from __future__ import annotations

import sys

from fxprune.opset import attention, layers, structural  # noqa: F401  (registration)
from fxprune.opset import aten  # noqa: F401,E402  (ATen overloads: graphs captured by torch.export)
from fxprune.opset import timm_ops  # noqa: F401,E402  (timm helpers; registered lazily, timm optional)
from fxprune.opset import torchvision_ops  # noqa: E402  (registered when torchvision is imported)
from fxprune.opset._base import (
    UNKNOWN,
    OpRule,
    op_label,
    register,
    register_function,
    register_method,
    register_module,
    rule_for,
)

if "timm" in sys.modules:
    timm_ops.install()
torchvision_ops.install()

__all__ = [
    "OpRule",
    "UNKNOWN",
    "register",
    "register_module",
    "register_function",
    "register_method",
    "rule_for",
    "op_label",
]
