// Kernel image parsing: bzImage (Linux boot protocol, Documentation/arch/x86/boot.rst)
// and ELF64 vmlinux. Every offset and size read from the file is checked against the
// file length and against guest RAM before anything is copied.
import GuestMemory

/// Guest RAM as (base, size) ranges, sorted or not.
public typealias RAMLayout = [(base: UInt64, size: UInt64)]

/// Whether [addr, addr+len) lies wholly inside one RAM range (no overflow).
func ramContains(_ ram: RAMLayout, _ addr: UInt64, _ len: UInt64) -> Bool {
    for r in ram where addr >= r.base && addr - r.base <= r.size && len <= r.size - (addr - r.base) {
        return true
    }
    return false
}

func ramEnd(_ ram: RAMLayout) -> UInt64 { ram.map { $0.base &+ $0.size }.max() ?? 0 }

/// One piece of the kernel file copied into guest memory; [address+fileSize,
/// address+memSize) is zeroed (ELF bss).
public struct KernelSegment: Equatable, Sendable {
    public let fileOffset: Int
    public let fileSize: Int
    public let address: UInt64
    public let memSize: UInt64
}

/// The bzImage setup header fields swiftlet uses (offsets are zero page offsets).
public struct SetupHeader: Equatable, Sendable {
    /// The raw header, file bytes [0x1f1, headerEnd), copied into the zero page at 0x1f1.
    public let bytes: [UInt8]
    /// 0x202 + the byte at 0x201 (the end of the setup header, per the jump at 0x200).
    public let headerEnd: Int
    /// setup_sects with 0 read as 4.
    public let setupSects: Int
    public let version: UInt16
    public let loadflags: UInt8
    public let syssize: UInt32
    public let initrdAddrMax: UInt32
    public let kernelAlignment: UInt32
    public let relocatable: Bool
    public let xloadflags: UInt16
    public let cmdlineSize: UInt32
    public let payloadOffset: UInt32
    public let payloadLength: UInt32
    public let prefAddress: UInt64
    public let initSize: UInt32

    // Offsets in the zero page / bzImage file.
    public static let start = 0x1f1
    public static let magicOffset = 0x202
    public static let magic: UInt32 = 0x5372_6448 // "HdrS"
    public static let loadedHigh: UInt8 = 0x01
    public static let keepSegments: UInt8 = 0x40
    public static let canUseHeap: UInt8 = 0x80
    public static let xlfKernel64: UInt16 = 0x01
    public static let xlfCanBeLoadedAbove4G: UInt16 = 0x02
}

public enum KernelFormat: Equatable, Sendable {
    case bzImage(SetupHeader)
    case elf
}

/// A parsed kernel: where it goes, how big it is, where to enter it in 64-bit mode.
public struct KernelImage: Equatable, Sendable {
    public let format: KernelFormat
    public let segments: [KernelSegment]
    /// Physical 64-bit entry point (bzImage: load address + 0x200).
    public let entry: UInt64
    /// Lowest guest address the kernel occupies.
    public let loadAddress: UInt64
    /// First guest address above everything the kernel needs (bzImage: load + init_size),
    /// page aligned. The initrd goes above this.
    public let end: UInt64
    /// Longest command line the kernel accepts, without the NUL.
    public let cmdlineMax: Int
    /// Highest address the initrd may occupy (inclusive, as initrd_addr_max).
    public let initrdAddrMax: UInt64
}

/// The largest ELF program header count accepted (a vmlinux has about 5).
public let maxELFProgramHeaders = 64
/// Linux's x86 COMMAND_LINE_SIZE is 2048 including the NUL: the limit for ELF kernels,
/// which carry no cmdline_size.
public let elfCmdlineMax = 2047

let elfMagic: [UInt8] = [0x7f, 0x45, 0x4c, 0x46]

/// Detects the format and parses. `path` only names the file in errors.
public func parseKernel(_ bytes: [UInt8], ram: RAMLayout, path: String = "kernel") throws -> KernelImage {
    try bytes.withUnsafeBytes { try parseKernel($0, ram: ram, path: path) }
}

