"""`camelid --help` and every `camelid <command> --help` answer without importing torch, show defaults, and the
option vocabulary holds: one name, one meaning (README's table)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

# Parse each ARGV of a JSON list of argv lists with --help in one fresh interpreter; print each help, then which
# heavy modules had been imported after it (imports only grow, so a clean last line means every help was clean).
_PROBE = """
import json, sys
import camelid.cli
for argv in json.loads(sys.argv[1]):
    try:
        camelid.cli.build_parser().parse_args(argv)
    except SystemExit:
        pass
    heavy = sorted(m for m in ("torch", "transformers", "fastapi", "numpy") if m in sys.modules)
    print("HEAVY:" + json.dumps([argv, heavy]))
"""
def _parser() -> argparse.ArgumentParser:
    from camelid.cli import build_parser
    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_commands() -> list[tuple[str, ...]]:
    """Every command and sub-action (`diff make`, `eval perplexity` ...), as argv prefixes."""
    out = []

    def walk(prefix: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        for name, sub in _subparsers(parser).items():
            out.append(prefix + (name,))
            walk(prefix + (name,), sub)

    walk((), _parser())
    return out


def _help(argvs: list[list[str]]) -> tuple[str, list[tuple[list[str], list[str]]]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return "\n".join(x for x in lines if not x.startswith("HEAVY:")), \
        [json.loads(x.removeprefix("HEAVY:")) for x in lines if x.startswith("HEAVY:")]


def test_top_level_help_imports_no_torch() -> None:
    text, [(_, heavy)] = _help([["--help"]])
    assert "generate" in text and "serve" in text and "convert" in text
    assert heavy == []


def test_every_command_help_imports_no_torch() -> None:
    commands = [list(c) + ["--help"] for c in _all_commands()]
    assert ["diff", "make", "--help"] in commands and ["eval", "perplexity", "--help"] in commands
    text, seen = _help(commands)
    for argv in commands:  # each command's own usage line was printed
        assert f"usage: camelid {' '.join(argv[:-1])}" in text, argv
    assert [heavy for _, heavy in seen] == [[]] * len(commands), [(argv, h) for argv, h in seen if h][:1]


@pytest.mark.parametrize("module", ["model", "serve", "convert", "bench", "eval", "data", "train", "quantize",
                                    "templates"])
def test_each_command_module_registers_without_torch(module: str) -> None:
    """Each commands/ module on its own registers its parsers without torch (names the culprit if one does)."""
    code = (f"import argparse, sys\nfrom camelid.commands import {module} as m\n"
            "m.register(argparse.ArgumentParser().add_subparsers())\n"
            "print(sorted(x for x in ('torch', 'transformers', 'fastapi') if x in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_shows_defaults() -> None:
    subs = _subparsers(_parser())
    wanted = {"serve": ["--port PORT", "(default: 5009)", "(default: 127.0.0.1)", "(default: 8)"],
              "generate": ["(default: 256)", "0 = greedy (default: 0.0)", "(default: 1.0)", "default: random"],
              "chat": ["0 = greedy (default: 0.7)"],
              "bench": ["(default: float32)", "(default: 128)", "(default: 3)"]}
    for command, parts in wanted.items():
        text = " ".join(subs[command].format_help().split())
        for part in parts:
            assert part in text, (command, part)
    # The API key default comes from the environment: --help must not print a secret.
    assert "$CAMELID_API_KEY" in subs["serve"].format_help()


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _every_parser() -> dict[str, argparse.ArgumentParser]:
    out = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for name, sub in _subparsers(parser).items():
            out[f"{prefix}{name}"] = sub
            walk(f"{prefix}{name} ", sub)

    walk("", _parser())
    return out


def test_one_vocabulary_dtype_group_quiet_config() -> None:
    """--dtype is always a float type (the computed one, plus auto, where a model runs), --group a positive
    group size, --quiet a switch, --config a model config (not train's options file)."""
    from camelid.commands.options import QUIET_HELP
    floats = {"float32", "bfloat16", "float16", "auto"}
    seen = set()
    for name, parser in _every_parser().items():
        if (action := _option(parser, "--dtype")) is not None:
            seen.add("dtype")
            assert action.choices and set(action.choices) <= floats, name
            assert any(w in (action.help or "") for w in ("comput", "stored")), name  # which weights' float type
        if (action := _option(parser, "--group")) is not None:
            seen.add("group")
            assert action.type(32) == 32 and "group" in action.help, name
        if (action := _option(parser, "--quiet")) is not None:
            seen.add("quiet")
            assert isinstance(action, argparse._StoreTrueAction) and action.help == QUIET_HELP, name
        if (action := _option(parser, "--config")) is not None and name != "train":
            assert "model config" in action.help, name
        if (action := _option(parser, "--device")) is not None:
            # train's None: its --options file may set it, else auto
            assert action.default in ("auto", None) and "cpu, cuda or auto" in action.help, name
    assert seen == {"dtype", "group", "quiet"}


def test_format_names_match_the_writers() -> None:
    from camelid.commands.options import FORMATS
    from camelid.formats import WRITERS
    assert tuple(sorted(WRITERS)) == FORMATS


def test_nothing_but_cli_imports_commands() -> None:
    """Imports run one way: cli -> commands -> the library."""
    import pathlib

    import camelid
    root = pathlib.Path(camelid.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        if rel != "cli.py" and not rel.startswith("commands/"):
            assert "from .commands" not in text and "from ..commands" not in text and "camelid.commands" not in text, rel
