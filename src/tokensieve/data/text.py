"""Long plain texts, from one API: :func:`text_source` names a source, :meth:`TextSource.text` gives its text.

The evaluation tasks take real text (question answering, perplexity, a real-text haystack) from a source named by a
spec string, and the profilers and the benchmark take their calibration text from the same family:

* ``"kjv"`` — the King James Bible, read with the ``bible`` program of the Debian packages ``bible-kjv`` and
  ``bible-kjv-text`` (``apt-get install bible-kjv bible-kjv-text``);
* ``"python-doc"`` — the Python documentation of the Debian package ``python3-doc`` (its HTML pages, tags removed);
* ``"stdlib"`` — the docstrings of standard-library modules: real, varied English technical prose that every Python
  installation carries (it changes only with the Python version); :func:`calibration_text` is this source;
* ``"python-topics"`` — the Python Language Reference's topic pages (Debian's ``libpython3.11-stdlib``);
* ``"generated[:SEED]"`` — deterministic English-like sentences (tests, machines without the packages);
* any other spec, or ``"file:PATH"`` — a UTF-8 text file of the user's.

Every source has an ``ident`` that goes into an evaluation cell's key: the name for a packaged text, a hash of the
content for a file, so that the same words give the same key on every machine.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import html
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MIN_CHARS = 2_000


class TextSource:
    """A long plain text. Subclasses implement :meth:`load`; :meth:`text` caches it."""

    @property
    def name(self) -> str:
        """A short human-readable name (``kjv``, ``file:book.txt`` …)."""
        raise NotImplementedError

    @property
    def ident(self) -> str:
        """A stable, machine-independent identity of the text (goes into evaluation keys)."""
        return self.name

    def load(self) -> str:
        raise NotImplementedError

    def text(self) -> str:
        return _cached_text(self)

    def check(self) -> None:
        """Fail early (with what to do) if the text is not available."""
        self.text()


@functools.lru_cache(maxsize=4)
def _cached_text(source: TextSource) -> str:
    text = source.load()
    text = text.replace("\r\n", "\n")
    if len(text) < MIN_CHARS:
        raise ConfigError(
            f"The text '{source.name}' has only {len(text)} characters; the evaluation tasks need at least "
            f"{MIN_CHARS} (ideally a book-length text)."
        )
    return text


@functools.lru_cache(maxsize=4)
def _digest(source: TextSource) -> str:
    return hashlib.sha256(source.text().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, eq=True)
class FileText(TextSource):
    """A user's UTF-8 text file."""

    path: str

    @property
    def name(self) -> str:
        return f"file:{Path(self.path).name}"

    @property
    def ident(self) -> str:
        return f"file:{_digest(self)}"

    def load(self) -> str:
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise ConfigError(f"Text file {p} does not exist. Give a UTF-8 text file, or use --text kjv.")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"Text file {p} is not UTF-8 text.") from None


@dataclass(frozen=True, eq=True)
class GeneratedText(TextSource):
    """Deterministic English-like text made from a seed (for tests and for machines without the packages)."""

    seed: int = 0
    sentences: int = 4000

    @property
    def name(self) -> str:
        return f"generated:{self.seed}:{self.sentences}"

    def load(self) -> str:
        import random

        from .words import NOUNS, VERBS

        rng = random.Random(f"generated-text/{self.seed}")
        adjectives = ["old", "quiet", "bright", "small", "distant", "green", "heavy", "gentle", "narrow", "late"]
        out: list[str] = []
        para: list[str] = []
        for _ in range(self.sentences):
            s = (
                f"The {rng.choice(adjectives)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(NOUNS)} near the {rng.choice(adjectives)} {rng.choice(NOUNS)} "
                f"and the {rng.choice(NOUNS)} of the {rng.choice(adjectives)} {rng.choice(NOUNS)}."
            )
            para.append(s)
            if len(para) == 6:
                out.append(" ".join(para))
                para = []
        out.append(" ".join(para))
        return "\n\n".join(p for p in out if p)


BIBLE_BIN = "/usr/bin/bible"
KJV_RANGE = "Gen1:1-Rev22:21"


