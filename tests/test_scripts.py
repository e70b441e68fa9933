"""scripts/test's counting, scripts/deps as the one package list, the stress console
verdict, .ci/run's ThreadSanitizer verdict."""
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import REPO, run, unshare_refused

TEST = os.path.join(REPO, "scripts", "test")


def load(path):
    ns = {"__file__": path, "__name__": "loaded"}
    exec(compile(open(path).read(), path, "exec"), ns)
    return ns


XCTEST_OUT = """Test Suite 'X' failed at 2026-11-21 10:30:51.893
\t Executed 3 tests, with 1 test skipped and 1 failure (0 unexpected) in 0.001 (0.001) seconds
Test Suite 'All tests' failed at 2026-11-21 10:30:51.894
\t Executed 5 tests, with 1 test skipped and 2 failures (0 unexpected) in 0.001 (0.001) seconds
"""
SWIFT_TESTING_OUT = """\u25c7 Test run started.
\u279c Test skipped() skipped: "no"
\u2718 Test bad() recorded an issue at T.swift:5:20: Expectation failed
\u2718 Test bad() failed after 0.001 seconds with 1 issue.
\u2714 Test param(x:) with 3 test cases passed after 0.001 seconds.
\u2714 Test good() passed after 0.001 seconds.
\u2718 Test run with 4 tests in 0 suites failed after 0.001 seconds with 1 issue.
"""


def test_counts_xctest_and_swift_testing_output():
    t = load(TEST)
    assert t["xctest_counts"](XCTEST_OUT) == (2, 2, 1)
    assert t["xctest_counts"]("Executed 4 tests, with 0 failures (0 unexpected)") == (4, 0, 0)
    assert t["xctest_counts"]("no tests here") is None
    assert t["swift_testing_console"](SWIFT_TESTING_OUT) == (2, 1, 1)


def test_counts_junit_xml(tmp_path):
    t = load(TEST)
    x = tmp_path / "r.xml"
    x.write_text('<testsuites><testsuite name="s">'
                 '<testcase name="a"/><testcase name="b"><failure message="m"/></testcase>'
                 '<testcase name="c"><skipped/></testcase><testcase name="d"><error/></testcase>'
                 '</testsuite></testsuites>')
    assert t["count_junit"]([str(x)]) == (1, 2, 1)
    assert t["count_junit"]([str(tmp_path / "missing.xml")]) is None


