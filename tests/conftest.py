"""Test-suite settings: offline, deterministic, and one torch thread per xdist worker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("ANTHROPIC_API_KEY", None)  # tests never talk to the real API

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _progress_setting_per_test():
    """Tools that tests run in-process switch fxprune's progress output off for the process
    (``progress.set_enabled(False)``); a later test in the same worker that checks a status line on
    stderr must not depend on which tests ran before it."""
    from fxprune import progress

    progress.set_enabled(None)
    yield
    progress.set_enabled(None)
