"""Exceptions raised by vmonarch_opt. Every message names the problem and the fix."""


class VMonarchError(Exception):
    """Base class of the errors raised by vmonarch_opt."""


class CalibrationBatchError(VMonarchError, TypeError):
    """The calibration batch cannot be fed to the model."""


class CaptureError(VMonarchError):
    """The model's computation could not be captured as a graph."""


class ProfileError(VMonarchError):
    """A calibration profile does not fit the model, or the file is corrupt or too old."""
