import Glibc
import GuestMemory
@testable import Virtio

/// Plays the driver: lays out a split queue by hand in real (small) guest memory.
final class QueueHarness {
    let mem: GuestMemory
    let size: UInt16
    let descAddr: UInt64
    let availAddr: UInt64
    let usedAddr: UInt64
    var availIdx: UInt16 = 0

    /// RAM [0, ramSize); desc 0x1000, avail 0x3000, used 0x4000 unless given.
    init(size: UInt16 = 8, ramSize: UInt64 = 0x10_0000, extraRegion: (UInt64, UInt64)? = nil,
         desc: UInt64 = 0x1000, avail: UInt64 = 0x3000, used: UInt64 = 0x4000) throws {
        var layout: [(base: UInt64, size: UInt64)] = [(0, ramSize)]
        if let e = extraRegion { layout.append((e.0, e.1)) }
        mem = try GuestMemory(layout: layout)
        self.size = size
        descAddr = desc
        availAddr = avail
        usedAddr = used
    }

    var layout: QueueLayout { QueueLayout(size: UInt32(size), descTable: descAddr, availRing: availAddr, usedRing: usedAddr) }

    func queue(eventIdx: Bool = false, indirect: Bool = false, maxSize: UInt16 = 256) throws -> SplitQueue {
        try SplitQueue(memory: mem, layout: layout, maxSize: maxSize, eventIdx: eventIdx, indirectDescriptors: indirect)
    }

    static func writeDesc(_ mem: GuestMemory, table: UInt64, _ i: Int, addr: UInt64, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        let d = table + UInt64(16 * i)
        try! mem.store(addr, at: d)
        try! mem.store(len, at: d + 8)
        try! mem.store(flags, at: d + 12)
        try! mem.store(next, at: d + 14)
    }

    func desc(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        QueueHarness.writeDesc(mem, table: descAddr, i, addr: addr, len: len, flags: flags, next: next)
    }

    /// Puts `head` in the next avail slot and publishes avail.idx.
    func offer(_ head: UInt16) {
        try! mem.store(head, at: availAddr + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try! mem.store(availIdx, at: availAddr + 2)
    }

    func setAvailIdx(_ v: UInt16) {
        availIdx = v
        try! mem.store(v, at: availAddr + 2)
    }

    var availFlags: UInt16 {
        get { try! mem.load(at: availAddr) }
        set { try! mem.store(newValue, at: availAddr) }
    }
    var usedEvent: UInt16 {
        get { try! mem.load(at: availAddr + 4 + 2 * UInt64(size)) }
        set { try! mem.store(newValue, at: availAddr + 4 + 2 * UInt64(size)) }
    }
    var usedFlags: UInt16 { try! mem.load(at: usedAddr) }
    var usedIdx: UInt16 { try! mem.load(at: usedAddr + 2) }
    var availEvent: UInt16 { try! mem.load(at: usedAddr + 4 + 8 * UInt64(size)) }
    func usedElem(_ slot: Int) -> (id: UInt32, len: UInt32) {
        (try! mem.load(at: usedAddr + 4 + 8 * UInt64(slot)), try! mem.load(at: usedAddr + 8 + 8 * UInt64(slot)))
    }
}

/// Asserts that `body` throws exactly `expected`.
func assertThrows<E: Error & Equatable>(_ expected: E, file: StaticString = #filePath, line: UInt = #line,
                                        _ body: () throws -> Void) {
    do {
        try body()
        XCTFail("expected \(expected), nothing thrown", file: file, line: line)
    } catch let e as E {
        XCTAssertEqual(e, expected, file: file, line: line)
    } catch {
        XCTFail("expected \(expected), got \(error)", file: file, line: line)
    }
}

import XCTest
