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
COMMAND = re.compile(
    r"(?<!-n )(?<![\w./-])(?:\.venv/bin/)?neuronserve ([a-z][a-z0-9-]*)((?: [^`\n|;&#'\"]*)?)"
)
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
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    # Files whose strings and comments speak to users: data, generated configs, wrappers, the code.
    paths += [
        *sorted((REPO / "src").rglob("*.json")),
        *sorted((REPO / "monitor").rglob("*.yml")),
        *sorted(REPO.glob("*/*.sh")),
        *sorted((REPO / "src" / "neuronserve").rglob("*.py")),
    ]
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in paths}
    for name, sub in _commands().items():  # the help texts
        texts[f"neuronserve {name} --help"] = sub.format_help()
    return texts


def _code(text: str) -> list[str]:
    """Code in markdown: fenced blocks' lines and inline spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for block in blocks for line in block.splitlines()] + inline


def _own(rest: str) -> str:
    """What follows a command up to the next sentence or command ("... and run_apis.py --x")."""
    return re.split(r"\s(?:and|or|then|\S+\.(?:py|sh))\s", rest)[0]


def problems(texts: dict[str, str]) -> list[str]:
    """Every `neuronserve <command>`, wrapper or run_apis.py flag in ``texts`` that the parsers
    do not have. Markdown is read for its code; other texts (help, data, code) line by line, where
    a command is a command when it ends the text, a parenthesis or a quotation, or takes flags."""
    commands = _commands()
    bench = _flags(bench_parser())
    found = []
    for where, text in texts.items():
        prose = not where.endswith(".md")
        lines = text.splitlines() if prose else _code(text)
        for line in lines:
            for match in COMMAND.finditer(line):
                name, rest = match.group(1), _own(match.group(2))
                after = line[match.end(1) : match.end(1) + 1]
                as_command = after in {"", ")", "`", "'", '"'} or (
                    after == " " and rest.lstrip().startswith("-")
                )
                if prose and not as_command:
                    continue  # "neuronserve servers, or ...": a word in a sentence
                if name not in commands:
                    found.append(f"{where}: `neuronserve {name}` is not a command")
                    continue
                known = _flags(commands[name]) | {"--help"}
                found += [
                    f"{where}: `neuronserve {name} {flag}`: no such option"
                    for flag in FLAG.findall(rest)
                    if flag not in known
                ]
            for wrapper, name in WRAPPERS.items():
                for rest in map(_own, re.findall(re.escape(wrapper) + r"((?: [^`\n|;&#'\"]*)?)", line)):
                    known = _flags(commands[name]) | {"--help"}
                    found += [
                        f"{where}: `{wrapper} {f}`: no such option"
                        for f in FLAG.findall(rest)
                        if f not in known
                    ]
            for rest in map(_own, re.findall(r"run_apis\.py((?: [^`\n|;&#'\"]*)?)", line)):
                found += [
                    f"{where}: `run_apis.py {f}`: no such option"
                    for f in FLAG.findall(rest)
                    if f not in bench
                ]
    return found


def test_every_command_and_flag_the_docs_help_and_messages_name_exists() -> None:
    assert problems(_texts()) == [], "\n".join(problems(_texts()))


def test_the_check_finds_a_command_or_flag_that_does_not_exist() -> None:
    """The same check on texts that name what does not exist (so the check above can fail)."""
    found = problems(
        {
            "README.md": "run `neuronserve monitor-config` then\n```bash\nneuronserve deploy --no-such-flag\n```\n",
            "src/x.py": "    # Generated by `neuronserve monitor-config` (a test keeps it in sync).\n",
            "help": "usage: see ./fast-api/deploy.sh --dry-runx and run_apis.py --durationx 5\n",
        }
    )
    assert found == [
        "README.md: `neuronserve deploy --no-such-flag`: no such option",
        "README.md: `neuronserve monitor-config` is not a command",
        "src/x.py: `neuronserve monitor-config` is not a command",
        "help: `./fast-api/deploy.sh --dry-runx`: no such option",
        "help: `run_apis.py --durationx`: no such option",
    ]
