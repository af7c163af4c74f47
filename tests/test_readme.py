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


def test_readme_stays_a_front_door_under_300_lines():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines < 300, f"README.md has {lines} lines; move long sections and measurements into docs/"


# ---- links: every relative link in README.md and docs/**/*.md names a file that exists ----

_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (a link there is not a link)."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(?<!\[)`[^`\n]*`(?!\])", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks included) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^```.*?^```[^\n]*$", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _broken_links(pages, root: Path = ROOT) -> list[str]:
    broken = []
    for page in pages:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: {dest.name} has no heading with anchor #{anchor}")
    return broken


def test_every_relative_link_in_readme_and_docs_points_at_a_file_and_heading_that_exist():
    assert len(_PAGES) > 5
    broken = _broken_links(_PAGES)
    assert not broken, "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Two words\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#two-words) [self](#b) `[code](nowhere.md)` [web](https://x.invalid/y)\n\n"
        "[gone](missing.md) [bad anchor](a.md#three-words)\n\n# B\n"
    )
    broken = _broken_links([tmp_path / "b.md"], root=tmp_path)
    assert len(broken) == 2, broken
    assert "missing.md" in broken[0] and "three-words" in broken[1]


def test_github_anchors_of_headings_with_code_and_punctuation():
    assert _slug("The story over five seeds (issue 22)") == "the-story-over-five-seeds-issue-22"
    assert _slug("Built-in: `torchrun -m klbelt train`") == "built-in-torchrun--m-klbelt-train"
    assert _slug("TRL: `examples/trl_grpo_kl.py`") == "trl-examplestrl_grpo_klpy"
    assert _slug("`klbelt doctor` exit codes") == "klbelt-doctor-exit-codes"


# ---- commands: every flag of a `klbelt ...` command shown in README.md or docs exists ----


def _klbelt_commands(text: str) -> list[str]:
    fences = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)  # each fence consumed with its closer
    blocks = [body for lang, body in fences if lang in ("sh", "bash", "console", "")]
    lines = [line.split(" # ")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = _prose_without_fences(text)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    # a table row such as "| `klbelt demo` | ...; `--model tiny`: ..." gives its flags to the row's command
    for row in re.findall(r"^\|.*\|$", prose, flags=re.M):
        cells = re.findall(r"`([^`]+)`", row)
        if cells and cells[0].startswith("klbelt "):
            spans.append(" ".join([cells[0], *(c for c in cells[1:] if c.startswith("--"))]))
    return [c for c in lines + spans if re.search(r"(^|\s)klbelt\s+[a-z]", c)]


def _prose_without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def _unknown_flags(command: str, parser) -> list[str]:
    import argparse

    words = command.replace("|", " | ").split()
    start = max(i for i, w in enumerate(words) if w == "klbelt") + 1
    current, path = parser, ["klbelt"]
    unknown = []
    for word in words[start:]:
        if word in ("|", ">", "2>", "&&", ";"):
            break
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices and not word.startswith("-"):
            current, path = subs[0].choices[word], path + [word]
        elif word.startswith("--") and not word[2:].isupper():  # --FIELD: a placeholder
            flag = word.split("=", 1)[0]
            if flag not in current._option_string_actions:
                unknown.append(f"{' '.join(path)} {flag}")
    return unknown


def test_every_flag_of_a_klbelt_command_in_readme_and_docs_exists():
    from klbelt.cli.main import build_parser

    parser = build_parser()
    commands = [c for page in _PAGES for c in _klbelt_commands(page.read_text())]
    assert len(commands) > 40, commands
    unknown = sorted({u for c in commands for u in _unknown_flags(c, parser)})
    assert not unknown, "no such flag: " + ", ".join(unknown)
