"""scripts/test's counting, scripts/deps as the one package list."""
import os
import subprocess

from conftest import REPO, run

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
    (repo / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_ok2(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skip(): pass\n")
    r = subprocess.run(["python3", str(repo / "scripts" / "test"), "--no-swift"], cwd=repo,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "2 passed, 1 failed, 1 skipped"
    (repo / "tests" / "test_x.py").write_text("def test_ok(): pass\n")
    r = subprocess.run(["python3", str(repo / "scripts" / "test"), "--no-swift"], cwd=repo,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"


def test_one_package_list_shared_by_setup_and_ci():
    r = run([os.path.join(REPO, "scripts", "deps")])
    pkgs = r.stdout.split()
    # QEMU and its firmware from bookworm-backports (the testbed's L0), named with the suite
    for p in ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"):
        assert p + "/bookworm-backports" in pkgs
    for p in ("busybox-static", "iperf3", "e2fsprogs", "cpio", "kmod", "fio",
              "ethtool", "iproute2"):
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
