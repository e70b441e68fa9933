// A small fixed pool of pthreads that run blocking file I/O for one virtqueue, so that
// several requests of a queue can be in flight at once (no io_uring: it crashed the
// testbed's L1 kernel). Jobs are closures; a job reports its completion itself.
import Glibc
import CLinux
import Seccomp

private final class PoolThreadBody {
    let pool: IOPool
    let name: String
    init(pool: IOPool, name: String) { self.pool = pool; self.name = name }
}

public final class IOPool: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var jobs: [() -> Void] = []
    private var head = 0
    private var shuttingDown = false
    private var threads: [pthread_t] = []
    public let name: String

    /// Starts `count` (>= 1) threads named "\(name)-io\(i)".
    public init(threads count: Int, name: String) throws {
        self.name = name
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
        for i in 0..<max(1, count) {
            let box = Unmanaged.passRetained(PoolThreadBody(pool: self, name: "\(name)-io\(i)")).toOpaque()
            var tid = pthread_t()
            let e = pthread_create(&tid, nil, { arg in
                let b = Unmanaged<PoolThreadBody>.fromOpaque(arg!).takeRetainedValue()
                _ = clinux_set_thread_name(String(decoding: Array(b.name.utf8.prefix(15)), as: UTF8.self))
                Seccomp.installOrExit(.io, name: b.name)
                b.pool.work()
                return nil
            }, box)
            if e != 0 {
                Unmanaged<PoolThreadBody>.fromOpaque(box).release()
                shutdown()
                throw BlockError.system(call: "pthread_create", errno: e)
            }
            threads.append(tid)
        }
    }

    deinit {
        shutdown()
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    public var threadCount: Int { threads.count }

    /// Queues a job. Returns false after shutdown (the job is not run).
    @discardableResult
    public func submit(_ job: @escaping () -> Void) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        guard !shuttingDown else { return false }
        jobs.append(job)
        pthread_cond_signal(&cond)
        return true
    }

    private func work() {
        while true {
            pthread_mutex_lock(&mutex)
            while head == jobs.count && !shuttingDown { pthread_cond_wait(&cond, &mutex) }
            if head == jobs.count {  // shutting down and nothing left
                pthread_mutex_unlock(&mutex)
                return
            }
            let job = jobs[head]
            head += 1
            if head == jobs.count { jobs.removeAll(keepingCapacity: true); head = 0 }
            pthread_mutex_unlock(&mutex)
            job()
        }
    }

    /// Runs the jobs already queued, then stops and joins every thread. Idempotent.
    public func shutdown() {
        pthread_mutex_lock(&mutex)
        shuttingDown = true
        let ts = threads
        threads = []
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
        for t in ts { pthread_join(t, nil) }
    }
}

/// Host-side failures of the block device (setup, not guest requests).
public enum BlockError: Error, CustomStringConvertible {
    case system(call: String, errno: Int32)
    public var description: String {
        switch self {
        case let .system(call, e): return "\(call) failed: \(String(cString: strerror(e)))"
        }
    }
}
