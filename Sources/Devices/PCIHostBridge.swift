// PCI configuration mechanism #1 (ports 0xCF8-0xCFF) with one host bridge on bus 0 and
// nothing behind it. The machine has no PCI devices; this lets a stock kernel find a
// working config space access method in a handful of exits, so it neither probes the
// type 2 mechanism nor reports that it found none. The DSDT declares no PCI root
// bridge, so an ACPI kernel never scans the bus.
import OS
import Glibc

public final class PCIHostBridge: PortDevice, Sendable {
    public static let port: UInt16 = 0xcf8
    public static let size: UInt64 = 8
    /// The generic PCI Express host bridge ID (Red Hat's 1b36:0008); no Linux driver binds to it.
    public static let vendorID: UInt16 = 0x1b36
    public static let deviceID: UInt16 = 0x0008
    /// Class code 06 00 00: bridge, host bridge.
    public static let classCode: UInt32 = 0x06_00_00

    private let address = Locked<UInt32>(0)

    public init() {}

    /// The bridge's 256-byte configuration header, dword at `register` (a multiple of 4).
    static func bridgeDword(_ register: UInt32) -> UInt32 {
        switch register {
        case 0x00: return UInt32(deviceID) << 16 | UInt32(vendorID)
        case 0x04: return 0                     // command, status
        case 0x08: return classCode << 8        // revision 0
        case 0x0c: return 0                     // header type 0, single function
        default: return 0
        }
    }

    /// The dword the data window shows for the latched address: the bridge at 00:00.0,
    /// all ones (no device) anywhere else or with the enable bit clear.
    static func configDword(address: UInt32) -> UInt32 {
        guard address & 0x8000_0000 != 0 else { return 0xffff_ffff }
        let bus = (address >> 16) & 0xff, devfn = (address >> 8) & 0xff
        guard bus == 0 && devfn == 0 else { return 0xffff_ffff }
        return bridgeDword(address & 0xfc)
    }

    public func read(offset: UInt16, size: Int) -> UInt32 {
        let mask: UInt32 = size >= 4 ? 0xffff_ffff : (1 << (8 * UInt32(size))) - 1
        if offset < 4 {
            // The address register answers only whole, aligned dword reads.
            guard offset == 0 && size == 4 else { return mask }
            return address.withLock { $0 }
        }
        let byte = UInt32(offset - 4)
        guard Int(byte) + size <= 4 else { return mask }
        let dword = Self.configDword(address: address.withLock { $0 })
        return (dword >> (8 * byte)) & mask
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        guard offset == 0 && size == 4 else { return }  // data writes: the bridge is read-only
        address.withLock { $0 = value & 0x80ff_fffc }
    }
}
