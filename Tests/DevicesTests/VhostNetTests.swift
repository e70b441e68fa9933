import XCTest
import Glibc
import Synchronization
import OS
import GuestMemory
import Virtio
import Vhost
@testable import Devices

/// A vhost-net or vhost-vsock instance that records the calls a device makes and can
/// refuse one.
final class FakeVhost: VhostNetBackend, VhostVsockBackend {
    struct State {
        var calls: [String] = []
        var refuse: String? = nil
        var features: UInt64 = VhostNetRingFeatures.all
        /// What VHOST_GET_VRING_BASE answers, per ring.
        var bases: [UInt32] = [7, 9]
        /// The eventfds bound per ring (-1 unbound).
        var kick: [Int32] = [-1, -1], call: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        var backend: [Int32] = [-1, -1]
        var memTable: [VhostMemoryRegion] = []
        var addrs: [Int: (desc: UInt64, avail: UInt64, used: UInt64)] = [:]
    }
    let state = Locked(State())
    var calls: [String] { state.withLock { $0.calls } }
    func clear() { state.withLock { $0.calls = [] } }
    func refuse(_ call: String?) { state.withLock { $0.refuse = call } }
    var backend: [Int32] { state.withLock { $0.backend } }

    private func record(_ name: String, _ detail: String) throws {
        try state.withLock { s in
            if s.refuse == name { throw VhostError(call: name, errno: EINVAL) }
            s.calls.append("\(name) \(detail)")
        }
    }
    func features() throws -> UInt64 { state.withLock { $0.features } }
    func setFeatures(_ features: UInt64) throws { try record("SET_FEATURES", String(features, radix: 16)) }
    func setMemTable(_ regions: [VhostMemoryRegion]) throws {
        try record("SET_MEM_TABLE", "\(regions.count)")
        state.withLock { $0.memTable = regions }
    }
    func setVringNum(_ ring: Int, _ size: UInt32) throws { try record("SET_VRING_NUM", "\(ring) \(size)") }
    func setVringBase(_ ring: Int, _ base: UInt32) throws { try record("SET_VRING_BASE", "\(ring) \(base)") }
    func vringBase(_ ring: Int) throws -> UInt32 {
        try record("GET_VRING_BASE", "\(ring)")
        return state.withLock { $0.bases[ring] }
    }
    func setVringAddr(_ ring: Int, desc: UInt64, avail: UInt64, used: UInt64) throws {
        try record("SET_VRING_ADDR", "\(ring)")
        state.withLock { $0.addrs[ring] = (desc, avail, used) }
    }
    func setVringKick(_ ring: Int, _ fd: Int32) throws {
        try record("SET_VRING_KICK", "\(ring) \(fd < 0 ? "-1" : "fd")")
        state.withLock { $0.kick[ring] = fd }
    }
    func setVringCall(_ ring: Int, _ fd: Int32) throws {
        try record("SET_VRING_CALL", "\(ring) \(fd < 0 ? "-1" : "fd")")
        state.withLock { $0.call[ring] = fd }
    }
    func setVringErr(_ ring: Int, _ fd: Int32) throws {
        try record("SET_VRING_ERR", "\(ring) \(fd < 0 ? "-1" : "fd")")
        state.withLock { $0.err[ring] = fd }
    }
    func setBackend(_ ring: Int, _ fd: Int32) throws {
        try record("SET_BACKEND", "\(ring) \(fd < 0 ? "-1" : "tap")")
        state.withLock { $0.backend[ring] = fd }
    }
    func setRunning(_ running: Bool) throws { try record("SET_RUNNING", running ? "1" : "0") }
    /// Plays the kernel: signals ring `ring`'s call (or err) eventfd.
    func signal(call ring: Int) { var v: UInt64 = 1; _ = write(state.withLock { $0.call[ring] }, &v, 8) }
    func signal(err ring: Int) { var v: UInt64 = 1; _ = write(state.withLock { $0.err[ring] }, &v, 8) }
}

