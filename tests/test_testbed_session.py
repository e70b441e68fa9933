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
