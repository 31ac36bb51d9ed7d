"""fastprune's exceptions: one base class, so callers (and the CLI) can catch every user-facing error at once."""


class FastpruneError(Exception):
    """Base class of every error fastprune raises on bad input."""


class ConfigError(FastpruneError, ValueError):
    """A setting is out of range or inconsistent with another."""


class UnsupportedModelError(FastpruneError):
    """The model's architecture has no adapter."""


class ModelNotFoundError(FastpruneError, FileNotFoundError):
    """The model path does not exist or holds no model."""


class CheckpointError(FastpruneError, ValueError):
    """A model's weight files are missing, unreadable, or disagree with its config."""


class CalibrationError(FastpruneError, ValueError):
    """Calibration or evaluation text is missing, empty or too short."""


class ScoreError(FastpruneError, ValueError):
    """Importance scores are missing, malformed, NaN or infinite."""


class PlanError(FastpruneError, ValueError):
    """A plan is infeasible, malformed, or does not fit the model."""


class OutputError(FastpruneError):
    """The output location is unsafe (exists, or lies inside the input model)."""


class ExportError(FastpruneError):
    """The model cannot be written in the requested format (architecture, per-layer widths, tokenizer)."""
