"""The embed stage's own exceptions. Library code raises these; the CLI turns them into messages."""


class EmbedError(Exception):
    """Base class of every error stage 1 raises (sources, model loading, the run)."""


class SourceError(EmbedError):
    """The image source cannot be read or names its images ambiguously (e.g. duplicate ids)."""


class ModelError(EmbedError):
    """The model cannot be built or its weights cannot be loaded."""
