"""Hardening, round 2: imports, installs and logs that broke for unlucky users."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["labelgen.fsutil", "student_train.runtime", "student_train.checkpoint",
                                    "labelgen.format", "labelgen.shards", "student_train.hf"])
def test_every_module_imports_first_without_a_circular_import(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
