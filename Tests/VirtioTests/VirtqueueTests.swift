import Glibc
import XCTest
import GuestMemory
@testable import Virtio

final class VirtqueueSetupTests: XCTestCase {
    func testSizeMustBePowerOfTwoWithinMax() throws {
        let h = try QueueHarness(size: 8)
        for bad: UInt32 in [0, 3, 6, 12, 255, 512, 65536, 0x8000_0001] {
            var l = h.layout
            l.size = bad
            assertThrows(VirtqueueError.invalidSize(bad, max: 256)) { try SplitQueue.validate(l, maxSize: 256, memory: h.mem) }
        }
        for good: UInt32 in [1, 2, 4, 256] {
            var l = h.layout
            l.size = good
            l.usedRing = 0x8000
            XCTAssertNoThrow(try SplitQueue.validate(l, maxSize: 256, memory: h.mem))
        }
        // The spec maximum, 32768, with a device that allows it.
        let big = QueueLayout(size: 32768, descTable: 0x10_0000, availRing: 0x20_0000, usedRing: 0x30_0000)
        let m = try GuestMemory(layout: [(0, 0x40_0000)])
        XCTAssertNoThrow(try SplitQueue.validate(big, maxSize: 32768, memory: m))
        assertThrows(VirtqueueError.invalidSize(32768, max: 16384)) { try SplitQueue.validate(big, maxSize: 16384, memory: m) }
    }

    func testRingsMisaligned() throws {
        let h = try QueueHarness()
        var l = h.layout
        l.descTable = 0x1008
        assertThrows(VirtqueueError.misaligned(.descriptorTable, address: 0x1008)) { try SplitQueue.validate(l, maxSize: 256, memory: h.mem) }
        l = h.layout
        l.availRing = 0x3001
        assertThrows(VirtqueueError.misaligned(.availRing, address: 0x3001)) { try SplitQueue.validate(l, maxSize: 256, memory: h.mem) }
        l = h.layout
        l.usedRing = 0x4002
        assertThrows(VirtqueueError.misaligned(.usedRing, address: 0x4002)) { try SplitQueue.validate(l, maxSize: 256, memory: h.mem) }
        // Exactly the required alignments are fine.
        l = QueueLayout(size: 8, descTable: 0x1010, availRing: 0x3002, usedRing: 0x4004)
        XCTAssertNoThrow(try SplitQueue.validate(l, maxSize: 256, memory: h.mem))
    }

    func testRingsOutsideRAMChecksFullSizes() throws {
        // RAM [0, 1 MiB) and [2 MiB, 3 MiB).
        let h = try QueueHarness(size: 8, extraRegion: (0x20_0000, 0x10_0000))
        let end: UInt64 = 0x10_0000
        func check(_ l: QueueLayout, _ e: VirtqueueError?) {
            if let e {
                assertThrows(e) { try SplitQueue.validate(l, maxSize: 256, memory: h.mem) }
            } else {
                XCTAssertNoThrow(try SplitQueue.validate(l, maxSize: 256, memory: h.mem))
            }
        }
        // Descriptor table: 128 bytes; fits exactly at the end, one slot past does not.
        check(QueueLayout(size: 8, descTable: end - 128, availRing: 0x3000, usedRing: 0x4000), nil)
        check(QueueLayout(size: 8, descTable: end - 112, availRing: 0x3000, usedRing: 0x4000),
              .ringOutOfBounds(.descriptorTable, address: end - 112, length: 128))
        // Avail ring: 6 + 16 = 22 bytes (includes used_event).
        check(QueueLayout(size: 8, descTable: 0x1000, availRing: end - 22, usedRing: 0x4000), nil)
        check(QueueLayout(size: 8, descTable: 0x1000, availRing: end - 20, usedRing: 0x4000),
              .ringOutOfBounds(.availRing, address: end - 20, length: 22))
        // Used ring: 6 + 64 = 70 bytes (includes avail_event); straddling into the hole.
        check(QueueLayout(size: 8, descTable: 0x1000, availRing: 0x3000, usedRing: end - 68),
              .ringOutOfBounds(.usedRing, address: end - 68, length: 70))
        // In the hole, in the second region, far away, near 2^64.
        check(QueueLayout(size: 8, descTable: 0x18_0000, availRing: 0x3000, usedRing: 0x4000),
              .ringOutOfBounds(.descriptorTable, address: 0x18_0000, length: 128))
        check(QueueLayout(size: 8, descTable: 0x20_0000, availRing: 0x20_1000, usedRing: 0x20_2000), nil)
        check(QueueLayout(size: 8, descTable: 0x1000, availRing: 0x3000, usedRing: 0xFFFF_FFFF_FFFF_FFF0),
              .ringOutOfBounds(.usedRing, address: 0xFFFF_FFFF_FFFF_FFF0, length: 70))
        // Straddling two regions is rejected even though both sides are RAM-adjacent? (not adjacent here)
        check(QueueLayout(size: 8, descTable: 0x20_0000 - 64, availRing: 0x3000, usedRing: 0x4000),
              .ringOutOfBounds(.descriptorTable, address: 0x20_0000 - 64, length: 128))
    }
}

