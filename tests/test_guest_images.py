"""guest-images/: kernel pinning and fallback, module resolution, cache,
initramfs and ext4 image contents."""
import os
import re
import shutil
import subprocess

from conftest import GI, REPO, run


def config_value(name):
    with open(os.path.join(GI, "config")) as f:
        for line in f:
            m = re.match(r"^%s=(.*)$" % name, line.strip())
            if m:
                return m.group(1).strip('"')
    raise AssertionError("%s not in guest-images/config" % name)


def test_pinned_kernel_is_used_when_available(images):
    r = run([os.path.join(GI, "build"), "--resolve-kernel"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "linux-image-%s-unsigned" % config_value("KERNEL_VERSION")
    with open(os.path.join(images, "kernel-version")) as f:
        assert f.read().strip() == config_value("KERNEL_VERSION")


def test_unavailable_kernel_falls_back_with_clear_message(tmp_path):
    r = run([os.path.join(GI, "build"), "--resolve-kernel"],
            env={"GUEST_KERNEL_VERSION": "0.0.0-0-cloud-amd64", "GUEST_IMAGES_OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "linux-image-0.0.0-0-cloud-amd64-unsigned is not available" in r.stderr
    assert "falling back to the newest available one" in r.stderr
    chosen = r.stdout.strip()
    assert re.fullmatch(r"linux-image-[0-9].*-cloud-amd64-unsigned", chosen), chosen
    assert "0.0.0-0" not in chosen


def write_fake_moddir(d):
    (d / "kernel").mkdir(parents=True)
    (d / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c-x.ko\n"
        "kernel/b.ko: kernel/c-x.ko\n"
        "kernel/c-x.ko:\n"
        "kernel/d.ko:\n")
    (d / "modules.builtin").write_text("kernel/builtin_one.ko\n")


def test_modules_closure_orders_dependencies_first(tmp_path):
    write_fake_moddir(tmp_path)
    r = run([os.path.join(GI, "modules-closure"), str(tmp_path), "a", "d", "c_x", "builtin-one"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["kernel/c-x.ko", "kernel/b.ko", "kernel/a.ko", "kernel/d.ko"]


def test_modules_closure_names_missing_module(tmp_path):
    write_fake_moddir(tmp_path)
    r = run([os.path.join(GI, "modules-closure"), str(tmp_path), "a", "no_such_mod"])
    assert r.returncode == 1
    assert "module 'no_such_mod' not found in %s/modules.dep" % tmp_path in r.stderr
    assert r.stdout == ""


def copy_builder(tmp_path, images):
    """A private copy of guest-images/ (inputs only) with the kernel .deb
    pre-seeded in its cache, so it builds without touching the real out/."""
    gi = tmp_path / "gi"
    gi.mkdir()
    for f in ("build", "config", "init", "lib.sh", "modules-closure"):
        shutil.copy2(os.path.join(GI, f), gi / f)
    cache = gi / "out" / "cache"
    cache.mkdir(parents=True)
    for deb in os.listdir(os.path.join(images, "cache")):
        if deb.endswith(".deb"):
            os.link(os.path.join(images, "cache", deb), cache / deb)
    return gi


def test_build_with_missing_module_fails_naming_it(tmp_path, images):
    gi = copy_builder(tmp_path, images)
    r = run([str(gi / "build")], env={"GUEST_EXTRA_MODULES": "no_such_mod"})
    assert r.returncode != 0
    assert "module 'no_such_mod' not found in" in r.stderr
    assert not (gi / "out" / ".stamp").exists()
    assert not (gi / "out" / "initramfs.cpio.gz").exists()


def test_build_is_cached_and_rebuilds_when_an_input_changes(tmp_path, images):
    gi = copy_builder(tmp_path, images)
    out = gi / "out"
    r = run([str(gi / "build")])
    assert r.returncode == 0, r.stderr
    assert "built in" in r.stderr
    names = ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4")
    before = {n: os.stat(out / n).st_mtime_ns for n in names}
    r = run([str(gi / "build")])
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stderr and "built in" not in r.stderr
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == before
    with open(gi / "init", "a") as f:
        f.write("# changed\n")
    r = run([str(gi / "build")])
    assert r.returncode == 0, r.stderr
    assert "built in" in r.stderr
    assert os.stat(out / "initramfs.cpio.gz").st_mtime_ns != before["initramfs.cpio.gz"]


def cpio_list(path):
    data = subprocess.run(["gzip", "-dc", path], check=True, stdout=subprocess.PIPE).stdout
    r = subprocess.run(["cpio", "-t", "--quiet"], input=data, stdout=subprocess.PIPE, check=True)
    return data, [l[2:] if l.startswith("./") else l for l in r.stdout.decode().split("\n") if l]


def cpio_file(data, name, tmp_path):
    subprocess.run(["cpio", "-id", "--quiet", name], input=data, cwd=tmp_path, check=True)
    return (tmp_path / name).read_text()


def test_initramfs_has_init_and_modules_in_dependency_order(images, tmp_path):
    data, names = cpio_list(os.path.join(images, "initramfs.cpio.gz"))
    assert "init" in names and "bin/busybox" in names
    order = cpio_file(data, "etc/swiftlet-modules", tmp_path).split()
    for m in order:
        assert "lib/modules/" + m in names, m
    loaded = [os.path.basename(m)[:-3].replace("-", "_") for m in order]
    for want in config_value("GUEST_MODULES").split():
        assert want in loaded, want
    # every module's modules.dep dependencies come before it
    kver = open(os.path.join(images, "kernel-version")).read().strip()
    deps = {}
    with open(os.path.join(images, "kernel", "lib", "modules", kver, "modules.dep")) as f:
        for line in f:
            k, v = line.split(":", 1)
            deps[k] = v.split()
    for i, m in enumerate(order):
        for d in deps[m]:
            assert d in order[:i], "%s needs %s first" % (m, d)
    init = cpio_file(data, "init", tmp_path)
    assert "devmem 0xd0000000 8 123" in init
    # the guest exit register gets the command's status, after the console drained
    assert init.index('say "exit status $rc"') < init.rindex('stty "$(stty -g)"') \
        < init.index('devmem 0xd0000004 32 "$rc"') < init.index("poweroff -f")


def debugfs_ls(img, d):
    r = subprocess.run(["debugfs", "-R", "ls -p %s" % d, img], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    names = set()
    for line in r.stdout.splitlines():
        parts = line.strip("/").split("/")
        if len(parts) >= 5 and parts[4]:
            names.add(parts[4])
    return names


def ldd_closure(binary):
    r = subprocess.run(["ldd", binary], stdout=subprocess.PIPE, text=True, check=True)
    libs = []
    for line in r.stdout.splitlines():
        p = line.split()
        if len(p) >= 3 and p[1] == "=>" and p[2].startswith("/"):
            libs.append(p[2])
        elif p and p[0].startswith("/"):
            libs.append(p[0])
    return libs


def test_rootfs_has_tools_and_their_libraries(images):
    img = os.path.join(images, "rootfs.ext4")
    r = subprocess.run(["dumpe2fs", "-h", img], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "ext4" in r.stdout or "extent" in r.stdout
    cache = {}

    def exists(path):
        d, n = os.path.split(path)
        if d not in cache:
            cache[d] = debugfs_ls(img, d)
        return n in cache[d]

    assert exists("/init") and exists("/bin/busybox") and exists("/bin/sh")
    for b in ("/usr/bin/iperf3", "/usr/bin/fio", "/usr/sbin/ethtool", "/usr/sbin/ip", "/usr/bin/socat"):
        assert exists(b), b
        libs = ldd_closure(b)
        assert libs, b
        for lib in libs:
            assert exists(lib), "%s needs %s" % (b, lib)
