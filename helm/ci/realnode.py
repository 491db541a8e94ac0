"""A real Kubernetes node beside the control plane (controlplane.py).

kubelet and kube-proxy (built from the Kubernetes module), containerd, runc
and the CNI bridge plugin (from Debian), and CoreDNS (built from its module)
as the cluster DNS: the chart's pods really run, from the image
scripts/build-image.sh makes, with their gRPC probes, and `helm test` runs
its grpcurl pod against the orchestrator Service.

Needs root. Images are imported into containerd from archives (no registry
is reachable): ringcache's, a pause image compiled from Kubernetes' pause.c,
and a grpcurl image (a static grpcurl and busybox's sh).

This sandbox withholds CAP_SYS_RESOURCE, so containerd runs with
`restrict_oom_score_adj` (a pod sandbox's oom_score_adj of -998 would need
it: runc fails with "can't get final child's PID from pipe").
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

from controlplane import Processes, free_port

BRIDGE = "rcnode0"
GATEWAY = "10.89.0.1"
SUBNET = "10.89.0.0/24"
CNI_NETWORK = "ringcache-realnode"
NODE_NAME = "real-node"
RINGCACHE_IMAGE = "registry.example.com/ringcache:test"
PAUSE_IMAGE = "localhost/pause:3.10"
GRPCURL_IMAGE = "localhost/grpcurl-test:1"


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


class RealNode(Processes):
    def __init__(self, cp, bin_dir, node_dir, repo):
        super().__init__(cp.dir / "node")
        self.cp = cp
        self.bin = Path(bin_dir)
        self.node_dir = Path(node_dir)
        self.repo = Path(repo)
        self.sock = self.dir / "containerd.sock"

    def _start(self):
        d = self.dir
        d.mkdir(parents=True)
        self._images()
        (d / "cni").mkdir()
        (d / "cni" / "10-bridge.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": CNI_NETWORK,
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]},
                        },
                        {"type": "loopback"},
                    ],
                }
            )
        )
        (d / "containerd.toml").write_text(
            f"""version = 2
