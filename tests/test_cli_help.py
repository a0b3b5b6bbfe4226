"""The `forksight` CLI documents every subcommand it registers: in experiments/cli.py's module docstring
(one `forksight GROUP NAME` line each) and in its group's help, and the checker catches a missing one."""

from __future__ import annotations

import argparse

import experiments.cli as cli


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command under `parser`, as its words (`("steer", "learn")`), in registration order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = command_paths(sub, prefix + (name,))
                out.extend(inner or [prefix + (name,)])
    return out


def documented_lines(doc: str) -> set[tuple[str, ...]]:
    """The command words each `forksight ...` usage line of `doc` starts with (flags and `[...]` stop it)."""
    out = set()
    for line in doc.splitlines():
        words = line.split()
        if not words or words[0] != "forksight":
            continue
        cmd = []
        for w in words[1:]:
            if not w.replace("-", "").isalnum() or w.startswith("-"):
                break
            cmd.append(w)
        out.add(tuple(cmd))
    return out


def undocumented(parser: argparse.ArgumentParser, doc: str, group_help: dict[str, str]) -> list[str]:
    """Every registered command missing from `doc`'s usage lines, and every subcommand its group's help
    does not name, as sentences; empty means the CLI is fully documented."""
    lines = documented_lines(doc)
    out = []
    for path in command_paths(parser):
        if not any(line[: len(path)] == path for line in lines):
            out.append(f"`forksight {' '.join(path)}` is registered but experiments/cli.py's docstring has no "
                       f"`forksight {' '.join(path)} ...` line: add one")
        if len(path) == 2 and path[0] in group_help and path[1] not in group_help[path[0]]:
            out.append(f"GROUP_HELP[{path[0]!r}] does not name its subcommand {path[1]!r}: add it")
    return out


def test_every_subcommand_is_in_the_docstring_and_its_group_help():
    parser = cli.build_parser()
    paths = command_paths(parser)
    assert ("steer", "learn") in paths and ("organism", "rl") in paths and ("eval",) in paths, paths
    found = undocumented(parser, cli.__doc__, cli.GROUP_HELP)
    assert found == [], "the CLI's documentation misses commands:\n" + "\n".join(found)


def test_group_help_lists_every_subcommand(capsys):
    parser = cli.build_parser()
    for group in ("steer", "sae", "organism"):
        try:
            parser.parse_args([group, "--help"])
        except SystemExit:
            pass
        text = capsys.readouterr().out
        for path in command_paths(parser):
            if path[0] == group:
                assert path[1] in text, f"`forksight {group} --help` does not list {path[1]}:\n{text}"


def test_planted_undocumented_command_is_found():
    parser = cli.build_parser()
    steer = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["steer"]
    next(a for a in steer._actions if isinstance(a, argparse._SubParsersAction)).add_parser("plant")
    found = undocumented(parser, cli.__doc__, cli.GROUP_HELP)
    assert any(p.startswith("`forksight steer plant` is registered") for p in found), found
    assert any("GROUP_HELP['steer'] does not name its subcommand 'plant'" in p for p in found), found
    # a docstring that lost a line is caught too
    doc = "\n".join(line for line in cli.__doc__.splitlines() if "forksight steer learn" not in line)
    found = undocumented(cli.build_parser(), doc, cli.GROUP_HELP)
    assert found == ["`forksight steer learn` is registered but experiments/cli.py's docstring has no "
                     "`forksight steer learn ...` line: add one"], found
