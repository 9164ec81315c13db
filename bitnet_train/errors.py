"""Project exceptions. Each message names the offending key, file or record, and what to do."""


class BitNetTrainError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(BitNetTrainError, ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


class DataError(BitNetTrainError, ValueError):
    """A data source or record cannot be read as the configuration says."""


class CheckpointError(BitNetTrainError, RuntimeError):
    """A checkpoint or weight directory is missing, torn, or of another model shape."""


class TrainingError(BitNetTrainError, RuntimeError):
    """Training cannot continue (non-finite loss, full disk, ...)."""


class ExportError(BitNetTrainError, ValueError):
    """A model cannot be written in the requested format (and would be computed wrongly)."""