final class VhostNetDeviceTests: XCTestCase {
    static let setup = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"]

    func vhostHarness(pairs: Int = 2, features: UInt64 = VhostNetRingFeatures.all) throws -> (NetHarness, [FakeVhost]) {
        let fakes = (0..<pairs).map { _ in FakeVhost() }
        for f in fakes { f.state.withLock { $0.features = features } }
        let h = try NetHarness(pairs: pairs, vhost: fakes, vhostFeatures: features)
        return (h, fakes)
    }

    /// DRIVER_OK: every pair's rings are configured (features the guest accepted that
    /// vhost has, RAM regions, size, base 0, host addresses of the rings, the three
    /// eventfds); only pair 0 is attached. The data queues' handlers bring their own kick
    /// eventfd (the one vhost polls); the control queue stays in swiftlet.
    func testActivationConfiguresEveryPairAndAttachesPairZero() throws {
        let (h, fakes) = try vhostHarness()
        XCTAssertTrue(h.device.usesVhost)
        for (p, f) in fakes.enumerated() {
            let names = f.calls.map { String($0.split(separator: " ")[0]) }
            XCTAssertEqual(Array(names.prefix(2)), ["SET_FEATURES", "SET_MEM_TABLE"], "pair \(p)")
            XCTAssertEqual(f.calls[0], "SET_FEATURES " + String(h.features & VhostNetRingFeatures.all, radix: 16))
            XCTAssertEqual(f.state.withLock { $0.memTable }, [VhostMemoryRegion(guestAddress: 0, size: 0x80_0000,
                                                                                hostAddress: UInt64(UInt(bitPattern: h.mem.regions[0].host)))])
            for r in 0..<2 {
                XCTAssertEqual(f.calls.filter { $0.hasPrefix("SET_VRING") && $0.split(separator: " ")[1] == "\(r)" }.map { String($0.split(separator: " ")[0]) },
                               VhostNetDeviceTests.setup + (p == 0 ? ["SET_VRING_BASE"] : []), "pair \(p) ring \(r)")
                XCTAssertTrue(f.calls.contains("SET_VRING_NUM \(r) 64"))
                let a = f.state.withLock { $0.addrs[r]! }
                let q = h.queues[2 * p + r]
                XCTAssertEqual(a.desc, UInt64(UInt(bitPattern: try h.mem.pointer(q.desc, length: 1))))
                XCTAssertEqual(a.avail, UInt64(UInt(bitPattern: try h.mem.pointer(q.avail, length: 1))))
                XCTAssertEqual(a.used, UInt64(UInt(bitPattern: try h.mem.pointer(q.used, length: 1))))
                XCTAssertEqual(f.state.withLock { $0.kick[r] }, (h.handler(2 * p + r) as! VhostQueue).ownKick?.fd)
            }
            XCTAssertEqual(f.backend, p == 0 ? [h.deviceFDs[0], h.deviceFDs[0]] : [-1, -1], "pair \(p)")
        }
        XCTAssertNotNil(h.handler(0).ownKick)
        XCTAssertNil(h.ctrlHandler.ownKick)
        XCTAssertEqual(h.device.queueHandlerGroups.map { $0.map(\.queueIndex) }, [[0, 1], [2, 3], [4]])
    }

