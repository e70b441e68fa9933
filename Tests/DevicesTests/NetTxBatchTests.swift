import XCTest
import Glibc
import CLinux
import OS
import GuestMemory
import Virtio
@testable import Devices

/// The tx queue's io_uring batches (NetTxBatching) over a socketpair standing in for the
/// TAP: the same frames, in the same order, as one writev each; hostile chains inside a
/// batch; a peer that cannot take more; batching off.
final class NetTxBatchTests: XCTestCase {
    /// The batching tests need io_uring; a kernel that refuses it runs the writev path,
    /// which every other tx test covers.
    func requireRing() throws {
        do { _ = try IOURing(entries: 4, operations: [clinux_IORING_OP_WRITEV()]) } catch {
            throw XCTSkip("this kernel refuses io_uring (\(error))")
        }
    }

    static func packet(_ k: Int) -> [UInt8] { [UInt8](repeating: 0, count: 12) + frame(100 + k, seed: UInt8(k)) }

    var enters: UInt64 { IOURing.enterCalls.load(ordering: .relaxed) }

    func testFramesQueuedTogetherGoOutInOneSubmissionInOrder() throws {
        try requireRing()
        let h = try NetHarness()
        XCTAssertTrue(h.txHandler.batches)
        let pkts = (0..<8).map(NetTxBatchTests.packet)
        for (k, p) in pkts.enumerated() { h.send(p, split: k % 2 == 0 ? [p.count] : [12, 50, p.count - 62]) }
        let before = enters
        h.txHandler.kicked()
        XCTAssertEqual(enters - before, 1)
        for p in pkts { XCTAssertEqual(h.hostReceive(), p) }
        XCTAssertNil(h.hostReceive())
        XCTAssertEqual(h.tx().usedIdx, 8)
        for s in 0..<8 { XCTAssertEqual(h.tx().usedElem(s).len, 0) }
        XCTAssertEqual(Set((0..<8).map { h.tx().usedElem($0).id }).count, 8)
        XCTAssertEqual(h.device.stats[1].packets, 8)
        XCTAssertEqual(h.device.stats[1].bytes, UInt64(pkts.map { $0.count - 12 }.reduce(0, +)))
        XCTAssertEqual(h.device.stats[1].drops, 0)
        XCTAssertGreaterThan(h.sink.used, 0)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testFewFramesGoOutWithWritev() throws {
        try requireRing()
        let h = try NetHarness()
        let pkts = (0..<(NetTxBatching.minFrames - 1)).map(NetTxBatchTests.packet)
        for p in pkts { h.send(p) }
        let before = enters
        h.txHandler.kicked()
        XCTAssertEqual(enters, before)
        for p in pkts { XCTAssertEqual(h.hostReceive(), p) }
        XCTAssertEqual(Int(h.tx().usedIdx), pkts.count)
    }

    func testBatchingOffWritesEachFrameWithWritev() throws {
        let h = try NetHarness(txBatching: false)
        XCTAssertFalse(h.txHandler.batches)
        let pkts = (0..<8).map(NetTxBatchTests.packet)
        for p in pkts { h.send(p) }
        let before = enters
        h.txHandler.kicked()
        XCTAssertEqual(enters, before)
        for p in pkts { XCTAssertEqual(h.hostReceive(), p) }
        XCTAssertEqual(h.tx().usedIdx, 8)
        XCTAssertEqual(h.device.stats[1].packets, 8)
    }

    func testHostileChainsInsideABatchAreDroppedAndTheRestGoesOut() throws {
        try requireRing()
        let h = try NetHarness()
        var good: [[UInt8]] = []
        for k in 0..<6 {
            let p = NetTxBatchTests.packet(k)
            good.append(p)
            h.send(p)
            switch k {
            case 0: h.send([1, 2, 3])                                    // shorter than the header
            case 1: h.send([])                                           // nothing readable
            case 2: h.tx().offer(h.tx().chain([(h.alloc(64), 64, true)]))  // only writable
            case 3: h.send([UInt8](repeating: 0, count: 12 + VirtioNetLimits.maxGSOFrame + 1))  // too long
            default: break
            }
        }
        let before = enters
        h.txHandler.kicked()
        XCTAssertEqual(enters - before, 1)
        XCTAssertEqual(h.tx().usedIdx, 10)
        XCTAssertEqual(h.device.stats[1].drops, 4)
        XCTAssertEqual(h.device.stats[1].packets, 6)
        for p in good { XCTAssertEqual(h.hostReceive(), p) }
        XCTAssertNil(h.hostReceive())
        XCTAssertFalse(h.sink.needsReset)
    }

    /// The peer's queue fills inside a batch: the frames it cannot take are dropped at
    /// once (RWF_NOWAIT: EAGAIN, as writev on the non-blocking descriptor), the thread
    /// never waits for room, every chain goes back to the guest.
    func testFramesThePeerCannotTakeAreDroppedWithoutWaiting() throws {
        try requireRing()
        let h = try NetHarness()
        var small: Int32 = 4096  // the kernel doubles it: a few datagrams of ~1 KiB truesize
        XCTAssertEqual(setsockopt(h.deviceFDs[0], SOL_SOCKET, SO_SNDBUF, &small, 4), 0)
        let n = 40
        for k in 0..<n { h.send(NetTxBatchTests.packet(k)) }
        h.txHandler.kicked()
        XCTAssertEqual(Int(h.tx().usedIdx), n)
        let sent = Int(h.device.stats[1].packets), dropped = Int(h.device.stats[1].drops)
        XCTAssertEqual(sent + dropped, n)
        XCTAssertGreaterThan(dropped, 0, "the socket's send buffer holds fewer than \(n) datagrams")
        var received = 0
        while h.hostReceive() != nil { received += 1 }
        XCTAssertEqual(received, sent)
        // Room again: the next batch goes out whole.
        for k in 0..<8 { h.send(NetTxBatchTests.packet(k)) }
        h.txHandler.kicked()
        XCTAssertEqual(Int(h.device.stats[1].packets), sent + 8)
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A chain of more buffers than one writev takes, after frames gathered for a batch:
    /// NEEDS_RESET, and the queue writes nothing more; after a reset frames go out again.
    func testTooManyBuffersInsideABatchNeedsReset() throws {
        try requireRing()
        let h = try NetHarness()
        for k in 0..<5 { h.send(NetTxBatchTests.packet(k)) }
        h.offerIndirect(on: h.tx(), first: 12, count: 1024, each: 4, writable: false)
        h.send(NetTxBatchTests.packet(9))
        h.txHandler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        try h.resetAndRestart()
        while h.hostReceive() != nil {}
        let pkts = (0..<6).map(NetTxBatchTests.packet)
        for p in pkts { h.send(p) }
        h.txHandler.kicked()
        for p in pkts { XCTAssertEqual(h.hostReceive(), p) }
        XCTAssertEqual(h.tx().usedIdx, 6)
    }

    /// The budget ends a wake-up in the middle of a long run of frames: what was gathered
    /// goes out before the thread comes back for the rest.
    func testBudgetWithBatches() throws {
        try requireRing()
        let h = try NetHarness(queueSize: 512)
        let n = VirtioNetLimits.budget + 10
        for k in 0..<n { h.send([UInt8](repeating: 0, count: 12) + frame(20, seed: UInt8(truncatingIfNeeded: k))) }
        h.txHandler.kicked()
        XCTAssertEqual(Int(h.tx().usedIdx), VirtioNetLimits.budget)
        XCTAssertEqual(Int(h.device.stats[1].packets + h.device.stats[1].drops), VirtioNetLimits.budget)
        h.txHandler.completionsReady()
        XCTAssertEqual(Int(h.tx().usedIdx), n)
    }

    /// A descriptor that refuses RWF_NOWAIT (EOPNOTSUPP; here a pseudo-terminal, in the
    /// testbed's L1 kernel a TAP): the batch goes out with writev, whole and in order,
    /// and the queue drops its ring.
    func testDescriptorThatRefusesNoWaitGetsWritevAndNoRing() throws {
        try requireRing()
        let master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard master >= 0 else { throw XCTSkip("no /dev/ptmx") }
        defer { close(master) }
        var unlock: Int32 = 0, number: UInt32 = 0
        XCTAssertEqual(clinux_ioctl_ptr(master, 0x4004_5431 /* TIOCSPTLCK */, &unlock), 0)
        XCTAssertEqual(clinux_ioctl_ptr(master, 0x8004_5430 /* TIOCGPTN */, &number), 0)
        let slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(slave, 0)
        defer { close(slave) }
        var t = termios()
        XCTAssertEqual(tcgetattr(slave, &t), 0)
        cfmakeraw(&t)
        XCTAssertEqual(tcsetattr(slave, TCSANOW, &t), 0)
        let h = try NetHarness(tapFDs: [slave])
        XCTAssertTrue(h.txHandler.batches)
        let pkts = (0..<8).map(NetTxBatchTests.packet)
        for p in pkts { h.send(p) }
        h.txHandler.kicked()
        XCTAssertFalse(h.txHandler.batches, "the ring is dropped")
        XCTAssertEqual(h.tx().usedIdx, 8)
        XCTAssertEqual(h.device.stats[1].packets, 8)
        XCTAssertEqual(h.device.stats[1].drops, 0)
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        var p = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
        while got.count < pkts.joined().count && poll(&p, 1, 1000) > 0 {
            let n = read(master, &buf, buf.count)
            if n <= 0 { break }
            got += buf[0..<n]
        }
        XCTAssertEqual(got, Array(pkts.joined()))
        // Later frames: writev, no io_uring_enter.
        let before = enters
        for p in pkts { h.send(p) }
        h.txHandler.kicked()
        XCTAssertEqual(enters, before)
        XCTAssertEqual(h.device.stats[1].packets, 16)
    }
}
