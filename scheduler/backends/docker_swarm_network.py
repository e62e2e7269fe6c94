"""The swarm workers' network (``WANWU_SWARM_NETWORK``): it must be a swarm overlay,
should be ``--internal`` and, where every node's kernel can carry it, encrypted; and
whether a kernel can (IPsec). Workers listen on ``WORKER_PORT`` of their address on it."""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import docker
import docker.errors

from ..errors import BackendUnavailable, WorkerStartError
from .docker_common import ENGINE_ERRORS, first_line

# The parts of the swarm backend log under the name it had before it was split.
log = logging.getLogger("scheduler.backends.docker_swarm")

WORKER_PORT = 7070

# What Docker's encrypted overlay needs of the kernel: ESP security associations with
# AES-GCM, programmed over xfrm netlink, and iptables' policy match (it drops VXLAN
# packets of an encrypted network that arrive unencrypted). Build option -> module.
IPSEC_KERNEL = {
    "CONFIG_XFRM_USER": "xfrm_user",
    "CONFIG_INET_ESP": "esp4",
    "CONFIG_CRYPTO_GCM": "gcm",
    "CONFIG_NETFILTER_XT_MATCH_POLICY": "xt_policy",
}


def ipsec_support(config: str | None, modules: Collection[str]) -> tuple[bool, str]:
    """Whether a kernel can carry an ``encrypted`` overlay, and why: from its build
    configuration (``config``: /proc/config.gz or /boot/config-*, as text) or, without
    one, the modules it has loaded, built in or installed. A kernel that says nothing
    counts as unable: traffic that cannot be encrypted between nodes would be dropped,
    so the network stays unencrypted (with a warning) rather than dark."""
    if config is not None:
        built = dict(re.findall(r"^(CONFIG_\w+)=(\S+)", config, re.MULTILINE))
        missing = [option for option in IPSEC_KERNEL if built.get(option) not in ("y", "m")]
        if missing:
            return False, f"the kernel is built without {', '.join(missing)}"
        return True, f"the kernel is built with {', '.join(IPSEC_KERNEL)}"
    absent = [module for module in IPSEC_KERNEL.values() if module not in modules]
    if absent:
        return False, f"no kernel configuration to read, and no module {', '.join(absent)}"
    return True, f"the kernel has {', '.join(IPSEC_KERNEL.values())}"


def probe_ipsec(root: Path = Path("/"), release: str | None = None) -> tuple[bool, str]:
    """``ipsec_support`` of the running kernel (``root``: where /proc, /sys, /boot and
    /lib are). Nodes that share this kernel, as the test swarm's do, share the answer;
    other hosts must be asked on their own."""
    release = release or os.uname().release
    for path in (root / "proc" / "config.gz", root / "boot" / f"config-{release}"):
        try:
            raw = path.read_bytes()
            return ipsec_support(gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode(), ())
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
            continue
    modules = {p.name for p in (root / "sys" / "module").glob("*")}
    for listing in ("modules.builtin", "modules.dep"):  # what `modprobe -n` reads
        try:
            text = (root / "lib" / "modules" / release / listing).read_text()
        except OSError:
            continue
        modules |= {name.replace("-", "_") for name in re.findall(r"([\w-]+)\.ko\b", text)}
    return ipsec_support(None, modules)


def worker_network(client: docker.DockerClient, network: str, ipsec: Callable[[], tuple[bool, str]]) -> str:
    """The id of the worker network ``network``; WorkerStartError unless it is a swarm
    overlay. One that is not internal, or not encrypted, is used with a warning saying
    why (``ipsec``: whether this kernel could encrypt it, and why)."""
    try:
        info = client.api.inspect_network(network)
    except docker.errors.NotFound:
        encrypted = "--opt encrypted " if ipsec()[0] else ""
        raise WorkerStartError(
            f"the worker network {network!r} does not exist: create it with `docker network create "
            f"--driver overlay --internal {encrypted}{network}` or deploy deploy/swarm/stack.yml",
            "network",
        ) from None
    except ENGINE_ERRORS as exc:
        raise BackendUnavailable(f"cannot inspect network {network}: {first_line(exc)}") from exc
    if info.get("Driver") != "overlay" or info.get("Scope") != "swarm":
        raise WorkerStartError(
            f"the worker network {network!r} is a {info.get('Scope')} {info.get('Driver')} network; "
            "workers need a swarm overlay network",
            "network",
        )
    if not info.get("Internal"):
        log.warning("the worker network %s is not --internal: workers on it have a route out", network)
    if "encrypted" not in (info.get("Options") or {}):
        able, why = ipsec()
        log.warning(
            "the worker network %s is not encrypted: requests, answers and worker secrets cross between nodes "
            "in the clear (%s; %s)",
            network,
            why,
            "deploy with -c deploy/swarm/encrypted.yml where every node's kernel can"
            if able
            else "other hosts' kernels may differ: deploy/swarm/README.md, Encryption",
        )
    return str(info["Id"])


def address_on(task: dict[str, Any], network_id: str) -> str:
    for attachment in task.get("NetworksAttachments") or []:
        if (attachment.get("Network") or {}).get("ID") == network_id:
            for address in attachment.get("Addresses") or []:
                return str(address).split("/")[0]
    return ""
