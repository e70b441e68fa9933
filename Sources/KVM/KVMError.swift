// Errors from the KVM layer. Every case prints as one line naming what failed and why.
import Glibc
import OS

public enum KVMError: Error, Equatable, CustomStringConvertible {
    /// open(2) of a device failed.
    case open(path: String, errno: Int32)
    /// An ioctl failed; `name` is the ioctl's name, e.g. "KVM_CREATE_VM".
    case ioctl(name: String, errno: Int32)
    /// KVM_GET_API_VERSION returned something other than 12.
    case apiVersion(Int32)
    /// KVM lacks capabilities swiftlet needs (names like "KVM_CAP_IRQCHIP").
    case missingCapabilities([String])
    /// mmap of the vCPU's kvm_run area failed.
    case mmap(what: String, errno: Int32)
    /// A vCPU id is at or above what KVM accepts.
    case vcpuIDOutOfRange(id: UInt32, limit: Int)
    /// kvm_run holds data that does not make sense (offsets outside the mapping, bad sizes).
    /// Never dereferenced: the exit is refused instead.
    case badRunData(String)
    /// KVM_SET_MSRS / KVM_GET_MSRS handled only `done` of `total` MSRs; `failedIndex` is the first refused.
    case msrRefused(index: UInt32, done: Int, total: Int)
    /// Some other system call failed (sigaction, pthread_sigmask...).
    case system(call: String, errno: Int32)
    /// A caller passed an impossible argument.
    case invalidArgument(String)

    public var description: String {
        switch self {
        case let .open(path, e):
            return "cannot open \(path): \(errnoText(e))"
        case let .ioctl(name, e):
            return "\(name) failed: \(errnoText(e))"
        case let .apiVersion(v):
            return "KVM_GET_API_VERSION returned \(v), expected 12: unsupported KVM"
        case let .missingCapabilities(names):
            return "KVM lacks required capabilit\(names.count == 1 ? "y" : "ies"): \(names.joined(separator: ", "))"
        case let .mmap(what, e):
            return "cannot mmap \(what): \(errnoText(e))"
        case let .vcpuIDOutOfRange(id, limit):
            return "vCPU id \(id) is out of range: KVM accepts ids below \(limit)"
        case let .badRunData(s):
            return "bad kvm_run data: \(s)"
        case let .msrRefused(index, done, total):
            return "KVM refused MSR 0x\(String(index, radix: 16)) (\(done) of \(total) MSRs handled)"
        case let .system(call, e):
            return "\(call) failed: \(errnoText(e))"
        case let .invalidArgument(s):
            return "invalid argument: \(s)"
        }
    }
}