root = "{d}/containerd-root"
state = "{d}/containerd-state"
[grpc]
  address = "{self.sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
        )
        self._spawn("containerd", ["containerd", "--config", d / "containerd.toml"])
        self._wait(lambda: self.sock.exists() and self._ctr("version", check=False).returncode == 0, "containerd", 30)
        for archive in ("ringcache.tar", "pause.tar", "grpcurl.tar"):
            self._ctr("images", "import", d / archive)

        # The bridge first, so CoreDNS can listen on its address.
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], capture_output=True)
        subprocess.run(["ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE], capture_output=True)
        run("ip", "link", "set", BRIDGE, "up")
        (d / "Corefile").write_text(
            f""".:53 {{
    bind {GATEWAY}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig} local
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        self._spawn("coredns", [self.bin / "coredns", "-conf", d / "Corefile"])
        self._spawn(
            "kube-proxy",
            [
                self.bin / "kube-proxy",
                f"--kubeconfig={self.cp.kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={SUBNET}",
                # Pod to Service to a pod on the same bridge: the answer
                # must come back through the host to be un-NATed.
                "--masquerade-all",
                "--conntrack-max-per-core=0",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
            ],
        )
        (d / "kubelet.yaml").write_text(
            f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
address: 127.0.0.1
port: {free_port()}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {free_port()}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{self.sock}
cgroupsPerQOS: false
enforceNodeAllocatable: []
evictionHard: {{"memory.available": "0%", "nodefs.available": "0%", "imagefs.available": "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDNS: ["{GATEWAY}"]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
"""
        )
        self._spawn(
            "kubelet",
            [
                self.bin / "kubelet",
                f"--kubeconfig={self.cp.kubeconfig}",
                f"--config={d / 'kubelet.yaml'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={GATEWAY}",
                f"--root-dir={d / 'kubelet-root'}",
                f"--cert-dir={d / 'kubelet-pki'}",
            ],
        )
        self._wait(self._ready, f"node {NODE_NAME} Ready", 120)

    def _images(self):
        d = self.dir
        # ringcache: the image scripts/build-image.sh makes from the binaries
        # the tests use.
        run(self.repo / "scripts/build-image.sh", "--bin-dir", self.repo / "target/debug", "--out", d / "rc-oci", "--tag", "test")
        run("skopeo", "copy", "--quiet", f"oci:{d / 'rc-oci'}:test", f"docker-archive:{d / 'ringcache.tar'}:{RINGCACHE_IMAGE}")
        # pause, compiled from Kubernetes' own source.
        root = d / "pause-root"
        root.mkdir()
        run("gcc", "-static", "-O2", "-o", root / "pause", self.node_dir / "pause.c")
        self._image(root, "pause", PAUSE_IMAGE, ["--config.entrypoint", "/pause", "--config.user", "65535:65535"])
        # grpcurl with a shell, for the chart's test pod.
        root = d / "grpcurl-root"
        (root / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        for applet in ("sh", "date", "base64", "grep", "cat", "echo"):
            (root / "bin" / applet).symlink_to("busybox")
        shutil.copy(self.node_dir / "grpcurl", root / "bin" / "grpcurl")
        self._image(root, "grpcurl", GRPCURL_IMAGE, ["--config.env", "PATH=/bin", "--config.user", "65532:65532"])

    def _image(self, root, name, ref, config):
        layout = self.dir / f"{name}-oci"
        run("umoci", "init", "--layout", layout)
        run("umoci", "new", "--image", f"{layout}:x")
        run("umoci", "insert", "--image", f"{layout}:x", root, "/")
        run("umoci", "config", "--image", f"{layout}:x", "--os", "linux", "--architecture", "amd64", *config)
        run("skopeo", "copy", "--quiet", f"oci:{layout}:x", f"docker-archive:{self.dir / (name + '.tar')}:{ref}")

    def running_tasks(self):
        """Containers containerd is running (pod sandboxes included)."""
        out = self._ctr("tasks", "ls", check=False).stdout.splitlines()[1:]
        return [line.split()[0] for line in out if "RUNNING" in line]

    def stop(self):
        self.stop_processes("kubelet")
        if any(name == "containerd" for name, _, _ in self.procs):
            # Stop every container, so the shims unmount their roots.
            for task in self.running_tasks():
                self._ctr("tasks", "kill", "-s", "KILL", task, check=False)
            time.sleep(1)
            for task in self._ctr("tasks", "ls", "-q", check=False).stdout.split():
                self._ctr("tasks", "delete", task, check=False)
        self.stop_processes()
        subprocess.run([self.bin / "kube-proxy", "--cleanup"], capture_output=True)
        # The kubelet mounts its root directory onto itself, and leaves its
        # own iptables chains (a canary per table, a hint, and a firewall
        # chain hooked into INPUT and OUTPUT): give the host back as it was.
        subprocess.run(["umount", "-R", self.dir / "kubelet-root"], capture_output=True)
        for chain in ("INPUT", "OUTPUT"):
            while subprocess.run(["iptables", "-D", chain, "-j", "KUBE-FIREWALL"], capture_output=True).returncode == 0:
                pass
        for table, chain in [("nat", "KUBE-KUBELET-CANARY"), ("mangle", "KUBE-KUBELET-CANARY"),
                             ("filter", "KUBE-KUBELET-CANARY"), ("filter", "KUBE-FIREWALL"),
                             ("mangle", "KUBE-IPTABLES-HINT")]:
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
            if ns.startswith("cni-"):
                subprocess.run(["ip", "netns", "delete", ns.split()[0]], capture_output=True)
        shutil.rmtree(f"/var/lib/cni/networks/{CNI_NETWORK}", ignore_errors=True)

    def _ctr(self, *args, check=True):
        out = subprocess.run(["ctr", "--address", str(self.sock), "-n", "k8s.io", *map(str, args)], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise AssertionError(f"ctr {' '.join(map(str, args))}: {out.stderr}")
        return out

    def _ready(self):
        out = self.cp.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
