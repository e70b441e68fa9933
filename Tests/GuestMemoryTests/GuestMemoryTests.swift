import XCTest
import Glibc
@testable import GuestMemory

final class GuestMemoryTests: XCTestCase {
    func testTwoRegionsAroundHole() throws {
        let m = try GuestMemory(layout: [(0, 1 << 20), (4 << 30, 1 << 20)])
        XCTAssertEqual(m.totalSize, 2 << 20)
        try m.store(UInt32(0xdeadbeef), at: 0x1000)
        XCTAssertEqual(try m.load(UInt32.self, at: 0x1000), 0xdeadbeef)
        try m.store(UInt64(7), at: (4 << 30) + (1 << 20) - 8)
        XCTAssertEqual(try m.load(UInt64.self, at: (4 << 30) + (1 << 20) - 8), 7)
    }

    func testHostileRangesAreRejected() throws {
        let m = try GuestMemory(layout: [(0, 1 << 20), (4 << 30, 1 << 20)])
        let bad: [(UInt64, UInt64)] = [
            ((1 << 20) - 4, 8),          // straddles the end of the first region
            (1 << 20, 1),                // in the hole
            ((4 << 30) - 1, 2),          // straddles the start of the second
            (UInt64.max - 3, 8),         // wraps
            (0, UInt64.max),             // huge length
            (16, UInt64.max - 8),        // addr + len overflows
            ((5 << 30), 1),              // past the end
        ]
        for (a, l) in bad {
            XCTAssertThrowsError(try m.pointer(a, length: l), "0x\(String(a, radix: 16))+\(l)")
            XCTAssertFalse(m.isValid(a, length: l))
        }
        XCTAssertThrowsError(try m.load(UInt64.self, at: (1 << 20) - 4))
        var iovs: [iovec] = []
        XCTAssertThrowsError(try m.appendIovec((1 << 20) - 100, length: 200, to: &iovs))
        XCTAssertTrue(iovs.isEmpty)
        XCTAssertThrowsError(try m.readBytes(at: 0, count: -1))
    }

    func testBadLayouts() {
        XCTAssertThrowsError(try GuestMemory(layout: []))
        XCTAssertThrowsError(try GuestMemory(layout: [(0, 100)]))
        XCTAssertThrowsError(try GuestMemory(layout: [(0, 8192), (4096, 4096)]))
        XCTAssertThrowsError(try GuestMemory(layout: [(UInt64.max & ~4095, 8192)]))
    }

    func testByteReaderBounds() {
        let bytes: [UInt8] = [1, 2, 3, 4]
        bytes.withUnsafeBytes { raw in
            let r = ByteReader(raw)
            XCTAssertEqual(r.get(UInt32.self, at: 0), 0x04030201)
            XCTAssertNil(r.get(UInt32.self, at: 1))
            XCTAssertNil(r.get(UInt64.self, at: 0))
            XCTAssertNil(r.get(UInt8.self, at: -1))
            XCTAssertNil(r.get(UInt16.self, at: Int.max))
        }
    }
    /// The VmFlags of every mapping that overlaps [start, end) of this process, in order.
    private func hugeAdvice(_ m: GuestMemory) throws -> [(lo: UInt64, hi: UInt64, huge: Bool)] {
        let base = UInt64(UInt(bitPattern: m.regions[0].host))
        let end = base + m.regions[0].size
        guard let f = fopen("/proc/self/smaps", "r") else { throw XCTSkip("no /proc/self/smaps") }
        defer { fclose(f) }
        var out: [(lo: UInt64, hi: UInt64, huge: Bool)] = []
        var current: (UInt64, UInt64)?
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let dash = text.firstIndex(of: "-"), let sp = text.firstIndex(of: " "), dash < sp,
               let lo = UInt64(text[..<dash], radix: 16), let hi = UInt64(text[text.index(after: dash)..<sp], radix: 16) {
                current = (lo < end && hi > base) ? (lo, hi) : nil
            } else if text.hasPrefix("VmFlags:"), let c = current {
                out.append((c.0 - base, min(c.1, end) - base, text.split(separator: " ").contains("hg")))
            }
        }
        return out
    }

    func testAllOfRAMIsAdvisedHugeFromTheStart() throws {
        let m = try GuestMemory(layout: [(0, 64 << 20)])
        XCTAssertEqual(try hugeAdvice(m).map(\.huge), [true], "advised at mmap: nothing left for khugepaged to collapse")
    }
}
