"""swiftlet boots Debian's stock cloud kernel in the testbed (a real KVM) and
each behaviour of scripts/swiftlet-guest-checks is asserted on its own.
Two testbed sessions run them at once (the network checks in the second); after an L1
crash a new one runs the checks of that session left."""
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, run

sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
from testbed_session import Session  # noqa: E402

CHECKS = ["metrics-json", "one-cpu-cmdline-initrd", "boot-marker", "boot-no-kernel-errors", "rtc-host-time", "pci-type1", "two-cpus", "reboot-status-3",
          "reboot-kbd-status-3", "triple-fault-status-4",
          "exit-status-false-1", "exit-status-7", "exit-status-true-0", "timeout-status-124", "console-input",
          "blk-guest-write", "blk-guest-read", "blk-read-irqfd", "blk-readonly", "blk-two-queues",
          "blk-flush-survives-kill", "blk-discard-frees-blocks", "rng-hwrng",
          "vsock-host-to-guest", "vsock-guest-to-host", "vsock-cid-in-use", "vsock-driver-rebind",
          "net-ping", "net-ping-host-to-guest", "net-two-queues", "net-iperf-guest-to-host",
          "net-iperf-host-to-guest", "net-offload-off", "net-ethtool-L", "net-mq-traffic-both-queues", "net-jumbo-mtu",
          "net-vhost-ping", "net-vhost-jumbo-mtu", "net-driver-reload", "net-vhost-iperf-guest-to-host",
          "net-vhost-iperf-host-to-guest", "net-vhost-offload-off", "net-vhost-ethtool-L",
          "net-vhost-mq-traffic-both-queues", "virtio-irq-edge-ack-in-kvm", "virtio-irq-line-ack-exits",
          "virtio-registers-exit"]


# The checks run in two testbeds at once, the network ones in the second: most checks
# boot a 1-vCPU guest, which keeps one of L1's two TCG threads busy, so two L1s share
# the host's cores instead of one leaving a core idle.
GROUPS = [[c for c in CHECKS if not c.startswith("net-")], [c for c in CHECKS if c.startswith("net-")]]


def run_group(group, swiftlet_release, l1_failures):
    """Runs one group of scripts/swiftlet-guest-checks in the testbed through
    scripts/lib/testbed_session.py: when L1 itself crashes or wedges (testbed status 121
    or 124), a new testbed runs the checks of the group with no result yet, the check L1
    died in once more (not twice); the `l1_failures`th L1 failure of the group ends it
    (the caller's assertions then fail). Returns (status, output, warnings)."""
    env = dict(os.environ, SWIFTLET_BIN=swiftlet_release)

    def argv_for(todo):
        skip = " ".join(c for c in CHECKS if c not in todo)
        return ["sh", "-c", 'SWIFTLET_CHECKS_SKIP="$1" exec sh "$TESTBED_SCRIPTS/swiftlet-guest-checks"', "sh", skip]
    # every boot of a check is bounded (90 s) and each check prints a line, so 240 s
    # of silence is a wedged L1
    s = Session(group, argv_for, start_re=r"^running (.*)$", done_re=r"^check (\S+) (?:ok|FAILED)",
                max_l1_failures=l1_failures, idle_timeout=240, timeout_for=lambda n: 300 + 60 * n,
                retry_item=True, out=None, env=env)
    status = s.run()
    notes = ["swiftlet-guest-checks: testbed run %d: L1 %s during check %s" % (
        n, kind, item or "(none: before the first check)") for item, kind, n in s.l1_failures]
    notes += ["swiftlet-guest-checks: " + line for line in s.output().splitlines() if line.startswith("testbed: ")]
    return status, s.output(), notes


def run_checks_resuming(swiftlet_release, l1_failures=2):
    """Every group of GROUPS in its own testbed, all at once (run_group; at most
    `l1_failures` L1 failures per group). Returns (the first failing group's testbed
    status, else 0; every group's output, in the order of GROUPS)."""
    with ThreadPoolExecutor(len(GROUPS)) as pool:
        results = list(pool.map(lambda g: run_group(g, swiftlet_release, l1_failures), GROUPS))
    for _, _, notes in results:
        for n in notes:
            warnings.warn(n)
    status = next((st for st, _, _ in results if st != 0), 0)
    return status, "\n".join(out for _, out, _ in results)


@pytest.fixture(scope="module")
def checks(testbed_image, swiftlet_release):
    status, out = run_checks_resuming(swiftlet_release)
    # An L1 crash or timeout is the testbed's, and says so in its own line.
    assert status not in (120, 121, 122, 124, 127), "testbed failed, not swiftlet:\n" + out[-3000:]
    assert out.count("checks done") == len(GROUPS), out[-3000:]
    return out


@pytest.mark.parametrize("name", CHECKS)
def test_swiftlet_guest(checks, name):
    m = re.search(r"^check %s (ok|FAILED.*)$" % re.escape(name), checks, re.M)
    assert m, "check %s did not run:\n%s" % (name, checks[-3000:])
    assert m.group(1) == "ok", checks[checks.find("check %s FAILED" % name):][:12000]


def test_checks_resume_names(tmp_path):
    """The names a resumed session skips are the checks' own: every check in CHECKS is
    guarded by a `todo` naming it, and with all of them skipped the script boots nothing
    and still ends with "checks done" (run here, no KVM needed: nothing boots)."""
    script = os.path.join(REPO, "scripts", "swiftlet-guest-checks")
    with open(script) as f:
        text = f.read()
    todo = set()
    for line in re.findall(r"todo ([A-Za-z0-9 -]+); then", text):
        todo.update(line.split())
    assert todo == set(CHECKS)
    fake = tmp_path / "swiftlet"
    fake.write_text("#!/bin/sh\necho booted >> %s/booted\n" % tmp_path)
    fake.chmod(0o755)
    r = run(["sh", script], env={"TESTBED_IMAGES": str(tmp_path), "TESTBED_SCRATCH": str(tmp_path),
                                 "TESTBED_SWIFTLET": str(fake), "SWIFTLET_CHECKS_SKIP": " ".join(CHECKS)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["checks done"], r.stdout
    assert not (tmp_path / "booted").exists()
    # one check left: only it runs (the fake swiftlet "boots" and the check fails)
    left = "two-cpus"
    r = run(["sh", script], env={"TESTBED_IMAGES": str(tmp_path), "TESTBED_SCRATCH": str(tmp_path),
                                 "TESTBED_SWIFTLET": str(fake),
                                 "SWIFTLET_CHECKS_SKIP": " ".join(c for c in CHECKS if c != left)}, timeout=60)
    assert re.findall(r"^(running .*|check \S+ \S+)", r.stdout, re.M) == ["running two-cpus", "check two-cpus FAILED"], r.stdout
    assert (tmp_path / "booted").read_text() == "booted\n"
