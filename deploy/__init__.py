"""Deployment assets; ``deploy.loadtest`` is the load-test harness (a client, not a service)."""