final class DescriptorChainTests: XCTestCase {
    func testHappyPathReadableThenWritable() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        XCTAssertNil(try q.popAvailable())
        try h.mem.write([1, 2, 3, 4, 5, 6, 7, 8], at: 0x8000)
        try h.mem.write([9, 10, 11, 12], at: 0x9000)
        h.desc(0, addr: 0x8000, len: 8, flags: VirtqDesc.next, next: 5)
        h.desc(5, addr: 0x9000, len: 4, flags: VirtqDesc.next, next: 2)
        h.desc(2, addr: 0xA000, len: 16, flags: VirtqDesc.write | VirtqDesc.next, next: 3)
        h.desc(3, addr: 0xB000, len: 1, flags: VirtqDesc.write)
        h.offer(0)
        XCTAssertEqual(try q.availableCount(), 1)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(c.head, 0)
        XCTAssertEqual(c.segments.count, 4)
        XCTAssertEqual(c.readableCount, 2)
        XCTAssertEqual(c.readableLength, 12)
        XCTAssertEqual(c.writableLength, 17)
        XCTAssertEqual(c.descriptorCount, 4)
        XCTAssertEqual(c.segments.map(\.address), [0x8000, 0x9000, 0xA000, 0xB000])
        XCTAssertEqual(c.segments.map(\.isWritable), [false, false, true, true])
        let r = c.readableIovecs()
        XCTAssertEqual(r.map(\.iov_len), [8, 4])
        XCTAssertEqual(r[0].iov_base, try h.mem.pointer(0x8000, length: 8))
        XCTAssertEqual(c.writableIovecs().map(\.iov_len), [16, 1])
        // Gather across segments.
        var buf = [UInt8](repeating: 0, count: 6)
        XCTAssertEqual(buf.withUnsafeMutableBytes { c.readReadable(into: $0, offset: 6) }, 6)
        XCTAssertEqual(buf, [7, 8, 9, 10, 11, 12])
        // Scatter across segments, clamped at the end.
        XCTAssertEqual(c.writeWritable([UInt8](repeating: 0xEE, count: 20), offset: 14), 3)
        XCTAssertEqual(try h.mem.readBytes(at: 0xA00E, count: 2), [0xEE, 0xEE])
        XCTAssertEqual(try h.mem.load(UInt8.self, at: 0xB000), 0xEE)
        // Data part of a blk-like request: skip 4 readable bytes, take 6.
        XCTAssertEqual(c.iovecs(writable: false, skipping: 4, length: 6).map(\.iov_len), [4, 2])
        XCTAssertEqual(c.iovecs(writable: true, skipping: 0, length: 16).map(\.iov_len), [16])
        XCTAssertNil(try q.popAvailable())
    }

    func testHeadIndexOutOfRangeBreaksQueue() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        h.offer(8)
        assertThrows(VirtqueueError.headOutOfRange(head: 8, size: 8)) { _ = try q.popAvailable() }
        // Broken for good: later pops rethrow even with a valid head.
        h.desc(0, addr: 0x8000, len: 4)
        h.offer(0)
        assertThrows(VirtqueueError.headOutOfRange(head: 8, size: 8)) { _ = try q.popAvailable() }
        XCTAssertNotNil(q.brokenBy)
    }

    func testNextIndexOutOfRange() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 8)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .nextOutOfRange(index: 8, tableSize: 8))) { _ = try q.popAvailable() }
        // A bad chain does not break the queue: the head can be returned and work goes on.
        XCTAssertNil(q.brokenBy)
        try q.addUsed(head: 0, length: 0)
        h.desc(1, addr: 0x8000, len: 4)
        h.offer(1)
        XCTAssertEqual(try q.popAvailable()?.head, 1)
    }

    func testTwoDescriptorLoop() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 1)
        h.desc(1, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 0)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .chainTooLong(limit: 8))) { _ = try q.popAvailable() }
        // A self-loop too.
        h.desc(2, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 2)
        h.offer(2)
        assertThrows(VirtqueueError.badChain(head: 2, .chainTooLong(limit: 8))) { _ = try q.popAvailable() }
    }

    func testChainOfExactlySizeIsFineOneMoreIsNot() throws {
        let h = try QueueHarness(size: 4)
        let q = try h.queue()
        for i in 0..<4 { h.desc(i, addr: 0x8000, len: 4, flags: i < 3 ? VirtqDesc.next : 0, next: UInt16(i + 1)) }
        h.offer(0)
        XCTAssertEqual(try q.popAvailable()?.descriptorCount, 4)
        // Now make the last one point back to the first: 5+ descriptors.
        h.desc(3, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 0)
        h.offer(1)
        assertThrows(VirtqueueError.badChain(head: 1, .chainTooLong(limit: 4))) { _ = try q.popAvailable() }
    }

    func testReadableAfterWritable() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 1)
        h.desc(1, addr: 0x9000, len: 4, flags: VirtqDesc.write | VirtqDesc.next, next: 2)
        h.desc(2, addr: 0xA000, len: 4)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .readableAfterWritable)) { _ = try q.popAvailable() }
    }

    func testBufferOutsideRAM() throws {
        let h = try QueueHarness(extraRegion: (0x20_0000, 0x1000))
        let q = try h.queue()
        let cases: [(UInt64, UInt32)] = [
            (0x10_0000, 1),                 // just past the end of RAM
            (0x10_0000 - 4, 8),             // straddling the end of the first region
            (0x20_0000 - 1, 2),             // straddling into the second region from the hole
            (0x20_0800, 0x1000),            // straddling the end of the second region
            (0xFFFF_FFFF_FFFF_FFF0, 0x100), // addr+len overflows u64
            (UInt64.max, 1),
        ]
        for (i, (a, l)) in cases.enumerated() {
            h.desc(i, addr: a, len: l)
            h.offer(UInt16(i))
            assertThrows(VirtqueueError.badChain(head: UInt16(i), .bufferOutOfBounds(address: a, length: l))) { _ = try q.popAvailable() }
        }
        // Right up to the end of each region is fine.
        h.desc(7, addr: 0x10_0000 - 8, len: 8, flags: VirtqDesc.next, next: 6)
        h.desc(6, addr: 0x20_0000, len: 0x1000, flags: VirtqDesc.write)
        h.offer(7)
        XCTAssertEqual(try q.popAvailable()?.writableLength, 0x1000)
    }

    /// Decision: zero-length descriptors are allowed (the spec does not forbid them); their
    /// address must still be inside RAM (or at a region's end), they keep the
    /// readable/writable order and count towards the chain length, and they produce no
    /// segment or iovec.
    func testZeroLengthDescriptors() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        h.desc(0, addr: 0x8000, len: 0, flags: VirtqDesc.next, next: 1)
        h.desc(1, addr: 0x9000, len: 4, flags: VirtqDesc.next, next: 2)
        h.desc(2, addr: 0x10_0000, len: 0, flags: VirtqDesc.write)  // at the end of RAM: allowed
        h.offer(0)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(c.segments.count, 1)
        XCTAssertEqual(c.descriptorCount, 3)
        XCTAssertEqual(c.readableLength, 4)
        XCTAssertEqual(c.writableLength, 0)
        XCTAssertTrue(c.writableIovecs().isEmpty)
        // Outside RAM, even with length 0: error.
        h.desc(3, addr: 0x50_0000, len: 0)
        h.offer(3)
        assertThrows(VirtqueueError.badChain(head: 3, .bufferOutOfBounds(address: 0x50_0000, length: 0))) { _ = try q.popAvailable() }
        // Ordering still applies to zero-length descriptors.
        h.desc(4, addr: 0x8000, len: 4, flags: VirtqDesc.write | VirtqDesc.next, next: 5)
        h.desc(5, addr: 0x8000, len: 0)
        h.offer(4)
        assertThrows(VirtqueueError.badChain(head: 4, .readableAfterWritable)) { _ = try q.popAvailable() }
    }

    func testTotalLengthBounded() throws {
        // One 2 GiB region (MAP_NORESERVE: nothing is committed).
        let mem = try GuestMemory(layout: [(0, 0x8000_0000)])
        let l = QueueLayout(size: 4, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000)
        let q = try SplitQueue(memory: mem, layout: l)
        QueueHarness.writeDesc(mem, table: 0x1000, 0, addr: 0, len: 0x8000_0000, flags: VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(mem, table: 0x1000, 1, addr: 0, len: 0x7FFF_FFFF, flags: VirtqDesc.write | VirtqDesc.next, next: 2)
        QueueHarness.writeDesc(mem, table: 0x1000, 2, addr: 0, len: 1, flags: VirtqDesc.write)
        try mem.store(UInt16(0), at: 0x2004)
        try mem.store(UInt16(1), at: 0x2002)
        assertThrows(VirtqueueError.badChain(head: 0, .totalLengthTooLarge)) { _ = try q.popAvailable() }
        // Exactly UInt32.max is allowed.
        QueueHarness.writeDesc(mem, table: 0x1000, 1, addr: 0, len: 0x7FFF_FFFF, flags: VirtqDesc.write)
        try mem.store(UInt16(0), at: 0x2006)
        try mem.store(UInt16(2), at: 0x2002)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(UInt64(c.readableLength) + UInt64(c.writableLength), UInt64(UInt32.max))
    }

    func testAvailIndexJump() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        for i in 0..<8 { h.desc(i, addr: 0x8000, len: 4) }
        // A jump of exactly the queue size is legal.
        h.setAvailIdx(8)
        XCTAssertEqual(try q.availableCount(), 8)
        for _ in 0..<8 { XCTAssertNotNil(try q.popAvailable()) }
        XCTAssertNil(try q.popAvailable())
        // 8 -> 17: nine new entries in an 8-slot ring.
        h.setAvailIdx(17)
        assertThrows(VirtqueueError.availIndexJump(lastSeen: 8, availIdx: 17, size: 8)) { _ = try q.popAvailable() }
        // Broken: even putting the index back does not help.
        h.setAvailIdx(9)
        assertThrows(VirtqueueError.availIndexJump(lastSeen: 8, availIdx: 17, size: 8)) { _ = try q.popAvailable() }
        // Going backwards is a huge forward jump in u16 arithmetic.
        let h2 = try QueueHarness()
        let q2 = try h2.queue()
        h2.setAvailIdx(0xFFFF)
        assertThrows(VirtqueueError.availIndexJump(lastSeen: 0, availIdx: 0xFFFF, size: 8)) { _ = try q2.popAvailable() }
    }

    func testIndicesWrapAcross65535() throws {
        let h = try QueueHarness(size: 4)
        let q = try h.queue()
        for i in 0..<4 { h.desc(i, addr: 0x8000 + UInt64(i) * 0x100, len: 16, flags: VirtqDesc.write) }
        var last: UInt16 = 0
        for n in 0..<(65536 + 10) {
            let head = UInt16(n % 4)
            h.offer(head)
            let c = try XCTUnwrap(try q.popAvailable())
            XCTAssertEqual(c.head, head)
            try q.addUsed(head: head, length: UInt32(n & 0xFF))
            let idx = h.usedIdx
            XCTAssertEqual(idx, last &+ 1)
            last = idx
            let e = h.usedElem(Int((idx &- 1) % 4))
            if e.id != UInt32(head) || e.len != UInt32(n & 0xFF) { XCTFail("used element \(n): \(e)"); break }
        }
        XCTAssertEqual(h.usedIdx, 10)
        XCTAssertEqual(q.nextAvail, 10)
    }

    func testUsedRingBatchingAndPublicationOrder() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        for i in 0..<3 { h.desc(i, addr: 0x8000, len: 4, flags: VirtqDesc.write); h.offer(UInt16(i)) }
        var heads: [UInt16] = []
        while let c = try q.popAvailable() { heads.append(c.head) }
        XCTAssertEqual(heads, [0, 1, 2])
        // Out-of-order completion, staged: elements written, idx not yet published.
        try q.stageUsed(head: 2, length: 4)
        try q.stageUsed(head: 0, length: 1)
        XCTAssertEqual(h.usedIdx, 0)
        XCTAssertEqual(h.usedElem(0).id, 2)
        XCTAssertEqual(h.usedElem(1).id, 0)
        XCTAssertEqual(h.usedElem(1).len, 1)
        q.publishUsed()
        XCTAssertEqual(h.usedIdx, 2)
        try q.addUsed(head: 1, length: 3)
        XCTAssertEqual(h.usedIdx, 3)
        // More used entries than popped chains, or a head >= size: device bug, refused.
        assertThrows(VirtqueueError.invalidUsed(head: 1)) { try q.addUsed(head: 1, length: 0) }
        h.desc(3, addr: 0x8000, len: 4)
        h.offer(3)
        _ = try q.popAvailable()
        assertThrows(VirtqueueError.invalidUsed(head: 8)) { try q.addUsed(head: 8, length: 0) }
        XCTAssertEqual(h.usedIdx, 3)
    }
}

