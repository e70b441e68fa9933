// OS threads for vCPUs. A vCPU thread blocks in KVM_RUN for as long as the guest runs, so
// it must be a real pthread, never a task on Swift concurrency's cooperative pool.
import Glibc
import CLinux

private final class ThreadBody {
    let name: String
    let body: () -> Void
    init(name: String, body: @escaping () -> Void) { self.name = name; self.body = body }
}

/// A joinable pthread created by `spawnThread`.
public final class OSThread: @unchecked Sendable {
    public let name: String
    public let handle: pthread_t
    private let lock = PThreadMutex()
    private var joined = false

    init(name: String, handle: pthread_t) { self.name = name; self.handle = handle }

    /// Waits for the thread to finish. Joining twice is a no-op.
    public func join() {
        let first = lock.locked { () -> Bool in
            if joined { return false }
            joined = true
            return true
        }
        if first { pthread_join(handle, nil) }
    }

    deinit {
        // A never-joined thread is detached so its resources are freed when it ends.
        if !joined { pthread_detach(handle) }
    }
}

/// Starts `body` on a new pthread named `name` (truncated to 15 bytes, the kernel's limit;
/// set with prctl(PR_SET_NAME) from the new thread, same effect as pthread_setname_np).
///
/// The thread starts with every asynchronous signal blocked (all but SIGSEGV, SIGBUS,
/// SIGFPE, SIGILL, SIGTRAP, SIGABRT and SIGSYS), whatever its creator's mask: a
/// process-directed signal (SIGTERM, SIGUSR1, ...) must reach the main thread's
/// signalfd, never kill the process through a helper thread that happened to be created
/// before the main thread blocked it. A vCPU thread still gets its kick signal inside
/// KVM_RUN (VCPU.withKickEnabled hands KVM its own mask).
public func spawnThread(name: String, body: @escaping () -> Void) throws -> OSThread {
    let box = Unmanaged.passRetained(ThreadBody(name: name, body: body)).toOpaque()
    var blocked = sigset_t()
    sigfillset(&blocked)
    for s in [SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS] { sigdelset(&blocked, s) }
    var creatorMask = sigset_t()
    pthread_sigmask(SIG_SETMASK, &blocked, &creatorMask)
    defer { pthread_sigmask(SIG_SETMASK, &creatorMask, nil) }
    var tid = pthread_t()
    let e = pthread_create(&tid, nil, { arg in
        let b = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
        let short = String(decoding: Array(b.name.utf8.prefix(15)), as: UTF8.self)
        _ = clinux_set_thread_name(short)
        b.body()
        return nil
    }, box)
    if e != 0 {
        Unmanaged<ThreadBody>.fromOpaque(box).release()
        throw KVMError.system(call: "pthread_create", errno: e)
    }
    return OSThread(name: name, handle: tid)
}
