import XCTest
import Glibc
import GuestMemory
import Virtio
@testable import Devices

/// Plays the virtio-rng driver over real guest memory and a real SplitQueue; the device
/// fills buffers from the real getrandom(2) unless a test gives another source.
final class RngHarness {
    static let desc: UInt64 = 0x1000
    static let avail: UInt64 = 0x3000
    static let used: UInt64 = 0x4000
    let mem: GuestMemory
    let device: VirtioRng
    let sink = RecordingSink()
    let size: UInt16 = 8
    var nextDesc = 0
    var nextAddr: UInt64 = 0x10000
    var availIdx: UInt16 = 0

    init(source: RandomSource? = nil, eventIdx: Bool = false) throws {
        mem = try GuestMemory(layout: [(base: 0, size: 0x40_0000)])
        device = source.map { VirtioRng(name: "trng", source: $0) } ?? VirtioRng(name: "trng")
        var f = device.deviceFeatures
        if !eventIdx { f &= ~VirtioFeature.eventIdx }
        let q = try SplitQueue(memory: mem, layout: QueueLayout(size: UInt32(size), descTable: RngHarness.desc,
                                                               availRing: RngHarness.avail, usedRing: RngHarness.used),
                               maxSize: VirtioRngLimits.queueSize, eventIdx: eventIdx, indirectDescriptors: true)
        try device.activate(queues: [q], memory: mem, features: f, interrupt: sink)
    }

    deinit { device.reset() }

    var handler: RngQueue { device.queueHandlers[0] as! RngQueue }

    func alloc(_ len: Int, fill: UInt8) -> UInt64 {
        let a = nextAddr
        nextAddr += UInt64((len + 15) & ~15) + 16
        try! mem.write([UInt8](repeating: fill, count: len), at: a)
        return a
    }

    /// A chain of `parts` written into the descriptor table and offered; returns its head.
    @discardableResult
    func offer(_ parts: [(addr: UInt64, len: UInt32, writable: Bool)]) -> UInt16 {
        let first = nextDesc
        for (k, p) in parts.enumerated() {
            let i = first + k
            let last = k == parts.count - 1
            var flags: UInt16 = p.writable ? VirtqDesc.write : 0
            if !last { flags |= VirtqDesc.next }
            let d = RngHarness.desc + UInt64(16 * i)
            try! mem.store(p.addr, at: d)
            try! mem.store(p.len, at: d + 8)
            try! mem.store(flags, at: d + 12)
            try! mem.store(UInt16(last ? 0 : i + 1), at: d + 14)
        }
        nextDesc += parts.count
        try! mem.store(UInt16(first), at: RngHarness.avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try! mem.store(availIdx, at: RngHarness.avail + 2)
        return UInt16(first)
    }

    var usedIdx: UInt16 { try! mem.load(at: RngHarness.used + 2) }
    func usedElem(_ slot: Int) -> (id: UInt32, len: UInt32) {
        (try! mem.load(at: RngHarness.used + 4 + 8 * UInt64(slot)), try! mem.load(at: RngHarness.used + 8 + 8 * UInt64(slot)))
    }
    func bytes(_ addr: UInt64, _ n: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: n)
        b.withUnsafeMutableBytes { try! mem.read(into: $0, at: addr) }
        return b
    }
}

final class RngTests: XCTestCase {
    func testDeclaresEntropyDeviceWithOneQueueAndNoConfig() throws {
        let d = VirtioRng()
        XCTAssertEqual(d.deviceType, 4)
        XCTAssertEqual(d.queueMaxSizes, [VirtioRngLimits.queueSize])
        XCTAssertEqual(d.configSize, 0)
        // No device-specific feature bits (0-23): only VERSION_1 and ring features.
        XCTAssertEqual(d.deviceFeatures & 0xff_ffff, 0)
        XCTAssertNotEqual(d.deviceFeatures & VirtioFeature.version1, 0)
        XCTAssertTrue(d.queueHandlers.isEmpty, "nothing runs before activate")
    }

