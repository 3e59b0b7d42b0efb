"""The one error tree of nnsight-vla: every error the package raises on purpose derives from :class:`VLAError`.

Branches: input errors (also ``ValueError``), checkpoint errors, model-output errors (a forward that produced
no valid action), results-store errors, robot errors (connection errors also ``ConnectionError``), remote
errors. The CLI turns each into a one-line message and the exit code of its branch (:data:`EXIT_CODES`).
"""

from __future__ import annotations


class VLAError(Exception):
    """Base of every error nnsight-vla raises on purpose."""


# -- input ---------------------------------------------------------------------------------------------------


class InputError(VLAError, ValueError):
    """Bad input: an argument, an image, a file, a setting (the message says what is allowed)."""


class UnknownFamilyError(InputError, KeyError):
    """A model family name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class IndexOutOfRangeError(InputError, IndexError):
    """A layer or neuron index outside the model."""


class ConditionError(InputError):
    """A malformed experimental condition or sweep grid."""


class LiberoError(InputError):
    """Bad LIBERO run input: unknown suite or task, a family whose inputs LIBERO cannot provide, bad settings."""


class SafetyConfigError(InputError):
    """A safety configuration that is malformed or not safe to use."""


class FastEncodeError(InputError):
    """Actions the FAST tokenizer cannot encode (wrong shape, non-finite values)."""


# -- checkpoints and model outputs ---------------------------------------------------------------------------


class CheckpointError(VLAError):
    """A checkpoint folder or hub id that cannot be loaded (missing or partial files, wrong layout or values)."""


class ModelOutputError(VLAError):
    """A forward pass produced no valid action: non-finite or constant logits, a non-finite flow output."""


class FastDecodeError(ModelOutputError):
    """A generated FAST token sequence that does not decode to an action chunk."""


# -- results -------------------------------------------------------------------------------------------------


class ResultsError(VLAError):
    """A results folder that cannot be used (unwritable, not ours, corrupt, tampered with)."""


class ConfigMismatchError(ResultsError):
    """A results folder made with a different config (mixing would make the comparison meaningless)."""


# -- robots --------------------------------------------------------------------------------------------------


class RobotError(VLAError):
    """A problem with the robot or its setup (connection, model, camera, configuration, a safety stop)."""


class RobotConnectionError(RobotError, ConnectionError):
    """The controller cannot be reached, or does not answer like a UR controller."""


class RobotModelError(RobotError):
    """The controller is not the robot the configuration expects (model, serial number, kinematics)."""


class CameraError(RobotError):
    """A camera that cannot be opened or read."""


class RobotConfigError(RobotError, InputError):
    """A malformed runner configuration."""


class SafetyViolation(RobotError):
    """A command that cannot be made safe (e.g. NaN in an action); it was not sent."""

    def __init__(self, message: str, rule: str = "nonfinite"):
        super().__init__(message)
        self.rule = rule


class RobotHalted(RobotError):
    """The robot was stopped for safety (protective/emergency stop, lost connection, watchdog, stale state, a
    malformed policy output).

    ``reason`` says why; ``rule`` is the safety rule that fired. A halted robot object refuses every further
    command: resuming is a human decision (inspect the cause, clear the stop on the pendant, start a new run).
    """

    def __init__(self, reason: str, rule: str = "state"):
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


class TwinError(RobotError):
    """The controller twin could not start, or answered an admin request with an error."""


# -- remote --------------------------------------------------------------------------------------------------


class RemoteError(VLAError):
    """Remote execution failed or could not start."""


# The remote execution errors also derive from nnsight's own ``RemoteError`` (so ``except RemoteError`` written
# against nnsight keeps catching them). They are built on first use: importing nnsight takes seconds, and
# processes such as the UR5 controller twin import this module without needing it.
_REMOTE_DOCS = {
    "RemoteExecutionError": "A remote run failed (also nnsight's ``RemoteError``). Attributes: ``host``, "
                            "``model_key``, ``server_message`` (the server's own text, key removed), ``job_id``.",
    "RemoteUnreachableError": "No connection to the server (refused, unknown host, closed mid-job, service "
                              "unavailable).",
    "RemoteTimeoutError": "A bound ran out: the connect/handshake timeout, the client's total deadline, or the "
                          "server's own limit.",
    "RemoteModelError": "The server could not build or deploy the model key (class not allowed or not importable, "
                        "checkpoint missing...).",
    "RemoteJobError": "The traced block raised on the server; ``server_message`` holds the server's traceback.",
    "RemoteAuthError": "The server rejected the API key.",
}
_REMOTE: dict[str, type] = {}


def _remote_classes() -> dict[str, type]:
    if _REMOTE:
        return _REMOTE
    try:
        from nnsight.intervention.backends.remote import RemoteError as nnsight_remote_error
    except ImportError:  # pragma: no cover - nnsight is a dependency
        nnsight_remote_error = Exception

    def init(self, message: str, *, host: str | None = None, model_key: str | None = None,
             server_message: str | None = None, job_id: str | None = None) -> None:
        Exception.__init__(self, message)
        self.host, self.model_key, self.server_message, self.job_id = host, model_key, server_message, job_id

    def make(name: str, bases: tuple) -> type:
        cls = type(name, bases, {"__doc__": _REMOTE_DOCS[name], "__module__": __name__, "__qualname__": name})
        _REMOTE[name] = cls
        return cls

    base = make("RemoteExecutionError", (RemoteError, nnsight_remote_error))
    base.__init__ = init
    make("RemoteUnreachableError", (base, ConnectionError))
    make("RemoteTimeoutError", (base, TimeoutError))
    for name in ("RemoteModelError", "RemoteJobError", "RemoteAuthError"):
        make(name, (base,))
    return _REMOTE


def __getattr__(name: str) -> type:
    if name in _REMOTE_DOCS:
        return _remote_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StackError(RemoteError):
    """The local NDIF stack could not be installed, started or stopped."""


#: the CLI's exit code per branch (the first matching class wins; 1 for any other VLAError)
EXIT_CODES: tuple[tuple[type, int], ...] = (
    (RobotError, 4),
    (InputError, 2),
    (CheckpointError, 3),
    (RemoteError, 5),
    (ResultsError, 6),
    (ModelOutputError, 7),
)


def exit_code(error: BaseException) -> int:
    """The CLI exit code of an error (see :data:`EXIT_CODES`)."""
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1
