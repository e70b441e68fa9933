// A one-shot gate for threads that must not go on before another has finished its setup
// (vCPU threads wait for the main thread's seccomp filter before the first KVM_RUN).
import Glibc

/// `wait()` blocks until `open()` has been called; afterwards it returns at once. Built on
/// a blocking semaphore eventfd, so waiting and opening are a read(2) and a write(2).
public final class Gate: Sendable {
    private let event: EventFD
    /// Waiters that can pass after open (each takes one from the counter).
    private static let capacity: UInt64 = 1 << 32

    public init() throws { event = try EventFD(nonBlocking: false, semaphore: true) }

    /// Lets every present and future waiter through.
    public func open() { try? event.write(Gate.capacity) }

    /// Returns once the gate is open.
    public func wait() { _ = try? event.read() }
}