final class IndirectDescriptorTests: XCTestCase {
    let table: UInt64 = 0x6000

    func indirectHarness() throws -> (QueueHarness, SplitQueue) {
        let h = try QueueHarness()
        return (h, try h.queue(indirect: true))
    }

    func testIndirectHappyPath() throws {
        let (h, q) = try indirectHarness()
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 16, flags: VirtqDesc.next, next: 2)
        QueueHarness.writeDesc(h.mem, table: table, 2, addr: 0x9000, len: 512, flags: VirtqDesc.write | VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(h.mem, table: table, 1, addr: 0xA000, len: 1, flags: VirtqDesc.write)
        // The WRITE flag on the descriptor pointing at the table is ignored.
        h.desc(3, addr: table, len: 48, flags: VirtqDesc.indirect | VirtqDesc.write)
        h.offer(3)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(c.head, 3)
        XCTAssertEqual(c.readableLength, 16)
        XCTAssertEqual(c.writableLength, 513)
        XCTAssertEqual(c.segments.map(\.address), [0x8000, 0x9000, 0xA000])
        XCTAssertEqual(c.descriptorCount, 4)
    }

    func testDirectDescriptorsThenIndirect() throws {
        // §2.7.5.3.2: zero or more direct descriptors followed by one indirect one.
        let (h, q) = try indirectHarness()
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x9000, len: 8, flags: VirtqDesc.write)
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 1)
        h.desc(1, addr: table, len: 16, flags: VirtqDesc.indirect)
        h.offer(0)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(c.readableLength, 4)
        XCTAssertEqual(c.writableLength, 8)
    }

    func testIndirectWithoutFeature() throws {
        let h = try QueueHarness()
        let q = try h.queue(indirect: false)
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 16)
        h.desc(0, addr: table, len: 16, flags: VirtqDesc.indirect)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .indirectNotNegotiated)) { _ = try q.popAvailable() }
    }

    func testIndirectBadLengths() throws {
        let (h, q) = try indirectHarness()
        var head: UInt16 = 0
        for len: UInt32 in [0, 8, 17, 40, UInt32(16 * (SplitQueue.maxIndirectDescriptors + 1)), UInt32.max & ~15] {
            h.desc(Int(head), addr: table, len: len, flags: VirtqDesc.indirect)
            h.offer(head)
            assertThrows(VirtqueueError.badChain(head: head, .indirectBadLength(len))) { _ = try q.popAvailable() }
            head += 1
        }
        // The largest table allowed is fine (its entries are zero-length readable descriptors at 0).
        h.desc(7, addr: 0x10000, len: UInt32(16 * SplitQueue.maxIndirectDescriptors), flags: VirtqDesc.indirect)
        h.offer(7)
        XCTAssertNotNil(try q.popAvailable())
    }

    func testIndirectTableOutsideRAM() throws {
        let (h, q) = try indirectHarness()
        h.desc(0, addr: 0x10_0000 - 16, len: 32, flags: VirtqDesc.indirect)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .indirectOutOfBounds(address: 0x10_0000 - 16, length: 32))) { _ = try q.popAvailable() }
        h.desc(1, addr: 0xFFFF_FFFF_FFFF_FFF0, len: 32, flags: VirtqDesc.indirect)
        h.offer(1)
        assertThrows(VirtqueueError.badChain(head: 1, .indirectOutOfBounds(address: 0xFFFF_FFFF_FFFF_FFF0, length: 32))) { _ = try q.popAvailable() }
    }

    func testNestedIndirect() throws {
        let (h, q) = try indirectHarness()
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(h.mem, table: table, 1, addr: 0x7000, len: 16, flags: VirtqDesc.indirect)
        QueueHarness.writeDesc(h.mem, table: 0x7000, 0, addr: 0x8000, len: 4)
        h.desc(0, addr: table, len: 32, flags: VirtqDesc.indirect)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .nestedIndirect)) { _ = try q.popAvailable() }
    }

    func testIndirectWithNext() throws {
        let (h, q) = try indirectHarness()
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4)
        h.desc(0, addr: table, len: 16, flags: VirtqDesc.indirect | VirtqDesc.next, next: 1)
        h.desc(1, addr: 0x8000, len: 4)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .indirectWithNext)) { _ = try q.popAvailable() }
    }

    func testIndicesAndLoopsInsideTable() throws {
        let (h, q) = try indirectHarness()
        // next past the 2-entry table (but < queue size).
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 2)
        h.desc(0, addr: table, len: 32, flags: VirtqDesc.indirect)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .nextOutOfRange(index: 2, tableSize: 2))) { _ = try q.popAvailable() }
        // A loop inside the table.
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(h.mem, table: table, 1, addr: 0x8000, len: 4, flags: VirtqDesc.next, next: 0)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .chainTooLong(limit: 2))) { _ = try q.popAvailable() }
        // Readable after writable inside the table.
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4, flags: VirtqDesc.write | VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(h.mem, table: table, 1, addr: 0x8000, len: 4)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .readableAfterWritable)) { _ = try q.popAvailable() }
        // A buffer outside RAM inside the table.
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x20_0000, len: 4)
        h.offer(0)
        assertThrows(VirtqueueError.badChain(head: 0, .bufferOutOfBounds(address: 0x20_0000, length: 4))) { _ = try q.popAvailable() }
        // A writable direct descriptor before an indirect table holding a readable one.
        QueueHarness.writeDesc(h.mem, table: table, 0, addr: 0x8000, len: 4)
        h.desc(1, addr: 0x9000, len: 4, flags: VirtqDesc.write | VirtqDesc.next, next: 2)
        h.desc(2, addr: table, len: 16, flags: VirtqDesc.indirect)
        h.offer(1)
        assertThrows(VirtqueueError.badChain(head: 1, .readableAfterWritable)) { _ = try q.popAvailable() }
    }
}

