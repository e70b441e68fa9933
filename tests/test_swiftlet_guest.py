"""swiftlet boots Debian's stock cloud kernel in the testbed (a real KVM) and
each behaviour of scripts/swiftlet-guest-checks is asserted on its own.
One testbed session runs every check, to keep L1 boots few."""
import os
import re
import warnings

import pytest

from conftest import REPO, run_retrying_l1

CHECKS = ["metrics-json", "one-cpu-cmdline-initrd", "boot-marker", "two-cpus", "reboot-status-3",
          "reboot-kbd-status-3", "triple-fault-status-4", "console-input",
          "blk-guest-write", "blk-guest-read", "blk-read-irqfd", "blk-readonly", "blk-two-queues",
          "blk-flush-survives-kill", "blk-discard-frees-blocks",
          "net-ping", "net-two-queues", "net-iperf-guest-to-host",
          "net-iperf-host-to-guest", "net-offload-off", "net-ethtool-L", "net-jumbo-mtu"]


@pytest.fixture(scope="module")
def checks(testbed_image, swiftlet_release):
    # --idle-timeout: the checks are never silent for long (the longest: a net check
    # that hangs three times, 3 x 90 s), so 400 s of silence is a wedged L1
    r = run_retrying_l1([os.path.join(REPO, "scripts", "testbed"), "--timeout", "1200", "--idle-timeout", "400", "--",
                         "sh", "-c", 'exec sh "$TESTBED_SCRIPTS/swiftlet-guest-checks"'],
                        "testbed session", env={"SWIFTLET_BIN": swiftlet_release}, timeout=1500)
    out = r.stdout + r.stderr
    # An L1 crash or timeout is the testbed's, and says so in its own line.
    assert r.returncode not in (120, 121, 122, 124, 127), "testbed failed, not swiftlet:\n" + out[-3000:]
    assert "checks done" in out, out[-3000:]
    # A check retried after a nested-testbed guest crash says so; show it in the summary.
    for line in re.findall(r"^retry: .*$", out, re.M):
        warnings.warn("swiftlet-guest-checks " + line)
    return out


@pytest.mark.parametrize("name", CHECKS)
def test_swiftlet_guest(checks, name):
    m = re.search(r"^check %s (ok|FAILED.*)$" % re.escape(name), checks, re.M)
    assert m, "check %s did not run:\n%s" % (name, checks[-3000:])
    assert m.group(1) == "ok", checks[checks.find("check %s FAILED" % name):][:2500]
