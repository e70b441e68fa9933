// struct boot_params ("zero page", Documentation/arch/x86/zero-page.rst) and the e820 map.
import GuestMemory

public struct E820Entry: Equatable, Sendable, CustomStringConvertible {
    public let address: UInt64
    public let size: UInt64
    public let type: UInt32
    public init(address: UInt64, size: UInt64, type: UInt32) {
        self.address = address; self.size = size; self.type = type
    }
    public var end: UInt64 { address + size }
    public static let ram: UInt32 = 1
    public static let reserved: UInt32 = 2
    public static let acpi: UInt32 = 3
    public var description: String { "[\(hex(address)), \(hex(end))) type \(type)" }
}

/// The e820 map has at most 128 entries in boot_params; extra reserved ranges are capped
/// well below that.
public let maxExtraReservedRanges = 64

/// Builds the e820 map:
///  - low RAM: [0, 0x9fc00) usable, [0x9fc00, 0xa0000) reserved (EBDA: MP table),
///    [0xe0000, 0x100000) reserved (ACPI tables and the high MP config table; type 2
///    "reserved" rather than 3 "ACPI reclaimable" because the MP config table may share
///    it and Linux keeps the first MiB reserved anyway), [0x100000, low RAM end) usable;
///  - every other RAM range (above 4 GiB) usable;
///  - `reserved` ranges (type 2) carved out of any usable RAM they overlap; reserved
///    ranges outside RAM are listed as they are.
/// The result is sorted, non-overlapping, with adjacent same-type entries merged.
public func buildE820(ram: RAMLayout, reserved extra: [(base: UInt64, size: UInt64)] = []) -> [E820Entry] {
    var usable: [(UInt64, UInt64)] = []  // [start, end)
    for r in ram.sorted(by: { $0.base < $1.base }) where r.size > 0 {
        let end = r.base &+ r.size < r.base ? UInt64.max : r.base + r.size
        if r.base < X86Layout.biosEnd {
            if r.base < X86Layout.ebdaStart { usable.append((r.base, min(end, X86Layout.ebdaStart))) }
            if end > X86Layout.biosEnd { usable.append((X86Layout.biosEnd, end)) }
        } else {
            usable.append((r.base, end))
        }
    }
    var res: [(UInt64, UInt64)] = [
        (X86Layout.ebdaStart, X86Layout.vgaHoleStart),
        (X86Layout.acpiStart, X86Layout.biosEnd),
    ]
    for e in extra where e.size > 0 {
        res.append((e.base, e.base &+ e.size < e.base ? UInt64.max : e.base + e.size))
    }
    // Subtract reserved ranges from usable RAM.
    for (rs, re) in res {
        var next: [(UInt64, UInt64)] = []
        for (us, ue) in usable {
            if re <= us || rs >= ue { next.append((us, ue)); continue }
            if rs > us { next.append((us, rs)) }
            if re < ue { next.append((re, ue)) }
        }
        usable = next
    }
    // Merge overlapping reserved ranges.
    res.sort { $0.0 < $1.0 }
    var mergedRes: [(UInt64, UInt64)] = []
    for r in res {
        if let last = mergedRes.last, r.0 <= last.1 { mergedRes[mergedRes.count - 1].1 = max(last.1, r.1) } else { mergedRes.append(r) }
    }
    var all = usable.map { E820Entry(address: $0.0, size: $0.1 - $0.0, type: E820Entry.ram) }
        + mergedRes.map { E820Entry(address: $0.0, size: $0.1 - $0.0, type: E820Entry.reserved) }
    all.sort { $0.address < $1.address }
    var out: [E820Entry] = []
    for e in all where e.size > 0 {
        if let last = out.last, last.type == e.type, last.end == e.address {
            out[out.count - 1] = E820Entry(address: last.address, size: last.size + e.size, type: e.type)
        } else {
            out.append(e)
        }
    }
    return out
}

/// Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
public enum ZeroPage {
    public static let size = 4096
    public static let acpiRsdpAddr = 0x070
    public static let extRamdiskImage = 0x0c0
    public static let extRamdiskSize = 0x0c4
    public static let extCmdLinePtr = 0x0c8
    public static let e820Entries = 0x1e8
    public static let setupHeader = 0x1f1
    public static let setupSects = 0x1f1
    public static let syssize = 0x1f4
    public static let vidMode = 0x1fa
    public static let bootFlag = 0x1fe
    public static let jump = 0x200
    public static let header = 0x202
    public static let version = 0x206
    public static let typeOfLoader = 0x210
    public static let loadflags = 0x211
    public static let code32Start = 0x214
    public static let ramdiskImage = 0x218
    public static let ramdiskSize = 0x21c
    public static let heapEndPtr = 0x224
    public static let cmdLinePtr = 0x228
    public static let initrdAddrMax = 0x22c
    public static let kernelAlignment = 0x230
    public static let relocatableKernel = 0x234
    public static let xloadflags = 0x236
    public static let cmdlineSize = 0x238
    public static let setupData = 0x250
    public static let prefAddress = 0x258
    public static let initSize = 0x260
    public static let e820Table = 0x2d0
    public static let e820EntrySize = 20
    public static let e820MaxEntries = 128
    /// The setup header must end before edd_mbr_sig_buffer.
    public static let setupHeaderLimit = 0x290

    public static let typeOfLoaderUndefined: UInt8 = 0xff
    public static let heapEnd: UInt16 = 0xfe00

    /// Builds boot_params. `header` is the bzImage setup header (nil for an ELF kernel:
    /// a minimal header with boot_flag, "HdrS" and protocol 2.15 fields is synthesised).
    public static func build(header: SetupHeader?, cmdline: UInt64, cmdlineSize: Int,
                             initrd: (address: UInt64, size: UInt64)?, e820: [E820Entry],
                             rsdp: UInt64) throws -> [UInt8] {
        var w = ByteWriter(size: size)
        if let header {
            let n = min(header.bytes.count, setupHeaderLimit - setupHeader)
            w.set(Array(header.bytes.prefix(n)), at: setupHeader)
            // swiftlet passes no setup_data: whatever the file says there is dropped.
            if header.headerEnd >= setupData + 8 { w.set(UInt64(0), at: setupData) }
        } else {
            w.set(UInt16(0xaa55), at: bootFlag)
            w.set([0xeb, UInt8(0x26c - 0x202)], at: jump)
            w.set(SetupHeader.magic, at: header_)
            w.set(UInt16(0x020f), at: version)
            w.set(UInt32(0x0100_0000), at: kernelAlignment)
            w.set(UInt32(cmdlineSize), at: cmdlineSize_)
            w.set(UInt16(0xffff), at: vidMode)
        }
        w.set(typeOfLoaderUndefined, at: typeOfLoader)
        let lf = w.bytes[loadflags] | SetupHeader.loadedHigh | SetupHeader.canUseHeap
        w.set(lf, at: loadflags)
        w.set(heapEnd, at: heapEndPtr)
        w.set(UInt32(truncatingIfNeeded: cmdline), at: cmdLinePtr)
        w.set(UInt32(truncatingIfNeeded: cmdline >> 32), at: extCmdLinePtr)
        if let initrd {
            w.set(UInt32(truncatingIfNeeded: initrd.address), at: ramdiskImage)
            w.set(UInt32(truncatingIfNeeded: initrd.address >> 32), at: extRamdiskImage)
            w.set(UInt32(truncatingIfNeeded: initrd.size), at: ramdiskSize)
            w.set(UInt32(truncatingIfNeeded: initrd.size >> 32), at: extRamdiskSize)
        } else {
            w.set(UInt32(0), at: ramdiskImage)
            w.set(UInt32(0), at: ramdiskSize)
        }
        guard e820.count <= e820MaxEntries else {
            throw BootError.badReservedRange(base: 0, size: 0, reason: "the e820 map would have \(e820.count) entries, more than 128")
        }
        w.set(UInt8(e820.count), at: e820Entries)
        for (i, e) in e820.enumerated() {
            let o = e820Table + i * e820EntrySize
            w.set(e.address, at: o)
            w.set(e.size, at: o + 8)
            w.set(e.type, at: o + 16)
        }
        w.set(rsdp, at: acpiRsdpAddr)
        return w.bytes
    }
    private static let header_ = 0x202
    private static let cmdlineSize_ = 0x238
}
