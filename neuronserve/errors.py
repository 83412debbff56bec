"""Error classes that carry the gRPC status they map to.

A leaf module: every layer raises these; only service.py answers with `status`, and the CLI turns
them into a one-line message and exit code.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The gRPC statuses an error answers with, by grpc.StatusCode name. grpc is not imported here:
    this module loads before the CLI sets GRPC_VERBOSITY, which grpc-core reads once, at import."""

    INTERNAL = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    UNAVAILABLE = enum.auto()
    UNAUTHENTICATED = enum.auto()
    FAILED_PRECONDITION = enum.auto()

    @property
    def code(self):
        """The grpc.StatusCode of the same name."""
        import grpc

        return grpc.StatusCode[self.name]


class NeuronServeError(Exception):
    """Base class. `status` is the gRPC status the service answers with."""

    status: Status = Status.INTERNAL


class InvalidInput(NeuronServeError):
    """A request or a setting is malformed: wrong shape, dtype, size, value."""

    status: Status = Status.INVALID_ARGUMENT


class ConfigError(InvalidInput):
    """A configuration value (CLI flag, file, environment variable) is invalid."""


class NotFound(NeuronServeError):
    """An unknown model, version or entity id."""

    status: Status = Status.NOT_FOUND


class Overloaded(NeuronServeError):
    """The queue is full: rejected at once rather than waiting silently."""

    status: Status = Status.RESOURCE_EXHAUSTED


class DeadlineExceeded(NeuronServeError):
    """The request's deadline has passed or cannot be met."""

    status: Status = Status.DEADLINE_EXCEEDED


class Unavailable(NeuronServeError):
    """The server is draining or not ready, or the core running the request failed."""

    status: Status = Status.UNAVAILABLE


class LoadAbandoned(Unavailable):
    """A start-up or a version load given up because the server is stopping: not a failure of the
    artifact (model_control logs it at INFO and does not count it as a failed load)."""


class StoreUnavailable(Unavailable):
    """The shared embedding store (--embedding-store redis://...) cannot be reached or cannot take a
    write: an upsert is refused rather than acknowledged and lost (nothing is applied locally; a retry
    is safe, upserts are idempotent). Scoring goes on from the local copy."""


class CoreFault(Unavailable):
    """A NeuronCore (real or simulated) failed or hung while running a batch."""


class CoreResetting(CoreFault):
    """A core refused an execution because it is out of rotation after a fault: nothing ran, so the
    pipeline runs it on another group (a batch queued behind a faulting one is not lost)."""


class Unauthenticated(NeuronServeError):
    """An administrative RPC without the admin token (admin_auth.py)."""

    status: Status = Status.UNAUTHENTICATED


class ArtifactError(NeuronServeError):
    """An artifact is missing, tampered with, truncated or incompatible."""

    status: Status = Status.FAILED_PRECONDITION


class BackendUnavailable(NeuronServeError):
    """A backend cannot run here (e.g. torch-neuron or a NeuronCore is missing)."""

    status: Status = Status.FAILED_PRECONDITION


class ModelControlError(NeuronServeError):
    """A repository load or unload the server's --model-control does not allow (none or poll)."""

    status: Status = Status.FAILED_PRECONDITION
