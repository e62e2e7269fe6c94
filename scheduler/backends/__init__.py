"""Backends run workers: spawn, stop, list what they manage, and say how to reach a
worker. ``factory.build_backend`` picks one from ``WANWU_BACKEND``; nothing outside this
package names a backend, and the pool only sees the interface in ``base.py``."""

BACKENDS = ("docker", "process", "swarm")
