"""Static checks of docker/: compose.yaml and the Dockerfiles agree with the repository.

No Docker engine is needed. The checks read docker/compose.yaml with yaml.safe_load and the
Dockerfiles with a small parser, then cross-check them against the files of the repository:

- every compose service has an image or a build; every build's context and Dockerfile exist;
- every ``depends_on`` names a defined service, with conditions the target can meet (a
  ``service_healthy`` target has a healthcheck, a profile-less service does not wait on a service
  that only runs under a profile);
- every named volume a service mounts is declared at the top level;
- every service's effective command (compose entrypoint/command, else the image's ENTRYPOINT/CMD)
  runs something its image provides: ``python manage.py X`` needs manage.py copied into the image
  and X a Django built-in (with its contrib app in the settings) or an app's
  ``management/commands/X.py``; ``celery -A config`` needs config/celery.py defining a Celery app;
  ``uvicorn config.asgi:application`` needs config/asgi.py defining ``application``; a console
  script such as ``clawnode`` needs a pip-installed project whose pyproject declares it, with the
  subcommand and options present in its package; celery and uvicorn must be dependencies of a
  project the image pip-installs;
- every Dockerfile has a FROM first, and every COPY/ADD source exists in the build context (the
  repository root) and is not excluded by .dockerignore; ``manage.py`` commands run at build time
  and the image's default command pass the same command checks;
- the gateway image's HEALTHCHECK path is routed somewhere in the gateway's Python code, and the
  environment variables compose hands the gateway are read somewhere in its Python code.

Each check returns a list of problems naming the service or file; the tests assert it is empty.
The tests at the bottom run the same checks on small synthetic repositories to show that each
check passes on a consistent layout and reports a broken one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_REL = Path("docker") / "compose.yaml"

# Django's own management commands. The contrib ones exist only when their app is installed.
DJANGO_CORE_COMMANDS = frozenset(
    {
        "check",
        "compilemessages",
        "createcachetable",
        "dbshell",
        "diffsettings",
        "dumpdata",
        "flush",
        "inspectdb",
        "loaddata",
        "makemessages",
        "makemigrations",
        "migrate",
        "optimizemigration",
        "runserver",
        "sendtestemail",
        "shell",
        "showmigrations",
        "sqlflush",
        "sqlmigrate",
        "sqlsequencereset",
        "squashmigrations",
        "startapp",
        "startproject",
        "test",
        "testserver",
    }
)
DJANGO_CONTRIB_COMMANDS = {
    "collectstatic": "django.contrib.staticfiles",
    "findstatic": "django.contrib.staticfiles",
    "changepassword": "django.contrib.auth",
    "createsuperuser": "django.contrib.auth",
    "clearsessions": "django.contrib.sessions",
    "remove_stale_contenttypes": "django.contrib.contenttypes",
}

# Executables whose name is the name of the PyPI distribution that ships them.
PIP_EXECUTABLES = frozenset({"celery", "uvicorn", "gunicorn", "daphne"})
# Shell words that may appear in an `sh -c` script without being checked.
SHELL_WORDS = frozenset(
    {"echo", "printf", "set", "test", "[", "true", "false", "sleep", "cd", "export", "exit"}
)
SHELLS = frozenset({"sh", "bash", "dash"})
SKIP_DIRS = frozenset(
    {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", ".tox", ".mypy_cache"}
)
PYTHON_RE = re.compile(r"python(3(\.\d+)?)?\Z")
ENV_ASSIGNMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC_RE = re.compile(r"<<-?\s*([\"']?)([A-Za-z_][A-Za-z0-9_]*)\1")


# --------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    lineno: int
    heredocs: tuple[str, ...] = ()


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: continuations joined, comments dropped, heredocs kept."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:  # parser directives come first, before any instruction or blank line
        directive = re.match(r"#\s*([a-z]+)\s*=\s*(\S+)\s*$", line)
        if not directive:
            break
        if directive.group(1) == "escape":
            escape = directive.group(2)
    instructions: list[Instruction] = []
    i = 0
    while i < len(lines):
        start = i + 1
        line = lines[i].rstrip()
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = []
        while line.endswith(escape):
            parts.append(line[: -len(escape)].strip())
            # Comment lines and blank lines inside a continuation are dropped by Docker.
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                i += 1
            if i >= len(lines):
                line = ""
                break
            line = lines[i].rstrip()
            i += 1
        parts.append(line.strip())
        joined = " ".join(p for p in parts if p)
        keyword, _, args = joined.partition(" ")
        heredocs = []
        if keyword.upper() in {"RUN", "COPY", "ADD"}:
            for marker in HEREDOC_RE.finditer(args):
                body = []
                while i < len(lines) and lines[i].strip() != marker.group(2):
                    body.append(lines[i])
                    i += 1
                i += 1  # the terminator line
                heredocs.append("\n".join(body))
        instructions.append(Instruction(keyword.upper(), args.strip(), start, tuple(heredocs)))
    return instructions


def exec_form(args: str) -> list[str] | None:
    """The JSON (exec) form of an instruction's arguments, or None for the shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def command_argv(args: str) -> list[str]:
    """ENTRYPOINT/CMD arguments as the argv Docker runs."""
    form = exec_form(args)
    return form if form is not None else ["/bin/sh", "-c", args]


