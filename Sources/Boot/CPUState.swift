// 64-bit boot state: GDT, IDT, identity page tables and the initial registers.
import GuestMemory

/// A segment register as KVM wants it (struct kvm_segment), decoded from a GDT entry.
public struct SegmentDescriptor: Equatable, Sendable {
    public var selector: UInt16
    public var base: UInt64
    /// Byte-granular limit (a 4 KiB-granular descriptor limit is scaled: 0xfffff -> 0xffffffff).
    public var limit: UInt32
    public var type: UInt8
    public var present: UInt8
    public var dpl: UInt8
    public var db: UInt8
    public var s: UInt8
    public var l: UInt8
    public var g: UInt8
    public var avl: UInt8

    /// Decodes a legacy 8-byte GDT descriptor.
    public init(gdtEntry e: UInt64, selector: UInt16) {
        self.selector = selector
        base = ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000)
        let rawLimit = UInt32(e & 0xffff) | UInt32((e >> 32) & 0xf_0000)
        g = UInt8((e >> 55) & 1)
        limit = g == 1 ? (rawLimit << 12) | 0xfff : rawLimit
        type = UInt8((e >> 40) & 0xf)
        s = UInt8((e >> 44) & 1)
        dpl = UInt8((e >> 45) & 3)
        present = UInt8((e >> 47) & 1)
        avl = UInt8((e >> 52) & 1)
        l = UInt8((e >> 53) & 1)
        db = UInt8((e >> 54) & 1)
    }
}

public enum BootGDT {
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    /// 64-bit code: P, DPL 0, S, type 0xb (execute/read, accessed), G, L.
    public static let code64: UInt64 = 0x00af_9b00_0000_ffff
    /// Data: P, DPL 0, S, type 0x3 (read/write, accessed), G, D/B.
    public static let data: UInt64 = 0x00cf_9300_0000_ffff
    /// null, null, code64 (0x10), data (0x18).
    public static let entries: [UInt64] = [0, 0, code64, data]
    public static var limit: UInt16 { UInt16(entries.count * 8 - 1) }
    public static var bytes: [UInt8] {
        var w = ByteWriter()
        for e in entries { w.append(e) }
        return w.bytes
    }
}

/// Control register values for 64-bit long mode with paging.
public enum BootControlRegisters {
    /// PE | ET | NE | PG. CD and NW are clear (caches on), unlike KVM's reset value
    /// 0x60000010; NE (native FPU errors) as the KVM layer's LongModeBoot and Linux itself.
    public static let cr0: UInt64 = 0x8000_0031
    /// PAE (required for long mode).
    public static let cr4: UInt64 = 0x20
    /// LME | LMA.
    public static let efer: UInt64 = 0x500
    /// Bit 1 is reserved and always set; interrupts off.
    public static let rflags: UInt64 = 0x2
}

/// Page table entry flags.
public enum PageFlags {
    public static let present: UInt64 = 1 << 0
    public static let writable: UInt64 = 1 << 1
    public static let pageSize: UInt64 = 1 << 7
}

public enum BootPageTables {
    /// (address, page) pairs: PML4 at 0x9000 -> PDPT at 0xa000 -> four PDs at
    /// 0xb000..0xe000 with 2 MiB pages (present | rw | PS) identity-mapping [0, 4 GiB).
    public static func pages() -> [(address: UInt64, bytes: [UInt8])] {
        var pml4 = ByteWriter(size: 4096)
        pml4.set(X86Layout.pdpt | PageFlags.present | PageFlags.writable, at: 0)
        var pdpt = ByteWriter(size: 4096)
        var out: [(address: UInt64, bytes: [UInt8])] = [(X86Layout.pml4, pml4.bytes)]
        var pds: [(address: UInt64, bytes: [UInt8])] = []
        for i in 0..<4 {
            let pdAddr = X86Layout.pageDirectories + UInt64(i) * 0x1000
            pdpt.set(pdAddr | PageFlags.present | PageFlags.writable, at: i * 8)
            var pd = ByteWriter(size: 4096)
            for j in 0..<512 {
                let phys = (UInt64(i) << 30) | (UInt64(j) << 21)
                pd.set(phys | PageFlags.present | PageFlags.writable | PageFlags.pageSize, at: j * 8)
            }
            pds.append((pdAddr, pd.bytes))
        }
        out.append((X86Layout.pdpt, pdpt.bytes))
        return out + pds
    }
}

/// Everything the KVM layer copies into the boot vCPU (kvm_regs / kvm_sregs) to enter
/// the kernel's 64-bit entry point. CS gets `code`; DS, ES, FS, GS and SS get `data`.
/// TR and LDT are left as KVM_GET_SREGS returns them (KVM's reset state is valid).
/// Application processors are started by the guest through INIT/SIPI: they need nothing.
public struct BootCPUState: Equatable, Sendable {
    public var rip: UInt64
    /// Physical address of boot_params (the zero page).
    public var rsi: UInt64
    public var rsp: UInt64
    public var rbp: UInt64
    public var rflags: UInt64
    public var cr0: UInt64
    public var cr3: UInt64
    public var cr4: UInt64
    public var efer: UInt64
    public var gdtBase: UInt64
    public var gdtLimit: UInt16
    public var idtBase: UInt64
    public var idtLimit: UInt16
    public var code: SegmentDescriptor
    public var data: SegmentDescriptor

    public init(entry: UInt64) {
        rip = entry
        rsi = X86Layout.zeroPage
        rsp = X86Layout.bootStackPointer
        rbp = X86Layout.bootStackPointer
        rflags = BootControlRegisters.rflags
        cr0 = BootControlRegisters.cr0
        cr3 = X86Layout.pml4
        cr4 = BootControlRegisters.cr4
        efer = BootControlRegisters.efer
        gdtBase = X86Layout.gdtAddress
        gdtLimit = BootGDT.limit
        idtBase = X86Layout.idtAddress
        idtLimit = 0
        code = SegmentDescriptor(gdtEntry: BootGDT.code64, selector: BootGDT.codeSelector)
        data = SegmentDescriptor(gdtEntry: BootGDT.data, selector: BootGDT.dataSelector)
    }
}

/// Writes the GDT, the (empty) IDT and the page tables into guest memory.
public func writeBootCPUStructures(into memory: GuestMemory) throws {
    try mem {
        try memory.write(BootGDT.bytes, at: X86Layout.gdtAddress)
        try memory.zero(X86Layout.idtAddress, length: 8)
        for p in BootPageTables.pages() { try memory.write(p.bytes, at: p.address) }
    }
}
