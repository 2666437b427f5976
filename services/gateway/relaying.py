"""A backend's failure as the gateway's caller sees it: one mechanism for the encoder workers, the
user-item worker and the index shards.

The backend's own status keeps its class and its message, and a field it names keeps its position
(see ServiceError.moved, for positions in the caller's request); only UNAVAILABLE and DEADLINE_EXCEEDED,
which speak of the backend rather than of the request, are reworded to name the backend.
"""

import grpc

from services.common.errors import DeadlineExceeded, ServiceError, Unavailable, error_for


def relayed(error: grpc.aio.AioRpcError, backend: str) -> ServiceError:
    """`error`, a call to `backend` (e.g. "worker host:port serving 'model'") failed with, for the caller."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{backend} is unavailable ({details}); retry shortly")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{backend} did not answer within the deadline")
    return error_for(code, details, error.trailing_metadata())
