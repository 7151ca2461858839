"""Every command in the README works as written from the clone root (issue 20).

The README's fenced command blocks are parsed line by line (shell comments and ``\\``
continuations as a shell reads them, ``&&`` chains split). Cheap commands run for real in a
subprocess from the clone root with this interpreter's environment first on PATH (as a user's
activated venv): ``python -m semmim.kernels.info``, every ``--help``, ``semmim data ... --check``
on small data. Expensive ones are checked without running them: ``semmim`` commands parse with
the real argument parser and their ``--set`` keys build a config; synopsis lines (``[--flag]``,
``{a,b}``, ``SPEC``) name only options their subcommand has; ``pip install`` names files and
extras that exist; scripts exist and pass ``bash -n``; ``pytest`` commands name existing paths and
markers (and run with ``--collect-only`` in the slow tier). A command of a kind this file does not
know fails the test, so a new README command gets a check. ``semmim`` commands in the fenced
blocks of ``docs/*.md`` get the parse check too.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMALL_DATA = "synthetic:32:8"  # replaces a SPEC placeholder in commands that run for real
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Command:
    """One simple command: where it is (file:line) and its argv, environment assignments split off."""

    where: str
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(info string, first line number, lines) of every fenced code block in a Markdown file."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if fence and current is None:
            current = (fence.group(1), number + 1, [])
        elif fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{path}: unclosed code fence opened at line {current[1] - 1}"
    return blocks


def commands(path: Path) -> list[Command]:
    """Every simple command of the shell blocks of ``path``."""
    found = []
    for info, first, lines in fenced_blocks(path):
        if info not in SHELL_BLOCKS:
            continue
        logical, start = "", first
        for offset, line in enumerate(lines):
            if not logical:
                start = first + offset
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            words = shlex.split(logical, comments=True)
            logical = ""
            chain: list[str] = []
            for word in [*words, "&&"]:
                if word != "&&":
                    chain.append(word)
                    continue
                env = []
                while chain and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", chain[0]):
                    key, _, value = chain.pop(0).partition("=")
                    env.append((key, value))
                if chain:
                    found.append(Command(f"{path.name}:{start}", tuple(env), tuple(chain)))
                chain = []
    return found


def is_synopsis(argv: tuple[str, ...]) -> bool:
    """A usage line rather than a command: optional parts, alternatives or placeholders."""
    return any(
        re.search(r"[\[\]{}|]|\.\.\.|…", word) or re.fullmatch(r"[A-Z][A-Z_]*", word)
        for word in argv
    )


def semmim_args(argv: tuple[str, ...]) -> list[str] | None:
    """The arguments after the ``semmim`` command, however it is launched; None if it is not."""
    if argv[0] == "semmim":
        return list(argv[1:])
    for i, word in enumerate(argv[:-1]):  # python -m semmim ..., torchrun ... -m semmim ...
        if word == "-m" and argv[i + 1] == "semmim" and argv[0] in ("python", "torchrun"):
            return list(argv[i + 2 :])
    return None


def run_from_root(cmd: Command, argv: list[str], timeout: int = 300) -> str:
    """Run ``argv`` from the clone root as a user's shell would (this venv first on PATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(dict(cmd.env))
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def _subparser(name: str):
    import argparse

    from semmim.cli import build_parser

    parser = build_parser()
    if name == "":
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert name in action.choices, f"no subcommand {name!r}; have {list(action.choices)}"
            return action.choices[name]
    raise AssertionError("semmim's parser has no subcommands")


def check_semmim_synopsis(cmd: Command, args: list[str]) -> None:
    """Every ``--option`` a usage line names exists in its subcommand's parser."""
    sub = args[0] if args and not args[0].startswith("-") else ""
    known = {s for a in _subparser(sub)._actions for s in a.option_strings}
    for word in args:
        for flag in re.findall(r"--[a-z][a-z0-9-]*", word):
            assert flag in known, f"{cmd}: `semmim {sub}` has no option {flag}"


def check_semmim_parses(cmd: Command, args: list[str]) -> None:
    """The command line parses with the real parser, and its ``--set`` keys build a config."""
    from semmim.cli import build_parser, parse_sets
    from semmim.config import from_preset
    from semmim.run_config import TrainConfig

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{cmd}: semmim's argument parser rejects it (exit {exc})") from None
    model_sets, train_sets = parse_sets(getattr(ns, "sets", None))
    try:
        from_preset(getattr(ns, "preset", None) or "tiny", model_sets)
        TrainConfig().override(train_sets)
    except (ValueError, TypeError) as exc:
        raise AssertionError(f"{cmd}: a --set key is not a config key: {exc}") from None


