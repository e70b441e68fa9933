// epoll(7) through <sys/epoll.h>: a set of descriptors that is itself one pollable
// descriptor, readable while any member is ready.
import Glibc
import CLinux

/// An epoll instance. Owns its file descriptor; members are not owned.
public final class Epoll: Sendable {
    public let fd: Int32

    /// epoll_create1(EPOLL_CLOEXEC).
    public init() throws {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw SystemError(call: "epoll_create1", errno: errno) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Readiness for reading (EPOLLIN).
    public static let readable = EPOLLIN.rawValue

    /// EPOLL_CTL_ADD of `member` for `events`, with `member` itself as the event's data.
    /// Returns 0 or the errno (EEXIST: already a member).
    @discardableResult
    public func add(_ member: Int32, events: UInt32 = Epoll.readable) -> Int32 {
        var ev = epoll_event()
        ev.events = events
        ev.data.fd = member
        return epoll_ctl(fd, EPOLL_CTL_ADD, member, &ev) == 0 ? 0 : errno
    }

    /// EPOLL_CTL_DEL of `member`. Returns 0 or the errno (ENOENT: not a member).
    @discardableResult
    public func remove(_ member: Int32) -> Int32 {
        var ev = epoll_event()
        return epoll_ctl(fd, EPOLL_CTL_DEL, member, &ev) == 0 ? 0 : errno
    }

    /// epoll_wait for up to `max` ready members (their descriptors), waiting at most
    /// `timeoutMillis` (-1: no limit). Throws on failure other than EINTR (then: []).
    public func wait(max: Int = 16, timeoutMillis: Int32) throws -> [Int32] {
        var events = [epoll_event](repeating: epoll_event(), count: Swift.max(1, max))
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(fd, $0.baseAddress, Int32($0.count), timeoutMillis) }
        if n < 0 {
            if errno == EINTR { return [] }
            throw SystemError(call: "epoll_wait", errno: errno)
        }
        return events[0..<Int(n)].map { $0.data.fd }
    }
}
