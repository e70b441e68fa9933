// How a virtio device gets from the user's words to a device model, without the machine
// knowing its type:
//
//     --device KIND[,key=value...]      VirtioDeviceKind.make(DeviceOptions) → spec
//     spec.open(earlier:)               before KVM: the backend (an image, a TAP, /dev/...)
//     backend.makeDevice(...)           once the VM exists: the model and its --metrics
//
// A device's folder in Sources/Devices holds its kind, spec and backend beside its model;
// the machine lists the kinds (VMM/DeviceSpec.swift `deviceKinds`), opens the backends in
// order and gives device i virtio-mmio index i.
import OS

/// One virtio device the user asked for, before anything is opened.
public protocol VirtioDeviceSpec: Sendable {
    /// Prefix of the device's name ("blk", "net", "rng"): the machine appends the device's
    /// position among the specs of its kind, and threads are named "\(name)-qN".
    var kind: String { get }
    /// Opens the backend (an image, a TAP, ...). `earlier`: the backends of the specs
    /// before this one, for a spec that refuses to share its backend. Throws a
    /// SwiftletError, with nothing left open, when the backend cannot be used.
    func open(earlier: [any VirtioBackend]) throws -> any VirtioBackend
}

/// An opened backend, ready to become a device once the VM exists.
public protocol VirtioBackend: AnyObject, Sendable {
    /// The device model. `ordinal`: the device's position among those of its kind
    /// (a network interface's default MAC comes from it).
    func makeDevice(name: String, ordinal: Int, log: RateLimitedLog?) throws -> BuiltDevice
    /// Lets go of the backend (a TAP swiftlet created disappears). Idempotent.
    func close()
}

/// A device model and how it reports itself in --metrics.
public struct BuiltDevice: Sendable {
    public let device: any HostedVirtioDevice
    /// JSON members (without braces) with the device's own counters.
    public let metrics: @Sendable () -> String

    public init(_ device: any HostedVirtioDevice, metrics: @escaping @Sendable () -> String) {
        self.device = device
        self.metrics = metrics
    }
}

/// Per-queue counters as --metrics JSON members, for a device that keeps QueueCounters.
public func queueMetricsJSON(_ counters: [QueueCounters]) -> String {
    let qs = counters.enumerated().map { i, q in
        "{\"queue\": \(i), \"served\": \(q.served), \"bytes\": \(q.bytes), \"drops\": \(q.drops), "
            + "\"notifications\": \(q.notifications), \"interrupts\": \(q.interrupts)}"
    }
    return "\"queues\": [\(qs.joined(separator: ", "))]"
}

/// A kind of device the user adds with `--device NAME[,key=value...]` (repeatable) or
/// the configuration file's `swiftlet.devices` list.
public struct VirtioDeviceKind: Sendable {
    /// What the user writes first: "rng".
    public let name: String
    /// The options after the name, for --help and error lines ("cid=N"; "" for none).
    public let form: String
    /// The spec of one device from its options; throws one usage SwiftletError
    /// (`options.usage`) for a bad, missing or unknown key.
    public let make: @Sendable (_ options: inout DeviceOptions) throws -> any VirtioDeviceSpec

    public init(name: String, form: String, make: @escaping @Sendable (_ options: inout DeviceOptions) throws -> any VirtioDeviceSpec) {
        self.name = name
        self.form = form
        self.make = make
    }

    /// "vsock,cid=N", or "rng".
    public var usageForm: String { form.isEmpty ? name : name + "," + form }
}

/// The key=value options of one device, as the user gave them. A kind's `make` takes
/// the keys it knows; any key left over is an error naming it.
public struct DeviceOptions: Sendable {
    /// How the user asked, for messages: "--device vsock", "--vsock".
    public let flag: String
    /// What a correct value looks like after `flag`: "vsock,cid=N" for --device, "cid=N".
    public let form: String
    private var pairs: [(key: String, value: String)]

    /// Splits `text` (after the kind's name) into key=value pairs: no empty item, an `=`
    /// in each, no key twice.
    public init(_ text: String, flag: String, form: String) throws {
        self.flag = flag
        self.form = form
        pairs = []
        guard !text.isEmpty else { return }
        var seen = Set<String>()
        for item in text.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
            guard !item.isEmpty else { throw SwiftletError(.usage, "\(flag): empty option in '\(shown(text))': use \(Self.hint(flag, form))") }
            guard let eq = item.firstIndex(of: "=") else {
                throw SwiftletError(.usage, "\(flag): '\(shown(item))' is not key=value: use \(Self.hint(flag, form))")
            }
            let key = String(item[..<eq])
            guard !seen.contains(key) else { throw SwiftletError(.usage, "\(flag): \(shown(key))= given twice") }
            seen.insert(key)
            pairs.append((key, String(item[item.index(after: eq)...])))
        }
    }

    public static func hint(_ flag: String, _ form: String) -> String {
        // --device's form already starts with the kind: "--device vsock" + "vsock,cid=N"
        if flag.hasPrefix("--device ") { return "--device " + form }
        return form.isEmpty ? flag : "\(flag) \(form)"
    }

    /// The value of `key` (taken: it is no longer left over), or nil.
    public mutating func take(_ key: String) -> String? {
        guard let i = pairs.firstIndex(where: { $0.key == key }) else { return nil }
        return pairs.remove(at: i).value
    }

    /// A usage error about this device: "FLAG: WHY".
    public func usage(_ why: String) -> SwiftletError { SwiftletError(.usage, "\(flag): \(why)") }

    /// Throws for the first key no one took.
    public func finish() throws {
        if let k = pairs.first?.key { throw usage("unknown option '\(shown(k))': use \(Self.hint(flag, form))") }
    }
}

/// The spec of one `--device` value: the kind named first (one of `kinds`), then its
/// options. `flag` names where the value came from in messages ("--device",
/// "swiftlet.devices[1]").
public func parseDevice(_ text: String, kinds: [VirtioDeviceKind], flag: String = "--device") throws -> any VirtioDeviceSpec {
    let name = text.split(separator: ",", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
    let known = kinds.map(\.usageForm).joined(separator: ", ")
    guard let kind = kinds.first(where: { $0.name == name }) else {
        throw SwiftletError(.usage, "\(flag) '\(shown(text))': '\(shown(name))' is not a device kind: use one of \(known)")
    }
    let rest = text.count > name.count ? String(text.dropFirst(name.count + 1)) : ""
    if text.count > name.count && rest.isEmpty {
        throw SwiftletError(.usage, "\(flag) \(kind.name): empty option in '\(shown(text))': use --device \(kind.usageForm)")
    }
    var options = try DeviceOptions(rest, flag: "\(flag) \(kind.name)", form: kind.usageForm)
    let spec = try kind.make(&options)
    try options.finish()
    return spec
}
