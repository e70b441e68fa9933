import XCTest
import Glibc
@testable import Boot
@testable import GuestMemory

final class LinuxBootTests: XCTestCase {
    func testLoadRealKernelEndToEnd() throws {
        let (path, k) = try requireKernel()
        let m = try makeMemory(256 * MiB)
        let initrdBytes = (0..<(3 * 4096 + 123)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let initrd = tempFile(initrdBytes, name: "initrd")
        defer { unlink(initrd) }
        let virtio = [VirtioMMIODeviceDescription(address: 0xd000_1000, size: 0x1000, gsi: 5)]
        let cfg = LinuxBootConfig(kernelPath: path, initrdPath: initrd, cmdline: "console=ttyS0 reboot=k panic=-1",
                                  cpus: 2, virtioDevices: virtio, extraReserved: [(0x800_0000, 0x1000)])
        XCTAssertFalse(cfg.decompressKernel, "the library's default: the guest decompresses, the bzImage goes in whole (swiftlet's CLI turns unpacking on)")
        let info = try loadLinuxDetailed(cfg, into: m)
        guard case let .bzImage(h) = info.kernel.format else { return XCTFail() }
        XCTAssertEqual(info.cpu.rip, info.kernel.loadAddress + 0x200)
        XCTAssertEqual(info.cpu, BootCPUState(entry: info.kernel.entry))

        // Kernel bytes in place.
        let seg = info.kernel.segments[0]
        XCTAssertEqual(try m.readBytes(at: seg.address, count: 4096), Array(k[seg.fileOffset..<seg.fileOffset + 4096]))
        XCTAssertEqual(try m.readBytes(at: seg.address + UInt64(seg.fileSize) - 64, count: 64), Array(k.suffix(64)))

        // initrd: page aligned, top of RAM, above the kernel, contents.
        let (ia, isz) = try XCTUnwrap(info.initrd)
        XCTAssertEqual(isz, UInt64(initrdBytes.count))
        XCTAssertEqual(ia % 4096, 0)
        XCTAssertGreaterThanOrEqual(ia, info.kernel.end)
        XCTAssertLessThanOrEqual(ia + isz, 256 * MiB)
        XCTAssertGreaterThan(ia + isz, 256 * MiB - 4096)
        XCTAssertEqual(try m.readBytes(at: ia, count: initrdBytes.count), initrdBytes)

        // Reset vector stub (a plain `reboot` on HW-reduced ACPI ends up there), in a
        // range e820 reserves: mov dx,0x3c0; mov al,1; out dx,al; hlt; jmp $-1.
        XCTAssertEqual(try m.readBytes(at: 0xffff0, count: 9), [0xBA, 0xC0, 0x03, 0xB0, 0x01, 0xEE, 0xF4, 0xEB, 0xFD])
        XCTAssertTrue(info.e820.contains { $0.type != E820Entry.ram && $0.address <= 0xffff0 && $0.end >= 0x100000 })

        // Zero page.
        let zp = try m.readBytes(at: 0x7000, count: 4096)
        XCTAssertEqual(Array(zp[0x1f1..<0x210]), Array(h.bytes[0..<(0x210 - 0x1f1)]))
        XCTAssertEqual(zp[0x210], 0xff)
        XCTAssertEqual(zp[0x211] & 0x81, 0x81)
        XCTAssertEqual(le(zp, 0x224, UInt16.self), 0xfe00)
        XCTAssertEqual(le(zp, 0x228, UInt32.self), 0x20000)
        XCTAssertEqual(le(zp, 0x218, UInt32.self), UInt32(ia))
        XCTAssertEqual(le(zp, 0x21c, UInt32.self), UInt32(isz))
        XCTAssertEqual(le(zp, 0x070, UInt64.self), 0xe0000)
        XCTAssertEqual(Int(zp[0x1e8]), info.e820.count)
        XCTAssertTrue(info.e820.contains(E820Entry(address: 0x800_0000, size: 0x1000, type: 2)))

        // Command line.
        let cl = try m.readBytes(at: 0x20000, count: 40)
        XCTAssertEqual(String(decoding: cl.prefix { $0 != 0 }, as: UTF8.self), "console=ttyS0 reboot=k panic=-1")

        // GDT, page tables, ACPI, MP.
        XCTAssertEqual(try m.readBytes(at: 0x500, count: 32), BootGDT.bytes)
        XCTAssertEqual(try m.load(UInt64.self, at: 0x9000), 0xa003)
        XCTAssertEqual(try m.readBytes(at: 0xe0000, count: 8), Array("RSD PTR ".utf8))
        XCTAssertEqual(try m.readBytes(at: 0x9fc00, count: 4), Array("_MP_".utf8))
    }

    /// --kernel-decompress: swiftlet unpacks Debian's LZ4 payload and enters the vmlinux at
    /// startup_64 (0x1000000); every PT_LOAD segment is in place, the zero page still
    /// carries the bzImage's setup header, and the initrd sits above the vmlinux.
    func testRealKernelUnpackedBySwiftlet() throws {
        let (path, k) = try requireKernel()
        let m = try makeMemory(256 * MiB)
        let initrd = tempFile([7, 7, 7], name: "initrd")
        defer { unlink(initrd) }
        var cfg = LinuxBootConfig(kernelPath: path, initrdPath: initrd, cmdline: "console=ttyS0")
        cfg.decompressKernel = true
        let info = try loadLinuxDetailed(cfg, into: m)
        guard case let .bzImage(h) = info.kernel.format else { return XCTFail("the setup header must be kept") }
        XCTAssertEqual(info.cpu.rip, 0x100_0000)
        let start = (h.setupSects + 1) * 512 + Int(h.payloadOffset)
        let vmlinux = try LZ4.decompressLegacy(Array(k[start..<start + Int(h.payloadLength)]), limit: 256 << 20)
        let elf = try parseELFKernel(vmlinux, ram: [(0, 256 * MiB)])
        XCTAssertEqual(info.kernel.segments, elf.segments)
        XCTAssertGreaterThanOrEqual(elf.segments.count, 3)
        // Every byte of every segment: the unpacker decodes some 8 MiB blocks in place and
        // scatters the others (the first, and those across a segment's edge).
        for s in elf.segments {
            XCTAssertTrue(try m.readBytes(at: s.address, count: s.fileSize) == Array(vmlinux[s.fileOffset..<s.fileOffset + s.fileSize]),
                          "segment at \(s.address) differs from the vmlinux")
            if s.memSize > UInt64(s.fileSize) {
                XCTAssertTrue(try m.readBytes(at: s.address + UInt64(s.fileSize), count: Int(s.memSize) - s.fileSize).allSatisfy { $0 == 0 })
            }
        }
        let zp = try m.readBytes(at: 0x7000, count: 4096)
        XCTAssertEqual(Array(zp[0x1f1..<0x210]), Array(h.bytes[0..<(0x210 - 0x1f1)]))
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(info.initrd).address, elf.end)
    }

