"""The package's layout holds: imports run one way (no cycle, function-local
imports included), the shard layer knows no run directory, the run
directory knows no command's file names, and labelgen's top level stays
small (concerns live in folders)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("labelgen", "student_train", "benchmarks")


def modules() -> dict[str, Path]:
    found = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project's modules `name` imports anywhere in its body (benchmarks import each other as scripts)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target not in known and name.startswith("benchmarks.") and f"benchmarks.{target}" in known:
                target = f"benchmarks.{target}"
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                out.add(target)   # a package's face handing on its own submodules is not a cycle
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle_anywhere_function_local_imports_included():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2
    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_shard_layer_and_the_store_import_nothing_above_them():
    below = ("labelgen.format", "labelgen.shards", "labelgen.store", "labelgen.errors")
    above = ("labelgen.run", "labelgen.generate", "labelgen.tools", "labelgen.backends", "labelgen.cli", "student_train")
    wrong = [f"{m} -> {t}" for m, targets in graph().items() if m.startswith(below)
             for t in targets if t.startswith(above)]
    assert not wrong, wrong


def test_the_run_directory_names_no_file_a_command_writes():
    """Each command declares its run kind; rundir.py spells none of their names."""
    from labelgen.backends import MODEL_DIR
    from labelgen.generate.sinks import GENERATE
    from labelgen.tools.import_logprobs import LABELS
    from student_train.codistill import CODISTILL
    from student_train.rounds import ROUNDS
    from student_train.train import TRAIN
    source = (ROOT / "labelgen" / "run" / "rundir.py").read_text()
    literals = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named = {p for kind in (GENERATE, LABELS, MODEL_DIR, TRAIN, CODISTILL, ROUNDS) for p in kind.owned}
    # A name spelled as a literal, or a file name (with its dot) inside one: a docstring's plain words do not count.
    assert not [p for p in named if any(p == text or ("." in p and p in text) for text in literals)]


def test_labelgen_top_level_holds_at_most_ten_modules():
    top = sorted(p.name for p in (ROOT / "labelgen").glob("*.py"))
    assert len(top) <= 10, top
