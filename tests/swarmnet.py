"""A real multi-node Docker Swarm on this one machine, for tests.

Each node is its own ``dockerd`` (which starts its own containerd) with its own network
namespace, hostname (UTS namespace) and cgroup; each node's ``eth0`` is one end of a
veth pair whose other end hangs off a Linux bridge in one more namespace, so the
cluster's 10.231.0.0/24 addresses exist only inside namespaces, never on the host.
Everything made here is named after PREFIX (network namespaces, cgroups in every v1
hierarchy, a root directory under /tmp holding data roots, sockets and logs), which is
how ``leftovers()`` and ``clean_leftovers()`` find what a crashed run left behind.

This machine shapes it: the kernel has no IPVS, so services must use
``endpoint_mode="dnsrr"`` and cannot publish ports on the ingress mesh (host-mode
publishing works); there is no registry, so images are copied from the host engine
(``docker save``) into the nodes that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from tests.dockerutil import IMAGE
from tests.workerprocs import live_processes

PREFIX = "wwsw"
ROOT_BASE = Path("/tmp")  # short: a node's socket paths must stay under 108 bytes
CGROUPS = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
# containerd 1.6 puts every shim's socket here whatever its own paths are; a SIGKILLed
# shim leaves its socket behind.
SHIM_SOCKETS = Path("/run/containerd/s")
SUBNET = "10.231.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"
GPU_RESOURCE = "NVIDIA-GPU"
SWARM_PORT = 2377
START_TIMEOUT_S = 120.0
HEARTBEAT_NS = 1_000_000_000  # the dispatcher's heartbeat: a dead node is seen in seconds
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

# Runs as `sh -c` inside `unshare --uts`: name the host, move into the node's pids and
# freezer cgroups (so every process dockerd starts, containers included, can be found
# and killed), then become `nsenter --net=... dockerd ...`; one pid throughout.
_ENTER_NODE = 'hostname "$1" && echo $$ > "$2" && echo $$ > "$3" && shift 3 && exec "$@"'


class SwarmError(RuntimeError):
    """The cluster could not be built, changed or removed as asked."""


@dataclass
class Node:
    """One swarm node: a dockerd in its own network namespace, hostname and cgroup."""

    name: str  # n1, n2, ...; n1 is the manager
    address: str  # its eth0 address on the cluster bridge
    dir: Path  # data root, exec root, socket, log
    unit: str  # "<cluster id>-<name>": its network namespace and its cgroup
    gpus: int = 0  # fake GPUs advertised as swarm generic resources
    images: tuple[str, ...] = ()
    swarm_id: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _client: docker.DockerClient | None = field(default=None, repr=False)

    @property
    def hostname(self) -> str:
        return f"wanwu-{self.name}"

    @property
    def socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def exec_root(self) -> Path:
        return self.dir / "exec"

    @property
    def log_path(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def gpu_ids(self) -> list[str]:
        return [f"GPU-fake-{index}" for index in range(self.gpus)]

    def client(self) -> docker.DockerClient:
        """A client of this node's engine (cached)."""
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.base_url, timeout=60)
        return self._client

    def drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def dockerd_argv(self) -> list[str]:
        argv = [
            "dockerd",
            f"--config-file={self.dir / 'daemon.json'}",
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.dir / 'docker.pid'}",
            f"--host={self.base_url}",
            f"--containerd-namespace={self.unit}",
            f"--containerd-plugins-namespace={self.unit}p",
            f"--cgroup-parent=/{self.unit}",
            "--bridge=none",
            "--userland-proxy=false",
            "--no-new-privileges",  # services in API 1.41 cannot ask for it; workers rely on it
        ]
        argv += [f"--node-generic-resource={GPU_RESOURCE}={gpu}" for gpu in self.gpu_ids]
        return argv


