import XCTest
import Glibc
import GuestMemory
import Virtio
import Vhost
@testable import Devices

/// A virtio-vsock device on a fake vhost-vsock, its three queues in real guest memory.
final class VsockHarness {
    let mem: GuestMemory
    let fake = FakeVhost()
    let device: VirtioVsock
    let sink = RecordingSink()
    var queues: [SplitQueue?] = []

    init(cid: UInt64 = 3, vhostFeatures: UInt64 = VirtioVsockLimits.features) throws {
        mem = try GuestMemory(layout: [(base: 0, size: 0x40_0000)])
        fake.state.withLock { $0.features = vhostFeatures }
        device = VirtioVsock(cid: cid, vhost: fake, vhostFeatures: vhostFeatures, name: "tvsock")
        queues = try (0..<3).map { i in
            let base = 0x10000 * UInt64(i + 1)
            return try SplitQueue(memory: mem, layout: QueueLayout(size: 128, descTable: base, availRing: base + 0x800,
                                                                  usedRing: base + 0x1000),
                                  maxSize: VirtioVsockLimits.queueSize, eventIdx: true, indirectDescriptors: true)
        }
    }

    func activate(features: UInt64? = nil) throws {
        try device.activate(queues: queues, memory: mem, features: features ?? device.deviceFeatures, interrupt: sink)
    }

    deinit { device.reset() }
}

final class VsockDeviceTests: XCTestCase {
    static let ringSetup = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"]

    /// Type 19, three queues of 128, config space = le64 guest_cid, read-only.
    func testDeclaresVsockDeviceWithCIDConfig() throws {
        let h = try VsockHarness(cid: 0x1_0203_0405)
        XCTAssertEqual(h.device.deviceType, 19)
        XCTAssertEqual(h.device.queueMaxSizes, [128, 128, 128])
        XCTAssertEqual(h.device.configSize, 8)
        var b = [UInt8](repeating: 0xEE, count: 8)
        b.withUnsafeMutableBytes { h.device.readConfig(offset: 0, into: $0) }
        XCTAssertEqual(b, [0x05, 0x04, 0x03, 0x02, 0x01, 0, 0, 0])
        var four = [UInt8](repeating: 0, count: 4)
        four.withUnsafeMutableBytes { h.device.readConfig(offset: 4, into: $0) }
        XCTAssertEqual(four, [0x01, 0, 0, 0])
        [UInt8](repeating: 9, count: 8).withUnsafeBytes { h.device.writeConfig(offset: 0, bytes: $0) }
        b.withUnsafeMutableBytes { h.device.readConfig(offset: 0, into: $0) }
        XCTAssertEqual(b, [0x05, 0x04, 0x03, 0x02, 0x01, 0, 0, 0], "guest_cid is read-only")
    }

    /// Only what the kernel has is offered, and only features the device knows.
    func testOffersWhatVhostHas() throws {
        let all = try VsockHarness(vhostFeatures: VirtioVsockLimits.features | (1 << 33) | VhostFeature.logAll)
        XCTAssertEqual(all.device.deviceFeatures, VirtioVsockLimits.features)
        let noSeq = try VsockHarness(vhostFeatures: VirtioFeature.version1 | VirtioFeature.eventIdx)
        XCTAssertEqual(noSeq.device.deviceFeatures, VirtioFeature.version1 | VirtioFeature.eventIdx)
    }

    /// DRIVER_OK: the accepted features (intersected with the offer), the memory table,
    /// rings 0 and 1 with their eventfds, then SET_RUNNING 1; the event queue stays here.
    /// The handlers share one thread; rx and tx bring their own kick.
    func testActivationConfiguresRxAndTxThenRuns() throws {
        let h = try VsockHarness()
        try h.activate(features: VirtioFeature.version1 | VirtioFeature.eventIdx | (1 << 40))
        let calls = h.fake.calls
        XCTAssertEqual(calls.first, "SET_FEATURES " + String(VirtioFeature.version1 | VirtioFeature.eventIdx, radix: 16))
        XCTAssertEqual(calls[1], "SET_MEM_TABLE 1")
        XCTAssertEqual(calls.dropFirst(2).dropLast().map { $0.split(separator: " ")[0] + " " + $0.split(separator: " ")[1] },
                       VsockDeviceTests.ringSetup.map { "\($0) 0" } + VsockDeviceTests.ringSetup.map { "\($0) 1" })
        XCTAssertEqual(calls.last, "SET_RUNNING 1")
        XCTAssertTrue(h.device.isRunning)
        let hs = h.device.queueHandlers
        XCTAssertEqual(hs.map(\.queueIndex), [0, 1, 2])
        XCTAssertEqual(h.device.queueHandlerGroups.map { $0.map(\.queueIndex) }, [[0, 1, 2]])
        for r in 0..<2 {
            XCTAssertEqual(hs[r].ownKick?.fd, h.fake.state.withLock { $0.kick[r] })
            XCTAssertGreaterThanOrEqual(hs[r].completionFD, 0)
        }
        XCTAssertNil(hs[2].ownKick, "the event queue's kicks are swiftlet's")
        XCTAssertEqual(hs[2].completionFD, -1)
        // the rings' host addresses are the queues' places in guest memory
        let a = h.fake.state.withLock { $0.addrs[1]! }
        XCTAssertEqual(a.desc, UInt64(UInt(bitPattern: try h.mem.pointer(0x20000, length: 16))))
    }

