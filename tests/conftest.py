"""Shared helpers for the script and testbed tests."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GI = os.path.join(REPO, "guest-images")


def run(argv, env=None, timeout=900, **kw):
    """Run argv in the repo; return CompletedProcess with text stdout/stderr."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run(argv, cwd=REPO, env=e, timeout=timeout, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="session")
def images():
    """The default guest images (built once, cached)."""
    r = run([os.path.join(GI, "build")])
    assert r.returncode == 0, r.stderr
    return os.path.join(GI, "out")


@pytest.fixture(scope="session")
def testbed_image(images):
    r = run([os.path.join(REPO, "scripts", "testbed-image")])
    assert r.returncode == 0, r.stderr
    return os.path.join(images, "testbed", "static.cpio")


@pytest.fixture(scope="session")
def swiftlet_release():
    """swiftlet's release build (what the testbed ships), built if needed."""
    r = run([os.path.join(REPO, "scripts", "build-swiftlet")], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]
