"""`make mutate`: mutation testing of the critical modules, with mutmut.

    scripts/mutate.py [MODULE ...]      run the named modules (default: all), then report
    scripts/mutate.py --report [MODULE ...]   report the last run again, without running
    scripts/mutate.py MODULE --only NAME [--only NAME]   run only these functions' mutants
        (a function's name or Class.method; the rest of the module keeps its last verdicts)

The modules, what each mutates and which tests run against it are the one list in pyproject.toml,
[tool.molt-mutate]. For each module mutmut mutates the named files or functions and runs the tests
that call each mutated function (mutmut's per-function selection). Then this prints, per module,
how many mutants were killed, survived or timed out, the score, and every surviving mutant with
its file, line and diff. Mutants listed in tests/mutation/equivalent.txt (with the reason they
cannot be told apart from the original) are left out of the score.

Why a workspace per module (var/mutate/MODULE/): mutmut names a mutant after the file's path and
tells which function is under test by the module name the tests import it under; the agent's
package is imported as `clawnode`, not `provider_agent.clawnode`, so the workspace lays the
packages out as they are imported (symlinks to the working tree), and mutmut copies that into the
workspace's mutants/. One workspace per module also keeps each module's cache of which tests call
what (a rerun of one module does not start the others over).

The tests run on SQLite (in memory, as pytest-django makes it) with MOLT_PROPERTY_EXAMPLES small;
`make test` is untouched by any of this.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "var" / "mutate"
VENV_BIN = Path(sys.executable).parent

# Where a repository path is imported from: the agent's package is installed as `clawnode`.
IMPORT_ROOTS = {"provider_agent/clawnode": "clawnode"}
# Packages copied into every workspace: Django needs all the gateway's apps to start, and the
# tests import the agent. Only the files a module names are mutated.
PACKAGES = {
    "config": "config",
    "meshnet": "meshnet",
    "marketplace": "marketplace",
    "frontend": "frontend",
    "clawnode": "provider_agent/clawnode",
}


@dataclass
class Target:
    repo_path: str  # e.g. marketplace/settlement.py
    function: str | None  # None: the whole file; "name" or "Class.method"

    @property
    def work_path(self) -> str:
        for repo_root, work_root in IMPORT_ROOTS.items():
            if self.repo_path.startswith(repo_root + "/"):
                return work_root + self.repo_path[len(repo_root) :]
        return self.repo_path

    @property
    def module(self) -> str:
        return self.work_path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")

    @property
    def pattern(self) -> str:
        """mutmut's name pattern for this target's mutants."""
        if self.function is None:
            return f"{self.module}.*"
        if "." in self.function:
            cls, method = self.function.split(".", 1)
            return f"{self.module}.xǁ{cls}ǁ{method}__mutmut_*"
        return f"{self.module}.x_{self.function}__mutmut_*"

    def matches(self, key: str) -> bool:
        if self.function is None:
            return key.startswith(self.module + ".x")
        return key.startswith(self.pattern.removesuffix("*"))


@dataclass
class Module:
    name: str
    targets: list[Target]
    tests: list[str]
    deselect: list[str]
    # mutmut's process_isolation: "fork" (default) forks each mutant's worker from the process
    # that ran the tests once; "forkserver" forks them from a clean server, for tests that leave
    # threads behind (a worker forked while another thread holds a lock waits forever, and
    # mutmut's CPU-time limit never fires on a process that sleeps).
    isolation: str = "fork"


@dataclass
class Result:
    key: str
    status: str
    target: Target


@dataclass
class Report:
    module: Module
    results: list[Result] = field(default_factory=list)
    seconds: float | None = None


def load_config() -> tuple[dict[str, Module], dict[str, str], int]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["molt-mutate"]
    modules = {}
    for name, spec in data["modules"].items():
        targets = []
        for entry in spec["mutate"]:
            path, _, function = entry.partition("::")
            if not (REPO / path).is_file():
                raise SystemExit(f"[tool.molt-mutate] {name}: no file {path} (did it move?)")
            targets.append(Target(path, function or None))
        modules[name] = Module(
            name,
            targets,
            list(spec["tests"]),
            list(data.get("deselect", [])),
            spec.get("isolation", "fork"),
        )
    equivalent = {}
    for line in (REPO / data["equivalent"]).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, why = line.partition(" ")
        if not why.strip():
            raise SystemExit(f"{data['equivalent']}: {key} has no reason written beside it")
        equivalent[key] = why.strip()
    return modules, equivalent, int(data.get("property_examples", 10))


def mutmut_section(module: Module) -> str:
    files = sorted({t.work_path for t in module.targets})

    def toml_list(items: list[str]) -> str:
        return json.dumps(items)  # a JSON list of strings is a TOML array

    selection = [
        *module.tests,
        *(f"--deselect={node}" for node in module.deselect),
        "-m",
        "(unit or db or property) and not postgres",
        "-p",
        "no:cacheprovider",
    ]
    return (
        "\n\n# Written by scripts/mutate.py for this workspace: edit [tool.molt-mutate] instead.\n"
        "[tool.mutmut]\n"
        f"source_paths = {toml_list(sorted(PACKAGES))}\n"
        f"only_mutate = {toml_list(files)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(selection)}\n"
        # The project's own options (-ra, --strict-markers) come from [tool.pytest.ini_options].
        'pytest_add_cli_args = ["-p", "no:warnings"]\n'
        # A change to the tests must rerun the stats of which tests call what.
        'on_dependency_change = "rerun"\n'
        # ...but not a change to the list of equivalent mutants, which only this script reads.
        'cache_invalidation_exclude = ["tests/mutation/*"]\n'
        # mutmut stops a mutant's run after (tests' time + constant) * multiplier seconds of wall
        # clock. Each run starts a pytest session and migrates a fresh SQLite database first,
        # which the tests' time leaves out, and on a shared machine at nice 19 that takes long:
        # with mutmut's default (1 s) every db mutant "timed out" before its first test ran.
        "timeout_constant = 30.0\n"
        f'process_isolation = "{module.isolation}"\n'
    )


def prepare_workspace(module: Module) -> Path:
    ws = WORK / module.name
    ws.mkdir(parents=True, exist_ok=True)
    for name, repo_path in {**PACKAGES, "tests": "tests"}.items():
        link = ws / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / repo_path, target_is_directory=True)
    pyproject = (REPO / "pyproject.toml").read_text() + mutmut_section(module)
    (ws / "pyproject.toml").write_text(pyproject)
    return ws


def patterns_of(module: Module, only: list[str] | None) -> list[str]:
    """mutmut's name patterns for the module, or for the functions of it named in `only`."""
    if not only:
        return [t.pattern for t in module.targets]
    patterns = [
        Target(t.repo_path, name).pattern
        for t in module.targets
        for name in only
        if t.function in (None, name)
    ]
    if not patterns:
        raise SystemExit(f"{module.name}: --only {', '.join(only)} names none of its functions")
    return patterns