    /// A reset stops the kernel (SET_RUNNING 0, GET_VRING_BASE of both rings) and unbinds
    /// every eventfd; a second reset does nothing; the next DRIVER_OK rebuilds from base 0.
    func testResetStopsAndReactivationRebuilds() throws {
        let h = try VsockHarness()
        try h.activate()
        h.fake.clear()
        h.device.reset()
        XCTAssertEqual(h.fake.calls, ["SET_RUNNING 0", "GET_VRING_BASE 0", "GET_VRING_BASE 1",
                                      "SET_VRING_KICK 0 -1", "SET_VRING_CALL 0 -1", "SET_VRING_ERR 0 -1",
                                      "SET_VRING_KICK 1 -1", "SET_VRING_CALL 1 -1", "SET_VRING_ERR 1 -1"])
        XCTAssertFalse(h.device.isRunning)
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
        h.fake.clear()
        h.device.reset()
        XCTAssertEqual(h.fake.calls, [])
        try h.activate()
        XCTAssertEqual(h.fake.calls.filter { $0.hasPrefix("SET_VRING_BASE") }, ["SET_VRING_BASE 0 0", "SET_VRING_BASE 1 0"])
        XCTAssertEqual(h.fake.calls.last, "SET_RUNNING 1")
        XCTAssertTrue(h.device.isRunning)
    }

    /// The kernel refusing a ring or SET_RUNNING fails the activation (the transport sets
    /// NEEDS_RESET) with the eventfds unbound and nothing running.
    func testRefusalFailsActivationAndUnbinds() throws {
        for refused in ["SET_VRING_ADDR", "SET_RUNNING"] {
            let h = try VsockHarness()
            h.fake.refuse(refused)
            XCTAssertThrowsError(try h.activate(), refused)
            XCTAssertFalse(h.device.isRunning)
            XCTAssertTrue(h.device.queueHandlers.isEmpty)
            XCTAssertEqual(h.fake.state.withLock { $0.kick + $0.call + $0.err }, [-1, -1, -1, -1, -1, -1], refused)
            XCTAssertFalse(h.fake.calls.contains("SET_RUNNING 1"))
        }
    }

    /// A driver without VERSION_1, or without its rx/tx queues, is refused before vhost
    /// is touched.
    func testHostileActivations() throws {
        let h = try VsockHarness()
        XCTAssertThrowsError(try h.activate(features: VirtioFeature.eventIdx))
        h.queues[1] = nil
        XCTAssertThrowsError(try h.activate())
        h.queues = [h.queues[0]]
        XCTAssertThrowsError(try h.activate())
        XCTAssertEqual(h.fake.calls, [])
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
    }

    /// The kernel's call on ring 1 is a used-buffer interrupt on the tx queue; an error
    /// marks NEEDS_RESET and stops the kernel; the event queue only counts kicks.
    func testCallErrorAndEventQueue() throws {
        let h = try VsockHarness()
        try h.activate()
        let tx = h.device.queueHandlers[1]
        h.fake.signal(call: 1)
        var p = pollfd(fd: tx.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 5000), 1)
        tx.completionsReady()
        XCTAssertEqual(h.sink.used, 1)
        XCTAssertEqual(h.device.stats[1].interrupts, 1)
        XCTAssertEqual(poll(&p, 1, 0), 0, "the call was taken")
        let ev = h.device.queueHandlers[2]
        ev.kicked()
        XCTAssertEqual(h.device.stats[2].notifications, 1)
        XCTAssertEqual(h.sink.used, 1, "the event queue sends nothing")
        h.fake.clear()
        h.fake.signal(err: 0)
        h.device.queueHandlers[0].completionsReady()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(h.fake.calls.first, "SET_RUNNING 0")
        XCTAssertFalse(h.device.isRunning)
    }
}
