"""How labelgen installs and imports: every module imports first without a cycle, and the docs say how to install what their scripts need."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["labelgen.store.fsutil", "student_train.runtime", "student_train.checkpoint",
                                    "labelgen.format", "labelgen.shards", "student_train.hf"])
def test_every_module_imports_first_without_a_circular_import(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _minimum(requirement: str) -> tuple[int, ...]:
    import re
    version = re.search(r">=\s*([\d.]+)", requirement).group(1)
    return tuple(int(p) for p in version.split("."))


def test_the_trainer_page_says_how_to_install_what_its_script_needs_and_the_extra_pins_what_transformers_asks():
    import importlib.metadata
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert "pip install -e '.[trainer]'" in (root / "docs" / "trainer.md").read_text()
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    ours = next(r for r in extra if r.startswith("accelerate"))
    theirs = next(r for r in importlib.metadata.requires("transformers") if r.startswith("accelerate"))
    assert _minimum(ours) >= _minimum(theirs), (ours, theirs)


def test_the_hub_download_the_docs_and_errors_name_is_a_command_the_installed_huggingface_hub_has():
    """README's cluster recipe, --teacher's help and the hub-id error name `hf download` (huggingface_hub 1.x
    and 2.x ship `hf`, not `huggingface-cli`), and it runs."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    said = [p for p in (root / "README.md", root / "labelgen" / "cli.py", root / "labelgen" / "backends" / "__init__.py")
            if "hf download" in p.read_text()]
    assert len(said) == 3, said
    assert not [p for p in said if "`huggingface-cli" in p.read_text()]
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    r = subprocess.run([hf, "download", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--local-dir" in r.stdout, r.stderr
