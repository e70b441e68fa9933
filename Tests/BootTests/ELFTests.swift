import XCTest
import Glibc
@testable import Boot
@testable import GuestMemory

final class ELFTests: XCTestCase {
    let ram = ramOf(64 * MiB)
    let vbase: UInt64 = 0xffff_ffff_8000_0000

    /// A vmlinux-like image: text at 16 MiB (vaddr -2 GiB + 16 MiB) with bss, data after.
    func validSegments() -> [TestSegment] {
        [TestSegment(offset: 0x1000, vaddr: vbase + 0x100_0000, paddr: 0x100_0000, filesz: 0x1000, memsz: 0x1000),
         TestSegment(offset: 0x2000, vaddr: vbase + 0x120_0000, paddr: 0x120_0000, filesz: 0x800, memsz: 0x3000)]
    }

    func testValidELFLoads() throws {
        let b = syntheticELF(entry: 0x100_0000, segments: validSegments())
        let img = try parseKernel(b, ram: ram)
        XCTAssertEqual(img.format, .elf)
        XCTAssertEqual(img.entry, 0x100_0000)
        XCTAssertEqual(img.loadAddress, 0x100_0000)
        XCTAssertEqual(img.end, 0x120_3000)
        XCTAssertEqual(img.cmdlineMax, 2047)
        XCTAssertEqual(img.segments.count, 2)
        let m = try makeMemory(64 * MiB)
        // Dirty the bss area first: loading must zero it.
        try m.write([UInt8](repeating: 0xee, count: 0x3000), at: 0x120_0000)
        try loadKernelSegments(img, from: b, into: m)
        XCTAssertEqual(try m.readBytes(at: 0x100_0000, count: 0x1000), Array(b[0x1000..<0x2000]))
        XCTAssertEqual(try m.readBytes(at: 0x120_0000, count: 0x800), Array(b[0x2000..<0x2800]))
        XCTAssertEqual(try m.readBytes(at: 0x120_0800, count: 0x2800), [UInt8](repeating: 0, count: 0x2800))
    }

    func testVirtualEntryIsConverted() throws {
        let b = syntheticELF(entry: vbase + 0x100_0040, segments: validSegments())
        XCTAssertEqual(try parseKernel(b, ram: ram).entry, 0x100_0040)
        let c = syntheticELF(entry: vbase + 0x120_2000, segments: validSegments())  // in bss of segment 1
        XCTAssertEqual(try parseKernel(c, ram: ram).entry, 0x120_2000)
        assertThrows(.elfEntryOutsideSegments(vbase + 0x200_0000), try parseKernel(syntheticELF(entry: vbase + 0x200_0000, segments: validSegments()), ram: ram))
        assertThrows(.elfEntryOutsideSegments(0x50_0000), try parseKernel(syntheticELF(entry: 0x50_0000, segments: validSegments()), ram: ram))
    }

    func testNonLoadSegmentsAreIgnored() throws {
        var s = validSegments()
        s.append(TestSegment(type: 4, offset: 0xffff_ffff, vaddr: 0, paddr: 0, filesz: 0xffff_ffff, memsz: 1)) // PT_NOTE, hostile
        s.append(TestSegment(type: 0x6474e551, offset: 0, vaddr: 0, paddr: 0, filesz: 0, memsz: 0))        // GNU_STACK
        let img = try parseKernel(syntheticELF(entry: 0x100_0000, segments: s), ram: ram)
        XCTAssertEqual(img.segments.count, 2)
    }

    func testHeaderErrors() {
        let good = syntheticELF(entry: 0x100_0000, segments: validSegments())
        var b = good; b[4] = 1
        assertThrows(.elfWrongClass(1), try parseKernel(b, ram: ram))
        b = good; setLE(&b, 18, UInt16(183))
        assertThrows(.elfWrongMachine(183), try parseKernel(b, ram: ram))
        b = good; setLE(&b, 16, UInt16(1))
        assertThrows(.elfNotExecutable(1), try parseKernel(b, ram: ram))
        b = good; setLE(&b, 16, UInt16(3))
        assertThrows(.elfNotExecutable(3), try parseKernel(b, ram: ram))
        b = good; b[5] = 2
        assertThrowsBoot(try parseKernel(b, ram: ram), "big endian") { if case .elfBadHeader = $0 { return true }; return false }
        b = good; setLE(&b, 54, UInt16(32))
        assertThrowsBoot(try parseKernel(b, ram: ram), "phentsize") { if case .elfBadHeader = $0 { return true }; return false }
        b = good; setLE(&b, 56, UInt16(0))
        assertThrows(.elfNoLoadableSegments, try parseKernel(b, ram: ram))
        b = good; setLE(&b, 56, UInt16(0xffff))
        assertThrows(.elfTooManySegments(0xffff, max: 64), try parseKernel(b, ram: ram))
        b = good; setLE(&b, 32, UInt64(0x2fff))                      // e_phoff past the end
        assertThrowsBoot(try parseKernel(b, ram: ram), "phoff") { if case .truncatedKernel = $0 { return true }; return false }
        b = good; setLE(&b, 32, UInt64.max - 8)                      // e_phoff overflowing
        assertThrowsBoot(try parseKernel(b, ram: ram), "phoff overflow") { if case .truncatedKernel = $0 { return true }; return false }
        // Only non-load segments.
        let notes = syntheticELF(entry: 0x100_0000, segments: [TestSegment(type: 4, offset: 0, vaddr: 0, paddr: 0, filesz: 0, memsz: 0)])
        assertThrows(.elfNoLoadableSegments, try parseKernel(notes, ram: ram))
        // Truncated at every point of the headers.
        for cut in [4, 5, 6, 16, 40, 63, 64, 100, 64 + 56, 64 + 111] {
            assertThrowsBoot(try parseKernel(Array(good.prefix(cut)), ram: ram), "cut \(cut)") { e in
                if case .truncatedKernel = e { return true }
                return false
            }
        }
    }

