"""Errors that carry their gRPC status, so handlers raise and one interceptor answers.

One class per status code the services answer with, and one table from code to class (`error_for`), used
wherever a status is turned back into an error (a relay of another process's answer).

An error about one field of the request names it in `field` (a path such as `inputs[3].text`): its message
is then `"<field> <description>"`, and the status carries the field structurally, as a
`google.rpc.BadRequest` field violation in its details, so that a relay can point it at the caller's own
request (`moved`) without reading the message text.
"""

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

Metadata = Iterable[tuple[str, str | bytes]]  # a call's trailing metadata


class ServiceError(Exception):
    """An error the caller can act on: a status code and a message that says what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, description: str, *, field: str = "") -> None:
        self.field = field
        self.description = description
        self.message = f"{field} {description}" if field else description
        super().__init__(self.message)

    def moved(self, sent: str, positions: list[int], field: str) -> "ServiceError":
        """This error, as the caller of a relay sees it: a field `sent[i]...` of the sub-request that was
        sent becomes `field[positions[i]]...` of the caller's request. Unchanged when it names no such field."""
        index, rest = _indexed(self.field, sent)
        if index is None or index >= len(positions):
            return self
        return type(self)(self.description, field=f"{field}[{positions[index]}]{rest}")

    def status_details(self) -> tuple[tuple[str, str | bytes], ...]:
        """Trailing metadata carrying the field violation (none when no field is at fault)."""
        if not self.field:
            return ()
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=self.field, description=self.description
        )
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return tuple(rpc_status.to_status(status).trailing_metadata)


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


# Every class above, by its code (only the ones this module defines exist when it is built).
_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    error.code: error for error in ServiceError.__subclasses__()
}


def error_for(code: grpc.StatusCode, message: str, metadata: Metadata | None = None) -> ServiceError:
    """The error a status stands for: its code's class (UNKNOWN and OK, which no service answers on
    purpose, count as INTERNAL), with the field at fault when `metadata` (the call's trailing metadata)
    carries one."""
    field, description = _violation(metadata, message)
    error_class = _BY_CODE.get(code, Internal)
    if field:
        return error_class(description, field=field)
    return error_class(message)


def _violation(metadata: Metadata | None, message: str) -> tuple[str, str]:
    """(field, description) of the status's first BadRequest field violation, when its message is the one
    that violation makes; else ("", message)."""
    for key, value in metadata or ():
        if key != rpc_status.GRPC_DETAILS_METADATA_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                for violation in bad_request.field_violations:
                    if f"{violation.field} {violation.description}" == message:
                        return violation.field, violation.description
    return "", message


def _indexed(field: str, name: str) -> tuple[int | None, str]:
    """For a field path `name[i]rest`: (i, rest); else (None, "")."""
    prefix = f"{name}["
    if not field.startswith(prefix):
        return None, ""
    close = field.find("]", len(prefix))
    digits = field[len(prefix) : close]
    if close < 0 or not digits.isdigit():
        return None, ""
    return int(digits), field[close + 1 :]
