import XCTest
@testable import Boot
@testable import GuestMemory

final class LayoutTests: XCTestCase {
    func testRAMLayout() {
        let small = X86Layout.ramLayout(memoryBytes: 512 * MiB)
        XCTAssertEqual(small.count, 1)
        XCTAssertEqual(small[0].base, 0); XCTAssertEqual(small[0].size, 512 * MiB)
        let exact = X86Layout.ramLayout(memoryBytes: 3 * GiB)
        XCTAssertEqual(exact.count, 1)
        XCTAssertEqual(exact[0].size, 3 * GiB)
        let big = X86Layout.ramLayout(memoryBytes: 8 * GiB)
        XCTAssertEqual(big.count, 2)
        XCTAssertEqual(big[0].base, 0); XCTAssertEqual(big[0].size, 3 * GiB)
        XCTAssertEqual(big[1].base, 4 * GiB); XCTAssertEqual(big[1].size, 5 * GiB)
        XCTAssertEqual(X86Layout.ramLayout(memoryBytes: 4095).count, 0)
        XCTAssertEqual(X86Layout.ramLayout(memoryBytes: 0x10_0fff)[0].size, 0x10_0000)
    }

    func testVirtioGSIs() {
        XCTAssertEqual(X86Layout.virtioGSI(index: 0), 5)
        XCTAssertEqual(X86Layout.virtioGSI(index: 2), 7)
        XCTAssertEqual(X86Layout.virtioGSI(index: 3), 9)
        XCTAssertEqual(X86Layout.virtioGSI(index: 17), 23)
        XCTAssertNil(X86Layout.virtioGSI(index: 18))
        XCTAssertNil(X86Layout.virtioGSI(index: -1))
        XCTAssertEqual((0..<40).compactMap { X86Layout.virtioGSI(index: $0) }.count, X86Layout.maxVirtioDevices)
        XCTAssertEqual(X86Layout.virtioMMIOAddress(index: 2), 0xD000_3000)
        XCTAssertEqual(X86Layout.acpiPoweroffValue, 0x34)
    }

    /// Boot structures do not overlap each other.
    func testBootStructuresDisjoint() {
        let ranges: [(String, UInt64, UInt64)] = [
            ("gdt", X86Layout.gdtAddress, X86Layout.gdtAddress + 32),
            ("idt", X86Layout.idtAddress, X86Layout.idtAddress + 8),
            ("zero page", X86Layout.zeroPage, X86Layout.zeroPage + 0x1000),
            ("stack", X86Layout.bootStackPointer - 0x100, X86Layout.bootStackPointer),
            ("page tables", X86Layout.pml4, X86Layout.pageTablesEnd),
            ("cmdline", X86Layout.cmdline, X86Layout.cmdline + X86Layout.cmdlineAreaSize),
            ("mp", X86Layout.mpTable, X86Layout.vgaHoleStart),
            ("acpi", X86Layout.acpiStart, X86Layout.biosEnd),
        ]
        for (i, a) in ranges.enumerated() {
            for b in ranges[(i + 1)...] {
                XCTAssertTrue(a.2 <= b.1 || b.2 <= a.1, "\(a.0) overlaps \(b.0)")
            }
        }
    }
}

final class ZeroPageTests: XCTestCase {
    /// Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
    func testOffsets() {
        XCTAssertEqual(ZeroPage.acpiRsdpAddr, 0x070)
        XCTAssertEqual(ZeroPage.extRamdiskImage, 0x0c0)
        XCTAssertEqual(ZeroPage.extRamdiskSize, 0x0c4)
        XCTAssertEqual(ZeroPage.extCmdLinePtr, 0x0c8)
        XCTAssertEqual(ZeroPage.e820Entries, 0x1e8)
        XCTAssertEqual(ZeroPage.setupHeader, 0x1f1)
        XCTAssertEqual(ZeroPage.typeOfLoader, 0x210)
        XCTAssertEqual(ZeroPage.loadflags, 0x211)
        XCTAssertEqual(ZeroPage.ramdiskImage, 0x218)
        XCTAssertEqual(ZeroPage.ramdiskSize, 0x21c)
        XCTAssertEqual(ZeroPage.heapEndPtr, 0x224)
        XCTAssertEqual(ZeroPage.cmdLinePtr, 0x228)
        XCTAssertEqual(ZeroPage.initrdAddrMax, 0x22c)
        XCTAssertEqual(ZeroPage.xloadflags, 0x236)
        XCTAssertEqual(ZeroPage.cmdlineSize, 0x238)
        XCTAssertEqual(ZeroPage.prefAddress, 0x258)
        XCTAssertEqual(ZeroPage.initSize, 0x260)
        XCTAssertEqual(ZeroPage.e820Table, 0x2d0)
        XCTAssertEqual(ZeroPage.e820Table + ZeroPage.e820EntrySize * ZeroPage.e820MaxEntries, 0xcd0)
    }

