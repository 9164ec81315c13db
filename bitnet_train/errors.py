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


class IntegrityError(CheckpointError):
    """A file does not match the manifest written with it (truncated, bit-flipped, missing).

    `file` is the damaged file (or the manifest itself when that is what is unreadable)."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class WriteError(BitNetTrainError, OSError):
    """A directory or file could not be written (disk full, quota, permissions...). The message
    names the directory and the bytes needed; nothing half-written is left behind."""
