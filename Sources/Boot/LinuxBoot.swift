// The top-level entry point: load a Linux kernel (+ initrd) and build every boot
// structure in guest memory; return the registers for the boot vCPU.
import GuestMemory
import Glibc

public struct LinuxBootConfig: Sendable {
    public var kernelPath: String
    public var initrdPath: String?
    public var cmdline: String
    public var cpus: Int
    public var virtioDevices: [VirtioMMIODeviceDescription]
    /// Extra guest ranges (base, size) marked reserved in e820 and kept free of the initrd.
    public var extraReserved: [(base: UInt64, size: UInt64)]
    /// Describe COM1 (0x3f8, IRQ 4) in the DSDT.
    public var serial: Bool
    /// Describe the CMOS RTC (0x70, IRQ 8) in the DSDT.
    public var rtc: Bool
    /// For a bzImage whose payload swiftlet can unpack (LZ4 legacy frame, or an
    /// uncompressed ELF): decompress it here and enter the vmlinux's 64-bit entry
    /// (startup_64) directly, as with an ELF vmlinux, instead of running the kernel's own
    /// decompressor in the guest. The guest kernel then runs at its link address (no
    /// KASLR). Off unless the caller asks: this type describes the boot, and the kernel's
    /// own decompressor is the boot protocol's default; swiftlet's machine turns it on
    /// (MachineConfig.decompressKernel) together with the kernel cache.
    public var decompressKernel: Bool = false
    /// With decompressKernel: a directory for the unpacked-kernel cache (KernelCache), or
    /// nil for none. A hit reads the vmlinux's segments from there instead of unpacking.
    public var kernelCacheDir: String? = nil

    public init(kernelPath: String, initrdPath: String? = nil, cmdline: String = "", cpus: Int = 1,
                virtioDevices: [VirtioMMIODeviceDescription] = [],
                extraReserved: [(base: UInt64, size: UInt64)] = [], serial: Bool = true, rtc: Bool = true) {
        self.kernelPath = kernelPath; self.initrdPath = initrdPath; self.cmdline = cmdline
        self.cpus = cpus; self.virtioDevices = virtioDevices; self.extraReserved = extraReserved
        self.serial = serial; self.rtc = rtc
    }
}

/// What `loadLinuxDetailed` did, for logging and tests.
public struct LinuxBootInfo: Sendable {
    public let cpu: BootCPUState
    public let kernel: KernelImage
    public let initrd: (address: UInt64, size: UInt64)?
    public let e820: [E820Entry]
}

/// Loads the kernel and initrd and writes the command line, zero page, GDT/IDT, page
/// tables, ACPI and MP tables. Returns the boot vCPU's registers.
public func loadLinux(_ config: LinuxBootConfig, into memory: GuestMemory) throws -> BootCPUState {
    try loadLinuxDetailed(config, into: memory).cpu
}

public func loadLinuxDetailed(_ config: LinuxBootConfig, into memory: GuestMemory) throws -> LinuxBootInfo {
    let ram: RAMLayout = memory.regions.map { (base: $0.guestBase, size: $0.size) }
    try validateMachine(config, ram: ram)

    let file = try mapKernelFile(config.kernelPath)
    var kernel = try parseKernel(file.bytes, ram: ram, path: config.kernelPath)
    // With decompressKernel the unpacker writes the vmlinux's segments into guest memory
    // itself (nil: not a payload swiftlet unpacks, the bzImage goes in whole).
    var segmentsLoaded = false
    if config.decompressKernel, case let .bzImage(h) = kernel.format {
        if let dir = config.kernelCacheDir,
           let cached = KernelCache.load(dir: dir, key: file.identity, kernel: kernel, header: h, into: memory) {
            segmentsLoaded = true
            kernel = cached
        } else {
            file.prefetch()
            if let vmlinux = try unpackBzImagePayload(file.bytes, kernel: kernel, header: h, ram: ram, into: memory) {
                segmentsLoaded = true
                kernel = vmlinux
                if let dir = config.kernelCacheDir {
                    KernelCache.store(dir: dir, key: file.identity, image: vmlinux, memory: memory)
                }
            }
        }
    }
    for r in config.extraReserved where r.base < kernel.end && kernel.loadAddress < r.base + r.size {
        throw BootError.badReservedRange(base: r.base, size: r.size, reason: "it overlaps the kernel at \(hex(kernel.loadAddress))..\(hex(kernel.end))")
    }
    let cmdline = try checkCmdline(config.cmdline, max: kernel.cmdlineMax)
    let e820 = buildE820(ram: ram, reserved: config.extraReserved)

    // initrd: size first, then place, then read straight into guest memory.
    var initrd: (address: UInt64, size: UInt64)?
    if let path = config.initrdPath {
        let f: InputFile
        do { f = try InputFile(path: path) } catch let e as InputFile.Failure {
            switch e {
            case .notFound: throw BootError.initrdNotFound(path)
            case let .unreadable(n): throw BootError.initrdUnreadable(path, errno: n)
            }
        }
        if f.size > 0 {
            let addr = try placeInitrd(size: f.size, kernelEnd: kernel.end, addrMax: kernel.initrdAddrMax, e820: e820)
            let dst = try mem { try memory.pointer(addr, length: f.size) }
            do { try f.read(into: dst, count: Int(f.size)) } catch let e as InputFile.Failure {
                if case let .unreadable(n) = e { throw BootError.initrdUnreadable(path, errno: n) }
                throw BootError.initrdNotFound(path)
            }
            initrd = (addr, f.size)
        }
    }

    if !segmentsLoaded {
        file.prefetch()
        try loadKernelSegments(kernel, from: file.bytes, into: memory)
    }
    let header: SetupHeader? = { if case let .bzImage(h) = kernel.format { return h } else { return nil } }()
    try writeBootStructures(into: memory, header: header, cmdline: cmdline, cmdlineMax: kernel.cmdlineMax,
                            initrd: initrd, e820: e820, config: config)
    return LinuxBootInfo(cpu: BootCPUState(entry: kernel.entry), kernel: kernel, initrd: initrd, e820: e820)
}

