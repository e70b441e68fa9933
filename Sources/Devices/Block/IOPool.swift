// A small fixed pool of threads that run blocking file I/O for one virtqueue, so that
// several requests of a queue can be in flight at once. Plain blocking calls (no
// io_uring) need nothing of the host kernel beyond preadv/pwritev and keep the disk I/O
// seccomp list short. Jobs are closures; a job reports its completion itself.
import Glibc
import OS
import Seccomp

public final class IOPool: Sendable {
    struct State {
        var jobs: [@Sendable () -> Void] = []
        var head = 0
        var shuttingDown = false
        var threads: [OSThread] = []
    }

    private let state = Locked(State())
    /// One count per queued job, plus one per thread at shutdown (a blocking semaphore
    /// eventfd: each wake-up of a thread takes one).
    private let wakeups: EventFD
    public let name: String

    /// Starts `count` (>= 1) threads named "\(name)-io\(i)", each with the disk I/O
    /// seccomp filter.
    public init(threads count: Int, name: String) throws {
        self.name = name
        wakeups = try EventFD(nonBlocking: false, semaphore: true)
        for i in 0..<max(1, count) {
            let threadName = "\(name)-io\(i)"
            do {
                let t = try spawnThread(name: threadName) { [self] in
                    Seccomp.installOrExit(.io, name: threadName)
                    work()
                }
                state.withLock { $0.threads.append(t) }
            } catch {
                shutdown()
                throw error
            }
        }
    }

    deinit { shutdown() }

    public var threadCount: Int { state.withLock { $0.threads.count } }

    /// Queues a job. Returns false after shutdown (the job is not run).
    @discardableResult
    public func submit(_ job: @escaping @Sendable () -> Void) -> Bool {
        let queued = state.withLock { s -> Bool in
            guard !s.shuttingDown else { return false }
            s.jobs.append(job)
            return true
        }
        if queued { try? wakeups.write(1) }
        return queued
    }

    private func work() {
        while true {
            _ = try? wakeups.read()
            let job = state.withLock { s -> (@Sendable () -> Void)?? in
                if s.head == s.jobs.count { return s.shuttingDown ? .some(nil) : nil }
                let job = s.jobs[s.head]
                s.head += 1
                if s.head == s.jobs.count { s.jobs.removeAll(keepingCapacity: true); s.head = 0 }
                return .some(job)
            }
            switch job {
            case .none: continue            // a wake-up whose job another thread took
            case .some(.none): return       // shutting down and nothing left
            case .some(.some(let j)): j()
            }
        }
    }

    /// Runs the jobs already queued, then stops and joins every thread. Idempotent.
    public func shutdown() {
        let ts = state.withLock { s -> [OSThread] in
            s.shuttingDown = true
            let t = s.threads
            s.threads = []
            return t
        }
        guard !ts.isEmpty else { return }
        try? wakeups.write(UInt64(ts.count))
        for t in ts { t.join() }
    }
}
