// QueueServer over a real split queue in guest memory, the driver played by QueueHarness.
import OS
import XCTest
import Glibc
import GuestMemory
@testable import Virtio

/// Records the device's signals; `onUsed` plays a driver that reacts to the interrupt.
// @unchecked Sendable: each test calls it from its own thread only.
final class ServerSink: VirtioInterruptSink, @unchecked Sendable {
    var used = 0
    var needsReset = 0
    var onUsed: () -> Void = {}
    func signalUsedBuffer() { used += 1; onUsed() }
    func signalConfigChange() {}
    func markNeedsReset() { needsReset += 1 }
}

final class QueueServerTests: XCTestCase {
    /// One-descriptor chains at descriptors 0..<n, each 16 device-writable bytes.
    func offerChains(_ h: QueueHarness, _ range: Range<Int>) {
        for i in range {
            h.desc(i, addr: 0x8000 + UInt64(i) * 0x100, len: 16, flags: VirtqDesc.write)
            h.offer(UInt16(i))
        }
    }

    func server(_ h: QueueHarness, eventIdx: Bool, sink: ServerSink, log: RateLimitedLog? = nil) throws -> QueueServer {
        QueueServer(index: 3, queue: try h.queue(eventIdx: eventIdx), interrupt: sink, counters: QueueCounters(),
                    label: "test q3", stopKind: "test queue stopped", log: log)
    }

    func testDrainServesEverythingPublishesOnceAndTurnsNotificationsOn() throws {
        for eventIdx in [false, true] {
            let h = try QueueHarness(size: 16)
            let sink = ServerSink()
            let s = try server(h, eventIdx: eventIdx, sink: sink)
            offerChains(h, 0..<5)
            var heads: [UInt16] = []
            let end = s.drain { chain in
                heads.append(chain.head)
                XCTAssertEqual(h.usedIdx, 0, "nothing visible before the batch is published")
                s.stage(chain.head, length: 4)
            }
            XCTAssertEqual(end, .empty)
            XCTAssertEqual(heads, [0, 1, 2, 3, 4])
            XCTAssertEqual(h.usedIdx, 5)
            XCTAssertEqual(h.usedElem(4).id, 4)
            XCTAssertEqual(h.usedElem(4).len, 4)
            XCTAssertEqual(sink.used, 1, "one interrupt for the batch")
            XCTAssertEqual(s.counters.interrupts, 1)
            if eventIdx {
                XCTAssertEqual(h.availEvent, 5, "notifications on: kick me at the next chain")
            } else {
                XCTAssertEqual(h.usedFlags & VirtqRingFlags.usedNoNotify, 0, "notifications on")
            }
        }
    }

    /// A chain the driver adds after the ring looked empty and before notifications are
    /// back on brings no kick: drain must find it itself. Here the driver adds it when
    /// the batch's interrupt arrives, which is exactly that moment.
    func testChainsAddedBeforeNotificationsAreBackOnAreServed() throws {
        for eventIdx in [false, true] {
            let h = try QueueHarness(size: 16)
            let sink = ServerSink()
            let s = try server(h, eventIdx: eventIdx, sink: sink)
            offerChains(h, 0..<2)
            var added = false
            sink.onUsed = {
                guard !added else { return }
                added = true
                self.offerChains(h, 2..<3)
            }
            var heads: [UInt16] = []
            XCTAssertEqual(s.drain { heads.append($0.head); s.stage($0.head, length: 0) }, .empty)
            XCTAssertEqual(heads, [0, 1, 2], "eventIdx \(eventIdx)")
            XCTAssertEqual(h.usedIdx, 3)
        }
    }

    func testBudgetStopsWithNotificationsOffAndTheRestWaiting() throws {
        let h = try QueueHarness(size: 16)
        let sink = ServerSink()
        let s = try server(h, eventIdx: true, sink: sink)
        offerChains(h, 0..<7)
        var n = 0
        XCTAssertEqual(s.drain(budget: 4) { n += 1; s.stage($0.head, length: 0) }, .budget)
        XCTAssertEqual(n, 4)
        XCTAssertEqual(h.usedIdx, 4, "published before returning")
        XCTAssertEqual(s.drain(budget: 4) { n += 1; s.stage($0.head, length: 0) }, .empty)
        XCTAssertEqual(n, 7)
    }

