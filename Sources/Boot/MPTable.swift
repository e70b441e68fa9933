// Intel MultiProcessor Specification 1.4 table, for kernels built with X86_MPPARSE but
// without ACPI. The floating pointer is at 0x9fc00 (last KiB of base memory, which Linux
// scans); the config table follows it when it fits below 0xa0000 (up to 40 vCPUs),
// otherwise it goes to 0xf0000 in the reserved BIOS area.
import GuestMemory

public enum MPTable {
    public static let floatingPointerSize = 16
    public static let headerSize = 44
    public static let processorEntrySize = 20
    public static let otherEntrySize = 8
    public static let lapicVersion: UInt8 = 0x14
    public static let ioapicVersion: UInt8 = 0x11
    /// CPU signature family 6 and feature flags FPU | APIC, as QEMU/SeaBIOS report.
    public static let cpuSignature: UInt32 = 0x600
    public static let cpuFeatures: UInt32 = 0x201

    /// ISA IRQs with an I/O interrupt entry: 0-15 except 2 (the cascade); IRQ 0 goes to
    /// IOAPIC pin 2 (where KVM routes the PIT), the others to the pin of the same number.
    public static let isaIRQs: [UInt8] = [0, 1] + Array(3...15)

    /// Bytes of the config table for `cpus` vCPUs.
    public static func configSize(cpus: Int) -> Int {
        headerSize + cpus * processorEntrySize + otherEntrySize * (2 + isaIRQs.count + 2)
    }

    /// The largest vCPU count whose config table fits between the floating pointer and 0xa0000.
    public static var maxCPUsInEBDA: Int {
        (Int(X86Layout.vgaHoleStart - X86Layout.mpTable) - floatingPointerSize
            - configSize(cpus: 0)) / processorEntrySize
    }

    /// The config table address for `cpus` vCPUs.
    public static func configAddress(cpus: Int) -> UInt64 {
        cpus <= maxCPUsInEBDA ? X86Layout.mpTable + UInt64(floatingPointerSize) : X86Layout.mpConfigHigh
    }

    public static func config(cpus: Int) -> [UInt8] {
        var w = ByteWriter()
        w.append(ACPI.ascii("PCMP", 4))
        w.append(UInt16(0))                 // length, patched below
        w.append(UInt8(4))                  // spec revision 1.4
        w.append(UInt8(0))                  // checksum
        w.append(ACPI.ascii("SWIFTLET", 8))
        w.append(ACPI.ascii("SWIFTLETVM", 12))
        w.append(UInt32(0))                 // OEM table pointer
        w.append(UInt16(0))                 // OEM table size
        w.append(UInt16(0))                 // entry count, patched below
        w.append(UInt32(X86Layout.lapicAddress))
        w.append(UInt16(0))                 // extended table length
        w.append(UInt8(0))                  // extended table checksum
        w.append(UInt8(0))
        var count = 0
        for i in 0..<cpus {
            w.append([0, UInt8(i), lapicVersion, i == 0 ? 0x3 : 0x1]) // enabled, BSP on 0
            w.append(cpuSignature)
            w.append(cpuFeatures)
            w.append(UInt64(0))
            count += 1
        }
        w.append([1, 0]); w.append(ACPI.ascii("ISA", 6)); count += 1
        w.append([2, ACPI.ioapicID, ioapicVersion, 1]); w.append(UInt32(X86Layout.ioapicAddress)); count += 1
        for irq in isaIRQs {
            // type 3 I/O interrupt, INT, flags 0 (conforms to bus), bus 0, irq, IOAPIC, pin
            w.append([3, 0, 0, 0, 0, irq, ACPI.ioapicID, irq == 0 ? 2 : irq]); count += 1
        }
        w.append([4, 3, 0, 0, 0, 0, 0xff, 0]); count += 1  // ExtINT -> LINT0 of all
        w.append([4, 1, 0, 0, 0, 0, 0xff, 1]); count += 1  // NMI -> LINT1 of all
        w.set(UInt16(w.count), at: 4)
        w.set(UInt16(count), at: 34)
        var b = w.bytes
        b[7] = 0 &- ACPI.checksum(b)
        return b
    }

    public static func floatingPointer(config: UInt64) -> [UInt8] {
        var w = ByteWriter()
        w.append(ACPI.ascii("_MP_", 4))
        w.append(UInt32(config))
        w.append(UInt8(1))                  // length in 16-byte units
        w.append(UInt8(4))                  // spec revision 1.4
        w.append(UInt8(0))                  // checksum
        w.append([0, 0, 0, 0, 0])           // feature bytes: config table present, virtual wire
        var b = w.bytes
        b[10] = 0 &- ACPI.checksum(b)
        return b
    }

    /// Both structures and their addresses. Throws for a vCPU count outside 1...254.
    public static func build(cpus: Int) throws -> [(address: UInt64, bytes: [UInt8])] {
        guard cpus >= 1, cpus <= X86Layout.maxCPUs else { throw BootError.badCPUCount(cpus, max: X86Layout.maxCPUs) }
        let addr = configAddress(cpus: cpus)
        let cfg = config(cpus: cpus)
        let limit = addr == X86Layout.mpConfigHigh ? X86Layout.biosEnd : X86Layout.vgaHoleStart
        guard addr + UInt64(cfg.count) <= limit else { throw BootError.badCPUCount(cpus, max: X86Layout.maxCPUs) }
        return [(X86Layout.mpTable, floatingPointer(config: addr)), (addr, cfg)]
    }
}
