import OS
import XCTest
import Glibc
import Synchronization
@testable import Virtio

final class RateLimitedLogTests: XCTestCase {
    final class Lines: Sendable {
        let lock = Locked<[(LogLevel, String)]>([])
        let clock = Atomic<UInt64>(0)
        var all: [(LogLevel, String)] { lock.withLock { $0 } }
        var texts: [String] { all.map(\.1) }
        func advance(_ ns: UInt64) { clock.wrappingAdd(ns, ordering: .relaxed) }
    }

    func makeLog(_ lines: Lines, burst: Int = RateLimitedLog.defaultBurst) -> RateLimitedLog {
        RateLimitedLog(name: "dev0", burst: burst, clock: { lines.clock.load(ordering: .relaxed) },
                       sink: { level, line in lines.lock.withLock { $0.append((level, line)) } })
    }

    func testFirstLinesOfAKindThenAtMostOneSummaryPerInterval() {
        let lines = Lines()
        let log = makeLog(lines)
        for i in 0..<1000 { log.warn("bad access", "access \(i)") }
        XCTAssertEqual(lines.texts, (0..<5).map { "access \($0)" })
        lines.advance(RateLimitedLog.defaultIntervalNanos - 1)
        log.warn("bad access", "access 1000")
        XCTAssertEqual(lines.texts.count, 5)
        lines.advance(1)
        log.warn("bad access", "access 1001")
        XCTAssertEqual(lines.texts.count, 6)
        XCTAssertEqual(lines.texts.last, "dev0: 997 more \"bad access\" lines left out")
        // The next summary waits a whole interval from this one.
        lines.advance(RateLimitedLog.defaultIntervalNanos / 2)
        log.warn("bad access", "access 1002")
        XCTAssertEqual(lines.texts.count, 6)
        lines.advance(RateLimitedLog.defaultIntervalNanos / 2)
        log.warn("bad access", "access 1003")
        XCTAssertEqual(lines.texts.last, "dev0: 2 more \"bad access\" lines left out")
        XCTAssertEqual(lines.all.map(\.0), Array(repeating: LogLevel.warn, count: 7))
    }

    func testKindsAreLimitedSeparately() {
        let lines = Lines()
        let log = makeLog(lines, burst: 2)
        for _ in 0..<10 {
            log.warn("kind a", "a")
            log.warn("kind b", "b")
        }
        XCTAssertEqual(lines.texts, ["a", "b", "a", "b"])
        lines.advance(RateLimitedLog.defaultIntervalNanos)
        log.warn("kind b", "b")
        XCTAssertEqual(lines.texts.last, "dev0: 9 more \"kind b\" lines left out")
        log.warn("kind a", "a")
        XCTAssertEqual(lines.texts.last, "dev0: 9 more \"kind a\" lines left out")
    }

    func testLeftOutLinesAreNeverBuilt() {
        let lines = Lines()
        let log = makeLog(lines, burst: 1)
        let built = Atomic<Int>(0)
        func message() -> String {
            built.wrappingAdd(1, ordering: .relaxed)
            return "m"
        }
        for _ in 0..<100 { log.warn("k", message()) }
        XCTAssertEqual(built.load(ordering: .relaxed), 1)
        XCTAssertEqual(lines.texts, ["m"])
    }

    func testFlushWritesWhatWasLeftOutOnce() {
        let lines = Lines()
        let log = makeLog(lines, burst: 1)
        log.warn("quiet", "q")
        log.flush()
        XCTAssertEqual(lines.texts, ["q"])
        for _ in 0..<3 { log.warn("noisy", "n") }
        for _ in 0..<2 { log.warn("also noisy", "o") }
        log.flush()
        XCTAssertEqual(lines.texts, ["q", "n", "o", "dev0: 1 more \"also noisy\" line left out",
                                     "dev0: 2 more \"noisy\" lines left out"])
        log.flush()
        XCTAssertEqual(lines.texts.count, 5)
    }

    func testManyThreadsPassOnExactlyTheBurst() {
        let lines = Lines()
        let log = makeLog(lines)
        final class Box: Sendable { let log: RateLimitedLog; init(_ l: RateLimitedLog) { log = l } }
        var threads: [pthread_t] = []
        for _ in 0..<4 {
            var t = pthread_t()
            let box = Unmanaged.passRetained(Box(log)).toOpaque()
            XCTAssertEqual(pthread_create(&t, nil, { p in
                let b = Unmanaged<Box>.fromOpaque(p!).takeRetainedValue()
                for _ in 0..<10_000 { b.log.warn("shared", "line") }
                return nil
            }, box), 0)
            threads.append(t)
        }
        for t in threads { pthread_join(t, nil) }
        XCTAssertEqual(lines.texts.count, 5)
        log.flush()
        XCTAssertEqual(lines.texts.last, "dev0: 39995 more \"shared\" lines left out")
    }
}
