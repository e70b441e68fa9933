// ACPI 6.x tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT, DSDT.
// Written at 0xe0000 (RSDP first so the BIOS-area scan finds it; boot_params.acpi_rsdp_addr
// points at it too).
import GuestMemory

/// A virtio-mmio device as the guest sees it: register window and interrupt.
public struct VirtioMMIODeviceDescription: Equatable, Sendable {
    public var address: UInt64
    public var size: UInt64
    public var gsi: UInt32
    /// Level-triggered (the virtio-mmio line follows InterruptStatus) or edge.
    public var levelTriggered: Bool
    public init(address: UInt64, size: UInt64, gsi: UInt32, levelTriggered: Bool = true) {
        self.address = address; self.size = size; self.gsi = gsi; self.levelTriggered = levelTriggered
    }
}

public enum ACPI {
    public static let oemID = "SWIFTL"
    public static let creatorID = "SWFT"
    public static let hypervisorVendor = "SWIFTLET"
    public static let headerSize = 36
    public static let rsdpSize = 36

    // FADT (ACPI 6.5 table 5.9) field offsets.
    public static let fadtLength = 276
    public static let fadtRevision: UInt8 = 6
    public static let fadtMinorRevision: UInt8 = 5
    public static let fadtDSDT = 40
    public static let fadtSCIInt = 46
    public static let fadtIAPCBootArch = 109
    public static let fadtFlags = 112
    public static let fadtResetReg = 116
    public static let fadtResetValue = 128
    public static let fadtMinorVersion = 131
    public static let fadtXDSDT = 140
    public static let fadtSleepControlReg = 244
    public static let fadtSleepStatusReg = 256
    public static let fadtHypervisorVendor = 268

    // FADT flags.
    public static let fadtFlagPowerButton: UInt32 = 1 << 4   // no fixed-feature power button
    public static let fadtFlagSleepButton: UInt32 = 1 << 5   // no fixed-feature sleep button
    public static let fadtFlagResetRegSup: UInt32 = 1 << 10
    public static let fadtFlagHWReduced: UInt32 = 1 << 20
    /// IAPC_BOOT_ARCH: no VGA (bit 2), MSI not supported (bit 3), no ASPM control (bit 4).
    /// 8042 (bit 1) is clear: Linux then skips probing the i8042 (swiftlet only emulates
    /// its reset command). CMOS RTC present (bit 5 "no CMOS RTC" clear): swiftlet has one.
    public static let iapcBootArch: UInt16 = (1 << 2) | (1 << 3) | (1 << 4)

    // MADT.
    public static let madtRevision: UInt8 = 5
    /// MADT flags: 0, no PCAT_COMPAT (no dual 8259 setup is promised; a hardware-reduced
    /// Linux uses no legacy PIC anyway).
    public static let madtFlags: UInt32 = 0
    /// The IOAPIC id (as QEMU and Firecracker; matches KVM's IOAPIC ID register reset value).
    public static let ioapicID: UInt8 = 0

    /// Generic Address Structure for one byte of system I/O space.
    static func ioGAS(_ port: UInt16) -> [UInt8] {
        [1, 8, 0, 1] + AML.le(UInt64(port), 8)
    }

    static func ascii(_ s: String, _ n: Int) -> [UInt8] {
        var a = Array(s.utf8.prefix(n))
        while a.count < n { a.append(0x20) }
        return a
    }

    /// Sum of all bytes mod 256 (a valid table sums to 0).
    public static func checksum<C: Collection>(_ b: C) -> UInt8 where C.Element == UInt8 {
        b.reduce(0) { $0 &+ $1 }
    }

    /// A table: header (with length and checksum filled in) + body.
    static func table(_ sig: String, revision: UInt8, tableID: String, body: [UInt8]) -> [UInt8] {
        var w = ByteWriter()
        w.append(ascii(sig, 4))
        w.append(UInt32(headerSize + body.count))
        w.append(revision)
        w.append(UInt8(0))
        w.append(ascii(oemID, 6))
        w.append(ascii(tableID, 8))
        w.append(UInt32(1))           // OEM revision
        w.append(ascii(creatorID, 4))
        w.append(UInt32(1))           // creator revision
        w.append(body)
        var b = w.bytes
        b[9] = 0 &- checksum(b)
        return b
    }

