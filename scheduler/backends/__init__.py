"""Backends run worker containers: spawn, stop, list what they manage, and say how to
reach a worker. Docker is the one shipped; the pool only sees the interface."""
