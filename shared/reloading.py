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


class HeapFreezer:
    """Keeps the loaded artifacts out of the cyclic collector's full collections.

    The loaded tables are long-lived; without this, every full collection (one every few
    hundred requests) walks them all again. :meth:`after_initial_load` collects once and
    freezes what is alive (``gc.freeze``); nothing is in flight yet, so the pause is free.
    :meth:`after_swap` only unfreezes (O(1)): the replaced version becomes collectable,
    and the heap is frozen again right after the collector's next full collection, which
    would have run anyway. A swap therefore adds no collection pause of its own (a forced
    collection here held the GIL 0.06-0.1 s at 1M items), and nothing leaks.
    """

    def __init__(self) -> None:
        self._refreeze_pending = False
        gc.callbacks.append(self._on_collection)

    def after_initial_load(self) -> None:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        event(log, "heap frozen", objects=gc.get_freeze_count(), seconds=round(time.perf_counter() - started, 3))

    def after_swap(self) -> None:
        gc.unfreeze()
        self._refreeze_pending = True

    def close(self) -> None:
        """The server stopped: its tables may go (and another server's come) like any object."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        # After a full collection every generation is empty but the survivors: freezing
        # now exempts exactly what is alive.
        if self._refreeze_pending and phase == "stop" and info.get("generation") == 2:
            self._refreeze_pending = False
            gc.freeze()


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
    ) -> None:
        """``load(version)`` builds the served object (None: the CURRENT version);
        ``pointer()`` reads which version CURRENT names, for the watcher. Set
        :attr:`heap` to keep loaded versions out of the cyclic collector's sight.

        Nothing is loaded until :meth:`load_initial`, so a server can listen (and
        report NOT_SERVING) while its artifacts load.
        """
        self._service = service
        self._artifact = artifact
        self._load = load
        self._version_of = version_of
        self._pointer = pointer
        self.heap: HeapFreezer | None = None
        self._lock = threading.Lock()
        self._current: Served | None = None
        self.reloads = 0
        self.refused = 0
        self._last_refused: str | None = None

    def load_initial(self) -> None:
        with self._lock:
            self._current = self._load(None)
            if self.heap is not None:
                self.heap.after_initial_load()
        set_artifact_version(self._service, self._artifact, self.version, None)

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
            if self.heap is not None:
                self.heap.after_swap()
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
