"""Hot reload: swap a new artifact version in while serving, or refuse it and keep the old.

A :class:`Reloadable` holds the object requests are served from. A request takes
``get()`` once at its start and uses that object to the end, so a swap never changes
anything under an in-flight request; the swap itself is one reference assignment.
Reloads are serialised, verified by the loader (which opens the artifact through its
checksummed manifest), and a refused version leaves the old one serving.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.errors import Unavailable
from shared.logs import event
from shared.telemetry import RELOADS, set_artifact_version

log = logging.getLogger(__name__)

Served = TypeVar("Served")


def settle_heap() -> None:
    """Collect once, then exempt everything alive from later cyclic collections.

    Called once artifacts are loaded: the loaded tables are long-lived, and a full
    collection would otherwise walk them again every few hundred requests. Objects frozen
    earlier (a replaced version) are unfrozen first, so the collection frees their cycles.
    Reference counting still frees frozen objects without cycles as usual.
    """
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    event(log, "heap settled", frozen_objects=gc.get_freeze_count(), seconds=round(time.perf_counter() - started, 3))


class ReloadRefused(RuntimeError):
    """The new version did not load or verify; the old one keeps serving."""


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    version: str
    message: str


class Reloadable(Generic[Served]):
    def __init__(
        self,
        service: str,
        artifact: str,
        load: Callable[[str | None], Served],
        version_of: Callable[[Served], str],
        pointer: Callable[[], str],
        after_load: Callable[[], None] | None = None,
    ) -> None:
        """``load(version)`` builds the served object (None: the CURRENT version);
        ``pointer()`` reads which version CURRENT names, for the watcher; ``after_load``
        runs after the initial load and after every swap (e.g. :func:`settle_heap`).

        Nothing is loaded until :meth:`load_initial`, so a server can listen (and
        report NOT_SERVING) while its artifacts load.
        """
        self._service = service
        self._artifact = artifact
        self._load = load
        self._version_of = version_of
        self._pointer = pointer
        self.after_load = after_load
        self._lock = threading.Lock()
        self._current: Served | None = None
        self.reloads = 0
        self.refused = 0
        self._last_refused: str | None = None

    def load_initial(self) -> None:
        with self._lock:
            self._current = self._load(None)
            self._after_load()
        set_artifact_version(self._service, self._artifact, self.version, None)

    def _after_load(self) -> None:
        if self.after_load is not None:
            self.after_load()

    def get(self) -> Served:
        current = self._current
        if current is None:
            raise Unavailable(f"{self._artifact} is still loading; retry shortly")
        return current

    @property
    def artifact(self) -> str:
        return self._artifact

    @property
    def version(self) -> str:
        return self._version_of(self._current) if self._current is not None else ""

    def reload(self, version: str | None = None) -> ReloadOutcome:
        """Load ``version`` (default: what CURRENT names) and swap it in; raise ReloadRefused if it fails."""
        with self._lock:
            target = version or self._pointer()
            previous = self.version
            if target == previous:
                return ReloadOutcome(False, previous, f"{self._artifact} {previous} is already serving")
            started = time.perf_counter()
            try:
                candidate = self._load(target)
            except Exception as error:
                self.refused += 1
                self._last_refused = target
                RELOADS.labels(self._service, self._artifact, "refused").inc()
                event(
                    log,
                    "artifact refused; previous version keeps serving",
                    level=logging.ERROR,
                    artifact=self._artifact,
                    refused_version=target,
                    serving_version=previous,
                    error=str(error),
                )
                raise ReloadRefused(
                    f"{self._artifact} version {target} refused ({error}); {previous} keeps serving"
                ) from error
            self._current = candidate
            del candidate
            self._after_load()
            self.reloads += 1
            RELOADS.labels(self._service, self._artifact, "swapped").inc()
            set_artifact_version(self._service, self._artifact, self.version, previous)
            event(
                log,
                "artifact swapped in",
                artifact=self._artifact,
                version=self.version,
                previous=previous,
                load_seconds=round(time.perf_counter() - started, 3),
            )
            return ReloadOutcome(True, self.version, f"{self._artifact} {previous} -> {self.version}")

    def watch(self, interval_s: float, stop: threading.Event) -> threading.Thread:
        """Poll CURRENT every ``interval_s`` and reload when it names another version.

        A version that was refused is not retried until CURRENT names something else.
        """

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    target = self._pointer()
                except Exception as error:  # a missing pointer must not kill the watcher
                    event(log, "cannot read artifact pointer", level=logging.WARNING, error=str(error))
                    continue
                if target in (self.version, self._last_refused):
                    continue
                with contextlib.suppress(ReloadRefused):  # already logged and counted
                    self.reload(target)

        thread = threading.Thread(target=loop, name=f"{self._artifact}-watcher", daemon=True)
        thread.start()
        return thread
