"""swiftlet's command line: every user mistake is one line on stderr and a
documented non-zero exit status (README "Exit status"). Inputs are checked
before KVM is touched, so these run on any host, this PVM one included."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import REPO, run

USAGE, BAD_INPUT, MISSING, HOST = 64, 65, 66, 69


@pytest.fixture(scope="session")
def swiftlet():
    """The swiftlet binary: SWIFTLET_BIN, else a fresh debug build."""
    b = os.environ.get("SWIFTLET_BIN")
    if b:
        return b
    r = run(["swift", "build", "--product", "swiftlet"], timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(REPO, ".build", "debug", "swiftlet")


@pytest.fixture(scope="session")
def kernel(images):
    return os.path.join(images, "vmlinuz")


def sw(swiftlet, *args, user=None):
    argv = [swiftlet, *args]
    if user:
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *argv]
    return run(argv, timeout=60)


def one_line(r, *words):
    """stderr is exactly one line, starting 'swiftlet: ', naming the problem."""
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("swiftlet: "), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, r.stderr)
    assert "Fatal error" not in r.stderr and "Stack dump" not in r.stderr
    return lines[0]


def test_help_exits_zero(swiftlet):
    r = sw(swiftlet, "--help")
    assert r.returncode == 0
    assert "--kernel" in r.stdout and "Exit status" in r.stdout


@pytest.mark.parametrize("args,words", [
    ([], ["--kernel"]),
    (["--kernel", "K", "--bogus"], ["--bogus"]),
    (["--kernel", "K", "--cpus", "0"], ["--cpus", "at least 1"]),
    (["--kernel", "K", "--cpus", "two"], ["--cpus", "not a number"]),
    (["--kernel", "K", "--cpus", "-3"], ["--cpus"]),
    (["--kernel", "K", "--cpus", "100000"], ["vcpu"]),
    (["--kernel", "K", "--memory", "12X"], ["--memory", "not a size"]),
    (["--kernel", "K", "--memory", ""], ["--memory"]),
    (["--kernel", "K", "--memory", "1.5G"], ["--memory"]),
    (["--kernel", "K", "--memory", "99999999999999999999999G"], ["--memory"]),
    (["--kernel", "K", "--memory", "18446744073709551615T"], ["--memory", "too large"]),
    (["--kernel", "K", "--memory", "16M"], ["--memory", "minimum"]),
    (["--kernel", "K", "--memory", "0"], ["--memory", "minimum"]),
    (["--kernel", "K", "--memory", "100000G"], ["--memory"]),
    (["--kernel", "K", "--serial", "tty"], ["--serial"]),
    (["--kernel", "K", "--log-level", "loud"], ["--log-level"]),
    (["--kernel", "K", "--virtio-irq", "msi"], ["--virtio-irq", "line", "irqfd", "edge"]),
    (["--kernel", "K", "--seccomp", "strict"], ["--seccomp", "on, log or off"]),
    (["--kernel", "K", "--kernel-cache", "/proc/swiftlet-no"], ["--kernel-cache", "cannot create"]),
    (["--kernel", "K", "--kernel-cache", "/etc/hostname"], ["--kernel-cache", "not a directory"]),
    (["--kernel", "K", "--kernel-cache", "/tmp", "--no-kernel-decompress"], ["--kernel-cache", "--no-kernel-decompress"]),
    (["--kernel", "K", "--kernel-cache", "/no/such/parent/dir"], ["--kernel-cache", "cannot create"]),
    (["--kernel", "K", "--timeout", "soon"], ["--timeout", "not a duration", "90s"]),
    (["--kernel", "K", "--timeout", ""], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "1h30m"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "5 s"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "1e3"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "30S"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "1.5.2"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "0x10"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "\u0663s"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout=-5"], ["--timeout", "not a duration"]),
    (["--kernel", "K", "--timeout", "-5"], ["--timeout"]),
    (["--kernel", "K", "--timeout"], ["--timeout"]),
    (["--kernel", "K", "--timeout", "0"], ["--timeout", "zero", "leave --timeout out"]),
    (["--kernel", "K", "--timeout", "0.0s"], ["--timeout", "zero"]),
    (["--kernel", "K", "--timeout", "99999999999999999999999d"], ["--timeout", "too long"]),
    (["--kernel", "K", "--timeout", "36501d"], ["--timeout", "too long"]),
])
def test_usage_errors(swiftlet, kernel, args, words):
    args = [kernel if a == "K" else a for a in args]
    r = sw(swiftlet, *args)
    assert r.returncode == USAGE, (r.returncode, r.stderr)
    one_line(r, *words)


def test_memory_above_host(swiftlet, kernel):
    total_kib = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
    r = sw(swiftlet, "--kernel", kernel, "--memory", "%dM" % (total_kib // 1024 + 1024))
    assert r.returncode == USAGE
    one_line(r, "more than this host has")


def test_kernel_missing(swiftlet, tmp_path):
    r = sw(swiftlet, "--kernel", str(tmp_path / "nope"))
    assert r.returncode == MISSING
    one_line(r, "not found", "--kernel")


def test_kernel_is_a_directory(swiftlet, tmp_path):
    r = sw(swiftlet, "--kernel", str(tmp_path))
    assert r.returncode in (MISSING, BAD_INPUT)
    one_line(r, str(tmp_path))


def test_kernel_unreadable(swiftlet, kernel, tmp_path):
    k = tmp_path / "vmlinuz"
    shutil.copy(kernel, k)
    os.chmod(k, 0)
    os.chmod(tmp_path, 0o755)
    r = sw(swiftlet, "--kernel", str(k), user="65534")
    assert r.returncode == MISSING, r.stderr
    one_line(r, str(k))


def test_kernel_empty(swiftlet, tmp_path):
    k = tmp_path / "empty"
    k.write_bytes(b"")
    r = sw(swiftlet, "--kernel", str(k))
    assert r.returncode == BAD_INPUT
    one_line(r, "empty")


def test_not_a_kernel(swiftlet, tmp_path):
    k = tmp_path / "text"
    k.write_bytes(b"hello\n" * 200)
    r = sw(swiftlet, "--kernel", str(k))
    assert r.returncode == BAD_INPUT
    one_line(r, "bzImage")


@pytest.mark.parametrize("cut", [100, 0x1f1 + 4, 0x210, 0x4000, 1 << 20])
def test_truncated_kernel(swiftlet, kernel, tmp_path, cut):
    k = tmp_path / "cut"
    k.write_bytes(open(kernel, "rb").read()[:cut])
    r = sw(swiftlet, "--kernel", str(k))
    assert r.returncode == BAD_INPUT, (cut, r.stderr)
    one_line(r)


def test_boot_protocol_too_old(swiftlet, kernel, tmp_path):
    data = bytearray(open(kernel, "rb").read())
    struct.pack_into("<H", data, 0x206, 0x0205)
    k = tmp_path / "old"
    k.write_bytes(bytes(data))
    r = sw(swiftlet, "--kernel", str(k))
    assert r.returncode == BAD_INPUT
    one_line(r, "2.05")


def test_corrupt_kernel_payload(swiftlet, kernel, tmp_path):
    """swiftlet unpacks the bzImage's LZ4 payload itself by default: a payload that
    does not unpack is one line naming the way out, status 65; with
    --no-kernel-decompress the same file goes to the guest whole (here it then stops at
    the PVM host check, past every input check)."""
    data = bytearray(open(kernel, "rb").read())
    setup_sects = data[0x1f1] or 4
    payload = (setup_sects + 1) * 512 + struct.unpack_from("<I", data, 0x248)[0]
    assert data[payload:payload + 4] == b"\x02\x21\x4c\x18", "Debian's kernel payload is an LZ4 legacy frame"
    data[payload + 8:payload + 8 + 64] = b"\xff" * 64
    k = tmp_path / "bad-payload"
    k.write_bytes(bytes(data))
    r = sw(swiftlet, "--kernel", str(k))
    assert r.returncode == BAD_INPUT, r.stderr
    one_line(r, "payload", "--no-kernel-decompress")
    if os.path.exists("/sys/module/kvm_pvm"):
        r = sw(swiftlet, "--kernel", str(k), "--no-kernel-decompress")
        assert r.returncode == HOST, r.stderr


def test_initrd_missing(swiftlet, kernel, tmp_path):
    r = sw(swiftlet, "--kernel", kernel, "--initrd", str(tmp_path / "nope"))
    assert r.returncode == MISSING
    one_line(r, "initrd")


def test_initrd_too_large_for_memory(swiftlet, kernel, tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(200 << 20)
    r = sw(swiftlet, "--kernel", kernel, "--initrd", str(big), "--memory", "128M")
    assert r.returncode == BAD_INPUT
    one_line(r, "initrd")


def test_cmdline_too_long(swiftlet, kernel):
    r = sw(swiftlet, "--kernel", kernel, "--cmdline", "x" * 70000)
    assert r.returncode == BAD_INPUT
    one_line(r, "command line")


def test_pvm_host_is_refused_with_the_way_out(swiftlet, kernel):
    """On a PVM host (as here) a valid configuration stops at the host check."""
    if not os.path.exists("/sys/module/kvm_pvm"):
        pytest.skip("not a PVM host: the testbed boot tests cover a usable /dev/kvm")
    r = sw(swiftlet, "--kernel", kernel)
    assert r.returncode == HOST
    one_line(r, "PVM", "scripts/testbed")


def test_debug_log_maps_first_exits(swiftlet, tmp_path):
    """--log-level debug lists the first exit to each port, in order, with its time
    since swiftlet started: the tiny guest writes COM1 ('K', newline), then the ACPI
    sleep register. On this PVM host (the tiny guest runs anywhere)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    tiny = str(tmp_path / "tiny.elf")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "lib", "tinyguest.py"), tiny], check=True)
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    r = subprocess.run([swiftlet, "--kernel", tiny, "--memory", "128M", "--serial", "none", "--log-level", "debug"],
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    firsts = re.findall(r"^swiftlet: first exit \+(\d+) us: (.*)$", r.stderr, re.M)
    assert [w for _, w in firsts] == ["port 0x3f8 write", "port 0x3c0 write"], r.stderr
    assert int(firsts[0][0]) <= int(firsts[1][0])


def test_sigusr1_dumps_metrics_and_sigterm_stops_cleanly(swiftlet_release, tmp_path):
    """The shipped binary with a virtio-blk device whose interrupt line is a resampling
    irqfd (--virtio-irq irqfd: its "-irq" helper thread exists before any guest runs;
    the default KVM_IRQ_LINE way has none): SIGUSR1, sent again and again, rewrites --metrics and never kills
    swiftlet; SIGTERM then ends it with 128+15 after a clean teardown. On this PVM host
    with the tiny guest that halts for good (scripts/lib/tinyguest.py --halt).
    Regression: the per-device interrupt threads were created before the main thread
    blocked SIGUSR1, and the first SIGUSR1 killed swiftlet (status 138)."""
    import signal
    import time
    tiny = str(tmp_path / "halt.elf")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "lib", "tinyguest.py"), tiny, "--halt"], check=True)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    metrics = tmp_path / "m.json"
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    p = subprocess.Popen([swiftlet_release, "--kernel", tiny, "--memory", "128M", "--serial", "none",
                          "--disk", "path=%s" % disk, "--virtio-irq", "irqfd", "--metrics", str(metrics)],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "blk0-irq" not in " ".join(open(t + "/comm").read() for t in
                                          [os.path.join("/proc", str(p.pid), "task", x)
                                           for x in os.listdir("/proc/%d/task" % p.pid)]):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no blk0-irq thread within 20 s"
            time.sleep(0.05)
        for i in range(5):
            if metrics.exists():
                metrics.unlink()
            p.send_signal(signal.SIGUSR1)
            while not metrics.exists():
                assert p.poll() is None, "SIGUSR1 number %d ended swiftlet: status %s, %s" % (
                    i + 1, p.returncode, p.communicate())
                assert time.monotonic() < deadline, "no metrics after SIGUSR1"
                time.sleep(0.05)
            assert '"kvm_run"' in metrics.read_text()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 128 + 15, (p.returncode, err)
        assert "Fatal error" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def tiny_guest(tmp_path, *args):
    """scripts/lib/tinyguest.py with ARGS: prints 'K' on COM1, then powers off, halts for
    good (--halt), writes the exit register (--exit N) or port 0xf4 (--debug-exit V)."""
    path = str(tmp_path / ("tiny%s.elf" % "".join(a.replace("-", "_") for a in args)))
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "lib", "tinyguest.py"), path, *args], check=True)
    return path


