"""A test kubelet that really runs pods: each pod bound to its node becomes a local process.

For every pod scheduled to its node (in one namespace) it starts the container's command as
`python -m <module> <args>` (the module is looked up by image name: `.../module-server:TAG` ->
`services.module_server.main`), reports the pod Running and Ready once the process's gRPC health
service answers SERVING on the pod's `grpc` port (what the rendered manifests' native gRPC
readiness probe checks; the v1.20 API server drops that probe), keeps probing it every second,
and on deletion sends SIGTERM, waits up to the pod's terminationGracePeriodSeconds, kills, and
removes the pod. The kit's kube-controller-manager runs the endpoints controller, which fills each
Service's Endpoints from the Ready pods' IPs, as in a real cluster.

Pod network. Every pod gets its own IP, so every replica listens on the same port 50051:
  - the pod's process listens on a loopback address of its own, 127.0.R.N;
  - its podIP in the API is 10.244.R.N. The API server refuses loopback addresses in Endpoints
    ("may not be in the loopback range"), so pod IPs cannot be 127.x themselves;
  - `PodNetwork` maps 10.244.R.N:port to 127.0.R.N:port. It is an HTTP CONNECT proxy: a gRPC client
    outside the "cluster" (the gateway under test) reaches pod IPs with `grpc_proxy=<proxy_url>` in
    its environment, gRPC's standard proxy setting; the product code is unchanged.

Volumes: hostPath mounts are the host folder itself (render with `--checkpoint-uri file:///PATH`),
emptyDir a fresh folder, configMap a folder with the ConfigMap's files; container args and env
naming a mount path are rewritten to the folder, and "0.0.0.0" to the pod's loopback address.
"""

from __future__ import annotations

import base64
import datetime
import logging
import math
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client, watch

from pathways.deploy.launcher import child_env

log = logging.getLogger(__name__)


def _now():
    return datetime.datetime.now(datetime.UTC)


class PodNetwork:
    """HTTP CONNECT proxy from pod IPs (10.244.R.N) to the pods' loopback addresses (127.0.R.N)."""

    def __init__(self, subnet: int):
        self.subnet = subnet
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="pod-network", daemon=True)

    def pod_ip(self, n: int) -> str:
        return f"10.244.{self.subnet}.{n}"

    def loopback(self, n: int) -> str:
        return f"127.0.{self.subnet}.{n}"

    def to_loopback(self, ip: str) -> str | None:
        prefix = f"10.244.{self.subnet}."
        return "127.0." + ip[len("10.244.") :] if ip.startswith(prefix) else None

    def start(self) -> PodNetwork:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        upstream = None
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            host, _, port = target.rpartition(":")
            local = self.to_loopback(host) if method == "CONNECT" else None
            if local is None:
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            try:
                upstream = socket.create_connection((local, int(port)), timeout=5)
            except OSError:
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                return
            upstream.settimeout(None)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            _pump(conn, upstream)
        except OSError:
            pass
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copies bytes both ways until either side closes."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 1.0)
        for s in readable:
            data = s.recv(65536)
            if not data:
                return
            peers[s].sendall(data)


@dataclass
class PodProcess:
    name: str
    uid: str
    n: int  # host number in the pod network
    address: str  # loopback "ip:port" of the container's grpc port
    proc: subprocess.Popen
    grace_s: float
    labels: dict[str, str] = field(default_factory=dict)
    probe_address: str = ""  # "ip:port" the probes check (the plaintext health port, if any)
    ready: bool = False
    stopping: bool = False


