// The guest physical address map, ports and interrupt numbers of docs/DESIGN.md, in one
// place so the VMM and the boot code use the same numbers.

public enum X86Layout {
    // MARK: boot structures (all below 1 MiB)
    public static let gdtAddress: UInt64 = 0x500
    /// null, null, code64 (selector 0x10), data (selector 0x18).
    public static let gdtEntries = 4
    public static let idtAddress: UInt64 = 0x520
    public static let zeroPage: UInt64 = 0x7000
    public static let zeroPageSize: UInt64 = 0x1000
    /// Initial stack pointer: the top of the free page between the zero page and the PML4
    /// (16-byte aligned; the kernel switches to its own stack right away).
    public static let bootStackPointer: UInt64 = 0x8ff0
    public static let pml4: UInt64 = 0x9000
    public static let pdpt: UInt64 = 0xa000
    /// Four page directories, 0xb000..0xe000, 2 MiB pages covering [0, 4 GiB).
    public static let pageDirectories: UInt64 = 0xb000
    public static let pageTablesEnd: UInt64 = 0xf000
    public static let cmdline: UInt64 = 0x20000
    /// The command line area is [0x20000, 0x30000): at most 64 KiB including the NUL.
    public static let cmdlineAreaSize: UInt64 = 0x10000
    /// MP floating pointer (and the config table when it fits) in the last KiB of base memory.
    public static let mpTable: UInt64 = 0x9fc00
    /// Where the MP config table goes when it does not fit below 0xa0000 (many vCPUs):
    /// inside the reserved BIOS area, after the ACPI tables.
    public static let mpConfigHigh: UInt64 = 0xf0000
    public static let ebdaStart: UInt64 = 0x9fc00
    public static let vgaHoleStart: UInt64 = 0xa0000
    /// ACPI tables: RSDP at 0xe0000 then XSDT, FADT, MADT, DSDT (below mpConfigHigh).
    public static let acpiStart: UInt64 = 0xe0000
    public static let rsdp: UInt64 = 0xe0000
    public static let biosEnd: UInt64 = 0x100000
    /// The x86 reset vector (F000:FFF0). Linux on hardware-reduced ACPI reboots by default
    /// through EFI, then by jumping here in real mode (reboot=b behaviour); swiftlet puts a
    /// stub here that writes the ACPI reset value, so a plain `reboot` ends the VM.
    public static let resetVector: UInt64 = 0xffff0
    /// Kernels load at or above 1 MiB.
    public static let highMemoryStart: UInt64 = 0x100000

    // MARK: RAM and MMIO
    /// RAM below 4 GiB ends here at the latest; [3 GiB, 4 GiB) is the MMIO hole.
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    public static let mmioHoleEnd: UInt64 = 0x1_0000_0000
    public static let bootMarkerPage: UInt64 = 0xD000_0000
    /// The guest writes this byte to the boot marker page when it has booted.
    public static let bootMarkerValue: UInt8 = 123
    /// The guest exit register (Devices.GuestExitRegister), in the boot marker's page.
    public static let guestExitRegister: UInt64 = 0xD000_0004
    public static let virtioMMIOBase: UInt64 = 0xD000_1000
    public static let virtioMMIOStride: UInt64 = 0x1000
    public static let ioapicAddress: UInt64 = 0xFEC0_0000
    public static let lapicAddress: UInt64 = 0xFEE0_0000
    public static let kvmIdentityMap: UInt64 = 0xFFFB_C000
    public static let kvmTSS: UInt64 = 0xFFFB_D000

    // MARK: ports
    public static let com1Port: UInt16 = 0x3f8
    public static let rtcPort: UInt16 = 0x70
    public static let i8042DataPort: UInt16 = 0x60
    public static let i8042CommandPort: UInt16 = 0x64
    /// ACPI sleep control, sleep status and reset register (one byte, hardware-reduced FADT).
    /// Writes: (5 << 2) | 0x20 = 0x34 poweroff (SLP_TYP 5 | SLP_EN); 0x01 reset;
    /// the guest also writes 0x80 (WAK_STS, "clear wake status") before sleeping: ignore it.
    public static let acpiSleepPort: UInt16 = 0x3c0
    public static let acpiS5SleepType: UInt8 = 5
    public static let acpiPoweroffValue: UInt8 = (5 << 2) | 0x20
    public static let acpiResetValue: UInt8 = 1
    public static let postPort: UInt16 = 0x80

    // MARK: interrupts
    public static let ioapicPins = 24
    public static let com1GSI: UInt32 = 4
    public static let rtcGSI: UInt32 = 8

    /// GSI of virtio-mmio device `index`: 5 + index, skipping 8 (RTC); nil past pin 23.
    public static func virtioGSI(index: Int) -> UInt32? {
        guard index >= 0 else { return nil }
        var g = 5 + index
        if g >= 8 { g += 1 }
        return g < ioapicPins ? UInt32(g) : nil
    }

    /// Maximum number of virtio-mmio devices (GSIs 5..23 without 8).
    public static let maxVirtioDevices = 18

    /// MMIO window of virtio-mmio device `index`.
    public static func virtioMMIOAddress(index: Int) -> UInt64 {
        virtioMMIOBase + UInt64(index) * virtioMMIOStride
    }

    /// Highest vCPU count the boot tables describe (xAPIC ids 0..253; 0xff is broadcast).
    public static let maxCPUs = 254

    /// Guest RAM for `memoryBytes` (rounded down to 4 KiB): [0, min(mem, 3 GiB)) plus
    /// [4 GiB, 4 GiB + rest) when there is more than 3 GiB.
    public static func ramLayout(memoryBytes: UInt64) -> [(base: UInt64, size: UInt64)] {
        let m = memoryBytes & ~0xfff
        guard m > 0 else { return [] }
        let low = min(m, mmioHoleStart)
        var out: [(base: UInt64, size: UInt64)] = [(0, low)]
        if m > low { out.append((mmioHoleEnd, m - low)) }
        return out
    }
}
