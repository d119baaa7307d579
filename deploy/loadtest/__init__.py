"""Vitrine's gRPC load-test harness: locust users calling the real stubs, scenarios, reports.

``settings`` is the typed configuration, ``locustfile`` runs inside locust (gevent),
``runner`` drives locust headless in a subprocess, ``results`` summarises and writes
reports and ``local`` is ``make loadtest``. See deploy/loadtest/README.md.
"""
