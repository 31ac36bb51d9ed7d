"""Text sources and token windows for calibration and evaluation.

Built-in texts, present without any download (each a name for ``--calibration`` / ``--eval-text``):

- Python's own documentation (``pydoc_data.topics``). Its topics, sorted by name, are split in two halves:
  ``pydoc:calibration`` (the first half) scores the units and ``pydoc:heldout`` (the second half) measures
  perplexity, so evaluation never sees calibration text.
- ``stdlib-docstrings``: the longer docstrings of the Python standard library's modules, classes and functions
  (English prose about code, with examples), calibration text. IDLE's package is left out, since its manual is
  an evaluation text.
- ``licenses``: English legal prose that is not about Python, the license texts of ``/usr/share/common-licenses``
  (Debian and most Linux distributions ship them), an evaluation text.
- ``gnu-manuals``: English technical prose, the GNU manuals in ``/usr/share/info`` (coreutils, grep, sed, ...),
  an evaluation text.
- ``idle-manual``: IDLE's user manual as plain text (``idlelib/help.html`` in the standard library), an
  evaluation text.

Calibration text may be a mix: ``a+b`` takes equal shares of windows from each source, ``a:3+b:1`` weighs them.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import html
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprune.errors import CalibrationError

PYDOC_SOURCES = ("pydoc:calibration", "pydoc:heldout")
LICENSES_DIR = Path("/usr/share/common-licenses")
GNU_INFO_DIR = Path("/usr/share/info")
STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])
#: Standard-library folders whose docstrings are not calibration text: tests, vendored code, IDLE (its manual
#: is an evaluation text), and installed third-party packages.
_DOCSTRING_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip"}
#: Docstrings shorter than this are mostly one-line summaries; the longer ones carry prose.
_MIN_DOCSTRING_CHARS = 200
#: The default calibration mix: Python's documentation and the standard library's docstrings in equal shares.
DEFAULT_CALIBRATION = "pydoc:calibration+stdlib-docstrings"


def pydoc_text(part: str) -> str:
    """One half of Python's docs topics, joined by blank lines (``part`` is 'calibration' or 'heldout')."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    half = len(names) // 2
    chosen = names[:half] if part == "calibration" else names[half:]
    return "\n\n".join(topics[n] for n in chosen)


def licenses_text() -> str:
    """The distinct license texts of /usr/share/common-licenses, sorted by name, joined by blank lines."""
    if not LICENSES_DIR.is_dir():
        raise CalibrationError(f"built-in text 'licenses' needs {LICENSES_DIR}, which this machine lacks")
    files = sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


@functools.cache  # parsing the standard library takes seconds; it does not change while we run
def stdlib_docstrings_text() -> str:
    """The standard library's docstrings of at least 200 characters, modules in a fixed shuffled order.

    The order is by a hash of each file's path, so the first windows (those a small calibration set takes)
    come from many modules instead of the alphabetically first few.
    """
    files = [p for p in STDLIB_DIR.rglob("*.py") if not _DOCSTRING_SKIP & set(p.relative_to(STDLIB_DIR).parts)]
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(STDLIB_DIR).as_posix().encode()).hexdigest())
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python 3 source
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    if not docs:
        raise CalibrationError(f"built-in text 'stdlib-docstrings' found no docstrings under {STDLIB_DIR}")
    return "\n\n".join(docs)


def gnu_manuals_text() -> str:
    """The GNU info manuals of /usr/share/info (gzip-compressed), sorted by name, joined by blank lines."""
    files = sorted(GNU_INFO_DIR.glob("*.info*.gz")) if GNU_INFO_DIR.is_dir() else []
    if not files:
        raise CalibrationError(f"built-in text 'gnu-manuals' needs GNU info manuals in {GNU_INFO_DIR}; none found")
    return "\n\n".join(gzip.open(p, "rt", encoding="utf-8", errors="replace").read() for p in files)