/// The vmlinux inside a bzImage, when swiftlet can unpack it: an LZ4 legacy frame
/// (CONFIG_KERNEL_LZ4) or an uncompressed ELF (CONFIG_KERNEL_UNCOMPRESSED). Returns nil
/// for other compressions (gzip, xz, zstd, ...): the guest then decompresses itself.
/// The result keeps the bzImage's setup header (for the zero page) and takes the ELF's
/// segments, entry and end. A payload that claims LZ4 or ELF but is corrupt is an error.
/// The vmlinux's segments are written into guest memory (ELF bss zeroed): an LZ4 payload
/// with the kernel's size trailer block by block (`loadLZ4Vmlinux`), anything else from
/// the whole unpacked vmlinux.
public func unpackBzImagePayload(_ file: UnsafeRawBufferPointer, kernel: KernelImage, header h: SetupHeader,
                                 ram: RAMLayout, into memory: GuestMemory) throws -> KernelImage? {
    guard h.payloadLength >= 4, let pm = kernel.segments.first else { return nil }
    let start = pm.fileOffset + Int(h.payloadOffset)
    let end = start + Int(h.payloadLength)
    guard start >= 0, end <= file.count else { return nil }  // parseBzImage checked this
    let payload = UnsafeRawBufferPointer(rebasing: file[start..<end])
    func keepingHeader(_ elf: KernelImage) -> KernelImage {
        KernelImage(format: .bzImage(h), segments: elf.segments, entry: elf.entry, loadAddress: elf.loadAddress,
                    end: elf.end, cmdlineMax: kernel.cmdlineMax, initrdAddrMax: kernel.initrdAddrMax)
    }
    let bytes: [UInt8]
    if LZ4.isLegacyFrame(payload) {
        // Limit: guest RAM (the vmlinux must fit in it) and 1 GiB.
        let limit = Int(min(ram.map(\.size).reduce(0, +), 1 << 30))
        do {
            let frame = try LZ4.parseLegacyFrame(payload)
            if let total = frame.trailer {
                return keepingHeader(try loadLZ4Vmlinux(payload, frame: frame, size: total, limit: limit,
                                                        ram: ram, into: memory))
            }
            bytes = try LZ4.decompressLegacy(payload, limit: limit)
        } catch let e as LZ4Error {
            throw BootError.badPayload("\(e)")
        }
    } else if payload.starts(with: elfMagic) {
        bytes = Array(payload)
    } else {
        return nil
    }
    let elf: KernelImage
    do { elf = try parseELFKernel(bytes, ram: ram) } catch let e as BootError {
        throw BootError.badPayload("the unpacked vmlinux: \(e)")
    }
    try loadKernelSegments(elf, from: bytes, into: memory)
    return keepingHeader(elf)
}