    func testBatchesArePublishedAsTheyEnd() throws {
        let h = try QueueHarness(size: 16)
        let s = try server(h, eventIdx: false, sink: ServerSink())
        offerChains(h, 0..<5)
        var seen: [UInt16] = []
        XCTAssertEqual(s.drain(batch: 2) { seen.append(h.usedIdx); s.stage($0.head, length: 0) }, .empty)
        XCTAssertEqual(seen, [0, 0, 2, 2, 4], "the driver sees each batch of 2 before the next starts")
    }

    func testWhileFalsePausesBeforeTakingAnotherChain() throws {
        let h = try QueueHarness(size: 16)
        let s = try server(h, eventIdx: false, sink: ServerSink())
        offerChains(h, 0..<5)
        var taken = 0
        XCTAssertEqual(s.drain(while: { taken < 3 }) { _ in taken += 1 }, .paused)
        XCTAssertEqual(taken, 3, "no chain taken past the limit")
        XCTAssertEqual(try s.queue.availableCount(), 2)
    }

    /// A broken ring: one line, NEEDS_RESET once, and nothing more is served, then or later.
    func testBrokenRingStopsTheQueue() throws {
        let h = try QueueHarness(size: 8)
        let sink = ServerSink()
        let lines = Locked<[String]>([])
        let log = RateLimitedLog(name: "t", sink: { _, l in lines.withLock { $0.append(l) } })
        let s = try server(h, eventIdx: false, sink: sink, log: log)
        offerChains(h, 0..<1)
        h.offer(99)  // a head past the table
        offerChains(h, 2..<3)
        var heads: [UInt16] = []
        XCTAssertEqual(s.drain { heads.append($0.head); s.stage($0.head, length: 0) }, .stopped)
        XCTAssertEqual(heads, [0])
        XCTAssertEqual(h.usedIdx, 1, "what was served before is still published")
        XCTAssertTrue(s.broken)
        XCTAssertEqual(sink.needsReset, 1)
        XCTAssertEqual(lines.withLock { $0.count }, 1)
        XCTAssertTrue(lines.withLock { $0[0].hasPrefix("test q3: ") && $0[0].hasSuffix(": device needs reset") })
        XCTAssertEqual(s.drain { heads.append($0.head) }, .stopped)
        XCTAssertNil(s.pop())
        XCTAssertEqual(heads, [0])
    }

    func testQuiescedServesNothing() throws {
        let h = try QueueHarness(size: 8)
        let s = try server(h, eventIdx: false, sink: ServerSink())
        offerChains(h, 0..<2)
        s.quiesced = true
        var n = 0
        XCTAssertEqual(s.drain { _ in n += 1 }, .stopped)
        XCTAssertEqual(n, 0)
    }

    /// interruptsOnlyForNewEntries: a publish with nothing staged asks nothing (virtio-blk);
    /// otherwise an interrupt the driver suppressed without EVENT_IDX goes out once it
    /// wants interrupts again (virtio-net).
    func testOwedInterruptWithoutEventIdx() throws {
        for onlyNew in [false, true] {
            let h = try QueueHarness(size: 8)
            let sink = ServerSink()
            let s = QueueServer(index: 0, queue: try h.queue(eventIdx: false), interrupt: sink, counters: QueueCounters(),
                                label: "t", stopKind: "t", log: nil, interruptsOnlyForNewEntries: onlyNew)
            h.availFlags = VirtqRingFlags.availNoInterrupt
            offerChains(h, 0..<1)
            s.drain { s.stage($0.head, length: 0) }
            XCTAssertEqual(sink.used, 0, "suppressed")
            h.availFlags = 0
            s.publish()
            XCTAssertEqual(sink.used, onlyNew ? 0 : 1)
        }
    }

    func testCountersCount() {
        let c = QueueCounters()
        c.notified(); c.notified()
        c.count(bytes: 100); c.count()
        c.drop()
        XCTAssertEqual([c.notifications, c.served, c.bytes, c.drops, c.interrupts], [2, 2, 100, 1, 0])
    }
}