final class NotificationTests: XCTestCase {
    func testNeedEventMathAtWrap() {
        typealias Q = SplitQueue
        // Crossing the event exactly.
        XCTAssertTrue(Q.needEvent(event: 0, new: 1, old: 0))
        XCTAssertFalse(Q.needEvent(event: 1, new: 1, old: 0))
        XCTAssertTrue(Q.needEvent(event: 5, new: 10, old: 5))
        XCTAssertFalse(Q.needEvent(event: 10, new: 10, old: 5))
        XCTAssertFalse(Q.needEvent(event: 4, new: 10, old: 5))  // event already passed before old
        // Across 65535 -> 0.
        XCTAssertTrue(Q.needEvent(event: 0xFFFF, new: 0, old: 0xFFFF))
        XCTAssertTrue(Q.needEvent(event: 0xFFFE, new: 2, old: 0xFFFD))
        XCTAssertTrue(Q.needEvent(event: 0, new: 1, old: 0xFFFF))
        XCTAssertTrue(Q.needEvent(event: 1, new: 3, old: 0xFFFE))
        XCTAssertFalse(Q.needEvent(event: 3, new: 3, old: 0xFFFE))
        XCTAssertFalse(Q.needEvent(event: 0xFFFD, new: 3, old: 0xFFFE))
        // Nothing new: never.
        XCTAssertFalse(Q.needEvent(event: 0x1234, new: 0x1234, old: 0x1234))
        XCTAssertFalse(Q.needEvent(event: 0x1233, new: 0x1234, old: 0x1234))
    }