def idle_manual_text() -> str:
    """IDLE's user manual (idlelib/help.html) with the markup stripped."""
    page = STDLIB_DIR / "idlelib" / "help.html"
    if not page.is_file():
        raise CalibrationError(f"built-in text 'idle-manual' needs {page}, which this Python lacks")
    markup = re.sub(r"<(script|style)\b.*?</\1>", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", markup))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


BUILTIN_TEXTS = {
    "pydoc:calibration": lambda: pydoc_text("calibration"),
    "pydoc:heldout": lambda: pydoc_text("heldout"),
    "stdlib-docstrings": stdlib_docstrings_text,
    "licenses": licenses_text,
    "gnu-manuals": gnu_manuals_text,
    "idle-manual": idle_manual_text,
}
BUILTIN_SOURCES = tuple(BUILTIN_TEXTS)


def read_text(source: str | Path) -> str:
    """Text from a built-in source (see ``BUILTIN_SOURCES``) or a UTF-8 file."""
    source = str(source)
    if source in BUILTIN_TEXTS:
        return BUILTIN_TEXTS[source]()
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"text file not found: {source} (or use one of {', '.join(BUILTIN_SOURCES)})")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"text file is empty: {source}")
    return text


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``a+b`` or ``a:3+b:1`` as (source, weight) pairs; a path to an existing file is one source, weight 1.

    A part's weight is what follows its last colon when that parses as a number (``pydoc:calibration`` is a
    name, ``pydoc:calibration:2`` the same name with weight 2).
    """
    spec = str(spec)
    if Path(spec).is_file() or "+" not in spec and not _weight_of(spec)[1]:
        return [(spec, 1.0)]
    parts = []
    for part in spec.split("+"):
        name, weight = _weight_of(part.strip())
        if not name:
            raise CalibrationError(f"empty source in the text mix {spec!r}")
        parts.append((name, 1.0 if weight is None else weight))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise CalibrationError(f"a source appears twice in the text mix {spec!r}; give it one weight")
    return parts


def _weight_of(part: str) -> tuple[str, float | None]:
    name, sep, tail = part.rpartition(":")
    if not sep:
        return part, None
    try:
        weight = float(tail)
    except ValueError:
        return part, None
    if not weight > 0 or weight == float("inf"):
        raise CalibrationError(f"a text mix weight must be a positive number; got {tail!r} in {part!r}")
    return name, weight


def text_digest(text: str) -> str:
    """sha256 of the text, recorded with every pruned model so its calibration can be checked."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class TokenWindows:
    """Fixed-length windows of token ids cut from one text, plus where they came from."""

    ids: torch.Tensor  # [num_windows, seq_len], int64
    source: str
    digest: str
    total_tokens: int
    parts: dict[str, int] | None = None  # windows taken from each source of a mix

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.ids.split(batch_size))

    def describe(self) -> dict:
        n, seq_len = self.ids.shape
        return {
            "source": self.source,
            "sha256": self.digest,
            "text_tokens": self.total_tokens,
            "windows": n,
            "seq_len": seq_len,
            **({"parts": self.parts} if self.parts else {}),
        }


def token_windows(
    tokenizer,
    text: str,
    seq_len: int,
    max_windows: int | None,
    source: str = "text",
    purpose: str = "calibration",
    encoder: bool = False,
) -> TokenWindows:
    """Tokenise ``text`` and cut it into consecutive non-overlapping windows of ``seq_len`` tokens.

    For encoders (``encoder=True``) each window is wrapped in the tokenizer's ``[CLS] ... [SEP]``.
    """
    if not text or not text.strip():
        raise CalibrationError(f"{purpose} text is empty ({source})")
    wrap = _encoder_wrap(tokenizer) if encoder else ([], [])
    body = seq_len - len(wrap[0]) - len(wrap[1])
    if body < 1:
        raise CalibrationError(f"seq_len {seq_len} leaves no room for text between the special tokens")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // body
    if n < 1:
        raise CalibrationError(
            f"{purpose} text is too short: {len(ids)} tokens from {source}, but one window needs {body}; "
            f"give more text or a smaller sequence length"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if wrap != ([], []):
        pre = torch.tensor(wrap[0], dtype=torch.long).expand(n, -1)
        post = torch.tensor(wrap[1], dtype=torch.long).expand(n, -1)
        windows = torch.cat([pre, windows, post], dim=1)
    return TokenWindows(windows, source, text_digest(text), len(ids))


def _encoder_wrap(tokenizer) -> tuple[list[int], list[int]]:
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls_id is None or sep_id is None:
        raise CalibrationError("an encoder needs a tokenizer with [CLS] and [SEP] tokens")
    return [cls_id], [sep_id]


def text_windows(
    tokenizer,
    spec: str | Path,
    seq_len: int,
    max_windows: int | None,
    purpose: str = "calibration",
    encoder: bool = False,
) -> TokenWindows:
    """Windows of one text (as ``token_windows``) or of a mix ``a:w1+b:w2``, shared out by weight.

    A mix takes ``max_windows`` windows in all, each source giving its share (proportional, largest-remainder
    rounding, at least one) from its start; a source shorter than its share gives what it has.
    """
    parts = parse_mix(spec)
    if len(parts) == 1 and parts[0][1] == 1.0:
        name = parts[0][0]
        return token_windows(tokenizer, read_text(name), seq_len, max_windows, name, purpose, encoder)
    if max_windows is None:
        raise CalibrationError(f"the {purpose} text mix {spec!r} needs a window count to share out")
    if max_windows < len(parts):
        raise CalibrationError(f"{max_windows} {purpose} windows cannot be shared among {len(parts)} sources")
    shares = _shares(max_windows, [w for _, w in parts])
    pieces = [
        token_windows(tokenizer, read_text(name), seq_len, share, name, purpose, encoder)
        for (name, _), share in zip(parts, shares, strict=True)
    ]
    digest = hashlib.sha256(" ".join(f"{p.source}={p.digest}:{len(p.ids)}" for p in pieces).encode()).hexdigest()
    return TokenWindows(
        torch.cat([p.ids for p in pieces]),
        "+".join(f"{name}:{weight:g}" for name, weight in parts),
        digest,
        sum(p.total_tokens for p in pieces),
        {p.source: len(p.ids) for p in pieces},
    )


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder), every share at least one."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: max(0, total - sum(shares))]:
        shares[i] += 1
    while sum(shares) > total:  # the minimum of one pushed the sum over: take from the largest
        shares[shares.index(max(shares))] -= 1
    return shares
