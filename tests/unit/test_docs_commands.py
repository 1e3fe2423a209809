"""Every command and flag the documentation, the help texts and the messages name exists: the
README, docs/*.md and the data files are read for `neuronserve <command>` (and the wrappers and
run_apis.py, which take the same options) with the flags written after it, and each is looked up
in the real parsers."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from neuronserve.cli import build_parser
from neuronserve.loadgen.options import build_parser as bench_parser

REPO = Path(__file__).resolve().parents[2]
# The wrappers run one command each with the arguments given.
WRAPPERS = {
    "./trace-model/run.sh": "trace",
    "./fast-api/deploy.sh": "deploy",
    "./fast-api/status.sh": "status",
    "./fast-api/cleanup.sh": "cleanup",
    "./fast-api/tune.sh": "tune",
}
# "neuronserve" as a command (not a kubectl namespace: -n neuronserve, nor a directory, an image).
COMMAND = re.compile(r"(?<!-n )(?<![\w./-])(?:\.venv/bin/)?neuronserve ([a-z][a-z0-9-]*)((?: [^`\n|;&#]*)?)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = {s for a in parser._actions for s in a.option_strings}
    for a in parser._actions:  # a nested command (k8s check, image build) brings its own
        if isinstance(a, argparse._SubParsersAction):
            for nested in a.choices.values():
                flags |= _flags(nested)
    return flags


def _texts() -> dict[str, str]:
    paths = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "src").rglob("*.json")),
    ]
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in paths}
    for name, sub in _commands().items():  # the help texts
        texts[f"neuronserve {name} --help"] = sub.format_help()
    return texts


def _code(text: str) -> list[str]:
    """Code in markdown: fenced blocks' lines and inline spans (all of a non-markdown text)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for block in blocks for line in block.splitlines()] + inline


def test_every_command_and_flag_the_docs_name_exists() -> None:
    commands = _commands()
    bench = _flags(bench_parser())
    problems = []
    for where, text in _texts().items():
        prose = not where.endswith(".md")  # help texts and data: sentences, not code
        lines = text.splitlines() if prose else _code(text)
        for line in lines:
            for match in COMMAND.finditer(line):
                name, rest = match.group(1), match.group(2)
                after = line[match.end(1) : match.end(1) + 1]
                as_command = after in {"", ")", ":"} or (after == " " and rest.lstrip().startswith("-"))
                if prose and not as_command:
                    continue  # "neuronserve servers, or ...": a word in a sentence
                if name not in commands:
                    problems.append(f"{where}: `neuronserve {name}` is not a command")
                    continue
                known = _flags(commands[name]) | {"--help"}
                problems += [
                    f"{where}: `neuronserve {name} {flag}`: no such option"
                    for flag in FLAG.findall(rest)
                    if flag not in known
                ]
            for wrapper, name in WRAPPERS.items():
                for rest in re.findall(re.escape(wrapper) + r"((?: [^`\n|;&#]*)?)", line):
                    known = _flags(commands[name]) | {"--help"}
                    problems += [
                        f"{where}: `{wrapper} {f}`: no such option"
                        for f in FLAG.findall(rest)
                        if f not in known
                    ]
            for rest in re.findall(r"run_apis\.py((?: [^`\n|;&#]*)?)", line):
                problems += [
                    f"{where}: `run_apis.py {f}`: no such option"
                    for f in FLAG.findall(rest)
                    if f not in bench
                ]
    assert problems == [], "\n".join(problems)


def test_the_check_finds_a_command_or_flag_that_does_not_exist() -> None:
    """The same lookup on lines that name what does not exist (so the check above can fail)."""
    commands = _commands()
    line = "neuronserve monitor-config --out x; neuronserve deploy --no-such-flag"
    found = [(m.group(1), FLAG.findall(m.group(2))) for m in COMMAND.finditer(line)]
    assert found == [("monitor-config", ["--out"]), ("deploy", ["--no-such-flag"])]
    assert "monitor-config" not in commands
    assert "--no-such-flag" not in _flags(commands["deploy"]) and "--dry-run" in _flags(commands["deploy"])
