"""A real Kubernetes control plane on 127.0.0.1, for the chart's cluster tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from
the Go module proxy by scripts/install-k8s.sh, and kwok, which plays the
kubelets of a few simulated nodes: the controllers create pods, the scheduler
binds them, kwok marks them Running and Ready (no container runs).

Everything listens on free loopback ports and lives in a temporary directory
that `stop()` removes.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Server processes started in turn, each logging to `<dir>/<name>.log`;
    `start()` runs `_start()` and stops what it started if that fails."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.procs = []

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        raise NotImplementedError

    def stop(self):
        self.stop_processes()

    def logs(self, name):
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name, argv):
        log = open(self.dir / f"{name}.log", "w")
        p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, p, log))

    def stop_processes(self, *names):
        """Stops the processes named (all, newest first, if none is)."""
        for name, p, log in reversed(list(self.procs)):
            if names and name not in names:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
            self.procs.remove((name, p, log))

    def _wait(self, ok, what, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p, _ in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n{self.logs(name)[-3000:]}")
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"no {what} within {timeout}s")


class ControlPlane(Processes):
    def __init__(self, bin_dir, stages_dir, nodes=6):
        super().__init__(tempfile.mkdtemp(prefix="ringcache-k8s-"))
        self.bin = Path(bin_dir)
        self.stages = Path(stages_dir)
        self.nodes = nodes
        self.kubeconfig = self.dir / "kubeconfig"

    def _start(self):
        d = self.dir
        token = secrets.token_hex(16)
        (d / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
        # The service-account signing key pair.
        subprocess.run(["openssl", "genrsa", "-out", d / "sa.key", "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", d / "sa.key", "-pubout", "-out", d / "sa.pub"], check=True, capture_output=True
        )

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self._spawn_tool(
            "etcd",
            [
                "--data-dir", d / "etcd",
                "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
            ],
        )
        self._spawn_tool(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={d / 'pki'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # The `kubernetes` Service cannot point at a loopback address.
                "--endpoint-reconciler-type=none",
            ],
        )
        # The API server writes its self-signed serving certificate first.
        ca = d / "pki" / "apiserver.crt"
        self._wait(lambda: ca.exists(), "kube-apiserver's certificate", 60)
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {"server": f"https://127.0.0.1:{api_port}", "certificate-authority": str(ca)},
                        }
                    ],
                    "users": [{"name": "admin", "user": {"token": token}}],
                    "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
                    "current-context": "local",
                }
            )
        )
        self._wait(lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, "kube-apiserver ready", 120)

        kc = f"--kubeconfig={self.kubeconfig}"
        self._spawn_tool(
            "kube-controller-manager",
            [
                kc,
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={ca}",
                "--use-service-account-credentials=false",
                # Quick status updates: these tests wait on them.
                "--node-monitor-grace-period=60s",
                "--concurrent-statefulset-syncs=5",
            ],
        )
        self._spawn_tool(
            "kube-scheduler",
            [kc, "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}"],
        )
        stages = d / "kwok-stages.yaml"
        stages.write_text("\n---\n".join(p.read_text() for p in sorted(self.stages.glob("*.yaml"))))
        self._spawn_tool(
            "kwok",
            [
                kc,
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.0.0.1/16",
                "--node-ip=10.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--config={stages}",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        # Simulated nodes, spread over three zones, roomy enough for the
        # HA values.
        for i in range(self.nodes):
            name = f"kwok-node-{i}"
            self.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "topology.kubernetes.io/zone": f"zone-{i % 3}",
                            "type": "kwok",
                        },
                    },
                    "status": {
                        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                    },
                }
            )
        self._wait(self._nodes_ready, f"{self.nodes} Ready nodes", 60)

    def stop(self):
        self.stop_processes()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -----------------------------------------------------------

    def env(self):
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args, check=True, input=None):
        out = subprocess.run(
            [self.bin / "kubectl", *args], capture_output=True, text=True, env=self.env(), input=input
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(map(str, args))}: {out.stderr}")
        return out

    def get(self, *args):
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, obj):
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def _spawn_tool(self, name, args):
        self._spawn(name, [self.bin / name, *args])

    def _nodes_ready(self):
        out = self.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode != 0:
            return False
        nodes = json.loads(out.stdout)["items"]
        ready = [
            n
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        ]
        return len(ready) == self.nodes
