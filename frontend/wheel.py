"""The clawnode wheel, built in-process from provider_agent/. No Django here:
scripts/build_agent_wheel.py builds with it without settings, and frontend.install serves and
caches what it builds.

A wheel of a pure-Python package is a zip of its modules plus four metadata files (PEP 427,
core metadata 2.1), and building it in-process takes milliseconds, needs no network (`pip
wheel` with build isolation fetches setuptools>=69 from PyPI, which a gateway may not reach),
no write access to the source tree (setuptools writes build/ and *.egg-info into it; the
image's /app is root's) and no build tool in the gateway's environment. The zip is
reproducible (sorted entries, fixed timestamps and modes), so the same sources give the same
bytes and the same hash on every gateway replica.
"""

from __future__ import annotations

import base64
import csv
import fnmatch
import hashlib
import io
import re
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

WHEEL_TAG = "py3-none-any"
# 1980-01-01, the earliest time a zip entry can carry: every entry gets it, so the bytes of the
# wheel depend on the sources only.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


class AgentBuildError(RuntimeError):
    """provider_agent/ cannot be turned into a wheel (a pyproject this builder does not know)."""


@dataclass(frozen=True)
class AgentProject:
    """What the wheel needs from provider_agent/pyproject.toml."""

    name: str
    version: str
    summary: str
    requires_python: str
    dependencies: tuple[str, ...]
    extras: tuple[tuple[str, tuple[str, ...]], ...]
    scripts: tuple[tuple[str, str], ...]
    package_patterns: tuple[str, ...]
    readme: str | None  # a file name relative to the project

    @property
    def dist_name(self) -> str:
        """The name as wheel file names spell it (PEP 427: runs of -_. become _)."""
        return re.sub(r"[-_.]+", "_", self.name)

    @property
    def wheel_filename(self) -> str:
        return f"{self.dist_name}-{self.version}-{WHEEL_TAG}.whl"


_KNOWN_PROJECT_KEYS = {
    "name",
    "version",
    "description",
    "requires-python",
    "dependencies",
    "optional-dependencies",
    "scripts",
    "readme",
    "license",
    "authors",
    "urls",
    "keywords",
    "classifiers",
}


def read_project(source: Path) -> AgentProject:
    """Parse the agent's pyproject.toml. Anything this builder would silently get wrong
    (dynamic fields, entry points beyond console scripts, a readme table) is refused, so a change to
    the agent's packaging shows up as an error here rather than as a broken install."""
    data = tomllib.loads((source / "pyproject.toml").read_text())
    project = data.get("project", {})
    unknown = set(project) - _KNOWN_PROJECT_KEYS
    if unknown or project.get("dynamic"):
        raise AgentBuildError(
            "provider_agent/pyproject.toml uses [project] keys the gateway's wheel builder "
            f"does not handle: {', '.join(sorted(unknown | set(project.get('dynamic', []))))}"
        )
    readme = project.get("readme")
    if readme is not None and not isinstance(readme, str):
        raise AgentBuildError("provider_agent/pyproject.toml: readme must be a file name")
    find = data.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    return AgentProject(
        name=project["name"],
        version=project["version"],
        summary=project.get("description", ""),
        requires_python=project.get("requires-python", ""),
        dependencies=tuple(project.get("dependencies", ())),
        extras=tuple(
            (extra, tuple(requirements))
            for extra, requirements in sorted(project.get("optional-dependencies", {}).items())
        ),
        scripts=tuple(sorted(project.get("scripts", {}).items())),
        package_patterns=tuple(find.get("include", ("*",))),
        readme=readme,
    )


def _package_files(source: Path, patterns: Iterable[str]) -> list[Path]:
    """Every file of the packages (directories with an __init__.py) whose dotted name matches
    one of `patterns`, as setuptools' find_packages(include=...) selects them."""
    patterns = tuple(patterns)
    files: list[Path] = []
    for init in sorted(source.rglob("__init__.py")):
        package_dir = init.parent
        relative = package_dir.relative_to(source)
        if _SKIP_PARTS & set(relative.parts):
            continue
        dotted = ".".join(relative.parts)
        if not any(fnmatch.fnmatchcase(dotted, pattern) for pattern in patterns):
            continue
        # The package's own modules; subpackages are matched on their own.
        files.extend(
            path
            for path in sorted(package_dir.iterdir())
            if path.is_file() and path.suffix not in {".pyc", ".pyo"}
        )
    return files


def source_digest(source: Path) -> str:
    """SHA-256 over what goes into the wheel (pyproject, readme, package files: names and
    bytes). Caches are keyed by it, so an edited agent gets a new wheel and an unchanged one
    is never rebuilt."""
    project = read_project(source)
    digest = hashlib.sha256()
    paths = [source / "pyproject.toml", *_package_files(source, project.package_patterns)]
    if project.readme:
        paths.append(source / project.readme)
    for path in paths:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _with_extra(requirement: str, extra: str) -> str:
    """`requirement` limited to installs that ask for `extra` (its own marker kept)."""
    spec, _, marker = requirement.partition(";")
    condition = f'extra == "{extra}"'
    if marker.strip():
        condition = f"({marker.strip()}) and {condition}"
    return f"{spec.strip()}; {condition}"


def _metadata(project: AgentProject, source: Path) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project.name}",
        f"Version: {project.version}",
    ]
    if project.summary:
        lines.append(f"Summary: {project.summary}")
    if project.requires_python:
        lines.append(f"Requires-Python: {project.requires_python}")
    lines += [f"Requires-Dist: {requirement}" for requirement in project.dependencies]
    for extra, requirements in project.extras:
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {_with_extra(req, extra)}" for req in requirements]
    text = "\n".join(lines) + "\n"
    if project.readme:
        kind = "text/markdown" if project.readme.endswith(".md") else "text/plain"
        text += f"Description-Content-Type: {kind}\n\n"
        text += (source / project.readme).read_text()
    return text


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_wheel_bytes(source: Path) -> tuple[AgentProject, bytes]:
    """The wheel of the project in `source`, as bytes (deterministic for given sources)."""
    project = read_project(source)
    dist_info = f"{project.dist_name}-{project.version}.dist-info"
    entries: list[tuple[str, bytes]] = [
        (path.relative_to(source).as_posix(), path.read_bytes())
        for path in _package_files(source, project.package_patterns)
    ]
    if not entries:
        raise AgentBuildError(f"no package of {project.name} found in {source}")
    top_level = sorted({name.split("/", 1)[0] for name, _ in entries})
    entries += [
        (f"{dist_info}/METADATA", _metadata(project, source).encode()),
        (
            f"{dist_info}/WHEEL",
            (
                "Wheel-Version: 1.0\n"
                "Generator: molt-gateway (frontend.wheel)\n"
                "Root-Is-Purelib: true\n"
                f"Tag: {WHEEL_TAG}\n"
            ).encode(),
        ),
        (f"{dist_info}/top_level.txt", ("\n".join(top_level) + "\n").encode()),
    ]
    if project.scripts:
        scripts = "".join(f"{name} = {target}\n" for name, target in project.scripts)
        entries.append((f"{dist_info}/entry_points.txt", f"[console_scripts]\n{scripts}".encode()))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in entries:
        writer.writerow([name, _record_hash(data), str(len(data))])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:  # RECORD last, as the wheel spec recommends
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return project, buffer.getvalue()