/// Unpacks an LZ4 vmlinux of `size` bytes (the kernel's trailer) block by block straight
/// into its segments in guest memory, never holding the whole vmlinux (50-odd MiB for
/// Debian's): a block whose output lies inside one segment is decoded in place; the
/// others (the first, with the ELF headers, and those across a segment's edge) go
/// through one 8 MiB scratch buffer and only their segment bytes are copied. ELF bss is
/// zeroed last. Returns the ELF's image.
func loadLZ4Vmlinux(_ payload: UnsafeRawBufferPointer, frame: LZ4.LegacyFrame, size total: Int, limit: Int,
                    ram: RAMLayout, into memory: GuestMemory) throws -> KernelImage {
    let blockSize = LZ4.legacyBlockSize
    guard total <= limit else { throw LZ4Error.outputTooLarge(limit: limit) }
    guard let first = frame.blocks.first, total > 0 else { throw LZ4Error.blockCount(blocks: frame.blocks.count, trailer: total) }
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: min(blockSize, total), alignment: 16)
    defer { scratch.deallocate() }
    var off = try LZ4.decodeLegacyBlock(payload, first, into: scratch)
    let elf: KernelImage
    do {
        elf = try parseELFKernel(UnsafeRawBufferPointer(rebasing: scratch[0..<off]), ram: ram, fileSize: total)
    } catch let e as BootError {
        throw BootError.badPayload("the unpacked vmlinux: \(e)")
    }
    // Copies the segment bytes among `bytes`, the vmlinux's bytes from file offset `at`.
    func scatter(_ bytes: UnsafeRawBufferPointer, at: Int) throws {
        for s in elf.segments {
            let lo = max(at, s.fileOffset), hi = min(at + bytes.count, s.fileOffset + s.fileSize)
            if lo < hi {
                try memory.write(UnsafeRawBufferPointer(rebasing: bytes[(lo - at)..<(hi - at)]),
                                 at: s.address + UInt64(lo - s.fileOffset))
            }
        }
    }
    try mem {
        try scatter(UnsafeRawBufferPointer(rebasing: scratch[0..<off]), at: 0)
        for block in frame.blocks.dropFirst() {
            let room = min(blockSize, total - off)
            if room > 0,
               let s = elf.segments.first(where: { off >= $0.fileOffset && off + room <= $0.fileOffset + $0.fileSize }) {
                let dst = try memory.pointer(s.address + UInt64(off - s.fileOffset), length: UInt64(room))
                off += try LZ4.decodeLegacyBlock(payload, block, into: UnsafeMutableRawBufferPointer(start: dst, count: room))
            } else {
                let k = try LZ4.decodeLegacyBlock(payload, block, into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<room]))
                try scatter(UnsafeRawBufferPointer(rebasing: scratch[0..<k]), at: off)
                off += k
            }
        }
        guard off == total else { throw LZ4Error.sizeMismatch(trailer: total, produced: off) }
        for s in elf.segments where s.memSize > UInt64(s.fileSize) {
            try memory.zero(s.address + UInt64(s.fileSize), length: s.memSize - UInt64(s.fileSize))
        }
    }
    return elf
}

/// Writes everything except the kernel and initrd: GDT/IDT, page tables, command line,
/// zero page, ACPI tables, MP table.
public func writeBootStructures(into memory: GuestMemory, header: SetupHeader?, cmdline: [UInt8], cmdlineMax: Int,
                                initrd: (address: UInt64, size: UInt64)?, e820: [E820Entry],
                                config: LinuxBootConfig) throws {
    let acpi = ACPI.build(cpus: config.cpus, virtio: config.virtioDevices, serial: config.serial, rtc: config.rtc)
    let mp = try MPTable.build(cpus: config.cpus)
    let zp = try ZeroPage.build(header: header, cmdline: X86Layout.cmdline, cmdlineSize: cmdlineMax,
                                initrd: initrd, e820: e820, rsdp: X86Layout.rsdp)
    try writeBootCPUStructures(into: memory)
    try mem {
        try memory.zero(X86Layout.cmdline, length: X86Layout.cmdlineAreaSize)
        try memory.write(cmdline + [0], at: X86Layout.cmdline)
        try memory.write(zp, at: X86Layout.zeroPage)
        try memory.zero(X86Layout.acpiStart, length: X86Layout.biosEnd - X86Layout.acpiStart)
        for t in acpi { try memory.write(t.bytes, at: t.address) }
        try memory.write(resetVectorStub, at: X86Layout.resetVector)
        try memory.zero(X86Layout.mpTable, length: X86Layout.vgaHoleStart - X86Layout.mpTable)
        for t in mp { try memory.write(t.bytes, at: t.address) }
    }
}