    /// VQ_PAIRS_SET starts a pair's rings after its TAP queue is attached and stops them
    /// (backend detached, base read) before it is detached; starting again gives the base
    /// back. Every start kicks both rings once.
    func testControlQueueStartsAndStopsPairs() throws {
        let (h, fakes) = try vhostHarness()
        func pairs(_ n: UInt8) -> UInt8 {
            let ack = h.command(VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, [n, 0])
            h.ctrlHandler.kicked()
            return h.bytes(ack, 1)[0]
        }
        fakes[1].clear()
        XCTAssertEqual(pairs(2), VirtioNetCtrl.ok)
        XCTAssertEqual(fakes[1].calls, ["SET_VRING_BASE 0 0", "SET_VRING_BASE 1 0", "SET_BACKEND 0 tap", "SET_BACKEND 1 tap"])
        XCTAssertEqual(fakes[1].backend, [h.deviceFDs[1], h.deviceFDs[1]])
        let kick = (h.handler(2) as! VhostQueue).ownKick!
        XCTAssertEqual(try kick.read(), 1, "a started ring is kicked once")
        fakes[1].clear()
        XCTAssertEqual(pairs(1), VirtioNetCtrl.ok)
        XCTAssertEqual(fakes[1].calls, ["SET_BACKEND 0 -1", "SET_BACKEND 1 -1", "GET_VRING_BASE 0", "GET_VRING_BASE 1"])
        XCTAssertEqual(fakes[1].backend, [-1, -1])
        XCTAssertEqual(h.control.attached, [0])
        fakes[1].clear()
        XCTAssertEqual(pairs(2), VirtioNetCtrl.ok)
        XCTAssertEqual(fakes[1].calls, ["SET_VRING_BASE 0 7", "SET_VRING_BASE 1 9", "SET_BACKEND 0 tap", "SET_BACKEND 1 tap"])
        // The kernel refusing a start: the command fails, nothing is left attached.
        XCTAssertEqual(pairs(1), VirtioNetCtrl.ok)
        fakes[1].refuse("SET_BACKEND")
        XCTAssertEqual(pairs(2), VirtioNetCtrl.err)
        XCTAssertEqual(fakes[1].backend, [-1, -1])
        XCTAssertFalse(h.sink.needsReset)
    }

    /// A reset detaches every pair and unbinds every eventfd; a new activation configures
    /// everything again from base 0.
    func testResetTearsDownAndReactivationRebuilds() throws {
        let (h, fakes) = try vhostHarness()
        for f in fakes { f.clear() }
        h.device.reset()
        XCTAssertFalse(h.device.usesVhost)
        for (p, f) in fakes.enumerated() {
            XCTAssertEqual(f.backend, [-1, -1], "pair \(p)")
            XCTAssertEqual(f.state.withLock { $0.kick + $0.call + $0.err }, [Int32](repeating: -1, count: 6), "pair \(p)")
            XCTAssertEqual(f.calls.filter { $0.hasPrefix("SET_BACKEND") }.count, p == 0 ? 2 : 0, "only attached pairs detach")
        }
        for f in fakes { f.clear() }
        try h.resetAndRestart()
        XCTAssertTrue(h.device.usesVhost)
        XCTAssertTrue(fakes[0].calls.contains("SET_VRING_BASE 0 0"))
        XCTAssertEqual(fakes[0].backend, [h.deviceFDs[0], h.deviceFDs[0]])
    }

    /// The kernel refusing ring setup at DRIVER_OK: one warning, what was set up is torn
    /// down, and the device serves this activation and later ones in userspace.
    func testRefusedRingSetupFallsBackToUserspace() throws {
        final class Lines: @unchecked Sendable { var all: [String] = [] }
        let lines = Lines()
        let log = RateLimitedLog(name: "tnet", sink: { _, l in lines.all.append(l) })
        let fakes = [FakeVhost()]
        fakes[0].refuse("SET_VRING_ADDR")
        let h = try NetHarness(pairs: 1, log: log, vhost: fakes, vhostFeatures: VhostNetRingFeatures.all)
        XCTAssertFalse(h.device.usesVhost)
        XCTAssertTrue(h.handler(0) is NetRxQueue)
        XCTAssertTrue(h.handler(1) is NetTxQueue)
        XCTAssertEqual(lines.all.filter { $0.contains("vhost-net refused the rings") && $0.contains("userspace") }.count, 1, "\(lines.all)")
        XCTAssertEqual(fakes[0].state.withLock { $0.kick + $0.call + $0.err }, [-1, -1, -1, -1, -1, -1])
        // The userspace path works: a frame from the guest reaches the "TAP".
        let a = h.alloc(12 + 60)
        h.tx().offer(h.tx().chain([(a, 72, false)]))
        h.txHandler.kicked()
        var buf = [UInt8](repeating: 0, count: 100)
        XCTAssertEqual(read(h.hostFDs[0], &buf, 100), 72)
        fakes[0].refuse(nil)
        fakes[0].clear()
        try h.resetAndRestart()
        XCTAssertEqual(fakes[0].calls, [], "userspace from then on")
    }

