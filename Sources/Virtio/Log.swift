// Log lines of virtio devices and their transports, and the rate limit that keeps a
// guest from flooding swiftlet's stderr with them.
//
// Almost everything a device logs can be caused by the guest, directly (a register
// access, a descriptor chain) or by repeating something (a driver reset starts the
// queues, and whatever that logs, again). So a device's lines are warnings, never
// errors, and each kind of line is rate limited: the first `burst` lines of a kind go
// out, after that they are counted and at most one summary line per `interval` says how
// many were left out.
import OS

/// How much a log line matters (error < warn < info < debug); the VMM prints the lines
/// at its --log-level or a more important one.
public enum LogLevel: Int, Comparable, Sendable {
    case error = 0, warn, info, debug
    public static func < (a: LogLevel, b: LogLevel) -> Bool { a.rawValue < b.rawValue }
}

/// Where log lines go.
public typealias LogSink = @Sendable (LogLevel, String) -> Void

/// One device's log: warnings, rate limited per kind. Safe from any thread.
public final class RateLimitedLog: Sendable {
    /// Lines of one kind passed on before the summaries take over.
    public static let defaultBurst = 5
    /// Least time between two summary lines of one kind.
    public static let defaultIntervalNanos: UInt64 = 1_000_000_000

    struct Kind {
        var shown = 0
        var suppressed: UInt64 = 0
        /// Clock value when the last line of this kind went out.
        var lastLine: UInt64 = 0
    }

    /// Names the device in summary lines (e.g. "blk0").
    public let name: String
    let sink: LogSink
    let burst: Int
    let interval: UInt64
    let clock: @Sendable () -> UInt64
    let kinds = Locked<[String: Kind]>([:])

    /// `clock`: nanoseconds from any fixed point (CLOCK_MONOTONIC unless a test gives one).
    public init(name: String, burst: Int = RateLimitedLog.defaultBurst,
                intervalNanos: UInt64 = RateLimitedLog.defaultIntervalNanos,
                clock: @escaping @Sendable () -> UInt64 = { monotonicNanos() },
                sink: @escaping LogSink) {
        self.name = name
        self.sink = sink
        self.burst = max(0, burst)
        self.interval = intervalNanos
        self.clock = clock
    }

    /// A warning of `kind` (a fixed description, so that nothing the guest chooses makes
    /// a new kind). `message` is only built when the line goes out.
    public func warn(_ kind: StaticString, _ message: @autoclosure () -> String) {
        let now = clock()
        let key = kind.description
        let line: String? = kinds.withLock { all in
            var k = all[key] ?? Kind()
            defer { all[key] = k }
            if k.shown < burst {
                k.shown += 1
                k.lastLine = now
                return message()
            }
            k.suppressed += 1
            guard now &- k.lastLine >= interval else { return nil }
            let n = k.suppressed
            k.suppressed = 0
            k.lastLine = now
            return summary(key, n)
        }
        if let line { sink(.warn, line) }
    }

    /// Writes the summary of every kind with lines left out since its last line (at the
    /// end of a run).
    public func flush() {
        let now = clock()
        let lines: [String] = kinds.withLock { all in
            var out: [String] = []
            for key in all.keys.sorted() where all[key]!.suppressed > 0 {
                out.append(summary(key, all[key]!.suppressed))
                all[key]!.suppressed = 0
                all[key]!.lastLine = now
            }
            return out
        }
        for l in lines { sink(.warn, l) }
    }

    func summary(_ kind: String, _ n: UInt64) -> String {
        "\(name): \(n) more \"\(kind)\" line\(n == 1 ? "" : "s") left out"
    }
}
