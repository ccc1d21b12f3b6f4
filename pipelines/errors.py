"""The data pipelines' own exceptions. Library code raises these; the CLIs turn them into messages."""


class PipelineError(Exception):
    """Base class of every error the data pipelines raise."""


class VQAFormatError(PipelineError, ValueError):
    """A VQA v2 file is missing, malformed or inconsistent; the message names file, record, problem."""


class DatasetExistsError(PipelineError):
    """The output folder already holds a dataset or shards; nothing is overwritten."""


class MissingEmbeddingsError(PipelineError):
    """Records refer to ids that a cache lacks.

    Attributes:
        modality: the cache's modality name (``image``, ``audio``, ...).
        missing_ids: the distinct missing ids, in record order.
        records: how many records are affected.
    """

    def __init__(self, message, modality, missing_ids, records):
        super().__init__(message)
        self.modality = modality
        self.missing_ids = list(missing_ids)
        self.records = records


class TrainingDiverged(PipelineError):
    """The training loss stopped being finite (the last good checkpoint is kept)."""


class SweepError(PipelineError):
    """A sweep cannot run or be reported (bad grid, incompatible runs directory)."""


class GridError(SweepError, ValueError):
    """A grid point is impossible for the model or the cache; the message names the flag."""


class ResumeError(PipelineError, ValueError):
    """``--resume`` given settings other than its checkpoint's; the message names the flags."""