/// Detects the format and parses from raw bytes (e.g. a mapped file, without copying it).
public func parseKernel(_ bytes: UnsafeRawBufferPointer, ram: RAMLayout, path: String = "kernel") throws -> KernelImage {
    if bytes.isEmpty { throw BootError.emptyKernel(path) }
    if bytes.count >= 4 && Array(bytes[0..<4]) == elfMagic { return try parseELFKernel(bytes, ram: ram) }
    if bytes.count >= SetupHeader.magicOffset + 4 {
        let m = UInt32(bytes[0x202]) | UInt32(bytes[0x203]) << 8 | UInt32(bytes[0x204]) << 16 | UInt32(bytes[0x205]) << 24
        if m == SetupHeader.magic { return try parseBzImage(bytes, ram: ram) }
        throw BootError.notAKernel(path)
    }
    // Too short for a setup header: a cut bzImage still shows the boot sector signature.
    if bytes.count >= 0x200 && bytes[0x1fe] == 0x55 && bytes[0x1ff] == 0xaa {
        throw BootError.truncatedKernel("\(bytes.count) bytes, ends inside the setup header")
    }
    throw BootError.notAKernel(path)
}

private func rd<T: FixedWidthInteger>(_ b: UnsafeRawBufferPointer, _ off: Int, limit: Int, _: T.Type = T.self) -> T {
    // Fields past the header end (older protocols) read as 0.
    let size = MemoryLayout<T>.size
    guard off >= 0, off + size <= limit, off + size <= b.count else { return 0 }
    var v: T = 0
    for i in 0..<size { v |= T(b[off + i]) << (8 * i) }
    return v
}

public func parseBzImage(_ b: [UInt8], ram: RAMLayout) throws -> KernelImage {
    try b.withUnsafeBytes { try parseBzImage($0, ram: ram) }
}

public func parseBzImage(_ b: UnsafeRawBufferPointer, ram: RAMLayout) throws -> KernelImage {
    let n = b.count
    guard n >= 0x206 else { throw BootError.truncatedKernel("\(n) bytes, ends inside the setup header") }
    guard rd(b, 0x202, limit: n, UInt32.self) == SetupHeader.magic else { throw BootError.notAKernel("kernel") }
    let version: UInt16 = rd(b, 0x206, limit: n)
    if n < 0x208 { throw BootError.truncatedKernel("\(n) bytes, ends inside the setup header") }
    guard version >= 0x0206 else { throw BootError.bootProtocolTooOld(version) }
    guard b[0x200] == 0xeb, b[0x201] < 0x80 else {
        throw BootError.badSetupHeader("no forward short jump at 0x200 to mark the header end")
    }
    let hdrEnd = 0x202 + Int(b[0x201])
    guard hdrEnd <= n else { throw BootError.truncatedKernel("\(n) bytes, ends inside the setup header (which ends at \(hex(hdrEnd)))") }
    guard hdrEnd >= 0x23c else {
        throw BootError.badSetupHeader("header ends at \(hex(hdrEnd)), before cmdline_size which protocol 2.06 has")
    }
    func u8(_ o: Int) -> UInt8 { rd(b, o, limit: hdrEnd) }
    func u16(_ o: Int) -> UInt16 { rd(b, o, limit: hdrEnd) }
    func u32(_ o: Int) -> UInt32 { rd(b, o, limit: hdrEnd) }
    func u64(_ o: Int) -> UInt64 { rd(b, o, limit: hdrEnd) }

    let rawSects = Int(b[0x1f1])
    let setupSects = rawSects == 0 ? 4 : rawSects
    let setupSize = (setupSects + 1) * 512
    let syssize = u32(0x1f4)
    let loadflags = u8(0x211)
    let xloadflags = version >= 0x020c ? u16(0x236) : 0
    let hdr = SetupHeader(
        bytes: Array(b[0x1f1..<hdrEnd]), headerEnd: hdrEnd, setupSects: setupSects, version: version,
        loadflags: loadflags, syssize: syssize, initrdAddrMax: u32(0x22c),
        kernelAlignment: u32(0x230), relocatable: u8(0x234) != 0, xloadflags: xloadflags,
        cmdlineSize: u32(0x238),
        payloadOffset: version >= 0x0208 ? u32(0x248) : 0, payloadLength: version >= 0x0208 ? u32(0x24c) : 0,
        prefAddress: version >= 0x020a ? u64(0x258) : X86Layout.highMemoryStart,
        initSize: version >= 0x020a ? u32(0x260) : 0)

    guard setupSize < n else {
        throw BootError.truncatedKernel("\(n) bytes, but setup_sects \(rawSects) puts the kernel at \(setupSize)")
    }
    let pmSize = UInt64(n - setupSize)
    guard syssize > 0 else { throw BootError.badSetupHeader("syssize is 0") }
    guard UInt64(syssize) * 16 <= pmSize else {
        throw BootError.truncatedKernel("\(n) bytes, the header says \(UInt64(setupSize) + UInt64(syssize) * 16)")
    }
    guard loadflags & SetupHeader.loadedHigh != 0 else {
        throw BootError.badSetupHeader("LOADED_HIGH is clear: a zImage, which swiftlet does not load")
    }
    guard xloadflags & SetupHeader.xlfKernel64 != 0 else { throw BootError.kernelNot64Bit }
    if hdr.payloadLength > 0 {
        guard UInt64(hdr.payloadOffset) + UInt64(hdr.payloadLength) <= pmSize else {
            throw BootError.truncatedKernel("payload \(hex(hdr.payloadOffset))+\(hex(hdr.payloadLength)) runs past the end of the file")
        }
    }

    var load = hdr.prefAddress
    if hdr.relocatable {
        let align = UInt64(hdr.kernelAlignment)
        if align != 0 {
            guard align & (align - 1) == 0, align <= 1 << 30 else {
                throw BootError.badSetupHeader("kernel_alignment \(hex(align)) is not a power of two")
            }
        }
        load = max(load, X86Layout.highMemoryStart)
        if align > 1 {
            guard load <= UInt64.max - align else { throw BootError.badSetupHeader("pref_address \(hex(load)) overflows") }
            load = (load + align - 1) & ~(align - 1)
        }
    } else {
        guard load >= X86Layout.highMemoryStart else {
            throw BootError.badSetupHeader("pref_address \(hex(load)) is below 1 MiB and the kernel is not relocatable")
        }
    }
    let need = max(UInt64(hdr.initSize), pmSize)
    let pageNeed = (need + 0xfff) & ~0xfff
    guard load <= UInt64.max - pageNeed, ramContains(ram, load, pageNeed) else {
        throw BootError.kernelDoesNotFit(address: load, size: pageNeed, ramEnd: ramEnd(ram))
    }
    let initrdMax = hdr.initrdAddrMax == 0 ? 0x37ff_ffff : UInt64(hdr.initrdAddrMax)
    return KernelImage(
        format: .bzImage(hdr),
        segments: [KernelSegment(fileOffset: setupSize, fileSize: Int(pmSize), address: load, memSize: pmSize)],
        entry: load + 0x200, loadAddress: load, end: load + pageNeed,
        cmdlineMax: Int(min(hdr.cmdlineSize, UInt32(X86Layout.cmdlineAreaSize - 1))),
        initrdAddrMax: initrdMax)
}