    func testFillsEveryWritableSegmentWithRandomBytes() throws {
        let h = try RngHarness()
        let a = h.alloc(100, fill: 0)
        let b = h.alloc(4096, fill: 0)
        let head = h.offer([(a, 100, true), (b, 4096, true)])
        let c = h.alloc(16, fill: 0)
        let head2 = h.offer([(c, 16, true)])
        h.handler.kicked()
        XCTAssertEqual(h.usedIdx, 2)
        XCTAssertEqual(h.usedElem(0).id, UInt32(head))
        XCTAssertEqual(h.usedElem(0).len, 4196)
        XCTAssertEqual(h.usedElem(1).id, UInt32(head2))
        XCTAssertEqual(h.usedElem(1).len, 16)
        // 4 KiB of getrandom output holds (nearly) every byte value; zeroes would hold one.
        XCTAssertGreaterThan(Set(h.bytes(b, 4096)).count, 200)
        XCTAssertGreaterThan(Set(h.bytes(a, 100)).count, 40)
        XCTAssertNotEqual(h.bytes(a, 100), h.bytes(b, 100), "not one block repeated")
        XCTAssertFalse(h.sink.needsReset)
        XCTAssertEqual(h.sink.used, 1, "one interrupt for the batch")
        XCTAssertEqual(h.device.stats.served, 2)
        XCTAssertEqual(h.device.stats.bytes, 4212)
        XCTAssertEqual(h.device.stats.notifications, 1)
    }

    func testOneChainGetsAtMost64KiB() throws {
        let h = try RngHarness()
        let big = 128 << 10
        let a = h.alloc(big, fill: 0xA5)
        h.offer([(a, UInt32(big), true)])
        h.handler.kicked()
        XCTAssertEqual(h.usedIdx, 1)
        XCTAssertEqual(h.usedElem(0).len, VirtioRngLimits.maxBytesPerChain)
        let limit = Int(VirtioRngLimits.maxBytesPerChain)
        XCTAssertEqual(Set(h.bytes(a + UInt64(limit), big - limit)), [0xA5], "nothing written past the limit")
        XCTAssertGreaterThan(Set(h.bytes(a + UInt64(limit) - 4096, 4096)).count, 200, "written up to the limit")
    }

    func testReadableBufferIsABrokenDriver() throws {
        let h = try RngHarness()
        let r = h.alloc(16, fill: 0x11)
        let w = h.alloc(16, fill: 0x22)
        h.offer([(r, 16, false), (w, 16, true)])
        let later = h.alloc(16, fill: 0x33)
        h.offer([(later, 16, true)])
        h.handler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(h.usedIdx, 0, "nothing returned")
        XCTAssertEqual(h.bytes(r, 16), [UInt8](repeating: 0x11, count: 16), "readable buffer untouched")
        XCTAssertEqual(h.bytes(w, 16), [UInt8](repeating: 0x22, count: 16))
        XCTAssertEqual(h.bytes(later, 16), [UInt8](repeating: 0x33, count: 16), "the queue stopped")
        h.handler.kicked()
        XCTAssertEqual(h.usedIdx, 0, "stays stopped until a reset")
    }

    func testChainWithoutWritableBytesIsABrokenDriver() throws {
        let h = try RngHarness()
        let w = h.alloc(16, fill: 0)
        h.offer([(w, 0, true)])  // one zero-length writable descriptor
        h.handler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(h.usedIdx, 0)
    }

    func testBufferOutsideGuestMemoryIsABrokenDriver() throws {
        let h = try RngHarness()
        h.offer([(0x40_0000 - 8, 64, true)])  // runs past the end of RAM
        h.handler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(h.usedIdx, 0)
    }

    func testFailingSourceReturnsWhatWasWritten() throws {
        let h = try RngHarness(source: { _ in -Int(EIO) })
        let a = h.alloc(32, fill: 0x5A)
        h.offer([(a, 32, true)])
        h.handler.kicked()
        XCTAssertFalse(h.sink.needsReset, "a host failure is not the guest's")
        XCTAssertEqual(h.usedIdx, 1)
        XCTAssertEqual(h.usedElem(0).len, 0)
        XCTAssertEqual(h.bytes(a, 32), [UInt8](repeating: 0x5A, count: 32))
    }

    func testResetStopsAndReactivationServesAgain() throws {
        let h = try RngHarness()
        let old = h.handler
        h.device.reset()
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
        old.quiesce()  // idempotent after the reset
        let a = h.alloc(8, fill: 0)
        h.offer([(a, 8, true)])
        old.kicked()
        XCTAssertEqual(h.usedIdx, 0, "a stopped handler serves nothing")
    }

    func testGetrandomFill() {
        var b = [UInt8](repeating: 0, count: 1 << 16)
        XCTAssertEqual(b.withUnsafeMutableBytes { getrandomFill($0) }, 1 << 16)
        XCTAssertGreaterThan(Set(b).count, 250)
        XCTAssertEqual(getrandomFill(UnsafeMutableRawBufferPointer(start: nil, count: 0)), 0)
    }
}
