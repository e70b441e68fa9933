import XCTest
@testable import Boot
@testable import GuestMemory

final class CPUStateTests: XCTestCase {
    func testGDTBytes() throws {
        XCTAssertEqual(BootGDT.bytes, [0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0, 0, 0, 0, 0, 0, 0,
                                       0xff, 0xff, 0, 0, 0, 0x9b, 0xaf, 0x00,
                                       0xff, 0xff, 0, 0, 0, 0x93, 0xcf, 0x00])
        XCTAssertEqual(BootGDT.limit, 31)
        let m = try makeMemory(2 * MiB)
        try writeBootCPUStructures(into: m)
        XCTAssertEqual(try m.readBytes(at: 0x500, count: 32), BootGDT.bytes)
        XCTAssertEqual(try m.load(UInt64.self, at: 0x520), 0)
    }

    func testSegments() {
        let s = BootCPUState(entry: 0x100_0200)
        XCTAssertEqual(s.code, SegmentDescriptor(gdtEntry: 0x00af_9b00_0000_ffff, selector: 0x10))
        XCTAssertEqual(s.code.selector, 0x10)
        XCTAssertEqual(s.code.base, 0)
        XCTAssertEqual(s.code.limit, 0xffff_ffff)
        XCTAssertEqual(s.code.type, 0xb)
        XCTAssertEqual(s.code.present, 1)
        XCTAssertEqual(s.code.dpl, 0)
        XCTAssertEqual(s.code.db, 0)
        XCTAssertEqual(s.code.s, 1)
        XCTAssertEqual(s.code.l, 1)
        XCTAssertEqual(s.code.g, 1)
        XCTAssertEqual(s.code.avl, 0)
        XCTAssertEqual(s.data.selector, 0x18)
        XCTAssertEqual(s.data.type, 0x3)
        XCTAssertEqual(s.data.db, 1)
        XCTAssertEqual(s.data.l, 0)
        XCTAssertEqual(s.data.limit, 0xffff_ffff)
        // Selectors index the GDT.
        XCTAssertEqual(BootGDT.entries[Int(s.code.selector) / 8], BootGDT.code64)
        XCTAssertEqual(BootGDT.entries[Int(s.data.selector) / 8], BootGDT.data)
        // A descriptor with base and byte granularity decodes too.
        let d = SegmentDescriptor(gdtEntry: 0x12_4f_93_345678_abcd, selector: 8)
        XCTAssertEqual(d.base, 0x1234_5678)
        XCTAssertEqual(d.limit, 0xfabcd)
        XCTAssertEqual(d.g, 0)
        XCTAssertEqual(d.db, 1)
    }

    func testRegisters() {
        let s = BootCPUState(entry: 0x100_0200)
        XCTAssertEqual(s.rip, 0x100_0200)
        XCTAssertEqual(s.rsi, 0x7000)
        XCTAssertEqual(s.rsp, 0x8ff0)
        XCTAssertEqual(s.rsp % 16, 0)
        XCTAssertEqual(s.cr3, 0x9000)
        XCTAssertEqual(s.cr0, 0x8000_0031)
        XCTAssertEqual(s.cr4, 0x20)
        XCTAssertEqual(s.efer, 0x500)
        XCTAssertEqual(s.rflags, 2)
        XCTAssertEqual(s.gdtBase, 0x500); XCTAssertEqual(s.gdtLimit, 31)
        XCTAssertEqual(s.idtBase, 0x520); XCTAssertEqual(s.idtLimit, 0)
    }

    /// Walks the 4-level tables like the MMU does.
    func walk(_ m: GuestMemory, cr3: UInt64, _ v: UInt64) throws -> UInt64? {
        let mask: UInt64 = 0x000f_ffff_ffff_f000
        let pml4e: UInt64 = try m.load(at: cr3 + ((v >> 39) & 511) * 8)
        guard pml4e & 1 != 0 else { return nil }
        XCTAssertNotEqual(pml4e & 2, 0)
        let pdpte: UInt64 = try m.load(at: (pml4e & mask) + ((v >> 30) & 511) * 8)
        guard pdpte & 1 != 0 else { return nil }
        XCTAssertEqual(pdpte & 0x80, 0, "no 1 GiB pages")
        let pde: UInt64 = try m.load(at: (pdpte & mask) + ((v >> 21) & 511) * 8)
        guard pde & 1 != 0 else { return nil }
        XCTAssertEqual(pde & 0x83, 0x83)
        return (pde & 0x000f_ffff_ffe0_0000) | (v & 0x1f_ffff)
    }

    func testPageTablesIdentityMapLowFourGiB() throws {
        let m = try makeMemory(2 * MiB)
        try writeBootCPUStructures(into: m)
        for v: UInt64 in [0, 0x7000, 0x1f_ffff, 0x20_0000, 0x100_0200, 0x1234_5678, 0x3fff_ffff, 0x4000_0000,
                          0xbfff_ffff, 0xc000_0000, 0xd000_1000, 0xfec0_0000, 0xfee0_0000, 0xffff_ffff] {
            XCTAssertEqual(try walk(m, cr3: 0x9000, v), v, "0x\(String(v, radix: 16))")
        }
        XCTAssertNil(try walk(m, cr3: 0x9000, 0x1_0000_0000))
        XCTAssertNil(try walk(m, cr3: 0x9000, 0x80_0000_0000))
        XCTAssertEqual(try m.load(UInt64.self, at: 0x9000), 0xa003)
        XCTAssertEqual(try m.load(UInt64.self, at: 0xa000), 0xb003)
        XCTAssertEqual(try m.load(UInt64.self, at: 0xa018), 0xe003)
        XCTAssertEqual(try m.load(UInt64.self, at: 0xb000), 0x83)
        XCTAssertEqual(try m.load(UInt64.self, at: 0xeff8), 0xffe0_0083)
        // Pages end at 0xf000.
        XCTAssertEqual(BootPageTables.pages().map(\.address), [0x9000, 0xa000, 0xb000, 0xc000, 0xd000, 0xe000])
    }
}
