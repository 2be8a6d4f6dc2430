"""What users expect of a command-line package: --version, help with defaults for every option,
--config on every command, and a library that never imports the command line."""
import argparse
import ast
import pathlib
import subprocess
import sys

import pytest

import metaphi
from metaphi.cli import build_parser, main

PACKAGE = pathlib.Path(metaphi.__file__).parent
#: options that are actions rather than settings: nothing to default
NO_DEFAULT = {"--help", "--version", "--config"}


def _subcommands(parser: argparse.ArgumentParser):
    """(name, parser) of every command and nested subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subcommands(sub):
                    yield f"{name} {inner}", subsub


def _leaf_commands():
    parser = build_parser()
    return [(name, sub) for name, sub in _subcommands(parser)
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"metaphi {metaphi.__version__}"


@pytest.mark.parametrize("name,sub", _leaf_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_says_what_it_does_and_its_default(name, sub):
    missing = []
    for action in sub._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags or set(flags) & NO_DEFAULT or action.help == argparse.SUPPRESS:
            continue
        text = action.help or ""
        if not text.strip() or "default" not in text:
            missing.append(flags[0])
    assert not missing, f"metaphi {name}: options without help or a shown default: {', '.join(missing)}"


@pytest.mark.parametrize("name,sub", _leaf_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_reads_a_config_file(name, sub):
    assert any("--config" in a.option_strings for a in sub._actions), f"metaphi {name} has no --config"


def test_the_library_never_imports_the_command_line():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "metaphi.cli" or n.startswith("metaphi.cli.") for n in names):
                offenders.append(str(rel))
    assert not offenders, f"modules outside cli/ import metaphi.cli: {sorted(set(offenders))}"


def test_no_function_swallows_unknown_options():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.args.kwarg is not None \
                    and node.args.kwarg.arg == "_":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert not offenders, f"functions that swallow options with **_: {offenders}"


def test_package_ships_its_license_and_type_marker():
    assert (PACKAGE / "py.typed").is_file()
    root = PACKAGE.parent
    assert "MIT License" in (root / "LICENSE").read_text()
    assert "license-files" in (root / "pyproject.toml").read_text()


def test_version_from_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-m", "metaphi", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"metaphi {metaphi.__version__}"
