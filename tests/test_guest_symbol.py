"""scripts/guest-symbol: names guest kernel addresses from the kernel's own kallsyms."""
import os
import re
import subprocess

from conftest import REPO, run

TOOL = os.path.join(REPO, "scripts", "guest-symbol")


def cached_functions(tmp_home):
    d = os.path.join(tmp_home, "swiftlet")
    (name,) = [f for f in os.listdir(d) if f.startswith("kallsyms-")]
    with open(os.path.join(d, name)) as f:
        return {p[2]: int(p[0], 16) for p in (l.split() for l in f) if len(p) == 3 and p[1] in "Tt"}


def test_names_functions_of_the_default_kernel_with_and_without_slide(images, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    # the first run recovers the table and caches it; take two functions from it
    r = run([TOOL, "0x0"], env=env)
    assert r.returncode == 1 and r.stdout == "0x0 ?\n", r.stdout + r.stderr
    f = cached_functions(str(tmp_path))
    start, emerg = f["start_kernel"], f["native_machine_emergency_restart"]
    r = run([TOOL, hex(start + 0x10), "%x" % (emerg + 0xb9)], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0x%x start_kernel+0x10" % (start + 0x10),
                                     "0x%x native_machine_emergency_restart+0xb9" % (emerg + 0xb9)]
    # an address of a guest that relocated itself by 0x38600000 (KASLR)
    r = run([TOOL, "--slide", "0x38600000", hex(start + 0x38600000 + 4)], env=env)
    assert r.returncode == 0 and r.stdout.split()[1] == "start_kernel+0x4", r.stdout + r.stderr


def test_hostile_input_is_one_line_and_its_status(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    junk = tmp_path / "junk"
    junk.write_bytes(b"HdrS" * 200)
    hdr = bytearray(0x300)
    hdr[0x202:0x206] = b"HdrS"
    hdr[0x1F1] = 1
    hdr[0x248:0x250] = (0x10).to_bytes(4, "little") + (0xffffff).to_bytes(4, "little")
    fake = tmp_path / "fake-bzimage"
    fake.write_bytes(bytes(hdr) + b"\x00" * 64)
    for argv, status in (([], 64), (["zz"], 64), (["--slide", "q", "0x1"], 64), (["0x1" + "0" * 17], 64),
                         (["--kernel", str(tmp_path / "none"), "0x1"], 64),
                         (["--kernel", str(junk), "0x1"], 69), (["--kernel", str(fake), "0x1"], 69)):
        r = run([TOOL] + argv, env=env)
        assert r.returncode == status, (argv, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("guest-symbol: "), (argv, r.stderr)