def run_module(module: Module, jobs: int, examples: int, only: list[str] | None = None) -> float:
    ws = prepare_workspace(module)
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        # Tests get pytest-django's in-memory SQLite; this file is only the settings' default.
        "DATABASE_URL": f"sqlite:///{ws / 'molt.sqlite3'}",
        "MOLT_PROPERTY_EXAMPLES": str(examples),
        "PYTHONUNBUFFERED": "1",
    }
    log = ws / "mutmut.log"
    patterns = patterns_of(module, only)
    started = time.monotonic()
    print(f"--- {module.name}: mutmut run ({log.relative_to(REPO)})", flush=True)
    with log.open("w") as out:
        code = subprocess.call(
            [str(VENV_BIN / "mutmut"), "run", "--max-children", str(jobs), *patterns],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seconds = time.monotonic() - started
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"{module.name}: mutmut run failed (exit {code}); log: {log}")
    return seconds


def collect(module: Module) -> list[Result]:
    """The verdicts of the last run, read from mutmut's files in the workspace."""
    ws = WORK / module.name
    results = []
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.stats import status_by_exit_code

        for path in sorted({t.work_path for t in module.targets}):
            data = SourceFileMutationData(path=path)
            data.load()
            for key, code in data.exit_code_by_key.items():
                target = next((t for t in module.targets if t.matches(key)), None)
                if target is not None:
                    results.append(Result(key, status_by_exit_code[code], target))
    finally:
        os.chdir(cwd)
    return results


def diff_of(module: Module, result: Result) -> str:
    cwd = os.getcwd()
    os.chdir(WORK / module.name)
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return get_diff_for_mutant(result.key, path=result.target.work_path)
    finally:
        os.chdir(cwd)