def test_summary_line_and_status_follow_failures(tmp_path):
    # run scripts/test's python part on a throwaway tests/ tree
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "tests").mkdir()
    with open(TEST) as f:
        (repo / "scripts" / "test").write_text(f.read())

    def run_test():
        return subprocess.run(["python3", str(repo / "scripts" / "test"), "--no-swift"], cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    (repo / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_ok2(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skip(): pass\n")
    r = run_test()
    assert r.returncode == 1, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "2 passed, 1 failed, 1 skipped"
    (repo / "tests" / "test_x.py").write_text("def test_ok(): pass\n")
    r = run_test()
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"
    # with a tests/test_swiftlet_guest.py, the guest checks run in a pytest process of
    # their own beside the rest: both counted, and the other's output after the first's
    (repo / "tests" / "test_swiftlet_guest.py").write_text(
        "def test_guest_ok(): pass\n"
        "def test_guest_bad(): assert False\n")
    r = run_test()
    assert r.returncode == 1, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "2 passed, 1 failed"
    heads = [l for l in r.stdout.splitlines() if l.startswith("test: == ")]
    assert heads == ["test: == python3 -m pytest -q tests/test_swiftlet_guest.py ==",
                     "test: == python3 -m pytest -q tests/ --ignore tests/test_swiftlet_guest.py =="], r.stdout
    assert r.stdout.index("test_guest_bad") < r.stdout.index(heads[1]), r.stdout
    (repo / "tests" / "test_swiftlet_guest.py").write_text("def test_guest_ok(): pass\n")
    r = run_test()
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "2 passed, 0 failed"


def test_one_package_list_shared_by_setup_and_ci():
    r = run([os.path.join(REPO, "scripts", "deps")])
    pkgs = r.stdout.split()
    # QEMU and its firmware from bookworm-backports (the testbed's L0), named with the suite
    for p in ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"):
        assert p + "/bookworm-backports" in pkgs
    for p in ("busybox-static", "iperf3", "e2fsprogs", "cpio", "kmod", "fio",
              "ethtool", "iproute2", "socat"):
        assert p in pkgs
    for f in ("scripts/setup", ".ci/run"):
        with open(os.path.join(REPO, f)) as fh:
            src = fh.read()
        assert "scripts/deps\" --install" in src or "scripts/deps --install" in src, f
        assert "apt-get install" not in src, f


# scripts/lib/console.sh's stress_classify on saved consoles. The guest's /init echoes
# its command first, and the command holds the marker: only a line of its own counts.
FIO_CMD = ("fio --name=r --filename=/dev/vdb --rw=randread --bs=4k --output-format=terse > /tmp/f 2>&1"
           " && echo stress-load-ok; cut -d\";\" -f7,8 /tmp/f")
NET_CMD = ("iperf3 -c 172.30.0.1 -t 10 -f m > /tmp/a 2>&1; a=$?; tail -n 3 /tmp/a\n"
           "[ $a = 0 ] && echo stress-load-ok")


def classify(tmp_path, console, vmm="swiftlet", status=0):
    f = tmp_path / "console"
    f.write_bytes(console.encode())
    r = subprocess.run(["sh", "-c", '. "$1"; stress_classify "$2" "$3" "$4"', "sh",
                        os.path.join(REPO, "scripts", "lib", "console.sh"), str(f), vmm, str(status)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout.strip()


def test_stress_a_failed_load_whose_command_echoes_the_marker_is_not_ok(tmp_path):
    # fio failed, the command still ended 0 (its last part is cut): the echo alone
    # holds "stress-load-ok"
    console = ("swiftlet-guest: userspace uptime=0.61\r\n"
               "swiftlet-guest: run " + FIO_CMD + "\r\n"
               "fio: failed to open /dev/vdb\r\n"
               "swiftlet-guest: exit status 0\r\n")
    assert classify(tmp_path, console).startswith("load-failed guest status 0 fio: failed")
    # the same for a multi-line command, whose marker line stands alone in the echo
    console = ("swiftlet-guest: run " + NET_CMD.replace("\n", "\r\n") + "\r\n"
               "iperf3: error - unable to connect to server\r\n"
               "swiftlet-guest: exit status 0\r\n")
    assert classify(tmp_path, console).startswith("load-failed")


def test_stress_ok_needs_the_marker_line_the_exit_line_and_status_0(tmp_path):
    good = ("swiftlet-guest: run " + FIO_CMD + "\r\n"
            "stress-load-ok\r\n12345;67890\r\n"
            "swiftlet-guest: exit status 0\r\n")
    assert classify(tmp_path, good) == "ok"
    assert classify(tmp_path, good.replace("\r\n", "\n")) == "ok"
    assert classify(tmp_path, good, status=1) == "vmm-error status 1"
    assert classify(tmp_path, good, status=137) == "hang no exit within 120 s"
    assert classify(tmp_path, good.replace("exit status 0", "exit status 2"), status=2).startswith(
        "load-failed guest status 2")
    # a marker inside another line, or with more on its line, is not the marker
    for bad in ("xstress-load-ok", "stress-load-ok now", "echo stress-load-ok"):
        assert classify(tmp_path, good.replace("stress-load-ok\r\n", bad + "\r\n")).startswith("load-failed"), bad
    # no exit line at all (QEMU after a reset), a panic, hostile bytes
    assert classify(tmp_path, "stress-load-ok\n", vmm="qemu").startswith("guest-crash no exit marker")
    assert classify(tmp_path, "Kernel panic - not syncing: Fatal exception\n", status=1).startswith(
        "guest-crash panic")
    assert classify(tmp_path, "\x00\xff\x1b[2J" * 100 + "\n", status=1).startswith("guest-crash no exit marker")


def test_stress_a_swiftlet_stopped_by_the_limit_is_a_hang_naming_its_vcpus(tmp_path):
    # scripts/stress-inner stops swiftlet with SIGTERM: its stop line says where the vCPUs
    # were, the page table root too when it lies outside guest RAM
    stuck = ("swiftlet-guest: run " + NET_CMD.replace("\n", "\r\n") + "\r\n"
             "swiftlet: stopped by signal 15 after 120013 ms, boot marker at 3442 ms (vCPU 0 at rip "
             "0xffffffffc0392dcc with its page table root 0x123c32000 outside guest RAM, vCPU 1 at rip "
             "0xffffffff81c5d1a4)\n")
    where = ("vCPU 0 at rip 0xffffffffc0392dcc with its page table root 0x123c32000 outside guest RAM, "
             "vCPU 1 at rip 0xffffffff81c5d1a4")
    assert classify(tmp_path, stuck, status=143) == "hang no exit within 120 s (%s)" % where[:120]
    # without a stop line only SIGKILL's status says hang
    assert classify(tmp_path, stuck.split("swiftlet: stopped")[0], status=143).startswith("guest-crash no exit")
    assert classify(tmp_path, stuck, status=137) == "hang no exit within 120 s"


# scripts/lib/vmm.sh's again_if_root_lost around a stand-in for a swiftlet run: RUN writes
# the stop line it is given for its Nth call into $out and sets $rc.
def root_lost_runs(tmp_path, *outcomes):
    script = (
        '. "$1"; shift; out=$1; shift; n=0; current="net-x net-y"\n'
        'run() { n=$((n + 1)); eval "line=\\${$n}"; printf "%s\\n" "$line" > "$out"; case "$line" in ok*) rc=0;; *) rc=143;; esac; }\n'
        'again_if_root_lost run "$@"; echo "runs=$n rc=$rc"\n')
    r = subprocess.run(["sh", "-c", script, "sh", os.path.join(REPO, "scripts", "lib", "vmm.sh"),
                        str(tmp_path / "out")] + list(outcomes), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout


LOST = ("swiftlet: vCPU 0 stopped at rip 0xffffffffc0392dcc rsp 0xffffd32dc18a3a80 cr3 0x123c32000 "
        "with its page table root 0x123c32000 outside guest RAM")
HUNG = "swiftlet: vCPU 0 stopped at rip 0xffffffff81c5d1a4 rsp 0xffffd32dc18a3a80 cr3 0x3c32000"


def test_a_boot_whose_page_tables_were_lost_below_swiftlet_runs_once_more(tmp_path):
    out = root_lost_runs(tmp_path, LOST, "ok")
    assert out.endswith("runs=2 rc=0\n"), out
    assert out.startswith("testbed: guest page tables lost below swiftlet during net-x net-y; "
                          "booting it once more:\n  " + LOST + "\n"), out
    # only once: a second loss stands
    assert root_lost_runs(tmp_path, LOST, LOST, "ok").endswith("runs=2 rc=143\n")
    # an ordinary hang, a pass, or the words in a run that ended well: no repeat
    for first in (HUNG, "ok", "ok " + LOST):
        out = root_lost_runs(tmp_path, first, "ok")
        assert out == "runs=1 rc=%d\n" % (0 if first.startswith("ok") else 143), (first, out)


# Every swiftlet the guest checks start is stopped with SIGTERM before SIGKILL, so a hung
# guest prints the stop line again_if_root_lost reads, and every boot in them is one it
# wraps (boot(), or an X_once function passed to it).
def test_guest_checks_stop_swiftlet_with_term_and_repeat_every_boot():
    text = open(os.path.join(REPO, "scripts", "swiftlet-guest-checks")).read()
    runs = [l for l in text.splitlines() if re.search(r'\btimeout\b[^"]*"\$sw"', l)]
    assert len(runs) >= 6, runs
    for l in runs:
        assert re.search(r'\btimeout -k \d+ -s TERM \d+ "\$sw"', l), l
    # each function that runs the first swiftlet of a check is wrapped
    onces = set(re.findall(r"^(\w+_once)\(\) \{", text, re.M))
    assert {"boot_once", "netping_once", "timeout_once", "console_once"} <= onces, onces
    for f in onces:
        assert re.search(r"again_if_root_lost %s\b" % f, text), f
    bare = [l for l in text.splitlines() if re.match(r'\s*(\$netns sh -c .*)?timeout [^"]*"\$sw"', l)]
    inside = set()
    for m in re.finditer(r"^\w+_once\(\) \{\n(.*?)^\}", text, re.M | re.S):
        inside.update(m.group(1).splitlines())
    assert [l for l in bare if l not in inside] == [], "a swiftlet boot outside again_if_root_lost"
    # at --log-level info, so a stop by signal prints the vCPUs' stop line
    for l in bare:
        assert "--log-level info" in l, l


# scripts/smoke-inner with a stand-in swiftlet that prints STOP and ends with STATUS, L1's
# KVM trace being TRACE, in a private network namespace (smoke makes a TAP)
def smoke_inner_with(tmp_path, stop, trace="", status=143):
    why = unshare_refused() or (None if shutil.which("iperf3") else "no iperf3")
    if why:
        pytest.skip(why)
    images = tmp_path / "images"
    (tmp_path / "tracing" / "events" / "kvm").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tracing" / "trace").write_text(trace)
    images.mkdir(exist_ok=True)
    for f in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
        (images / f).write_text("x")
    fake = tmp_path / "swiftlet"
    fake.write_text("#!/bin/sh\necho 'swiftlet-guest: userspace'\necho '%s'\nexit %d\n" % (stop, status))
    fake.chmod(0o755)
    env = dict(os.environ, TESTBED_MODE="l1", KVM_TRACING=str(tmp_path / "tracing"), TESTBED_IMAGES=str(images),
               TESTBED_SCRATCH=str(tmp_path), TESTBED_SWIFTLET=str(fake), SMOKE_VMM_TIMEOUT="20")
    r = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up; exec "$0" swiftlet',
                        os.path.join(REPO, "scripts", "smoke-inner")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r
    return r.stdout.splitlines()


def test_smoke_says_when_the_testbed_lost_the_guests_paging(tmp_path):
    # a hung guest (smoke kills the VMM: no stop line) whose page-table walk L1's trace shows
    # above guest RAM
    lines = smoke_inner_with(tmp_path, HUNG, LOST_WALK_TRACE)
    i = lines.index("smoke: testbed: the guest's paging state was lost below swiftlet (lib/vmm.sh paging_lost)")
    assert "reason npf" in lines[i + 1] and "info2 0x0000000100c84fe0" in lines[i + 1], lines
    assert lines[-1] == "smoke: FAILED guest did not see its disk vda", lines
    # the same hang with no such trace is swiftlet's failure, with no testbed line
    for trace in ("", LOST_WALK_TRACE.replace("info2 0x0000000100c84fe0", "info2 0x000000001fc84fe0")):
        lines = smoke_inner_with(tmp_path, HUNG, trace)
        assert lines[-1] == "smoke: FAILED guest did not see its disk vda", lines
        assert not [l for l in lines if l.startswith("smoke: testbed:")], lines
    # a VMM that ended with status 0 ran its guest to poweroff: whatever the trace, not the testbed
    lines = smoke_inner_with(tmp_path, "", LOST_WALK_TRACE, status=0)
    assert lines[-1] == "smoke: FAILED guest did not see its disk vda", lines
    assert not [l for l in lines if l.startswith("smoke: testbed:")], lines


# L1's trace of a 2-vCPU guest whose vCPU 1 shut down on an instruction-fetch page fault
# at the address KVM had just entered it at (a stress run of fio2, abridged).
LOST_FETCH_TRACE = """# tracer: nop
           vcpu1-4257    [000] .....  1240.996828: kvm_exit: vcpu 1 reason npf rip 0xffffffffc0214398 info1 0x000000010000000c info2 0x00000000d0002060 intr_info 0x00000022 error_code 0x00000000
           vcpu1-4257    [000] .....  1240.996909: kvm_userspace_exit: reason KVM_EXIT_MMIO (6)
           vcpu0-4256    [001] .....  1240.997123: kvm_exit: vcpu 0 reason npf rip 0xffffffffc02140d3 info1 0x000000010000000e info2 0x00000000d0002050 intr_info 0x00000000 error_code 0x00000000
           vcpu1-4257    [000] d..1.  1240.997132: kvm_entry: vcpu 1, rip 0xffffffffc021439b
           vcpu1-4257    [000] .....  1240.997199: kvm_exit: vcpu 1 reason npf rip 0xffffffffc02143a2 info1 0x000000010000000e info2 0x00000000d0002064 intr_info 0x00000000 error_code 0x00000000
           vcpu1-4257    [000] d..1.  1240.997275: kvm_entry: vcpu 1, rip 0xffffffffc02143a5
           vcpu0-4256    [001] .....  1240.997607: kvm_inj_virq: IRQ 0xec
           vcpu0-4256    [001] d..1.  1240.997634: kvm_entry: vcpu 0, rip 0xffffffffc02140d6
           vcpu1-4257    [000] .....  1240.997855: kvm_exit: vcpu 1 reason shutdown rip 0xffffffffc02143a5 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000010
           vcpu0-4256    [001] .....  1240.997866: kvm_exit: vcpu 0 reason interrupt rip 0xffffffff819b9220 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x000000ec error_code 0x00000000
           vcpu1-4257    [000] .....  1241.000537: kvm_userspace_exit: reason KVM_EXIT_SHUTDOWN (8)
"""
TRIPLE = "swiftlet: guest crashed: triple fault on vCPU 1 after 12390 ms, boot marker at 5042 ms"


def lost_fetch_runs(tmp_path, trace, mode="l1"):
    (tmp_path / "trace").write_text(trace)
    (tmp_path / "tracing_on").write_text("1\n")
    script = (
        '. "$1"; shift; out=$1; shift; n=0; current="fio-x"\n'
        'run() { n=$((n + 1)); eval "line=\\${$n}"; printf "%s\\n" "$line" > "$out"; case "$line" in ok*) rc=0;; *) rc=4;; esac; }\n'
        'again_if_root_lost run "$@"; echo "runs=$n rc=$rc"\n')
    r = subprocess.run(["sh", "-c", script, "sh", os.path.join(REPO, "scripts", "lib", "vmm.sh"), str(tmp_path / "out"),
                        TRIPLE, "ok"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, KVM_TRACING=str(tmp_path), TESTBED_MODE=mode, scratch=str(tmp_path)))
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout


def test_a_triple_fault_at_the_address_just_entered_runs_once_more(tmp_path):
    out = lost_fetch_runs(tmp_path, LOST_FETCH_TRACE)
    assert out.endswith("runs=2 rc=0\n"), out
    lines = out.splitlines()
    assert lines[0] == ("testbed: guest faulted at the address it was entered at, below swiftlet, during fio-x; "
                        "booting it once more:"), out
    assert lines[1] == "  " + TRIPLE
    assert lines[2].endswith("kvm_entry: vcpu 1, rip 0xffffffffc02143a5") and "reason shutdown" in lines[3], out
    assert lines[4] == "--- last KVM events of vcpu1-4257, which shut down (fio-x, L1 tracefs):", out
    # an interrupt being delivered at the entered rip (a vsock check's triple fault,
    # intr_info 0x80000024) is the same loss
    irq = LOST_FETCH_TRACE.replace("intr_info 0x80000b0e error_code 0x00000010", "intr_info 0x80000024 error_code 0x00000000")
    assert lost_fetch_runs(tmp_path, irq).endswith("runs=2 rc=0\n")
    # not when the vCPU ran after its entry (the fault at another address), when no
    # event was being delivered, or outside the testbed's L1
    moved = LOST_FETCH_TRACE.replace("reason shutdown rip 0xffffffffc02143a5", "reason shutdown rip 0xffffffffc02143b0")
    other = LOST_FETCH_TRACE.replace("intr_info 0x80000b0e", "intr_info 0x00000000")
    user = LOST_FETCH_TRACE.replace("0xffffffffc02143a5", "0x55e460c39da0")
    for trace, mode in ((moved, "l1"), (other, "l1"), (user, "l1"), (LOST_FETCH_TRACE, "direct"), ("", "l1")):
        out = lost_fetch_runs(tmp_path, trace, mode)
        assert out == "runs=1 rc=4\n", (trace[-300:], mode, out)


# A QEMU microvm guest hung in the testbed (net2 with L1 6.12): vCPU 1's page-table walk
# reads 0x100c84fe0, above 4 GiB in a 512 MiB guest, and KVM injects #PF(0x10) again and
# again; no triple fault and no stop line.
LOST_WALK_TRACE = """# tracer: nop
 qemu-system-x86-1276    [000] .....   319.306200: kvm_inj_exception: #PF (0x10)
 qemu-system-x86-1276    [000] d..1.   319.306210: kvm_entry: vcpu 1, rip 0xffffffffc03855c0[immediate exit]
 qemu-system-x86-1276    [000] d..1.   319.306248: kvm_exit: vcpu 1 reason npf rip 0xffffffffc03855c0 info1 0x000000020000000e info2 0x0000000100c84fe0 intr_info 0x80000b0e error_code 0x00000010
 qemu-system-x86-1275    [001] .....   319.309000: kvm_inj_virq: IRQ 0xec
 qemu-system-x86-1275    [001] d..1.   319.309095: kvm_entry: vcpu 0, rip 0xffffffffad817a0b
 qemu-system-x86-1275    [001] d..1.   319.309398: kvm_exit: vcpu 0 reason msr rip 0xfffffffface73914 info1 0x0000000000000001 info2 0x0000000000000000 intr_info 0x000000ec error_code 0x00000000
"""


def lost_evidence(tmp_path, trace, mode="l1"):
    (tmp_path / "trace").write_text(trace)
    r = subprocess.run(["sh", "-c", '. "$1"; kvm_trace_lost_paging', "sh", os.path.join(REPO, "scripts", "lib", "vmm.sh")],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, KVM_TRACING=str(tmp_path), TESTBED_MODE=mode))
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout


def test_lost_paging_evidence_in_l1s_trace(tmp_path):
    out = lost_evidence(tmp_path, LOST_WALK_TRACE).splitlines()
    assert len(out) == 1 and "reason npf" in out[0] and "info2 0x0000000100c84fe0" in out[0], out
    out = lost_evidence(tmp_path, LOST_FETCH_TRACE).splitlines()
    assert len(out) == 2 and out[0].endswith("kvm_entry: vcpu 1, rip 0xffffffffc02143a5") and "shutdown" in out[1], out
    # an MMIO exit's walk-less npf, a walk below 4 GiB, a final-translation npf above it
    # (bit 32 only), and the healthy part of a trace: no evidence
    for trace in (LOST_WALK_TRACE.replace("info1 0x000000020000000e info2 0x0000000100c84fe0",
                                          "info1 0x000000010000000e info2 0x00000000d0002050"),
                  LOST_WALK_TRACE.replace("info2 0x0000000100c84fe0", "info2 0x000000001fc84fe0"),
                  LOST_WALK_TRACE.replace("info1 0x000000020000000e", "info1 0x000000010000000e"),
                  "\n".join(LOST_WALK_TRACE.splitlines()[4:]) + "\n"):
        assert lost_evidence(tmp_path, trace) == "", trace
    assert lost_evidence(tmp_path, LOST_WALK_TRACE, mode="direct") == ""


# scripts/lib/vmm.sh's vmm_with_marks past its limit, with a stand-in VMM that never ends
# by itself: swiftlet gets SIGTERM (and says where it stopped), any other VMM SIGKILL.
def test_a_vmm_past_its_limit_swiftlet_is_stopped_by_sigterm_others_killed(tmp_path):
    stub = ('trap \'echo "swiftlet: stopped by signal 15 after 1000 ms (vCPU 0 at rip 0x1)"; exit 143\' TERM; '
            'echo started; while :; do sleep 0.05; done')
    script = ('. "$1"; scratch=$2 log=$2/log; vmm_with_marks mark tag "$3" 1 1 sh -c "$4" stub; '
              'echo "rc=$rc"; cat "$log"')
    for vmm, rc, line in (("swiftlet", 143, "swiftlet: stopped by signal 15"), ("qemu", 137, None)):
        r = subprocess.run(["sh", "-c", script, "sh", os.path.join(REPO, "scripts", "lib", "vmm.sh"), str(tmp_path),
                            vmm, stub], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r
        assert "rc=%d\n" % rc in r.stdout, (vmm, r.stdout)
        assert "started" in r.stdout and (line is None or line in r.stdout), (vmm, r.stdout)
        assert line is not None or "stopped by signal" not in r.stdout, r.stdout


# scripts/lib/vmm.sh's kvm_trace_tail on a saved trace (KVM_TRACING pointed at a copy):
# the last 16 events of the vCPU thread that shut down, first, even when the other
# vCPU's events fill the last 40, then those 40.
def test_the_flight_recorder_shows_the_vcpu_that_shut_down(tmp_path):
    lines = ["# tracer: nop"]
    lines += [" qemu-system-x86-3037    [000] .....   487.%06d: kvm_exit: vcpu 1 reason msr rip 0x%x" % (i, i)
              for i in range(30)]
    lines += [" qemu-system-x86-3037    [000] .....   487.100000: kvm_userspace_exit: reason KVM_EXIT_SHUTDOWN (8)"]
    lines += [" qemu-system-x86-3036    [001] .....   488.%06d: kvm_exit: vcpu 0 reason npf rip 0x%x" % (i, i)
              for i in range(60)]
    (tmp_path / "trace").write_text("\n".join(lines) + "\n")
    (tmp_path / "tracing_on").write_text("1\n")
    r = subprocess.run(["sh", "-c", '. "$1"; kvm_trace_tail "net2 qemu 17"', "sh",
                        os.path.join(REPO, "scripts", "lib", "vmm.sh")], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, KVM_TRACING=str(tmp_path), TESTBED_MODE="l1", scratch=str(tmp_path)))
    assert r.returncode == 0 and r.stderr == "", r
    out = r.stdout.splitlines()
    assert out[0] == "--- last KVM events of qemu-system-x86-3037, which shut down (net2 qemu 17, L1 tracefs):"
    assert out[16].endswith("KVM_EXIT_SHUTDOWN (8)") and out[1].endswith("rip 0xf"), out[:17]
    assert out[17] == "--- last KVM events of net2 qemu 17 (L1 tracefs):"
    assert len(out) == 58 and all("qemu-system-x86-3036" in l for l in out[18:]) and out[-1].endswith("rip 0x3b"), out[17:]
    assert (tmp_path / "tracing_on").read_text() == "0\n" and not (tmp_path / "kvm-trace.txt").exists()


# scripts/bench net --replay: the summary of a saved run, here two runs of swiftlet, QEMU
# and the 2-pair column (whose jobs are tx2/rx2), no vhost; and hostile saves.
BENCH_NET_SAVE = """bench-net-phase swiftlet-vs-qemu
bench-net-start swiftlet:1
bench-net-exits swiftlet 1 tx 3804
bench-net-exits swiftlet 1 rx 2636
bench-net swiftlet 1 tx 412 1796 248
bench-net swiftlet 1 rx 1095 1301 653
bench-net-status swiftlet 1 0
bench-net-start qemu:1
bench-net qemu 1 tx 454 1645 272
bench-net qemu 1 rx 1027 955 613
bench-net-status qemu 1 0
bench-net-start qemu:2
bench-net qemu 2 tx 584 1854 351
bench-net qemu 2 rx 1022 883 610
bench-net-status qemu 2 0
bench-net-start swiftlet:2
bench-net swiftlet 2 tx 679 2451 406
bench-net swiftlet 2 rx 1263 1529 753
bench-net-status swiftlet 2 0
bench-net-phase swiftlet-2q
bench-net-exits swiftlet-2q 1 tx2 5954
bench-net-exits swiftlet-2q 1 rx2 3709
bench-net swiftlet-2q 1 tx2 317 2797 192
bench-net swiftlet-2q 1 rx2 419 1743 250
bench-net-status swiftlet-2q 1 0
bench-net-exits swiftlet-2q 2 tx2 4000
bench-net swiftlet-2q 2 tx2 173 1776 103
bench-net swiftlet-2q 2 rx2 183 1319 109
bench-net-status swiftlet-2q 2 0
bench-net-done
"""


def bench_replay(tmp_path, text, *args):
    f = tmp_path / "save.log"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return subprocess.run([os.path.join(REPO, "scripts", "bench"), "net", "--runs", "2"] + list(args)
                          + ["--replay", str(f)], capture_output=True, text=True, timeout=120)


def test_bench_net_replay_summarises_a_saved_run_with_the_2_pair_column(tmp_path):
    r = bench_replay(tmp_path, BENCH_NET_SAVE)
    assert r.returncode == 0, r
    out = r.stdout
    assert "net: swiftlet medians (min-max): tx 545.5 (412.0-679.0" in out, out
    assert "net: swiftlet 2-pair exits to userspace per MiB (its own --metrics KVM_RUN count): tx2 " in out, out
    assert "net: swiftlet exits to userspace per MiB (its own --metrics KVM_RUN count): tx 15.3 " in out, out
    assert out.rstrip().splitlines()[-1].startswith("net: swiftlet/qemu-userspace ratio 1.12, "), out


def test_bench_net_replay_prints_interrupts_per_queue(tmp_path):
    # the -kvm mark lines carry the device's per-queue interrupt counts (irq_qN)
    kvm = ("bench-net-exits-kvm swiftlet %d %s exits=9000 to_vmm=1000 irq_inj=2500 isr=%d ack=0 "
           "irq_q0=%d irq_q1=%d irq_q2=0\n")
    text = BENCH_NET_SAVE.replace("bench-net-exits swiftlet 1 rx 2636\n", "bench-net-exits swiftlet 1 rx 2636\n"
                                  + kvm % (1, "rx", 1301, 653, 1306) + kvm % (1, "tx", 1796, 1240, 556))
    text = text.replace("bench-net swiftlet 2 rx 1263 1529 753\n", "bench-net swiftlet 2 rx 1263 1529 753\n"
                        + kvm % (2, "rx", 1529, 753, 1506) + kvm % (2, "tx", 2451, 2030, 421))
    r = bench_replay(tmp_path, text)
    assert r.returncode == 0, r
    line = [l for l in r.stdout.splitlines() if l.startswith("net: swiftlet InterruptStatus/InterruptACK exits")]
    assert len(line) == 1, r.stdout
    # rx: q0 653/653 and 753/753 MiB = 1.0, q1 2.0; tx: q0 1240/248 = 5.0 and 2030/406 = 5.0
    assert "rx reads/MiB 2.0 (2.0-2.0" in line[0] and ", q0 interrupts/MiB 1.0 (1.0-1.0" in line[0], line[0]
    assert ", q1 interrupts/MiB 2.0 (2.0-2.0" in line[0] and ", q2 interrupts/MiB 0.0" in line[0], line[0]
    assert "tx reads/MiB" in line[0] and "q0 interrupts/MiB 5.0 (5.0-5.0" in line[0], line[0]


def test_bench_net_replay_tags_a_run_whose_guest_lost_its_paging(tmp_path):
    # a third swiftlet run that triple-faulted: not counted, and tagged when the inner
    # script printed bench-lost for it (lib/vmm.sh paging_lost_line); a failed QEMU run
    # without that line stays untagged
    text = BENCH_NET_SAVE.replace("bench-net-phase swiftlet-2q\n", (
        "bench-net-start swiftlet:3\n--- console of swiftlet run 3:\n"
        "swiftlet: guest crashed: triple fault on vCPU 0 after 11376 ms\nbench-lost swiftlet 3\n"
        "---\nbench-net-status swiftlet 3 4\nbench-net-start qemu:3\nbench-net-status qemu 3 1\n"
        "bench-net-phase swiftlet-2q\n"))
    r = bench_replay(tmp_path, text)
    assert r.returncode == 0, r
    line = [l for l in r.stdout.splitlines() if l.startswith("net: failed runs")]
    assert line == ["net: failed runs (not counted): swiftlet run 3: status 4, 0 of 2 jobs [paging lost below "
                    "the VMM]; qemu run 3: status 1, 0 of 2 jobs"], r.stdout


def test_paging_lost_line_reads_swiftlets_stop_line():
    # outside the testbed there is no L1 trace: only the console's stop line counts
    def lost(console):
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write(console)
            f.flush()
            return subprocess.run(["sh", "-c", '. "$1"; paging_lost_line swiftlet 3 "$2"', "sh",
                                   os.path.join(REPO, "scripts", "lib", "vmm.sh"), f.name],
                                  capture_output=True, text=True, timeout=60, env=dict(os.environ, TESTBED_MODE=""))
    r = lost("swiftlet: guest hung: vCPU 0 stopped at rip 0xffffffff8106a13b with its page table root "
             "0x10af38000 outside guest RAM\n")
    assert r.returncode == 0 and r.stdout == "bench-lost swiftlet 3\n", r
    r = lost("swiftlet: guest crashed: triple fault on vCPU 0 after 11376 ms\n")
    assert r.returncode == 0 and r.stdout == "", r


def test_bench_net_replay_of_a_hostile_save_fails_in_one_line(tmp_path):
    # no complete run: one FAILED line and status 1, never a traceback
    for text in ("", "bench-net swiftlet 1 tx x y z\nbench-net-status swiftlet 1 0\n",
                 b"\xff\x00bench-net-status qemu 1 0\n" * 50,
                 "bench-net-exits swiftlet 1 tx 99999999999999999999\nbench-net swiftlet 1 tx 0 0 0\n"):
        r = bench_replay(tmp_path, text)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (text, r)
        assert r.stdout.rstrip().splitlines()[-1].startswith("net: FAILED"), (text, r.stdout)
    r = subprocess.run([os.path.join(REPO, "scripts", "bench"), "net", "--replay", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 64 and r.stderr.startswith("bench: usage:"), r


# .ci/run's ThreadSanitizer step: scripts/lib/tsan-verdict on saved `swift test` output.
TSAN_VERDICT = os.path.join(REPO, "scripts", "lib", "tsan-verdict")
XCTEST_TAIL = ("Test Suite 'Selected tests' passed at 2026-12-02 17:35:14.171\n"
               "\t Executed 252 tests, with 0 failures (0 unexpected) in 11.074 (11.074) seconds\n")
# one report as TSan printed it for RateLimitedLog.warn before the lock was annotated
TSAN_REPORT = """==================
WARNING: ThreadSanitizer: Swift access race (pid=8750)
  Modifying access of Swift variable at 0x72180000a858 by thread T189:
    #0 $s6Virtio14RateLimitedLogC4warnyys12StaticStringV_SSyXKtFSSSgSDySSAC4KindVGzYuYTXEfU_6$deferL_yyF /w/Sources/Virtio/Log.swift:64:30 (swiftletPackageTests.xctest+0x563be1)

  Previous modifying access of Swift variable at 0x72180000a858 by thread T190:
    #0 $s6Virtio14RateLimitedLogC4warnyys12StaticStringV_SSyXKtFSSSgSDySSAC4KindVGzYuYTXEfU_6$deferL_yyF /w/Sources/Virtio/Log.swift:64:30 (swiftletPackageTests.xctest+0x563be1)

SUMMARY: ThreadSanitizer: Swift access race /w/Sources/Virtio/Log.swift:64:30 in $s6Virtio14RateLimitedLogC4warnyys12StaticStringV_SSyXKtFSSSgSDySSAC4KindVGzYuYTXEfU_6$deferL_yyF
==================
"""


def tsan_verdict(tmp_path, text, status, binary=False):
    log = tmp_path / "tsan.log"
    log.write_bytes(text if binary else text.encode())
    r = subprocess.run(["sh", TSAN_VERDICT, str(log), str(status)], capture_output=True, text=True, timeout=60)
    assert r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return r.returncode, lines[0]


def test_tsan_a_clean_run_passes_with_its_test_count(tmp_path):
    assert tsan_verdict(tmp_path, "Test Case 'A.b' passed\n" + XCTEST_TAIL, 0) == (0, "tsan: 252 tests, no reports")


def test_tsan_any_report_fails_the_step_even_when_every_test_passed(tmp_path):
    rc, line = tsan_verdict(tmp_path, TSAN_REPORT + XCTEST_TAIL + "ThreadSanitizer: reported 1 warnings\n", 0)
    assert rc == 1
    assert line.startswith("tsan: FAILED 1 report (Swift access race /w/Sources/Virtio/Log.swift:64:30) (log: ")
    # many reports: counted, at most three distinct places named; CRLF output; the
    # runtime's own count wins when the log was cut short
    rc, line = tsan_verdict(tmp_path, (TSAN_REPORT * 5).replace("\n", "\r\n") + XCTEST_TAIL, 66)
    assert rc == 1 and line.startswith("tsan: FAILED 5 reports (Swift access race /w/Sources/Virtio/Log.swift:64:30)")
    rc, line = tsan_verdict(tmp_path, XCTEST_TAIL + "ThreadSanitizer: reported 7 warnings\n", 66)
    assert rc == 1 and line.startswith("tsan: FAILED 7 reports (no summary line)")


def test_tsan_failed_or_missing_tests_fail_the_step(tmp_path):
    rc, line = tsan_verdict(tmp_path, XCTEST_TAIL.replace("0 failures", "2 failures").replace("passed", "failed"), 1)
    assert rc == 1 and line.startswith("tsan: FAILED tests: status 1, 252 tests, 2 failures")
    rc, line = tsan_verdict(tmp_path, XCTEST_TAIL, 137)
    assert rc == 1 and line.startswith("tsan: FAILED tests: status 137")
    # no count at all (a crash before the end), an empty log, a binary one, none
    for text in ("Test Case 'A.b' started\n", "", b"\x00\xff\x00WARNING: Thread\n" * 50):
        rc, line = tsan_verdict(tmp_path, text, 0, binary=isinstance(text, bytes))
        assert rc == 1 and line.startswith("tsan: FAILED tests: status 0, no count of tests"), text
    assert subprocess.run(["sh", TSAN_VERDICT, str(tmp_path / "none.log"), "0"], capture_output=True,
                          text=True).stdout.startswith("tsan: FAILED no test output")
    # a count of 0 tests (a filter that matches nothing) is no pass
    rc, line = tsan_verdict(tmp_path, XCTEST_TAIL.replace("252 tests", "0 tests"), 0)
    assert rc == 1


def test_ci_runs_tsan_on_real_test_targets_into_an_ignored_scratch_path():
    src = open(os.path.join(REPO, ".ci", "run")).read()
    m = re.search(r"^TSAN_TESTS='\^\(([A-Za-z|]+)\)\\\.'$", src, re.M)
    assert m, "TSAN_TESTS line"
    for t in m.group(1).split("|"):
        assert os.path.isdir(os.path.join(REPO, "Tests", t)), t
    assert 'scripts/lib/tsan-verdict "$log" "$trc"' in src
    assert "--sanitize=thread --scratch-path \"$d\"" in src and "d=.build-tsan" in src
    assert "-sanitize=fuzzer,address" in src
    for d in (".build-tsan/x", ".build-fuzz/x"):
        assert subprocess.run(["git", "check-ignore", "-q", d], cwd=REPO).returncode == 0, d


# scripts/bench boot --exits: bench-boot-inner's histogram lines (the format L1's
# hist triggers print, as captured from a testbed run) summed per kind and place
BENCH_EXITS_LINES = """bench-exits swiftlet msr { ecx: 6e0, write:          1 } hitcount:        479
bench-exits swiftlet msr { ecx: 80b, write:          1 } hitcount:         13
bench-exits swiftlet msr { ecx: c0010010, write:          0 } hitcount:          3
bench-exits swiftlet cpuid { function: 80000000 } hitcount:        220
bench-exits swiftlet cpuid { function: 4000f300 } hitcount:          1
bench-exits swiftlet pio { rw:          1, port: 3f8 } hitcount:        208
bench-exits swiftlet pio { rw:          0, port: cfc } hitcount:         85
bench-exits swiftlet mmio { type:          2, gpa: fec00000 } hitcount:        263
bench-exits swiftlet mmio { type:          1, gpa: fec00010 } hitcount:        153
bench-exits qemu msr { ecx: 6e0, write:          1 } hitcount:        659
bench-exits qemu msr { ecx: 6e0, write:          1 } hitcount:          1
bench-exits qemu cpuid { function: 80000000 } hitcount:        226
bench-exits qemu mmio { type:          0, gpa: fec00010 } hitcount:        156
bench-exits qemu mmio { type:          2, gpa: fec00000 } hitcount:        273
bench-exits qemu pio { rw:          1, port: 3f8 } hitcount:        400
bench-exits qemu tlb { gpa: 1 } hitcount: 5
bench-exits qemu msr {} hitcount: x
bench-exits nobody msr { ecx: 6e0, write: 1 } hitcount: 9
"""


def load_bench():
    loader = importlib.machinery.SourceFileLoader("bench", os.path.join(REPO, "scripts", "bench"))
    spec = importlib.util.spec_from_loader("bench", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_bench_boot_exits_by_place_sums_each_vmms_histograms():
    lines = load_bench().exits_by_place(BENCH_EXITS_LINES.splitlines(), top=2)
    assert lines == [
        "boot: msr exits by place, one boot each: swiftlet 495, qemu-microvm 660; write 0x6e0 479 / 660; write 0x80b 13 / 0",
        "boot: cpuid exits by place, one boot each: swiftlet 221, qemu-microvm 226; leaf 0x80000000 220 / 226; "
        "leaf 0x4000f300 1 / 0",
        "boot: pio exits by place, one boot each: swiftlet 293, qemu-microvm 400; out 0x3f8 208 / 400; in 0xcfc 85 / 0",
        "boot: mmio exits by place, one boot each: swiftlet 416, qemu-microvm 429; write 0xfec00000 263 / 273; "
        "unsatisfied read 0xfec00010 0 / 156",
    ], lines
    assert load_bench().exits_by_place(["bench-exits swiftlet msr garbage", ""]) == []


def test_bench_exits_is_a_boot_option():
    for args in (["blk", "--exits"], ["net", "--exits"], ["boot", "--exits", "--exits-too"]):
        r = subprocess.run([os.path.join(REPO, "scripts", "bench")] + args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 64 and r.stderr.startswith("bench: usage:"), (args, r)
