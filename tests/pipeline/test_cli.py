"""Every ``diffrep`` command explains itself, and library errors reach the user as one line."""

import pytest
from click.testing import CliRunner

from pipeline.cli.main import main

COMMANDS = sorted(main.commands)


def test_the_commands_of_the_design_are_there():
    assert {"info", "extract", "probe", "knn", "cka", "sweep", "report", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS])
def test_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: diffrep" in result.output and "--help" in result.output
    body = result.output.split("Options:")[0]
    assert len(body.split()) > 8, "the help must say what the command does"


def test_bad_value_names_the_option():
    result = CliRunner().invoke(main, ["extract", "--dataset", "cifar10", "--timesteps", "9o", "--blocks", "19"])
    assert result.exit_code == 2
    assert "--timesteps" in result.output and "90,150,300" in result.output


def test_ranges_expand_and_backwards_ranges_are_refused():
    ok = CliRunner().invoke(main, ["extract", "--dataset", "nosuch", "--timesteps", "90", "--blocks", "20-22,30"])
    assert "unknown dataset 'nosuch'" in ok.output  # the blocks parsed; the dataset is the first error
    bad = CliRunner().invoke(main, ["extract", "--dataset", "cifar10", "--timesteps", "90", "--blocks", "19,30-24"])
    assert bad.exit_code == 2 and "range 30-24 runs backwards: write 24-30" in bad.output
