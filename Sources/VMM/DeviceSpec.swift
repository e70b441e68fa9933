// The machine's virtio devices come from one list of device specs (the contract is in
// Virtio/DeviceSpec.swift): each spec is a parsed option, opens its backend, and builds
// its device model with the --metrics members that device reports. The machine knows no
// device type: it opens the backends in list order, then gives device i virtio-mmio
// index i (its window, GSI and DSDT entry) in one loop.
//
// The order is the virtio-mmio order a guest sees: disks, network interfaces, --rng,
// --vsock, then each --device in the order given. A new device lives in its folder under
// Sources/Devices with its `VirtioDeviceKind`, and takes one line in `deviceKinds`.
import Glibc
import OS
import Devices
import Virtio
import GuestMemory
import Boot

/// Every kind of device `--device KIND,...` (and the file's swiftlet.devices) can add.
public let deviceKinds: [VirtioDeviceKind] = [
    rngDeviceKind,
    vsockDeviceKind,
]

/// The devices of `config`, in virtio-mmio order.
public func deviceSpecs(_ config: MachineConfig) -> [any VirtioDeviceSpec] {
    var specs: [any VirtioDeviceSpec] = []
    specs += config.disks.map { DiskDeviceSpec(options: $0) }
    let infoOn = config.logLevel >= .info
    specs += config.nets.map { NetDeviceSpec(options: $0, info: { line in if infoOn { log(line) } }) }
    if config.rng { specs.append(RngDeviceSpec()) }
    if let v = config.vsock { specs.append(VsockDeviceSpec(options: v)) }
    specs += config.devices
    return specs
}

/// An opened backend with the name and ordinal the machine gave it.
public struct OpenedDevice: Sendable {
    public let name: String
    public let ordinal: Int
    public let backend: any VirtioBackend
}

/// Opens every spec's backend in order; on an error the backends opened so far are closed.
public func openDevices(_ specs: [any VirtioDeviceSpec]) throws -> [OpenedDevice] {
    var out: [OpenedDevice] = []
    var perKind: [String: Int] = [:]
    do {
        for spec in specs {
            let backend = try spec.open(earlier: out.map(\.backend))
            let n = perKind[spec.kind, default: 0]
            perKind[spec.kind] = n + 1
            out.append(OpenedDevice(name: "\(spec.kind)\(n)", ordinal: n, backend: backend))
        }
    } catch {
        for d in out { d.backend.close() }
        throw error
    }
    return out
}

/// One virtio-mmio slot per opened device, device i at index i, inserted into `mmio`.
/// Call after the irqchip is created and guest memory registered; call `stop()` on every
/// returned slot after the vCPU threads have been joined. Returns each slot's metrics.
func attachDevices(_ devices: [OpenedDevice], vm: any VirtioVM, memory: GuestMemory,
                   mmio: inout RangeMap<MMIODevice>, interrupts: VirtioInterruptMode = .line,
                   registers: VirtioRegisterMode = .exit,
                   log: LogSink? = nil) throws -> [(slot: VirtioMMIOSlot, metrics: @Sendable () -> String)] {
    var metrics: [@Sendable () -> String] = []
    let slots = try attachSlots(count: devices.count, mmio: &mmio) { i in
        let d = devices[i]
        let deviceLog = log.map { RateLimitedLog(name: d.name, sink: $0) }
        let built = try d.backend.makeDevice(name: d.name, ordinal: d.ordinal, log: deviceLog)
        metrics.append(built.metrics)
        return try VirtioMMIOSlot(vm: vm, memory: memory, device: built.device, index: i, name: d.name,
                                  interrupts: interrupts, registers: registers, log: deviceLog)
    }
    return Array(zip(slots, metrics)).map { (slot: $0.0, metrics: $0.1) }
}

/// Makes `count` virtio-mmio slots with `make` and maps each window; on any failure the
/// slots made so far are stopped before the error goes up.
func attachSlots(count: Int, mmio: inout RangeMap<MMIODevice>, make: (Int) throws -> VirtioMMIOSlot) throws -> [VirtioMMIOSlot] {
    var slots: [VirtioMMIOSlot] = []
    do {
        for i in 0..<count {
            let s = try make(i)
            slots.append(s)
            guard mmio.insert(base: s.base, size: VirtioMMIOSlot.windowSize, s) else {
                throw SwiftletError(.runtimeError, "virtio-mmio window 0x\(String(s.base, radix: 16)) overlaps another device")
            }
        }
    } catch {
        for s in slots { s.stop() }
        throw error
    }
    return slots
}

/// The ACPI descriptions of `count` virtio-mmio devices from index `firstIndex` (for
/// LinuxBootConfig.virtioDevices, written before the VM exists).
public func virtioDescriptions(count: Int, firstIndex: Int = 0, interrupts: VirtioInterruptMode = .line) throws -> [VirtioMMIODeviceDescription] {
    try (0..<count).map { i in
        guard let d = VirtioMMIOSlot.acpiDescription(index: firstIndex + i, interrupts: interrupts) else {
            throw SwiftletError(.usage, "too many virtio devices: at most \(X86Layout.maxVirtioDevices)")
        }
        return d
    }
}
