// --rng on|off, and the config file's `entropy` object: a virtio-rng device backed by the
// host's getrandom(2).
//
// Off by default, as in QEMU and Firecracker, which add it only when asked: a machine
// without the flag has exactly the devices it had before (the same virtio-mmio indices,
// GSIs and boot time), and a guest kernel without virtio-rng loses nothing. The device
// takes the virtio-mmio index after every disk and network interface.
import OS
import Devices
import Virtio
import GuestMemory

/// Parses a --rng value: on or off.
public func parseRng(_ text: String) throws -> Bool {
    switch text {
    case "on": return true
    case "off": return false
    default:
        throw SwiftletError(.usage, "--rng '\(shown(text))' is not valid: use on (a virtio-rng device fed by the host's getrandom) or off")
    }
}

/// The virtio-rng slot at virtio-mmio index `index` (threads "rng0-q0"), inserted into
/// `mmio`; none when `enabled` is false. Call like attachDisks.
func attachRng(_ enabled: Bool, index: Int, vm: any VirtioVM, memory: GuestMemory,
               mmio: inout RangeMap<MMIODevice>, interrupts: VirtioInterruptMode = .line,
               log: LogSink? = nil) throws -> [VirtioMMIOSlot] {
    try attachSlots(count: enabled ? 1 : 0, mmio: &mmio) { _ in
        let deviceLog = log.map { RateLimitedLog(name: "rng0", sink: $0) }
        return try VirtioMMIOSlot(vm: vm, memory: memory, device: VirtioRng(name: "rng0", log: deviceLog),
                                  index: index, name: "rng0", interrupts: interrupts, log: deviceLog)
    }
}
