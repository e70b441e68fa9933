// eventfd(2): the wake-up every swiftlet thread waits on (queue kicks as ioeventfds,
// irqfds, stop requests, completions of I/O threads).
import Glibc
import CLinux

/// An eventfd counter. Owns its file descriptor.
public final class EventFD: Sendable {
    public let fd: Int32

    /// eventfd(initial, EFD_CLOEXEC [| EFD_NONBLOCK] [| EFD_SEMAPHORE]). In semaphore mode a
    /// read takes 1 from the counter instead of all of it.
    public init(initial: UInt32 = 0, nonBlocking: Bool = true, semaphore: Bool = false) throws {
        var flags = Int32(EFD_CLOEXEC)
        if nonBlocking { flags |= Int32(EFD_NONBLOCK) }
        if semaphore { flags |= Int32(EFD_SEMAPHORE) }
        let fd = eventfd(initial, flags)
        guard fd >= 0 else { throw SystemError(call: "eventfd", errno: errno) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Adds `value` to the counter.
    public func write(_ value: UInt64 = 1) throws {
        var v = value
        while true {
            let n = Glibc.write(fd, &v, 8)
            if n == 8 { return }
            if n < 0 && errno == EINTR { continue }
            throw SystemError(call: "eventfd write", errno: n < 0 ? errno : EIO)
        }
    }

    /// Reads and resets the counter (takes 1 in semaphore mode). Returns nil when it is
    /// zero in non-blocking mode; blocks until it is not in blocking mode.
    public func read() throws -> UInt64? {
        var v: UInt64 = 0
        while true {
            let n = Glibc.read(fd, &v, 8)
            if n == 8 { return v }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return nil }
            throw SystemError(call: "eventfd read", errno: n < 0 ? errno : EIO)
        }
    }

    /// Whether a read would return a value now (poll with zero timeout).
    public var isReadable: Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) == 1 && (p.revents & Int16(POLLIN)) != 0
    }
}