@dataclass(frozen=True, eq=True)
class KJVText(TextSource):
    """The King James Bible from the Debian packages ``bible-kjv`` (reader) and ``bible-kjv-text`` (data).

    One paragraph per chapter, verse numbers removed.
    """

    binary: str = BIBLE_BIN

    @property
    def name(self) -> str:
        return "kjv"

    def load(self) -> str:
        exe = self.binary if os.path.exists(self.binary) else shutil.which("bible")
        if not exe:
            raise ConfigError(
                "The King James Bible text is not installed: run `apt-get install bible-kjv bible-kjv-text` "
                "(or give your own text file with --text PATH)."
            )
        proc = subprocess.run(
            [exe, "-l100000", KJV_RANGE], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0 or len(proc.stdout) < MIN_CHARS:
            raise ConfigError(
                f"`bible {KJV_RANGE}` failed ({proc.stderr.strip() or 'no output'}): reinstall with "
                "`apt-get install --reinstall bible-kjv bible-kjv-text`."
            )
        return parse_bible_output(proc.stdout)


def parse_bible_output(raw: str) -> str:
    """Turn ``bible`` output (chapter headers, then numbered verses) into one paragraph per chapter."""
    chapters: list[str] = []
    verses: list[str] = []
    for line in raw.splitlines():
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip():  # a chapter header such as "Genesis 1"
            if verses:
                chapters.append(" ".join(verses))
            verses = []
        elif verses and line == "":
            continue
    if verses:
        chapters.append(" ".join(verses))
    return "\n\n".join(chapters)


PYDOC_GLOB = "/usr/share/doc/python3*/html/library/*.html"


@dataclass(frozen=True, eq=True)
class PythonDocText(TextSource):
    """The Python library reference from the Debian package ``python3-doc`` (HTML pages, tags removed)."""

    pattern: str = PYDOC_GLOB

    @property
    def name(self) -> str:
        return "python-doc"

    def load(self) -> str:
        files = sorted(glob.glob(self.pattern))
        if not files:
            raise ConfigError(
                "The Python documentation is not installed: run `apt-get install python3-doc` "
                "(or give your own text file with --text PATH)."
            )
        parts = []
        for f in files:
            parts.append(html_to_text(Path(f).read_text(encoding="utf-8", errors="replace")))
        return "\n\n".join(p for p in parts if p)


def html_to_text(page: str) -> str:
    """Paragraph text of an HTML page: scripts, styles and tags removed, entities decoded."""
    body = re.sub(r"(?is)<(script|style|head|nav|footer)\b.*?</\1>", " ", page)
    body = re.sub(r"(?i)</?(p|div|h\d|li|dt|dd|pre|br|tr)\b[^>]*>", "\n\n", body)
    body = re.sub(r"(?s)<[^>]+>", " ", body)
    body = html.unescape(body)
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return "\n\n".join(p for p in paras if len(p) > 40)


STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "fractions", "functools", "heapq", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
    "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "zipfile",
)  # fmt: skip
CALIBRATION_CHARS = 200_000


@dataclass(frozen=True, eq=True)
class StdlibText(TextSource):
    """Docstrings of standard-library modules and their public members, in a fixed order, until ``min_chars``.

    Needs no download and no package; the text depends on the Python version only (profiles record it).
    """

    min_chars: int = CALIBRATION_CHARS

    @property
    def name(self) -> str:
        return "stdlib" if self.min_chars == CALIBRATION_CHARS else f"stdlib:{self.min_chars}"

    @property
    def ident(self) -> str:
        return f"{self.name}:python-{python_version()}"

    def load(self) -> str:
        parts: list[str] = []
        total = 0
        for name in STDLIB_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # pragma: no cover - trimmed Python builds
                continue
            docs = [inspect.getdoc(mod) or ""]
            for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr, None)
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    docs.append(inspect.getdoc(obj) or "")
            for d in docs:
                d = " ".join(d.split())
                if len(d) > 80:
                    parts.append(d)
                    total += len(d)
            if total >= self.min_chars:
                break
        return "\n\n".join(parts)


TOPICS_GLOB = "/usr/lib/python3*/pydoc_data/topics.py"


