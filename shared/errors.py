"""Errors that map onto gRPC status codes.

Service logic raises these with a message that tells the caller what to fix; the
servicer decorator :func:`grpc_errors` turns them into the matching status, with a
``google.rpc.BadRequest`` detail naming the field when the input was wrong. Anything
else is a bug and becomes INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.logs import event

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # The request field at fault, as a path ("context.session_item_ids"), if any.
        self.field = field


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


Handler = TypeVar("Handler", bound=Callable[..., Any])


def rich_status(error: ServiceError) -> grpc.Status:
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    if error.field is not None:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=error.field, description=str(error))
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    context.abort_with_status(rich_status(error))
    raise AssertionError("abort_with_status returned")  # it always raises


def grpc_errors(method: Handler) -> Handler:
    """Decorate a servicer method: ServiceError -> its status, other errors -> INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ServiceError as error:
            event(
                log, "request rejected", rpc=method.__name__, code=error.code.name, field=error.field, error=str(error)
            )
            abort(context, error)
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see server logs")

    return wrapper  # type: ignore[return-value]