class ProcessKubelet:
    """Registers node `node` and runs the pods bound to it in `namespace` as local processes.

    `images` maps an image's repository name (the last path part, no tag) to the Python module
    that is its entry point. Pods whose image is not in it are left Pending.
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        node: str,
        images: dict[str, str],
        log_dir: Path,
    ):
        self.core = client.CoreV1Api(api)
        self.namespace, self.node, self.images = namespace, node, images
        self.log_dir = Path(log_dir)
        self.network = PodNetwork(random.randint(1, 254))
        self.pods: dict[str, PodProcess] = {}  # uid -> process
        self._free = list(range(2, 255))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="process-kubelet", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ProcessKubelet:
        self.network.start()
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node}},
        }
        try:
            self.core.create_node(body)
        except client.ApiException as e:
            if e.status != 409:
                raise
        t = _now()
        self.core.patch_node_status(
            self.node,
            {
                "status": {
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "process kubelet",
                            "lastHeartbeatTime": t,
                            "lastTransitionTime": t,
                        }
                    ],
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                }
            },
        )
        # The not-ready taint set at registration; the node lifecycle controller is off in the kit.
        self.core.patch_node(self.node, {"spec": {"taints": None}})
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops watching and every pod process (SIGTERM, then SIGKILL after 10 s)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=10)
        with self._lock:
            pods = list(self.pods.values())
        for p in pods:
            p.stopping = True
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in pods:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.network.stop()

    def running(self, label: str, value: str) -> list[PodProcess]:
        """Live pod processes whose pod has label `label` = `value`."""
        with self._lock:
            return [
                p
                for p in self.pods.values()
                if p.labels.get(label) == value and p.proc.poll() is None
            ]

    # ---- the watch ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    field_selector=f"spec.nodeName={self.node}",
                    timeout_seconds=60,
                ):
                    self._on_event(event["type"], event["object"])
            except Exception as e:  # a watch can expire or drop: start it again
                if self._stop.is_set():
                    return
                log.warning("pod watch: %s", e)
                time.sleep(0.5)

    def _on_event(self, kind: str, pod) -> None:
        uid = pod.metadata.uid
        with self._lock:
            running = self.pods.get(uid)
        if kind == "DELETED":
            if running is not None and running.proc.poll() is None:
                running.stopping = True
                running.proc.kill()  # force-deleted behind our back
            return
        if pod.metadata.deletion_timestamp:
            if running is None:
                self._delete(pod.metadata.name)
            elif not running.stopping:
                running.stopping = True
                threading.Thread(target=self._terminate, args=(running,), daemon=True).start()
        elif running is None and pod.status.phase in (None, "Pending"):
            self._start(pod)

    # ---- one pod -----------------------------------------------------------------------------
    def _start(self, pod) -> None:
        containers = pod.spec.containers
        image = containers[0].image.rsplit("/", 1)[-1].split(":")[0]
        module = self.images.get(image)
        if len(containers) != 1 or module is None:
            log.warning("pod %s: no local command for image %s", pod.metadata.name, image)
            return
        c = containers[0]
        with self._lock:
            n = self._free.pop(0)
        loopback, pod_ip = self.network.loopback(n), self.network.pod_ip(n)
        mounts = self._mounts(pod, c)

        def local(value: str) -> str:
            if value == "0.0.0.0":  # all of the pod's addresses: here, its loopback address
                return loopback
            for path, folder in mounts.items():
                if value == path or value.startswith(path + "/"):
                    return folder + value[len(path) :]
            return value

        env = {}
        for e in c.env or []:
            if e.value_from is not None and e.value_from.field_ref is not None:
                fields = {
                    "metadata.namespace": pod.metadata.namespace,
                    "metadata.name": pod.metadata.name,
                    "status.podIP": pod_ip,
                }
                env[e.name] = fields[e.value_from.field_ref.field_path]
            elif e.value_from is not None and e.value_from.resource_field_ref is not None:
                ref = (
                    e.value_from.resource_field_ref
                )  # limits.cpu with divisor 1: cores, rounded up
                limit = str((c.resources.limits or {}).get(ref.resource.split(".")[1], "1"))
                cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
                env[e.name] = str(max(1, math.ceil(cores)))
            elif e.value is not None:
                env[e.name] = local(e.value)
        argv = [sys.executable, "-m", module, *[local(a) for a in c.args or []]]
        ports = {p.name: p.container_port for p in c.ports or []}
        port = ports.get("grpc") or next(iter(ports.values()))
        # The probes' port: the plaintext health port where there is one (the grpc port speaks TLS).
        probe_port = ports.get("health", port)
        out = open(self.log_dir / f"{pod.metadata.name}.log", "w")
        proc = subprocess.Popen(
            argv, env=child_env(env), stdout=out, stderr=subprocess.STDOUT, cwd=self.log_dir
        )
        out.close()
        p = PodProcess(
            pod.metadata.name,
            pod.metadata.uid,
            n,
            f"{loopback}:{port}",
            proc,
            float(pod.spec.termination_grace_period_seconds or 30),
            dict(pod.metadata.labels or {}),
            f"{loopback}:{probe_port}",
        )
        with self._lock:
            self.pods[p.uid] = p
        log.info("pod %s: started %s on %s (pod IP %s)", p.name, module, p.address, pod_ip)
        started = _now()
        self._status(p, "Pending", False, pod_ip, started, c)
        threading.Thread(target=self._probe, args=(p, pod_ip, started, c), daemon=True).start()

    def _mounts(self, pod, c) -> dict[str, str]:
        volumes = {v.name: v for v in pod.spec.volumes or []}
        out = {}
        for m in c.volume_mounts or []:
            v = volumes[m.name]
            if v.host_path is not None:
                out[m.mount_path] = v.host_path.path
            elif v.config_map is not None:
                folder = Path(tempfile.mkdtemp(prefix=f"{m.name}-", dir=self.log_dir))
                cm = self.core.read_namespaced_config_map(v.config_map.name, pod.metadata.namespace)
                for key, text in (cm.data or {}).items():
                    (folder / key).write_text(text)
                out[m.mount_path] = str(folder)
            elif v.secret is not None:
                folder = Path(tempfile.mkdtemp(prefix=f"{m.name}-", dir=self.log_dir))
                secret = self.core.read_namespaced_secret(
                    v.secret.secret_name, pod.metadata.namespace
                )
                for key, b64 in (secret.data or {}).items():
                    path = folder / key
                    path.write_bytes(base64.b64decode(b64))
                    path.chmod(0o400)
                out[m.mount_path] = str(folder)
            elif v.empty_dir is not None:
                out[m.mount_path] = tempfile.mkdtemp(prefix=f"{m.name}-", dir=self.log_dir)
            # Other volume kinds (PVCs) are not mounted: the command sees the path as given.
        return out

    def _probe(self, p: PodProcess, pod_ip: str, started, c) -> None:
        """gRPC health on the probe port every 0.5 s (readiness); phase Failed if it dies."""
        with grpc.insecure_channel(p.probe_address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not p.stopping and not self._stop.is_set():
                if p.proc.poll() is not None:
                    self._status(p, "Failed", False, pod_ip, started, c)
                    return
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    ready = r.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    ready = False
                if ready != p.ready:
                    p.ready = ready
                    self._status(p, "Running", ready, pod_ip, started, c)
                time.sleep(0.5)

    def _status(self, p: PodProcess, phase: str, ready: bool, pod_ip: str, started, c) -> None:
        t = _now()
        flag = "True" if ready else "False"
        state = {"running": {"startedAt": started}}
        if phase == "Failed":
            state = {"terminated": {"exitCode": p.proc.returncode or 0, "finishedAt": t}}
        status = {
            "phase": phase,
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                {"type": "Ready", "status": flag, "lastTransitionTime": t},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
            ],
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": "process://" + c.image,
                    "ready": ready,
                    "restartCount": 0,
                    "started": phase == "Running",
                    "state": state,
                }
            ],
        }
        try:
            self.core.patch_namespaced_pod_status(p.name, self.namespace, {"status": status})
        except client.ApiException as e:
            if e.status != 404:  # a pod deleted meanwhile needs no status
                log.warning("pod %s: status update failed: %s", p.name, e.reason)

    def _terminate(self, p: PodProcess) -> None:
        """SIGTERM, up to the grace period to exit, SIGKILL; then the pod object goes."""
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(p.grace_s)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        log.info("pod %s: exited with %s", p.name, p.proc.returncode)
        self._delete(p.name)
        with self._lock:
            self.pods.pop(p.uid, None)
            self._free.append(p.n)

    def _delete(self, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        except client.ApiException as e:
            if e.status != 404:
                raise