def check_pip(cmd: Command) -> None:
    """``pip install``: constraint / requirement files exist, extras are declared."""
    extras = set(metadata.metadata("semmim").get_all("Provides-Extra") or ())
    args = list(cmd.argv[2:])
    assert cmd.argv[1] == "install", f"{cmd}: only `pip install` is known here"
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--constraint", "-r", "--requirement"):
            assert (ROOT / value).is_file(), f"{cmd}: {value} does not exist"
    for word in args:
        local = re.fullmatch(r"\.(?:\[([a-z0-9,]+)\])?", word)
        if local and local.group(1):
            for extra in local.group(1).split(","):
                assert extra in extras, f"{cmd}: no extra {extra!r}; have {sorted(extras)}"


def pytest_args(argv: tuple[str, ...]) -> list[str] | None:
    if argv[0] == "pytest":
        return list(argv[1:])
    if argv[:3] == ("python", "-m", "pytest"):
        return list(argv[3:])
    return None


def check_pytest_command(cmd: Command, args: list[str], markers: set[str]) -> None:
    """Paths exist; every marker of ``-m`` is one of ``markers`` (pyproject.toml's)."""
    for flag, value in zip(args, args[1:]):
        if flag == "-m":
            for word in re.findall(r"[a-z_]+", value):
                assert word in markers | {"not", "and", "or"}, f"{cmd}: unknown marker {word!r}"
    for word in args:
        if not word.startswith("-") and "/" in word or word in ("tests", "benchmarks"):
            assert (ROOT / word).exists(), f"{cmd}: {word} does not exist"


def check_without_running(cmd: Command, markers: set[str]) -> str:
    """Check one command that is not run (or say it is to be run); returns what was done."""
    argv = cmd.argv
    args = semmim_args(argv)
    if args is not None:
        if is_synopsis(argv):
            check_semmim_synopsis(cmd, args)
            return "synopsis"
        if "--help" in args or (args and args[0] == "data"):
            return "run"
        check_semmim_parses(cmd, args)
        return "parsed"
    if pytest_args(argv) is not None:
        check_pytest_command(cmd, pytest_args(argv), markers)
        return "pytest"
    if argv[:3] in (("python", "-m", "semmim.kernels.info"),):
        return "run"
    if argv[0] in ("python", "python3") and argv[1:3] == ("-m", "venv"):
        return "venv"
    if argv[0] == "." and argv[1].endswith("bin/activate"):
        return "activate"
    if argv[0] == "pip":
        check_pip(cmd)
        return "pip"
    if argv[0] == "bash":
        script = ROOT / argv[1]
        assert script.is_file(), f"{cmd}: {argv[1]} does not exist"
        subprocess.run(["bash", "-n", str(script)], check=True)
        return "script"
    if argv[0] == "apt-get":
        return "system"
    raise AssertionError(f"{cmd}: tests/test_readme.py does not know how to check this command")


README_COMMANDS = commands(README)


def test_readme_has_the_commands_the_issue_names():
    lines = [shlex.join(c.argv) for c in README_COMMANDS]
    for wanted in (
        "python -m semmim.kernels.info",
        "bash tests/run_all.sh",
        "semmim --help",
        "pip install -e .",
    ):
        assert wanted in lines, f"README lost the command {wanted!r}"
    assert any(c.argv[:2] == ("semmim", "data") for c in README_COMMANDS), "no `semmim data`"
    assert not any("-P" in c.argv for c in README_COMMANDS), "README commands need no -P"


@pytest.mark.parametrize("cmd", README_COMMANDS, ids=str)
def test_readme_command(cmd: Command, pytestconfig):
    """Each README command: run it when cheap, else check it as far as it can be without running."""
    markers = {m.partition(":")[0].strip() for m in pytestconfig.getini("markers")}
    kind = check_without_running(cmd, markers)
    if kind != "run":
        return
    argv = [SMALL_DATA if w == "SPEC" else w for w in cmd.argv if not re.fullmatch(r"\[.*\]", w)]
    if is_synopsis(tuple(argv)):
        pytest.fail(f"{cmd}: still a synopsis after filling in SPEC: {argv}")
    out = run_from_root(cmd, argv)
    if argv[:3] == ["python", "-m", "semmim.kernels.info"]:
        assert "semmim._C: cuda=" in out, f"semmim._C was not found from the clone root:\n{out}"
        assert "not importable" not in out.split("triton:")[0]
    elif "--help" in argv:
        assert "usage: semmim" in out
    else:
        assert "decode" in out and "skipped" in out, out


