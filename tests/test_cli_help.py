"""--help as a newcomer reads it: every option of both command lines says
what it does, required settings are marked, generate's ~50 options come in
panels, and --version answers."""

import pytest
import typer.main
from typer.testing import CliRunner

from labelgen import format as fmt
from labelgen.cli import app as labelgen_app
from student_train.cli import app as student_app

APPS = {"labelgen": labelgen_app, "student-train": student_app}


def commands():
    for program, app in APPS.items():
        for name, command in typer.main.get_command(app).commands.items():
            yield program, name, command


@pytest.mark.parametrize("program, name, command", list(commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_of_every_command_says_what_it_does(program, name, command):
    empty = [p.name for p in command.params if not getattr(p, "hidden", False) and not (getattr(p, "help", "") or "").strip()]
    assert not empty, f"{program} {name}: options without help text: {', '.join(empty)}"


def test_required_settings_are_marked_and_generate_groups_its_options_in_panels():
    generate = typer.main.get_command(labelgen_app).commands["generate"]
    params = {p.name: p for p in generate.params}
    for name in ("teacher", "input", "out"):
        assert "(required: this flag or the config file's key)" in params[name].help, name
    assert "required" not in params["mode"].help
    panels = {p.rich_help_panel for p in generate.params if p.name != "help"}
    assert panels >= {"Input", "Teacher", "Labels", "Output", "Run"}, panels
    r = CliRunner().invoke(labelgen_app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "─ Labels ─" in r.output and "(required: this flag or the config file's key)" in r.output


@pytest.mark.parametrize("program", APPS)
def test_version(program):
    r = CliRunner().invoke(APPS[program], ["--version"])
    assert r.exit_code == 0 and r.output.startswith(f"{program} ") and f"label format {fmt.FORMAT_VERSION}" in r.output, r.output


def test_renamed_options_are_hidden_from_help_but_the_new_names_are_shown():
    r = CliRunner().invoke(student_app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--ce-weight" in r.output and "--kd-temperature" in r.output and "--loader-workers" in r.output
    assert "--alpha " not in r.output and "--temperature " not in r.output and "--num-workers" not in r.output
