// Port I/O and MMIO dispatch for the devices that vCPU threads handle inline.
import Glibc

/// A device on the port I/O bus. `offset` is relative to the device's base port.
public protocol PortDevice: AnyObject {
    func read(offset: UInt16, size: Int) -> UInt32
    func write(offset: UInt16, size: Int, value: UInt32)
}

/// A device on the MMIO bus. `offset` is relative to the device's base address.
public protocol MMIODevice: AnyObject {
    func read(offset: UInt64, size: Int) -> UInt64
    func write(offset: UInt64, size: Int, value: UInt64)
}

/// What the guest asked of the machine as a whole.
public enum MachineEvent: Equatable, Sendable {
    case powerOff
    case reboot
}

/// A fixed map of address ranges to devices, built once before the vCPUs start and
/// read concurrently afterwards (immutable, so no locking on the exit path).
public struct RangeMap<Device> {
    public struct Entry {
        public let base: UInt64
        public let size: UInt64
        public let device: Device
    }
    public private(set) var entries: [Entry] = []

    public init() {}

    /// Adds [base, base+size); returns false if it overlaps an existing range.
    @discardableResult
    public mutating func insert(base: UInt64, size: UInt64, _ device: Device) -> Bool {
        guard size > 0, base &+ size > base else { return false }
        for e in entries where base < e.base + e.size && e.base < base + size { return false }
        entries.append(Entry(base: base, size: size, device: device))
        entries.sort { $0.base < $1.base }
        return true
    }

    /// The device whose range holds [addr, addr+len), with the offset into it.
    @inline(__always)
    public func lookup(_ addr: UInt64, length: UInt64 = 1) -> (device: Device, offset: UInt64)? {
        for e in entries where addr >= e.base && addr - e.base < e.size {
            guard length <= e.size - (addr - e.base) else { return nil }
            return (e.device, addr - e.base)
        }
        return nil
    }
}
