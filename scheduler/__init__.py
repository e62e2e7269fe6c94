"""wanwu's scheduler: a warm pool of worker containers driven by a pure policy.

Nothing here imports torch or flask; only ``scheduler.backends.docker*`` imports docker.
"""
