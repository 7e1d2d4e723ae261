"""Shared fixtures: the project root, the tiny tokenizer, and a helper that runs the real launcher CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models" / "tiny_llama")


# The default job answers held-out questions before and after training; tests that do not test that skip it.
GENERATE_OFF = ("eval.generate.datasets=[]", "eval.generate.before=false")


def run_launcher(*overrides: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m launcher <overrides>` from the project root; output captured as text.

    The merge that ends a default run (about 10-30 s) is skipped unless a test sets merge.after_train itself, and
    so is the default job's generation eval unless a test sets an eval.generate key.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not any(o.startswith("merge.after_train=") for o in overrides):
        overrides = (*overrides, "merge.after_train=false")
    if not any(o.startswith("eval.generate.") for o in overrides):
        overrides = (*overrides, *GENERATE_OFF)
    return subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