    /// Ring features vhost lacks are not offered; the rest are.
    func testFeaturesVhostLacksAreNotOffered() throws {
        let (h, _) = try vhostHarness(pairs: 1, features: VhostNetRingFeatures.all & ~VirtioFeature.eventIdx)
        XCTAssertEqual(h.device.deviceFeatures & VirtioFeature.eventIdx, 0)
        XCTAssertNotEqual(h.device.deviceFeatures & VirtioNetFeature.mrgRxbuf, 0)
        XCTAssertNotEqual(h.device.deviceFeatures & VirtioNetFeature.hostTSO4, 0, "offloads are the TAP's")
    }

    /// A call from the kernel becomes a used-buffer interrupt (counted on the queue); an
    /// error marks the device NEEDS_RESET and stops the pair.
    func testCallAndErrorEventfds() throws {
        let (h, fakes) = try vhostHarness(pairs: 1)
        let rx = h.handler(0) as! VhostQueue
        rx.completionsReady()
        XCTAssertEqual(h.sink.used, 0)
        fakes[0].signal(call: 0)
        var p = pollfd(fd: rx.completionFD, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 5000), 1)
        rx.completionsReady()
        XCTAssertEqual(h.sink.used, 1)
        XCTAssertEqual(h.device.stats[0].interrupts, 1)
        XCTAssertEqual(poll(&p, 1, 0), 0, "the call was taken")
        fakes[0].signal(err: 1)
        let tx = h.handler(1) as! VhostQueue
        tx.completionsReady()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(fakes[0].backend, [-1, -1])
    }
}

/// The lost-interrupt race (TransportConcurrencyTests in VirtioTests) on the vhost path:
/// a stand-in "kernel" thread publishes used entries and writes the CALL eventfd, the
/// pair's handler relays it on its own thread through the real transport, and a driver
/// thread takes each interrupt as Linux does (read InterruptStatus, ACK, then look at
/// the used ring). The handler's thread is made to stop right after raising until the
/// kernel has made its next call (the widest window a preempted thread can leave), so a
/// handler that read the CALL eventfd after raising would take that call with no
/// interrupt left for it, and the driver would stall: every round must reach it.
final class VhostInterruptRaceTests: XCTestCase {
    final class Counter: Sendable {
        let v = Atomic<Int>(0)
        var value: Int { v.load(ordering: .acquiring) }
        func set(_ x: Int) { v.store(x, ordering: .releasing) }
    }
    final class Line: InterruptLine {
        let raised = Counter()
        func raise() { raised.v.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        func lower() {}
    }
    final class NoDevice: VirtioDevice {
        var deviceType: UInt32 { 1 }
        var queueMaxSizes: [UInt16] { [] }
        var deviceFeatures: UInt64 { VirtioFeature.version1 }
        var configSize: Int { 0 }
        func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {}
        func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {}
        func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, interrupt: any VirtioInterruptSink) throws {}
        func reset() {}
    }
    /// The transport, with the handler's thread held after each raise until `called`
    /// moves past what it was when the interrupt went up (at most 1 s).
    final class PreemptedAfterRaise: VirtioInterruptSink {
        let t: VirtioMMIOTransport
        let called: Counter
        let last: Int
        init(_ t: VirtioMMIOTransport, called: Counter, last: Int) {
            self.t = t
            self.called = called
            self.last = last
        }
        func signalUsedBuffer() {
            let before = called.value
            t.signalUsedBuffer()
            guard before < last else { return }
            let deadline = monotonicNanos() + 1_000_000_000
            while called.value == before && monotonicNanos() < deadline { sched_yield() }
        }
        func signalConfigChange() { t.signalConfigChange() }
        func markNeedsReset() { t.markNeedsReset() }
    }

