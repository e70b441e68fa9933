// The OS layer on this machine's kernel: real threads, eventfds, epoll, poll.
import XCTest
import Glibc
import CLinux
import Synchronization
@testable import OS

final class ThreadTests: XCTestCase {
    func testSpawnNameAndJoin() throws {
        let name = Locked("")
        let t = try spawnThread(name: "swiftlet-vcpu-123456") {
            var buf = [CChar](repeating: 0, count: 32)
            if let f = fopen("/proc/thread-self/comm", "r") {
                _ = fgets(&buf, 32, f)
                fclose(f)
            }
            let n = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            name.withLock { $0 = n.hasSuffix("\n") ? String(n.dropLast()) : n }
        }
        t.join()
        t.join()
        XCTAssertEqual(name.withLock { $0 }, "swiftlet-vcpu-1", "15-byte kernel limit")
    }

    func testEventFD() throws {
        let e = try EventFD()
        XCTAssertNil(try e.read())
        XCTAssertFalse(e.isReadable)
        try e.write(2); try e.write(3)
        XCTAssertTrue(e.isReadable)
        XCTAssertEqual(try e.read(), 5)
        XCTAssertNil(try e.read())
    }
}

final class OSPrimitiveTests: XCTestCase {
    /// A spawned thread blocks every asynchronous signal, whatever its creator's mask, and
    /// leaves the synchronous ones (and SIGABRT, SIGSYS) deliverable.
    func testSpawnedThreadBlocksAsynchronousSignals() throws {
        var empty = sigset_t()
        sigemptyset(&empty)
        var saved = sigset_t()
        pthread_sigmask(SIG_SETMASK, &empty, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        let mask = Locked<[Int32: Bool]>([:])
        let t = try spawnThread(name: "os-sigmask") {
            var m = sigset_t()
            pthread_sigmask(SIG_BLOCK, nil, &m)
            var seen: [Int32: Bool] = [:]
            for s in [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGSEGV, SIGBUS, SIGABRT, SIGSYS] {
                seen[s] = sigismember(&m, s) == 1
            }
            mask.withLock { $0 = seen }
        }
        t.join()
        let seen = mask.withLock { $0 }
        for s in [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2] { XCTAssertEqual(seen[s], true, "signal \(s) blocked") }
        for s in [SIGSEGV, SIGBUS, SIGABRT, SIGSYS] { XCTAssertEqual(seen[s], false, "signal \(s) deliverable") }
        // The creator's own mask is as it was.
        var now = sigset_t()
        pthread_sigmask(SIG_BLOCK, nil, &now)
        XCTAssertEqual(sigismember(&now, SIGTERM), 0)
    }

    func testSemaphoreEventFDTakesOneAtATime() throws {
        let e = try EventFD(semaphore: true)
        try e.write(3)
        XCTAssertEqual(try e.read(), 1)
        XCTAssertEqual(try e.read(), 1)
        XCTAssertEqual(try e.read(), 1)
        XCTAssertNil(try e.read())
    }

    func testEventFDWriteOverflowIsAnError() throws {
        let e = try EventFD()
        try e.write(UInt64.max - 1)
        XCTAssertThrowsError(try e.write(1)) { error in
            XCTAssertEqual(error as? SystemError, SystemError(call: "eventfd write", errno: EAGAIN))
        }
    }

    /// The epoll set is readable exactly while a member is; removing a member stops that.
    func testEpollSetFollowsItsMembers() throws {
        let ep = try Epoll()
        let a = try EventFD(), b = try EventFD()
        XCTAssertEqual(ep.add(a.fd), 0)
        XCTAssertEqual(ep.add(b.fd), 0)
        XCTAssertEqual(ep.add(a.fd), EEXIST)
        XCTAssertEqual(try ep.wait(timeoutMillis: 0), [])
        var p = pollfd(fd: ep.fd, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 0), 0)
        try b.write(1)
        XCTAssertEqual(try ep.wait(timeoutMillis: 1000), [b.fd])
        XCTAssertEqual(poll(&p, 1, 0), 1)
        XCTAssertEqual(ep.remove(b.fd), 0)
        XCTAssertEqual(ep.remove(b.fd), ENOENT)
        XCTAssertEqual(try ep.wait(timeoutMillis: 0), [])
        p.revents = 0
        XCTAssertEqual(poll(&p, 1, 0), 0, "a removed member no longer wakes the set")
        try a.write(1)
        XCTAssertEqual(try ep.wait(timeoutMillis: 1000), [a.fd])
    }