    public static func rsdp(xsdt: UInt64) -> [UInt8] {
        var w = ByteWriter()
        w.append(ascii("RSD PTR ", 8))
        w.append(UInt8(0))
        w.append(ascii(oemID, 6))
        w.append(UInt8(2))            // revision 2: ACPI 2.0+ with XSDT
        w.append(UInt32(0))           // no RSDT
        w.append(UInt32(rsdpSize))
        w.append(xsdt)
        w.append(UInt8(0))
        w.append([0, 0, 0])
        var b = w.bytes
        b[8] = 0 &- checksum(b[0..<20])
        b[32] = 0 &- checksum(b)
        return b
    }

    public static func xsdt(entries: [UInt64]) -> [UInt8] {
        var w = ByteWriter()
        for e in entries { w.append(e) }
        return table("XSDT", revision: 1, tableID: "SWFTXSDT", body: w.bytes)
    }

    public static func fadt(dsdt: UInt64) -> [UInt8] {
        var w = ByteWriter(size: fadtLength - headerSize)
        let o = -headerSize
        // DSDT (32-bit) stays 0: X_DSDT is set (the spec requires one of them to be 0).
        w.set(UInt16(0), at: fadtSCIInt + o)
        w.set(iapcBootArch, at: fadtIAPCBootArch + o)
        w.set(fadtFlagHWReduced | fadtFlagResetRegSup | fadtFlagPowerButton | fadtFlagSleepButton, at: fadtFlags + o)
        w.set(ioGAS(X86Layout.acpiSleepPort), at: fadtResetReg + o)
        w.set(X86Layout.acpiResetValue, at: fadtResetValue + o)
        w.set(fadtMinorRevision, at: fadtMinorVersion + o)
        w.set(dsdt, at: fadtXDSDT + o)
        w.set(ioGAS(X86Layout.acpiSleepPort), at: fadtSleepControlReg + o)
        w.set(ioGAS(X86Layout.acpiSleepPort), at: fadtSleepStatusReg + o)
        w.set(Array(hypervisorVendor.utf8.prefix(8)), at: fadtHypervisorVendor + o)
        return table("FACP", revision: fadtRevision, tableID: "SWFTFACP", body: w.bytes)
    }

    /// MADT: local APIC at 0xfee00000; one enabled Processor Local APIC per vCPU (UID and
    /// APIC id = index); the IOAPIC (id 0, 0xfec00000, GSI base 0); an Interrupt Source
    /// Override ISA IRQ 0 -> GSI 2 (KVM routes the PIT to IOAPIC pin 2, as on a PC and in
    /// QEMU's tables); a Local APIC NMI on LINT1 for all processors.
    public static func madt(cpus: Int) -> [UInt8] {
        var w = ByteWriter()
        w.append(UInt32(X86Layout.lapicAddress))
        w.append(madtFlags)
        for i in 0..<cpus {
            w.append([0, 8, UInt8(i), UInt8(i)])
            w.append(UInt32(1))       // enabled
        }
        w.append([1, 12, ioapicID, 0])
        w.append(UInt32(X86Layout.ioapicAddress))
        w.append(UInt32(0))           // GSI base
        w.append([2, 10, 0, 0])       // ISO: bus ISA, source IRQ 0
        w.append(UInt32(2))           // GSI 2
        w.append(UInt16(0))           // flags: conforms to the bus (edge, active high)
        w.append([4, 6, 0xff])        // Local APIC NMI, all processors
        w.append(UInt16(0x5))         // active high, edge
        w.append(UInt8(1))            // LINT1
        return table("APIC", revision: madtRevision, tableID: "SWFTAPIC", body: w.bytes)
    }

