"""Backends run workers: spawn, stop, list what they manage, and say how to reach a
worker (the seam is ``base.py``). ``docker`` runs hardened containers on this engine and
``process`` local child processes, each worker behind a Unix socket in the gateway's
socket directory; ``swarm`` runs swarm services reached over TCP on an overlay network,
each with its own secret. ``scheduler/assembly.py`` picks one from ``WANWU_BACKEND`` and
builds the pool over it; nothing in this package imports the pool, the settings or
anything else above it."""

BACKENDS = ("docker", "process", "swarm")
