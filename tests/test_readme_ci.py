"""README "Use in CI": the smoke job's shell, run as written. ci-smoke.sh boots a tiny
guest (scripts/lib/tinyguest.py, standing in for the default guest's kernel: it writes
the exit register, or halts) with the real swiftlet on this host's /dev/kvm, under sh and
busybox sh; the testbed loop runs against a stand-in scripts/testbed that runs the
command directly, as --direct does, and crashes L1 once when asked."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

SECTION = "## Use in CI"


def readme_blocks():
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def shells():
    out = ["sh"]
    if shutil.which("busybox"):
        out.append("busybox sh")
    return out


def test_blocks_parse():
    blocks = readme_blocks()
    assert len(blocks) == 3, blocks
    assert blocks[0].startswith("#!/bin/sh\n# ci-smoke.sh:")
    for block in blocks:
        for shell in shells():
            r = subprocess.run(shell.split() + ["-n"], input=block, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (shell, r.stderr, block)


@pytest.fixture
def images(tmp_path):
    """A directory laid out as guest-images/out: the tiny guest as vmlinuz, an initramfs
    (not looked at by the tiny guest) and a 1 MiB rootfs.ext4."""
    d = tmp_path / "images"
    d.mkdir()
    (d / "initramfs.cpio.gz").write_bytes(b"\x1f\x8b" + bytes(510))
    (d / "rootfs.ext4").write_bytes(bytes(1 << 20))
    return d


def tiny(images, *args):
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "lib", "tinyguest.py"),
                    str(images / "vmlinuz"), *args], check=True)


def need_kvm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")


def smoke(shell, script, cwd, env):
    (cwd / "ci-smoke.sh").write_text(script)
    return subprocess.run(shell.split() + ["ci-smoke.sh"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shell", shells())
@pytest.mark.parametrize("guest,smoke_timeout,status,line", [
    (["--exit", "0"], None, 0, "ci-smoke: ok"),
    (["--exit", "3"], None, 3, "ci-smoke: FAILED the command in the guest exited 3"),
    (["--exit", "124"], None, 124, "ci-smoke: FAILED the command in the guest exited 124"),
    (["--halt"], "1s", 124, "ci-smoke: FAILED the guest was still running at the time limit"),
    (None, None, 66, "ci-smoke: FAILED swiftlet did not start the VM: status 66 (its line is above)"),
])
def test_ci_smoke_script(swiftlet_release, images, tmp_path, shell, guest, smoke_timeout, status, line):
    need_kvm()
    if guest:
        tiny(images, *guest)
    env = dict(os.environ, SWIFTLET=swiftlet_release, IMAGES=str(images), SWIFTLET_ALLOW_PVM="1")
    if smoke_timeout:
        env["SMOKE_TIMEOUT"] = smoke_timeout
    work = tmp_path / "job"
    work.mkdir()
    r = smoke(shell, readme_blocks()[0], work, env)
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    out = r.stdout.splitlines()
    if status == 0:
        assert out == [line], r.stdout
    else:
        assert out[0] == line, r.stdout
    if guest and status != 0:
        assert out[-1] == "K", "the console's tail follows a failure"
    if not guest:
        assert r.stderr.startswith("swiftlet: kernel ") and "not found" in r.stderr, r.stderr


def test_ci_smoke_names_a_guest_crash(swiftlet_release, images, tmp_path):
    """A status swiftlet chose while the VM ran is named with --metrics' reason."""
    need_kvm()
    tiny(images, "--halt")
    work = tmp_path / "job"
    work.mkdir()
    env = dict(os.environ, SWIFTLET=swiftlet_release, IMAGES=str(images), SWIFTLET_ALLOW_PVM="1")
    script = readme_blocks()[0]
    (work / "ci-smoke.sh").write_text(script)
    p = subprocess.Popen(["sh", "ci-smoke.sh"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (work / "vm.json").exists() or not any(
            _comm(pid) == "swiftlet" for pid in _children(p.pid)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    for pid in _children(p.pid):
        if _comm(pid) == "swiftlet":
            os.kill(pid, 15)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + 15, (out, err)
    assert "ci-smoke: FAILED swiftlet ended the VM with status 143 (signal)" in out, out


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


STUB_TESTBED = """#!/bin/sh
# Stand-in for scripts/testbed: --timeout S -- CMD..., run directly in a scratch dir with
# the TESTBED_* variables; exits 121 (an L1 crash) as many times as crash-count says.
n=$(cat "$STUB/crashes" 2>/dev/null || echo 0)
echo x >> "$STUB/calls"
if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$STUB/crashes"; echo "testbed: FAILED L1 crashed" >&2; exit 121; fi
[ "$1" = --timeout ] && shift 2
[ "$1" = -- ] && shift
scratch=$(mktemp -d)
cd "$scratch" && TESTBED_MODE=direct TESTBED_SWIFTLET=$STUB_SWIFTLET TESTBED_IMAGES=$STUB_IMAGES \\
    TESTBED_SCRATCH=$scratch exec "$@"
"""


@pytest.mark.parametrize("crashes,calls,status", [(0, 1, 3), (1, 2, 3), (2, 2, 121)])
def test_testbed_loop(swiftlet_release, images, tmp_path, crashes, calls, status):
    need_kvm()
    tiny(images, "--exit", "3")
    blocks = readme_blocks()
    job = tmp_path / "job"
    (job / "scripts").mkdir(parents=True)
    (job / "ci-smoke.sh").write_text(blocks[0])
    for name, body in (("testbed", STUB_TESTBED), ("build-swiftlet", "#!/bin/sh\necho built\n")):
        (job / "scripts" / name).write_text(body)
        os.chmod(job / "scripts" / name, 0o755)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "crashes").write_text("%d\n" % crashes)
    env = dict(os.environ, STUB=str(stub), STUB_SWIFTLET=swiftlet_release, STUB_IMAGES=str(images),
               SWIFTLET_ALLOW_PVM="1")
    env.pop("SWIFTLET", None)
    env.pop("IMAGES", None)
    r = subprocess.run(["sh", "-c", blocks[2]], cwd=job, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert len((stub / "calls").read_text().split()) == calls
    if status == 3:
        assert "ci-smoke: FAILED the command in the guest exited 3" in r.stdout
