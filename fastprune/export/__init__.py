"""Writing models in other formats. ``export_gguf``: a Llama model and its tokenizer as one GGUF file."""

from fastprune.export.gguf import GGUF_TYPES, export_gguf

EXPORT_FORMATS = ("gguf",)

__all__ = ["EXPORT_FORMATS", "GGUF_TYPES", "export_gguf"]
