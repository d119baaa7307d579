"""The Admin service both servers expose: reload artifacts, report status."""

from __future__ import annotations

import time
from typing import Any

import grpc

from shared.errors import FailedPrecondition, InvalidArgument, grpc_errors
from shared.proto.vitrine.v1 import admin_pb2, admin_pb2_grpc
from shared.reloading import Reloadable, ReloadRefused

ADMIN_SERVICE_NAME = "vitrine.v1.Admin"
# Full method names: these need the bearer token whenever one is configured.
ADMIN_METHODS = (f"/{ADMIN_SERVICE_NAME}/ReloadArtifacts", f"/{ADMIN_SERVICE_NAME}/GetStatus")
MAX_VERSION_CHARS = 200


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, service_name: str, served: Reloadable[Any]) -> None:
        self._service_name = service_name
        self._served = served
        self._started_at = int(time.time())

    def _serving(self) -> admin_pb2.ArtifactVersion:
        return admin_pb2.ArtifactVersion(name=self._served.artifact, version=self._served.version)

    @grpc_errors
    def ReloadArtifacts(  # noqa: N802 (gRPC method name)
        self, request: admin_pb2.ReloadArtifactsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReloadArtifactsResponse:
        version = request.version.strip() or None
        # Versions are directory names under the artifact root: never a path.
        if version is not None and (len(version) > MAX_VERSION_CHARS or "/" in version or version.startswith(".")):
            raise InvalidArgument(f"version {version[:40]!r} is not a version directory name", field="version")
        try:
            outcome = self._served.reload(version)
        except ReloadRefused as refused:
            raise FailedPrecondition(str(refused), field="version") from refused
        return admin_pb2.ReloadArtifactsResponse(
            reloaded=outcome.reloaded, serving=self._serving(), message=outcome.message
        )

    @grpc_errors
    def GetStatus(  # noqa: N802 (gRPC method name)
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ServerStatus:
        return admin_pb2.ServerStatus(
            service=self._service_name,
            serving=self._serving(),
            started_at=self._started_at,
            reloads=self._served.reloads,
            refused_reloads=self._served.refused,
        )
