"""Every ``diffrep`` command explains itself, and library errors reach the user as one line."""

import os
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]
CLI_MODULES = sorted(path.stem for path in (ROOT / "pipeline" / "cli").glob("*.py") if path.stem != "__init__")


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_module_imports_on_its_own(module):
    done = _python(f"import pipeline.cli.{module}")
    assert done.returncode == 0, done.stderr


def test_help_never_loads_torch():
    done = _python(
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli.main import main\n"
        "for command in [[]] + [[name] for name in sorted(main.commands)]:\n"
        "    result = CliRunner().invoke(main, [*command, '--help'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "    loaded = sorted(name for name in ('torch', 'numpy', 'zarr', 'distributed') if name in sys.modules)\n"
        "    assert not loaded, f'diffrep {\" \".join(command)} --help loaded {loaded}'\n"
        "print(len(main.commands))\n"
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 12, "every command's help was shown"


def test_a_ctrl_c_outside_the_checkpointing_loops_is_one_line_and_exit_130(monkeypatch):
    """Ctrl-C while a command plans (here: while the block table is built) says what was kept, not 'Aborted!'."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("extract.backbone.block_table.block_table", interrupted)
    result = CliRunner().invoke(main, ["info", "--config", "32x32_small"])
    assert result.exit_code == 130
    lines = result.output.strip().splitlines()
    assert lines == ["interrupted (Ctrl-C): what had finished before is kept; the same command starts again"]