    func testGateHoldsWaitersUntilOpened() throws {
        let gate = try Gate()
        let passed = Atomic<Int>(0)
        var threads: [OSThread] = []
        for i in 0..<3 {
            threads.append(try spawnThread(name: "os-gate\(i)") {
                gate.wait()
                passed.wrappingAdd(1, ordering: .acquiringAndReleasing)
            })
        }
        usleep(100_000)
        XCTAssertEqual(passed.load(ordering: .acquiring), 0, "closed: nobody passes")
        gate.open()
        for t in threads { t.join() }
        XCTAssertEqual(passed.load(ordering: .acquiring), 3)
        gate.wait()  // open stays open
    }

    /// The poll loop hands over exactly the ready descriptors and ends on stop.
    func testPollLoopReportsReadinessAndStops() throws {
        let stop = try EventFD(), a = try EventFD(), b = try EventFD()
        let rounds = Locked<[[Bool]]>([])
        let t = try spawnThread(name: "os-poll") {
            pollUntilStopped(stop: stop, watch: [a.fd, b.fd], onFailure: { _ in }) { ready in
                rounds.withLock { $0.append((0..<ready.count).map { ready[$0] }) }
                if ready[0] { _ = try? a.read() }
                if ready[1] { _ = try? b.read() }
            }
        }
        try b.write(1)
        var deadline = monotonicNanos() + 2_000_000_000
        while rounds.withLock({ $0.count }) < 1 && monotonicNanos() < deadline { usleep(1000) }
        try a.write(1)
        deadline = monotonicNanos() + 2_000_000_000
        while rounds.withLock({ $0.count }) < 2 && monotonicNanos() < deadline { usleep(1000) }
        try stop.write(1)
        t.join()
        XCTAssertEqual(rounds.withLock { $0 }, [[false, true], [true, false]])
    }

    /// A watched descriptor that went bad (closed: poll reports POLLNVAL) counts as ready,
    /// so its owner hears of it instead of the loop waiting forever.
    func testPollLoopReportsABadDescriptorAsReady() throws {
        let stop = try EventFD()
        let closed = dup(stop.fd)
        close(closed)
        let wakeups = Atomic<Int>(0)
        let t = try spawnThread(name: "os-pollnval") {
            pollUntilStopped(stop: stop, watch: [closed], onFailure: { _ in }) { ready in
                if ready[0] { wakeups.wrappingAdd(1, ordering: .relaxed) }
                try? stop.write(1)  // the owner stops a thread whose descriptor went bad
            }
        }
        t.join()
        XCTAssertEqual(wakeups.load(ordering: .relaxed), 1)
    }

    func testErrnoTextAndSystemError() {
        XCTAssertEqual(errnoText(ENOENT), "No such file or directory")
        XCTAssertEqual("\(SystemError(call: "eventfd", errno: EMFILE))", "eventfd failed: Too many open files")
    }

    func testNulTerminatedBuffers() {
        XCTAssertEqual(String(nulTerminated: [104, 105, 0, 120]), "hi")
        XCTAssertEqual(String(nulTerminated: [104, 105]), "hi", "no NUL: all of it")
        XCTAssertEqual(String(nulTerminated: [0, 104]), "")
        XCTAssertEqual(String(nulTerminated: [-1, 65]), "\u{FFFD}A", "invalid UTF-8 replaced")
    }

    func testWriteStderrWritesTheWholeTextToDescriptor2() {
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        let saved = dup(2)
        dup2(p[1], 2)
        let text = String(repeating: "swiftlet: line\n", count: 1000)
        writeStderr(text)
        dup2(saved, 2)
        close(saved)
        close(p[1])
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(p[0], &buf, buf.count)
            if n <= 0 { break }
            got += buf[0..<n]
        }
        close(p[0])
        XCTAssertEqual(String(decoding: got, as: UTF8.self), text)
    }

    func testMonotonicClockMovesForward() {
        let a = monotonicNanos()
        usleep(2000)
        let b = monotonicNanos()
        XCTAssertGreaterThanOrEqual(b - a, 2_000_000)
        XCTAssertLessThan(b - a, 2_000_000_000)
    }
}

/// io_uring through its raw system calls: batches of writev on a real pipe, the
/// restriction to the operations named, a full ring.
final class IOURingTests: XCTestCase {
    func ring(_ entries: UInt32, _ ops: [UInt8]) throws -> IOURing {
        do { return try IOURing(entries: entries, operations: ops) } catch {
            throw XCTSkip("this kernel refuses io_uring (\(error)): swiftlet uses plain system calls here")
        }
    }