    func testBuildFromBzImageHeader() throws {
        var k = syntheticBzImage()
        setLE(&k, 0x250, UInt64(0xdead_beef))   // setup_data from the file is dropped
        guard case let .bzImage(h) = try parseKernel(k, ram: ramOf(64 * MiB)).format else { return XCTFail() }
        let e820 = buildE820(ram: ramOf(64 * MiB))
        let zp = try ZeroPage.build(header: h, cmdline: 0x20000, cmdlineSize: 0x7ff,
                                    initrd: (0x3f00_0000 + 0x1_0000_0000, 0x1_2345_6000), e820: e820, rsdp: 0xe0000)
        XCTAssertEqual(zp.count, 4096)
        // Header copied verbatim except the fields the loader sets.
        for off in 0x1f1..<0x26c where !(0x210...0x211).contains(off) && !(0x218..<0x220).contains(off)
            && !(0x224..<0x22c).contains(off) && !(0x250..<0x258).contains(off) {
            XCTAssertEqual(zp[off], k[off], "offset \(String(off, radix: 16))")
        }
        XCTAssertEqual(le(zp, 0x202, UInt32.self), 0x5372_6448)
        XCTAssertEqual(le(zp, 0x250, UInt64.self), 0)
        XCTAssertEqual(zp[0x210], 0xff)
        XCTAssertEqual(zp[0x211], 0x81)                              // LOADED_HIGH | CAN_USE_HEAP
        XCTAssertEqual(le(zp, 0x224, UInt16.self), 0xfe00)
        XCTAssertEqual(le(zp, 0x228, UInt32.self), 0x20000)
        XCTAssertEqual(le(zp, 0x0c8, UInt32.self), 0)
        XCTAssertEqual(le(zp, 0x218, UInt32.self), 0x3f00_0000)
        XCTAssertEqual(le(zp, 0x0c0, UInt32.self), 1)                // ext_ramdisk_image: bits 32-63
        XCTAssertEqual(le(zp, 0x21c, UInt32.self), 0x2345_6000)
        XCTAssertEqual(le(zp, 0x0c4, UInt32.self), 1)
        XCTAssertEqual(le(zp, 0x070, UInt64.self), 0xe0000)
        XCTAssertEqual(Int(zp[0x1e8]), e820.count)
        for (i, e) in e820.enumerated() {
            let o = 0x2d0 + 20 * i
            XCTAssertEqual(le(zp, o, UInt64.self), e.address)
            XCTAssertEqual(le(zp, o + 8, UInt64.self), e.size)
            XCTAssertEqual(le(zp, o + 16, UInt32.self), e.type)
        }
        // Nothing written past the e820 table.
        XCTAssertTrue(zp[(0x2d0 + 20 * e820.count)...].allSatisfy { $0 == 0 })
    }

    func testBuildForELF() throws {
        let zp = try ZeroPage.build(header: nil, cmdline: 0x20000, cmdlineSize: 2047, initrd: nil,
                                    e820: buildE820(ram: ramOf(64 * MiB)), rsdp: 0xe0000)
        XCTAssertEqual(le(zp, 0x1fe, UInt16.self), 0xaa55)
        XCTAssertEqual(le(zp, 0x202, UInt32.self), 0x5372_6448)
        XCTAssertEqual(zp[0x210], 0xff)
        XCTAssertEqual(le(zp, 0x228, UInt32.self), 0x20000)
        XCTAssertEqual(le(zp, 0x238, UInt32.self), 2047)
        XCTAssertEqual(le(zp, 0x218, UInt32.self), 0)
        XCTAssertEqual(le(zp, 0x21c, UInt32.self), 0)
    }

