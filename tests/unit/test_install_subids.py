"""install.sh gives podman's "containers" user subordinate ids (issue 10): every sandbox runs with
--userns=auto, which takes its ids from the "containers" entries of /etc/subuid and /etc/subgid,
and a node installed by the install line had none, so its first sandbox failed with "No subuid
ranges found".

The script as the gateway serves it, without its last line (`main "$@"`), is sourced by dash (the
/bin/sh of Debian and Ubuntu) and its add_container_subids called on copies of the two files, so
the test runs the real code on nothing of this machine's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from frontend.install import AgentWheel, render_install_script

pytestmark = pytest.mark.unit

RANGE = "containers:2147483647:2147483648"
DASH = shutil.which("dash")


@pytest.fixture
def library(tmp_path: Path) -> Path:
    wheel = AgentWheel(
        path=tmp_path / "w.whl", filename="clawnode-0-py3-none-any.whl", version="0", sha256="0"
    )
    script = render_install_script("https://molt.example.com", wheel)
    body, last = script.rstrip("\n").rsplit("\n", 1)
    # Sourcing must define the functions and run nothing: the script's last line is its only
    # top-level command.
    assert last == 'main "$@"'
    path = tmp_path / "install-functions.sh"
    path.write_text(body + "\n")
    return path


def add_subids(library: Path, subuid: Path, subgid: Path) -> subprocess.CompletedProcess[str]:
    assert DASH, "dash is not installed (apt-get install dash): install.sh must run under it"
    return subprocess.run(
        [DASH, "-c", '. "$0" && add_container_subids "$1" "$2"', str(library), str(subuid),
         str(subgid)],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_missing_entry_is_added_to_both_files(library, tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    # A user's range as useradd writes it, the last line without its newline; no subgid at all.
    subuid.write_text("alice:100000:65536\nbob:165536:65536")

    result = add_subids(library, subuid, subgid)

    assert result.returncode == 0, result.stderr
    assert subuid.read_text() == f"alice:100000:65536\nbob:165536:65536\n{RANGE}\n"
    assert subgid.read_text() == f"{RANGE}\n"
    assert subgid.stat().st_mode & 0o777 == 0o644
    assert f"{subuid}: added {RANGE}" in result.stdout
    assert f"{subgid}: added {RANGE}" in result.stdout


def test_an_existing_entry_is_left_alone_and_a_second_run_adds_nothing(library, tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    # The provider's own choice in subuid is kept; subgid gets the entry once.
    subuid.write_text("alice:100000:65536\ncontainers:200000:655360\n")
    subgid.write_text("alice:100000:65536\n")

    first = add_subids(library, subuid, subgid)
    second = add_subids(library, subuid, subgid)

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert subuid.read_text() == "alice:100000:65536\ncontainers:200000:655360\n"
    assert subgid.read_text() == f"alice:100000:65536\n{RANGE}\n"
    assert "have a containers entry" in second.stdout and "added" not in second.stdout


@pytest.mark.parametrize(
    "entry",
    [
        "mallory:2147483000:648",  # ends on the range's first id
        "mallory:4294900000:65535",  # inside it
        "mallory:0:4294967295",  # around it
    ],
)
def test_an_overlapping_range_is_refused_and_nothing_is_written(library, tmp_path, entry):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\n")
    subgid.write_text(f"alice:100000:65536\n{entry}\n")

    result = add_subids(library, subuid, subgid)

    assert result.returncode != 0
    assert f"{subgid} has {entry}, which overlaps {RANGE}" in result.stderr
    assert "containers entry with a free range" in result.stderr
    assert subuid.read_text() == "alice:100000:65536\n"
    assert subgid.read_text() == f"alice:100000:65536\n{entry}\n"


def test_a_range_just_beside_it_is_no_overlap(library, tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    # Ends on the id before the range; the id after it, 4294967295, is "no id" but may be listed.
    subuid.write_text("alice:2147418111:65536\n")
    subgid.write_text("nobody:4294967295:1\n")

    result = add_subids(library, subuid, subgid)

    assert result.returncode == 0, result.stderr
    assert subuid.read_text().endswith(f"\n{RANGE}\n")
    assert subgid.read_text().endswith(f"\n{RANGE}\n")
