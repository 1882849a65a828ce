import json

import pytest
from typer.testing import CliRunner

from helpers import topk_row
from labelgen.cli import app
from labelgen.shards import ShardWriter

runner = CliRunner()


def make_set(path, rng, n=5):
    with ShardWriter(path, "topk", 8, 300) as w:
        for i in range(n):
            w.write(topk_row(rng, f"e{i}", 20, 300, 8))


def test_validate_exits_zero_on_a_good_set_and_one_listing_problems(tmp_path, rng):
    make_set(tmp_path / "l", rng)
    ok = runner.invoke(app, ["validate", str(tmp_path / "l")])
    assert ok.exit_code == 0 and "OK (1 shards, 5 rows)" in ok.output
    (tmp_path / "l" / "shard-000000.parquet").unlink()
    bad = runner.invoke(app, ["validate", str(tmp_path / "l"), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert not report["ok"] and "missing" in report["problems"][0]["problem"]


def test_inspect_json_has_the_documented_keys(tmp_path, rng):
    make_set(tmp_path / "l", rng)
    r = runner.invoke(app, ["inspect", str(tmp_path / "l"), "--json"])
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    for key in ("rows", "positions", "bytes", "bytes_per_position", "k", "coverage_mean", "coverage_p5"):
        assert key in d
    assert d["rows"] == 5 and d["positions"] == 5 * 19 and d["k"] == 8


def test_inspect_plot_writes_a_png(tmp_path, rng):
    make_set(tmp_path / "l", rng)
    r = runner.invoke(app, ["inspect", str(tmp_path / "l"), "--plot", str(tmp_path / "cov.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cov.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gives_one_line_and_a_nonzero_exit(tmp_path):
    r = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"labelgen: error: {tmp_path / 'nope'}: no such label set (nothing at that path)"]
    assert "Traceback" not in r.output
    (tmp_path / "unfinished").mkdir()
    r = runner.invoke(app, ["inspect", str(tmp_path / "unfinished")])
    assert r.exit_code == 2 and "manifest.json: no manifest; not a complete label set (the job did not finish" in r.stderr


@pytest.mark.parametrize("command", ["validate", "inspect", "export"])
def test_a_shard_file_given_for_a_set_names_the_directory_to_pass(tmp_path, rng, command):
    make_set(tmp_path / "l", rng)
    shard = sorted((tmp_path / "l").glob("shard-*.parquet"))[0]
    r = runner.invoke(app, [command, str(shard)] + ([str(tmp_path / "x.jsonl")] if command == "export" else []))
    assert r.exit_code == 2, r.output   # the same code for the same mistake in every command
    assert r.stderr.strip().splitlines() == [f"labelgen: error: {shard}: a shard file, not a label set: pass the "
                                             f"directory it is in ({tmp_path / 'l'})"]


def test_estimate_prints_full_and_topk_storage():
    r = runner.invoke(app, ["estimate", "--tokens", "5e12", "--vocab", "100000", "--k", "64", "--json"])
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["bytes"]["full_fp8"] == 5e17 and d["bytes"]["full_bf16"] == 1e18
    bad = runner.invoke(app, ["estimate", "--tokens", "1e9", "--vocab", "100", "--k", "500"])
    assert bad.exit_code == 2 and "larger than --vocab" in bad.stderr
    bad = runner.invoke(app, ["estimate", "--tokens", "1e9"])
    assert bad.exit_code == 2 and "--vocab: required without a label set to measure" in bad.stderr


def test_estimate_takes_the_label_set_as_validate_and_inspect_do(tmp_path, rng):
    make_set(tmp_path / "l", rng)
    r = runner.invoke(app, ["estimate", str(tmp_path / "l"), "--tokens", "1e9"])
    assert r.exit_code == 0 and f"measured from {tmp_path / 'l'} (k=8," in r.stdout, r.output
    old = runner.invoke(app, ["estimate", "--tokens", "1e9", "--from", str(tmp_path / "l")])
    assert old.exit_code == 0 and old.stdout == r.stdout
    assert old.stderr.splitlines() == ["note: --from DIR is now the argument LABEL_DIR (as in validate and inspect); the "
                                       "old name is read until the next release"]


def test_every_config_field_has_a_flag_whose_help_shows_its_default():
    """Flags default to None (so a config file can fill them); --help still
    shows the default the run will use, read from the config dataclass."""
    import dataclasses
    import re

    from labelgen.generate.config import GenerateConfig
    from student_train.cli import app as student_app
    from student_train.config import CodistillConfig, TrainConfig
    for cli, command, cls in ((app, "generate", GenerateConfig), (student_app, "train", TrainConfig),
                              (student_app, "codistill", CodistillConfig)):
        r = runner.invoke(cli, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        assert r.exit_code == 0, r.output
        flags = {m.group(1): line for line in r.output.splitlines() if (m := re.search(r"│ (--[a-z-]+)", line))}
        checked = 0
        for f in dataclasses.fields(cls):
            if f.name == "inputs":   # --input, repeatable
                continue
            line = flags.get("--" + f.name.replace("_", "-"))
            assert line is not None, f"{command}: config field {f.name} has no flag"
            if (command, f.name) == ("train", "tail"):   # None stands for a default that depends on the labels
                want = "tail for top-k labels, none for sampled ones"
            elif f.default is not dataclasses.MISSING:
                want = "none" if f.default is None or f.default == () else str(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                want = "none"
            else:   # marked in its help text instead (tests/test_cli_help.py)
                continue
            assert f"[default: ({want})]" in line, (command, f.name, line)
            checked += 1
        assert checked >= 20, (command, checked)