/// Real-mode code at the reset vector: `mov dx, 0x3c0; mov al, 1; out dx, al; hlt; jmp $-1`
/// (the ACPI reset register, see `X86Layout.acpiSleepPort`).
public let resetVectorStub: [UInt8] = [0xBA, UInt8(X86Layout.acpiSleepPort & 0xff), UInt8(X86Layout.acpiSleepPort >> 8),
                                       0xB0, X86Layout.acpiResetValue, 0xEE, 0xF4, 0xEB, 0xFD]

/// The command line as bytes, checked: no NUL, at most `max` bytes (and the 64 KiB area).
public func checkCmdline(_ s: String, max: Int) throws -> [UInt8] {
    let b = Array(s.utf8)
    if b.contains(0) { throw BootError.cmdlineContainsNUL }
    let limit = min(max, Int(X86Layout.cmdlineAreaSize) - 1)
    guard b.count <= limit else { throw BootError.cmdlineTooLong(length: b.count, max: limit) }
    return b
}

/// The initrd address: page aligned, as high as possible inside usable e820 RAM, above
/// `kernelEnd`, below min(addrMax + 1, 3 GiB). Throws `.initrdTooLarge` naming the
/// largest space there is.
public func placeInitrd(size: UInt64, kernelEnd: UInt64, addrMax: UInt64, e820: [E820Entry]) throws -> UInt64 {
    let limit = min(addrMax == UInt64.max ? addrMax : addrMax + 1, X86Layout.mmioHoleStart)
    var best: UInt64?
    var available: UInt64 = 0
    for e in e820 where e.type == E820Entry.ram {
        let lo = (max(e.address, kernelEnd) + 0xfff) & ~0xfff
        let hi = min(e.end, limit) & ~0xfff
        guard hi > lo else { continue }
        available = max(available, hi - lo)
        if size <= hi - lo {
            let a = (hi - size) & ~0xfff
            if a >= lo, best.map({ a > $0 }) ?? true { best = a }
        }
    }
    guard let best else { throw BootError.initrdTooLarge(size: size, available: available) }
    return best
}

func validateMachine(_ c: LinuxBootConfig, ram: RAMLayout) throws {
    guard c.cpus >= 1, c.cpus <= X86Layout.maxCPUs else { throw BootError.badCPUCount(c.cpus, max: X86Layout.maxCPUs) }
    guard ramContains(ram, 0, X86Layout.biosEnd) else {
        throw BootError.notEnoughMemory(needed: X86Layout.biosEnd, have: ram.reduce(0) { $0 &+ $1.size })
    }
    guard c.virtioDevices.count <= X86Layout.maxVirtioDevices else {
        throw BootError.badDevice("\(c.virtioDevices.count) devices, at most \(X86Layout.maxVirtioDevices)")
    }
    var gsis: Set<UInt32> = []
    for (i, d) in c.virtioDevices.enumerated() {
        guard d.size > 0, d.address <= X86Layout.mmioHoleEnd, d.size <= X86Layout.mmioHoleEnd - d.address else {
            throw BootError.badDevice("device \(i) window \(hex(d.address))+\(hex(d.size)) is empty or not below 4 GiB")
        }
        for r in ram where d.address < r.base &+ r.size && r.base < d.address + d.size {
            throw BootError.badDevice("device \(i) window \(hex(d.address)) overlaps guest RAM")
        }
        for (j, o) in c.virtioDevices.enumerated() where j < i && d.address < o.address + o.size && o.address < d.address + d.size {
            throw BootError.badDevice("device \(i) window overlaps device \(j)")
        }
        guard d.gsi < UInt32(X86Layout.ioapicPins), d.gsi != 0, d.gsi != 2 else {
            throw BootError.badDevice("device \(i) GSI \(d.gsi) is not a free IOAPIC pin (1, 3..23)")
        }
        if (c.serial && d.gsi == X86Layout.com1GSI) || (c.rtc && d.gsi == X86Layout.rtcGSI) || gsis.contains(d.gsi) {
            throw BootError.badDevice("device \(i) GSI \(d.gsi) is already used")
        }
        gsis.insert(d.gsi)
    }
    guard c.extraReserved.count <= maxExtraReservedRanges else {
        throw BootError.badReservedRange(base: 0, size: 0, reason: "more than \(maxExtraReservedRanges) ranges")
    }
    for r in c.extraReserved {
        guard r.size > 0, r.base <= UInt64.max - r.size else {
            throw BootError.badReservedRange(base: r.base, size: r.size, reason: "empty or wraps around")
        }
    }
}