def line_of(result: Result, diff: str) -> int | None:
    """The line in the working tree's file that the mutant changes."""
    removed = next(
        (ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")),
        None,
    )
    if removed is None:
        return None
    source = (REPO / result.target.repo_path).read_text()
    lines = source.splitlines()
    name = result.key.rpartition(".")[2].partition("__mutmut_")[0]
    if "ǁ" in name:  # a method: xǁClassǁname
        _, cls, function = name.split("ǁ")
    else:
        cls, function = None, name.removeprefix("x_")
    scope: ast.AST = ast.parse(source)
    if cls is not None:
        scope = next(
            (n for n in ast.walk(scope) if isinstance(n, ast.ClassDef) and n.name == cls), scope
        )
    span = (1, len(lines))
    for node in ast.walk(scope):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
            span = (node.lineno, node.end_lineno or node.lineno)
            break
    for number in range(span[0], span[1] + 1):
        if lines[number - 1] == removed:
            return number
    return span[0]


def print_report(reports: list[Report], equivalent: dict[str, str]) -> None:
    print()
    header = f"{'module':<11} {'mutants':>7} {'killed':>6} {'surv.':>5} {'timeout':>7} "
    header += f"{'no test':>7} {'equiv.':>6} {'other':>5} {'not run':>7} {'score':>6} {'time':>7}"
    print(header)
    print("-" * len(header))
    totals = dict.fromkeys(
        ("n", "killed", "survived", "timeout", "none", "equiv", "other", "unrun"), 0
    )
    for report in reports:
        counts = dict.fromkeys(totals, 0)
        for r in report.results:
            counts["n"] += 1
            if r.key in equivalent:
                counts["equiv"] += 1
            elif r.status in ("killed", "survived", "timeout"):
                counts[r.status] += 1
            elif r.status == "no tests":
                counts["none"] += 1
            elif r.status == "not checked":
                counts["unrun"] += 1
            else:
                counts["other"] += 1
        for k, v in counts.items():
            totals[k] += v
        print(row(report.module.name, counts, report.seconds))
    if len(reports) > 1:
        print(row("all", totals, sum(r.seconds or 0 for r in reports) or None))
    print(
        "\nscore = (killed + timeout) / (mutants - equivalent - not run); a timeout is a mutant"
        " the tests caught by hanging; 'no test': no selected test calls the function; 'not run':"
        " the run was stopped before it got to them."
    )

    for report in reports:
        left = [r for r in report.results if r.status != "killed" and r.key not in equivalent]
        left = [r for r in left if r.status not in ("timeout", "not checked")]
        if not left:
            continue
        print(f"\n=== {report.module.name}: {len(left)} not killed ===")
        for r in left:
            diff = diff_of(report.module, r)
            line = line_of(r, diff)
            print(f"\n{r.status}: {r.key}  ({r.target.repo_path}:{line})")
            body = [ln for ln in diff.splitlines() if not ln.startswith(("---", "+++"))]
            print("\n".join("    " + ln for ln in body))

    known = {r.key for report in reports for r in report.results}
    names = {m.module.name for m in reports}
    stale = [
        k
        for k in equivalent
        if k not in known and any(t.matches(k) for m in reports for t in m.module.targets)
    ]
    if stale and names:
        print("\nequivalent.txt names mutants this run did not make (code changed?):")
        print("\n".join("    " + k for k in stale))


def row(name: str, c: dict[str, int], seconds: float | None) -> str:
    scored = c["n"] - c["equiv"] - c["unrun"]
    score = f"{100 * (c['killed'] + c['timeout']) / scored:5.1f}%" if scored else "    -"
    took = f"{seconds / 60:6.1f}m" if seconds else "      -"
    return (
        f"{name:<11} {c['n']:>7} {c['killed']:>6} {c['survived']:>5} {c['timeout']:>7} "
        f"{c['none']:>7} {c['equiv']:>6} {c['other']:>5} {c['unrun']:>7} {score:>6} {took}"
    )


def main() -> int:
    modules, equivalent, examples = load_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(modules))
    parser.add_argument("--report", action="store_true", help="report the last run, run nothing")
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("MUTATE_JOBS", "2")),
        help="mutants tested at once (default: MUTATE_JOBS or 2)",
    )
    parser.add_argument("--clean", action="store_true", help="start the workspaces over")
    parser.add_argument(
        "--only",
        action="append",
        metavar="FUNCTION",
        help="run only this function's mutants (name or Class.method; repeatable); the report"
        " still covers the whole module, with the last verdicts of the rest",
    )
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(modules)}")
    chosen = [modules[m] for m in (args.modules or modules)]

    reports = []
    for module in chosen:
        if args.clean:
            shutil.rmtree(WORK / module.name, ignore_errors=True)
        report = Report(module)
        if not args.report:
            report.seconds = run_module(module, args.jobs, examples, args.only)
            print(f"    {module.name}: {report.seconds / 60:.1f} min", flush=True)
        elif not (WORK / module.name / "mutants").is_dir():
            print(f"--- {module.name}: no run yet")
            continue
        report.results = collect(module)
        reports.append(report)
    print_report(reports, equivalent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
