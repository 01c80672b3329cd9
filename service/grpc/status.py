"""The gRPC status of each service error; the message is the one HTTP answers with.

- 400, 413, 422: INVALID_ARGUMENT
- 401: UNAUTHENTICATED
- 404: NOT_FOUND
- 408: DEADLINE_EXCEEDED (the request did not arrive in time)
- 409: ABORTED (a conflict: the session moved on or was taken over; re-read and retry)
- 429: RESOURCE_EXHAUSTED (a per-key quota)
- 503 for ``max_sessions`` reached: RESOURCE_EXHAUSTED (a quota: retrying helps only once
  sessions end or expire)
- 503 otherwise (not ready, queue full, store unreachable): UNAVAILABLE (transient: retry with
  backoff)
- 500: INTERNAL

HTTP's ``Retry-After: 1`` has no counterpart in a gRPC status; UNAVAILABLE is the code gRPC
retry policies and proxies treat as safe to retry.
"""

from __future__ import annotations

import grpc

from service.engine.errors import ServiceError, SessionLimitReached

BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status code that reports ``error``."""
    if isinstance(error, SessionLimitReached):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    fallback = grpc.StatusCode.INTERNAL if error.status_code >= 500 else grpc.StatusCode.UNKNOWN
    return BY_HTTP_STATUS.get(error.status_code, fallback)
