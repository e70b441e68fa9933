// The one lock type: a value behind the standard library's Synchronization.Mutex, told to
// ThreadSanitizer.
//
// On Linux, Mutex locks a priority-inheritance futex from inside the (uninstrumented)
// standard library, so ThreadSanitizer sees neither the lock nor the unlock and reports
// every access made under it from two threads as a race. Each critical section here
// tells TSan it acquires the lock on entry and releases it on exit (__tsan_acquire and
// __tsan_release on the lock's address); without the TSan runtime these are weak null
// symbols and the calls are a test and a branch.
import CLinux
import Synchronization

/// A value shared between threads; every access goes through `withLock`.
public final class Locked<Value>: Sendable {
    @usableFromInline let mutex: Mutex<Value>

    public init(_ value: sending Value) {
        mutex = Mutex(value)
    }

    /// Runs `body` with the value, holding the lock.
    @inlinable
    public func withLock<Result, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        let me = Unmanaged.passUnretained(self).toOpaque()
        return try mutex.withLock { (v: inout sending Value) throws(E) -> sending Result in
            clinux_tsan_acquire(me)
            defer { clinux_tsan_release(me) }
            return try body(&v)
        }
    }
}
