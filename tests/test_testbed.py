"""scripts/testbed: status pass-through, streaming, environment, and a
distinct status + one clear line for each way L1 itself can fail.
Each test that boots L1 costs ~5 s under TCG: they are kept few."""
import os
import re
import subprocess
import sys
import time

import pytest


from conftest import REPO, run

TESTBED = os.path.join(REPO, "scripts", "testbed")


def last_line(text):
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def test_l1_streams_output_passes_status_and_sets_paths(testbed_image, tmp_path):
    fake = tmp_path / "fake-swiftlet"
    fake.write_text("#!/bin/sh\necho fake-swiftlet \"$@\"\n")
    fake.chmod(0o755)
    script = ('echo "mode=$TESTBED_MODE images=$TESTBED_IMAGES scripts=$TESTBED_SCRIPTS '
              'scratch=$TESTBED_SCRATCH pwd=$(pwd)"; '
              'ls "$TESTBED_IMAGES"; test -x "$TESTBED_SCRIPTS/smoke-inner" && echo scripts-ok; '
              'test -c /dev/kvm && test -c /dev/net/tun && echo devices-ok; '
              '"$TESTBED_IP" tuntap help 2>&1 | grep -q tap && echo iproute2-ok; '
              'swiftlet --x y; echo to-stderr >&2; '
              'echo first; sleep 4; echo second; seq 1 4000; echo "$(printf "%3000s" | tr " " x)"; exit 7')
    env = dict(os.environ, SWIFTLET_BIN=str(fake))
    p = subprocess.Popen([TESTBED, "--l1", "--timeout", "300", "--", "sh", "-c", script], cwd=REPO,
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen = {}
    lines = []
    for line in p.stdout:
        lines.append(line.rstrip("\n"))
        seen.setdefault(line.strip(), (time.monotonic(), p.poll()))
    rc = p.wait(timeout=300)
    out = "\n".join(lines)
    assert rc == 7, out
    assert ("mode=l1 images=/testbed/images scripts=/testbed/scripts scratch=/testbed/scratch "
            "pwd=/testbed/scratch") in out
    for f in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"):
        assert f in out
    for marker in ("scripts-ok", "devices-ok", "iproute2-ok", "fake-swiftlet --x y", "to-stderr"):
        assert marker in lines, (marker, out)
    # streamed: "first" reached us while the command was still running,
    # well before "second"
    assert seen["first"][1] is None
    assert seen["second"][0] - seen["first"][0] > 2.5, out
    assert "@@" not in out and "\r" not in out
    # the output a command writes just before it exits is not lost with the console's
    # hangup when its session ends: all of seq's 4000 lines, and a last line of 3000
    # bytes written at once (it fits the UART's buffer, so the write returns at once)
    i = lines.index("second")
    assert lines[i + 1:] == [str(n) for n in range(1, 4001)] + ["x" * 3000], out[-600:]


def test_l1_crash_gives_its_own_status_and_line(testbed_image):
    r = run([TESTBED, "--l1", "--timeout", "300", "--", "sh", "-c",
             "echo about-to-crash; sleep 1; echo c > /proc/sysrq-trigger; sleep 60"])
    assert r.returncode == 121, r.stdout + r.stderr
    assert "about-to-crash" in r.stdout
    assert last_line(r.stderr).startswith("testbed: FAILED L1 crashed"), r.stderr


def test_l1_knobs_reach_l1_kernel_and_module_parameters(testbed_image):
    env = dict(os.environ, TESTBED_L1_APPEND="kvm_amd.vgif=0 testbed.knob=1",
               TESTBED_CPU="EPYC,+svm,-vgif", TESTBED_ACCEL="tcg,thread=single")
    r = run([TESTBED, "--l1", "--timeout", "300", "--", "sh", "-c",
             "grep -o testbed.knob=1 /proc/cmdline; echo vgif=$(cat /sys/module/kvm_amd/parameters/vgif); "
             "grep -c -w vgif /proc/cpuinfo"], env=env)
    assert r.returncode == 1, r.stdout + r.stderr  # grep -c counts 0 lines: the CPU has no vgif
    assert "testbed.knob=1" in r.stdout and "vgif=0" in r.stdout, r.stdout + r.stderr


def test_timeout_gives_124_and_line(testbed_image):
    # 40 s: L1 itself must have booted and run the command first, which takes 10-20 s
    # while the other half of the suite loads the host
    t0 = time.monotonic()
    r = run([TESTBED, "--l1", "--timeout", "40", "--", "sh", "-c", "echo started; sleep 300"])
    took = time.monotonic() - t0
    assert r.returncode == 124, r.stdout + r.stderr
    assert "started" in r.stdout
    assert last_line(r.stderr) == "testbed: FAILED timeout after 40 s"
    assert 40 <= took < 70


def test_silent_l1_gives_124_and_line(testbed_image):
    # --idle-timeout: a booted L1 with no console output for that long counts as wedged
    t0 = time.monotonic()
    r = run([TESTBED, "--l1", "--timeout", "300", "--idle-timeout", "8", "--",
             "sh", "-c", "echo started; sleep 5; echo still-here; sleep 300"])
    took = time.monotonic() - t0
    assert r.returncode == 124, r.stdout + r.stderr
    assert "started" in r.stdout and "still-here" in r.stdout
    # the line says how busy QEMU was: an L1 sleeping in `sleep 300` leaves it nearly idle
    m = re.fullmatch(r"testbed: FAILED L1 silent for 8 s \(wedged; QEMU at (\d+)% CPU\)", last_line(r.stderr))
    assert m, r.stderr
    assert int(m.group(1)) < 50, r.stderr
    assert took < 120


def test_l1_that_never_comes_up_gives_boot_failure(testbed_image, tmp_path):
    r = run([TESTBED, "--l1", "--", "true"], env={"TESTBED_KERNEL": str(tmp_path / "no-such-kernel")})
    assert r.returncode == 120, r.stdout + r.stderr
    assert last_line(r.stderr).startswith("testbed: FAILED L1 did not boot"), r.stderr
    # a real kernel that is not given enough time to come up
    r = run([TESTBED, "--l1", "--boot-timeout", "1", "--", "true"])
    assert r.returncode == 120, r.stdout + r.stderr
    assert last_line(r.stderr) == "testbed: FAILED L1 did not boot: no ready marker within 1 s"


def test_qemu_missing_gives_127_and_line(tmp_path):
    r = run([sys.executable, TESTBED, "--l1", "--", "true"], env={"PATH": str(tmp_path)})
    assert r.returncode == 127, r.stdout + r.stderr
    assert last_line(r.stderr).startswith("testbed: FAILED qemu-system-x86_64 not found")


def test_direct_mode_same_environment_status_and_timeout(images):
    r = run([TESTBED, "--direct", "--", "sh", "-c",
             'echo "$TESTBED_MODE $TESTBED_IMAGES $(basename "$TESTBED_SCRIPTS")"; '
             'test -f "$TESTBED_IMAGES/rootfs.ext4" && test -w "$TESTBED_SCRATCH" && '
             'test "$(pwd)" = "$TESTBED_SCRATCH" && echo paths-ok; exit 5'])
    assert r.returncode == 5, r.stdout + r.stderr
    assert "direct %s scripts" % images in r.stdout
    assert "paths-ok" in r.stdout
    r = run([TESTBED, "--direct", "--timeout", "1", "--", "sleep", "30"])
    assert r.returncode == 124
    assert last_line(r.stderr) == "testbed: FAILED timeout after 1 s"


def load_testbed():
    ns = {"__file__": TESTBED, "__name__": "testbed"}
    exec(compile(open(TESTBED).read(), TESTBED, "exec"), ns)
    return ns


def test_auto_mode_detection(tmp_path):
    usable = load_testbed()["kvm_usable_directly"]
    kvm, pvm, cpuinfo = tmp_path / "kvm", tmp_path / "kvm_pvm", tmp_path / "cpuinfo"
    kvm.write_text("")
    args = dict(kvm=str(kvm), pvm=str(pvm), cpuinfo=str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 svm npt\n")
    assert usable(**args) is True
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vmx ept\n")
    assert usable(**args) is True
    pvm.mkdir()
    assert usable(**args) is False           # PVM host: can't run unmodified guests
    pvm.rmdir()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert usable(**args) is False           # no VMX/SVM
    kvm.unlink()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu svm\n")
    assert usable(**args) is False           # no /dev/kvm
    if os.path.exists("/sys/module/kvm_pvm"):
        assert usable() is False             # this machine: auto means L1


@pytest.mark.parametrize("bad", ["../6.12", "6.12;true", "-rf", "6 12"])
def test_testbed_image_rejects_a_bad_l1_kernel_name(bad):
    r = run([os.path.join(REPO, "scripts", "testbed-image")], env={"TESTBED_L1_KERNEL": bad})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("testbed-image:")]
    assert lines == ["testbed-image: ERROR: TESTBED_L1_KERNEL=%s is not a kernel series or version (e.g. 6.12)" % bad], r.stderr
