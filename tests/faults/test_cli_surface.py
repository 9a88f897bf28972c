"""Every bad invocation of the whole command line is one line on stderr and exit code 2 (issue 15).

The table is generated from the command tree itself (every group and every command, so a new
command is covered without editing this file), plus hand-written cases; each runs
``genperc.cli.main(argv)`` in-process. All of them fail while parsing, before any work starts.
"""

from __future__ import annotations

import pytest
import typer

from genperc import cli


def _tree():
    cli._mount_subapps()
    groups, commands = [], []

    def walk(command, path):
        if hasattr(command, "commands"):
            groups.append(path)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        else:
            commands.append((path, command))

    walk(typer.main.get_command(cli.app), [])
    return groups, commands


GROUPS, COMMANDS = _tree()


def _required(command) -> list[str]:
    """Dummy values for the required arguments and options, so that only the fault under test fails."""
    argv = []
    for p in command.params:
        if p.required:
            argv += ["x"] if p.param_type_name == "argument" else [p.opts[0], "x"]
    return argv


def _numeric_option(command) -> str | None:
    for p in command.params:
        if p.param_type_name == "option" and p.type_descriptor.annotation in (int, float) and p.opts[0].startswith("--"):
            return p.opts[0]
    return None


def _one_line_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    return err


def _ids(cases):
    return [" ".join(path) or "genperc" for path, *_ in cases]


@pytest.mark.parametrize("path", GROUPS, ids=[" ".join(p) or "genperc" for p in GROUPS])
def test_bare_group_prints_help_and_exits_2(path, capsys):
    assert cli.main(path) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.err + captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("path, command", COMMANDS, ids=_ids(COMMANDS))
def test_unknown_option(path, command, capsys):
    assert cli.main([*path, *_required(command), "--no-such-option"]) == 2
    _one_line_error(capsys, "No such option: --no-such-option")


MISSING = [(path, c) for path, c in COMMANDS if any(p.required for p in c.params)]


@pytest.mark.parametrize("path, command", MISSING, ids=_ids(MISSING))
def test_missing_argument(path, command, capsys):
    assert cli.main(path) == 2
    _one_line_error(capsys, "Missing ")


NUMERIC = [(path, c, _numeric_option(c)) for path, c in COMMANDS if _numeric_option(c)]


@pytest.mark.parametrize("path, command, option", NUMERIC, ids=_ids(NUMERIC))
def test_bad_type(path, command, option, capsys):
    assert cli.main([*path, *_required(command), option, "abc"]) == 2
    err = _one_line_error(capsys, "Invalid value")
    assert option in err and f"'genperc {' '.join(path)} --help'" in err


@pytest.mark.parametrize("argv, fragment", [
    (["nosuch"], "No such command 'nosuch'"),
    (["data", "nosuch"], "No such command 'nosuch'"),
    (["eval", "run", "--steps", "abc"], "Invalid value for '--steps'"),
    (["--threads", "many"], "Invalid value for '--threads'"),
    (["predict", "run"], "Missing option '--image'"),
    (["data", "render"], "Missing option '--out'"),
    (["data", "show"], "Missing argument"),
])
def test_hand_written_cases(argv, fragment, capsys):
    assert cli.main(argv) == 2
    _one_line_error(capsys, fragment)


def test_help_still_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "Usage" in capsys.readouterr().out


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), typer.Abort(), typer.Exit(130)])
def test_interruptions_exit_130(raised, monkeypatch, capsys):
    import genperc.config

    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(genperc.config, "load_config", interrupted)
    assert cli.main(["config"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")


def test_exit_codes_of_commands_propagate(monkeypatch, capsys):
    import genperc.config

    def exit_3(*args, **kwargs):
        raise typer.Exit(3)

    monkeypatch.setattr(genperc.config, "load_config", exit_3)
    assert cli.main(["config"]) == 3
