"""Every `engrain ...` command the README shows parses against the real CLI: the verb exists, every option exists and
takes the value written, and required arguments are there. Nothing runs; a renamed flag fails here first."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from typer.main import get_command

from engrain.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str) -> list[tuple[str, bool]]:
    """(command, whole) for the `engrain ...` lines of code blocks (comments cut; whole commands) and the inline
    `engrain ...` spans of the prose (fragments: they may leave out required arguments)."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("engrain "):
                commands.append((line, True))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [(m.strip(), False) for m in re.findall(r"`(engrain [^`]+)`", prose.replace("\n", " "))]
    return commands


def concrete(command: str) -> list[str]:
    """One concrete argv for a documented command: `a|b` takes the first choice, `[--opt X]` is kept as written,
    `...` (more of the same) is dropped."""
    command = command.replace("[", "").replace("]", "").replace("...", " ")
    words = shlex.split(command)[1:]
    words = [w.split("|")[0] if "|" in w and not w.startswith(("http", "-")) else w for w in words]
    return [PLACEHOLDERS.get(w, w) for w in words]


PLACEHOLDERS = {"N": "3"}  # a number the README leaves open


def parse(argv: list[str], whole: bool = True) -> None:
    """Parse ``engrain ARGV`` as the CLI would, running nothing; a fragment may lack required arguments."""
    group = get_command(app)
    ctx = click.Context(group, info_name="engrain")
    verb = group.get_command(ctx, argv[0])
    assert verb is not None, f"no command `engrain {argv[0]}`"
    try:
        verb.make_context(argv[0], argv[1:], parent=ctx)
    except Exception as exc:  # typer bundles its own click: its exception classes are not click's
        if whole or type(exc).__name__ != "MissingParameter":
            raise


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_shows_the_pipeline():
    verbs = {concrete(c)[0] for c, whole in COMMANDS if whole}
    assert {"ingest", "synth", "train", "index", "ask", "compare", "serve", "demo"} <= verbs


@pytest.mark.parametrize("command,whole", COMMANDS)
def test_readme_command_parses(command, whole):
    parse(concrete(command), whole)


def test_a_wrong_flag_or_a_missing_argument_is_caught():
    with pytest.raises(Exception, match="No such option: --memroy"):
        parse(["train", "-w", "ws", "--memroy", "lora"])
    with pytest.raises(AssertionError):
        parse(["trian", "-w", "ws"])
    with pytest.raises(Exception, match="Missing parameter"):
        parse(["compare", "-w", "ws"])
    parse(["compare", "-w", "ws"], whole=False)
