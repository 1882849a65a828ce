"""Shared fixtures: tiny teachers built locally (no hub), tiny data in tmp_path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
