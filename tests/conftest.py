"""Shared test set-up: hypothesis profiles and paths.

`ci` (selected when CI=true, and the default) runs at least 200 examples per property; `dev` is
quicker for local iteration (HYPOTHESIS_PROFILE=dev).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_REGISTRY = SHARED / "registry"
SEED_TUTORIAL = SHARED / "seed" / "tutorial-from-dev-to-production.txt"
EXAMPLE_STACK = REPO / "examples" / "support-bot"


def seed_stack_text() -> str:
    """The seed's "full production stack" exactly as the user's tutorial gives it."""
    text = SEED_TUTORIAL.read_text(encoding="utf-8")
    start = text.index('import "github.com/faramesh/faramesh-registry/frameworks')
    end = text.index("The agent's rules, rate_limit")
    return text[start:end]


requires_shared = pytest.mark.skipif(
    not SHARED_REGISTRY.is_dir() and os.environ.get("CI") != "true",
    reason="../shared (the public registry mirror and the seed) is absent from this checkout",
)