    func checkE820(_ map: [E820Entry], ram: RAMLayout, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertLessThanOrEqual(map.count, 128, file: file, line: line)
        for (a, b) in zip(map, map.dropFirst()) {
            XCTAssertLessThanOrEqual(a.end, b.address, "overlap \(a) \(b)", file: file, line: line)
            XCTAssertFalse(a.end == b.address && a.type == b.type, "unmerged \(a) \(b)", file: file, line: line)
        }
        for e in map { XCTAssertGreaterThan(e.size, 0, file: file, line: line) }
        // Every byte of RAM except the legacy VGA/option ROM hole [0xa0000, 0xe0000) is
        // described; usable entries lie inside RAM.
        for r in ram {
            var covered: UInt64 = r.base == 0 ? 0xe0000 - 0xa0000 : 0
            for e in map {
                let lo = max(e.address, r.base), hi = min(e.end, r.base + r.size)
                if hi > lo { covered += hi - lo }
            }
            XCTAssertEqual(covered, r.size, "RAM \(r) not covered", file: file, line: line)
        }
        for e in map where e.type == E820Entry.ram {
            XCTAssertTrue(ram.contains { e.address >= $0.base && e.end <= $0.base + $0.size }, "\(e) outside RAM", file: file, line: line)
        }
    }

    func testE820Small() {
        let ram = ramOf(256 * MiB)
        let m = buildE820(ram: ram)
        XCTAssertEqual(m, [
            E820Entry(address: 0, size: 0x9fc00, type: 1),
            E820Entry(address: 0x9fc00, size: 0x400, type: 2),
            E820Entry(address: 0xe0000, size: 0x20000, type: 2),
            E820Entry(address: 0x100000, size: 256 * MiB - 0x100000, type: 1),
        ])
        checkE820(m, ram: ram)
    }

    func testE820AboveFourGiB() {
        let ram = ramOf(6 * GiB)
        let m = buildE820(ram: ram)
        XCTAssertEqual(m.count, 5)
        XCTAssertEqual(m[3], E820Entry(address: 0x100000, size: 3 * GiB - 0x100000, type: 1))
        XCTAssertEqual(m[4], E820Entry(address: 4 * GiB, size: 3 * GiB, type: 1))
        checkE820(m, ram: ram)
    }

    func testE820WithReservedRanges() {
        let ram = ramOf(6 * GiB)
        let res: [(base: UInt64, size: UInt64)] = [
            (0x200_0000, 0x1000),               // inside low RAM
            (0x200_0800, 0x1000),               // overlapping the previous one
            (4 * GiB, 0x10_0000),               // at the start of high RAM
            (0xD000_0000, 0x1000),              // in the hole (not RAM): listed as is
            (0x9f000, 0x1000),                  // across the EBDA boundary
        ]
        let m = buildE820(ram: ram, reserved: res)
        checkE820(m, ram: ram)
        func type(at a: UInt64) -> UInt32? { m.first { a >= $0.address && a < $0.end }?.type }
        XCTAssertEqual(type(at: 0x200_0000), 2)
        XCTAssertEqual(type(at: 0x200_1700), 2)
        XCTAssertEqual(type(at: 0x200_1800), 1)
        XCTAssertEqual(type(at: 0x1ff_ffff), 1)
        XCTAssertEqual(type(at: 4 * GiB), 2)
        XCTAssertEqual(type(at: 4 * GiB + 0x10_0000), 1)
        XCTAssertEqual(type(at: 0xD000_0000), 2)
        XCTAssertEqual(type(at: 0x9f000), 2)
        XCTAssertEqual(type(at: 0x9efff), 1)
        XCTAssertNil(type(at: 0xa1000))
        XCTAssertNil(type(at: 0xdffff))
    }
}
