"""Mutation testing of the training loop: does the test suite notice a plausible one-line bug?

The method's unit tests prove each formula; a loop that calls a correct formula with the wrong
arguments, on the wrong samples or at the wrong time passes all of them. Each mutant of
``mutation_list.py`` is one such bug; it is applied, alone, to a scratch copy of the repository and the
tests listed for it run there with ``-x``. A mutant is killed when a test fails (or the run times out).

The working tree is never written: the copy holds the tracked and untracked (not ignored) files, and
its tests run with this interpreter and ``PYTHONPATH=<copy>/src``, which comes before the editable
install's path entry, also in the subprocesses the tests start. Before any mutant the runner checks
that ``senseflow`` imports from the copy, that a sanity mutant is killed, and runs every selected test
unmutated: a test that already fails there cannot judge a mutant, so it is deselected (and reported).

    python benchmarks/mutations.py [--only NAME ...] [--list] [--report docs/results/mutations.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mutation_list import EQUIVALENT, MUTATIONS, SANITY, Mutation

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?")


@dataclass
class Outcome:
    mutation: Mutation
    line: int
    status: str  # killed, survived, timeout, no tests
    killer: str = ""
    reason: str = ""  # the killing failure's message, as pytest's summary shortens it
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # listed test files missing from the tree

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")


def snapshot(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files (so no .venv, no caches) to ``dest``."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():  # deleted in the tree but still tracked
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def test_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy / "src"), env.get("PYTHONPATH")]))
    # A mutant of the same size written within a second of the original could otherwise reuse the
    # original's cached bytecode (pyc validation compares size and whole-second mtime).
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def imported_from(copy: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import senseflow; print(senseflow.__file__)"],
        cwd=copy,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def changed_line(m: Mutation, text: str) -> tuple[int, str, str]:
    """1-based line of ``m`` in ``text`` where original and replacement first differ, and both lines."""
    count = text.count(m.original)
    if count != 1:
        raise SystemExit(f"{m.name}: the original text occurs {count} times in {m.file}, expected once")
    first = text[: text.index(m.original)].count("\n") + 1
    old, new = m.original.split("\n"), m.replacement.split("\n")
    i = next((k for k, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), 0)
    return first + i, old[i].strip(), new[i].strip() if i < len(new) else ""


def conftest_fixtures(copy: Path) -> tuple[list[str], bool]:
    """Fixture names of tests/conftest.py and whether any is autouse."""
    conftest = copy / "tests" / "conftest.py"
    if not conftest.is_file():
        return [], False
    text = conftest.read_text()
    names = re.findall(r"@pytest\.fixture[^\n]*\n(?:@[^\n]*\n)*def (\w+)", text)
    return names, "autouse" in text


class Runner:
    def __init__(self, copy: Path, timeout: float):
        self.copy, self.timeout = copy, timeout
        self.env = test_env(copy)
        self.fixtures, self.autouse = conftest_fixtures(copy)
        self.deselected: list[str] = []
        self.dropped_files: list[str] = []

    def needs_conftest(self, test: str) -> bool:
        """Whether a test file uses the conftest's fixtures; those that do not run with --noconftest,
        which saves the conftest's import of the toy teacher's stack (several seconds per mutant)."""
        if self.autouse:
            return True
        text = (self.copy / test.split("::")[0]).read_text()
        return any(re.search(rf"\b{name}\b", text) for name in self.fixtures)

    def groups(self, tests: tuple[str, ...]) -> tuple[list[list[str]], list[str]]:
        """The tests that exist, as (without conftest, with conftest) in their listed order; and the
        listed files missing from the tree."""
        missing, plain, full = [], [], []
        for t in tests:
            path = t.split("::")[0]
            if not (self.copy / path).is_file():
                missing.append(path)
            elif path not in self.dropped_files:
                (full if self.needs_conftest(t) else plain).append(t)
        return [g for g in (plain, full) if g], missing

    def pytest(self, tests: list[str], stop_first: bool) -> tuple[int | None, str]:
        """Run pytest in the copy; returns (exit code or None on timeout, output)."""
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--color=no"]
        cmd += ["--basetemp", str(self.copy.parent / "basetemp")]
        if stop_first:
            cmd.append("-x")
        if not any(self.needs_conftest(t) for t in tests):
            cmd.append("--noconftest")
        cmd += [f"--deselect={d}" for d in self.deselected]
        proc = subprocess.Popen(
            [*cmd, *tests],
            cwd=self.copy,
            env={**self.env, "COLUMNS": "300"},  # room for the failure message in the summary line
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout also ends torchrun's ranks
        )
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out
        return proc.returncode, out

    def baseline(self, mutations: list[Mutation]) -> None:
        """Run every selected test unmutated; deselect the failing ones, drop files that do not collect."""
        union: dict[str, None] = {}
        for m in mutations:
            union.update(dict.fromkeys(m.tests))
        groups, missing = self.groups(tuple(union))
        for path in dict.fromkeys(missing):
            print(f"warning: {path} does not exist; skipped", file=sys.stderr)
        for tests in groups:
            rc, out = self.pytest(tests, stop_first=False)
            if rc is None:
                raise SystemExit(f"the unmutated tests timed out:\n{out[-3000:]}")
            if rc not in (0, 1, 5):
                raise SystemExit(f"the unmutated tests could not run (pytest exit {rc}):\n{out[-3000:]}")
            for kind, node, _ in (match.groups() for match in map(SUMMARY.match, out.splitlines()) if match):
                if "::" in node:
                    self.deselected.append(node)
                else:
                    self.dropped_files.append(node)
                print(f"warning: {node} fails unmutated ({kind}); left out", file=sys.stderr)

    def run(self, m: Mutation) -> Outcome:
        target = self.copy / m.file
        original = target.read_text()
        line, _, _ = changed_line(m, original)
        groups, missing = self.groups(m.tests)
        outcome = Outcome(m, line, "no tests", skipped=missing)
        start = time.perf_counter()
        target.write_text(original.replace(m.original, m.replacement))
        try:
            for tests in groups:
                rc, out = self.pytest(tests, stop_first=True)
                if rc is None:
                    outcome.status, outcome.killer = "timeout", f"timeout after {self.timeout:.0f} s"
                    break
                if rc in (0, 5):  # 5: every test of this group was deselected
                    outcome.status = "survived" if rc == 0 or outcome.status == "survived" else "no tests"
                    continue
                if rc not in (1, 2):  # 3: internal error, 4: usage error
                    raise SystemExit(f"{m.name}: pytest could not run (exit {rc}):\n{out[-3000:]}")
                found = [match for match in map(SUMMARY.match, out.splitlines()) if match]
                outcome.status, outcome.killer = "killed", found[0].group(2) if found else f"pytest exit {rc}"
                outcome.reason = (found[0].group(3) or "") if found else ""
                break
        finally:
            target.write_text(original)
        outcome.seconds = time.perf_counter() - start
        return outcome


def code(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "(removed)"


def killing(o: Outcome) -> str:
    """The killing test, and the start of its failure message (an assertion, or a crash)."""
    if not o.killer:
        return ""
    reason = o.reason if len(o.reason) <= 70 else o.reason[:67].rstrip() + "..."
    return code(o.killer) + (f" ({code(reason)})" if reason else "")


def report(
    outcomes: list[Outcome],
    sanity: Outcome,
    imported: str,
    runner: Runner,
    wall: float,
    argv: list[str],
) -> str:
    killed = [o for o in outcomes if o.killed]
    survived = [o for o in outcomes if not o.killed]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Mutation testing of the training loop",
        "",
        "Each mutant is one plausible one-line bug of `src/senseflow/train` or `src/senseflow/method`",
        "(`benchmarks/mutation_list.py`), applied alone to a scratch copy of the repository; the tests",
        "listed for it run there with `-x`, and the first failure kills it. The runner is",
        "`benchmarks/mutations.py`; `tests/test_mutations_list.py` keeps the list in step with the code.",
        "The killing test is the first to fail in the listed order (later ones may fail too); the text in",
        "parentheses starts its failure: an assertion, or an exception where the mutant crashes the",
        "iteration or leaves out an update that the test waits for.",
        "",
        f"- Command: `{' '.join(['python', 'benchmarks/mutations.py', *argv])}`",
        f"- Date: {date}",
        f"- Wall time: {wall / 60:.1f} min for {len(outcomes)} mutants, on {os.cpu_count()} CPU cores "
        "(shared with other work, so times vary)",
        f"- Result: **{len(killed)} killed, {len(survived)} survived**",
        "",
        "## The copy is what runs",
        "",
        "`import senseflow` under the runner's environment (`PYTHONPATH=<copy>/src`) resolves to",
        f"`{imported}`: the scratch copy's `src`, ahead of the editable install's path entry;",
        "subprocesses that the tests start (torchrun) inherit the same `PYTHONPATH`. The sanity mutant "
        f"{code(changed_line(sanity.mutation, (ROOT / sanity.mutation.file).read_text())[1])} → "
        f"{code(sanity.mutation.replacement)} in `{sanity.mutation.file}` was "
        f"**{sanity.status}** by `{sanity.killer}`; the same test passes on the unmutated copy.",
        "",
    ]
    if runner.deselected or runner.dropped_files:
        lines += ["Left out because they already fail unmutated:", ""]
        lines += [f"- `{node}`" for node in [*runner.dropped_files, *runner.deselected]]
        lines.append("")
    lines += [
        "## Mutants",
        "",
        "| name | file:line | change | killed? | killing test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        m = o.mutation
        _, old, new = changed_line(m, (runner.copy / m.file).read_text())
        verdict = {"killed": "yes", "timeout": "yes (timeout)", "survived": "**no**"}.get(o.status, o.status)
        lines.append(
            f"| {m.name} | {m.file.removeprefix('src/senseflow/')}:{o.line} | {code(old)} → {code(new)} "
            f"| {verdict} | {killing(o)} |"
        )
    lines += ["", "## Survivors", ""]
    if survived:
        lines.append("Each needs a test that it fails; the one meant to catch it:")
        lines.append("")
        lines += [f"- **{o.mutation.name}**: {o.mutation.caught_by}." for o in survived]
    else:
        lines.append("None.")
    missing = sorted({path for o in outcomes for path in o.skipped})
    if missing:
        lines += ["", "Listed test files missing from the tree (skipped): " + ", ".join(map(code, missing))]
    lines += [
        "",
        "## Equivalent mutants left out",
        "",
        "They change no network's update, so no test of training could kill them:",
        "",
    ]
    lines += [f"- **{name}** (`{path}`): {code(change)}: {why}." for name, path, change, why in EQUIVALENT]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    parser.add_argument("--report", type=Path, help="write the Markdown report here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    by_name = {m.name: m for m in MUTATIONS}
    if len(by_name) != len(MUTATIONS):
        raise SystemExit("mutation names must be unique")
    unknown = sorted(set(args.only or []) - by_name.keys())
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(unknown)}")
    chosen = [by_name[n] for n in args.only] if args.only else list(MUTATIONS)
    for m in [SANITY, *chosen]:  # every original must occur exactly once before anything runs
        changed_line(m, (ROOT / m.file).read_text())
    if args.list:
        for m in chosen:
            line, old, new = changed_line(m, (ROOT / m.file).read_text())
            print(f"{m.name}  {m.file}:{line}\n    {old}\n -> {new}\n    tests: {' '.join(m.tests)}")
        return 0

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="senseflow-mutants-"))
    try:
        copy = scratch / "repo"
        snapshot(copy)
        runner = Runner(copy, args.timeout)
        imported = imported_from(copy, runner.env)
        if not Path(imported).is_relative_to(copy / "src"):
            raise SystemExit(f"senseflow imports from {imported}, not from the copy {copy / 'src'}")
        print(f"senseflow imports from the copy: {imported}")
        runner.baseline([SANITY, *chosen])
        sanity = runner.run(SANITY)
        print(f"sanity {SANITY.name}: {sanity.status} by {sanity.killer}")
        if not sanity.killed:
            raise SystemExit("the sanity mutant survived: the tests do not run the mutated copy")
        outcomes = []
        for i, m in enumerate(chosen, 1):
            o = runner.run(m)
            outcomes.append(o)
            print(f"[{i}/{len(chosen)}] {m.name}: {o.status} ({o.seconds:.0f} s) {o.killer}", flush=True)
            if o.reason:
                print(f"    {o.reason[:150]}", flush=True)
        wall = time.perf_counter() - start
        survivors = [o.mutation.name for o in outcomes if not o.killed]
        print(f"{len(outcomes) - len(survivors)} killed, {len(survivors)} survived in {wall / 60:.1f} min")
        if survivors:
            print("survivors: " + ", ".join(survivors))
        if args.report:
            text = report(outcomes, sanity, imported, runner, wall, argv)
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(text)
            print(f"wrote {args.report}")
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
