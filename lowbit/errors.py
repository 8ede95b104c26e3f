"""Exceptions lowbit raises on bad input. Every message names the problem and the fix."""


class LowbitError(ValueError):
    """Bad input or a file lowbit cannot use; the message says what to do instead."""


class CheckpointError(LowbitError):
    """A checkpoint folder is missing, truncated, tampered with or from an unknown format version."""
