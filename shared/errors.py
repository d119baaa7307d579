"""Errors that map onto gRPC status codes.

Service logic raises these with a message that tells the caller what to fix; the
servicer decorator :func:`grpc_errors` turns them into the matching status. Anything
else is a bug and becomes INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from shared.logs import event

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


Handler = TypeVar("Handler", bound=Callable[..., Any])


def abort(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    context.abort(error.code, str(error))
    raise AssertionError("context.abort returned")  # abort always raises


def grpc_errors(method: Handler) -> Handler:
    """Decorate a servicer method: ServiceError -> its status, other errors -> INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ServiceError as error:
            event(
                log, "request rejected", level=logging.INFO, rpc=method.__name__, code=error.code.name, error=str(error)
            )
            abort(context, error)
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see server logs")

    return wrapper  # type: ignore[return-value]