    func testBatchOfWritesIsOneEnterInOrder() throws {
        let r = try ring(8, [clinux_IORING_OP_WRITEV()])
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        for f in p { _ = fcntl(f, F_SETFL, O_NONBLOCK) }
        defer { close(p[0]); close(p[1]) }
        let chunks: [[UInt8]] = (0..<5).map { k in [UInt8](repeating: UInt8(65 + k), count: 10 + k) }
        let bufs = chunks.map { c -> UnsafeMutableRawPointer in
            let b = UnsafeMutableRawPointer.allocate(byteCount: c.count, alignment: 1)
            c.withUnsafeBytes { b.copyMemory(from: $0.baseAddress!, byteCount: c.count) }
            return b
        }
        let iovs = UnsafeMutablePointer<iovec>.allocate(capacity: bufs.count)
        defer { iovs.deallocate(); for b in bufs { b.deallocate() } }
        for (k, b) in bufs.enumerated() {
            iovs[k] = iovec(iov_base: b, iov_len: chunks[k].count)
            XCTAssertTrue(r.prepareVectored(op: clinux_IORING_OP_WRITEV(), fd: p[1], iovecs: iovs + k, count: 1, userData: UInt64(100 + k)))
        }
        let before = IOURing.enterCalls.load(ordering: .relaxed)
        try r.submitAndWait()
        XCTAssertEqual(IOURing.enterCalls.load(ordering: .relaxed) - before, 1)
        var results: [UInt64: Int32] = [:]
        XCTAssertEqual(r.reap { results[$0] = $1 }, 5)
        XCTAssertEqual(results, Dictionary(uniqueKeysWithValues: (0..<5).map { (UInt64(100 + $0), Int32(10 + $0)) }))
        XCTAssertEqual(r.inFlight, 0)
        var got = [UInt8](repeating: 0, count: 100)
        let n = read(p[0], &got, 100)
        XCTAssertEqual(Array(got[0..<max(0, n)]), chunks.flatMap { $0 })
    }

    func testOperationsOutsideTheRestrictionFail() throws {
        let r = try ring(4, [clinux_IORING_OP_WRITEV()])
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        for f in p { _ = fcntl(f, F_SETFL, O_NONBLOCK) }
        defer { close(p[0]); close(p[1]) }
        XCTAssertEqual(write(p[1], "secret", 6), 6)
        var buf = [UInt8](repeating: 0, count: 16)
        try buf.withUnsafeMutableBytes { b in
            var v = iovec(iov_base: b.baseAddress, iov_len: 16)
            r.prepareVectored(op: clinux_IORING_OP_READV(), fd: p[0], iovecs: &v, count: 1, userData: 7)
            try r.submitAndWait()
        }
        var res: Int32 = 0
        XCTAssertEqual(r.reap { _, v in res = v }, 1)
        XCTAssertEqual(res, -EACCES)
        XCTAssertEqual(buf, [UInt8](repeating: 0, count: 16))
        XCTAssertEqual(read(p[0], &buf, 16), 6, "the data is still in the pipe")
    }

    func testWriteThatWouldWaitFailsWithEAGAINAtOnce() throws {
        let r = try ring(4, [clinux_IORING_OP_WRITEV()])
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        for f in p { _ = fcntl(f, F_SETFL, O_NONBLOCK) }
        defer { close(p[0]); close(p[1]) }
        let big = [UInt8](repeating: 1, count: 1 << 16)
        while big.withUnsafeBytes({ write(p[1], $0.baseAddress, $0.count) }) > 0 {}  // the pipe is full
        var res: Int32 = 0
        try big.withUnsafeBytes { b in
            var v = iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress), iov_len: b.count)
            r.prepareVectored(op: clinux_IORING_OP_WRITEV(), fd: p[1], iovecs: &v, count: 1, userData: 1)
            try r.submitAndWait()   // returns: RWF_NOWAIT, no wait for room in the pipe
        }
        XCTAssertEqual(r.reap { _, v in res = v }, 1)
        XCTAssertEqual(res, -EAGAIN)
    }

    func testFullRingRefusesMoreEntries() throws {
        let r = try ring(2, [clinux_IORING_OP_WRITEV()])
        var v = iovec(iov_base: nil, iov_len: 0)
        var accepted = 0
        while r.prepareVectored(op: clinux_IORING_OP_WRITEV(), fd: -1, iovecs: &v, count: 0, userData: 0) { accepted += 1 }
        XCTAssertEqual(accepted, r.capacity)
        try r.submitAndWait()
        XCTAssertEqual(r.reap { _, res in XCTAssertEqual(res, -EBADF) }, r.capacity)
        XCTAssertEqual(r.room, r.capacity)
    }
}
