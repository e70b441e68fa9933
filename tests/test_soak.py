"""scripts/soak without a testbed: its usage errors, the reading of soak-inner's lines
(hostile ones included), the flatness judgement and the verdicts; and the whole script
against a stand-in scripts/testbed that replays inner output (L1 failures included)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

SOAK = os.path.join(REPO, "scripts", "soak")
sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
import testbed_session  # noqa: E402


def load():
    ns = {"__file__": SOAK, "__name__": "loaded"}
    exec(compile(open(SOAK).read(), SOAK, "exec"), ns)
    return ns


S = load()


@pytest.mark.parametrize("argv,words", [
    ([], "the first argument is the run"),
    (["boot"], "the first argument is the run"),
    (["--count", "3"], "the first argument is the run"),
    (["boots", "--count"], "--count takes a whole number"),
    (["boots", "--count", "0"], "--count takes a whole number"),
    (["boots", "--count", "-5"], "--count takes a whole number"),
    (["boots", "--count", "1e3"], "--count takes a whole number"),
    (["boots", "--count", "9999999"], "--count takes a whole number"),
    (["boots", "--count", "\u0663"], "--count takes a whole number"),  # an Arabic-Indic digit
    (["boots", "--minutes", "3"], "--minutes is for iperf"),
    (["iperf", "--count", "3"], "iperf takes --minutes M"),
    (["iperf", "--minutes", "61"], "--minutes at most 60"),
    (["kill", "--count", "2", "x"], "unknown argument 'x'"),
    (["reset", "--max-l1-failures", "0"], "--max-l1-failures takes a whole number"),
])
def test_usage_errors_are_one_line_and_status_2(argv, words):
    r = subprocess.run([sys.executable, SOAK] + argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("soak: ") and words in lines[0], r.stderr


def test_help_and_items():
    r = subprocess.run([sys.executable, SOAK, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "boots|iperf|kill|reset" in r.stdout
    assert S["items_for"]("boots", {"count": None, "minutes": None}) == ["boot:%d" % i for i in range(1, 101)]
    assert S["items_for"]("kill", {"count": 2, "minutes": None}) == ["kill:1", "kill:2", "kill:final"]
    assert S["items_for"]("iperf", {"count": None, "minutes": None}) == ["iperf:10"]
    assert S["items_for"]("reset", {"count": 7, "minutes": None}) == ["reset:7"]


def test_samples_keep_one_item_in_time_order_and_ignore_junk():
    text = "\n".join([
        "soak: sample iperf:10 0 threads=5 fds=21 rss_kib=100",
        "soak: sample iperf:1 10 threads=9 fds=9 rss_kib=9",        # another item
        "soak: sample iperf:10 10 threads=5 fds=21 rss_kib=101",
        "soak: sample iperf:10 10 threads=6 fds=21 rss_kib=101",    # time not increasing
        "soak: sample iperf:10 5 threads=5 fds=21 rss_kib=101",     # going back
        "soak: sample iperf:10 20 threads=5 fds=21 rss_kib=-1",     # negative
        "soak: sample iperf:10 20 threads=5 fds=21 rss_kib=1x",     # trailing junk
        "soak: sample iperf:10 20 threads=5 fds=21",                # cut short
        "xsoak: sample iperf:10 20 threads=5 fds=21 rss_kib=5",     # not at the line start
        "soak: sample iperf:10 99999999999 threads=5 fds=21 rss_kib=5",  # absurd time
        "soak: sample iperf:10 30 threads=5 fds=22 rss_kib=102",
    ])
    assert S["samples"](text, "iperf:10") == [(0, 5, 21, 100), (10, 5, 21, 101), (30, 5, 22, 102)]


def series(n=61, threads=5, fds=21, rss=12000, step=10, **changes):
    out = []
    for i in range(n):
        t = i * step
        out.append((t, changes.get("threads_at", {}).get(t, threads), changes.get("fds_at", {}).get(t, fds),
                    rss + changes.get("rss_slope", 0) * i))
    return out


def test_flatness():
    flat = S["flatness"]
    ok, desc = flat(series(), 600)
    assert ok and desc == "threads 5, fds 21, RSS 12000..12000 KiB (+0 KiB) over 58 samples (30..600 s)"
    # warm-up: changes in the first 30 s do not count, later ones do
    assert flat(series(threads_at={0: 3, 10: 4, 20: 4}), 600)[0]
    assert not flat(series(threads_at={300: 6}), 600)[0]
    assert not flat(series(fds_at={590: 22}), 600)[0]
    # RSS: growth below 1024 KiB over the first sample after the warm-up passes
    assert flat(series(rss_slope=17), 600)[0]                # 57 * 17 = 969 KiB
    assert not flat(series(rss_slope=18), 600)[0]            # 1026 KiB
    # a drop is no growth; a spike that comes back still counts
    assert flat(series(rss_slope=-100), 600)[0]
    s = series()
    s[40] = (s[40][0], 5, 21, 12000 + 2048)
    assert not flat(s, 600)[0]
    # too few samples, or samples that stop long before the traffic
    assert flat([], 600) == (False, "0 samples after the 30 s warm-up: too few to judge")
    assert not flat(series(n=4), 600)[0]
    ok, desc = flat(series(n=57), 600)
    assert not ok and desc == "samples end at 560 s of 600 s of traffic"


BOOTS = """soak: start boot:1
soak: result boot:1 ok
soak: start boot:2
soak: result boot:2 failed swiftlet status 4: guest crashed
soak: start boot:3
soak: result boot:3 ok
soak: result boot:3 failed late duplicate
soak: result boot:99 ok
"""


def test_boots_verdicts():
    v = S["verdict"]
    items = ["boot:1", "boot:2", "boot:3"]
    assert v("boots", items, BOOTS, [], 1) == (
        1, "soak: FAILED boots 2 of 3 ok; swiftlet failures 1 (boot:2 failed swiftlet status 4: guest crashed); "
           "testbed failures 0; soak-inner status 1")
    good = BOOTS.replace("boot:2 failed swiftlet status 4: guest crashed", "boot:2 ok")
    assert v("boots", items, good, [], 0) == (0, "soak: boots 3 of 3 ok; swiftlet failures 0; testbed failures 0")
    # a boot lost to L1 is a testbed failure, not swiftlet's, and passes
    lost = good.replace("soak: result boot:2 ok\n", "")
    assert v("boots", items, lost, [("boot:2", "crash", 1)], 0) == (
        0, "soak: boots 2 of 3 ok; swiftlet failures 0; testbed failures 1 (L1 crash during boot:2)")
    # boots that never ran (too many L1 failures, or L1 did not boot) fail the run
    rc, line = v("boots", items, "", [], 120)
    assert rc == 1 and line.endswith("3 boots not run; testbed status 120 (L1 did not boot)")
    two = "soak: result boot:1 ok\nsoak: result boot:2 ok\n"
    rc, line = v("boots", items, two, [("boot:3", "wedge", 1), ("boot:3", "wedge", 2)], 124)
    assert (rc, line) == (0, "soak: boots 2 of 3 ok; swiftlet failures 0; testbed failures 1 "
                             "(L1 wedge during boot:3, L1 wedge during boot:3)")


KILLS = """soak: start kill:1
soak: acked kill:1 0 21
soak: result kill:1 ok acked 22
soak: start kill:2
soak: acked kill:2 2000 2038
soak: result kill:2 ok acked 39
soak: start kill:final
soak: result kill:final ok
soak: file kill:final ok 61
"""


def test_kill_verdicts():
    v = S["verdict"]
    items = ["kill:1", "kill:2", "kill:final"]
    assert v("kill", items, KILLS, [], 0) == (
        0, "soak: kill 2 of 2 ok; swiftlet failures 0; testbed failures 0; 61 acknowledged blocks; "
           "guest read-back and file check of 61 blocks intact")
    # a read-back that failed in the next boot, a bad file, a missing final check
    bad = KILLS.replace("soak: acked kill:2 2000 2038\nsoak: result kill:2 ok acked 39",
                        "soak: result kill:2 failed read-back of boot 1: soak-verify BAD block 7")
    rc, line = v("kill", items, bad, [], 0)
    assert rc == 1 and "swiftlet failures 1 (kill:2 failed read-back of boot 1: soak-verify BAD block 7)" in line
    rc, line = v("kill", items, KILLS.replace("file kill:final ok 61", "file kill:final BAD boot 1: BAD block 3;"), [], 0)
    assert rc == 1 and line.endswith("file check BAD boot 1: BAD block 3;")
    rc, line = v("kill", items, KILLS.replace("soak: file kill:final ok 61\n", ""), [], 0)
    assert rc == 1 and "no file check" in line
    rc, line = v("kill", items, KILLS.replace("soak: result kill:final ok\n", ""), [], 0)
    assert rc == 1 and "no final read-back" in line
    # hostile acked lines do not add blocks
    noisy = KILLS + "soak: acked kill:9 0 99999\nsoak: acked kill:1 x 5\n"
    assert v("kill", items, noisy, [], 0)[1] == v("kill", items, KILLS, [], 0)[1]


def test_iperf_and_reset_verdicts():
    v = S["verdict"]
    text = "".join("soak: sample iperf:1 %d threads=5 fds=21 rss_kib=11980\n" % t for t in range(0, 61, 10))
    rc, line = v("iperf", ["iperf:1"], text + "soak: result iperf:1 ok\n", [], 0)
    assert (rc, line) == (0, "soak: iperf 1 min: iperf3 ok; threads 5, fds 21, RSS 11980..11980 KiB (+0 KiB) "
                             "over 4 samples (30..60 s): flat")
    rc, line = v("iperf", ["iperf:1"], text + "soak: result iperf:1 failed swiftlet status 1\n", [], 0)
    assert rc == 1 and "iperf3 failed swiftlet status 1" in line and line.endswith(": flat")
    rc, line = v("iperf", ["iperf:1"], text.replace("fds=21 rss_kib=11980\n", "fds=22 rss_kib=11980\n", 6)
                 + "soak: result iperf:1 ok\n", [], 0)
    assert rc == 1 and "fds 21/22" in line and line.endswith("not flat")
    assert v("iperf", ["iperf:1"], "", [("iperf:1", "wedge", 1)], 124) == (
        1, "soak: FAILED iperf 1: lost to the testbed (L1 wedge during iperf:1)")
    ok = "soak: reset:3 soak-resets ok=3 of 3\nsoak: result reset:3 ok\n"
    assert v("reset", ["reset:3"], ok, [], 0) == (0, "soak: reset 3: 3 of 3 cycles ok; ok")
    rc, line = v("reset", ["reset:3"], ok.replace("ok=3", "ok=2").replace("reset:3 ok", "reset:3 failed swiftlet status 1"), [], 0)
    assert rc == 1 and line == "soak: FAILED reset 3: 2 of 3 cycles ok; failed swiftlet status 1"
    # a count for the wrong number of cycles, or none, is no pass
    assert v("reset", ["reset:3"], ok.replace("of 3", "of 2").replace("ok=3", "ok=2"), [], 0)[0] == 1
    assert v("reset", ["reset:3"], "soak: result reset:3 ok\n", [], 0) == (
        1, "soak: FAILED reset 3: no cycle count; ok")


FAKE = """#!/bin/sh
n=$(cat "{state}"); echo $((n + 1)) > "{state}"
while [ "$1" != "--" ]; do shift; done; shift
echo "argv $*" >> "{state}.argv"
case $n in
{cases}
esac
"""


def run_soak(tmp_path, argv, runs):
    """scripts/soak's main() against a stand-in testbed replaying `runs` (shell snippets)."""
    state = tmp_path / "n"
    state.write_text("0")
    fake = tmp_path / "testbed"
    fake.write_text(FAKE.format(state=state, cases="\n".join("%d) %s;;" % (i, r) for i, r in enumerate(runs))
                                + "\n*) exit 99;;"))
    fake.chmod(0o755)
    old = testbed_session.TESTBED
    testbed_session.TESTBED = str(fake)
    import io
    import contextlib
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = S["main"](argv)
    finally:
        testbed_session.TESTBED = old
    return rc, out.getvalue().splitlines(), (tmp_path / "n.argv").read_text()


