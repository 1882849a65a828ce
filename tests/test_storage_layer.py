"""One storage layer: label sets, manifests, run files, metrics and
checkpoints are opened, renamed, listed and removed only through
labelgen/store/storage.py (and fsutil.py, its local-disk half)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Modules that touch the user's own files, not label sets or runs: input corpora,
# config files, the demo teacher and GGUF conversion.
OTHERS = {"labelgen/store/storage.py", "labelgen/store/fsutil.py", "labelgen/generate/inputs.py", "labelgen/settings.py",
          "labelgen/tools/demo.py", "labelgen/tools/gguf.py"}
DIRECT = re.compile(r"(?<![\w.])open\(|\.rename\(|os\.replace\(|\.iterdir\(|\.glob\(|\.rglob\(|\.unlink\(|"
                    r"\.write_text\(|\.read_text\(|\.write_bytes\(|\.read_bytes\(|rmtree\(|os\.listdir\(|scandir\(|"
                    r"\.mkdir\(")


def test_no_module_but_the_storage_layer_opens_renames_or_lists_files():
    found = []
    for path in sorted([*ROOT.glob("labelgen/**/*.py"), *ROOT.glob("student_train/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in OTHERS:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for m in DIRECT.finditer(code):
                if not code[: m.start() + 1].rstrip().endswith("storage.") and \
                        not re.search(r"storage\.\w+$", code[: m.start() + 1]):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "file I/O outside labelgen/store/storage.py:\n" + "\n".join(found)
