import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_report_writes_results_and_plots_from_its_own_run(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--tiny", "--out", str(tmp_path / "docs"),
                        "--work", str(tmp_path / "work"), "--alphas", "0", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "docs" / "results.md").read_text()
    methods = ["CE only", "SFT on teacher samples", "top-1 KD (tail)", "top-8 KD (renorm)", "top-64 KD (tail)",
               "sampled KD (N=50)", "online full KD (frozen teacher)", "co-distillation from scratch"]
    for m in methods:
        row = next(l for l in md.splitlines() if l.startswith(f"| {m} |"))
        ce = float(row.split("|")[5])
        assert 0 < ce < 12, row            # a real held-out CE, read from the run's logs
    # the label-size columns come from the label sets written in this run
    top64 = next(l for l in md.splitlines() if l.startswith("| top-64 KD (tail) |"))
    assert re.match(r"\| top-64 KD \(tail\) \| [\d.]+ \| [\d,]+ \| [\d,]+ \|", top64)
    # every KD method is also trained with CE mixed in; the second table names the best alpha
    rows = [l for l in md.splitlines() if l.startswith("| top-64 KD (tail) |")]
    assert len(rows) == 2 and float(rows[1].split("|")[3]) in (0.0, 0.5)
    for png in ("results_ce_curves.png", "results_coverage.png", "results_bytes_vs_gain.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_real_teacher_report_has_every_method_keeps_other_sections_and_resumes_from_its_cache(tmp_path, tiny_teacher):
    docs, work = tmp_path / "docs", tmp_path / "work"
    docs.mkdir()
    (docs / "results.md").write_text("## The toy teacher\n\ntoy table\n\n"
                                     "<!-- cross-tokenizer section: bash jobs/report.sh --cross-tokenizer -->\n"
                                     "## Cross-tokenizer distillation (toy teacher)\n\ncross table\n")
    cmd = [sys.executable, "benchmarks/report.py", "--teacher", tiny_teacher, "--quick", "--out", str(docs),
           "--work", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = re.findall(r"\[stage (\d+)/(\d+),", r.stdout)   # the total is the stages it runs
    assert numbers[-1][0] == numbers[-1][1] == str(len({n for n, _ in numbers})), numbers[-1]
    md = (docs / "results.md").read_text()
    methods = ["CE only", "SFT on teacher completions", "top-8 KD (tail)", "top-8 KD (renorm)", "top-8 KD (target)",
               "top-64 KD (tail)", "top-64 KD (renorm)", "top-64 KD (target)", "min-prob 1e-3 KD (tail)",
               "sampled KD (N=50)", "sampled KD (N=12)", "reference: top-256 KD (tail)"]
    for m in methods:
        cells = next(l for l in md.splitlines() if l.startswith(f"| {m} |")).split("|")
        assert 0 < float(cells[5]) < 12, cells          # held-out CE, from the run's logs
        assert 0 <= float(cells[8]) < 1, cells          # ECE
        if m != "CE only":
            assert float(cells[2]) > 0, cells           # bytes/position of a label set this run wrote
    assert "| reference: top-256 KD (tail) |" in md and "100% |" in md.split("| reference: top-256 KD (tail) |")[1].split("\n")[0]
    assert len([l for l in md.splitlines() if re.match(r"\| .* \| 0\.[59] \|", l)]) == 4
    assert "| own (V = " in md and "| own | sampled KD (N=12), alpha 0.5 |" in md and "sampled N=12, stored labels" in md and "sampled N=50, fresh draws" in md
    # the studies of the sampled gap: a second seed, Adam's update directions, CE by the teacher's rank
    assert "| sampled KD (N=50) | " in md.split("**Run to run.**")[1].split("\n\n")[1]
    assert re.search(r"\| sampled N=50 \| [01]\.\d{3} \| -?[01]\.\d{3} \|", md)
    assert "| rank 0 (" in md and "| rank 256+ (" in md
    # the real-teacher section leads; the toy sections stay, in order
    assert md.index("# Results: what a student keeps") < md.index("toy table") < md.index("cross table")
    # The same command again reads every stage from the cache; a stage whose result is gone is redone alone.
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running" not in r.stdout and r.stdout.count(": cached") >= 30
    (work / "stages" / "student__sampled_kd__n_12.json").unlink()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [l.split("] ", 2)[2] for l in r.stdout.splitlines() if "running" in l] == \
        ["student: sampled KD (N=12): running (17 stages after it)"]
    md = (docs / "results.md").read_text()
    assert md.count("# Results: what a student keeps") == 1 and md.count("| sampled KD (N=12) |") == 2   # method, tail tables


@pytest.mark.slow
def test_on_policy_report_runs_every_method_in_rounds_and_writes_its_table(tmp_path, tiny_teacher):
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nother sections\n")
    cmd = [sys.executable, "benchmarks/report_onpolicy.py", "--teacher", tiny_teacher, "--teacher-name", "tiny",
           "--quick", "--out", str(docs), "--work", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    md = docs.read_text()
    assert md.startswith("# Results\n\nother sections") and "(tiny teacher, CPU)" in md
    for method, rounds in (("OPD (reverse KL + forward KL)", 2), ("OPD (reverse KL only)", 2),
                           ("off-policy KD (teacher's completions)", 2), ("SFT (teacher's completions)", 2),
                           ("OPD, 1 round (stale samples)", 1), ("OPD (reverse KL only), 1 round (stale samples)", 1)):
        rows = [line.split("|") for line in md.splitlines() if line.startswith(f"| {method} |")]
        assert len(rows) == rounds, method
        assert all(float(row[4].split("±")[0]) > -1 and float(row[4].split("±")[1]) >= 0 and float(row[5]) < 0
                   for row in rows)                                             # reverse KL ± SE, teacher logprob
        assert int(rows[-1][3].replace(",", "")) > 0                           # completion tokens trained on
        assert (rows[-1][7].strip() != "") == method.startswith("OPD")         # staleness: OPD only
    r = subprocess.run(cmd, capture_output=True, text=True)   # everything cached: the same table again
    assert r.returncode == 0 and "running" not in r.stdout and docs.read_text() == md


def test_a_student_stopped_by_a_signal_ends_the_report_and_is_not_cached_as_done(tmp_path, monkeypatch):
    """A preemption signal ends training early with a checkpoint and a normal
    return; the report must exit there, not cache the partial student as its
    result (a cut run once left a 34-step student in the 100-step table)."""
    monkeypatch.syspath_prepend("benchmarks")
    from report_kit import Stages, completed
    stages = Stages(tmp_path, total=2)
    stopped = {"step": 34, "out": "x", "stopped_by": "SIGTERM", "world": 1}
    with pytest.raises(SystemExit, match="student x: stopped by SIGTERM at step 34; rerun the same command"):
        stages("student: x", lambda: completed(stopped, "student x"))
    assert not list((tmp_path / "stages").iterdir())
    done = stages("student: x", lambda: {"final": completed({**stopped, "step": 100, "stopped_by": None}, "x")["step"]})
    assert done["final"] == 100 and len(list((tmp_path / "stages").iterdir())) == 1


@pytest.mark.slow
def test_seeds_report_has_three_seeds_of_every_method_bytes_without_unread_columns_and_the_goal(tmp_path, tiny_teacher):
    docs, work = tmp_path / "docs", tmp_path / "work"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n")
    cmd = [sys.executable, "benchmarks/report.py", "--teacher", tiny_teacher, "--quick", "--seeds", "--out", str(docs),
           "--work", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (docs / "results.md").read_text()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in md.split("## Three seeds")[1].splitlines() if l.startswith("| ") and not l.startswith("| student")}
    assert len(rows) == 11 and all(cells[0] == "3" and len(cells[6].split(" / ")) == 3 for cells in rows.values())
    for name, cells in rows.items():
        assert re.fullmatch(r"\d+\.\d{3} ± \d+\.\d{3}", cells[2]), (name, cells)   # held-out CE, mean ± sd
    # the estimator does not read the coverage column the tail bucket needs: its bytes leave it out
    for n in (12, 50):
        assert float(rows[f"sampled KD (N={n})"][1]) < float(rows[f"sampled KD (N={n}) + tail bucket"][1])
    assert "**Goal: sampled labels at ≤ 16 B/position within 5 % of the reference gain (mean of 3 seeds).**" in md
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "running" not in r.stdout, r.stdout[-2000:]
