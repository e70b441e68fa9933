import XCTest
import Glibc
import OS
import GuestMemory
import Virtio
@testable import Devices

@_silgen_name("inotify_init1") private func netTestInotifyInit1(_ flags: Int32) -> Int32
@_silgen_name("inotify_add_watch") private func netTestInotifyAddWatch(_ fd: Int32, _ path: UnsafePointer<CChar>, _ mask: UInt32) -> Int32

final class NetDeviceTests: XCTestCase {
    /// Every feature but guest GSO: frames are at most MTU-sized, so one read needs only
    /// buffers for MTU + 18 bytes (the tests below that are not about GSO use this).
    static let noGuestGSO = VirtioNet(queueFDs: [-1], mac: [2, 0, 0, 0, 0, 1]).deviceFeatures
        & ~(VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestTSO6)

    func testConstantsMatchLinuxValues() {
        // linux/virtio_net.h
        XCTAssertEqual(VirtioNetFeature.csum, 1 << 0)
        XCTAssertEqual(VirtioNetFeature.mrgRxbuf, 1 << 15)
        XCTAssertEqual(VirtioNetFeature.ctrlVQ, 1 << 17)
        XCTAssertEqual(VirtioNetFeature.mq, 1 << 22)
        XCTAssertEqual(VirtioNetFeature.hostECN, 1 << 13)
        XCTAssertEqual(VirtioNetFeature.mtu, 1 << 3)
    }

    func testConfigSpaceAndFeatures() throws {
        let h = try NetHarness(pairs: 4)
        var b = [UInt8](repeating: 0, count: 12)
        b.withUnsafeMutableBytes { h.device.readConfig(offset: 0, into: $0) }
        XCTAssertEqual(Array(b[0..<6]), [0x52, 0x54, 0, 0x12, 0x34, 0x56])
        XCTAssertEqual(UInt16(b[6]) | UInt16(b[7]) << 8, 1)      // link up
        XCTAssertEqual(UInt16(b[8]) | UInt16(b[9]) << 8, 4)      // max pairs
        XCTAssertEqual(UInt16(b[10]) | UInt16(b[11]) << 8, 1500) // mtu
        XCTAssertEqual(h.device.queueMaxSizes.count, 9)          // rx0,tx0,...,rx3,tx3,ctrl
        // Out-of-range reads leave the buffer alone.
        var z = [UInt8](repeating: 0xAA, count: 4)
        z.withUnsafeMutableBytes { h.device.readConfig(offset: 10, into: $0) }
        XCTAssertEqual(z, [0xAA, 0xAA, 0xAA, 0xAA])
        // Offloads on: the TAP gets what the guest accepted; only pair 0 attached at start.
        XCTAssertEqual(h.control.offloads.last, TunOffload.csum | TunOffload.tso4 | TunOffload.tso6 | TunOffload.tsoECN)
        XCTAssertEqual(h.control.attached, [0])
        XCTAssertEqual(h.device.queueHandlers.count, 9)
        // One host thread per queue pair (rx i with tx i), the control queue on its own.
        XCTAssertEqual(h.device.queueHandlerGroups.map { $0.map(\.queueIndex) }, [[0, 1], [2, 3], [4, 5], [6, 7], [8]])
    }

    func testOffloadOffOffersNoOffloads() throws {
        let fds: [Int32] = [-1]
        let d = VirtioNet(queueFDs: fds, mac: [2, 0, 0, 0, 0, 1], offload: false)
        XCTAssertEqual(d.deviceFeatures & VirtioNetFeature.offloads, 0)
        XCTAssertEqual(TunOffload.flags(forGuestFeatures: VirtioNetFeature.guestTSO4), 0)  // TSO needs GUEST_CSUM
    }

