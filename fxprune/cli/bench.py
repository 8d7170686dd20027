"""``fxprune bench`` (not implemented yet)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="(not implemented yet)")
    p.set_defaults(func=lambda args: print("not implemented") or 1)