def test_whole_run_resumes_after_an_l1_crash(tmp_path):
    rc, lines, argv = run_soak(tmp_path, ["boots", "--count", "3"], [
        "echo 'soak: start boot:1'; echo 'soak: result boot:1 ok'; echo 'soak: start boot:2'; exit 121",
        "echo 'soak: start boot:3'; echo 'soak: result boot:3 ok'",
    ])
    assert rc == 0
    assert lines[-1] == "soak: boots 2 of 3 ok; swiftlet failures 0; testbed failures 1 (L1 crash during boot:2)"
    runs = argv.splitlines()
    assert len(runs) == 2 and runs[0].endswith(" boots boot:1 boot:2 boot:3") and runs[1].endswith(" boots boot:3")


def test_whole_run_fails_on_a_swiftlet_failure(tmp_path):
    rc, lines, _ = run_soak(tmp_path, ["reset", "--count", "2"], [
        "echo 'soak: start reset:2'; echo 'soak: reset:2 soak-resets ok=1 of 2';"
        " echo 'soak: result reset:2 failed swiftlet status 0: soak-reset FAILED 2'",
    ])
    assert rc == 1 and lines[-1] == ("soak: FAILED reset 2: 1 of 2 cycles ok; "
                                     "failed swiftlet status 0: soak-reset FAILED 2")