    func testWithoutMQTheControlQueueIsQueue2() throws {
        let h = try NetHarness(pairs: 4, features: VirtioNet(queueFDs: [-1], mac: [2, 0, 0, 0, 0, 1]).deviceFeatures & ~VirtioNetFeature.mq)
        XCTAssertEqual(h.queues.count, 3)
        XCTAssertEqual(h.ctrlHandler.queueIndex, 2)
        // VQ_PAIRS_SET without MQ: error.
        let ack = h.command(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [2, 0])
        h.ctrlHandler.kicked()
        XCTAssertEqual(h.bytes(ack, 1), [VirtioNetCtrl.err])
    }

    func testTransmitWritesTheChainToTheTap() throws {
        let h = try NetHarness()
        let pkt = [UInt8](repeating: 0, count: 12) + frame(1000)
        h.send(pkt, split: [12, 500, 500])
        h.send(pkt, split: [1012])
        h.txHandler.kicked()
        XCTAssertEqual(h.hostReceive(), pkt)
        XCTAssertEqual(h.hostReceive(), pkt)
        XCTAssertNil(h.hostReceive())
        XCTAssertEqual(h.tx().usedIdx, 2)
        XCTAssertEqual(h.device.stats[1].packets, 2)
        XCTAssertEqual(h.device.stats[1].bytes, 2000)
        XCTAssertGreaterThan(h.sink.used, 0)
        // per-queue counters: one kick, and the interrupts this queue asked for
        XCTAssertEqual(h.device.stats[1].notifications, 1)
        XCTAssertEqual(h.device.stats[1].interrupts, UInt64(h.sink.used))
        XCTAssertEqual(h.device.stats[0].notifications, 0)
        XCTAssertEqual(h.device.stats[0].interrupts, 0)
    }

    func testHostileTransmitChainsAreDroppedAndCounted() throws {
        let h = try NetHarness()
        h.send([1, 2, 3])                                   // shorter than the header
        h.send([])                                         // no readable bytes at all
        let w = h.alloc(64)
        h.tx().offer(h.tx().chain([(w, 64, true)]))         // only writable
        h.send([UInt8](repeating: 0, count: 12) + frame(60)) // a good one after them
        h.txHandler.kicked()
        XCTAssertEqual(h.tx().usedIdx, 4)
        XCTAssertEqual(h.device.stats[1].drops, 3)
        XCTAssertEqual(h.device.stats[1].packets, 1)
        XCTAssertEqual(h.hostReceive()?.count, 72)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testTransmitBudgetThenResumes() throws {
        let h = try NetHarness(queueSize: 512)
        let n = VirtioNetLimits.budget + 10
        for i in 0..<n { h.send([UInt8](repeating: 0, count: 12) + frame(20, seed: UInt8(truncatingIfNeeded: i))) }
        h.txHandler.kicked()
        XCTAssertEqual(Int(h.tx().usedIdx), VirtioNetLimits.budget)
        var p = pollfd(fd: h.txHandler.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 0), 1)  // the thread will come back
        h.txHandler.completionsReady()
        XCTAssertEqual(Int(h.tx().usedIdx), n)
    }

    func testBadDescriptorChainMarksNeedsReset() throws {
        let h = try NetHarness()
        // A chain whose next index is past the table.
        let a = h.alloc(64)
        let head = h.tx().chain([(a, 64, false)])
        try h.mem.store(VirtqDesc.next, at: h.tx().desc + 16 * UInt64(head) + 12)
        try h.mem.store(UInt16(999), at: h.tx().desc + 16 * UInt64(head) + 14)
        h.tx().offer(head)
        h.txHandler.kicked()
        XCTAssertTrue(h.sink.needsReset)
    }

