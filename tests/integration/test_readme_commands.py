"""The README's management commands, as written, against the demo database (issue 12 item 9:
after `make run`, `manage.py` commands failed with "SECRET_KEY is required").

The commands are read from the README itself, so a command that stops working there fails
this test. They run in a copy of the checkout (its var/molt.sqlite3 is the demo database, as
`make run` makes it: migrate, then seed_demo) with a clean environment plus the `export` lines
the README's block gives, so neither a developer's demo database nor this test's settings are
touched or used."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration]

BLOCK = re.compile(r"```sh\n(export DJANGO_DEBUG=true\n.*?)```", re.S)


def readme_block() -> tuple[dict[str, str], list[list[str]]]:
    """The README's management block: its exported variables and its commands (comments cut)."""
    (block,) = BLOCK.findall((REPO / "README.md").read_text())
    exported, commands = {}, []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            exported[key] = value
        elif line:
            commands.append(line.split())
    return exported, commands


def test_the_readme_block_is_found_and_names_the_commands():
    exported, commands = readme_block()
    assert exported == {"DJANGO_DEBUG": "true"}
    assert {command[2] for command in commands} >= {"grant_credits", "audit_ledger", "seed_demo"}
    assert all(command[:2] == [".venv/bin/python", "manage.py"] for command in commands)


def test_the_readme_commands_work_against_the_demo_database(tmp_path):
    checkout = tmp_path / "molt"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "var", "test-artifacts", "tests", "__pycache__", ".env", "node_modules"
        ),
    )
    # The copy's own packages come first (manage.py's directory leads sys.path), so its
    # settings put the demo database under the copy's var/.
    (checkout / ".venv").symlink_to(REPO / ".venv")
    exported, commands = readme_block()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}

    def run(argv: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv, cwd=checkout, env=env | extra, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
        return result

    # What `make run` does to a fresh checkout (scripts/run_dev.py: migrate, seed_demo), with
    # manage.py's own development defaults (nothing set).
    python = str(checkout / ".venv" / "bin" / "python")
    (checkout / "var").mkdir()
    run([python, "manage.py", "migrate", "--no-input"], {})
    run([python, "manage.py", "seed_demo"], {})
    assert (checkout / "var" / "molt.sqlite3").is_file()

    outputs = {
        " ".join(command[2:]): run([python, *command[1:]], exported).stdout for command in commands
    }
    granted = next(out for name, out in outputs.items() if name.startswith("grant_credits"))
    assert "granted 25.00 USD" in granted, granted
    # And with nothing exported at all, as a reader who skipped the export line would type it.
    assert "granted" in run([python, "manage.py", "grant_credits", "demo-buyer", "1usd"], {}).stdout
    run([python, "manage.py", "audit_ledger"], {})