class SwarmCluster:
    """``nodes`` dockerds on one bridge forming one swarm; n1 is its only manager.

    ``gpu_nodes`` maps node names to how many fake GPUs each advertises as the swarm
    generic resource NVIDIA-GPU; ``images`` are loaded from the host engine into every
    node (deploy/swarm/distribute-image.sh adds more). Use it as a context manager, or call
    ``start()`` and then ``close()`` (also after a failed start)."""

    def __init__(
        self,
        nodes: int = 3,
        gpu_nodes: dict[str, int] | None = None,
        images: Iterable[str] = (IMAGE,),
    ) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be 1..250, not {nodes}")
        names = [f"n{index}" for index in range(1, nodes + 1)]
        gpu_nodes = gpu_nodes or {}
        if unknown := sorted(set(gpu_nodes) - set(names)):
            raise ValueError(f"gpu_nodes names nodes that do not exist: {unknown} (nodes are {names})")
        self.id = f"{PREFIX}-{secrets.token_hex(3)}"
        self.root = ROOT_BASE / self.id
        self.bridge_netns = f"{self.id}-br"
        images = tuple(images)
        self.nodes = {
            name: Node(
                name=name,
                address=f"{SUBNET}.{index}",
                dir=self.root / name,
                unit=f"{self.id}-{name}",
                gpus=gpu_nodes.get(name, 0),
                images=images,
            )
            for index, name in enumerate(names, start=1)
        }
        self.manager = self.nodes["n1"]
        self.timings_s: dict[str, float] = {}
        self._relays: list[_Relay] = []
        self._closed = False

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Build the network, start the daemons, form the swarm and load the images,
        recording each phase's seconds in ``timings_s``. Raises SwarmError (with the
        daemons' log tails) rather than wait past START_TIMEOUT_S for daemons or swarm."""
        self.root.mkdir(mode=0o700)
        log.info("swarm %s: starting %d nodes under %s", self.id, len(self.nodes), self.root)
        deadline = time.monotonic() + START_TIMEOUT_S
        self._phase("network", self._build_network)
        self._phase("daemons", lambda: self._start_daemons(deadline))
        self._phase("swarm", lambda: self._form_swarm(deadline))
        self._phase("images", self._load_images)
        log.info("swarm %s: up in %s", self.id, self.timings_s)

    def close(self) -> float:
        """Remove everything this cluster made (processes, mounts, namespaces, cgroups,
        files); safe after a partial start, and again. Seconds it took."""
        if self._closed:
            return 0.0
        self._closed = True
        began = time.monotonic()
        for relay in list(self._relays):
            relay.close()
        for node in self.nodes.values():
            node.drop_client()
        _remove(self.id)
        for node in self.nodes.values():
            _reap(node.process)
        seconds = time.monotonic() - began
        log.info("swarm %s: removed in %.1f s", self.id, seconds)
        return seconds

    def __enter__(self) -> SwarmCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- nodes ------------------------------------------------------------------------

    def node_id(self, name: str) -> str:
        """The swarm's id of node ``name``."""
        node_id = self.nodes[name].swarm_id
        if not node_id:
            raise SwarmError(f"{name} has not joined the swarm")
        return node_id

    def kill(self, name: str) -> None:
        """A power cut: unplug the node's cable and SIGKILL all its processes (dockerd,
        containerd, shims, containers) at once. What a reboot would lose goes too: its
        mounts and runtime state; its data root stays for ``restart``."""
        node = self.nodes[name]
        _run("ip", "-n", self.bridge_netns, "link", "set", _bridge_port(node), "down")
        node.drop_client()
        killed = _kill_cgroup(node.unit)
        _reap(node.process)
        _unmount_under(node.dir)
        _remove_shim_sockets(node.unit)
        _remove_cgroups(lambda: _node_cgroups(node.unit))
        shutil.rmtree(node.exec_root, ignore_errors=True)
        log.info("swarm %s: killed %s (%d processes)", self.id, name, killed)

    def restart(self, name: str, timeout: float = 60) -> float:
        """Boot a killed node again: fresh network namespace and cable, dockerd on the
        same data root (it rejoins the swarm by itself). Waits until the manager sees it
        ready; seconds it took."""
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is None:
            raise SwarmError(f"{name} is running: kill() it first")
        began = time.monotonic()
        # Deleting one end of the cable deletes both at once (a namespace goes asynchronously).
        _run("ip", "-n", self.bridge_netns, "link", "del", _bridge_port(node))
        _run("ip", "netns", "del", node.unit)
        self._plug(node)
        self._launch(node)
        self._wait_daemon(node, began + timeout)
        self.wait_node(name, "ready", timeout - (time.monotonic() - began))
        seconds = time.monotonic() - began
        log.info("swarm %s: %s restarted and ready in %.1f s", self.id, name, seconds)
        return seconds

    def wait_node(self, name: str, state: str, timeout: float) -> float:
        """Wait until the manager reports node ``name`` in ``state`` ("ready", "down");
        seconds it took."""
        node_id = self.node_id(name)
        began = time.monotonic()
        while True:
            try:
                seen = self.manager.client().api.inspect_node(node_id)["Status"]["State"]
            except (docker.errors.DockerException, requests.RequestException) as exc:
                seen = f"unknown (manager: {exc})"
            waited = time.monotonic() - began
            if seen == state:
                log.info("swarm %s: %s is %s after %.1f s", self.id, name, state, waited)
                return waited
            if waited > timeout:
                raise SwarmError(f"{name} is {seen!r}, not {state!r}, after {timeout:.0f} s")
            time.sleep(0.1)

    @contextlib.contextmanager
    def relay(self, address: str, port: int) -> Iterator[tuple[str, int]]:
        """Forward TCP from a port on 127.0.0.1 (host namespace) to ``address:port`` as
        seen from the cluster bridge; yields (host, port) to connect to."""
        relay = _Relay(NETNS_DIR / self.bridge_netns, (address, port))
        self._relays.append(relay)
        try:
            yield relay.address
        finally:
            relay.close()
            self._relays.remove(relay)

    # -- start phases -----------------------------------------------------------------

    def _phase(self, name: str, run: Callable[[], None]) -> None:
        began = time.monotonic()
        try:
            run()
        except SwarmError:
            raise
        except Exception as exc:
            tails = "\n".join(f"--- {node.name} dockerd log ---\n{node.log_tail(1500)}" for node in self.nodes.values())
            raise SwarmError(f"swarm {self.id}: {name} failed: {exc}\n{tails}") from exc
        self.timings_s[name] = round(time.monotonic() - began, 2)
        log.info("swarm %s: %s took %.1f s", self.id, name, self.timings_s[name])

    def _build_network(self) -> None:
        _run("ip", "netns", "add", self.bridge_netns)
        for argv in (
            ("link", "set", "lo", "up"),
            ("link", "add", "br0", "type", "bridge"),
            ("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", "br0"),
            ("link", "set", "br0", "up"),
        ):
            _run("ip", "-n", self.bridge_netns, *argv)
        for node in self.nodes.values():
            self._plug(node)

    def _plug(self, node: Node) -> None:
        """Give ``node`` a network namespace whose eth0 is cabled to the bridge."""
        port = _bridge_port(node)
        _run("ip", "netns", "add", node.unit)
        for netns, *argv in (
            (self.bridge_netns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.unit),
            (self.bridge_netns, "link", "set", port, "master", "br0", "up"),
            (node.unit, "link", "set", "lo", "up"),
            (node.unit, "addr", "add", f"{node.address}/24", "dev", "eth0"),
            (node.unit, "link", "set", "eth0", "up"),
        ):
            _run("ip", "-n", netns, *argv)

    def _start_daemons(self, deadline: float) -> None:
        for node in self.nodes.values():
            self._launch(node)
        for node in self.nodes.values():
            self._wait_daemon(node, deadline)

    def _launch(self, node: Node) -> None:
        node.dir.mkdir(exist_ok=True)
        # Its own daemon.json (not /etc/docker's) and its own key.json, hence engine ID.
        (node.dir / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(node.dir / "key.json")}))
        procs = []
        for controller in ("pids", "freezer"):
            group = CGROUPS / controller / node.unit
            group.mkdir(exist_ok=True)
            procs.append(str(group / "cgroup.procs"))
        argv = ["unshare", "--uts", "--", "sh", "-c", _ENTER_NODE, "sh", node.hostname, *procs]
        argv += ["nsenter", f"--net={NETNS_DIR / node.unit}", "--", *node.dockerd_argv()]
        # Without it each task first tries Docker Hub and waits for a DNS timeout.
        env = dict(os.environ, DOCKER_SERVICE_PREFER_OFFLINE_IMAGE="1")
        with node.log_path.open("ab") as out:
            node.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        log.info(
            "swarm %s: started dockerd of %s (pid %d, %d fake GPUs)", self.id, node.name, node.process.pid, node.gpus
        )

    def _wait_daemon(self, node: Node, deadline: float) -> None:
        assert node.process is not None
        probe = docker.APIClient(base_url=node.base_url, version="1.41", timeout=2)
        try:
            while True:
                if node.process.poll() is not None:
                    raise SwarmError(
                        f"dockerd of {node.name} exited with {node.process.returncode}:\n{node.log_tail()}"
                    )
                with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                    if node.socket.exists() and probe.ping():
                        return
                if time.monotonic() > deadline:
                    raise SwarmError(f"dockerd of {node.name} did not answer in time:\n{node.log_tail()}")
                time.sleep(0.1)
        finally:
            probe.close()

    def _form_swarm(self, deadline: float) -> None:
        manager = self.manager.client()
        manager.swarm.init(
            advertise_addr=self.manager.address,
            listen_addr=f"{self.manager.address}:{SWARM_PORT}",
            dispatcher_heartbeat_period=HEARTBEAT_NS,
            task_history_retention_limit=2,
        )
        manager.swarm.reload()
        token = manager.swarm.attrs["JoinTokens"]["Worker"]
        for node in self.nodes.values():
            if node is not self.manager:
                node.client().swarm.join(
                    remote_addrs=[f"{self.manager.address}:{SWARM_PORT}"],
                    join_token=token,
                    listen_addr=f"{node.address}:{SWARM_PORT}",
                    advertise_addr=node.address,
                )
        for node in self.nodes.values():
            node.swarm_id = node.client().info()["Swarm"]["NodeID"]
            self.wait_node(node.name, "ready", deadline - time.monotonic())

    def _load_images(self) -> None:
        wanted = sorted({tag for node in self.nodes.values() for tag in node.images})
        if not wanted:
            return
        tars = self._save_images(wanted)
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for done in [pool.submit(self._load_into, node, tars) for node in self.nodes.values()]:
                done.result()

    def _save_images(self, tags: list[str]) -> dict[str, Path]:
        """``docker save`` each image from the host engine into a tar under the root."""
        (self.root / "images").mkdir(exist_ok=True)
        host = docker.from_env(timeout=300)
        try:
            return {tag: self._save_image(host, tag) for tag in tags}
        finally:
            host.close()

    def _save_image(self, host: docker.DockerClient, tag: str) -> Path:
        began = time.monotonic()
        try:
            host.images.get(tag)
        except docker.errors.ImageNotFound as exc:
            raise SwarmError(f"image {tag} is not in the host engine: build it first") from exc
        tar = self.root / "images" / (re.sub(r"[^\w.-]", "_", tag) + ".tar")
        with tar.open("wb") as out:
            for chunk in host.api.get_image(tag, chunk_size=1 << 20):
                out.write(chunk)
        log.info("swarm %s: saved %s in %.1f s", self.id, tag, time.monotonic() - began)
        return tar

    def _load_into(self, node: Node, tars: dict[str, Path]) -> None:
        api = docker.APIClient(base_url=node.base_url, timeout=300)
        try:
            for tag in node.images:
                began = time.monotonic()
                with tars[tag].open("rb") as data:
                    for message in api.load_image(data):
                        if "error" in message:
                            raise SwarmError(f"loading {tag} into {node.name}: {message['error']}")
                api.inspect_image(tag)
                log.info("swarm %s: loaded %s into %s in %.1f s", self.id, tag, node.name, time.monotonic() - began)
        finally:
            api.close()