    /// InterruptACK writes caught without an exit (edge-triggered mode), as KVM's ioeventfds.
    final class Acks: DeferredInterruptAcks {
        let pending = Atomic<UInt32>(0)
        func take() -> UInt32 { pending.exchange(0, ordering: .acquiringAndReleasing) }
        func drain() { pending.store(0, ordering: .releasing) }
    }

    func testEveryCallReachesTheDriver() throws {
        try everyCallReachesTheDriver(edge: false)
    }

    /// The same with --virtio-irq edge: a pulse per interrupt and the driver's ACK applied
    /// only at its next InterruptStatus read (each round's next call comes after the ACK
    /// of the last one, so a deferred ACK that cleared the new bit would lose it).
    func testEveryCallReachesTheDriverEdge() throws {
        try everyCallReachesTheDriver(edge: true)
    }

    func everyCallReachesTheDriver(edge: Bool) throws {
        let mem = try GuestMemory(layout: [(base: 0, size: 0x10_0000)])
        let line = Line()
        let acks = Acks()
        let t = VirtioMMIOTransport(device: NoDevice(), memory: mem, line: line, trigger: edge ? .edge(acks: acks) : .level)
        let fake = FakeVhost()
        let pair = try VhostPair(pair: 0, vhost: fake, tapFD: -1)
        try pair.configure(features: 0, memory: mem, rings: [
            try SplitQueue(memory: mem, layout: QueueLayout(size: 16, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000)),
            try SplitQueue(memory: mem, layout: QueueLayout(size: 16, descTable: 0x4000, availRing: 0x5000, usedRing: 0x6000)),
        ])
        let rounds = 300
        let published = Counter(), called = Counter(), seen = Counter()
        let sink = PreemptedAfterRaise(t, called: called, last: rounds)
        let handler = try VhostQueue(index: 0, pair: pair, interrupt: sink, counters: QueueCounters(), name: "trace", log: nil)
        // The pair's thread, as QueueWorker runs it.
        let stop = try EventFD()
        let worker = try spawnThread(name: "trace-q0") {
            pollUntilStopped(stop: stop, watch: [handler.completionFD], onFailure: { _ in }) { _ in handler.completionsReady() }
        }
        // The kernel: publishes entry i, then calls; the next one once the driver has
        // looked at the used ring after the interrupt for entry i.
        let kernel = try spawnThread(name: "trace-kernel") {
            for i in 1...rounds {
                published.set(i)
                fake.signal(call: 0)
                called.set(i)
                let deadline = monotonicNanos() + 2_000_000_000
                while seen.value < i && monotonicNanos() < deadline { sched_yield() }
                if seen.value < i { return }
            }
        }
        // The driver (a vCPU): per raised interrupt, read InterruptStatus, ACK it, then take
        // what is used if it read the used-buffer bit (Linux's vm_interrupt). Gives up 2 s
        // after the last interrupt.
        var handled = 0
        var giveUp = monotonicNanos() + 2_000_000_000
        while seen.value < rounds && monotonicNanos() < giveUp {
            let r = line.raised.value
            guard r > handled else { sched_yield(); continue }
            handled = r
            let s = t.read(offset: VirtioMMIOReg.interruptStatus, size: 4)
            if edge {
                acks.pending.bitwiseOr(s, ordering: .acquiringAndReleasing)
            } else {
                t.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: s)
            }
            if s & VirtioInterrupt.usedBuffer != 0 { seen.set(published.value) }
            giveUp = monotonicNanos() + 2_000_000_000
        }
        kernel.join()
        try stop.write(1)
        worker.join()
        pair.close()
        XCTAssertEqual(seen.value, rounds, "lost interrupt: the driver saw entry \(seen.value) of \(rounds) and no interrupt came for the next")
    }
}
