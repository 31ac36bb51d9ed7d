"""Text sources and token windows for calibration and evaluation.

Built-in texts, present without any download:

- Python's own documentation (``pydoc_data.topics``). Its topics, sorted by name, are split in two halves:
  ``pydoc:calibration`` (the first half) scores the units and ``pydoc:heldout`` (the second half) measures
  perplexity, so evaluation never sees calibration text.
- ``licenses``: English prose that is not about Python, the license texts of ``/usr/share/common-licenses``
  (Debian and most Linux distributions ship them), for a second, out-of-domain perplexity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprune.errors import CalibrationError

PYDOC_SOURCES = ("pydoc:calibration", "pydoc:heldout")
LICENSES_DIR = Path("/usr/share/common-licenses")
BUILTIN_SOURCES = (*PYDOC_SOURCES, "licenses")


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


def read_text(source: str | Path) -> str:
    """Text from a built-in source (``pydoc:calibration``, ``pydoc:heldout``, ``licenses``) or a UTF-8 file."""
    source = str(source)
    if source in PYDOC_SOURCES:
        return pydoc_text(source.split(":", 1)[1])
    if source == "licenses":
        return licenses_text()
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"text file not found: {source} (or use one of {', '.join(BUILTIN_SOURCES)})")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"text file is empty: {source}")
    return text


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
