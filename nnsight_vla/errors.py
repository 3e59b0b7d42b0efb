"""Exceptions raised by nnsight-vla.

Every error a user can cause derives from :class:`VLAError`, which is a ``ValueError`` so that
generic ``except ValueError`` handlers keep working. Messages say what was wrong and what is allowed.
"""

from __future__ import annotations


class VLAError(ValueError):
    """Base class of every user-facing nnsight-vla error."""


class UnknownFamilyError(VLAError, KeyError):
    """A model family name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(VLAError):
    """A checkpoint folder or hub id that cannot be loaded (missing or partial files, wrong layout)."""


class InputError(VLAError):
    """Bad input to a model call (image shape/dtype, missing camera, state dimension, unknown unnorm_key...)."""


class IndexOutOfRangeError(VLAError, IndexError):
    """A layer or neuron index outside the model."""
