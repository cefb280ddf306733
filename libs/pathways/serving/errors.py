"""Typed serving errors; the servicer maps each to its canonical gRPC status code."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """A request field with a bad value; the message names the field and the value."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """An unknown session, pathway or module."""

    code = grpc.StatusCode.NOT_FOUND


class Exhausted(ServingError):
    """No room (KV-cache slots, sessions); `retry_after_s` is the hint sent to the client."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(f"{message}; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class Unavailable(ServingError):
    """Not ready yet (loading weights, compiling) or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(ServingError):
    """A request the caller may not make (a path outside the server's allowed directories)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServingError):
    """A call out of order (e.g. training before Configure, Apply with backwards pending)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