    func testSegmentErrors() {
        func check(_ seg: TestSegment, _ expected: BootError, file: StaticString = #filePath, line: UInt = #line) {
            var s = validSegments()
            s[1] = seg
            assertThrows(expected, try parseKernel(syntheticELF(entry: 0x100_0000, segments: s), ram: ram), file: file, line: line)
        }
        // Beyond the file.
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x120_0000, filesz: 0x1001, memsz: 0x2000),
              .elfSegmentOutsideFile(index: 1, offset: 0x2000, size: 0x1001, fileSize: 0x3000))
        check(TestSegment(offset: 0xffff_ffff_ffff_f000, vaddr: 0, paddr: 0x120_0000, filesz: 0x2000, memsz: 0x2000),
              .elfSegmentOutsideFile(index: 1, offset: 0xffff_ffff_ffff_f000, size: 0x2000, fileSize: 0x3000))
        // filesz > memsz.
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x120_0000, filesz: 0x800, memsz: 0x400),
              .elfSegmentFileSizeExceedsMemSize(index: 1, fileSize: 0x800, memSize: 0x400))
        // Below 1 MiB (over the boot structures).
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x7000, filesz: 0x800, memsz: 0x800),
              .elfSegmentOverlapsBootArea(index: 1, address: 0x7000))
        // Beyond RAM, straddling the end of RAM, in the MMIO hole, overflowing.
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x1000_0000, filesz: 0x800, memsz: 0x800),
              .elfSegmentOutsideRAM(index: 1, address: 0x1000_0000, size: 0x800))
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 64 * MiB - 0x400, filesz: 0x800, memsz: 0x800),
              .elfSegmentOutsideRAM(index: 1, address: 64 * MiB - 0x400, size: 0x800))
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0xD000_0000, filesz: 0x800, memsz: 0x800),
              .elfSegmentOutsideRAM(index: 1, address: 0xD000_0000, size: 0x800))
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x120_0000, filesz: 0x800, memsz: UInt64.max - 0x100_0000),
              .elfSegmentOutsideRAM(index: 1, address: 0x120_0000, size: UInt64.max - 0x100_0000))
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: UInt64.max - 0x100, filesz: 0x800, memsz: 0x800),
              .elfSegmentOutsideRAM(index: 1, address: UInt64.max - 0x100, size: 0x800))
        // Overlapping segment 0.
        check(TestSegment(offset: 0x2000, vaddr: 0, paddr: 0x100_0800, filesz: 0x800, memsz: 0x800),
              .elfSegmentsOverlap(index: 1, other: 0))
    }

    func testELFAboveAndAcrossTheHole() throws {
        // 5 GiB of RAM: a segment above 4 GiB is inside RAM; one across 3 GiB is not.
        let big = ramOf(5 * GiB)
        let s = [TestSegment(offset: 0x1000, vaddr: 0, paddr: 0x1_0000_0000, filesz: 0x1000, memsz: 0x1000)]
        XCTAssertEqual(try parseKernel(syntheticELF(entry: 0x1_0000_0000, segments: s), ram: big).entry, 0x1_0000_0000)
        let across = [TestSegment(offset: 0x1000, vaddr: 0, paddr: 0xBFFF_F000, filesz: 0x1000, memsz: 0x2000)]
        assertThrows(.elfSegmentOutsideRAM(index: 0, address: 0xBFFF_F000, size: 0x2000),
                     try parseKernel(syntheticELF(entry: 0xBFFF_F000, segments: across), ram: big))
    }

    func testMutatedELFNeverCrashes() {
        let base = syntheticELF(entry: 0x100_0000, segments: validSegments())
        var rng = XorShift(s: 0xfeed_f00d_1234_5678)
        var ok = 0
        for _ in 0..<5000 {
            var b = base
            for _ in 0..<(1 + rng.below(4)) {
                let off = rng.below(64 + 2 * 56)
                b[off] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.below(5) == 0 { b = Array(b.prefix(rng.below(b.count + 1))) }
            do { _ = try parseKernel(b, ram: ram); ok += 1 } catch is BootError {} catch { XCTFail("\(error)") }
        }
        XCTAssertGreaterThan(ok, 0)
    }
}
