"""Shared helpers for the script and testbed tests."""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GI = os.path.join(REPO, "guest-images")


def unshare_refused():
    """Why this host cannot run the benchmark (not root, no netns, no TAP), or None."""
    if os.geteuid() != 0:
        return "not root: unshare(CLONE_NEWNET) and TAP creation need root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        return "unshare(CLONE_NEWNET) refused on this host"
    return None


def run(argv, env=None, timeout=900, **kw):
    """Run argv in the repo; return CompletedProcess with text stdout/stderr."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run(argv, cwd=REPO, env=e, timeout=timeout, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_retrying_l1(argv, what, env=None, timeout=900):
    """run(argv) through the testbed, once more when L1 itself crashed or wedged
    (testbed status 121 or 124: QEMU TCG's emulated SVM under load, whichever VMM runs
    inside; a soft lockup of L1 has been seen in kvm_destroy_vm waiting on an IPI). The
    retry is said in the summary as a warning naming `what`; a second L1 failure is
    returned as it is, for the caller's assertions."""
    r = run(argv, env=env, timeout=timeout)
    if r.returncode in (121, 124):
        lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("testbed:")]
        warnings.warn("%s retried after L1 failure (status %d): %s"
                      % (what, r.returncode, lines[-1] if lines else "no testbed line"))
        r = run(argv, env=env, timeout=timeout)
    return r


@contextlib.contextmanager
def build_lock():
    """Holds .build-tests/lock: scripts/test runs two pytest processes at once, and
    each builds (or finds cached) the images and the release binary through the
    fixtures below; one at a time, the second finds what the first built."""
    d = os.path.join(REPO, ".build-tests")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def images():
    """The default guest images (built once, cached)."""
    with build_lock():
        r = run([os.path.join(GI, "build")])
    assert r.returncode == 0, r.stderr
    return os.path.join(GI, "out")


@pytest.fixture(scope="session")
def testbed_image(images):
    with build_lock():
        r = run([os.path.join(REPO, "scripts", "testbed-image")])
    assert r.returncode == 0, r.stderr
    return os.path.join(images, "testbed", "static.cpio")


@pytest.fixture(scope="session")
def swiftlet_release():
    """swiftlet's release build (what the testbed ships), built if needed."""
    with build_lock():
        r = run([os.path.join(REPO, "scripts", "build-swiftlet")], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]