def run_tiny(swiftlet, kernel, *args, stdin=subprocess.DEVNULL):
    """swiftlet with a tiny guest on this host's /dev/kvm (PVM included)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    return subprocess.run([swiftlet, "--kernel", kernel, "--memory", "128M", *args], env=env, stdin=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)


@pytest.mark.parametrize("n,status", [(0, 0), (1, 1), (7, 7), (124, 124), (255, 255), (256, 255), (0xffffffff, 255)])
def test_guest_exit_register_status_is_swiftlets(swiftlet, tmp_path, n, status):
    """A write of N to the exit register (0xd0000004) ends the VM at once with status N as
    it is (a value above 255 with 255: never 0); the console line written before it is
    out; a non-zero status is named on stderr as the guest's, and --metrics says who
    chose it."""
    metrics = tmp_path / "m.json"
    r = run_tiny(swiftlet, tiny_guest(tmp_path, "--exit", str(n)), "--metrics", str(metrics))
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stdout == "K\n"
    if status:
        assert one_line(r).startswith("swiftlet: guest exit status %d (exit register) after " % status), r.stderr
    else:
        assert r.stderr == ""
    exit_json = json.loads(metrics.read_text())["exit"]
    assert exit_json == {"status": status, "by": "guest", "reason": "exit-register"}


def test_isa_debug_exit_only_with_its_flag(swiftlet, tmp_path):
    """--isa-debug-exit: a write of V to port 0xf4 ends the VM with (V << 1) | 1, as QEMU's
    isa-debug-exit; without the flag the port is nothing and the guest runs on (here it
    halts, and --timeout ends it)."""
    guest = tiny_guest(tmp_path, "--debug-exit", "16")
    metrics = tmp_path / "m.json"
    r = run_tiny(swiftlet, guest, "--isa-debug-exit", "--metrics", str(metrics))
    assert r.returncode == 33, r.stderr
    one_line(r, "guest exit status 33 (isa-debug-exit)")
    assert json.loads(metrics.read_text())["exit"] == {"status": 33, "by": "guest", "reason": "isa-debug-exit"}
    r = run_tiny(swiftlet, guest, "--timeout", "1", "--metrics", str(metrics))
    assert r.returncode == 124, r.stderr
    assert json.loads(metrics.read_text())["exit"]["reason"] == "timeout"


def test_timeout_stops_a_running_guest_cleanly(swiftlet, tmp_path):
    """--timeout: a guest still running at the deadline (the tiny guest halts for good) is
    stopped with status 124 and one stderr line naming the limit, through the same
    teardown as SIGTERM: the terminal swiftlet put into raw mode is restored, the disk
    image is unlocked, --metrics is written (by swiftlet, reason timeout)."""
    import pty
    import termios
    import time
    guest = tiny_guest(tmp_path, "--halt")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    metrics = tmp_path / "m.json"
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        t0 = time.monotonic()
        r = run_tiny(swiftlet, guest, "--timeout", "1.5s", "--disk", "path=%s" % disk, "--metrics", str(metrics),
                     stdin=slave)
        took = time.monotonic() - t0
        after = termios.tcgetattr(slave)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 124, (r.returncode, r.stderr)
    line = one_line(r, "timed out (--timeout 1.5 s): guest stopped after")
    ms = int(re.search(r"after (\d+) ms", line).group(1))
    assert 1500 <= ms < 10000 and 1.5 <= took < 15, (ms, took)
    assert r.stdout.replace("\r", "") == "K\n"
    assert after == before, "terminal settings restored"
    assert json.loads(metrics.read_text())["exit"] == {"status": 124, "by": "swiftlet", "reason": "timeout"}
    import fcntl
    with open(disk, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_stopped_guest_names_where_its_vcpus_were(swiftlet, tmp_path):
    """A guest stopped from outside (--timeout; a signal the same) names where each vCPU
    was: the stop line ends with "(vCPU 0 at rip ..., vCPU 1 at rip ...)", and --log-level
    info adds one line of registers per vCPU. The tiny guest halts for good in long mode at
    0x20000a (hlt; jmp back), so vCPU 0 is at the hlt or the jmp after it."""
    r = run_tiny(swiftlet, tiny_guest(tmp_path, "--halt"), "--cpus", "2", "--timeout", "1", "--log-level", "info")
    assert r.returncode == 124, r.stderr
    stop = [l for l in r.stderr.splitlines() if "timed out (--timeout 1 s)" in l]
    assert len(stop) == 1, r.stderr
    m = re.search(r"\(vCPU 0 at rip (0x[0-9a-f]+), vCPU 1 at rip 0x[0-9a-f]+\)$", stop[0])
    assert m and m.group(1) in ("0x20000a", "0x20000b"), stop[0]
    detail = [l for l in r.stderr.splitlines() if l.startswith("swiftlet: vCPU 0 stopped at rip ")]
    assert len(detail) == 1, r.stderr
    regs = dict(re.findall(r"(rip|rsp|rflags|cs|cr0|cr2|cr3|cr4|efer) (0x[0-9a-f]+)", detail[0]))
    assert set(regs) == {"rip", "rsp", "rflags", "cs", "cr0", "cr2", "cr3", "cr4", "efer"}, detail[0]
    assert regs["rip"] == m.group(1)
    assert int(regs["efer"], 16) & 0x400 and int(regs["cr0"], 16) & 0x80000001 == 0x80000001, detail[0]
    # its page tables are in guest RAM, so neither line says otherwise
    assert "outside guest RAM" not in r.stderr, r.stderr
    # at the default log level the stop line is still the only line
    r = run_tiny(swiftlet, tiny_guest(tmp_path, "--halt"), "--timeout", "1")
    assert r.returncode == 124
    assert re.search(r"\(vCPU 0 at rip 0x20000[ab]\)$", one_line(r, "timed out")), r.stderr


def test_kernel_cache_is_written_once_per_kernel_file(swiftlet, kernel, tmp_path):
    """--kernel-cache DIR: the directory is made (0700) and gets one entry (0600) for the
    kernel file; a second run with the same file adds none. (On this PVM host swiftlet
    then stops at the host check: the kernel is loaded before it.)"""
    cache = tmp_path / "cache"
    for _ in range(2):
        r = sw(swiftlet, "--kernel", kernel, "--kernel-cache", str(cache))
        assert r.returncode in (HOST, 0), r.stderr
        entries = os.listdir(cache)
        assert len(entries) == 1 and entries[0].startswith("vmlinux-") and entries[0].endswith(".unpacked"), entries
    assert os.stat(cache).st_mode & 0o777 == 0o700
    assert os.stat(cache / entries[0]).st_mode & 0o777 == 0o600
    assert os.path.getsize(cache / entries[0]) > 20 << 20, "the unpacked segments, tens of MiB"


def test_kernel_cache_default_and_none(swiftlet, kernel, tmp_path):
    """By default the cache is $XDG_CACHE_HOME/swiftlet (else ~/.cache/swiftlet);
    --kernel-cache none writes nothing; an unusable default is skipped without a word."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    os.mkdir(tmp_path / "xdg")
    r = subprocess.run([swiftlet, "--kernel", kernel, "--kernel-cache", "none"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (HOST, 0), r.stderr
    assert os.listdir(tmp_path / "xdg") == []
    r = subprocess.run([swiftlet, "--kernel", kernel], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode in (HOST, 0), r.stderr
    assert [e for e in os.listdir(tmp_path / "xdg" / "swiftlet") if e.endswith(".unpacked")], "default cache entry"
    (tmp_path / "file").write_text("x")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "file"))
    r = subprocess.run([swiftlet, "--kernel", kernel], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode in (HOST, 0), r.stderr
    assert "cache" not in r.stderr


# README "What a mistake looks like": every row is one case here, run as it is written
# there (FILE names are files made by the `mistakes` fixture). Each must give exactly one
# stderr line naming the problem, the documented status, and leave nothing behind: no
# file, lock, kernel-cache temporary, and (cases with --net, run in their own network
# namespace) no TAP.
ROOT, NOBODY, NETNS = "root", "nobody", "netns"
MISTAKES = [
    # (id, args, status, words in the line, how it runs)
    ("no-kernel", [], USAGE, ["--kernel"], ROOT),
    ("unknown-flag", ["--kernel", "K", "--bogus"], USAGE, ["--bogus", "--help"], ROOT),
    ("cpus-word", ["--kernel", "K", "--cpus", "two"], USAGE, ["--cpus", "not a number"], ROOT),
    ("cpus-zero", ["--kernel", "K", "--cpus", "0"], USAGE, ["--cpus", "at least 1"], ROOT),
    ("cpus-too-many", ["--kernel", "K", "--cpus", "100000"], USAGE, ["vcpus", "1 to", "or fewer"], ROOT),
    ("memory-garbage", ["--kernel", "K", "--memory", "lots"], USAGE, ["--memory", "not a size", "512M"], ROOT),
    ("memory-fraction", ["--kernel", "K", "--memory", "1.5G"], USAGE, ["--memory", "not a size"], ROOT),
    ("memory-too-small", ["--kernel", "K", "--memory", "16M"], USAGE, ["--memory", "minimum"], ROOT),
    ("serial-mode", ["--kernel", "K", "--serial", "tty"], USAGE, ["--serial", "none, stdio or file="], ROOT),
    ("serial-missing-dir", ["--kernel", "K", "--serial", "file=T/no/such/s.log"], USAGE,
     ["--serial file=", "cannot create", "directory you can write"], ROOT),
    ("serial-directory", ["--kernel", "K", "--serial", "file=T/dir"], USAGE, ["--serial file=", "is a directory"], ROOT),
    ("metrics-missing-dir", ["--kernel", "K", "--metrics", "T/no/such/m.json"], USAGE,
     ["--metrics", "cannot create", "directory you can write"], ROOT),
    ("metrics-unwritable", ["--kernel", "K", "--metrics", "T/dir/m.json"], USAGE,
     ["--metrics", "permission denied"], NOBODY),
    ("metrics-directory", ["--kernel", "K", "--metrics", "T/dir"], USAGE, ["--metrics", "is a directory"], ROOT),
    ("kernel-cache-file", ["--kernel", "K", "--kernel-cache", "T/notes.txt"], USAGE,
     ["--kernel-cache", "not a directory"], ROOT),
    ("kernel-cache-no-decompress", ["--kernel", "K", "--kernel-cache", "T/cache", "--no-kernel-decompress"], USAGE,
     ["--kernel-cache", "drop one"], ROOT),
    ("timeout-word", ["--kernel", "K", "--timeout", "soon"], USAGE, ["--timeout", "not a duration"], ROOT),
    ("log-level", ["--kernel", "K", "--log-level", "loud"], USAGE, ["--log-level", "error, warn"], ROOT),
    ("virtio-discovery", ["--kernel", "K", "--virtio-discovery", "pci"], USAGE, ["--virtio-discovery", "acpi"], ROOT),
    ("kernel-missing", ["--kernel", "T/vmlinuz"], MISSING, ["not found", "--kernel"], ROOT),
    ("kernel-directory", ["--kernel", "T/dir"], MISSING, ["is a directory"], ROOT),
    ("kernel-fifo", ["--kernel", "T/fifo"], MISSING, ["not a regular file"], ROOT),
    ("kernel-dev-zero", ["--kernel", "/dev/zero"], MISSING, ["not a regular file"], ROOT),
    ("kernel-unreadable", ["--kernel", "T/secret.img"], MISSING, ["permission denied"], NOBODY),
    ("kernel-empty", ["--kernel", "T/empty.img"], BAD_INPUT, ["empty", "bzImage"], ROOT),
    ("kernel-bad-payload", ["--kernel", "T/bad-payload", "--kernel-cache", "T/cache"], BAD_INPUT,
     ["payload does not unpack", "--no-kernel-decompress"], ROOT),
    ("kernel-not-a-kernel", ["--kernel", "T/notes.txt"], BAD_INPUT, ["neither a bzImage"], ROOT),
    ("initrd-missing", ["--kernel", "K", "--initrd", "T/initrd.gz"], MISSING, ["not found", "--initrd"], ROOT),
    ("initrd-directory", ["--kernel", "K", "--initrd", "T/dir"], MISSING, ["initrd", "is a directory"], ROOT),
    ("initrd-fifo", ["--kernel", "K", "--initrd", "T/fifo"], MISSING, ["initrd", "not a regular file"], ROOT),
    ("cmdline-too-long", ["--kernel", "K", "--cmdline", "x" * 70000], BAD_INPUT, ["command line", "shorten"], ROOT),
    ("disk-missing", ["--kernel", "K", "--disk", "path=T/nope.img"], MISSING, ["does not exist", "--disk path="], ROOT),
    ("disk-directory", ["--kernel", "K", "--disk", "path=T/dir"], MISSING, ["is a directory", "image file"], ROOT),
    ("disk-fifo", ["--kernel", "K", "--disk", "path=T/fifo"], MISSING, ["not a regular file", "image file"], ROOT),
    ("disk-odd-size", ["--kernel", "K", "--disk", "path=T/odd.img"], BAD_INPUT, ["not a multiple of 512", "truncate -s 1024"], ROOT),
    ("disk-empty", ["--kernel", "K", "--disk", "path=T/empty.img"], BAD_INPUT, ["is empty", "truncate"], ROOT),
    ("disk-read-only-file", ["--kernel", "K", "--disk", "path=T/ro.img"], MISSING, ["read-only", "readonly=on"], NOBODY),
    ("disk-unreadable", ["--kernel", "K", "--disk", "path=T/secret.img,readonly=on"], MISSING,
     ["permission denied", "you can read"], NOBODY),
    ("outputs-then-bad-disk", ["--kernel", "K", "--metrics", "T/m.json", "--serial", "file=T/s.log",
                               "--disk", "path=T/odd.img"], BAD_INPUT, ["not a multiple of 512"], ROOT),
    ("disk-twice", ["--kernel", "K", "--disk", "path=T/d.img", "--disk", "path=T/d.img"], USAGE,
     ["given twice", "readonly=on"], ROOT),
    ("disk-key-twice", ["--kernel", "K", "--disk", "path=T/d.img,path=T/d.img"], USAGE, ["path= given twice"], ROOT),
    ("disk-unknown-key", ["--kernel", "K", "--disk", "path=T/d.img,cache=none"], USAGE, ["unknown option 'cache'"], ROOT),
    ("disk-no-path", ["--kernel", "K", "--disk", "readonly=on"], USAGE, ["missing path="], ROOT),
    ("disk-queues", ["--kernel", "K", "--disk", "path=T/d.img,num_queues=9"], USAGE, ["num_queues", "1 to 8"], ROOT),
    ("disk-readonly-yes", ["--kernel", "K", "--disk", "path=T/d.img,readonly=yes"], USAGE, ["readonly=on or readonly=off"], ROOT),
    ("disk-serial-long", ["--kernel", "K", "--disk", "path=T/d.img,serial=" + "s" * 21], USAGE, ["serial", "at most 20"], ROOT),
    ("tap-too-long", ["--kernel", "K", "--net", "tap=0123456789abcdef"], USAGE, ["not a valid interface name", "15"], NETNS),
    ("tap-slash", ["--kernel", "K", "--net", "tap=a/b"], USAGE, ["not a valid interface name", "'/'"], NETNS),
    ("tap-space", ["--kernel", "K", "--net", "tap=a b"], USAGE, ["not a valid interface name", "spaces"], NETNS),
    ("tap-twice", ["--kernel", "K", "--net", "tap=sw0", "--net", "tap=sw0"], USAGE, ["given twice", "its own TAP"], NETNS),
    ("tap-key-twice", ["--kernel", "K", "--net", "tap=sw0,tap=sw1"], USAGE, ["tap= given twice"], NETNS),
    ("tap-not-a-tap", ["--kernel", "K", "--net", "tap=lo"], USAGE, ["not a tap"], NETNS),
    ("tap-no-permission", ["--kernel", "K", "--net", "tap=sw0"], HOST, ["/dev/net/tun", "CAP_NET_ADMIN"], NETNS + "+" + NOBODY),
    ("tap-then-bad-kernel", ["--kernel", "T/dir", "--net", "tap=sw0"], MISSING, ["is a directory"], NETNS),
    ("mac-multicast", ["--kernel", "K", "--net", "tap=sw0,mac=01:00:5e:00:00:01"], USAGE, ["multicast"], NETNS),
    ("mac-malformed", ["--kernel", "K", "--net", "tap=sw0,mac=52:54:00:12:34"], USAGE, ["not a MAC address"], NETNS),
    ("mac-zero", ["--kernel", "K", "--net", "tap=sw0,mac=00:00:00:00:00:00"], USAGE, ["all zeroes"], NETNS),
    ("net-queues-0", ["--kernel", "K", "--net", "tap=sw0,queues=0"], USAGE, ["queues", "1 to 8"], NETNS),
    ("net-queues-9", ["--kernel", "K", "--net", "tap=sw0,queues=9"], USAGE, ["queues", "1 to 8"], NETNS),
    ("mtu-low", ["--kernel", "K", "--net", "tap=sw0,mtu=67"], USAGE, ["mtu", "68 to 65535"], NETNS),
    ("mtu-high", ["--kernel", "K", "--net", "tap=sw0,mtu=65536"], USAGE, ["mtu", "68 to 65535"], NETNS),
    ("net-unknown-key", ["--kernel", "K", "--net", "tap=sw0,speed=10"], USAGE, ["unknown option 'speed'"], NETNS),
    ("net-no-tap", ["--kernel", "K", "--net", "mac=52:54:00:12:34:56"], USAGE, ["missing tap="], NETNS),
    ("vhost-bad-value", ["--kernel", "K", "--net", "tap=sw0,vhost=yes"], USAGE, ["vhost='yes'", "vhost=on, vhost=off or vhost=auto"], NETNS),
    # where /dev/vhost-net exists this row is skipped (it would open)
    ("vhost-on-no-device", ["--kernel", "K", "--net", "tap=sw0,vhost=on"], HOST,
     ["vhost=on but /dev/vhost-net is missing", "modprobe vhost_net", "vhost=off"], NETNS + "+novhost"),
    ("vsock-cid-2", ["--kernel", "K", "--vsock", "cid=2"], USAGE, ["--vsock", "cid='2'", "3 to 4294967294"], ROOT),
    ("vsock-cid-any", ["--kernel", "K", "--vsock", "cid=4294967295"], USAGE, ["cid='4294967295'", "reserved"], ROOT),
    ("vsock-cid-huge", ["--kernel", "K", "--vsock", "cid=99999999999999999999999"], USAGE, ["is not valid"], ROOT),
    ("vsock-cid-hex", ["--kernel", "K", "--vsock", "cid=0x10"], USAGE, ["cid='0x10'"], ROOT),
    ("vsock-cid-negative", ["--kernel", "K", "--vsock", "cid=-3"], USAGE, ["cid='-3'"], ROOT),
    ("vsock-no-cid", ["--kernel", "K", "--vsock", "cid"], USAGE, ["not key=value", "cid=N"], ROOT),
    ("vsock-empty", ["--kernel", "K", "--vsock", ""], USAGE, ["empty option", "cid=N"], ROOT),
    ("vsock-uds-path", ["--kernel", "K", "--vsock", "cid=3,uds_path=/tmp/v.sock"], USAGE, ["unknown option 'uds_path'"], ROOT),
    ("vsock-cid-twice", ["--kernel", "K", "--vsock", "cid=3,cid=4"], USAGE, ["cid= given twice"], ROOT),
    ("device-unknown-kind", ["--kernel", "K", "--device", "disk,path=x"], USAGE, ["--device 'disk,path=x'", "'disk' is not a device kind", "use one of rng, vsock,cid=N"], ROOT),
    ("device-empty", ["--kernel", "K", "--device", ""], USAGE, ["is not a device kind"], ROOT),
    ("device-rng-option", ["--kernel", "K", "--device", "rng,rate=1"], USAGE, ["--device rng: unknown option 'rate'", "--device rng"], ROOT),
    ("device-rng-comma", ["--kernel", "K", "--device", "rng,"], USAGE, ["--device rng: empty option"], ROOT),
    ("device-vsock-no-cid", ["--kernel", "K", "--device", "vsock"], USAGE, ["--device vsock: missing cid=", "--device vsock,cid=N"], ROOT),
    ("device-vsock-cid-2", ["--kernel", "K", "--device", "vsock,cid=2"], USAGE, ["--device vsock: cid='2' is not valid"], ROOT),
    ("device-vsock-twice", ["--kernel", "K", "--device", "vsock,cid=3,cid=3"], USAGE, ["--device vsock: cid= given twice"], ROOT),
    ("device-escape", ["--kernel", "K", "--device", "\x1b[2J"], USAGE, ["\\u{1B}[2J"], ROOT),
    # where /dev/vhost-vsock exists these rows are skipped (it would open); the second one
    # shows the TAP opened before it gone again
    ("vsock-no-device", ["--kernel", "K", "--vsock", "cid=3"], HOST,
     ["--vsock cid=3: /dev/vhost-vsock is missing", "modprobe vhost_vsock"], ROOT + "+novsock"),
    ("vsock-no-device-after-tap", ["--kernel", "K", "--net", "tap=sw0,vhost=off", "--vsock", "cid=3"], HOST,
     ["/dev/vhost-vsock is missing"], NETNS + "+novsock"),
    ("kvm-no-permission", ["--kernel", "K"], HOST, ["/dev/kvm"], NOBODY),
]


@pytest.fixture
def mistakes():
    """A directory others can enter, with the files the MISTAKES rows name."""
    import tempfile
    t = tempfile.mkdtemp(prefix="swiftlet-mistakes-", dir="/tmp")
    os.chmod(t, 0o755)
    os.mkfifo(os.path.join(t, "fifo"))
    os.mkdir(os.path.join(t, "dir"))
    os.mkdir(os.path.join(t, "xdg"))
    for name, data, mode in [("odd.img", bytes(1000), 0o644), ("empty.img", b"", 0o644), ("d.img", bytes(1 << 20), 0o644),
                             ("ro.img", bytes(1 << 20), 0o644), ("secret.img", bytes(1 << 20), 0o600),
                             ("notes.txt", b"hello\n" * 200, 0o644)]:
        with open(os.path.join(t, name), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(t, name), mode)
    yield t
    shutil.rmtree(t)


def tree(top):
    return sorted(os.path.relpath(os.path.join(d, n), top) for d, ds, fs in os.walk(top) for n in ds + fs)


@pytest.mark.parametrize("args,status,words,how", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_table(swiftlet, kernel, mistakes, args, status, words, how):
    if "nobody" in how and os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    if "novhost" in how and os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net")
    if "novsock" in how and os.path.exists("/dev/vhost-vsock"):
        pytest.skip("this host has /dev/vhost-vsock")
    args = [kernel if a == "K" else a.replace("T/", mistakes + "/") for a in args]
    argv = [swiftlet, *args]
    if NOBODY in how:
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
    if NETNS in how:
        # A private network namespace: whatever TAP swiftlet makes is there and nowhere
        # else; what is left in it after swiftlet ends is listed on stdout.
        argv = ["unshare", "--net", "sh", "-c", '"$@"; rc=$?; ip -o link | cut -d" " -f2; exit $rc', "sh", *argv]
    if os.path.join(mistakes, "bad-payload") in args:
        # The default kernel with its LZ4 payload corrupted (as test_corrupt_kernel_payload).
        data = bytearray(open(kernel, "rb").read())
        payload = ((data[0x1f1] or 4) + 1) * 512 + struct.unpack_from("<I", data, 0x248)[0]
        data[payload + 8:payload + 8 + 64] = b"\xff" * 64
        with open(os.path.join(mistakes, "bad-payload"), "wb") as f:
            f.write(bytes(data))
    before = tree(mistakes)
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(mistakes, "xdg"))
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    assert r.returncode == status, (r.returncode, r.stderr)
    one_line(r, *words)
    if NETNS in how:
        assert r.stdout.split() == ["lo:"], "interfaces left: %r" % r.stdout
    else:
        assert r.stdout == ""
    # A kernel cache directory may have been made, and the default one may have gained
    # one finished entry; nothing else (no temporary file, no output file) appears.
    after = [p for p in tree(mistakes) if p not in before]
    assert all(p in ("xdg/swiftlet", "cache") or (p.startswith("xdg/swiftlet/vmlinux-") and p.endswith(".unpacked"))
               for p in after), after
    import fcntl
    with open(os.path.join(mistakes, "d.img"), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_mistake_disk_in_use_by_another_swiftlet(swiftlet, mistakes, tmp_path):
    """README "What a mistake looks like": a disk image another swiftlet is using (it
    holds an exclusive flock on it) is refused with status 66; the first one runs on
    and is stopped cleanly."""
    import signal
    import time
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    guest = tiny_guest(tmp_path, "--halt")
    disk = os.path.join(mistakes, "d.img")
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    p = subprocess.Popen([swiftlet, "--kernel", guest, "--memory", "128M", "--serial", "none", "--disk", "path=" + disk],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not any(open("/proc/%d/task/%s/comm" % (p.pid, t)).read().startswith("vcpu")
                      for t in os.listdir("/proc/%d/task" % p.pid)):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the first swiftlet has no vCPU thread within 20 s"
            time.sleep(0.05)
        before = tree(mistakes)
        r = run_tiny(swiftlet, guest, "--serial", "none", "--disk", "path=" + disk)
        assert r.returncode == MISSING, (r.returncode, r.stderr)
        one_line(r, "in use", "locked by another process", "readonly=on")
        assert tree(mistakes) == before
        assert p.poll() is None, "the first swiftlet runs on"
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
        assert p.returncode == 128 + 15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("mode", ["on", "log", "off", None])
def test_seccomp_modes_run_a_tiny_guest(swiftlet, tmp_path, mode):
    """--seccomp on (the default), log and off: the tiny guest runs and powers off (0),
    nothing on stderr."""
    args = ["--seccomp", mode] if mode else []
    r = run_tiny(swiftlet, tiny_guest(tmp_path), "--metrics", str(tmp_path / "m.json"), *args)
    assert (r.returncode, r.stdout, r.stderr) == (0, "K\n", "")


@pytest.mark.parametrize("mode,filters", [("on", 1), ("off", 0)])
def test_seccomp_every_thread_is_filtered(swiftlet, tmp_path, mode, filters):
    """While the guest runs, each of swiftlet's threads has exactly its own filter
    (/proc/PID/task/TID/status), the -irq thread included; with off, none."""
    import time
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    p = subprocess.Popen([swiftlet, "--kernel", tiny_guest(tmp_path, "--halt"), "--memory", "128M", "--cpus", "2",
                          "--timeout", "3", "--disk", "path=%s" % disk, "--virtio-irq", "irqfd", "--seccomp", mode],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = {}
        for _ in range(40):
            time.sleep(0.1)
            seen = {}
            for tid in os.listdir("/proc/%d/task" % p.pid):
                base = "/proc/%d/task/%s/" % (p.pid, tid)
                name = open(base + "comm").read().strip()
                status = dict(l.split(":", 1) for l in open(base + "status").read().splitlines() if ":" in l)
                seen[name] = int(status["Seccomp_filters"])
            if {"vcpu0", "vcpu1", "blk0-irq"} <= set(seen) and all(v == filters for v in seen.values()):
                break
    finally:
        out, err = p.communicate(timeout=30)
    assert {"vcpu0", "vcpu1", "blk0-irq"} <= set(seen), seen
    assert all(v == filters for v in seen.values()), seen
    assert p.returncode == 124, err


@pytest.mark.parametrize("thread", ["vcpu", "main"])
def test_seccomp_forbidden_call_is_one_line_and_status_1(swiftlet, tmp_path, thread):
    """A forbidden system call (debug builds: SWIFTLET_DEBUG_SECCOMP_SELFTEST makes the
    thread call getppid once its filter is on) ends swiftlet with status 1 and one line
    naming the thread and the call; with --seccomp log the run goes on."""
    guest = tiny_guest(tmp_path)
    os.environ["SWIFTLET_DEBUG_SECCOMP_SELFTEST"] = thread
    try:
        r = run_tiny(swiftlet, guest)
        if r.returncode == 0:
            pytest.skip("a release build: the self-test hook exists only in debug builds")
        assert r.returncode == 1, r.stderr
        name = "vcpu0" if thread == "vcpu" else "main"
        assert one_line(r) == "swiftlet: seccomp: thread %s made forbidden syscall 110 (getppid)" % name
        r = run_tiny(swiftlet, guest, "--seccomp", "log")
        assert (r.returncode, r.stdout, r.stderr) == (0, "K\n", "")
    finally:
        del os.environ["SWIFTLET_DEBUG_SECCOMP_SELFTEST"]


# --config-file: Firecracker's configuration file (README "Configuration file").

# Firecracker's tests/framework/vm_config.json (the example its getting-started guide
# points to for --config-file), every section it has, the unused ones null.
FIRECRACKER_VM_CONFIG = {
    "boot-source": {
        "kernel_image_path": "vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": None,
    },
    "drives": [{
        "drive_id": "rootfs",
        "partuuid": None,
        "is_root_device": True,
        "cache_type": "Unsafe",
        "is_read_only": False,
        "path_on_host": "bionic.rootfs.ext4",
        "io_engine": "Sync",
        "rate_limiter": None,
        "socket": None,
    }],
    "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    },
    "cpu-config": None,
    "balloon": None,
    "network-interfaces": [],
    "vsock": None,
    "logger": None,
    "metrics": None,
    "mmds-config": None,
    "entropy": None,
}

# network-setup.md's network-interfaces request body.
FIRECRACKER_NET = {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}


def write_config(tmp_path, doc, name="vm.json"):
    """doc as a file: bytes and text as they are, anything else as JSON."""
    p = tmp_path / name
    if isinstance(doc, bytes):
        p.write_bytes(doc)
    elif isinstance(doc, str):
        p.write_text(doc)
    else:
        p.write_text(json.dumps(doc, indent=2))
    return str(p)


def test_config_file_firecracker_example_print_config(swiftlet, tmp_path):
    cfg = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, **{"network-interfaces": [FIRECRACKER_NET]}))
    r = sw(swiftlet, "--config-file", cfg, "--print-config")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = json.loads(r.stdout)
    assert out["boot-source"] == {"kernel_image_path": "vmlinux.bin", "initrd_path": None,
                                  "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}
    assert out["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 1024}
    assert [(d["drive_id"], d["path_on_host"], d["is_root_device"], d["is_read_only"]) for d in out["drives"]] == \
        [("rootfs", "bionic.rootfs.ext4", True, False)]
    assert out["network-interfaces"] == [{"iface_id": "net1", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                                          "mtu": 1500, "queues": 1, "offload": True, "vhost": "auto"}]
    assert out["swiftlet"]["serial"] == "stdio" and out["swiftlet"]["timeout"] is None
    # The printed configuration is itself a configuration file that prints the same.
    again = sw(swiftlet, "--config-file", write_config(tmp_path, r.stdout, "again.json"), "--print-config")
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr


def test_config_file_vhost_key_and_net_flag(swiftlet, tmp_path):
    """network-interfaces' vhost (a swiftlet extension) is read and printed; --net's
    vhost= takes on, off or auto, default auto."""
    net = dict(FIRECRACKER_NET, vhost="off")
    cfg = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, **{"network-interfaces": [net]}))
    r = sw(swiftlet, "--config-file", cfg, "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["network-interfaces"][0]["vhost"] == "off"
    for flag, want in [("tap=t0", "auto"), ("tap=t0,vhost=on", "on"), ("tap=t0,vhost=off", "off"), ("tap=t0,vhost=auto", "auto")]:
        r = sw(swiftlet, "--config-file", cfg, "--net", flag, "--print-config")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["network-interfaces"][0]["vhost"] == want, flag


def test_config_file_vsock_and_flag(swiftlet, tmp_path):
    """Firecracker's vsock object (uds_path null) sets the guest CID; --vsock replaces
    it; --print-config shows guest_cid with uds_path null and reads back the same."""
    cfg = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, vsock={"vsock_id": "vsock0", "guest_cid": 52, "uds_path": None}))
    r = sw(swiftlet, "--config-file", cfg, "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vsock"] == {"guest_cid": 52, "uds_path": None}
    again = sw(swiftlet, "--config-file", write_config(tmp_path, r.stdout, "again.json"), "--print-config")
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    r = sw(swiftlet, "--config-file", cfg, "--vsock", "cid=4294967294", "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vsock"] == {"guest_cid": 4294967294, "uds_path": None}
    r = sw(swiftlet, "--config-file", write_config(tmp_path, FIRECRACKER_VM_CONFIG, "none.json"), "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["vsock"] is None, r.stderr


def test_config_file_devices_and_flag(swiftlet, tmp_path):
    """swiftlet.devices lists --device values; --device replaces the list; --print-config
    prints it and reads back the same; a bad entry names its index."""
    cfg = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, swiftlet={"devices": ["rng", "vsock,cid=9"]}))
    r = sw(swiftlet, "--config-file", cfg, "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["swiftlet"]["devices"] == ["rng", "vsock,cid=9"]
    again = sw(swiftlet, "--config-file", write_config(tmp_path, r.stdout, "again.json"), "--print-config")
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    r = sw(swiftlet, "--config-file", cfg, "--device", "rng", "--device", "rng", "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["swiftlet"]["devices"] == ["rng", "rng"], r.stderr
    r = sw(swiftlet, "--config-file", write_config(tmp_path, FIRECRACKER_VM_CONFIG, "none.json"), "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["swiftlet"]["devices"] == [], r.stderr
    for devices, want in [(["rng", "vsock,cid=1"], "swiftlet.devices[1] vsock: cid='1' is not valid"),
                          (["rng", 3], "swiftlet.devices[1]: expected a string"),
                          ("rng", "swiftlet.devices: expected an array"),
                          (["tap"], "swiftlet.devices[0] 'tap': 'tap' is not a device kind")]:
        bad = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, swiftlet={"devices": devices}), "bad.json")
        r = sw(swiftlet, "--config-file", bad, "--print-config")
        assert r.returncode == 64 and r.stdout == "", (devices, r)
        assert r.stderr.startswith("swiftlet: " + want) and r.stderr.count("\n") == 1, (devices, r.stderr)


def test_vhost_auto_without_vhost_net_says_why_once(swiftlet, kernel):
    """vhost=auto (the default) on a host without /dev/vhost-net: one info line naming
    why, the userspace path is used (the run goes on to the KVM check); nothing at the
    default log level."""
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net")
    if subprocess.run(["unshare", "--net", "true"]).returncode != 0:
        pytest.skip("cannot make a network namespace")
    for level, lines in [("info", 1), ("warn", 0)]:
        r = subprocess.run(["unshare", "--net", swiftlet, "--kernel", kernel, "--net", "tap=sw0", "--log-level", level,
                            "--timeout", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=60)
        said = [l for l in r.stderr.splitlines() if "vhost" in l]
        assert len(said) == lines, r.stderr
        if lines:
            assert said[0] == "swiftlet: net0: /dev/vhost-net is missing: using the userspace data path (vhost=auto)", said


def test_config_file_flags_replace_file_values(swiftlet, tmp_path):
    """A flag given on the command line replaces the file's value; --disk and --net replace
    the file's whole drives and network-interfaces lists; the rest stays the file's."""
    cfg = write_config(tmp_path, dict(FIRECRACKER_VM_CONFIG, **{"network-interfaces": [FIRECRACKER_NET]}))
    r = sw(swiftlet, "--config-file", cfg, "--cpus", "4", "--memory", "2G", "--cmdline", "console=ttyS0 -- true",
           "--disk", "path=a.img,readonly=on", "--disk", "path=b.img,num_queues=2", "--timeout", "90s",
           "--serial", "none", "--kernel", "bzImage", "--print-config")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["boot-source"]["kernel_image_path"] == "bzImage"
    assert out["boot-source"]["boot_args"] == "console=ttyS0 -- true"
    assert out["machine-config"] == {"vcpu_count": 4, "mem_size_mib": 2048}
    assert [(d["drive_id"], d["path_on_host"], d["is_root_device"], d["is_read_only"], d["num_queues"])
            for d in out["drives"]] == [("disk0", "a.img", False, True, 1), ("disk1", "b.img", False, False, 2)]
    assert [n["iface_id"] for n in out["network-interfaces"]] == ["net1"], "no --net: the file's list"
    assert out["swiftlet"]["timeout"] == "90s" and out["swiftlet"]["serial"] == "none"
    # Without the file, the flags alone (and swiftlet's defaults).
    r = sw(swiftlet, "--kernel", "k", "--print-config")
    out = json.loads(r.stdout)
    assert out["machine-config"] == {"vcpu_count": 1, "mem_size_mib": 512}
    assert out["boot-source"]["boot_args"] == "console=ttyS0 reboot=k panic=1"
    assert out["drives"] == [] and out["network-interfaces"] == []


@pytest.mark.parametrize("doc,line", [
    ({"drives": [{"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": True},
                 {"drive_id": "data", "is_root_device": False}]},
     "swiftlet: drives[1].path_on_host: missing: give the disk image file"),
    ({"drives": [{"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": True, "cache": "Unsafe"}]},
     "swiftlet: drives[0].cache: unknown key: a drive takes drive_id, path_on_host, is_root_device, is_read_only,"),
    ({"machine-config": {"vcpu_count": "2", "mem_size_mib": 1024}},
     "swiftlet: machine-config.vcpu_count: expected an integer, got a string"),
    ({"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024.5}},
     "swiftlet: machine-config.mem_size_mib: 1024.5 is not an integer"),
    ({"machine-config": {"vcpu_count": 2, "mem_size_mib": 10 ** 30}},
     "swiftlet: machine-config.mem_size_mib: 10000000000000000000... is out of range: give 64 to 1048576 MiB"),
    ({"machine-config": {"vcpu_count": 2}}, "swiftlet: machine-config.mem_size_mib: missing:"),
    ({"boot-source": {"boot_args": "console=ttyS0"}}, "swiftlet: boot-source.kernel_image_path: missing:"),
    ({"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "AA:FC:00:00:00"}]},
     "swiftlet: network-interfaces[0].guest_mac: 'AA:FC:00:00:00' is not a MAC address"),
    ({"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "vhost": "yes"}]},
     "swiftlet: network-interfaces[0].vhost: 'yes' is not valid: use \"on\", \"off\" or \"auto\""),
    ({"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "vhost": True}]},
     "swiftlet: network-interfaces[0].vhost: expected a string, got"),
    ({"vsock": {"guest_cid": 3, "uds_path": "./v.sock"}},
     "swiftlet: vsock.uds_path: swiftlet's vsock is the host kernel's vhost-vsock, which host programs reach over AF_VSOCK"),
    ({"vsock": {"vsock_id": "vsock0", "guest_cid": 2}},
     "swiftlet: vsock.guest_cid: 2 is out of range: give 3 to 4294967294"),
    ({"vsock": {"vsock_id": "vsock0", "uds_path": None}}, "swiftlet: vsock.guest_cid: missing:"),
    ({"swiftlet": {"timeout": "1h30m"}}, "swiftlet: swiftlet.timeout: '1h30m' is not a duration"),
    ({"boot-sauce": {}}, "swiftlet: boot-sauce: unknown key: the configuration takes boot-source,"),
    ([FIRECRACKER_VM_CONFIG], "swiftlet: the configuration: expected an object, got an array"),
])
def test_config_file_errors_name_the_json_path(swiftlet, tmp_path, doc, line):
    r = sw(swiftlet, "--config-file", write_config(tmp_path, doc), "--print-config")
    assert r.returncode == USAGE, (r.returncode, r.stderr)
    assert one_line(r).startswith(line), r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("data,where", [
    (b'{"drives": [}', "byte 12 (line 1, column 13)"),
    (b'{"a": 1,}', "byte 8"),
    (b'{"a": 1} x', "byte 9"),
    (b'{"a": 1, "a": 2}', "byte 9"),
    (b"", "byte 0"),
    (b'{"boot-source": {"kernel_image_path": "k\x00"}}', "byte 40"),
    (b'{"boot-source": {"kernel_image_path": "\xff"}}', "byte 39"),
    (b'{"k": "\xed\xa0\x80"}', "byte 8"),
    (b'{"k": "\\ud800"}', "byte 7"),
    (b"\xef\xbb\xbf{}", "byte 0"),
    (b"[" * 10000, "byte 64"),
    (b'{"n": ' + b"9" * 100000 + b"}", None),
    (b'{"machine-config": {"vcpu_count": 1, "mem_size_mib": 512', "byte 56 (line 1, column 57): unexpected end of input"),
])
def test_config_file_invalid_json_is_one_line_with_the_offset(swiftlet, tmp_path, data, where):
    r = sw(swiftlet, "--config-file", write_config(tmp_path, data), "--print-config")
    assert r.returncode == USAGE, (r.returncode, r.stderr)
    line = one_line(r)
    if where:
        assert line.startswith("swiftlet: --config-file %s: invalid JSON at %s" % (tmp_path / "vm.json", where)), line
    else:
        assert "unknown key" in line, line


def test_config_file_missing_or_unreadable_is_66(swiftlet, tmp_path):
    r = sw(swiftlet, "--config-file", str(tmp_path / "nope.json"))
    assert r.returncode == MISSING
    one_line(r, "nope.json", "does not exist")
    r = sw(swiftlet, "--config-file", str(tmp_path))
    assert r.returncode == MISSING
    one_line(r, "is a directory")
    cfg = write_config(tmp_path, FIRECRACKER_VM_CONFIG)
    os.chmod(cfg, 0)
    os.chmod(tmp_path, 0o755)
    r = sw(swiftlet, "--config-file", cfg, "--print-config", user="65534")
    assert r.returncode == MISSING, r.stderr
    one_line(r, "cannot be read", "permission denied")


def test_config_file_runs_the_guest(swiftlet, tmp_path):
    """A configuration file alone runs a VM: the tiny guest writes 7 to the exit register,
    and swiftlet.timeout and swiftlet.metrics come from the file."""
    guest = tiny_guest(tmp_path, "--exit", "7")
    metrics = tmp_path / "m.json"
    cfg = write_config(tmp_path, {
        "boot-source": {"kernel_image_path": guest},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "swiftlet": {"metrics": str(metrics), "timeout": "30s", "serial": "stdio"},
    })
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    env = dict(os.environ, SWIFTLET_ALLOW_PVM="1")
    r = subprocess.run([swiftlet, "--config-file", cfg], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "K\n"
    assert json.loads(metrics.read_text())["exit"] == {"status": 7, "by": "guest", "reason": "exit-register"}


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], ["--generate-completion-script", "bash"],
                                  ["--kernel", "K", "--print-config"]])
def test_text_only_commands_leave_kvm_alone(swiftlet, args):
    """A command line that only asks for text opens no /dev/kvm (no VM made for nothing)."""
    if not shutil.which("strace"):
        pytest.fail("strace is missing: scripts/deps --install")
    r = run(["strace", "-f", "-e", "trace=openat,open", swiftlet, *args], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "/dev/kvm" not in r.stderr, [l for l in r.stderr.splitlines() if "/dev/kvm" in l]



def test_a_run_opens_kvm_once(swiftlet, tmp_path):
    """The control for the test above (strace sees swiftlet open /dev/kvm when it runs a
    VM), and the device is opened once: by the prefetch thread, not again by the host check."""
    if not os.path.exists("/dev/kvm"):
        pytest.fail("no /dev/kvm on this host")
    tiny = str(tmp_path / "tiny.elf")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "lib", "tinyguest.py"), tiny], check=True)
    r = run(["strace", "-f", "-e", "trace=openat,open", swiftlet, "--kernel", tiny, "--memory", "128M",
             "--serial", "none"], env={"SWIFTLET_ALLOW_PVM": "1"}, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    opens = [l for l in r.stderr.splitlines() if '"/dev/kvm"' in l]
    assert len(opens) == 1, opens