@dataclass(frozen=True, eq=True)
class PythonTopicsText(TextSource):
    """The Python Language Reference's topic pages as Debian ships them in ``libpython3.11-stdlib``
    (``pydoc_data/topics.py``, read with ``ast``, never imported; the running CPython's copy of the same file when the
    Debian one is missing), sorted by name. SP-KV's and the retention gates' training text."""

    pattern: str = TOPICS_GLOB

    @property
    def name(self) -> str:
        return "python-topics"

    @property
    def ident(self) -> str:
        return f"python-topics:python-{python_version()}"

    def load(self) -> str:
        import ast

        paths = sorted(glob.glob(self.pattern))
        if not paths:
            import pydoc_data

            paths = [str(Path(pydoc_data.__file__).parent / "topics.py")]
        for path in paths:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
                    pages = ast.literal_eval(node.value)
                    if isinstance(pages, dict) and pages:
                        return "\n\n".join(str(pages[k]).strip() for k in sorted(pages))
        raise ConfigError("The Python reference topics (pydoc_data/topics.py) were not found: apt-get install "
                          "libpython3.11-stdlib.")  # fmt: skip


HELD_OUT_SHARE = 0.1


def held_out_split(text: str, share: float = HELD_OUT_SHARE) -> tuple[str, str]:
    """``(training part, held-out part)`` of a text: its last ``share`` (cut at the paragraph that starts there).
    Learned profiles (``tokensieve train kvzap``) train on the first part only; the ``prose`` fidelity task reads the
    held-out part, so its text was never seen by a trained gate."""
    cut = int(len(text) * (1.0 - share))
    at = text.find("\n\n", cut)
    at = cut if at < 0 else at + 2
    return text[:at], text[at:]


def calibration_text(min_chars: int = CALIBRATION_CHARS) -> str:
    """The calibration corpus of the profilers and the benchmark: the ``stdlib`` source (at least ``min_chars``
    characters where the modules have that many)."""
    return StdlibText(min_chars).text()


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


PACKAGED: dict[str, type[TextSource]] = {
    "kjv": KJVText,
    "python-doc": PythonDocText,
    "stdlib": StdlibText,
    "python-topics": PythonTopicsText,
}


def text_source(spec: str | TextSource) -> TextSource:
    """A text source from a spec: ``kjv``, ``python-doc``, ``stdlib``, ``python-topics``, ``generated[:SEED]``,
    ``file:PATH`` or a file path."""
    if isinstance(spec, TextSource):
        return spec
    s = str(spec).strip()
    if not s:
        raise ConfigError("Empty text source: use kjv, python-doc or a path to a UTF-8 text file.")
    if s in PACKAGED:
        return PACKAGED[s]()
    if s == "generated" or s.startswith("generated:"):
        seed = s.split(":", 1)[1] if ":" in s else "0"
        if not seed.isdigit():
            raise ConfigError(f"Cannot read text source {s!r}: use generated or generated:SEED.")
        return GeneratedText(int(seed))
    path = s[5:] if s.startswith("file:") else s
    if not Path(path).expanduser().is_file():
        raise ConfigError(
            f"Unknown text source {s!r}: use kjv (apt-get install bible-kjv bible-kjv-text), python-doc "
            "(apt-get install python3-doc), stdlib, generated, or the path of a UTF-8 text file."
        )
    return FileText(str(Path(path).expanduser()))


def sentences(text: str, *, max_chars: int = 240) -> list[str]:
    """Split text into sentence units in reading order, whitespace normalised.

    Units longer than ``max_chars`` are cut at ``;``/``:``, and at word boundaries if still too long.
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])", para):
            if len(s) <= max_chars:
                out.append(s)
                continue
            piece = ""
            for part in re.split(r"(?<=[;:])\s+", s):
                if piece and len(piece) + len(part) > max_chars:
                    out.append(piece)
                    piece = part
                else:
                    piece = f"{piece} {part}".strip()
            if piece:
                out.append(piece)
    return [c for s in out if s for c in _cut(s, max_chars)]


def _cut(s: str, max_chars: int) -> list[str]:
    """Cut a unit longer than ``max_chars`` at word boundaries."""
    if len(s) <= max_chars:
        return [s]
    chunks: list[str] = []
    piece = ""
    for word in s.split(" "):
        if piece and len(piece) + 1 + len(word) > max_chars:
            chunks.append(piece)
            piece = word
        else:
            piece = f"{piece} {word}" if piece else word
    return [*chunks, piece] if piece else chunks


@functools.lru_cache(maxsize=4)
def sentence_units(source: TextSource) -> tuple[str, ...]:
    return tuple(sentences(source.text()))
