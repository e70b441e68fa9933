"""scripts/bench datapath: swiftlet's virtio-net queues against raw TAP I/O, on a real
TAP in a private network namespace with real frames (no VM). Figures are not judged
here, only that every case moved frames and the output parses."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, run, unshare_refused

BENCH = os.path.join(REPO, "scripts", "bench")
BIN = os.path.join(REPO, ".build-release", "release", "swiftlet-datapath-bench")
NUM = r"[0-9]+(?:\.[0-9]+)?"
LAST = re.compile(
    r"^datapath: " + "; ".join(r"%s %s swiftlet (%s)/frame raw (%s)/frame ratio (%s)" % (d, s, NUM, NUM, NUM)
                               for d in ("tx", "rx") for s in ("1500B", "64K"))
    + r"; 2-pair/1-pair scaling tx (%s) rx (%s)$" % (NUM, NUM))


def test_datapath_one_round_parses():
    why = unshare_refused()
    if why:
        pytest.skip(why)
    r = run([BENCH, "datapath", "--runs", "1", "--millis", "100"], timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    lines = r.stdout.splitlines()
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    values = [float(x) for x in m.groups()]
    # ns/frame of both and their ratio for 4 cases, then 2 scalings: all measured
    assert all(v > 0 for v in values), lines[-1]
    for d in ("tx", "rx"):
        for s in ("1500B", "64K"):
            for p in ("1 pair :", "2 pairs:"):
                assert any(l.startswith("datapath: %s %-5s %s swiftlet " % (d, s, p)) for l in lines), (d, s, p, out)
    # every case moved frames and dropped none (else a "datapath: case ..." line)
    assert not [l for l in lines if l.startswith("datapath: case ")], out
    # the TAP's own counters saw every frame the device or the raw loop moved
    for l in lines:
        if "TAP-counted frames" in l:
            assert "TAP-counted frames 1.00 (" in l, l
    assert any(l.startswith("datapath: goal swiftlet cost <= 1.3x raw per frame: ") for l in lines)


def test_datapath_usage_errors():
    for args in (["--millis", "5"], ["--millis"], ["--runs", "0"], ["--bogus"]):
        r = run([BENCH, "datapath"] + args, timeout=60)
        assert r.returncode == 64, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "usage" in r.stderr, (args, r.stderr)
    # --millis belongs to datapath only
    r = run([BENCH, "boot", "--millis", "100"], timeout=60)
    assert r.returncode == 64


def test_datapath_bench_refuses_without_privileges():
    """Without root: one line naming the problem and the fix, status 77, no TAP made."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the binary as an unprivileged user")
    # built as scripts/bench builds it (the same flags: .build-release is shared with swiftlet's build)
    ns = {"__file__": BENCH, "__name__": "loaded"}
    exec(compile(open(BENCH).read(), BENCH, "exec"), ns)
    assert ns["datapath_bin"]() == BIN
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", BIN, "--millis", "10"], timeout=60)
    if r.returncode == 126 or "Permission denied" in r.stderr and "swiftlet-datapath-bench:" not in r.stderr:
        pytest.skip("the build directory is not executable for an unprivileged user: %s" % r.stderr.strip())
    assert r.returncode == 77, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("swiftlet-datapath-bench: cannot make a private network namespace"), r.stderr
    assert "run as root" in r.stderr
    assert r.stdout == ""
    r = run([BIN, "--millis", "abc"], timeout=60)
    assert r.returncode == 64 and r.stderr.count("\n") == 1, r.stderr
