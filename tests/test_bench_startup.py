"""scripts/bench startup: swiftlet's exec to first KVM_RUN (timed from the child's clock
just before its execve) and its own memory, beside QEMU microvm's, with a tiny guest
on this machine's /dev/kvm. Figures are not judged here, only that each is measured
and the output parses."""
import os
import re

from conftest import REPO, run

BENCH = os.path.join(REPO, "scripts", "bench")
NUM = r"[0-9]+(?:\.[0-9]+)?"
EXEC = re.compile(r"^startup: swiftlet exec to first KVM_RUN: (%s) \((%s)-(%s)(?:, cv %s%%)?\) us over 2 runs$"
                  % (NUM, NUM, NUM, NUM), re.M)
SPLIT = re.compile(r"^startup: swiftlet exec to main: (%s) \(.*\) us, main to first KVM_RUN: (%s) \(.*\) us$"
                   % (NUM, NUM), re.M)
FLOOR = re.compile(r"^startup: a static glibc C program, exec to main: (%s) \(.*\) us \(built with gcc -static, same clocks\)$"
                   % NUM, re.M)
LAST = re.compile(r"^startup: swiftlet (\d+) us to first KVM_RUN, (\d+) KiB own RSS \(qemu-microvm (\d+) KiB\); "
                  r"strace: swiftlet (%s) ms, qemu-microvm (%s) ms$" % (NUM, NUM))


def test_startup_measures_from_exec(swiftlet_release):
    r = run([BENCH, "startup", "--runs", "2"], env=dict(os.environ, SWIFTLET_BIN=swiftlet_release), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = EXEC.search(r.stdout)
    assert m, r.stdout
    median, low, high = (float(x) for x in m.groups())
    # from the child's own clock: positive, and far below the 30 s a run may take
    assert 0 < low <= median <= high < 30_000_000, r.stdout
    # split at main: both parts measured, and they add up to the whole (medians of 2)
    m = SPLIT.search(r.stdout)
    assert m, r.stdout
    to_main, after_main = (float(x) for x in m.groups())
    assert 0 < to_main and 0 < after_main and to_main + after_main <= 2 * high, r.stdout
    m = FLOOR.search(r.stdout)
    assert m and 0 < float(m.group(1)) < 30_000_000, r.stdout
    last = r.stdout.strip().splitlines()[-1]
    m = LAST.match(last)
    assert m, last
    assert int(m.group(1)) == int(median)
    assert 0 < int(m.group(2)) < int(m.group(3)), last