def split_shell(script: str) -> list[list[str]]:
    """Simple commands of a shell script, without leading `exec` and VAR=value assignments."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands: list[list[str]] = []
    current: list[str] = []
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: fall back to whitespace
        tokens = script.split()
    for token in tokens:
        if token and set(token) <= set("&|;()<>"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    cleaned = []
    for argv in commands:
        while argv and (argv[0] == "exec" or ENV_ASSIGNMENT_RE.match(argv[0])):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


def normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return normalize_dist(match.group(1)) if match else ""


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over relative paths."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
            continue
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass
class Dockerfile:
    path: Path
    context: Path
    instructions: list[Instruction] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, context: Path) -> Dockerfile:
        return cls(path, context, parse_dockerfile(path.read_text(encoding="utf-8")))

    @property
    def final_stage(self) -> list[Instruction]:
        starts = [n for n, ins in enumerate(self.instructions) if ins.keyword == "FROM"]
        return self.instructions[starts[-1] :] if starts else self.instructions

    def base_images(self) -> list[str]:
        images = []
        for ins in self.instructions:
            if ins.keyword == "FROM":
                words = [w for w in ins.args.split() if not w.startswith("--")]
                if words:
                    images.append(words[0])
        return images

    def last(self, keyword: str) -> Instruction | None:
        found = [ins for ins in self.final_stage if ins.keyword == keyword]
        return found[-1] if found else None

    def entrypoint(self) -> list[str]:
        ins = self.last("ENTRYPOINT")
        return command_argv(ins.args) if ins else []

    def cmd(self) -> list[str]:
        ins = self.last("CMD")
        return command_argv(ins.args) if ins else []

    def copies(self) -> list[tuple[Instruction, list[str]]]:
        """(instruction, sources) of each COPY/ADD that reads from the build context."""
        result = []
        for ins in self.instructions:
            if ins.keyword not in {"COPY", "ADD"}:
                continue
            words = exec_form(ins.args)
            if words is None:
                words = ins.args.split()
            flags = []
            while words and words[0].startswith("--"):
                flags.append(words.pop(0))
            if any(flag.startswith("--from") for flag in flags):
                continue  # copies from another stage or image, not from the context
            sources = [
                s
                for s in words[:-1]
                if not s.startswith("<<") and not re.match(r"[a-z+]+://|git@", s)
            ]
            result.append((ins, sources))
        return result

    def copied_paths(self) -> list[str]:
        """Context-relative paths of every COPY/ADD source ('.' for the whole context)."""
        paths = []
        for _, sources in self.copies():
            for source in sources:
                paths.append(os.path.normpath(source.lstrip("/")) if source.strip("/") else ".")
        return paths

    def copies_path(self, relpath: str) -> bool:
        """Whether some COPY/ADD brings the context-relative path `relpath` into the image."""
        target = Path(relpath)
        for source in self.copied_paths():
            if source == ".":
                return True
            if any(c in source for c in "*?["):
                if any(
                    m.relative_to(self.context) in (target, *target.parents)
                    for m in self.context.glob(source)
                ):
                    return True
            elif Path(source) == target or Path(source) in target.parents:
                return True
        return False

    def shell_commands(self) -> list[tuple[Instruction, list[str]]]:
        """Simple commands of every RUN, with the instruction they come from."""
        result = []
        for ins in self.instructions:
            if ins.keyword != "RUN":
                continue
            form = exec_form(ins.args)
            scripts = [] if form is not None else [ins.args]
            scripts.extend(ins.heredocs)
            if form is not None:
                result.append((ins, form))
            for script in scripts:
                result.extend((ins, argv) for argv in split_shell(script))
        return result

    def pip_install_targets(self) -> list[str]:
        targets = []
        takes_value = {
            "-r",
            "--requirement",
            "-c",
            "--constraint",
            "-i",
            "--index-url",
            "--extra-index-url",
            "-f",
            "--find-links",
            "-t",
            "--target",
            "--prefix",
            "--root",
        }
        for _, argv in self.shell_commands():
            names = [Path(a).name for a in argv]
            if "install" not in argv:
                continue
            pip_at = next((n for n, a in enumerate(names) if re.match(r"pip3?(\.\d+)?\Z", a)), None)
            if pip_at is None or argv.index("install") < pip_at:
                continue
            args = argv[argv.index("install") + 1 :]
            skip = False
            for arg in args:
                if skip:
                    skip = False
                elif arg in takes_value:
                    skip = True
                elif arg == "-e" or arg == "--editable":
                    continue
                elif not arg.startswith("-"):
                    targets.append(arg)
        return targets

    def installed_projects(self) -> tuple[list[Path], set[str]]:
        """Local project dirs (in the context) and PyPI names that RUN pip install installs."""
        projects: list[Path] = []
        registry: set[str] = set()
        for target in self.pip_install_targets():
            bare = re.sub(r"\[.*\]$", "", target)
            if "/" not in bare and not bare.startswith("."):
                registry.add(requirement_name(bare))
                continue
            relative = bare.removeprefix("./").lstrip("/") or "."
            candidates = [self.context / relative]
            candidates += [
                self.context / src
                for src in self.copied_paths()
                if Path(src).name == Path(bare).name
            ]
            for candidate in candidates:
                if (candidate / "pyproject.toml").is_file() and self.copies_path(
                    os.path.relpath(candidate / "pyproject.toml", self.context)
                ):
                    projects.append(candidate.resolve())
                    break
        return projects, registry

    def provides_python(self, name: str) -> bool:
        if any(Path(image).name.startswith("python:") for image in self.base_images()):
            return True
        venv = any("venv" in argv and "-m" in argv for _, argv in self.shell_commands())
        if name == "python":
            return venv
        apt = " ".join(" ".join(argv) for _, argv in self.shell_commands() if "install" in argv)
        return venv or re.search(r"\bpython3\b", apt) is not None


def read_pyproject(project_dir: Path) -> dict[str, Any]:
    path = project_dir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError:
        return {}


def project_dependencies(project_dir: Path) -> set[str]:
    data = read_pyproject(project_dir)
    project = data.get("project", {})
    requirements = list(project.get("dependencies", []))
    if "dependencies" in project.get("dynamic", []):
        dynamic = data.get("tool", {}).get("setuptools", {}).get("dynamic", {})
        files = dynamic.get("dependencies", {}).get("file", [])
        for name in [files] if isinstance(files, str) else files:
            path = project_dir / name
            if path.is_file():
                requirements += [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith(("#", "-"))
                ]
    return {requirement_name(r) for r in requirements} - {""}


def project_scripts(project_dir: Path) -> dict[str, str]:
    return dict(read_pyproject(project_dir).get("project", {}).get("scripts", {}))


def python_files(root: Path, *, include_tests: bool = False) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in SKIP_DIRS
            and not d.startswith(".")
            and (include_tests or d != "tests")
            and not d.endswith(".egg-info")
        ]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found)


def module_file(base: Path, module: str) -> Path | None:
    """The file of a dotted module under `base` (or base/src), if it exists."""
    parts = module.split(".")
    for root in (base, base / "src"):
        for candidate in (
            root.joinpath(*parts).with_suffix(".py"),
            root.joinpath(*parts) / "__init__.py",
        ):
            if candidate.is_file():
                return candidate
    return None


def defines_name(path: Path, name: str) -> bool:
    text = path.read_text(encoding="utf-8")
    pattern = (
        rf"^\s*{re.escape(name)}\s*(:[^=\n]+)?=[^=]"
        rf"|^\s*(async\s+)?def\s+{re.escape(name)}\b"
        rf"|^\s*class\s+{re.escape(name)}\b"
        rf"|\bimport\b.*\b{re.escape(name)}\b"
    )
    return re.search(pattern, text, re.MULTILINE) is not None


# --------------------------------------------------------------------------------------------
# The repository and its compose file


class Project:
    """A repository root holding docker/compose.yaml, with the lookups the checks need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.compose_path = root / COMPOSE_REL
        self.compose_dir = self.compose_path.parent
        self._compose: dict[str, Any] | None = None
        self._dockerfiles: dict[Path, Dockerfile] = {}

    @property
    def compose(self) -> dict[str, Any]:
        if self._compose is None:
            loaded = yaml.safe_load(self.compose_path.read_text(encoding="utf-8"))
            self._compose = loaded if isinstance(loaded, dict) else {}
        return self._compose

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        services = self.compose.get("services") or {}
        return {name: (spec or {}) for name, spec in services.items()}

    def build_of(self, service: str) -> tuple[Path, Path] | None:
        """(context dir, Dockerfile path) of a service's build, resolved as compose does."""
        build = self.services[service].get("build")
        if build is None:
            return None
        if isinstance(build, str):
            build = {"context": build}
        context = (self.compose_dir / build.get("context", ".")).resolve()
        return context, (context / build.get("dockerfile", "Dockerfile")).resolve()

    def dockerfile_of(self, service: str) -> Dockerfile | None:
        build = self.build_of(service)
        if build is None or not build[1].is_file():
            return None
        return self.dockerfile(build[1], build[0])

    def dockerfile(self, path: Path, context: Path) -> Dockerfile:
        if path not in self._dockerfiles:
            self._dockerfiles[path] = Dockerfile.load(path, context)
        return self._dockerfiles[path]

    def dockerfiles(self) -> list[Dockerfile]:
        """Every Dockerfile a service builds, plus any other docker/Dockerfile* (context: root)."""
        found: dict[Path, Dockerfile] = {}
        for name in self.services:
            dockerfile = self.dockerfile_of(name)
            if dockerfile is not None:
                found[dockerfile.path] = dockerfile
        for path in sorted(self.compose_dir.glob("Dockerfile*")):
            if path.resolve() not in found and not path.name.endswith(".dockerignore"):
                found[path.resolve()] = self.dockerfile(path.resolve(), self.root.resolve())
        return list(found.values())

    def label(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def dependency_map(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    depends = spec.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: {"condition": "service_started"} for name in depends}
    return {name: (value or {}) for name, value in depends.items()}


def has_healthcheck(project: Project, service: str) -> bool:
    healthcheck = project.services[service].get("healthcheck")
    if isinstance(healthcheck, dict):
        if healthcheck.get("disable") or healthcheck.get("test") in (["NONE"], "NONE"):
            return False
        if healthcheck.get("test"):
            return True
    dockerfile = project.dockerfile_of(service)
    if dockerfile is None:
        return False
    ins = dockerfile.last("HEALTHCHECK")
    return ins is not None and ins.args.split()[:1] != ["NONE"]


def effective_argv(project: Project, service: str) -> list[str]:
    """What the service's container runs: compose entrypoint/command over the image's."""
    spec = project.services[service]
    dockerfile = project.dockerfile_of(service)

    def as_argv(value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return shlex.split(value)
        return [str(v) for v in value]

    if "entrypoint" in spec:
        # Setting an entrypoint in compose also drops the image's CMD.
        return as_argv(spec["entrypoint"]) + as_argv(spec.get("command"))
    entrypoint = dockerfile.entrypoint() if dockerfile else []
    if "command" in spec:
        return entrypoint + as_argv(spec["command"])
    return entrypoint + (dockerfile.cmd() if dockerfile else [])


# --------------------------------------------------------------------------------------------
# Command checks: does the image provide what a command runs?


def check_argv(project: Project, dockerfile: Dockerfile, argv: list[str], where: str) -> list[str]:
    """Problems with running `argv` in the image built from `dockerfile`."""
    if not argv:
        return [f"{where}: no command at all (neither compose nor the Dockerfile gives one)"]
    exe = Path(argv[0]).name
    if exe in SHELLS and len(argv) >= 3 and argv[1] == "-c":
        problems = []
        for sub in split_shell(argv[2]):
            if Path(sub[0]).name in SHELL_WORDS:
                continue
            problems += check_argv(project, dockerfile, sub, where)
        return problems
    if PYTHON_RE.match(exe):
        if not dockerfile.provides_python(exe):
            return [
                f"{where}: runs {exe!r}, which {project.label(dockerfile.path)} does not install"
            ]
        if len(argv) >= 3 and argv[1] == "-m":
            return check_argv(project, dockerfile, argv[2:], where)
        if len(argv) >= 2 and Path(argv[1]).name == "manage.py":
            return check_manage_py(project, dockerfile, argv[2:], where)
        return [f"{where}: cannot tell what {' '.join(argv)!r} runs (expected manage.py or -m)"]
    projects, registry = dockerfile.installed_projects()
    for project_dir in projects:
        if exe in project_scripts(project_dir):
            return check_console_script(project, project_dir, exe, argv[1:], where)
    if exe in PIP_EXECUTABLES:
        problems = []
        declared = registry.union(*(project_dependencies(p) for p in projects))
        if exe not in declared:
            installed = ", ".join(project.label(p) for p in projects) or "no local project"
            problems.append(
                f"{where}: runs {exe!r} but {project.label(dockerfile.path)} pip-installs "
                f"{installed}, and none declares {exe!r} as a dependency"
            )
        if exe == "celery":
            problems += check_celery(project, dockerfile, argv[1:], where)
        elif exe == "uvicorn":
            problems += check_uvicorn(project, dockerfile, argv[1:], where)
        return problems
    scripts = sorted(s for p in projects for s in project_scripts(p))
    return [
        f"{where}: runs {argv[0]!r}, which {project.label(dockerfile.path)} is not known to "
        f"provide (console scripts it installs: {scripts or 'none'})"
    ]


def check_manage_py(project: Project, dockerfile: Dockerfile, args: list[str], where: str):
    problems = []
    context = dockerfile.context
    if not (context / "manage.py").is_file():
        problems.append(
            f"{where}: runs manage.py but {project.label(context / 'manage.py')} is missing"
        )
    elif not dockerfile.copies_path("manage.py"):
        problems.append(
            f"{where}: runs manage.py but {project.label(dockerfile.path)} never COPYs it"
        )
    if not args or args[0].startswith("-"):
        return [*problems, f"{where}: manage.py is given no management command"]
    command = args[0]
    if command in DJANGO_CORE_COMMANDS:
        return problems
    if command in DJANGO_CONTRIB_COMMANDS:
        app = DJANGO_CONTRIB_COMMANDS[command]
        settings_text = "".join(
            p.read_text(encoding="utf-8") for p in python_files(context / "config")
        )
        if app not in settings_text:
            problems.append(
                f"{where}: manage.py {command} needs {app!r} in INSTALLED_APPS, "
                "but no file under config/ mentions it"
            )
        return problems
    custom = [p for p in python_files(context) if p.parent.parts[-2:] == ("management", "commands")]
    if not any(p.stem == command for p in custom):
        problems.append(
            f"{where}: manage.py {command!r} is neither a Django built-in command nor an app's "
            f"management/commands/{command}.py"
        )
    return problems


def option_value(args: list[str], *names: str) -> str | None:
    for n, arg in enumerate(args):
        for name in names:
            if arg == name and n + 1 < len(args):
                return args[n + 1]
            if arg.startswith(name + "=") and name.startswith("--"):
                return arg.split("=", 1)[1]
            if not name.startswith("--") and arg.startswith(name) and len(arg) > len(name):
                return arg[len(name) :].lstrip("=")
    return None


def check_celery(project: Project, dockerfile: Dockerfile, args: list[str], where: str):
    app = option_value(args, "-A", "--app")
    if app is None:
        return [f"{where}: celery is run without -A/--app, so it cannot find the Celery app"]
    module, _, attribute = app.partition(":")
    context = dockerfile.context
    slashed = module.replace(".", "/")
    package = module_file(context, module)
    if package is None:
        return [f"{where}: celery -A {app}: module {module} does not exist ({slashed}.py)"]
    submodule = module_file(context, module + ".celery")
    files = [f for f in (package, submodule) if f is not None]
    defining = [f for f in files if "Celery(" in f.read_text(encoding="utf-8")]
    if not defining:
        state = "does not exist" if submodule is None else "defines none"
        return [f"{where}: celery -A {app}: no Celery(...) app found; {slashed}/celery.py {state}"]
    problems = []
    if attribute and not any(defines_name(f, attribute) for f in files):
        problems.append(f"{where}: celery -A {app}: {module} defines no {attribute!r}")
    if not dockerfile.copies_path(os.path.relpath(defining[0], context)):
        problems.append(
            f"{where}: {project.label(dockerfile.path)} never COPYs {project.label(defining[0])}"
        )
    subcommands = [a for a in args if not a.startswith("-") and a != app]
    known = {"worker", "beat", "flower", "events", "inspect", "status", "call", "shell"}
    if not subcommands or subcommands[0] not in known:
        problems.append(f"{where}: celery has no known subcommand (one of {sorted(known)})")
    return problems


def check_uvicorn(project: Project, dockerfile: Dockerfile, args: list[str], where: str):
    # The application is the positional "module:attribute" argument.
    specs = [a for a in args if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", a)]
    if not specs:
        return [f"{where}: uvicorn is given no 'module:attribute' application"]
    positional = specs
    module, attribute = positional[0].split(":", 1)
    path = module_file(dockerfile.context, module)
    if path is None:
        return [f"{where}: uvicorn {positional[0]}: {module.replace('.', '/')}.py does not exist"]
    problems = []
    if not defines_name(path, attribute):
        problems.append(
            f"{where}: uvicorn {positional[0]}: {project.label(path)} defines no {attribute!r}"
        )
    if not dockerfile.copies_path(os.path.relpath(path, dockerfile.context)):
        problems.append(
            f"{where}: {project.label(dockerfile.path)} never COPYs {project.label(path)}"
        )
    return problems


def check_console_script(
    project: Project, project_dir: Path, script: str, args: list[str], where: str
) -> list[str]:
    """A console script of a local project: its target exists; its subcommand and options too."""
    target = project_scripts(project_dir)[script]
    module, _, attribute = target.partition(":")
    path = module_file(project_dir, module.strip())
    pyproject = project.label(project_dir / "pyproject.toml")
    if path is None:
        return [f"{where}: {pyproject} maps {script!r} to {target!r}, whose module does not exist"]
    problems = []
    attribute = attribute.split(".")[0].strip()
    if attribute and not defines_name(path, attribute):
        problems.append(
            f"{where}: {project.label(path)} defines no {attribute!r} ({script} entry point)"
        )
    package_dir = path.parent
    while (package_dir.parent / "__init__.py").is_file():
        package_dir = package_dir.parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in python_files(package_dir))
    words = [a for a in args if not a.startswith("-")]
    if words:
        sub = words[0]
        sub_re = rf"""["']{re.escape(sub)}["']|\bdef\s+{re.escape(sub)}\s*\("""
        if not re.search(sub_re, source):
            problems.append(
                f"{where}: {script} {sub!r}: no such subcommand found in "
                f"{project.label(package_dir)}"
            )
    for option in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        snake = option[2:].replace("-", "_")
        if option not in source and not re.search(rf"\b{re.escape(snake)}\b", source):
            problems.append(
                f"{where}: {script} option {option!r} is not found in {project.label(package_dir)}"
            )
    return problems


# --------------------------------------------------------------------------------------------
# The checks, one per test


def check_has_image_or_build(project: Project, service: str) -> list[str]:
    spec = project.services[service]
    if not spec.get("image") and not spec.get("build"):
        return [f"service {service!r}: has neither 'image' nor 'build'"]
    return []


def check_build_paths(project: Project, service: str) -> list[str]:
    build = project.build_of(service)
    if build is None:
        return []
    context, dockerfile = build
    if not context.is_dir():
        return [f"service {service!r}: build context {project.label(context)} is not a directory"]
    if not dockerfile.is_file():
        return [f"service {service!r}: Dockerfile {project.label(dockerfile)} does not exist"]
    return []


def check_depends_on(project: Project, service: str) -> list[str]:
    problems = []
    services = project.services
    own_profiles = set(services[service].get("profiles") or [])
    for target, options in dependency_map(services[service]).items():
        if target not in services:
            problems.append(f"service {service!r}: depends_on {target!r}, which is not a service")
            continue
        condition = options.get("condition", "service_started")
        if condition not in {
            "service_started",
            "service_healthy",
            "service_completed_successfully",
        }:
            problems.append(
                f"service {service!r}: depends_on {target!r} with bad condition {condition!r}"
            )
        if condition == "service_healthy" and not has_healthcheck(project, target):
            problems.append(
                f"service {service!r}: waits for {target!r} to be healthy, but {target!r} "
                "has no healthcheck"
            )
        restart = str(services[target].get("restart", "no"))
        if condition == "service_completed_successfully" and restart in {
            "always",
            "unless-stopped",
        }:
            problems.append(
                f"service {service!r}: waits for {target!r} to complete, but {target!r} "
                f"has restart: {restart}"
            )
        target_profiles = set(services[target].get("profiles") or [])
        if target_profiles and not (own_profiles and own_profiles <= target_profiles):
            problems.append(
                f"service {service!r}: depends_on {target!r}, which only runs under profiles "
                f"{sorted(target_profiles)}"
            )
    return problems


def check_named_volumes(project: Project, service: str) -> list[str]:
    declared = set((project.compose.get("volumes") or {}).keys())
    problems = []
    for entry in project.services[service].get("volumes") or []:
        if isinstance(entry, dict):
            source = entry.get("source") if entry.get("type", "volume") == "volume" else None
        else:
            parts = str(entry).split(":")
            source = parts[0] if len(parts) > 1 else None
        if not source or "/" in source or source.startswith((".", "~", "$")):
            continue  # anonymous volume or bind mount
        if source not in declared:
            problems.append(
                f"service {service!r}: mounts named volume {source!r}, which is not declared "
                "under top-level 'volumes'"
            )
    return problems


def check_service_command(project: Project, service: str) -> list[str]:
    dockerfile = project.dockerfile_of(service)
    if dockerfile is None:
        # An upstream image (postgres, redis) provides its own command; nothing local to check.
        return []
    return check_argv(project, dockerfile, effective_argv(project, service), f"service {service!r}")


def check_dockerfile_structure(project: Project, dockerfile: Dockerfile) -> list[str]:
    label = project.label(dockerfile.path)
    keywords = [ins.keyword for ins in dockerfile.instructions]
    if "FROM" not in keywords:
        return [f"{label}: has no FROM"]
    before = keywords[: keywords.index("FROM")]
    if any(k != "ARG" for k in before):
        return [f"{label}: {before[0]} comes before the first FROM"]
    return []


def dockerignore_rules(dockerfile: Dockerfile) -> list[tuple[bool, re.Pattern[str]]]:
    specific = dockerfile.path.with_name(dockerfile.path.name + ".dockerignore")
    path = specific if specific.is_file() else dockerfile.context / ".dockerignore"
    if not path.is_file():
        return []
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negate, ignore_regex(pattern)))
    return rules


