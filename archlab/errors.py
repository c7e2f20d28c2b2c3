"""The project's own error types: one clear sentence each, raised before anything is compiled or written."""


class ArchlabError(ValueError):
    """Base class for every user-facing error archlab raises on bad input."""


class ConfigError(ArchlabError):
    """A configuration value (or a combination of values) that cannot work."""


class IncompatibleObjectiveError(ConfigError):
    """An objective paired with a model family that cannot train it."""


class DataError(ArchlabError):
    """A corpus, data file or tokenizer that cannot be used."""


class CheckpointError(ArchlabError):
    """A checkpoint directory that is missing, empty, corrupt or mismatched."""


class CorruptCheckpointError(CheckpointError):
    """A named checkpoint step that failed its checks (torn, truncated, or not what was saved)."""


class ConversionError(ArchlabError):
    """A Hugging Face model directory that cannot be converted."""


class NonFiniteError(ArchlabError):
    """The loss or gradients became NaN/Inf (``run.on_nonfinite=stop``, or too many skips in a row)."""
