"""scripts/package: the Debian package is built, installed in a scratch root with
dpkg -x, and what it installs works: swiftlet --version names the commit, --help runs,
the completions and the man page are there and usable. swiftlet --version outside git."""
import gzip
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, run

FILES = [
    "usr/bin/swiftlet",
    "usr/share/bash-completion/completions/swiftlet",
    "usr/share/doc/swiftlet/README.md.gz",
    "usr/share/fish/vendor_completions.d/swiftlet.fish",
    "usr/share/man/man1/swiftlet.1.gz",
    "usr/share/zsh/vendor-completions/_swiftlet",
]


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    out = tmp_path_factory.mktemp("deb")
    r = run([os.path.join(REPO, "scripts", "package"), "--out", str(out)], timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.strip().splitlines()[-1]
    assert os.path.dirname(path) == str(out) and os.path.isfile(path), r.stdout
    return path


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    r = run(["dpkg", "-x", deb, str(root)])
    assert r.returncode == 0, r.stderr
    return str(root)


def field(deb, name):
    r = run(["dpkg-deb", "-f", deb, name])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def head_commit():
    r = run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_package_name_and_control_fields(deb):
    version = field(deb, "Version")
    assert re.fullmatch(r"[0-9][0-9A-Za-z.+~-]*", version), version
    assert os.path.basename(deb) == "swiftlet_%s_amd64.deb" % version
    assert field(deb, "Package") == "swiftlet"
    assert field(deb, "Architecture") == "amd64"
    assert field(deb, "Depends") == "", "a static binary needs no other package"
    assert int(field(deb, "Installed-Size")) > 1000


def test_package_contents_owned_by_root(deb):
    r = run(["dpkg-deb", "-c", deb])
    assert r.returncode == 0, r.stderr
    files = {}
    for line in r.stdout.splitlines():
        mode, owner, _size, _day, _time, name = line.split(None, 5)
        assert owner == "root/root", line
        if not mode.startswith("d"):
            files[name[2:]] = mode
    assert sorted(files) == FILES
    assert files["usr/bin/swiftlet"] == "-rwxr-xr-x"
    assert all(m == "-rw-r--r--" for n, m in files.items() if n != "usr/bin/swiftlet")


def test_installed_swiftlet_runs(deb, installed):
    """--version: the package's version and the commit it was built from; --help runs;
    the binary is static (no program interpreter) and stripped."""
    swiftlet = os.path.join(installed, "usr/bin/swiftlet")
    r = run([swiftlet, "--version"])
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"swiftlet (\S+) \(commit ([0-9a-f]{12})(-dirty)?\)\n", r.stdout)
    assert m, r.stdout
    assert m.group(1) == field(deb, "Version")
    assert m.group(2) == head_commit()
    r = run([swiftlet, "--help"])
    assert r.returncode == 0, r.stderr
    assert "--config-file" in r.stdout and "Exit status" in r.stdout
    r = run(["readelf", "-lS", swiftlet])
    if r.returncode == 0:
        assert "INTERP" not in r.stdout and ".symtab" not in r.stdout
    # The installed binary does real work: a configuration from stdin-less pipe, printed.
    r = subprocess.run(["bash", "-c", swiftlet + " --config-file <(echo '{\"boot-source\": "
                        "{\"kernel_image_path\": \"k\"}}') --print-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"kernel_image_path": "k"' in r.stdout, r.stderr


def test_completions(installed):
    share = os.path.join(installed, "usr/share")
    bash = os.path.join(share, "bash-completion/completions/swiftlet")
    zsh = os.path.join(share, "zsh/vendor-completions/_swiftlet")
    fish = os.path.join(share, "fish/vendor_completions.d/swiftlet.fish")
    assert open(zsh).read().startswith("#compdef swiftlet")
    assert "complete -c 'swiftlet'" in open(fish).read()
    for f in (bash, zsh, fish):
        assert "--config-file" in open(f).read() or "config-file" in open(f).read(), f
    # bash: the script loads and completes a flag and a flag's values.
    script = ('source %s; complete -p swiftlet >/dev/null || exit 9; '
              'COMP_LINE="swiftlet --log-level "; COMP_POINT=${#COMP_LINE}; '
              'COMP_WORDS=(swiftlet --log-level ""); COMP_CWORD=2; _swiftlet swiftlet "" --log-level; '
              'echo "${COMPREPLY[*]}"; '
              'COMPREPLY=(); COMP_LINE="swiftlet --config"; COMP_POINT=${#COMP_LINE}; '
              'COMP_WORDS=(swiftlet --config); COMP_CWORD=1; _swiftlet swiftlet --config swiftlet; '
              'echo "${COMPREPLY[*]}"') % bash
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["error warn info debug", "--config-file"], r.stdout
    for shell, f in (("zsh", zsh), ("fish", fish)):
        if shutil.which(shell):
            r = subprocess.run([shell, "-n", f], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (shell, r.stderr)


def test_man_page(installed):
    page = os.path.join(installed, "usr/share/man/man1/swiftlet.1.gz")
    text = gzip.open(page, "rt").read()
    assert ".Dt SWIFTLET 1" in text and ".Sh SYNOPSIS" in text
    for flag in ("config-file", "print-config", "kernel", "disk", "timeout", "version"):
        assert "Fl -%s" % flag in text, flag
    assert "subcommand" not in text, "swiftlet has no subcommands"
    assert "\n\n" not in text, "paragraphs are .Pp, not blank lines"
    assert ".Ex -std" not in text
    if shutil.which("man"):
        env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8")
        r = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr, r.stderr
        assert "--config-file path" in r.stdout and "EXIT STATUS" in r.stdout
        assert "--print-config" in r.stdout


def test_readme_is_the_documentation(installed):
    doc = os.path.join(installed, "usr/share/doc/swiftlet/README.md.gz")
    assert gzip.open(doc, "rt").read() == open(os.path.join(REPO, "README.md")).read()


def test_build_info_names_the_commit_or_unknown(tmp_path):
    """scripts/lib/build-info (what scripts/build-swiftlet compiles in): HEAD in this
    work tree; "unknown" outside git and for a copy inside another repository."""
    tool = os.path.join(REPO, "scripts", "lib", "build-info")
    r = run([tool, REPO])
    assert r.returncode == 0, r.stderr
    assert re.search(r'let buildCommit = "%s(-dirty)?"' % head_commit(), r.stdout), r.stdout
    assert "#if SWIFTLET_BUILD_INFO" in r.stdout
    plain = tmp_path / "tarball"
    plain.mkdir()
    r = run([tool, str(plain)])
    assert r.returncode == 0 and 'let buildCommit = "unknown"' in r.stdout, r.stdout + r.stderr
    other = tmp_path / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "swiftlet").mkdir()
    r = run([tool, str(other / "swiftlet")])
    assert r.returncode == 0 and 'let buildCommit = "unknown"' in r.stdout, r.stdout + r.stderr
