"""The worker's environment: every variable the gateway's backends set for a worker and
the worker reads, named once. The backends (``scheduler/backends/``) import these names;
``python -m wanwu_worker`` reads them as its flags' defaults. Importing this module
imports nothing else (no torch).
"""

from __future__ import annotations

# What to load
MODEL_DIR = "WANWU_MODEL_DIR"  # one bundle (a worker started for a model)
BUILTIN_MODEL = "WANWU_BUILTIN_MODEL"  # the image's own bundle, when none is mounted (set in the Dockerfile)
STEM = "WANWU_STEM"  # "1": a stem cell, which loads its model when it is told
MODELS_ROOT = "WANWU_MODELS_ROOT"  # the directory a stem cell may load bundles from

# Where to listen
SOCKET = "WANWU_SOCKET"  # a Unix socket path (docker, process)
LISTEN = "WANWU_LISTEN"  # HOST:PORT over TCP (swarm), with SECRET_FILE
SECRET_FILE = "WANWU_SECRET_FILE"  # the per-worker secret every request must carry

# Limits and threads
DEVICE = "WANWU_DEVICE"  # cuda, cuda:N or cpu; empty: what the bundle and the machine allow
MAX_PIXELS = "WANWU_MAX_PIXELS"  # decoded pixels an image may have
MAX_BODY_BYTES = "WANWU_MAX_BODY_BYTES"  # bytes of one request's body
TORCH_THREADS = "WANWU_TORCH_THREADS"  # torch's intra-op threads
PREPROCESS_THREADS = "WANWU_PREPROCESS_THREADS"  # decode and resize threads; 0: automatic

# Who it is (for its logs)
POOL_ID = "WANWU_POOL_ID"
WORKER_ID = "WANWU_WORKER_ID"
LOG_LEVEL = "WANWU_LOG_LEVEL"

DEFAULT_SOCKET = "/run/wanwu/worker.sock"