def is_ignored(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    candidates = [relpath, *(str(p) for p in Path(relpath).parents if str(p) != ".")]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def check_copy_sources(project: Project, dockerfile: Dockerfile) -> list[str]:
    label = project.label(dockerfile.path)
    context = dockerfile.context
    rules = dockerignore_rules(dockerfile)
    problems = []
    for ins, sources in dockerfile.copies():
        matched = 0
        reported = len(problems)
        for source in sources:
            relative = os.path.normpath(source.lstrip("/")) if source.strip("/") else "."
            if relative.startswith(".."):
                problems.append(
                    f"{label}:{ins.lineno}: {ins.keyword} {source!r} is outside the context"
                )
                continue
            if "$" in relative:
                problems.append(f"{label}:{ins.lineno}: cannot check variable source {source!r}")
                continue
            if any(c in relative for c in "*?["):
                hits = [
                    m
                    for m in context.glob(relative)
                    if not is_ignored(rules, str(m.relative_to(context)))
                ]
                matched += len(hits)
                continue
            if not (context / relative).exists():
                problems.append(
                    f"{label}:{ins.lineno}: {ins.keyword} source {source!r} does not exist in the "
                    f"build context ({project.label(context / relative)})"
                )
            elif relative != "." and is_ignored(rules, relative):
                problems.append(
                    f"{label}:{ins.lineno}: {ins.keyword} source {source!r} is excluded by "
                    ".dockerignore"
                )
            else:
                matched += 1
        if sources and not matched and len(problems) == reported:
            problems.append(f"{label}:{ins.lineno}: {ins.keyword} {ins.args!r} matches no file")
    return problems


def check_build_time_commands(project: Project, dockerfile: Dockerfile) -> list[str]:
    """`python manage.py X` run by RUN at build time is a command the image can run."""
    problems = []
    for ins, argv in dockerfile.shell_commands():
        if PYTHON_RE.match(Path(argv[0]).name) and "manage.py" in argv[1:2]:
            where = f"{project.label(dockerfile.path)}:{ins.lineno}"
            problems += check_argv(project, dockerfile, argv, where)
    return problems


def check_default_command(project: Project, dockerfile: Dockerfile) -> list[str]:
    argv = dockerfile.entrypoint() + dockerfile.cmd()
    if not argv:
        return []  # the base image's default; compose services give their own command
    return check_argv(
        project, dockerfile, argv, f"{project.label(dockerfile.path)} default command"
    )


def check_healthcheck_route(project: Project, dockerfile: Dockerfile) -> list[str]:
    ins = dockerfile.last("HEALTHCHECK")
    if ins is None or ins.args.split()[:1] == ["NONE"]:
        return []
    label = project.label(dockerfile.path)
    match = re.search(r"https?://[^/\s'\"]+/([^\s'\"?#]*)", ins.args)
    if not match:
        return []
    route = match.group(1)
    if not route:
        return []
    # Only URLconf modules count: a mention elsewhere (SECURE_REDIRECT_EXEMPT) routes nothing.
    urlconfs = [
        p
        for p in python_files(dockerfile.context)
        if p.name == "urls.py" or p.parent.name == "urls"
    ]
    quoted = re.compile(rf"""["'][^"'\n]*{re.escape(route)}""")
    if not any(quoted.search(p.read_text(encoding="utf-8")) for p in urlconfs):
        return [
            f"{label}: HEALTHCHECK requests /{route} but no urls.py in the build context "
            f"routes {route!r} (e.g. path({route!r}, ...))"
        ]
    return []


def check_environment_is_read(project: Project, service: str) -> list[str]:
    dockerfile = project.dockerfile_of(service)
    environment = project.services[service].get("environment") or {}
    if dockerfile is None or not environment:
        return []
    if isinstance(environment, list):
        names = [str(e).split("=", 1)[0] for e in environment]
    else:
        names = list(environment)
    source = "\n".join(p.read_text(encoding="utf-8") for p in python_files(dockerfile.context))
    return [
        f"service {service!r}: sets {name}, which no Python file of the image's project reads"
        for name in names
        if not re.search(rf"""["']{re.escape(name)}["']""", source)
    ]


# --------------------------------------------------------------------------------------------
# Tests on this repository


def _service_names() -> list[str]:
    try:
        return sorted(Project(REPO_ROOT).services)
    except (OSError, yaml.YAMLError):
        return []


def _dockerfile_names() -> list[str]:
    try:
        return [Project(REPO_ROOT).label(d.path) for d in Project(REPO_ROOT).dockerfiles()]
    except (OSError, yaml.YAMLError):
        return []


SERVICES = _service_names()
DOCKERFILES = _dockerfile_names()


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(REPO_ROOT)


def _dockerfile(project: Project, label: str) -> Dockerfile:
    return next(d for d in project.dockerfiles() if project.label(d.path) == label)


def test_compose_parses_and_has_the_gateway_services(project: Project) -> None:
    assert project.compose_path.is_file(), f"{COMPOSE_REL} is missing"
    missing = {"postgres", "redis", "migrate", "web", "worker", "beat", "agent"} - set(
        project.services
    )
    assert not missing, f"{COMPOSE_REL}: services missing: {sorted(missing)}"
    assert DOCKERFILES, "no Dockerfile found under docker/"


@pytest.mark.parametrize("service", SERVICES)
def test_service_has_image_or_build(project: Project, service: str) -> None:
    assert check_has_image_or_build(project, service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_build_paths_exist(project: Project, service: str) -> None:
    assert check_build_paths(project, service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_depends_on_defined_services(project: Project, service: str) -> None:
    assert check_depends_on(project, service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_named_volumes_are_declared(project: Project, service: str) -> None:
    assert check_named_volumes(project, service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_command_is_provided_by_its_image(project: Project, service: str) -> None:
    assert check_service_command(project, service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_environment_is_read_by_the_project(project: Project, service: str) -> None:
    assert check_environment_is_read(project, service) == []


@pytest.mark.parametrize("label", DOCKERFILES)
def test_dockerfile_starts_with_from(project: Project, label: str) -> None:
    assert check_dockerfile_structure(project, _dockerfile(project, label)) == []


@pytest.mark.parametrize("label", DOCKERFILES)
def test_dockerfile_copy_sources_exist(project: Project, label: str) -> None:
    assert check_copy_sources(project, _dockerfile(project, label)) == []


@pytest.mark.parametrize("label", DOCKERFILES)
def test_dockerfile_build_time_commands(project: Project, label: str) -> None:
    assert check_build_time_commands(project, _dockerfile(project, label)) == []


@pytest.mark.parametrize("label", DOCKERFILES)
def test_dockerfile_default_command_is_provided(project: Project, label: str) -> None:
    assert check_default_command(project, _dockerfile(project, label)) == []


@pytest.mark.parametrize("label", DOCKERFILES)
def test_dockerfile_healthcheck_route_exists(project: Project, label: str) -> None:
    assert check_healthcheck_route(project, _dockerfile(project, label)) == []


def test_gateway_image_runs_as_non_root_and_checks_health(project: Project) -> None:
    gateway = _dockerfile(project, "docker/Dockerfile.gateway")
    user = gateway.last("USER")
    assert user is not None and user.args.split(":")[0] not in {"root", "0"}, (
        "docker/Dockerfile.gateway: the final stage must switch to a non-root USER"
    )
    healthcheck = gateway.last("HEALTHCHECK")
    assert healthcheck is not None and "/healthz/" in healthcheck.args, (
        "docker/Dockerfile.gateway: HEALTHCHECK must request /healthz/"
    )
    assert "curl" not in healthcheck.args, "docker/Dockerfile.gateway: slim image has no curl"


def test_agent_service_has_network_privileges(project: Project) -> None:
    agent = project.services.get("agent", {})
    assert "NET_ADMIN" in (agent.get("cap_add") or []), "service 'agent': needs cap_add NET_ADMIN"
    devices = [str(d).split(":")[0] for d in agent.get("devices") or []]
    assert "/dev/net/tun" in devices, "service 'agent': needs device /dev/net/tun"
    assert agent.get("network_mode") == "host", "service 'agent': needs network_mode host"
    assert "agent" in (agent.get("profiles") or []), "service 'agent': must be under profile agent"


# --------------------------------------------------------------------------------------------
# The checks themselves, on synthetic repositories: they pass a consistent one, report a broken one

GOOD_COMPOSE = """
x-env: &env
  SECRET_KEY: ${SECRET_KEY:?set SECRET_KEY}
  DATABASE_URL: postgres://molt:molt@db:5432/molt
x-app: &app
  build: {context: .., dockerfile: docker/Dockerfile.app}
  environment: *env
  volumes: [state:/var/lib/molt]
services:
  db:
    image: postgres:15
    healthcheck: {test: [CMD, pg_isready]}
    volumes: [pgdata:/var/lib/postgresql/data]
  migrate:
    <<: *app
    command: python manage.py migrate --noinput
    depends_on: {db: {condition: service_healthy}}
  web:
    <<: *app
    depends_on:
      migrate: {condition: service_completed_successfully}
      db: {condition: service_healthy}
  worker:
    <<: *app
    command: ["celery", "-A", "config", "worker", "-l", "info"]
    depends_on: [db]
  tool:
    profiles: [tool]
    build: {context: .., dockerfile: docker/Dockerfile.tool}
    volumes: [./local:/data, /abs:/abs]
volumes:
  pgdata:
  state:
"""

GOOD_APP_DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM python:3.11-slim-bookworm
WORKDIR /app
COPY tool/ tool/
COPY pyproject.toml README.m[d] manage.py ./
COPY config/ \\
    config/
RUN pip install ./tool . \\
    && SECRET_KEY=x python manage.py collectstatic --noinput
USER app
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz/')"]
CMD ["uvicorn", "config.asgi:application", "--host", "0.0.0.0"]
"""

GOOD_TOOL_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y python3 python3-venv
RUN python3 -m venv /opt/venv
COPY tool/ /src/tool/
RUN /opt/venv/bin/pip install /src/tool
ENTRYPOINT ["tool"]
CMD ["run", "--state-dir", "/var/lib/tool"]
"""

GOOD_FILES = {
    "manage.py": "import sys\n",
    "pyproject.toml": '[project]\nname = "app"\n'
    'dependencies = ["Django==5.2", "celery[redis]==5.4", "uvicorn[standard]==0.30"]\n',
    "config/__init__.py": "",
    "config/settings.py": 'import os\nINSTALLED_APPS = ["django.contrib.staticfiles"]\n'
    'SECRET_KEY = os.environ["SECRET_KEY"]\nDB = os.environ.get("DATABASE_URL")\n',
    "config/asgi.py": "from django.core.asgi import get_asgi_application\n"
    "application = get_asgi_application()\n",
    "config/celery.py": 'from celery import Celery\napp = Celery("config")\n',
    "config/urls.py": 'urlpatterns = [path("healthz/", healthz)]\n',
    "tool/pyproject.toml": '[project]\nname = "tool"\n[project.scripts]\ntool = "tool.cli:main"\n',
    "tool/tool/__init__.py": "",
    "tool/tool/cli.py": 'def main():\n    sub.add_parser("run").add_argument("--state-dir")\n',
}


def make_repo(root: Path, compose: str, dockerfiles: dict[str, str], files: dict[str, str]):
    for name, text in {**files, "docker/compose.yaml": compose, **dockerfiles}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Project(root)


def all_problems(project: Project) -> list[str]:
    problems: list[str] = []
    for service in project.services:
        for check in (
            check_has_image_or_build,
            check_build_paths,
            check_depends_on,
            check_named_volumes,
            check_service_command,
            check_environment_is_read,
        ):
            problems += check(project, service)
    for dockerfile in project.dockerfiles():
        for check in (
            check_dockerfile_structure,
            check_copy_sources,
            check_build_time_commands,
            check_default_command,
            check_healthcheck_route,
        ):
            problems += check(project, dockerfile)
    return problems


@pytest.fixture
def good_dockerfiles() -> dict[str, str]:
    return {
        "docker/Dockerfile.app": GOOD_APP_DOCKERFILE,
        "docker/Dockerfile.tool": GOOD_TOOL_DOCKERFILE,
    }


def test_checks_pass_a_consistent_repository(tmp_path: Path, good_dockerfiles) -> None:
    project = make_repo(tmp_path, GOOD_COMPOSE, good_dockerfiles, GOOD_FILES)
    assert all_problems(project) == []
    assert effective_argv(project, "tool") == ["tool", "run", "--state-dir", "/var/lib/tool"]
    assert effective_argv(project, "web")[:2] == ["uvicorn", "config.asgi:application"]


def test_checks_report_a_broken_compose_file(tmp_path: Path, good_dockerfiles) -> None:
    compose = GOOD_COMPOSE.replace("image: postgres:15", "restart: always").replace(
        "depends_on: [db]", "depends_on: [cache]"
    )
    compose = compose.replace("pgdata:/var/lib", "pgdta:/var/lib")
    compose = compose.replace("docker/Dockerfile.tool", "docker/Dockerfile.missing")
    compose = compose.replace(
        "    profiles: [tool]\n", "    profiles: [tool]\n    depends_on: [db]\n"
    )
    compose = compose.replace(
        "  worker:\n", "  sidecar:\n    depends_on: [tool]\n    image: x\n  worker:\n"
    )
    project = make_repo(tmp_path, compose, good_dockerfiles, GOOD_FILES)
    problems = "\n".join(all_problems(project))
    for expected in (
        "service 'db': has neither 'image' nor 'build'",
        "service 'tool': Dockerfile docker/Dockerfile.missing does not exist",
        "service 'worker': depends_on 'cache', which is not a service",
        "service 'db': mounts named volume 'pgdta'",
        "service 'sidecar': depends_on 'tool', which only runs under profiles ['tool']",
    ):
        assert expected in problems
    compose = GOOD_COMPOSE.replace("healthcheck: {test: [CMD, pg_isready]}", "restart: always")
    compose = compose.replace(
        "migrate:\n    <<: *app\n", "migrate:\n    <<: *app\n    restart: always\n"
    )
    problems = "\n".join(all_problems(make_repo(tmp_path, compose, good_dockerfiles, GOOD_FILES)))
    assert (
        "service 'migrate': waits for 'db' to be healthy, but 'db' has no healthcheck" in problems
    )
    assert "service 'web': waits for 'migrate' to complete, but 'migrate' has restart" in problems


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("python manage.py nosuchcommand", "'nosuchcommand' is neither a Django built-in"),
        ("python manage.py", "manage.py is given no management command"),
        ("celery worker", "without -A/--app"),
        ("celery -A nomodule worker", "celery -A nomodule: module nomodule does not exist"),
        ("celery -A config frobnicate", "celery has no known subcommand"),
        ("uvicorn config.asgi:app", "config/asgi.py defines no 'app'"),
        ("uvicorn config.web:application", "config/web.py does not exist"),
        ("gunicorn config.wsgi", "none declares 'gunicorn' as a dependency"),
        ("nginx -g 'daemon off;'", "runs 'nginx', which docker/Dockerfile.app is not known"),
        ("sh -c 'python manage.py migrate && exec celery beat'", "without -A/--app"),
    ],
)
def test_checks_report_a_command_the_image_lacks(
    tmp_path: Path, good_dockerfiles, command: str, expected: str
) -> None:
    compose = GOOD_COMPOSE.replace(
        'command: ["celery", "-A", "config", "worker", "-l", "info"]', f"command: {command}"
    )
    project = make_repo(tmp_path, compose, good_dockerfiles, GOOD_FILES)
    problems = check_service_command(project, "worker")
    assert any(expected in p and "service 'worker'" in p for p in problems), problems


def test_checks_report_missing_project_files(tmp_path: Path, good_dockerfiles) -> None:
    files = {
        k: v
        for k, v in GOOD_FILES.items()
        if k not in {"manage.py", "config/celery.py", "config/urls.py"}
    }
    files["config/settings.py"] = (
        'import os\nSECRET_KEY = os.environ["SECRET_KEY"]\n'
        'SECURE_REDIRECT_EXEMPT = [r"^healthz/$"]\n'
    )
    files["tool/tool/cli.py"] = "def main():\n    pass\n"
    project = make_repo(tmp_path, GOOD_COMPOSE, good_dockerfiles, files)
    problems = "\n".join(all_problems(project))
    for expected in (
        "service 'migrate': runs manage.py but manage.py is missing",
        "docker/Dockerfile.app:5: COPY source 'manage.py' does not exist",
        "service 'worker': celery -A config: no Celery(...) app found; config/celery.py does not",
        "service 'tool': tool 'run': no such subcommand found in tool/tool",
        "service 'tool': tool option '--state-dir' is not found in tool/tool",
        "docker/Dockerfile.app:8: manage.py collectstatic needs 'django.contrib.staticfiles'",
        "docker/Dockerfile.app: HEALTHCHECK requests /healthz/ but no urls.py in the build",
        "service 'web': sets DATABASE_URL, which no Python file of the image's project reads",
    ):
        assert expected in problems


def test_checks_report_a_broken_dockerfile(tmp_path: Path, good_dockerfiles) -> None:
    broken = GOOD_APP_DOCKERFILE.replace("FROM python:3.11-slim-bookworm\n", "")
    broken = broken.replace("COPY tool/ tool/", "COPY tool/ nosuchdir/ tool/")
    project = make_repo(
        tmp_path,
        GOOD_COMPOSE,
        {**good_dockerfiles, "docker/Dockerfile.app": broken},
        {**GOOD_FILES, ".dockerignore": "*.md\nconfig\n!config/keep\n"},
    )
    problems = "\n".join(all_problems(project))
    assert "docker/Dockerfile.app: has no FROM" in problems
    assert "COPY source 'nosuchdir/' does not exist in the build context" in problems
    assert "COPY source 'config/' is excluded by .dockerignore" in problems
    assert "runs 'python', which docker/Dockerfile.app does not install" in problems


def test_dockerfile_parser_handles_continuations_comments_and_heredocs() -> None:
    instructions = parse_dockerfile(
        "# escape=\\\nFROM a AS b\nRUN one \\\n# comment inside\n    two\n"
        "RUN <<EOF\nset -e\npython manage.py check\nEOF\nCOPY --from=b /x /y\nCMD echo hi\n"
    )
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "RUN", "COPY", "CMD"]
    assert instructions[1].args == "one two"
    assert instructions[2].heredocs == ("set -e\npython manage.py check",)
    assert command_argv(instructions[4].args) == ["/bin/sh", "-c", "echo hi"]
    assert split_shell("A=1 exec python x && b; c | d") == [["python", "x"], ["b"], ["c"], ["d"]]
    assert is_ignored([(False, ignore_regex("**/__pycache__"))], "a/b/__pycache__/x.pyc")