    func popAndComplete(_ h: QueueHarness, _ q: SplitQueue, _ n: Int) throws {
        for _ in 0..<n {
            h.offer(0)
            let c = try XCTUnwrap(try q.popAvailable())
            try q.addUsed(head: c.head, length: 0)
        }
    }

    func testNeedsNotificationWithEventIdx() throws {
        let h = try QueueHarness()
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.write)
        let q = try h.queue(eventIdx: true)
        XCTAssertFalse(q.needsNotification())     // nothing published yet
        try popAndComplete(h, q, 1)
        XCTAssertTrue(q.needsNotification())      // first time: always
        XCTAssertFalse(q.needsNotification())     // nothing new since
        h.usedEvent = 3                            // "interrupt me when used idx passes 3"
        try popAndComplete(h, q, 2)               // used idx 3
        XCTAssertFalse(q.needsNotification())
        try popAndComplete(h, q, 1)               // used idx 4: crossed 3
        XCTAssertTrue(q.needsNotification())
        h.usedEvent = 2                           // stale (behind): no interrupt
        try popAndComplete(h, q, 1)               // used idx 5
        XCTAssertFalse(q.needsNotification())
        // used_event set to an index the device published and checked without asking
        // (the driver then finds those entries itself): not owed later.
        try popAndComplete(h, q, 1)               // used idx 6
        XCTAssertFalse(q.needsNotification())
        h.usedEvent = 5
        try popAndComplete(h, q, 1)               // used idx 7
        XCTAssertFalse(q.needsNotification())
        h.usedEvent = 7                           // the next one: crossed at idx 8
        try popAndComplete(h, q, 1)
        XCTAssertTrue(q.needsNotification())
    }

    func testNeedsNotificationWithoutEventIdx() throws {
        let h = try QueueHarness()
        h.desc(0, addr: 0x8000, len: 4, flags: VirtqDesc.write)
        let q = try h.queue()
        XCTAssertFalse(q.needsNotification())  // nothing published yet
        try popAndComplete(h, q, 1)
        XCTAssertTrue(q.needsNotification())
        XCTAssertFalse(q.needsNotification())
        h.availFlags = VirtqRingFlags.availNoInterrupt
        try popAndComplete(h, q, 1)
        XCTAssertFalse(q.needsNotification())
        h.availFlags = 0
        XCTAssertTrue(q.needsNotification())
    }

    func testDriverNotificationSuppressionWithoutEventIdx() throws {
        let h = try QueueHarness()
        let q = try h.queue()
        q.disableNotifications()
        XCTAssertEqual(h.usedFlags, VirtqRingFlags.usedNoNotify)
        XCTAssertFalse(q.enableNotifications())
        XCTAssertEqual(h.usedFlags, 0)
        // A buffer that arrived while notifications were off: enable says "go on".
        q.disableNotifications()
        h.desc(0, addr: 0x8000, len: 4)
        h.offer(0)
        XCTAssertTrue(q.enableNotifications())
        XCTAssertNotNil(try q.popAvailable())
        XCTAssertFalse(q.enableNotifications())
    }

    func testDriverNotificationSuppressionWithEventIdx() throws {
        let h = try QueueHarness()
        let q = try h.queue(eventIdx: true)
        h.desc(0, addr: 0x8000, len: 4)
        q.disableNotifications()
        XCTAssertEqual(h.usedFlags, 0)  // EVENT_IDX: flags are not used
        for _ in 0..<3 { h.offer(0) }
        XCTAssertTrue(q.enableNotifications())
        XCTAssertEqual(h.availEvent, 0)
        while try q.popAvailable() != nil {}
        XCTAssertFalse(q.enableNotifications())
        XCTAssertEqual(h.availEvent, 3)  // "kick me when avail idx passes 3"
    }
}
