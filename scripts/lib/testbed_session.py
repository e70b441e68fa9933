"""Runs a list of work items through scripts/testbed and survives L1 failures.

The ONE place that knows what to do when the testbed's L1 crashes (status 121) or
wedges (status 124) in the middle of a list of boots: the item that was running gets
an "L1 crash"/"L1 wedge" result and a new testbed runs the items that have none yet,
up to a limit of L1 failures. Used by scripts/stress, scripts/bench and the tests.

The inner command announces each item on a line of its own (``start_re``, group 1 is
the item's name, or several names split by spaces for items that one step reports
together) and reports it (``done_re``: group 1 the name, or its groups joined with
":" when it has several). Everything it prints
is streamed to ``out`` (or collected).
"""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTBED = os.path.join(REPO, "scripts", "testbed")
L1_FAILURES = {121: "crash", 124: "wedge"}


def measured_swiftlet(tool):
    """The swiftlet binary a measurement ships: SWIFTLET_BIN, else the release build of
    this tree, brought up to date with scripts/build-swiftlet (incremental: about 1 s
    when nothing changed), so a benchmark never measures a binary older than the
    sources. Exports it as SWIFTLET_BIN for the testbed, prints one line naming it
    (`swiftlet --version`: the commit it was built from) and returns its path; on a
    failed build, one line and exit status 1."""
    b = os.environ.get("SWIFTLET_BIN")
    if not b:
        p = subprocess.run([os.path.join(REPO, "scripts", "build-swiftlet")], capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            print("%s: FAILED scripts/build-swiftlet (status %d)" % (tool, p.returncode))
            sys.exit(1)
        b = p.stdout.strip().splitlines()[-1]
    if not os.access(b, os.X_OK):
        print("%s: FAILED no swiftlet binary at %s" % (tool, b))
        sys.exit(1)
    os.environ["SWIFTLET_BIN"] = os.path.abspath(b)
    v = subprocess.run([b, "--version"], capture_output=True, text=True).stdout.strip()
    print("%s: measuring %s (%s)" % (tool, v or "swiftlet of unknown version", os.path.abspath(b)))
    sys.stdout.flush()
    return os.path.abspath(b)


class Session:
    def __init__(self, items, argv_for, start_re, done_re, max_l1_failures=3,
                 idle_timeout=240, timeout_for=lambda n: 600 + 120 * n, retry_item=False,
                 out=sys.stdout, env=None):
        self.items = list(items)
        self.argv_for = argv_for          # (todo items) -> inner command argv
        self.start_re = re.compile(start_re)
        self.done_re = re.compile(done_re)
        self.max_l1_failures = max_l1_failures
        self.idle_timeout = idle_timeout
        self.timeout_for = timeout_for
        self.retry_item = retry_item      # run an item L1 died in once more (not twice)
        self.out = out
        self.env = env
        self.done = []                    # item names with a result, in order
        self.l1_failures = []             # (item or None, "crash"|"wedge", testbed run)
        self.text = []                    # all lines printed by the inner command
        self.status = None                # last testbed status

    def todo(self):
        died = [i for i, _, _ in self.l1_failures]
        left = []
        for it in self.items:
            if it in self.done:
                continue
            if it in died and (not self.retry_item or died.count(it) >= 2):
                continue
            left.append(it)
        return left

    def run(self):
        """Runs until every item has a result or the L1 failures reach the limit.
        Returns the last testbed status (0 when the last run ended well)."""
        runs = 0
        while True:
            left = self.todo()
            if not left:
                return self.status if self.status not in L1_FAILURES else 0
            runs += 1
            cmd = [TESTBED, "--timeout", str(self.timeout_for(len(left))),
                   "--idle-timeout", str(self.idle_timeout), "--"] + list(self.argv_for(left))
            started = []
            p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=self.env, bufsize=1, universal_newlines=True, errors="replace")
            for line in p.stdout:
                self.text.append(line)
                if self.out is not None:
                    self.out.write(line)
                    self.out.flush()
                m = self.start_re.search(line)
                if m:
                    started = m.group(1).split()
                m = self.done_re.search(line)
                if m:
                    name = ":".join(m.groups())
                    if name not in self.done:
                        self.done.append(name)
            self.status = p.wait()
            current = next((i for i in started if i not in self.done), None)
            if self.status not in L1_FAILURES:
                return self.status
            self.l1_failures.append((current, L1_FAILURES[self.status], runs))
            if len(self.l1_failures) >= self.max_l1_failures:
                return self.status
            if self.out is not None:
                self.out.write("testbed-session: L1 %s during %s (testbed run %d); a new testbed for the %d items left\n"
                               % (L1_FAILURES[self.status], current or "start-up", runs, len(self.todo())))
                self.out.flush()

    def output(self):
        return "".join(self.text)