    /// With --kernel-decompress, a payload that says LZ4 but is corrupt is one clear
    /// error; without it the same file goes to the guest whole.
    func testCorruptLZ4PayloadIsAnError() throws {
        var (_, k) = try requireKernel()
        let img = try parseBzImage(k, ram: [(0, 1 << 30)])
        guard case let .bzImage(h) = img.format else { return XCTFail() }
        let start = img.segments[0].fileOffset + Int(h.payloadOffset)
        for i in 0..<64 { k[start + 8 + i] = 0xff }  // the first block's first bytes
        let bad = tempFile(k, name: "bad-bz")
        defer { unlink(bad) }
        let m = try makeMemory(256 * MiB)
        var cfg = LinuxBootConfig(kernelPath: bad)
        cfg.decompressKernel = true
        assertThrowsBoot(try loadLinux(cfg, into: m)) {
            if case .badPayload = $0 { return "\($0)".contains("--no-kernel-decompress") }
            return false
        }
        XCTAssertEqual(try loadLinux(LinuxBootConfig(kernelPath: bad), into: m).rip, img.loadAddress + 0x200)
    }

    /// The unpacker writes most blocks straight into guest memory: a corrupt block in the
    /// middle, a trailer that claims more or fewer bytes than the blocks give, and a block
    /// size past the payload are each one clear error, never a write outside guest RAM.
    func testCorruptLZ4PayloadInPlaceBlocks() throws {
        let (_, k0) = try requireKernel()
        let img = try parseBzImage(k0, ram: [(0, 1 << 30)])
        guard case let .bzImage(h) = img.format else { return XCTFail() }
        let start = img.segments[0].fileOffset + Int(h.payloadOffset)
        let end = start + Int(h.payloadLength)
        let frame = try k0.withUnsafeBytes { try LZ4.parseLegacyFrame(UnsafeRawBufferPointer(rebasing: $0[start..<end])) }
        XCTAssertGreaterThanOrEqual(frame.blocks.count, 4)
        let mid = start + frame.blocks[2].start
        func le32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24 }
        func put32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
        var cases: [(String, [UInt8])] = []
        var k = k0
        for i in 0..<256 { k[mid + 100 + i] = 0xff }
        cases.append(("corrupt middle block", k))
        k = k0; put32(&k, end - 4, le32(k0, end - 4) + 1)
        cases.append(("trailer one byte too many", k))
        k = k0; put32(&k, end - 4, le32(k0, end - 4) - 1)
        cases.append(("trailer one byte too few", k))
        k = k0; put32(&k, mid - 4, UInt32(LZ4.maxCompressedBlock))
        cases.append(("block size past the payload", k))
        let m = try makeMemory(256 * MiB)
        for (what, bytes) in cases {
            let bad = tempFile(bytes, name: "bad-bz")
            defer { unlink(bad) }
            var cfg = LinuxBootConfig(kernelPath: bad)
            cfg.decompressKernel = true
            assertThrowsBoot(try loadLinux(cfg, into: m), what) {
                if case .badPayload = $0 { return true }
                return false
            }
        }
    }

    /// Random damage anywhere in the payload: the unpack either succeeds (a changed
    /// literal is still valid LZ4) or fails with one badPayload error, and the guest
    /// memory around the kernel (below its load address, above its end) stays untouched.
    func testRandomlyDamagedLZ4PayloadNeverEscapes() throws {
        let (_, k0) = try requireKernel()
        let img = try parseBzImage(k0, ram: [(0, 1 << 30)])
        guard case let .bzImage(h) = img.format else { return XCTFail() }
        let start = img.segments[0].fileOffset + Int(h.payloadOffset)
        let len = Int(h.payloadLength)
        var rng = SystemRandomNumberGenerator()
        let m = try makeMemory(256 * MiB)
        let canary = [UInt8](repeating: 0xa5, count: 4096)
        for round in 0..<12 {
            var k = k0
            for _ in 0..<(1 + round % 4) {
                let at = start + Int.random(in: 0..<len, using: &rng)
                k[at] = UInt8.random(in: 0...255, using: &rng)
            }
            let bad = tempFile(k, name: "dmg-bz")
            defer { unlink(bad) }
            var cfg = LinuxBootConfig(kernelPath: bad)
            cfg.decompressKernel = true
            try m.write(canary, at: 0xf0_0000)              // just below the 16 MiB load address
            try m.write(canary, at: 200 * UInt64(MiB))      // well above the vmlinux's end
            do { _ = try loadLinux(cfg, into: m) } catch let e as BootError {
                guard case .badPayload = e else { return XCTFail("round \(round): unexpected error \(e)") }
            }
            XCTAssertEqual(try m.readBytes(at: 0xf0_0000, count: 4096), canary, "round \(round)")
            XCTAssertEqual(try m.readBytes(at: 200 * UInt64(MiB), count: 4096), canary, "round \(round)")
        }
    }

    func testInitrdTooLarge() throws {
        let (path, _) = try requireKernel()
        let m = try makeMemory(128 * MiB)
        // A sparse 100 MiB file: kernel ends near 68 MiB, so only ~60 MiB are free.
        let big = tempFile([], name: "bigrd")
        defer { unlink(big) }
        XCTAssertEqual(truncate(big, off_t(100 * MiB)), 0)
        assertThrowsBoot(try loadLinux(LinuxBootConfig(kernelPath: path, initrdPath: big), into: m)) { e in
            guard case let .initrdTooLarge(size, available) = e else { return false }
            return size == 100 * MiB && available < 64 * MiB && available > 32 * MiB && e.description.contains("MiB")
        }
    }

    func testPlaceInitrd() throws {
        let e820 = buildE820(ram: ramOf(6 * GiB), reserved: [(0xbff0_0000, 0x10_0000)])
        // Below initrd_addr_max (0x7fffffff): top at 2 GiB.
        XCTAssertEqual(try placeInitrd(size: 0x1000, kernelEnd: 0x400_0000, addrMax: 0x7fff_ffff, e820: e820), 0x7fff_f000)
        XCTAssertEqual(try placeInitrd(size: 0x1001, kernelEnd: 0x400_0000, addrMax: 0x7fff_ffff, e820: e820), 0x7fff_e000)
        // Old default 0x37ffffff.
        XCTAssertEqual(try placeInitrd(size: 0x1000, kernelEnd: 0x400_0000, addrMax: 0x37ff_ffff, e820: e820), 0x37ff_f000)
        // No limit: below the reserved range at the top of low RAM, never above 3 GiB.
        XCTAssertEqual(try placeInitrd(size: 0x1000, kernelEnd: 0x400_0000, addrMax: 0xffff_ffff, e820: e820), 0xbfef_f000)
        // Exactly the space there is, then one page more.
        let small = buildE820(ram: ramOf(64 * MiB))
        XCTAssertEqual(try placeInitrd(size: 32 * MiB, kernelEnd: 32 * MiB, addrMax: 0x7fff_ffff, e820: small), 32 * MiB)
        assertThrows(.initrdTooLarge(size: 32 * MiB + 1, available: 32 * MiB),
                     try placeInitrd(size: 32 * MiB + 1, kernelEnd: 32 * MiB, addrMax: 0x7fff_ffff, e820: small))
        assertThrows(.initrdTooLarge(size: 1, available: 0),
                     try placeInitrd(size: 1, kernelEnd: 64 * MiB, addrMax: 0x7fff_ffff, e820: small))
        assertThrows(.initrdTooLarge(size: UInt64.max, available: 32 * MiB),
                     try placeInitrd(size: UInt64.max, kernelEnd: 32 * MiB, addrMax: 0x7fff_ffff, e820: small))
    }

    func testCmdline() throws {
        XCTAssertEqual(try checkCmdline("abc", max: 3), Array("abc".utf8))
        assertThrows(.cmdlineTooLong(length: 4, max: 3), try checkCmdline("abcd", max: 3))
        assertThrows(.cmdlineTooLong(length: 0x10000, max: 0xffff), try checkCmdline(String(repeating: "x", count: 0x10000), max: Int.max))
        assertThrows(.cmdlineContainsNUL, try checkCmdline("a\u{0}b", max: 100))
        // With the real kernel's cmdline_size.
        let (path, k) = try requireKernel()
        let max = Int(le(k, 0x238, UInt32.self))
        let m = try makeMemory(128 * MiB)
        XCTAssertNoThrow(try loadLinux(LinuxBootConfig(kernelPath: path, cmdline: String(repeating: "y", count: max)), into: m))
        XCTAssertEqual(try m.load(UInt8.self, at: 0x20000 + UInt64(max)), 0)
        assertThrows(.cmdlineTooLong(length: max + 1, max: max),
                     try loadLinux(LinuxBootConfig(kernelPath: path, cmdline: String(repeating: "y", count: max + 1)), into: m))
    }

    func testLoadELFEndToEnd() throws {
        let vbase: UInt64 = 0xffff_ffff_8000_0000
        let elf = syntheticELF(entry: vbase + 0x100_0000, segments: [
            TestSegment(offset: 0x1000, vaddr: vbase + 0x100_0000, paddr: 0x100_0000, filesz: 0x1000, memsz: 0x1000),
            TestSegment(offset: 0x2000, vaddr: vbase + 0x120_0000, paddr: 0x120_0000, filesz: 0x800, memsz: 0x3000),
        ])
        let path = tempFile(elf, name: "vmlinux")
        defer { unlink(path) }
        let m = try makeMemory(64 * MiB)
        let info = try loadLinuxDetailed(LinuxBootConfig(kernelPath: path, cmdline: "console=ttyS0"), into: m)
        XCTAssertEqual(info.cpu.rip, 0x100_0000)
        XCTAssertEqual(try m.readBytes(at: 0x100_0000, count: 0x1000), Array(elf[0x1000..<0x2000]))
        XCTAssertEqual(try m.load(UInt32.self, at: 0x7000 + 0x202), 0x5372_6448)
        XCTAssertEqual(try m.load(UInt32.self, at: 0x7000 + 0x228), 0x20000)
        assertThrows(.cmdlineTooLong(length: 2048, max: 2047),
                     try loadLinux(LinuxBootConfig(kernelPath: path, cmdline: String(repeating: "z", count: 2048)), into: m))
    }

    func testConfigurationErrors() throws {
        let k = tempFile(syntheticBzImage(), name: "bz")
        defer { unlink(k) }
        let m = try makeMemory(64 * MiB)
        XCTAssertNoThrow(try loadLinux(LinuxBootConfig(kernelPath: k), into: m))
        assertThrows(.badCPUCount(0, max: 254), try loadLinux(LinuxBootConfig(kernelPath: k, cpus: 0), into: m))
        assertThrows(.badCPUCount(255, max: 254), try loadLinux(LinuxBootConfig(kernelPath: k, cpus: 255), into: m))
        XCTAssertNoThrow(try loadLinux(LinuxBootConfig(kernelPath: k, cpus: 254), into: m))
        assertThrows(.kernelNotFound("/nonexistent"), try loadLinux(LinuxBootConfig(kernelPath: "/nonexistent"), into: m))
        assertThrows(.initrdNotFound("/nonexistent"), try loadLinux(LinuxBootConfig(kernelPath: k, initrdPath: "/nonexistent"), into: m))
        assertThrows(.initrdUnreadable("/", errno: EISDIR), try loadLinux(LinuxBootConfig(kernelPath: k, initrdPath: "/"), into: m))
        func dev(_ a: UInt64, _ s: UInt64, _ g: UInt32) -> LinuxBootConfig {
            LinuxBootConfig(kernelPath: k, virtioDevices: [VirtioMMIODeviceDescription(address: a, size: s, gsi: g)])
        }
        XCTAssertNoThrow(try loadLinux(dev(0xd000_1000, 0x1000, 5), into: m))
        for bad in [dev(0xd000_1000, 0, 5), dev(0x100_0000, 0x1000, 5), dev(0xffff_f000, 0x2000, 5),
                    dev(0xd000_1000, 0x1000, 4), dev(0xd000_1000, 0x1000, 8), dev(0xd000_1000, 0x1000, 24),
                    dev(0xd000_1000, 0x1000, 0)] {
            assertThrowsBoot(try loadLinux(bad, into: m)) { if case .badDevice = $0 { return true }; return false }
        }
        var two = dev(0xd000_1000, 0x1000, 5)
        two.virtioDevices.append(VirtioMMIODeviceDescription(address: 0xd000_1800, size: 0x1000, gsi: 6))
        assertThrowsBoot(try loadLinux(two, into: m)) { if case .badDevice = $0 { return true }; return false }
        two.virtioDevices[1] = VirtioMMIODeviceDescription(address: 0xd000_2000, size: 0x1000, gsi: 5)
        assertThrowsBoot(try loadLinux(two, into: m)) { if case .badDevice = $0 { return true }; return false }
        // Reserved ranges: empty, wrapping, over the kernel.
        for r: (base: UInt64, size: UInt64) in [(0x1000, 0), (UInt64.max - 10, 100), (0x100_0000, 0x1000)] {
            assertThrowsBoot(try loadLinux(LinuxBootConfig(kernelPath: k, extraReserved: [r]), into: m)) {
                if case .badReservedRange = $0 { return true }; return false
            }
        }
        // Guest memory without the first MiB.
        let high = try GuestMemory(layout: [(0x10_0000, 64 * MiB)])
        assertThrowsBoot(try loadLinux(LinuxBootConfig(kernelPath: k), into: high)) { if case .notEnoughMemory = $0 { return true }; return false }
    }

    func testMoreThanThreeGiBKeepsBootDataLow() throws {
        let k = tempFile(syntheticBzImage(), name: "bz")
        defer { unlink(k) }
        let rd = tempFile([1, 2, 3], name: "rd")
        defer { unlink(rd) }
        let m = try makeMemory(5 * GiB)
        let info = try loadLinuxDetailed(LinuxBootConfig(kernelPath: k, initrdPath: rd), into: m)
        XCTAssertEqual(info.initrd?.address, 0x7fff_f000)   // initrd_addr_max of the synthetic header
        XCTAssertEqual(info.e820.last, E820Entry(address: 4 * GiB, size: 2 * GiB, type: 1))
    }
}
