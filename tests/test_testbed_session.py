"""scripts/lib/testbed_session.py: resuming a list of items after L1 failures, driven by
a stand-in for scripts/testbed that replays scripted runs (no KVM needed)."""
import io
import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
import testbed_session  # noqa: E402

FAKE = """#!/bin/sh
n=$(cat "{state}"); echo $((n + 1)) > "{state}"
while [ "$1" != "--" ]; do shift; done; shift
echo "argv $*"
case $n in
{cases}
esac
"""


def session(tmp_path, runs, **kw):
    """A Session over items a b c whose testbed runs are the shell snippets in `runs`."""
    state = tmp_path / "n"
    state.write_text("0")
    fake = tmp_path / "testbed"
    cases = "\n".join("%d) %s;;" % (i, r) for i, r in enumerate(runs)) + "\n*) echo 'too many runs'; exit 99;;"
    fake.write_text(FAKE.format(state=state, cases=cases))
    fake.chmod(0o755)
    old = testbed_session.TESTBED
    testbed_session.TESTBED = str(fake)
    try:
        s = testbed_session.Session(["a", "b", "c"], lambda todo: ["inner"] + todo, r"^running (.*)$",
                                    r"^check (\S+) ", out=io.StringIO(), **kw)
        rc = s.run()
    finally:
        testbed_session.TESTBED = old
    return s, rc, int(state.read_text())


def test_all_done_in_one_run(tmp_path):
    s, rc, runs = session(tmp_path, ["echo 'running a b c'; echo 'check a ok'; echo 'check b ok'; echo 'check c ok'"])
    assert (rc, runs, s.done, s.l1_failures) == (0, 1, ["a", "b", "c"], [])


def test_l1_crash_resumes_with_the_items_left_and_names_the_one_it_died_in(tmp_path):
    s, rc, runs = session(tmp_path, ["echo 'running a b'; echo 'check a ok'; exit 121",
                                     "echo 'running c'; echo 'check c ok'"])
    assert rc == 0 and runs == 2
    assert s.l1_failures == [("b", "crash", 1)]
    assert s.done == ["a", "c"], "b is not run again without retry_item"
    assert "argv inner c" in s.output()


def test_retry_item_runs_it_once_more_but_not_twice(tmp_path):
    s, rc, runs = session(tmp_path, ["echo 'running a b'; echo 'check a ok'; exit 121",
                                     "echo 'running b'; exit 124",
                                     "echo 'running c'; echo 'check c ok'"], retry_item=True)
    assert rc == 0 and runs == 3
    assert s.l1_failures == [("b", "crash", 1), ("b", "wedge", 2)]
    assert s.done == ["a", "c"] and s.todo() == []


def test_the_limit_of_l1_failures_ends_it(tmp_path):
    s, rc, runs = session(tmp_path, ["echo 'running a'; exit 121", "echo 'running b'; exit 121"], max_l1_failures=2)
    assert rc == 121 and runs == 2
    assert s.todo() == ["c"]


def test_other_statuses_end_it_at_once(tmp_path):
    s, rc, runs = session(tmp_path, ["echo 'running a'; echo 'check a ok'; exit 1"])
    assert rc == 1 and runs == 1 and s.l1_failures == []


def test_hostile_lines_do_not_confuse_it(tmp_path):
    # a result for an unknown item, a duplicate, an empty running line, a partial marker
    s, rc, runs = session(tmp_path, ["echo 'running'; echo 'check zz ok'; echo 'check a ok'; echo 'check a ok';"
                                     " printf 'check b'; exit 121",
                                     "echo 'check b ok'; echo 'check c ok'"])
    assert rc == 0 and runs == 2
    assert s.l1_failures == [(None, "crash", 1)]
    assert "a" in s.done and "c" in s.done


# measured_swiftlet: what bench and stress ship to the testbed.

def fake_swiftlet(path, version="swiftlet 9.9 (commit abc)"):
    path.write_text("#!/bin/sh\necho '%s'\n" % version)
    path.chmod(0o755)
    return str(path)


def measured(tmp_path, monkeypatch, capsys, build=None, bin_env=None):
    """measured_swiftlet('t') with REPO's scripts/build-swiftlet replaced by `build` (a
    shell body) and SWIFTLET_BIN set to `bin_env` (or unset): (path or exit status, stdout)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    if build is not None:
        b = repo / "scripts" / "build-swiftlet"
        b.write_text("#!/bin/sh\n" + build + "\n")
        b.chmod(0o755)
    monkeypatch.setattr(testbed_session, "REPO", str(repo))
    if bin_env is None:
        monkeypatch.delenv("SWIFTLET_BIN", raising=False)
    else:
        monkeypatch.setenv("SWIFTLET_BIN", bin_env)
    try:
        r = testbed_session.measured_swiftlet("t")
    except SystemExit as e:
        r = e.code
    return r, capsys.readouterr().out


def test_measured_swiftlet_builds_this_tree_and_names_the_binary(tmp_path, monkeypatch, capsys):
    b = fake_swiftlet(tmp_path / "swiftlet")
    calls = tmp_path / "calls"
    r, out = measured(tmp_path, monkeypatch, capsys, build="echo built >> %s; echo noise; echo %s" % (calls, b))
    assert r == b
    assert calls.read_text() == "built\n"
    assert os.environ["SWIFTLET_BIN"] == b
    assert out == "t: measuring swiftlet 9.9 (commit abc) (%s)\n" % b


def test_measured_swiftlet_takes_swiftlet_bin_without_building(tmp_path, monkeypatch, capsys):
    b = fake_swiftlet(tmp_path / "other")
    r, out = measured(tmp_path, monkeypatch, capsys, build="exit 7", bin_env=b)
    assert r == b and "measuring swiftlet 9.9" in out


def test_measured_swiftlet_failures_are_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    r, out = measured(tmp_path, monkeypatch, capsys, build="echo 'error: broken' >&2; exit 3")
    assert r == 1 and out == "t: FAILED scripts/build-swiftlet (status 3)\n"
    r, out = measured(tmp_path, monkeypatch, capsys, bin_env=str(tmp_path / "missing"))
    assert r == 1 and out == "t: FAILED no swiftlet binary at %s\n" % (tmp_path / "missing")