def test_readme_synopsis_data_line_runs_on_small_data():
    """The usage block's ``semmim data [SPEC] [--check] ...`` line with SPEC filled in runs."""
    (cmd,) = [c for c in README_COMMANDS if c.argv[:2] == ("semmim", "data")]
    out = run_from_root(cmd, ["semmim", "data", SMALL_DATA, "--check"])
    assert "32 train pairs" in out and "8 held-out pairs" in out, out


def test_readme_python_blocks_are_python():
    for info, first, lines in fenced_blocks(README):
        if info == "python":
            ast.parse("\n".join(lines), filename=f"README.md:{first}")


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_semmim_commands_parse(doc: Path):
    """``semmim`` commands in the fenced blocks of docs/*.md parse and name real config keys."""
    checked = 0
    for cmd in commands(doc):
        args = semmim_args(cmd.argv)
        if args is None:
            continue
        if is_synopsis(cmd.argv):
            check_semmim_synopsis(cmd, args)
        else:
            check_semmim_parses(cmd, args)
        checked += 1
    if not checked:
        pytest.skip(f"{doc.name} has no semmim command in a fenced block")


@pytest.mark.slow
def test_readme_pytest_commands_collect():
    """The README's pytest commands, with ``--collect-only``, collect tests from the clone root."""
    runs = [c for c in README_COMMANDS if pytest_args(c.argv) is not None]
    assert runs
    for cmd in runs:
        out = run_from_root(cmd, [*cmd.argv, "--collect-only", "-p", "no:cacheprovider"])
        # "N tests collected" / "N/M tests collected", or per-file counts under -qq
        counts = re.findall(r"(\d+)(?:/\d+)? tests? collected|^\S+\.py: (\d+)$", out, re.M)
        assert sum(int(a or b) for a, b in counts) > 0, f"{cmd}: nothing collected:\n{out[-2000:]}"


def test_contributing_commands_check(pytestconfig):
    """CONTRIBUTING.md's commands are checked like the README's (none is run here)."""
    markers = {m.partition(":")[0].strip() for m in pytestconfig.getini("markers")}
    found = commands(ROOT / "CONTRIBUTING.md")
    assert any(pytest_args(c.argv) for c in found), "CONTRIBUTING.md lost its tier commands"
    for cmd in found:
        if check_without_running(cmd, markers) == "run":
            args = semmim_args(cmd.argv)
            if args is not None and not is_synopsis(cmd.argv):
                check_semmim_parses(cmd, args)


def test_contributing_holds_what_the_tests_cite():
    """tests/conftest.py, test_masked_gather.py and test_topk_mask.py point to CONTRIBUTING.md for
    the test tiers, the awkward shapes and the per-dtype tolerances: those sections must exist."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for cited in (
        "## Test tiers",
        "**Awkward shapes**: P = 1, 49, 196, 197, 576; D = 1, 72, 80, 768",
        "**Tolerances travel with the dtype**",
        "## Benchmark rules",
        "## Adding a kernel op end to end",
        "kernels/README.md",
    ):
        assert cited in text, f"CONTRIBUTING.md lost {cited!r}"
    for path in ("tests/conftest.py", "tests/test_masked_gather.py", "tests/test_topk_mask.py"):
        source = (ROOT / path).read_text()
        assert "CONTRIBUTING.md" in source and "CONVENTIONS" not in source, path


@pytest.mark.parametrize(
    "doc",
    [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))],
    ids=lambda p: p.name,
)
def test_relative_links_resolve(doc: Path):
    """Every relative Markdown link points to a file or folder that exists (and, with a
    ``#fragment`` into a Markdown file, to one of its headings)."""
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: link {target!r} -> {dest} does not exist"
        if fragment and dest.suffix == ".md":
            anchors = {
                re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)
            }
            assert fragment in anchors, f"{doc.name}: no heading #{fragment} in {dest.name}"
