// The failure every layer reports to the user the same way: one line on stderr and a
// documented exit status (README "Exit status").

/// Exit statuses a CI script can rely on (README "Exit status").
public enum ExitStatus: Int32, Sendable {
    case poweredOff = 0
    case runtimeError = 1
    case rebooted = 3
    case guestCrashed = 4
    case usage = 64
    case badInput = 65
    case missingInput = 66
    case hostUnavailable = 69
    /// --timeout: the guest was still running at the deadline (as timeout(1) exits).
    case timedOut = 124
}

/// A failure that ends swiftlet with one line on stderr and a documented status.
public struct SwiftletError: Error, CustomStringConvertible {
    public let status: ExitStatus
    public let message: String
    public init(_ status: ExitStatus, _ message: String) {
        self.status = status
        self.message = message
    }
    public var description: String { message }
}

/// User text made safe for a one-line message: control characters escaped.
public func shown(_ s: String) -> String {
    var out = ""
    for u in s.unicodeScalars {
        switch u {
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        case "\r": out += "\\r"
        default:
            if u.value < 0x20 || u.value == 0x7f || (u.value >= 0x80 && u.value < 0xa0) {
                out += "\\u{\(String(u.value, radix: 16, uppercase: true))}"
            } else {
                out.unicodeScalars.append(u)
            }
        }
    }
    return out
}
