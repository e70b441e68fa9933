// OS threads. Every swiftlet thread (vCPUs, virtio queue threads, disk I/O pool threads,
// interrupt resample threads) blocks in the kernel for long stretches (KVM_RUN, poll,
// preadv), so each is a real pthread, never a task on Swift concurrency's cooperative pool.
import Glibc
import CLinux
import Synchronization

/// A joinable pthread created by `spawnThread`.
public final class OSThread: Sendable {
    public let name: String
    public let handle: pthread_t
    private let joined = Atomic<Bool>(false)

    init(name: String, handle: pthread_t) { self.name = name; self.handle = handle }

    /// Waits for the thread to finish. Joining twice is a no-op.
    public func join() {
        if !joined.exchange(true, ordering: .acquiringAndReleasing) { pthread_join(handle, nil) }
    }

    deinit {
        // A never-joined thread is detached so its resources are freed when it ends.
        if !joined.load(ordering: .acquiring) { pthread_detach(handle) }
    }
}

/// The signals a new thread leaves unblocked: the synchronous ones (a fault in the thread
/// itself must still be delivered to it), SIGABRT (abort) and SIGSYS (a seccomp trap).
private let synchronousSignals = [SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS]

private final class ThreadStart {
    let name: String
    let body: () -> Void
    init(name: String, body: @escaping () -> Void) { self.name = name; self.body = body }
}

/// Starts `body` on a new pthread named `name` (truncated to 15 bytes, the kernel's limit;
/// set with prctl(PR_SET_NAME) from the new thread, same effect as pthread_setname_np).
///
/// The thread starts with every asynchronous signal blocked (all but SIGSEGV, SIGBUS,
/// SIGFPE, SIGILL, SIGTRAP, SIGABRT and SIGSYS), whatever its creator's mask: a
/// process-directed signal (SIGTERM, SIGUSR1, ...) must reach the main thread's
/// signalfd, never kill the process through a helper thread that happened to be created
/// before the main thread blocked it. A vCPU thread still gets its kick signal inside
/// KVM_RUN (KVM is handed its own signal mask for that).
///
/// The body installs its seccomp filter itself: a filter is per thread.
public func spawnThread(name: String, body: @escaping @Sendable () -> Void) throws -> OSThread {
    let start = Unmanaged.passRetained(ThreadStart(name: name, body: body)).toOpaque()
    var blocked = sigset_t()
    sigfillset(&blocked)
    for s in synchronousSignals { sigdelset(&blocked, s) }
    var creatorMask = sigset_t()
    pthread_sigmask(SIG_SETMASK, &blocked, &creatorMask)
    defer { pthread_sigmask(SIG_SETMASK, &creatorMask, nil) }
    var tid = pthread_t()
    let e = pthread_create(&tid, nil, { arg in
        let s = Unmanaged<ThreadStart>.fromOpaque(arg!).takeRetainedValue()
        _ = clinux_set_thread_name(String(decoding: Array(s.name.utf8.prefix(15)), as: UTF8.self))
        s.body()
        return nil
    }, start)
    if e != 0 {
        Unmanaged<ThreadStart>.fromOpaque(start).release()
        throw SystemError(call: "pthread_create", errno: e)
    }
    return OSThread(name: name, handle: tid)
}
