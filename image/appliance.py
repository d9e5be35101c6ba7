"""Boots Tandem appliances under qemu on a private network, and drives them through qemu-guest-agent.

Used by `image/run` (demos) and `image/tests` (CI). What it offers:

- `Network`: a network namespace made for the run (named after it and this process), holding a bridge whose address (10.77.0.1/24) plays
  the client, tap devices for the guests, and optionally a DHCP server (dnsmasq) for standalone boots.
  Nothing leaves the namespace: it has no route out.
- `Appliance`: one qemu guest of the image built by `image/build`, on a copy-on-write overlay (nothing
  of a member's identity is in the image), booted either through UEFI from the GPT disk (systemd-boot)
  or directly from the kernel, initrd and root filesystem with an extra command line (identity as
  `tandem.*=`). An identity can also come on a config drive (a small vfat disk labelled TANDEMCFG).
  `exec()` runs a command in the guest through qemu-guest-agent (`Agent`: guest-exec over virtio-serial).
- `Pair`: two appliances on one network, each given its identity (role, address, peer).
- `kill_and_wait_for_service`: kills a member's VM and waits until the service address answers from the
  other (the failover tests of a pair over TCP and over RDMA).

qemu runs with TCG (`-accel tcg -cpu max`) unless TANDEM_QEMU_ACCEL says otherwise: this machine's
/dev/kvm does not boot a stock kernel. Every wait is bounded; `close()` (or leaving a `with`) tears
everything down, and so does an exception on the way.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_DIR = Path(os.environ.get("TANDEM_IMAGE_DIR", "/var/cache/tandem/image")) / "out"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = float(os.environ.get("TANDEM_BOOT_TIMEOUT", "300"))
SUBNET = "10.77.0"
BRIDGE_ADDRESS = f"{SUBNET}.1"
MEMCACHED_PORT = 11211


def run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def missing_facilities() -> list[str]:
    """What this machine lacks to boot appliances (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, tap devices)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    for tool in ("ip", "dnsmasq", "mkfs.vfat", "mcopy", "qemu-img"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not OVMF_CODE.exists():
        missing.append(f"{OVMF_CODE} (ovmf)")
    return missing


class Network:
    """A namespace with a bridge for the guests; the bridge's address is the client."""

    def __init__(self, name: str, dhcp: bool = False):
        # Unique per process: two runs on one machine (a developer's and CI's) must not share or delete
        # each other's namespace.
        self.ns = f"tandem-{name}-{os.getpid()}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.ns}-"))
        self.taps: list[str] = []
        self.dnsmasq: subprocess.Popen | None = None
        run(["ip", "netns", "del", self.ns], check=False)
        run(["ip", "netns", "add", self.ns])
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", "br0", "type", "bridge")
            self.ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", "br0")
            self.ip("link", "set", "br0", "up")
            if dhcp:
                self.dnsmasq = subprocess.Popen(
                    self.cmd("dnsmasq", "--keep-in-foreground", "--port=0", "--interface=br0", "--bind-interfaces",
                             f"--dhcp-range={SUBNET}.100,{SUBNET}.199,255.255.255.0,1h",
                             f"--dhcp-leasefile={self.dir}/leases", "--no-resolv", "--no-hosts", "--log-dhcp",
                             f"--log-facility={self.dir}/dnsmasq.log", f"--pid-file={self.dir}/dnsmasq.pid"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise

    def cmd(self, *args: str) -> list[str]:
        """A command line that runs `args` inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *args]

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.ns, *args])

    def add_tap(self) -> str:
        name = f"tap{len(self.taps)}"
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("link", "set", name, "master", "br0", "up")
        self.taps.append(name)
        return name

    def close(self) -> None:
        if self.dnsmasq is not None:
            self.dnsmasq.terminate()
            try:
                self.dnsmasq.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dnsmasq.kill()
            self.dnsmasq = None
        run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GuestError(Exception):
    pass


@dataclass
class ExecResult:
    code: int
    out: str
    err: str

    def check(self) -> ExecResult:
        if self.code != 0:
            raise GuestError(f"exit {self.code}: {self.err.strip() or self.out.strip()}")
        return self


@dataclass
class Identity:
    """What tandem-identity.service reads (`tandem.KEY=` on the command line, `KEY=` on a config drive)."""

    hostname: str
    address: str  # CIDR
    role: str = "standalone"
    peer: str | None = None
    extra: dict = field(default_factory=dict)

    def items(self) -> list[tuple[str, str]]:
        pairs = [("hostname", self.hostname), ("address", self.address), ("role", self.role)]
        if self.peer:
            pairs.append(("peer", self.peer))
        return pairs + sorted(self.extra.items())

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class Agent:
    """qemu-guest-agent on a guest's virtio-serial socket: guest-exec, one connection per command."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sync = itertools.count(int(time.time()) % 100000)

    def call(self, command: str, arguments: dict | None = None, timeout: float = 30) -> object:
        """One guest-agent command on a fresh connection, after a guest-sync-delimited handshake."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            sync_id = next(self._sync)
            s.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
            reader = s.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    raise GuestError("guest agent closed the connection")
                line = line.lstrip(b"\xff").strip()
                if line and json.loads(line).get("return") == sync_id:
                    break
            message = {"execute": command}
            if arguments is not None:
                message["arguments"] = arguments
            s.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(reader.readline())
        if "error" in reply:
            raise GuestError(f"{command}: {reply['error']}")
        return reply["return"]

    def exec(self, argv: list[str], timeout: float = 60) -> ExecResult:
        """Runs argv in the guest (as root) and waits for it."""
        pid = self.call("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", {"pid": pid})
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                return ExecResult(status.get("exitcode", -status.get("signal", 0)), out, err)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv} still running in the guest after {timeout} s")
            time.sleep(0.2)


class Appliance:
    """One booted appliance. `boot` is "uefi" (GPT disk, systemd-boot) or "direct" (kernel + initrd)."""

    _macs = itertools.count(0x10)

    def __init__(self, name: str, net: Network, boot: str = "uefi", identity: Identity | None = None,
                 identity_via: str = "cmdline", nics: int = 1, memory_mb: int = 1024, cpus: int = 1):
        for f in ("tandem.raw", "rootfs.ext4", "vmlinuz", "initrd.img"):
            if not (IMAGE_DIR / f).exists():
                raise FileNotFoundError(f"{IMAGE_DIR / f} is missing: run image/build first")
        self.name = name
        self.net = net
        self.identity = identity
        self.dir = net.dir / name
        self.dir.mkdir()
        self.console = self.dir / "console.log"
        self.agent_path = self.dir / "qga.sock"
        self.agent = Agent(self.agent_path)
        self.qemu: subprocess.Popen | None = None
        try:
            self._start(boot, identity, identity_via, nics, memory_mb, cpus)
        except BaseException:
            self.close()
            raise

    def _start(self, boot, identity, identity_via, nics, memory_mb, cpus) -> None:
        # A copy-on-write overlay of the built image: the GPT disk for UEFI boots, the bare root
        # filesystem for direct kernel boots. Both carry the same tree, labelled tandem-root.
        overlay = self.dir / "disk.qcow2"
        backing = IMAGE_DIR / ("tandem.raw" if boot == "uefi" else "rootfs.ext4")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(overlay)])
        accel = os.environ.get("TANDEM_QEMU_ACCEL", "tcg")
        cmd = ["qemu-system-x86_64", "-name", self.name, "-accel", accel, "-cpu", "max", "-m", str(memory_mb),
               "-smp", str(cpus), "-machine", "q35", "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}",
               "-drive", f"file={overlay},if=virtio,format=qcow2",
               "-chardev", f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
               "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        if nics > 1:
            # A virtual IOMMU, so the spare NICs can be handed to vfio-pci (the DPDK driver) as on metal.
            cmd += ["-device", "intel-iommu,intremap=off"]
        self.macs = []
        for i in range(nics):
            tap = self.net.add_tap()
            mac = f"52:54:00:77:00:{next(self._macs):02x}"
            self.macs.append(mac)
            cmd += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n{i},mac={mac}"]
        cmdline = "root=LABEL=tandem-root rw intel_iommu=on iommu=pt console=ttyS0,115200"
        if identity is not None and identity_via == "cmdline":
            if boot != "direct":
                raise ValueError("an identity on the kernel command line needs boot='direct'")
            cmdline += "".join(f" tandem.{k}={v}" for k, v in identity.items())
        elif identity is not None:
            cmd += ["-drive", f"file={self._config_drive(identity)},if=virtio,format=raw,readonly=on"]
        if boot == "uefi":
            vars_copy = self.dir / "OVMF_VARS.fd"
            shutil.copy(OVMF_VARS, vars_copy)
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        elif boot == "direct":
            cmd += ["-kernel", str(IMAGE_DIR / "vmlinuz"), "-initrd", str(IMAGE_DIR / "initrd.img"), "-append", cmdline]
        else:
            raise ValueError(f"boot must be uefi or direct, not {boot!r}")
        self.qemu = subprocess.Popen(self.net.cmd(*cmd), stdin=subprocess.DEVNULL,
                                     stdout=open(self.dir / "qemu.log", "w"), stderr=subprocess.STDOUT)

    def _config_drive(self, identity: Identity) -> Path:
        conf = self.dir / "identity.conf"
        conf.write_text("".join(f"{k}={v}\n" for k, v in identity.items()))
        drive = self.dir / "config-drive.img"
        run(["mkfs.vfat", "-C", "-n", "TANDEMCFG", str(drive), "1440"])
        run(["mcopy", "-i", str(drive), str(conf), "::/identity.conf"], env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        return drive

    def wait_agent(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Waits until the guest agent answers; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.qemu.poll() is not None:
                raise GuestError(f"{self.name}: qemu exited ({self.qemu.returncode}): {self.tail('qemu.log')}")
            try:
                self.agent.call("guest-ping", timeout=5)
                return time.monotonic() - start
            except (OSError, GuestError, ValueError):
                time.sleep(2)
        raise TimeoutError(f"{self.name}: guest agent silent after {timeout:.0f} s; console:\n{self.tail('console.log')}")

    def exec(self, argv: list[str], timeout: float = 60) -> ExecResult:
        """Runs argv in the guest (as root, through the guest agent) and waits for it."""
        return self.agent.exec(argv, timeout)

    def sh(self, script: str, timeout: float = 60) -> ExecResult:
        return self.exec(["/bin/sh", "-c", script], timeout=timeout)

    def wait_until(self, what: str, script: str, timeout: float = 120) -> str:
        """Runs `script` in the guest until it succeeds; returns its output."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.sh(script)
            if last.code == 0:
                return last.out
            time.sleep(1)
        raise TimeoutError(f"{self.name}: {what} not within {timeout} s (last: {last})")

    def wait_system_up(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Waits until systemd finished booting; returns `systemctl is-system-running` (running/degraded)."""
        self.wait_agent(timeout)
        # Each try is bounded below the agent's 60 s per command: a boot slowed by a busy host (TCG) then
        # means another try until `timeout`, not a TimeoutError from the first one.
        self.wait_until("boot to finish", "timeout 50 systemctl is-system-running --wait >/dev/null; "
                        "s=$(systemctl is-system-running); echo $s; [ $s = running ] || [ $s = degraded ]", timeout)
        return self.sh("systemctl is-system-running").out.strip()

    def address(self, timeout: float = 120) -> str:
        """The guest's IPv4 address on the bridge (given, or DHCP's)."""
        out = self.wait_until("an IPv4 address", f"ip -4 -o addr show | grep -o '{SUBNET}\\.[0-9]*/' ", timeout)
        return out.split()[0].rstrip("/")

    def tail(self, log: str, lines: int = 40) -> str:
        path = self.dir / log
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"

    def close(self) -> None:
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGTERM)
            try:
                self.qemu.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait(timeout=20)
        self.qemu = None


class Pair:
    """Two appliances of one build booted together, each given its identity at boot.

    Member A ("active") boots the kernel, initrd and root filesystem directly with its identity on the
    kernel command line; member B ("standby") boots the GPT disk through UEFI (systemd-boot) with its
    identity on a config drive: both ways an operator can use, and both outputs of image/build.
    """

    def __init__(self, net: Network, a: Identity, b: Identity):
        self.net = net
        self.members: list[Appliance] = []
        try:
            self.members.append(Appliance("a", net, boot="direct", identity=a, identity_via="cmdline"))
            self.members.append(Appliance("b", net, boot="uefi", identity=b, identity_via="drive"))
        except BaseException:
            self.close()
            raise

    def boot_again(self, member: int, name: str) -> Appliance:
        """Boots a member again (a new machine of the same build, same identity, same boot path) and
        returns it; the old one must be closed or dead."""
        old = self.members[member]
        via = "cmdline" if member == 0 else "drive"
        box = Appliance(name, self.net, boot="direct" if member == 0 else "uefi", identity=old.identity, identity_via=via)
        self.members.append(box)
        return box

    def wait_up(self, timeout: float = BOOT_TIMEOUT) -> list[str]:
        return [m.wait_system_up(timeout) for m in self.members]

    def close(self) -> None:
        for m in self.members:
            m.close()


def memcached_call(net: Network, host: str, request: bytes, timeout: float = 10, port: int = MEMCACHED_PORT) -> bytes:
    """Sends requests from the bridge side (inside the namespace) and returns every reply: `quit` is
    appended, so the server closes the connection once it has answered the rest."""
    script = ("import socket,sys\n"
              f"s=socket.create_connection(({host!r},{port}),timeout={timeout})\n"
              "s.sendall(sys.stdin.buffer.read()+b'quit\\r\\n')\n"
              "data=b''\n"
              "while chunk:=s.recv(65536): data+=chunk\n"
              "sys.stdout.buffer.write(data)\n")
    proc = subprocess.run(net.cmd("python3", "-c", script), input=request, capture_output=True, timeout=timeout + 5)
    if proc.returncode != 0:
        raise OSError(f"memcached at {host}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def kill_and_wait_for_service(net: Network, victim: Appliance, survivor: Appliance, address: str, request: bytes,
                              want: bytes, timeout: float = 120) -> float:
    """Kills `victim`'s whole machine at once (SIGKILL of its qemu), then sends `request` to `address`
    every half second until the reply is `want`, as a client of the service address would; returns the
    seconds from the kill to that reply. Raises AssertionError, with the last reply or error and the end
    of `survivor`'s tandemd journal, if it does not come within `timeout`."""
    victim.qemu.kill()
    victim.qemu.wait(timeout=30)
    killed = time.monotonic()
    got, last_error = None, None
    while time.monotonic() - killed < timeout:
        try:
            got = memcached_call(net, address, request, timeout=3)
            if got == want:
                return time.monotonic() - killed
        except (OSError, subprocess.TimeoutExpired) as e:
            last_error = e
        time.sleep(0.5)
    journal = survivor.sh("journalctl -b -u tandemd -n 30 --no-pager -o cat").out
    raise AssertionError(f"{address} did not answer as expected within {timeout:.0f} s of killing {victim.name}: "
                         f"last reply {got[:300] if got else got!r}, last error {last_error}\n{survivor.name}'s tandemd:\n{journal}")