@pytest.mark.parametrize("console,start,last", [
    ("soak-acked 28000\r\nsoak-acked 28001\r\nsoak-acked 28002\nsoak-acked 280", 28000, "28002"),  # cut by the kill
    ("soak-acked 0\nsoak-acked 1\nsoak-acked 3\nsoak-acked 2\n", 0, "1"),       # a gap ends the run
    ("soak-acked 5\n", 0, ""),                                                  # no first block
    ("swiftlet-guest: run echo soak-acked 0\nsoak-acked 0 \n", 0, ""),          # the echo; trailing space
    ("soak-acked 0\n\x00\xff soak-acked 1\nsoak-acked 1\n", 0, "1"),
    ("", 0, ""),
])
def test_kill_counts_only_the_unbroken_run_of_acknowledgements(tmp_path, console, start, last):
    f = tmp_path / "console"
    f.write_bytes(console.encode("latin-1"))
    r = subprocess.run(["sh", "-c", '. "$1"; console_run "$2" soak-acked "$3"', "sh",
                        os.path.join(REPO, "scripts", "lib", "console.sh"), str(f), str(start)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip() == last


def test_kill_verdict_ignores_backward_acked_ranges():
    text = KILLS.replace("soak: acked kill:2 2000 2038", "soak: acked kill:2 28000 280")
    assert "22 acknowledged blocks" in S["verdict"]("kill", ["kill:1", "kill:2", "kill:final"], text, [], 0)[1]