    /// The DSDT's AML (without the table header).
    public static func dsdtAML(virtio: [VirtioMMIODeviceDescription], serial: Bool, rtc: Bool) -> [UInt8] {
        var devices: [[UInt8]] = []
        if serial {
            devices.append(AML.device("COM1", [
                AML.name("_HID", AML.eisaId("PNP0501")),
                AML.name("_UID", AML.integer(0)),
                AML.name("_CRS", AML.resourceTemplate([
                    AML.io(min: X86Layout.com1Port, max: X86Layout.com1Port, alignment: 1, length: 8),
                    AML.irqNoFlags(Int(X86Layout.com1GSI)),
                ])),
            ]))
        }
        if rtc {
            // As QEMU's mc146818 AML: Linux's rtc_cmos binds through PNP (pnpacpi) to PNP0B00.
            devices.append(AML.device("RTC", [
                AML.name("_HID", AML.eisaId("PNP0B00")),
                AML.name("_CRS", AML.resourceTemplate([
                    AML.io(min: X86Layout.rtcPort, max: X86Layout.rtcPort, alignment: 1, length: 2),
                    AML.irqNoFlags(Int(X86Layout.rtcGSI)),
                ])),
            ]))
        }
        for (i, d) in virtio.enumerated() { devices.append(virtioDevice(index: i, d)) }
        return AML.scope("_SB", devices)
            + AML.name("_S5", AML.package([AML.integer(UInt64(X86Layout.acpiS5SleepType)), AML.integer(0), AML.integer(0), AML.integer(0)]))
    }

    /// Device(VRnn){_HID "LNRO0005", _UID n, _CCA One, _CRS {Memory32Fixed(ReadWrite,
    /// addr, size), Interrupt(ResourceConsumer, Level, ActiveHigh, Exclusive){gsi}}}.
    /// Level, as QEMU microvm (Firecracker uses Edge): swiftlet's irqfds resample, so the
    /// line stays high while InterruptStatus is nonzero. `levelTriggered: false` gives Edge.
    public static func virtioDevice(index i: Int, _ d: VirtioMMIODeviceDescription) -> [UInt8] {
        precondition(i >= 0 && i < 100)
        let name = "VR" + (i < 10 ? "0" : "") + String(i)
        return AML.device(name, [
            AML.name("_HID", AML.string("LNRO0005")),
            AML.name("_UID", AML.integer(UInt64(i))),
            AML.name("_CCA", AML.integer(1)),
            AML.name("_CRS", AML.resourceTemplate([
                AML.memory32Fixed(base: UInt32(d.address), length: UInt32(d.size)),
                AML.interrupt(edge: !d.levelTriggered, activeLow: false, shared: false, [d.gsi]),
            ])),
        ])
    }

    public static func dsdt(virtio: [VirtioMMIODeviceDescription], serial: Bool, rtc: Bool) -> [UInt8] {
        table("DSDT", revision: 2, tableID: "SWFTDSDT", body: dsdtAML(virtio: virtio, serial: serial, rtc: rtc))
    }

    /// All tables and where they go: RSDP at 0xe0000, then XSDT, FADT, MADT, DSDT, each
    /// 16-byte aligned. Everything ends below `X86Layout.mpConfigHigh`.
    public static func build(cpus: Int, virtio: [VirtioMMIODeviceDescription], serial: Bool,
                             rtc: Bool = true) -> [(address: UInt64, bytes: [UInt8])] {
        func align(_ a: UInt64) -> UInt64 { (a + 15) & ~15 }
        let xsdtAddr = align(X86Layout.rsdp + UInt64(rsdpSize))
        let fadtAddr = align(xsdtAddr + UInt64(headerSize + 16))
        let madtBytes = madt(cpus: cpus)
        let madtAddr = align(fadtAddr + UInt64(fadtLength))
        let dsdtAddr = align(madtAddr + UInt64(madtBytes.count))
        let dsdtBytes = dsdt(virtio: virtio, serial: serial, rtc: rtc)
        return [
            (X86Layout.rsdp, rsdp(xsdt: xsdtAddr)),
            (xsdtAddr, xsdt(entries: [fadtAddr, madtAddr])),
            (fadtAddr, fadt(dsdt: dsdtAddr)),
            (madtAddr, madtBytes),
            (dsdtAddr, dsdtBytes),
        ]
    }
}