// MARK: ELF

public enum ELF {
    public static let headerSize = 64
    public static let phdrSize = 56
    public static let classELF64: UInt8 = 2
    public static let dataLittleEndian: UInt8 = 1
    public static let typeExec: UInt16 = 2
    public static let machineX86_64: UInt16 = 62
    public static let ptLoad: UInt32 = 1
    /// Kernel virtual addresses (the -2 GiB kernel text mapping) start here.
    public static let kernelVirtualBase: UInt64 = 0xffff_ffff_8000_0000
}

public func parseELFKernel(_ b: [UInt8], ram: RAMLayout) throws -> KernelImage {
    try b.withUnsafeBytes { try parseELFKernel($0, ram: ram) }
}

/// `fileSize`: the whole file's size when `b` is only its beginning (the headers and
/// program headers must be inside `b`; the segments inside `fileSize`).
public func parseELFKernel(_ b: UnsafeRawBufferPointer, ram: RAMLayout, fileSize: Int? = nil) throws -> KernelImage {
    let n = b.count
    let fileN = max(fileSize ?? n, n)
    guard n >= 4, Array(b[0..<4]) == elfMagic else { throw BootError.notAKernel("kernel") }
    guard n >= 5 else { throw BootError.truncatedKernel("\(n) bytes, ends inside the ELF header") }
    guard b[4] == ELF.classELF64 else { throw BootError.elfWrongClass(b[4]) }
    guard n >= ELF.headerSize else { throw BootError.truncatedKernel("\(n) bytes, ends inside the 64-byte ELF header") }
    guard b[5] == ELF.dataLittleEndian else { throw BootError.elfBadHeader("not little-endian (EI_DATA \(b[5]))") }
    guard b[6] == 1 else { throw BootError.elfBadHeader("EI_VERSION \(b[6]) is not 1") }
    func u16(_ o: Int) -> UInt16 { rd(b, o, limit: n) }
    func u32(_ o: Int) -> UInt32 { rd(b, o, limit: n) }
    func u64(_ o: Int) -> UInt64 { rd(b, o, limit: n) }
    let machine = u16(18)
    guard machine == ELF.machineX86_64 else { throw BootError.elfWrongMachine(machine) }
    let type = u16(16)
    guard type == ELF.typeExec else { throw BootError.elfNotExecutable(type) }
    let eEntry = u64(24)
    let phoff = u64(32)
    let phentsize = Int(u16(54))
    let phnum = Int(u16(56))
    guard phnum > 0 else { throw BootError.elfNoLoadableSegments }
    guard phnum <= maxELFProgramHeaders else { throw BootError.elfTooManySegments(phnum, max: maxELFProgramHeaders) }
    guard phentsize == ELF.phdrSize else { throw BootError.elfBadHeader("e_phentsize \(phentsize), expected 56") }
    let tableSize = UInt64(phnum * phentsize)
    guard phoff <= UInt64(n), tableSize <= UInt64(n) - phoff else {
        throw BootError.truncatedKernel("program headers at \(hex(phoff)) (\(tableSize) bytes) run past the end of the \(n)-byte file")
    }

    var segs: [KernelSegment] = []
    var vaddrs: [UInt64] = []
    var indices: [Int] = []
    for i in 0..<phnum {
        let p = Int(phoff) + i * phentsize
        guard u32(p) == ELF.ptLoad else { continue }
        let off = u64(p + 8), vaddr = u64(p + 16), paddr = u64(p + 24)
        let filesz = u64(p + 32), memsz = u64(p + 40)
        if memsz == 0 && filesz == 0 { continue }
        guard filesz <= memsz else { throw BootError.elfSegmentFileSizeExceedsMemSize(index: i, fileSize: filesz, memSize: memsz) }
        guard off <= UInt64(fileN), filesz <= UInt64(fileN) - off else {
            throw BootError.elfSegmentOutsideFile(index: i, offset: off, size: filesz, fileSize: UInt64(fileN))
        }
        guard paddr >= X86Layout.highMemoryStart else { throw BootError.elfSegmentOverlapsBootArea(index: i, address: paddr) }
        guard paddr <= UInt64.max - memsz, ramContains(ram, paddr, memsz) else {
            throw BootError.elfSegmentOutsideRAM(index: i, address: paddr, size: memsz)
        }
        for (j, s) in segs.enumerated() where paddr < s.address + s.memSize && s.address < paddr + memsz {
            throw BootError.elfSegmentsOverlap(index: i, other: indices[j])
        }
        segs.append(KernelSegment(fileOffset: Int(off), fileSize: Int(filesz), address: paddr, memSize: memsz))
        vaddrs.append(vaddr)
        indices.append(i)
    }
    guard !segs.isEmpty else { throw BootError.elfNoLoadableSegments }

    var entry: UInt64?
    if eEntry >= ELF.kernelVirtualBase {
        for (k, s) in segs.enumerated() where eEntry >= vaddrs[k] && eEntry - vaddrs[k] < s.memSize {
            entry = s.address + (eEntry - vaddrs[k]); break
        }
    } else {
        for s in segs where eEntry >= s.address && eEntry - s.address < s.memSize { entry = eEntry; break }
    }
    guard let entry else { throw BootError.elfEntryOutsideSegments(eEntry) }
    let lo = segs.map(\.address).min()!
    let hi = segs.map { $0.address + $0.memSize }.max()!
    let end = hi > UInt64.max - 0xfff ? hi : (hi + 0xfff) & ~0xfff
    return KernelImage(format: .elf, segments: segs, entry: entry, loadAddress: lo, end: end,
                       cmdlineMax: elfCmdlineMax, initrdAddrMax: 0x7fff_ffff)
}

/// Copies the kernel's segments from `bytes` into guest memory and zeroes ELF bss.
public func loadKernelSegments(_ image: KernelImage, from bytes: [UInt8], into memory: GuestMemory) throws {
    try bytes.withUnsafeBytes { try loadKernelSegments(image, from: $0, into: memory) }
}

public func loadKernelSegments(_ image: KernelImage, from raw: UnsafeRawBufferPointer, into memory: GuestMemory) throws {
    try mem {
        do {
            for s in image.segments {
                guard s.fileOffset >= 0, s.fileSize >= 0, s.fileOffset <= raw.count - s.fileSize else {
                    throw BootError.truncatedKernel("segment at file offset \(s.fileOffset) is past the end")
                }
                try memory.write(UnsafeRawBufferPointer(rebasing: raw[s.fileOffset..<s.fileOffset + s.fileSize]), at: s.address)
                if s.memSize > UInt64(s.fileSize) {
                    try memory.zero(s.address + UInt64(s.fileSize), length: s.memSize - UInt64(s.fileSize))
                }
            }
        }
    }
}
