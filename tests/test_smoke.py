"""scripts/smoke: one end-to-end boot of the default guest under QEMU
(inside the testbed here), and the swiftlet-not-built line."""
import os
import re
import warnings

from conftest import REPO, run, run_retrying_l1

SMOKE = os.path.join(REPO, "scripts", "smoke")


def smoke(vmm, env=None):
    """scripts/smoke --vmm VMM, run once more after an L1 failure (run_retrying_l1), or
    after a failure whose guest lost its paging state below the VMM (smoke's "testbed:"
    line, the testbed's own fault); the retry is a warning, a second failure stands."""
    r = run_retrying_l1([SMOKE, "--vmm", vmm], "smoke --vmm " + vmm, env=env, timeout=1300)
    lost = [l for l in r.stdout.splitlines() if l.startswith("smoke: testbed: ")]
    if r.returncode != 0 and lost:
        warnings.warn("smoke --vmm %s retried: %s" % (vmm, lost[0]))
        r = run_retrying_l1([SMOKE, "--vmm", vmm], "smoke --vmm " + vmm, env=env, timeout=1300)
    return r


def test_smoke_qemu_end_to_end(testbed_image):
    r = smoke("qemu")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"smoke: ok qemu userspace in \d+ ms", last), last
    for marker in ("swiftlet-guest: disk vda present", "swiftlet-guest: net eth0 present",
                   "swiftlet-guest: root /dev/vda mounted", "swiftlet-guest: ping ok",
                   "swiftlet-guest: exit status 0"):
        assert re.search(r"^[0-9.]+ " + re.escape(marker), out, re.M), marker
    assert_iperf(out)
    print(last)


def assert_iperf(out):
    """The guest's 3 s iperf3 to L1 finished with a non-zero rate, and smoke printed it."""
    m = re.search(r"^smoke: iperf3 guest->host ([0-9.]+) Mbits/sec$", out, re.M)
    assert m and float(m.group(1)) > 0, out[-2000:]
    assert re.search(r"^[0-9.]+ swiftlet-guest: iperf3 status 0 rate [0-9.]+ Mbits/sec$", out, re.M), out[-2000:]


def test_smoke_swiftlet_end_to_end(testbed_image, swiftlet_release):
    """The default guest under swiftlet, root on its virtio-blk disk found via ACPI."""
    r = smoke("swiftlet", env={"SWIFTLET_BIN": swiftlet_release})
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"smoke: ok swiftlet userspace in \d+ ms", last), last
    for marker in ("swiftlet-guest: disk vda present", "swiftlet-guest: root /dev/vda mounted",
                   "swiftlet-guest: net eth0 present", "swiftlet-guest: ping ok",
                   "swiftlet-guest: exit status 0"):
        assert re.search(r"^[0-9.]+ " + re.escape(marker), out, re.M), marker
    assert_iperf(out)
    print(last)


def test_smoke_swiftlet_not_built(tmp_path):
    r = run([SMOKE, "--vmm", "swiftlet"], env={"SWIFTLET_BIN": str(tmp_path / "none")})
    assert r.returncode == 3
    assert r.stdout.strip().splitlines()[-1].startswith("smoke: FAILED swiftlet not built yet")