    func testReceiveIntoOneBufferSetsNumBuffers() throws {
        let h = try NetHarness(features: VirtioNet(queueFDs: [-1], mac: [2, 0, 0, 0, 0, 1]).deviceFeatures & ~VirtioNetFeature.mrgRxbuf)
        let buf = h.addRxBuffer(1526)
        h.rxHandler.kicked()
        h.hostSend(frame(100))
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 1)
        XCTAssertEqual(h.rx().usedElem(0).len, 112)
        XCTAssertEqual(h.bytes(buf + 10, 2), [1, 0])
        XCTAssertEqual(h.bytes(buf + 12, 100), frame(100))
        XCTAssertEqual(h.device.stats[0].packets, 1)
        XCTAssertEqual(h.device.stats[0].bytes, 100)
    }

    /// num_buffers (header bytes 10-11) lands in the chain's second buffer when the first
    /// holds only 8 bytes, and in no other chain's buffers.
    func testNumBuffersSplitAcrossTheChainsBuffers() throws {
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO)
        let a = h.alloc(8, fill: 0xEE), b = h.alloc(2000, fill: 0xEE)
        h.rx().offer(h.rx().chain([(a, 8, true), (b, 2000, true)]))
        let next = h.addRxBuffer(2000)
        h.rxHandler.kicked()
        h.hostSend(frame(100))
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 1)
        XCTAssertEqual(h.rx().usedElem(0).len, 112)
        XCTAssertEqual(h.bytes(b + 2, 2), [1, 0])
        XCTAssertEqual(h.bytes(b + 4, 100), frame(100))
        XCTAssertEqual(h.bytes(next, 16), [UInt8](repeating: 0xEE, count: 16))
    }

    func testMergeableReceiveSpansSeveralBuffers() throws {
        // Without guest GSO a read waits for buffers worth an MTU-sized frame (1530 bytes
        // with the header): three of 600 here.
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO)
        let bufs = (0..<4).map { _ in h.addRxBuffer(600) }
        h.rxHandler.kicked()
        h.hostSend(frame(1500))
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 3)
        XCTAssertEqual(h.rx().usedElem(0).len, 600)
        XCTAssertEqual(h.rx().usedElem(1).len, 600)
        XCTAssertEqual(h.rx().usedElem(2).len, 312)
        XCTAssertEqual(h.bytes(bufs[0] + 10, 2), [3, 0])
        XCTAssertTrue(h.bytes(bufs[0] + 12, 588) + h.bytes(bufs[1], 600) + h.bytes(bufs[2], 312) == frame(1500))
        // The fourth buffer is kept for the next frame, which waits until the buffers
        // can hold a full MTU-sized frame.
        h.hostSend(frame(50, seed: 9))
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 3)
        h.addRxBuffer(1000)
        h.rxHandler.kicked()
        XCTAssertEqual(h.rx().usedIdx, 4)
        XCTAssertEqual(h.rx().usedElem(3).id, 3)
        XCTAssertEqual(h.bytes(bufs[3] + 12, 50), frame(50, seed: 9))
    }

    /// With guest GSO a frame may be 64 KiB: nothing is read until the buffers can hold
    /// one, so a big frame is never cut short (a cut GSO frame costs TCP ~44 segments).
    func testMergeableGSOReadWaitsForBuffersWorthAWholeFrame() throws {
        let h = try NetHarness()
        XCTAssertNotEqual(h.features & VirtioNetFeature.guestTSO4, 0)
        let bufs = (0..<30).map { _ in h.addRxBuffer(1518) }   // 45540 bytes
        h.rxHandler.kicked()
        let big = frame(60000, seed: 3)
        h.hostSend(big)
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 0)
        var p = pollfd(fd: h.rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 0), 0, "waits on the rx kick, not on the TAP")
        let more = (0..<14).map { _ in h.addRxBuffer(1518) }   // 44 * 1518 = 66792 bytes
        h.rxHandler.kicked()
        let all = bufs + more
        let used = (60012 + 1517) / 1518
        XCTAssertEqual(Int(h.rx().usedIdx), used)
        XCTAssertEqual(h.bytes(all[0] + 10, 2), [UInt8(used), 0])
        var got = h.bytes(all[0] + 12, 1518 - 12)
        for k in 1..<used { got += h.bytes(all[k], Int(h.rx().usedElem(k).len)) }
        XCTAssertTrue(got == big, "the 60000-byte frame arrives whole")
        XCTAssertEqual(h.device.stats[0].drops, 0)
    }

    /// A guest whose whole ring holds less than a GSO frame still receives: once it has
    /// handed over every descriptor, the read goes into what there is.
    func testMergeableReadsIntoLessOnceTheGuestGaveItsWholeRing() throws {
        let h = try NetHarness(queueSize: 8)
        let bufs = (0..<7).map { _ in h.addRxBuffer(2000) }
        h.rxHandler.kicked()
        h.hostSend(frame(3000))
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 0)
        h.addRxBuffer(2000)
        h.rxHandler.kicked()
        XCTAssertEqual(h.rx().usedIdx, 2)
        XCTAssertEqual(h.bytes(bufs[0] + 10, 2), [2, 0])
        XCTAssertEqual(h.bytes(bufs[0] + 12, 1988) + h.bytes(bufs[1], 1012), frame(3000))
    }

    /// A burst of frames read in one pass: every frame lands in its own buffer and is
    /// counted, the interrupt decision is made once per `signalBatch` used buffers and
    /// once more when the TAP runs dry, so the last frames are never left unannounced.
    func testRxBurstAsksForAnInterruptPerBatchAndAtTheEnd() throws {
        // Without EVENT_IDX (interrupts always wanted): one per 64 buffers, then the rest.
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO & ~VirtioFeature.eventIdx, queueSize: 256)
        let bufs = (0..<200).map { _ in h.addRxBuffer(2048) }
        h.rxHandler.kicked()
        XCTAssertEqual(h.sink.used, 0)
        for i in 0..<100 { h.hostSend(frame(60 + i, seed: UInt8(i))) }
        h.rxHandler.completionsReady()
        XCTAssertEqual(h.rx().usedIdx, 100)
        XCTAssertEqual(h.sink.used, 2, "one at 64 buffers, one when the TAP ran dry")
        for i in [0, 63, 64, 99] {
            XCTAssertEqual(h.rx().usedElem(i).len, UInt32(12 + 60 + i))
            XCTAssertEqual(h.bytes(bufs[i] + 12, 60 + i), frame(60 + i, seed: UInt8(i)))
        }
        XCTAssertEqual(h.device.stats[0].packets, 100)

        // With EVENT_IDX: a driver that asked to hear of used entry 69 hears of it once,
        // after the pass, with all 30 frames of the burst visible.
        let e = try NetHarness(features: NetDeviceTests.noGuestGSO, queueSize: 256)
        XCTAssertNotEqual(e.features & VirtioFeature.eventIdx, 0)
        for _ in 0..<200 { e.addRxBuffer(2048) }
        e.rxHandler.kicked()
        e.hostSend(frame(60))
        e.rxHandler.completionsReady()
        XCTAssertEqual(e.sink.used, 1)
        try e.mem.store(UInt16(69), at: e.rx().avail + 4 + 2 * 256)   // used_event
        for i in 0..<70 { e.hostSend(frame(60 + i)) }
        e.rxHandler.completionsReady()
        XCTAssertEqual(e.rx().usedIdx, 71)
        XCTAssertEqual(e.sink.used, 2, "the burst crossing used_event: one interrupt")
        for i in 0..<30 { e.hostSend(frame(60 + i)) }
        e.rxHandler.completionsReady()
        XCTAssertEqual(e.rx().usedIdx, 101)
        XCTAssertEqual(e.sink.used, 2, "used_event already passed: no interrupt")
    }

    func testNoBuffersStopsPollingTheTapUntilKick() throws {
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO)
        h.hostSend(frame(60))
        h.rxHandler.kicked()          // no buffers: stops watching the TAP
        var p = pollfd(fd: h.rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 0), 0)
        let buf = h.addRxBuffer(2048)
        h.rxHandler.kicked()          // the rx kick: reads the waiting frame
        XCTAssertEqual(h.rx().usedIdx, 1)
        XCTAssertEqual(h.bytes(buf + 12, 60), frame(60))
        // Buffers left and the TAP readable again: the completion fd wakes the thread.
        h.addRxBuffer(2048)
        h.rxHandler.kicked()
        h.hostSend(frame(61))
        p.revents = 0
        XCTAssertEqual(poll(&p, 1, 1000), 1)
    }

    func testHostileReceiveBuffersAreReturnedEmpty() throws {
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO)
        h.addRxBuffer(8)                               // cannot hold the header
        let r = h.alloc(100)
        h.rx().offer(h.rx().chain([(r, 100, false)]))   // device-readable: not an rx buffer
        let good = h.addRxBuffer(2048)
        h.hostSend(frame(70))
        h.rxHandler.kicked()
        XCTAssertEqual(h.rx().usedIdx, 3)
        XCTAssertEqual(h.rx().usedElem(0).len, 0)
        XCTAssertEqual(h.rx().usedElem(1).len, 0)
        XCTAssertEqual(h.rx().usedElem(2).len, 82)
        XCTAssertEqual(h.bytes(good + 12, 70), frame(70))
        XCTAssertEqual(h.device.stats[0].drops, 2)
        XCTAssertFalse(h.sink.needsReset)
    }

    /// 64 chains (the most one frame may fill) holding less than an MTU-sized frame, with
    /// more chains behind them: the frame is read into the 64 instead of the ring being
    /// asked again and again for chains that would not be taken.
    func testChainCapReachedWithLittleRoomReadsIntoWhatThereIs() throws {
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO, queueSize: 256)
        let bufs = (0..<70).map { _ in h.addRxBuffer(16) }
        h.hostSend(frame(60))
        let rx = h.rxHandler
        XCTAssertTrue(returnsInTime(2, rx.kicked, stop: { rx.broken = true }), "receive() kept going round")
        XCTAssertEqual(h.rx().usedIdx, 5)
        XCTAssertEqual((0..<5).map { h.rx().usedElem($0).len }, [16, 16, 16, 16, 8])
        XCTAssertEqual(h.bytes(bufs[0] + 10, 2), [5, 0])
        XCTAssertEqual(h.bytes(bufs[0] + 12, 4) + (1..<5).flatMap { h.bytes(bufs[$0], $0 < 4 ? 16 : 8) }, frame(60))
        XCTAssertFalse(h.sink.needsReset)
    }

    /// Reads that fail without taking what waits (here an inotify event longer than the
    /// buffer: EINVAL, and the event stays) give the chain back empty, each one, so the
    /// queue runs out of buffers and sleeps until the next kick instead of reading again
    /// and again while the descriptor stays readable.
    func testReadsThatFailWithoutProgressUseUpChains() throws {
        let ino = netTestInotifyInit1(O_NONBLOCK | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(ino, 0)
        defer { close(ino) }
        var tmpl = Array("/tmp/swiftlet-net-XXXXXX".utf8CString)
        XCTAssertNotNil(mkdtemp(&tmpl))
        let dir = String(nulTerminated: tmpl)
        XCTAssertGreaterThanOrEqual(netTestInotifyAddWatch(ino, dir, 0x100 /* IN_CREATE */), 0)
        let file = dir + "/event"
        close(open(file, O_CREAT | O_WRONLY, 0o600))
        defer { unlink(file); rmdir(dir) }
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO & ~VirtioNetFeature.mrgRxbuf, tapFDs: [ino])
        for _ in 0..<3 { h.addRxBuffer(12) }
        h.rxHandler.kicked()
        XCTAssertEqual(h.rx().usedIdx, 3)
        XCTAssertEqual((0..<3).map { h.rx().usedElem($0).len }, [0, 0, 0])
        XCTAssertEqual(h.device.stats[0].drops, 3)
        var p = pollfd(fd: h.rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 100), 0, "waits on the rx kick, not on the descriptor")
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A read error that is not about the frame (here ENOTCONN, from a listening socket
    /// that stays readable while a connection waits) stops the reads until the next rx
    /// kick, even with buffers waiting in the ring: the thread is not woken for it again.
    func testReadErrorNotAboutTheFrameWaitsForTheNextKick() throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        XCTAssertGreaterThanOrEqual(listener, 0)
        defer { close(listener) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        func withSockaddr<T>(_ body: (UnsafeMutablePointer<sockaddr>) -> T) -> T {
            withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1, body) }
        }
        XCTAssertEqual(withSockaddr { bind(listener, $0, len) }, 0)
        XCTAssertEqual(listen(listener, 1), 0)
        XCTAssertEqual(withSockaddr { getsockname(listener, $0, &len) }, 0)
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(client) }
        XCTAssertEqual(withSockaddr { connect(client, $0, len) }, 0)
        var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 1000), 1)
        let h = try NetHarness(tapFDs: [listener])
        for _ in 0..<50 { h.addRxBuffer(1518) }    // more than one GSO frame's worth: some stay in the ring
        h.rxHandler.kicked()
        XCTAssertEqual(h.serveRx(milliseconds: 300), 0)
        XCTAssertEqual(h.rx().usedIdx, 0)
        XCTAssertEqual(h.device.stats[0].drops, 0)
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A descriptor that hangs up (here a socket whose peer closed; a TAP whose device is
    /// deleted reports an error the same way) wakes the thread only while it reads
    /// something: once the buffers are used up the thread stops watching it.
    func testHungUpDescriptorDoesNotWakeTheThreadOnceIdle() throws {
        var sv: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &sv), 0)
        defer { close(sv[0]) }
        let h = try NetHarness(features: NetDeviceTests.noGuestGSO & ~VirtioNetFeature.mrgRxbuf, tapFDs: [sv[0]])
        h.addRxBuffer(2048)
        h.addRxBuffer(2048)
        h.rxHandler.kicked()
        close(sv[1])
        XCTAssertLessThanOrEqual(h.serveRx(milliseconds: 300), 1)
        XCTAssertEqual(h.rx().usedIdx, 2, "each read of nothing still takes a chain")
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A stopped rx queue (the guest broke it) stays unwatched even when a control
    /// command attaches its TAP queue again, so frames on the TAP do not wake its thread.
    func testPairsCommandDoesNotWakeAStoppedRxQueue() throws {
        let h = try NetHarness(pairs: 2, features: NetDeviceTests.noGuestGSO)
        let a = h.alloc(64)
        let head = h.rx().chain([(a, 64, true)])
        try h.mem.store(VirtqDesc.next | VirtqDesc.write, at: h.rx().desc + 16 * UInt64(head) + 12)
        try h.mem.store(UInt16(999), at: h.rx().desc + 16 * UInt64(head) + 14)
        h.rx().offer(head)
        h.rxHandler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        h.hostSend(frame(60))
        let ack = h.command(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [1, 0])
        h.ctrlHandler.kicked()
        XCTAssertEqual(h.bytes(ack, 1), [VirtioNetCtrl.ok])
        XCTAssertLessThanOrEqual(h.serveRx(milliseconds: 300), 1)
    }

    /// A tx chain of more buffers than one writev takes marks the device NEEDS_RESET (a
    /// frame is one write, so it cannot be split); after a reset the device sends again.
    func testTxChainOfMoreBuffersThanOneWriteTakesNeedsReset() throws {
        let h = try NetHarness()
        h.offerIndirect(on: h.tx(), first: 12, count: 1024, each: 4, writable: false)
        h.txHandler.kicked()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertNil(h.hostReceive())
        XCTAssertEqual(h.tx().usedIdx, 0)
        try h.resetAndRestart()
        h.send([UInt8](repeating: 0, count: 12) + frame(60))
        h.txHandler.kicked()
        XCTAssertEqual(h.hostReceive()?.count, 72)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testControlQueuePairsAndHostileCommands() throws {
        let h = try NetHarness(pairs: 4)
        func run(_ cls: UInt8, _ cmd: UInt8, _ data: [UInt8], ackLength: Int = 1, headerLength: Int = 2) -> UInt8 {
            let ack = h.command(cls, cmd, data, ackLength: ackLength, headerLength: headerLength)
            h.ctrlHandler.kicked()
            return h.bytes(ack + UInt64(max(ackLength, 1) - 1), 1)[0]
        }
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [3, 0]), VirtioNetCtrl.ok)
        XCTAssertEqual(h.device.activePairs, 3)
        XCTAssertEqual(h.control.attached, [0, 1, 2])
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [0, 0]), VirtioNetCtrl.err)
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [5, 0]), VirtioNetCtrl.err)
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [0xFF, 0xFF]), VirtioNetCtrl.err)
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [1]), VirtioNetCtrl.err)  // short data
        XCTAssertEqual(h.device.activePairs, 3)
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [4, 0]), VirtioNetCtrl.ok)
        XCTAssertEqual(h.control.attached, [0, 1, 2, 3])
        XCTAssertEqual(run(VirtioNetCtrl.classRx, 0, [1]), VirtioNetCtrl.ok)         // promisc on
        XCTAssertEqual(run(VirtioNetCtrl.classRx, 1, []), VirtioNetCtrl.err)         // no data
        XCTAssertEqual(run(VirtioNetCtrl.classRx, 77, [1]), VirtioNetCtrl.err)       // unknown command
        XCTAssertEqual(run(99, 0, [1, 2, 3]), VirtioNetCtrl.err)                     // unknown class
        XCTAssertEqual(run(VirtioNetCtrl.classVLAN, 0, [1, 0]), VirtioNetCtrl.err)   // not offered
        XCTAssertEqual(run(VirtioNetCtrl.classMQ, 0, [], headerLength: 1), VirtioNetCtrl.err)  // header cut short
        XCTAssertEqual(run(VirtioNetCtrl.classRx, 0, [1], ackLength: 4), VirtioNetCtrl.ok)     // ack is the last byte
        // No writable byte for the ack: returned empty, counted.
        let before = h.device.stats[8].drops
        _ = h.command(VirtioNetCtrl.classRx, 0, [1], ackLength: 0)
        h.ctrlHandler.kicked()
        XCTAssertEqual(h.device.stats[8].drops, before + 1)
        XCTAssertEqual(h.ctrl.usedElem(Int(h.ctrl.usedIdx) - 1).len, 0)
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A guest that breaks the device and resets it, over and over, gets the first few
    /// lines and no more (the log lives as long as the device), and the device works after
    /// every reset.
    func testNeedsResetLinesAcrossDriverResetsAreRateLimited() throws {
        final class Lines: Sendable {
            let lines = Locked<[(level: LogLevel, text: String)]>([])
            var all: [(level: LogLevel, text: String)] { lines.withLock { $0 } }
        }
        let lines = Lines()
        let log = RateLimitedLog(name: "tnet", clock: { 0 }, sink: { level, text in
            lines.lines.withLock { $0.append((level, text)) }
        })
        let h = try NetHarness(log: log)
        for _ in 0..<50 {
            let a = h.alloc(64)
            let head = h.tx().chain([(a, 64, false)])
            try h.mem.store(VirtqDesc.next, at: h.tx().desc + 16 * UInt64(head) + 12)
            try h.mem.store(UInt16(999), at: h.tx().desc + 16 * UInt64(head) + 14)
            h.tx().offer(head)
            h.txHandler.kicked()
            XCTAssertTrue(h.sink.needsReset)
            try h.resetAndRestart()
        }
        XCTAssertEqual(lines.all.count, RateLimitedLog.defaultBurst)
        XCTAssertTrue(lines.all.allSatisfy { $0.level == .warn && $0.text.hasSuffix("device needs reset") })
        h.send([UInt8](repeating: 0, count: 12) + frame(60))
        h.txHandler.kicked()
        XCTAssertEqual(h.hostReceive()?.count, 72)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testResetAndReactivate() throws {
        let h = try NetHarness(pairs: 2)
        XCTAssertEqual(h.device.queueHandlers.count, 5)
        h.device.reset()
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
        XCTAssertTrue(h.device.queueHandlerGroups.isEmpty)
        h.device.reset()  // idempotent
    }
}
