// errno as text, and the error every OS wrapper throws.
import Glibc

/// strerror(3) of `e` as a Swift string.
public func errnoText(_ e: Int32) -> String { String(cString: strerror(e)) }

/// A system call (or libc function) failed with `errno`.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The call's name, e.g. "eventfd" or "pthread_create".
    public let call: String
    public let errno: Int32

    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "\(call) failed: \(errnoText(errno))" }
}