# -- finding and removing what this module made ---------------------------------------


def unsupported() -> str | None:
    """Why this machine cannot run a SwarmCluster, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, mounts, cgroups)"
    for tool in ("ip", "nsenter", "unshare", "dockerd", "containerd", "runc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    if Path("/run/containerd/containerd.sock").exists():
        # dockerd 20.10 then uses that containerd instead of starting its own: the nodes'
        # shims would live in the system containerd's cgroup, out of reach of kill().
        return "a system containerd runs (/run/containerd/containerd.sock): nodes would share it"
    for controller in ("pids", "freezer"):
        if not (CGROUPS / controller / "cgroup.procs").is_file():
            return f"no cgroup v1 {controller} hierarchy at {CGROUPS / controller}"
    probe = f"{PREFIX}-probe-{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _run("ip", "-n", probe, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789")
    except (SwarmError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace with a bridge, a veth pair and a vxlan: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


def leftovers() -> list[str]:
    """Everything of PREFIX still present: network namespaces, cgroups, mounts,
    processes, root directories, shim sockets (empty after a clean run)."""
    return _leftovers(PREFIX + "-")


def clean_leftovers() -> None:
    """Remove everything of PREFIX (what a crashed run left behind). Kills any live
    cluster too, so only call it when no other process is using one."""
    _remove(PREFIX + "-")


def _leftovers(marker: str) -> list[str]:
    found = [f"netns {name}" for name in _netns(marker)]
    found += [f"cgroup {path}" for path in _cgroup_tops(marker)]
    found += [f"mount {point}" for point in _mount_points(marker)]
    found += [f"process {pid}: {what}" for pid, what in _processes(marker).items()]
    found += [f"directory {path}" for path in _roots(marker)]
    found += [f"shim socket {path}" for path in _stale_shim_sockets(marker)]
    return found


def _remove(marker: str) -> None:
    """Remove everything whose name starts with ``marker``; SwarmError naming what is
    left if something would not go."""
    for unit in sorted({path.name for path in _cgroup_tops(marker)}):
        with contextlib.suppress(SwarmError):
            _kill_cgroup(unit)
    for pid in _processes(marker):  # e.g. a dockerd that never reached its cgroup
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for root in _roots(marker):
        _unmount_under(root)
    for unit in _units(marker):
        _remove_shim_sockets(unit)
    for name in _netns(marker):
        try:
            _run("ip", "netns", "del", name)
        except SwarmError as exc:
            log.warning("%s", exc)
    _remove_cgroups(lambda: _cgroup_tops(marker))
    # Each node's data root holds its own copy of the images: delete them side by side.
    trees = [tree for root in _roots(marker) for tree in root.iterdir()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda tree: shutil.rmtree(tree, ignore_errors=True), trees))
    for root in _roots(marker):
        shutil.rmtree(root, ignore_errors=True)
    if left := _leftovers(marker):
        raise SwarmError("could not remove: " + "; ".join(left))


def _run(*argv: str, timeout: float = 30) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SwarmError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _bridge_port(node: Node) -> str:
    """The bridge's end of the node's cable (a name inside the bridge namespace)."""
    return f"v{node.name}"


def _reap(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


def _netns(marker: str) -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(marker))
    except FileNotFoundError:
        return []


def _roots(marker: str) -> list[Path]:
    return sorted(ROOT_BASE.glob(f"{marker}*"))


def _hierarchies() -> list[Path]:
    return sorted(path for path in CGROUPS.iterdir() if (path / "cgroup.procs").is_file())


def _cgroup_tops(marker: str) -> list[Path]:
    """Top-level cgroups named ``marker...`` in every hierarchy."""
    return sorted(path for hierarchy in _hierarchies() for path in hierarchy.glob(f"{marker}*") if path.is_dir())


def _node_cgroups(unit: str) -> list[Path]:
    """Node ``unit``'s cgroup in every hierarchy where it exists."""
    return [hierarchy / unit for hierarchy in _hierarchies() if (hierarchy / unit).is_dir()]


