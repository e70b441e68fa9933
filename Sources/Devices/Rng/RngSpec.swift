// virtio-rng's kind, spec and backend: `--device rng`, also spelt `--rng on` and the config
// file's `entropy` object. A virtio-rng device backed by the host's getrandom(2).
//
// Off by default, as in QEMU and Firecracker, which add it only when asked: a machine
// without the flag has exactly the devices it had before (the same virtio-mmio indices,
// GSIs and boot time), and a guest kernel without virtio-rng loses nothing. The device
// takes the virtio-mmio index after every disk and network interface.
import OS
import Virtio

/// Parses a --rng value: on or off.
public func parseRng(_ text: String) throws -> Bool {
    switch text {
    case "on": return true
    case "off": return false
    default:
        throw SwiftletError(.usage, "--rng '\(shown(text))' is not valid: use on (a virtio-rng device fed by the host's getrandom) or off")
    }
}

/// `--device rng`: no options.
public let rngDeviceKind = VirtioDeviceKind(name: "rng", form: "") { _ in RngDeviceSpec() }

/// --rng on: a virtio-rng device fed by the host's getrandom(2).
public struct RngDeviceSpec: VirtioDeviceSpec {
    public init() {}
    public var kind: String { "rng" }
    public func open(earlier: [any VirtioBackend]) throws -> any VirtioBackend { RngBackend() }
}

/// getrandom(2) needs nothing opened.
final class RngBackend: VirtioBackend {
    func makeDevice(name: String, ordinal: Int, log: RateLimitedLog?) throws -> BuiltDevice {
        let rng = VirtioRng(name: name, log: log)
        return BuiltDevice(rng) { queueMetricsJSON(rng.queueCounters) }
    }

    func close() {}
}
