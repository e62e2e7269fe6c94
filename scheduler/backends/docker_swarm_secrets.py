"""Each swarm worker's secret: a random token, kept as a Docker secret made at spawn
and removed with the worker, that the worker reads from a file and every request to it
must carry, so that nothing else on the worker network can use a worker."""

from __future__ import annotations

import logging
import secrets
import time

import docker
import docker.errors
import docker.types

from ..errors import BackendUnavailable
from .base import WORKER_UID
from .docker_common import ENGINE_ERRORS, POOL_LABEL, first_line

# The parts of the swarm backend log under the name it had before it was split.
log = logging.getLogger("scheduler.backends.docker_swarm")

SECRET_FILE = "wanwu-worker-secret"  # under /run/secrets in the worker


def new_token() -> str:
    """A worker's secret."""
    return secrets.token_urlsafe(32)


def secret_reference(secret_id: str, secret_name: str) -> docker.types.SecretReference:
    """The secret as the worker's container gets it: SECRET_FILE, readable by the worker alone."""
    return docker.types.SecretReference(
        secret_id, secret_name, filename=SECRET_FILE, uid=str(WORKER_UID), gid=str(WORKER_UID), mode=0o400
    )


def remove_secret(client: docker.DockerClient, name: str) -> None:
    """Remove the secret ``name``; a failure is logged, not raised."""
    # A secret is in use until the manager has processed its service's removal.
    for attempt in range(20):
        try:
            client.api.remove_secret(name)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "in use" not in str(exc) or attempt == 19:
                log.warning("cannot remove secret %s: %s", name, first_line(exc))
                return
        except ENGINE_ERRORS as exc:
            log.warning("cannot remove secret %s: %s", name, first_line(exc))
            return
        time.sleep(0.1)


def remove_pool_secrets(client: docker.DockerClient, pool_id: str) -> None:
    """Remove every secret of the pool ``pool_id`` (an earlier run's)."""
    try:
        leftovers = client.api.secrets(filters={"label": f"{POOL_LABEL}={pool_id}"})
    except ENGINE_ERRORS as exc:
        raise BackendUnavailable(f"cannot list secrets: {first_line(exc)}") from exc
    for secret in leftovers:
        remove_secret(client, str((secret.get("Spec") or {}).get("Name", secret.get("ID"))))