def _cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for directory, _, _ in os.walk(top):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(pid) for pid in Path(directory, "cgroup.procs").read_text().split())
    return pids


def _kill_cgroup(unit: str, timeout: float = 20) -> int:
    """SIGKILL every process in cgroup ``unit`` and below (any hierarchy) until none is
    left; how many. Frozen first, so that none runs (or forks) while the others die."""
    tops = _node_cgroups(unit)
    freezer = CGROUPS / "freezer" / unit / "freezer.state"
    frozen = _freeze(freezer)
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while pids := set().union(*(_cgroup_pids(top) for top in tops)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed |= pids
            if frozen:  # SIGKILL takes effect once thawed
                frozen = not _write(freezer, "THAWED")
            if time.monotonic() > deadline:
                raise SwarmError(f"processes of {unit} still alive after {timeout:.0f} s: {sorted(pids)}")
            time.sleep(0.02)
    finally:
        if frozen:
            _write(freezer, "THAWED")
    return len(killed)


def _freeze(state: Path, timeout: float = 5) -> bool:
    if not _write(state, "FROZEN"):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if state.read_text().strip() == "FROZEN":
                return True
        time.sleep(0.01)
    log.warning("%s did not freeze in %.0f s; killing anyway", state.parent, timeout)
    return True


def _write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError:
        return False
    return True


def _remove_cgroups(find: Callable[[], list[Path]], timeout: float = 10) -> None:
    """rmdir the cgroups that ``find`` lists and all below them, deepest first (runc
    makes ``<unit>/<container id>`` in every hierarchy); retried while they drain."""
    deadline = time.monotonic() + timeout
    while (tops := find()) and time.monotonic() < deadline:
        for top in tops:
            for directory, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        time.sleep(0.05)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [_unescape(line.split(" ")[4]) for line in lines]


def _mount_points(marker: str) -> list[str]:
    return [point for point in _mounts() if point.startswith(f"{ROOT_BASE}/{marker}")]


def _unmount_under(top: Path, rounds: int = 5) -> None:
    """Detach every mount at or below ``top``, deepest first (mounts can be stacked)."""
    for _ in range(rounds):
        points = [point for point in _mounts() if point == str(top) or point.startswith(f"{top}/")]
        if not points:
            return
        for point in sorted(points, key=lambda point: point.count("/"), reverse=True):
            if _libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
                code = ctypes.get_errno()
                if code not in (errno.EINVAL, errno.ENOENT):
                    log.warning("cannot unmount %s: %s", point, os.strerror(code))


def _processes(marker: str) -> dict[int, str]:
    """Live processes whose command line names a root of ``marker`` or that sit in one of
    its cgroups."""
    in_cgroups = set().union(*(_cgroup_pids(top) for top in _cgroup_tops(marker)))
    needle = f"{ROOT_BASE}/{marker}".encode()
    return {
        pid: cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
        for pid, cmdline in live_processes("cmdline")
        if needle in cmdline or pid in in_cgroups
    }


def _shim_socket(address: Path, namespace: str, container_id: str) -> Path:
    """Where containerd 1.6 puts the socket of the shim of ``container_id``."""
    digest = hashlib.sha256(str(address / namespace / container_id).encode()).hexdigest()
    return SHIM_SOCKETS / digest


def _subdirs(path: Path) -> set[str]:
    try:
        return {entry.name for entry in path.iterdir() if entry.is_dir()}
    except OSError:
        return set()


def _shim_sockets(unit: str) -> list[Path]:
    """The sockets that the shims of node ``unit`` have or had, one per container that
    containerd made a task bundle or runc a cgroup for."""
    cluster, name = unit.rsplit("-", 1)
    containerd = ROOT_BASE / cluster / name / "exec" / "containerd"
    ids = _subdirs(containerd / "daemon" / "io.containerd.runtime.v2.task" / unit)
    for top in _node_cgroups(unit):
        ids |= _subdirs(top)
    return [_shim_socket(containerd / "containerd.sock", unit, container_id) for container_id in sorted(ids)]


def _units(marker: str) -> list[str]:
    """The nodes (``<cluster id>-<node>``) of ``marker`` with a cgroup or a directory."""
    units = {path.name for path in _cgroup_tops(marker)}
    units |= {f"{root.name}-{name}" for root in _roots(marker) for name in _subdirs(root) if name != "images"}
    return sorted(units)


def _stale_shim_sockets(marker: str) -> list[Path]:
    return [path for unit in _units(marker) for path in _shim_sockets(unit) if path.exists()]


def _remove_shim_sockets(unit: str) -> None:
    for path in _shim_sockets(unit):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- the relay --------------------------------------------------------------------------


class _Relay:
    """Forwards TCP connections from 127.0.0.1 (this network namespace) to ``target``
    in network namespace ``netns``. The listening socket is made here; the accepting
    thread then enters ``netns`` (namespaces are per thread, and a socket keeps the one
    it was made in) and makes each outbound socket there."""

    def __init__(self, netns: Path, target: tuple[str, int]) -> None:
        self.target = target
        self.netns = netns
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        host, port = self.listener.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept, os.open(netns, os.O_RDONLY))

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(
            target=target, args=args, name=f"relay-{self.target[0]}:{self.target[1]}", daemon=True
        )
        with self.lock:
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self, fd: int) -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                log.error("relay cannot enter %s: %s", self.netns, os.strerror(ctypes.get_errno()))
                return
        finally:
            os.close(fd)
        while not self.stopping.is_set():
            try:
                inbound, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target, timeout=10)
                for side in (inbound, outbound):  # no Nagle: a request's head and body go out at once
                    side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.warning("relay cannot reach %s:%d: %s", *self.target, exc)
                inbound.close()
                continue
            inbound.settimeout(None)
            outbound.settimeout(None)
            with self.lock:
                self.open |= {inbound, outbound}
            self._spawn(self._connection, inbound, outbound)

    def _connection(self, inbound: socket.socket, outbound: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(outbound, inbound), daemon=True)
        back.start()
        self._pump(inbound, outbound)
        back.join()
        with self.lock:
            self.open -= {inbound, outbound}
        inbound.close()
        outbound.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # pass the end of stream on
        except OSError:  # a reset: end both directions
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self, timeout: float = 5) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            for end in self.open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            threads = list(self.threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
