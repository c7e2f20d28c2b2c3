"""archlab: one attention, three Transformer families, scaling laws built in."""

__version__ = "0.1.0"
