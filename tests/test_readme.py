"""The README is the first thing a user copies: its code must run as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_quick_start_runs_as_written():
    (code,) = _blocks(_section("Quick start"), "python")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "exact KL,    nats/token:" in result.stdout


def test_readme_first_section_gives_exactly_two_commands_and_ci_runs_the_test_one():
    first = README.split("\n## ", 2)[1]
    commands = [b.strip() for b in _blocks(first, "sh")]
    assert len(commands) == 2, commands
    main_job, test_command = commands
    assert main_job.endswith(("klbelt demo", "klbelt bench kernels"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines, "the .ci/run script must run the README's test command verbatim"
