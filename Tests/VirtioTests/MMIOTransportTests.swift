import OS
import Glibc
import XCTest
import GuestMemory
import Synchronization
@testable import Virtio

// @unchecked Sendable: each test drives it from its own thread only.
final class MockDevice: VirtioDevice, @unchecked Sendable {
    var deviceType: UInt32 = VirtioDeviceType.block
    var queueMaxSizes: [UInt16] = [256, 64]
    var deviceFeatures: UInt64 = (1 << 0) | (1 << 9) | VirtioFeature.eventIdx | VirtioFeature.indirectDesc
        | VirtioFeature.ringPacked | (1 << 27)
    var config: [UInt8] = Array(0..<24)
    var writableConfig: Range<Int> = 20..<24
    var configSize: Int { config.count }
    var activations: [(queues: [SplitQueue?], features: UInt64)] = []
    var resets = 0
    var failActivate = false
    var sink: (any VirtioInterruptSink)?
    /// Called on queueNotified and on reset.
    var onNotify: (Int) -> Void = { _ in }
    var onReset: () -> Void = {}

    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        for i in 0..<buffer.count { buffer[i] = config[offset + i] }
    }
    func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {
        guard writableConfig.contains(offset), writableConfig.contains(offset + bytes.count - 1) else { return }
        for i in 0..<bytes.count { config[offset + i] = bytes[i] }
    }
    struct Refused: Error {}
    func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, interrupt: any VirtioInterruptSink) throws {
        if failActivate { throw Refused() }
        activations.append((queues, features))
        sink = interrupt
    }
    func reset() { resets += 1; sink = nil; onReset() }
    func queueNotified(_ queue: Int) { onNotify(queue) }
}

/// An interrupt line that calls `raised` on each raise and `lowered` on each lower.
final class CallbackLine: InterruptLine {
    let raised: @Sendable () -> Void
    let lowered: @Sendable () -> Void
    init(raised: @escaping @Sendable () -> Void = {}, lowered: @escaping @Sendable () -> Void = {}) {
        self.raised = raised
        self.lowered = lowered
    }
    func raise() { raised() }
    func lower() { lowered() }
}

// @unchecked Sendable: each test records from its own thread only.
final class Recorder: @unchecked Sendable {
    var interrupts = 0
    var statusAtInterrupt: [UInt32] = []
    var notifies: [Int] = []
    var resets = 0
    var logs: [String] = []
    var logLevels: [LogLevel] = []
    /// The log's clock (ns).
    var now: UInt64 = 0
    weak var transport: VirtioMMIOTransport?
}

final class MMIOTransportTests: XCTestCase {
    typealias R = VirtioMMIOReg
    var mem: GuestMemory!
    var dev: MockDevice!
    var rec: Recorder!
    var t: VirtioMMIOTransport!

    override func setUp() {
        mem = try! GuestMemory(layout: [(0, 0x10_0000)])
        dev = MockDevice()
        rec = Recorder()
        let rec = rec!
        dev.onNotify = { rec.notifies.append($0) }
        dev.onReset = { rec.resets += 1 }
        let line = CallbackLine(raised: { rec.interrupts += 1; rec.statusAtInterrupt.append(rec.transport?.interruptStatus ?? 0) })
        t = VirtioMMIOTransport(device: dev, memory: mem, line: line,
                                log: RateLimitedLog(name: "tdev", clock: { rec.now }, sink: { level, line in
                                    rec.logs.append(line)
                                    rec.logLevels.append(level)
                                }))
        rec.transport = t
    }

    func r(_ off: UInt64) -> UInt32 { t.read(offset: off, size: 4) }
    func w(_ off: UInt64, _ v: UInt32) { t.write(offset: off, size: 4, value: v) }

    func negotiate(_ features: UInt64) {
        w(R.status, VirtioStatus.acknowledge)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        w(R.driverFeaturesSel, 0); w(R.driverFeatures, UInt32(truncatingIfNeeded: features))
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
    }

    func setupQueue(_ i: UInt32, size: UInt32, desc: UInt64, avail: UInt64, used: UInt64, ready: Bool = true) {
        w(R.queueSel, i)
        w(R.queueNum, size)
        w(R.queueDescLow, UInt32(truncatingIfNeeded: desc)); w(R.queueDescHigh, UInt32(desc >> 32))
        w(R.queueDriverLow, UInt32(truncatingIfNeeded: avail)); w(R.queueDriverHigh, UInt32(avail >> 32))
        w(R.queueDeviceLow, UInt32(truncatingIfNeeded: used)); w(R.queueDeviceHigh, UInt32(used >> 32))
        if ready { w(R.queueReady, 1) }
    }

    let allOK = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK

    func testIdentityRegisters() {
        XCTAssertEqual(r(R.magicValue), 0x7472_6976)
        XCTAssertEqual(r(R.version), 2)
        XCTAssertEqual(r(R.deviceID), 2)
        XCTAssertEqual(r(R.vendorID), VirtioMMIOTransport.vendorID)
        XCTAssertEqual(withUnsafeBytes(of: VirtioMMIOTransport.vendorID.littleEndian) { Array($0) }, Array("SWLT".utf8))
        XCTAssertEqual(r(R.status), 0)
        XCTAssertEqual(r(R.configGeneration), 0)
        // No shared memory regions: length -1.
        XCTAssertEqual(r(R.shmLenLow), 0xFFFF_FFFF)
        XCTAssertEqual(r(R.shmLenHigh), 0xFFFF_FFFF)
        XCTAssertEqual(r(R.queueReset), 0)
    }

    func testDeviceFeaturesWindow() {
        w(R.deviceFeaturesSel, 0)
        // Legacy bit 27 and packed ring (34) are not offered; device bits, EVENT_IDX, INDIRECT are.
        XCTAssertEqual(r(R.deviceFeatures), 1 | (1 << 9) | (1 << 28) | (1 << 29))
        w(R.deviceFeaturesSel, 1)
        XCTAssertEqual(r(R.deviceFeatures), 1)  // VERSION_1 (bit 32), added by the transport
        w(R.deviceFeaturesSel, 2)
        XCTAssertEqual(r(R.deviceFeatures), 0)
        w(R.deviceFeaturesSel, 0xFFFF_FFFF)
        XCTAssertEqual(r(R.deviceFeatures), 0)
    }

    func testHappyPathInitActivatesOnce() throws {
        XCTAssertEqual(r(R.magicValue), 0x7472_6976)
        w(R.status, 0)
        negotiate(VirtioFeature.version1 | VirtioFeature.eventIdx | 1)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        w(R.queueSel, 0)
        XCTAssertEqual(r(R.queueNumMax), 256)
        XCTAssertEqual(r(R.queueReady), 0)
        setupQueue(0, size: 128, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        XCTAssertEqual(r(R.queueReady), 1)
        XCTAssertEqual(r(R.queueDescLow), 0x1_0000)
        w(R.queueSel, 1)
        XCTAssertEqual(r(R.queueNumMax), 64)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(dev.activations.isEmpty)
        w(R.status, allOK)
        XCTAssertEqual(r(R.status), allOK)
        XCTAssertEqual(dev.activations.count, 1)
        let a = dev.activations[0]
        XCTAssertEqual(a.features, VirtioFeature.version1 | VirtioFeature.eventIdx | 1)
        XCTAssertEqual(a.queues.count, 2)
        let q0 = try XCTUnwrap(a.queues[0])
        XCTAssertNil(a.queues[1])
        XCTAssertEqual(q0.size, 128)
        XCTAssertTrue(q0.eventIdx)
        XCTAssertFalse(q0.indirectDescriptors)
        XCTAssertEqual(q0.layout, QueueLayout(size: 128, descTable: 0x1_0000, availRing: 0x1_1000, usedRing: 0x1_2000))
        XCTAssertTrue(t.isActivated)
        // Writing DRIVER_OK again does not re-activate.
        w(R.status, allOK)
        XCTAssertEqual(dev.activations.count, 1)
        XCTAssertFalse(t.needsReset)
    }

    func testFeaturesWithoutVersion1Refused() {
        negotiate(1)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver)
        // DRIVER_OK cannot follow.
        w(R.status, allOK)
        XCTAssertEqual(r(R.status) & (VirtioStatus.featuresOK | VirtioStatus.driverOK), 0)
        XCTAssertTrue(dev.activations.isEmpty)
    }

    func testFeaturesNotOfferedRefused() {
        negotiate(VirtioFeature.version1 | VirtioFeature.ringPacked)
        XCTAssertEqual(r(R.status) & VirtioStatus.featuresOK, 0)
        w(R.status, 0)
        negotiate(VirtioFeature.version1 | (1 << 5))
        XCTAssertEqual(r(R.status) & VirtioStatus.featuresOK, 0)
        // A bit past 63 (selector 2).
        w(R.status, 0)
        w(R.status, VirtioStatus.acknowledge)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)
        w(R.driverFeaturesSel, 2); w(R.driverFeatures, 1)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        XCTAssertEqual(r(R.status) & VirtioStatus.featuresOK, 0)
        // Exactly VERSION_1 is accepted.
        w(R.status, 0)
        negotiate(VirtioFeature.version1)
        XCTAssertNotEqual(r(R.status) & VirtioStatus.featuresOK, 0)
        // Features cannot change after FEATURES_OK.
        w(R.driverFeaturesSel, 0); w(R.driverFeatures, 0xFFFF_FFFF)
        XCTAssertEqual(t.driverFeatures, VirtioFeature.version1)
    }

    func testStatusStateMachineRejectsBadTransitions() {
        // DRIVER without ACKNOWLEDGE.
        w(R.status, VirtioStatus.driver)
        XCTAssertEqual(r(R.status), 0)
        // Everything at once without features: only what is legal sticks.
        w(R.status, allOK)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver)
        // Clearing a bit (other than by writing 0) is ignored.
        w(R.status, VirtioStatus.acknowledge)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver)
        // The driver cannot set NEEDS_RESET.
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.needsReset)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver)
        // FAILED is recorded.
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.failed)
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.failed)
        XCTAssertTrue(dev.activations.isEmpty)
    }

    /// Only the bits the driver may set are stored: undefined bits read back as 0, and
    /// NEEDS_RESET only when the device set it.
    func testStatusStoresOnlyTheDriverBits() throws {
        w(R.status, 0xFFFF_FFFF)  // no features yet: FEATURES_OK and DRIVER_OK are refused
        XCTAssertEqual(r(R.status), VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.failed)
        w(R.status, 0)
        w(R.status, 0x30)
        XCTAssertEqual(r(R.status), 0)
        XCTAssertEqual(dev.resets, 1, "a write of undefined bits only is not a reset")
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, 0xFFFF_FFFF)
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.failed)
        XCTAssertEqual(dev.activations.count, 1)
        XCTAssertFalse(t.needsReset)
        try XCTUnwrap(dev.sink).markNeedsReset()
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.failed | VirtioStatus.needsReset)
        w(R.status, 0xFFFF_FFFF & ~VirtioStatus.needsReset)
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.failed | VirtioStatus.needsReset, "the driver cannot clear it but by a reset")
        w(R.status, 0)
        XCTAssertEqual(r(R.status), 0)
        // Usable again after the reset.
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        XCTAssertEqual(r(R.status), allOK)
        XCTAssertEqual(dev.activations.count, 2)
    }

    func testQueueAddressWrittenWhileReadyIgnored() {
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.queueDescLow, 0x5_0000)
        w(R.queueDriverLow, 0x5_1000)
        w(R.queueDeviceHigh, 1)
        w(R.queueNum, 8)
        let l = t.queueLayout(0)!
        XCTAssertTrue(l.ready)
        XCTAssertEqual(l.layout, QueueLayout(size: 16, descTable: 0x1_0000, availRing: 0x1_1000, usedRing: 0x1_2000))
    }

    func testBadQueueNumRefusedAndDeviceMarked() {
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 100, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
        XCTAssertEqual(r(R.status) & VirtioStatus.needsReset, VirtioStatus.needsReset)
        XCTAssertEqual(rec.interrupts, 0)  // not before DRIVER_OK
        w(R.status, allOK)
        XCTAssertTrue(dev.activations.isEmpty)
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.needsReset)
        XCTAssertEqual(r(R.interruptStatus), VirtioInterrupt.configChange)
        XCTAssertEqual(rec.interrupts, 1)
        XCTAssertEqual(rec.statusAtInterrupt, [VirtioInterrupt.configChange])
        // Reset clears NEEDS_RESET.
        w(R.status, 0)
        XCTAssertEqual(r(R.status), 0)
        XCTAssertEqual(r(R.interruptStatus), 0)
        XCTAssertFalse(t.needsReset)
    }

    func testQueueSizeLimits() {
        negotiate(VirtioFeature.version1)
        setupQueue(1, size: 128, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)  // max is 64
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
        w(R.status, 0)
        negotiate(VirtioFeature.version1)
        setupQueue(1, size: 0, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
    }

    func testQueueRingsOutsideRAMOrMisalignedRefused() {
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x10_0000 - 16, avail: 0x1_1000, used: 0x1_2000)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
        w(R.status, 0)
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2002)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
        w(R.status, 0)
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_0000_1000)  // high half set
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertTrue(t.needsReset)
    }

    func testQueueReadyBeforeFeaturesOKIgnored() {
        w(R.status, VirtioStatus.acknowledge)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertFalse(t.needsReset)
    }

    func testResetForgetsQueuesAndStopsDevice() {
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        XCTAssertEqual(dev.activations.count, 1)
        t.signalUsedBuffer()
        XCTAssertEqual(r(R.interruptStatus), 1)
        w(R.status, 0)
        XCTAssertEqual(dev.resets, 1)
        XCTAssertEqual(rec.resets, 1)
        XCTAssertNil(dev.sink)
        XCTAssertEqual(r(R.status), 0)
        XCTAssertEqual(r(R.interruptStatus), 0)
        XCTAssertFalse(t.isActivated)
        XCTAssertEqual(t.driverFeatures, 0)
        w(R.queueSel, 0)
        XCTAssertEqual(r(R.queueReady), 0)
        XCTAssertEqual(r(R.queueDescLow), 0)
        XCTAssertEqual(t.queueLayout(0)!.layout, QueueLayout(size: 256, descTable: 0, availRing: 0, usedRing: 0))
        // A second init works and activates again with fresh queues.
        negotiate(VirtioFeature.version1 | VirtioFeature.indirectDesc)
        setupQueue(0, size: 32, desc: 0x2_0000, avail: 0x2_1000, used: 0x2_2000)
        w(R.status, allOK)
        XCTAssertEqual(dev.activations.count, 2)
        XCTAssertEqual(dev.activations[1].queues[0]?.size, 32)
        XCTAssertEqual(dev.activations[1].queues[0]?.indirectDescriptors, true)
    }

    func testActivationFailureMarksNeedsReset() {
        dev.failActivate = true
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        XCTAssertFalse(t.isActivated)
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.needsReset)
        XCTAssertEqual(r(R.interruptStatus), VirtioInterrupt.configChange)
        XCTAssertEqual(rec.interrupts, 1)
    }

    func testDeviceReportedViolation() {
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        dev.sink!.markNeedsReset()
        dev.sink!.markNeedsReset()  // idempotent: one interrupt
        XCTAssertEqual(r(R.status), allOK | VirtioStatus.needsReset)
        XCTAssertEqual(r(R.interruptStatus), VirtioInterrupt.configChange)
        XCTAssertEqual(rec.interrupts, 1)
        XCTAssertEqual(rec.statusAtInterrupt, [VirtioInterrupt.configChange])
    }

    func testInterruptStatusAndACK() {
        t.signalUsedBuffer()
        XCTAssertEqual(rec.statusAtInterrupt, [1])  // bit set before the irqfd fires
        let gen = r(R.configGeneration)
        t.signalConfigChange()
        XCTAssertEqual(rec.statusAtInterrupt, [1, 3])
        XCTAssertEqual(r(R.configGeneration), gen &+ 1)
        XCTAssertEqual(r(R.interruptStatus), 3)
        w(R.interruptACK, 1)
        XCTAssertEqual(r(R.interruptStatus), 2)
        w(R.interruptACK, 0xFFFF_FFFC)  // unknown bits: no effect
        XCTAssertEqual(r(R.interruptStatus), 2)
        w(R.interruptACK, 2)
        XCTAssertEqual(r(R.interruptStatus), 0)
        // InterruptStatus is read-only.
        w(R.interruptStatus, 3)
        XCTAssertEqual(r(R.interruptStatus), 0)
    }

    /// The resample path of the level-triggered line: after the guest's EOI the line is
    /// raised again only while InterruptStatus is nonzero.
    func testReassertAfterEOIOnlyWhilePending() {
        t.reassertIfPending()
        XCTAssertEqual(rec.interrupts, 0, "nothing pending: the line stays low")
        t.signalUsedBuffer()
        XCTAssertEqual(rec.interrupts, 1)
        t.reassertIfPending()  // EOI before the driver acknowledged: raise again
        XCTAssertEqual(rec.interrupts, 2)
        XCTAssertEqual(rec.statusAtInterrupt, [1, 1])
        w(R.interruptACK, 1)
        t.reassertIfPending()
        XCTAssertEqual(rec.interrupts, 2, "acknowledged: no re-assert")
        XCTAssertEqual(t.interruptsRaised.load(ordering: .relaxed), 2)
    }

    func testUsedBufferSignalsFoldIntoAnUnacknowledgedInterrupt() {
        t.signalUsedBuffer()
        t.signalUsedBuffer()  // the driver has not acknowledged the first: no second edge
        t.signalUsedBuffer()
        XCTAssertEqual(rec.interrupts, 1)
        XCTAssertEqual(t.interruptsRaised.load(ordering: .relaxed), 1)
        XCTAssertEqual(t.interruptsCoalesced.load(ordering: .relaxed), 2)
        w(R.interruptACK, r(R.interruptStatus))
        t.signalUsedBuffer()  // acknowledged: the next one raises again
        XCTAssertEqual(rec.interrupts, 2)
        XCTAssertEqual(rec.statusAtInterrupt, [1, 1])
        // A config change always raises (rare, and the driver must see it at once).
        t.signalConfigChange()
        XCTAssertEqual(rec.interrupts, 3)
    }

    func testQueueNotifyForwardedOnlyWhenActive() {
        w(R.queueNotify, 0)
        XCTAssertEqual(rec.notifies, [])
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        w(R.queueNotify, 1)
        w(R.queueNotify, 0)
        w(R.queueNotify, 2)           // no such queue
        w(R.queueNotify, 0xFFFF_0000)
        XCTAssertEqual(rec.notifies, [1, 0])
    }

    func testUnalignedAndOddSizedRegisterAccesses() {
        XCTAssertEqual(t.read(offset: R.magicValue, size: 1), 0)
        XCTAssertEqual(t.read(offset: R.magicValue, size: 2), 0)
        XCTAssertEqual(t.read(offset: R.magicValue + 1, size: 4), 0)
        XCTAssertEqual(t.read(offset: R.magicValue + 2, size: 4), 0)
        XCTAssertEqual(t.read(offset: R.magicValue, size: 3), 0)
        var eight = [UInt8](repeating: 0xAA, count: 8)
        eight.withUnsafeMutableBytes { t.read(offset: R.magicValue, into: $0) }
        XCTAssertEqual(eight, [UInt8](repeating: 0, count: 8))
        // Writes of the wrong width do nothing.
        t.write(offset: R.status, size: 1, value: 1)
        t.write(offset: R.status, size: 2, value: 1)
        t.write(offset: R.status + 1, size: 4, value: 1)
        XCTAssertEqual(r(R.status), 0)
        eight = [1, 0, 0, 0, 0, 0, 0, 0]
        eight.withUnsafeBytes { t.write(offset: R.status, from: $0) }
        XCTAssertEqual(r(R.status), 0)
        // Empty accesses.
        t.read(offset: 0, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
        t.write(offset: R.status, from: UnsafeRawBufferPointer(start: nil, count: 0))
        XCTAssertFalse(rec.logs.isEmpty)
    }

    func testOutOfRangeOffsets() {
        for off: UInt64 in [0x0fc + 4 + 0x100, 0x1000, 0xFFFF_FFFF, UInt64.max - 3, UInt64.max, 0x0e0, 0x0f8] {
            XCTAssertEqual(r(off), 0, "offset 0x\(String(off, radix: 16))")
            w(off, 0xFFFF_FFFF)
        }
        // Writes to read-only registers are ignored.
        w(R.magicValue, 0); w(R.queueNumMax, 1); w(R.deviceFeatures, 0); w(R.configGeneration, 7)
        XCTAssertEqual(r(R.magicValue), 0x7472_6976)
        XCTAssertEqual(r(R.configGeneration), 0)
        XCTAssertEqual(r(R.status), 0)
        // An absent queue: QueueNumMax 0, its registers ignored.
        w(R.queueSel, 2)
        XCTAssertEqual(r(R.queueNumMax), 0)
        w(R.queueNum, 16); w(R.queueReady, 1)
        XCTAssertEqual(r(R.queueReady), 0)
        w(R.queueSel, 0xFFFF_FFFF)
        XCTAssertEqual(r(R.queueNumMax), 0)
        XCTAssertNil(t.queueLayout(2))
    }

    func testConfigSpaceAccesses() {
        XCTAssertEqual(t.read(offset: R.config, size: 1), 0)
        XCTAssertEqual(t.read(offset: R.config + 1, size: 1), 1)
        XCTAssertEqual(t.read(offset: R.config + 2, size: 2), 0x0302)
        XCTAssertEqual(t.read(offset: R.config + 5, size: 2), 0x0605)  // unaligned is fine in config space
        XCTAssertEqual(t.read(offset: R.config + 4, size: 4), 0x0706_0504)
        XCTAssertEqual(t.read(offset: R.config + 20, size: 4), 0x1716_1514)  // last 4 bytes
        var eight = [UInt8](repeating: 0, count: 8)
        eight.withUnsafeMutableBytes { t.read(offset: R.config + 16, into: $0) }
        XCTAssertEqual(eight, [16, 17, 18, 19, 20, 21, 22, 23])
        // Past the end, partly or wholly: zero.
        XCTAssertEqual(t.read(offset: R.config + 22, size: 4), 0)
        XCTAssertEqual(t.read(offset: R.config + 23, size: 2), 0)
        XCTAssertEqual(t.read(offset: R.config + 24, size: 1), 0)
        XCTAssertEqual(t.read(offset: R.config + 0xF00, size: 4), 0)
        eight = [UInt8](repeating: 0xAA, count: 8)
        eight.withUnsafeMutableBytes { t.read(offset: R.config + 20, into: $0) }
        XCTAssertEqual(eight, [UInt8](repeating: 0, count: 8))
        // Odd sizes.
        XCTAssertEqual(t.read(offset: R.config, size: 3), 0)
        // Writes: only where the device allows, never past the end.
        t.write(offset: R.config + 20, size: 2, value: 0xBEEF)
        XCTAssertEqual(t.read(offset: R.config + 20, size: 2), 0xBEEF)
        t.write(offset: R.config, size: 4, value: 0xFFFF_FFFF)
        XCTAssertEqual(t.read(offset: R.config, size: 4), 0x0302_0100)
        t.write(offset: R.config + 22, size: 4, value: 0xFFFF_FFFF)
        XCTAssertEqual(t.read(offset: R.config + 22, size: 2), 0x1716)
        XCTAssertEqual(dev.config.count, 24)
    }

    func testEmptyConfigSpace() {
        dev.config = []
        XCTAssertEqual(t.read(offset: R.config, size: 1), 0)
        t.write(offset: R.config, size: 1, value: 1)
    }

    /// A guest repeating a bad access cannot flood stderr: per kind of line, the first 5,
    /// then at most one summary a second; all of them warnings.
    func testGuestTriggeredLinesAreRateLimitedPerKind() {
        for _ in 0..<10_000 { w(R.queueNotify, 7) }                             // no such queue
        for _ in 0..<10_000 { XCTAssertEqual(r(R.config + 0x800), 0) }          // past the config space
        XCTAssertEqual(rec.logs.count, 10)
        XCTAssertEqual(rec.logs.filter { $0.contains("ignored queue notify 7") }.count, 5)
        XCTAssertEqual(rec.logs.filter { $0.contains("ignored config read") }.count, 5)
        rec.now += 999_999_999
        w(R.queueNotify, 7)
        XCTAssertEqual(rec.logs.count, 10)
        rec.now += 1
        w(R.queueNotify, 7)
        XCTAssertEqual(rec.logs.count, 11)
        XCTAssertEqual(rec.logs.last, "tdev: 9997 more \"ignored queue notify\" lines left out")
        XCTAssertEqual(r(R.config + 0x800), 0)
        XCTAssertEqual(rec.logs.last, "tdev: 9996 more \"ignored config read\" lines left out")
        rec.now += 500_000_000
        for _ in 0..<100 { w(R.queueNotify, 7) }
        XCTAssertEqual(rec.logs.count, 12)
        XCTAssertEqual(Set(rec.logLevels), [.warn])
        // The device still works: a driver can set it up and run it.
        negotiate(VirtioFeature.version1)
        setupQueue(0, size: 16, desc: 0x1_0000, avail: 0x1_1000, used: 0x1_2000)
        w(R.status, allOK)
        XCTAssertEqual(dev.activations.count, 1)
        w(R.queueNotify, 0)
        XCTAssertEqual(rec.notifies, [0])
    }

    func testConstantsMatchLinuxHeaders() {
        // Spot checks against the spec values used by Linux (linux/virtio_config.h, virtio_ring.h).
        XCTAssertEqual(VirtioFeature.version1, 1 << 32)
        XCTAssertEqual(VirtioFeature.indirectDesc, 1 << 28)
        XCTAssertEqual(VirtioFeature.eventIdx, 1 << 29)
        XCTAssertEqual(VirtioStatus.needsReset, 64)
        XCTAssertEqual(VirtioMMIOReg.configGeneration, 0x0fc)
        XCTAssertEqual(VirtioMMIOReg.queueDeviceHigh, 0x0a4)
    }
}

/// A device worker signalling from another thread while the vCPU side reads and acks.
final class TransportConcurrencyTests: XCTestCase {
    func testConcurrentSignalAndAck() throws {
        try concurrentSignalAndAck(edge: false)
    }

    /// The same with the edge-triggered transport, the driver's ACK deferred (caught as by
    /// an ioeventfd): every bit left after the device is done has a pulse on its way, and
    /// the last handler's ACK clears it at the final read.
    func testConcurrentSignalAndDeferredAckEdge() throws {
        try concurrentSignalAndAck(edge: true)
    }

    func concurrentSignalAndAck(edge: Bool) throws {
        let mem = try GuestMemory(layout: [(0, 0x10_0000)])
        let dev = MockDevice()
        let count = Atomic<Int>(0)
        let acks = FakeAcks()
        let t = VirtioMMIOTransport(device: dev, memory: mem, line: CallbackLine(raised: { count.wrappingAdd(1, ordering: .relaxed) }),
                                    trigger: edge ? .edge(acks: acks) : .level)
        var th = pthread_t()
        let box = Unmanaged.passRetained(t)
        pthread_create(&th, nil, { p in
            let t = Unmanaged<VirtioMMIOTransport>.fromOpaque(p!).takeRetainedValue()
            for _ in 0..<100_000 { t.signalUsedBuffer() }
            return nil
        }, box.toOpaque())
        // The driver: handles each raised interrupt (read status, ack it), as Linux does.
        // Signals folded into an unacknowledged interrupt must never leave a bit set with
        // no interrupt on its way: once the device is done and every raised interrupt is
        // handled, InterruptStatus is 0.
        var handled = 0
        var done = false
        while true {
            let raised = count.load(ordering: .acquiring)
            if raised > handled {
                handled = raised
                let s = t.read(offset: VirtioMMIOReg.interruptStatus, size: 4)
                if edge { acks.ack(s) } else { t.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: s) }
            } else if done {
                break
            } else if t.interruptsRaised.load(ordering: .relaxed) + t.interruptsCoalesced.load(ordering: .relaxed) == 100_000 {
                pthread_join(th, nil)
                done = true
            }
        }
        if edge {
            // The last handler's ACK is applied at the next read.
            XCTAssertEqual(count.load(ordering: .acquiring), handled, "a pulse after the device was done")
        }
        XCTAssertEqual(t.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 0, "a used-buffer bit without an interrupt")
        XCTAssertEqual(t.interruptsRaised.load(ordering: .relaxed) + t.interruptsCoalesced.load(ordering: .relaxed), 100_000)
        XCTAssertGreaterThan(t.interruptsRaised.load(ordering: .relaxed), 0)
    }
}

/// The lost-interrupt race on a bare edge-triggered transport: a device thread uses buffer
/// i, signals, and (with `waitForDriver`) uses the next only once the driver has looked at
/// the queue after an interrupt; the driver handles each pulse as Linux's vm_interrupt
/// (`readStatus`, `ack` it, then look at the queue only if the used-buffer bit was read).
/// Returns how far the driver saw and how many pulses went out.
struct LostInterruptRace {
    final class Shared: Sendable {
        let published = Atomic<Int>(0)
        let seen = Atomic<Int>(0)
        let pulses = Atomic<Int>(0)
    }
    final class Pulse: InterruptLine {
        let shared: Shared
        init(_ s: Shared) { shared = s }
        func raise() { shared.pulses.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        func lower() {}
    }
    final class Job: @unchecked Sendable {
        let t: VirtioMMIOTransport
        let sh: Shared
        let rounds: Int
        let waitForDriver: Bool
        init(_ t: VirtioMMIOTransport, _ sh: Shared, _ rounds: Int, _ wait: Bool) { self.t = t; self.sh = sh; self.rounds = rounds; waitForDriver = wait }
    }

    static func run(rounds: Int, waitForDriver: Bool, make: (any InterruptLine) throws -> VirtioMMIOTransport,
                    readStatus: (VirtioMMIOTransport) -> UInt32, ack: (UInt32) -> Void) throws -> (seen: Int, pulses: Int) {
        let sh = Shared()
        let t = try make(Pulse(sh))
        var th = pthread_t()
        pthread_create(&th, nil, { p in
            let j = Unmanaged<Job>.fromOpaque(p!).takeRetainedValue()
            for i in 1...j.rounds {
                j.sh.published.store(i, ordering: .releasing)
                j.t.signalUsedBuffer()
                guard j.waitForDriver else { continue }
                let deadline = monotonicNanos() + 2_000_000_000
                while j.sh.seen.load(ordering: .acquiring) < i && monotonicNanos() < deadline { sched_yield() }
                if j.sh.seen.load(ordering: .acquiring) < i { return nil }
            }
            return nil
        }, Unmanaged.passRetained(Job(t, sh, rounds, waitForDriver)).toOpaque())
        var handled = 0
        var giveUp = monotonicNanos() + 2_000_000_000
        while sh.seen.load(ordering: .acquiring) < rounds && monotonicNanos() < giveUp {
            let p = sh.pulses.load(ordering: .acquiring)
            guard p > handled else { sched_yield(); continue }
            handled = p
            let s = readStatus(t)
            ack(s)
            // After the ACK: look at the queue (everything published so far).
            if s & VirtioInterrupt.usedBuffer != 0 { sh.seen.store(sh.published.load(ordering: .acquiring), ordering: .releasing) }
            giveUp = monotonicNanos() + 2_000_000_000
        }
        pthread_join(th, nil)
        return (sh.seen.load(ordering: .acquiring), sh.pulses.load(ordering: .acquiring))
    }
}

/// The lost-interrupt race with InterruptStatus reads that exit: every round's signal
/// comes after the previous round's ACK, which is applied only at the next read: the
/// generation rule must keep the bit.
final class EdgeLostInterruptTests: XCTestCase {
    func testEveryUsedBufferReachesTheDriver() throws {
        let mem = try GuestMemory(layout: [(0, 0x1000)])
        let acks = FakeAcks()
        let rounds = 2000
        let r = try LostInterruptRace.run(rounds: rounds, waitForDriver: true,
                                          make: { VirtioMMIOTransport(device: MockDevice(), memory: mem, line: $0, trigger: .edge(acks: acks)) },
                                          readStatus: { $0.read(offset: VirtioMMIOReg.interruptStatus, size: 4) }, ack: { acks.ack($0) })
        XCTAssertEqual(r.seen, rounds, "lost interrupt")
        XCTAssertLessThanOrEqual(r.pulses, rounds, "at most one pulse per used buffer")
    }
}

/// The line as the transport drives it: raised when a bit is set, lowered only when
/// InterruptStatus is zero, and, with signals racing acknowledgements, never left low with
/// a bit set or high with none.
final class TransportLineTests: XCTestCase {
    final class LevelLine: InterruptLine {
        let state = Locked<(high: Bool, calls: [Bool])>((false, []))
        func raise() { state.withLock { $0.high = true; $0.calls.append(true) } }
        func lower() { state.withLock { $0.high = false; $0.calls.append(false) } }
        var high: Bool { state.withLock { $0.high } }
        var calls: [Bool] { state.withLock { $0.calls } }
    }

    func testLineIsLoweredOnlyWhenInterruptStatusIsZero() throws {
        let mem = try GuestMemory(layout: [(0, 0x1000)])
        let line = LevelLine()
        let t = VirtioMMIOTransport(device: MockDevice(), memory: mem, line: line)
        t.signalUsedBuffer()
        XCTAssertEqual(line.calls, [true])
        t.signalConfigChange()
        XCTAssertEqual(line.calls, [true, true], "a config change is raised even while the line is up")
        t.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(t.interruptStatus, 2)
        XCTAssertEqual(line.calls, [true, true], "a bit is left: the line stays up")
        t.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 2)
        XCTAssertEqual(line.calls, [true, true, false])
        t.reassertIfPending()
        XCTAssertEqual(line.calls, [true, true, false], "nothing pending at EOI: stays down")
        t.signalUsedBuffer()
        XCTAssertTrue(line.high)
        t.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertEqual(t.interruptStatus, 0)
        XCTAssertFalse(line.high, "a reset lowers the line")
    }

    func testRacingSignalsAndAcknowledgementsLeaveTheLineMatchingInterruptStatus() throws {
        let mem = try GuestMemory(layout: [(0, 0x1000)])
        for round in 0..<20 {
            let line = LevelLine()
            let t = VirtioMMIOTransport(device: MockDevice(), memory: mem, line: line)
            var th = pthread_t()
            final class Job {
                let t: VirtioMMIOTransport
                let done = Atomic<Bool>(false)
                init(_ t: VirtioMMIOTransport) { self.t = t }
            }
            let job = Job(t)
            pthread_create(&th, nil, { p in
                let j = Unmanaged<Job>.fromOpaque(p!).takeRetainedValue()
                for _ in 0..<20_000 { j.t.signalUsedBuffer() }
                j.done.store(true, ordering: .releasing)
                return nil
            }, Unmanaged.passRetained(job).toOpaque())
            // The driver: while the line is up, reads InterruptStatus and acknowledges it,
            // as a guest's handler does; a line left down with a bit set would stop it.
            while !job.done.load(ordering: .acquiring) {
                guard line.high else { continue }
                let s = t.read(offset: VirtioMMIOReg.interruptStatus, size: 4)
                t.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: s)
            }
            pthread_join(th, nil)
            XCTAssertEqual(line.high, t.interruptStatus != 0, "round \(round): line \(line.high), InterruptStatus \(t.interruptStatus)")
        }
    }
}

/// Driver side through the registers, device side through the SplitQueue it was given.
final class TransportQueueIntegrationTests: XCTestCase {
    func testChainRoundTripThroughTransport() throws {
        typealias R = VirtioMMIOReg
        let mem = try GuestMemory(layout: [(0, 0x10_0000)])
        let dev = MockDevice()
        let irqs = Atomic<Int>(0)
        let t = VirtioMMIOTransport(device: dev, memory: mem, line: CallbackLine(raised: { irqs.wrappingAdd(1, ordering: .relaxed) }))
        func w(_ o: UInt64, _ v: UInt32) { t.write(offset: o, size: 4, value: v) }
        w(R.status, 0)
        w(R.status, 1); w(R.status, 3)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)
        w(R.driverFeaturesSel, 0); w(R.driverFeatures, UInt32(VirtioFeature.eventIdx | VirtioFeature.indirectDesc))
        w(R.status, 11)
        XCTAssertEqual(t.read(offset: R.status, size: 4), 11)
        w(R.queueSel, 0)
        w(R.queueNum, 16)
        w(R.queueDescLow, 0x1_0000); w(R.queueDriverLow, 0x1_1000); w(R.queueDeviceLow, 0x1_2000)
        w(R.queueReady, 1)
        // The driver posts one indirect chain before DRIVER_OK (allowed; the device sees it once running).
        let table: UInt64 = 0x2_0000
        QueueHarness.writeDesc(mem, table: table, 0, addr: 0x3_0000, len: 8, flags: VirtqDesc.next, next: 1)
        QueueHarness.writeDesc(mem, table: table, 1, addr: 0x3_1000, len: 4, flags: VirtqDesc.write)
        QueueHarness.writeDesc(mem, table: 0x1_0000, 5, addr: table, len: 32, flags: VirtqDesc.indirect)
        try mem.store(UInt16(5), at: 0x1_1004)
        try mem.store(UInt16(1), at: 0x1_1002)
        try mem.write([1, 2, 3, 4, 5, 6, 7, 8], at: 0x3_0000)
        w(R.status, 15)
        let q = try XCTUnwrap(dev.activations.first?.queues[0])
        XCTAssertTrue(q.eventIdx && q.indirectDescriptors)
        let c = try XCTUnwrap(try q.popAvailable())
        XCTAssertEqual(c.head, 5)
        var hdr = [UInt8](repeating: 0, count: 8)
        hdr.withUnsafeMutableBytes { _ = c.readReadable(into: $0) }
        XCTAssertEqual(hdr, [1, 2, 3, 4, 5, 6, 7, 8])
        c.writeWritable([0xAB, 0xCD, 0xEF, 0x01])
        try q.addUsed(head: c.head, length: 4)
        if q.needsNotification() { dev.sink!.signalUsedBuffer() }
        XCTAssertEqual(irqs.load(ordering: .relaxed), 1)
        XCTAssertEqual(t.read(offset: R.interruptStatus, size: 4), 1)
        XCTAssertEqual(try mem.load(UInt16.self, at: 0x1_2002), 1)            // used.idx
        XCTAssertEqual(try mem.load(UInt32.self, at: 0x1_2004), 5)            // used[0].id
        XCTAssertEqual(try mem.load(UInt32.self, at: 0x1_2008), 4)            // used[0].len
        XCTAssertEqual(try mem.readBytes(at: 0x3_1000, count: 4), [0xAB, 0xCD, 0xEF, 0x01])
        w(R.interruptACK, 1)
        XCTAssertEqual(t.read(offset: R.interruptStatus, size: 4), 0)
    }

    func testQueueCanBeDisabledAndReconfiguredBeforeDriverOK() {
        typealias R = VirtioMMIOReg
        let mem = try! GuestMemory(layout: [(0, 0x10_0000)])
        let dev = MockDevice()
        let t = VirtioMMIOTransport(device: dev, memory: mem, line: CallbackLine())
        func w(_ o: UInt64, _ v: UInt32) { t.write(offset: o, size: 4, value: v) }
        w(R.status, 1); w(R.status, 3)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)
        w(R.status, 11)
        w(R.queueSel, 0); w(R.queueNum, 16)
        w(R.queueDescLow, 0x1_0000); w(R.queueDriverLow, 0x1_1000); w(R.queueDeviceLow, 0x1_2000)
        w(R.queueReady, 1)
        w(R.queueReady, 0)
        XCTAssertEqual(t.read(offset: R.queueReady, size: 4), 0)
        w(R.queueNum, 8); w(R.queueDescLow, 0x4_0000)
        w(R.queueReady, 1)
        w(R.status, 15)
        XCTAssertEqual(dev.activations.first?.queues[0]?.layout,
                       QueueLayout(size: 8, descTable: 0x4_0000, availRing: 0x1_1000, usedRing: 0x1_2000))
    }

    func testEightByteConfigWrite() {
        let mem = try! GuestMemory(layout: [(0, 0x1000)])
        let dev = MockDevice()
        dev.writableConfig = 16..<24
        let t = VirtioMMIOTransport(device: dev, memory: mem, line: CallbackLine())
        let v: [UInt8] = [9, 8, 7, 6, 5, 4, 3, 2]
        v.withUnsafeBytes { t.write(offset: VirtioMMIOReg.config + 16, from: $0) }
        XCTAssertEqual(Array(dev.config[16..<24]), v)
        v.withUnsafeBytes { t.write(offset: VirtioMMIOReg.config + 17, from: $0) }  // one byte past the end
        XCTAssertEqual(Array(dev.config[16..<24]), v)
    }
}

/// InterruptACK writes caught as KVM's ioeventfds would catch them (edge-triggered mode):
/// `ack` is the guest's write, `take` what the transport collects at InterruptStatus reads.
final class FakeAcks: DeferredInterruptAcks {
    let pending = Atomic<UInt32>(0)
    let drains = Atomic<Int>(0)
    func ack(_ v: UInt32) { pending.bitwiseOr(v, ordering: .acquiringAndReleasing) }
    func take() -> UInt32 { pending.exchange(0, ordering: .acquiringAndReleasing) }
    func drain() {
        pending.store(0, ordering: .releasing)
        drains.wrappingAdd(1, ordering: .relaxed)
    }
}

/// The edge-triggered transport: a pulse per new interrupt, InterruptACKs applied at the
/// next InterruptStatus read under the generation rule.
final class EdgeTransportTests: XCTestCase {
    typealias R = VirtioMMIOReg
    final class Pulses: InterruptLine {
        let n = Atomic<Int>(0)
        let lowered = Atomic<Int>(0)
        var count: Int { n.load(ordering: .acquiring) }
        func raise() { n.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        func lower() { lowered.wrappingAdd(1, ordering: .relaxed) }
    }
    var mem: GuestMemory!
    var dev: MockDevice!
    var line: Pulses!
    var acks: FakeAcks!
    var t: VirtioMMIOTransport!
    var logs: Locked<[String]>!

    override func setUp() {
        mem = try! GuestMemory(layout: [(0, 0x10_0000)])
        dev = MockDevice()
        line = Pulses()
        acks = FakeAcks()
        let logs = Locked<[String]>([])
        self.logs = logs
        t = VirtioMMIOTransport(device: dev, memory: mem, line: line, trigger: .edge(acks: acks),
                                log: RateLimitedLog(name: "edge", clock: { 0 }, sink: { _, l in logs.withLock { $0.append(l) } }))
    }

    func status() -> UInt32 { t.read(offset: R.interruptStatus, size: 4) }

    func testOnePulsePerInterruptStatusRead() {
        t.signalUsedBuffer()
        t.signalUsedBuffer()  // the first pulse's handler has not read yet: it will see this
        t.signalConfigChange()
        XCTAssertEqual(line.count, 1)
        XCTAssertEqual(t.interruptsRaised.load(ordering: .relaxed), 1)
        XCTAssertEqual(t.interruptsCoalesced.load(ordering: .relaxed), 2)
        XCTAssertEqual(line.lowered.load(ordering: .relaxed), 0)
        XCTAssertEqual(status(), 3)
        XCTAssertEqual(line.lowered.load(ordering: .relaxed), 1, "the read ends the edge")
        XCTAssertEqual(status(), 3)
        XCTAssertEqual(line.lowered.load(ordering: .relaxed), 1, "no edge out: nothing to end")
        t.signalUsedBuffer()  // after the read: a new pulse
        XCTAssertEqual(line.count, 2)
    }

    /// Linux's vm_interrupt: read InterruptStatus, ACK what it read, then look at the
    /// queues. A buffer used after the read raises the bit again; an ACK applied later
    /// must not clear that, or the driver would find InterruptStatus 0 at the next
    /// interrupt and never look at the queue (the lost interrupt).
    func testDeferredAckKeepsABitSetAfterTheRead() {
        t.signalUsedBuffer()
        XCTAssertEqual(status(), 1)
        acks.ack(1)            // the driver's ACK, caught without an exit
        t.signalUsedBuffer()   // a buffer used after the driver looked at the queue
        XCTAssertEqual(line.count, 2, "a set after the read pulses again")
        XCTAssertEqual(status(), 1, "the ACK was for the first interrupt: the bit stays")
        acks.ack(1)
        XCTAssertEqual(status(), 0, "nothing set since that read: the ACK clears it")
        // The same with the set between the read and the ACK.
        t.signalUsedBuffer()
        XCTAssertEqual(status(), 1)
        t.signalUsedBuffer()
        acks.ack(1)
        XCTAssertEqual(status(), 1)
    }

    func testDeferredAckClearsOnlyTheBitsItNames() {
        t.signalUsedBuffer()
        t.signalConfigChange()
        XCTAssertEqual(status(), 3)
        acks.ack(2)
        XCTAssertEqual(status(), 1)
        acks.ack(1)
        acks.ack(1)  // twice without a read: the same as once
        XCTAssertEqual(status(), 0)
        XCTAssertEqual(status(), 0)
    }

    /// An ACK that exits (another value or size than the ioeventfds catch, or none were
    /// registered): the deferred ones first, then this one at once.
    func testAckThatExitsAppliesAtOnceAfterTheDeferredOnes() {
        t.signalUsedBuffer()
        t.signalConfigChange()
        XCTAssertEqual(status(), 3)
        acks.ack(2)
        t.write(offset: R.interruptACK, size: 4, value: 0xFFFF_FFFD)  // unknown bits and bit 0
        XCTAssertEqual(t.interruptStatus, 0, "deferred bit 1 applied, bit 0 cleared at once")
        XCTAssertEqual(acks.pending.load(ordering: .acquiring), 0)
        t.signalUsedBuffer()
        XCTAssertEqual(status(), 1)
        t.write(offset: R.interruptACK, size: 4, value: 1)
        XCTAssertEqual(t.interruptStatus, 0)
        t.signalUsedBuffer()  // after an ACK that exited, still no new read: covered by...
        XCTAssertEqual(line.count, 3, "...a pulse, since none went out since the read")
        XCTAssertEqual(status(), 1)
    }

    func testResetDropsAcksAndBitsAndTheNextSetPulses() {
        w(R.status, VirtioStatus.acknowledge)
        t.signalUsedBuffer()
        XCTAssertEqual(line.count, 1)
        acks.ack(1)
        t.write(offset: R.status, size: 4, value: 0)
        XCTAssertEqual(acks.drains.load(ordering: .relaxed), 1)
        XCTAssertEqual(t.interruptStatus, 0)
        t.signalUsedBuffer()
        XCTAssertEqual(line.count, 2, "no read since the last pulse, but a reset: pulse")
        XCTAssertEqual(status(), 1)
    }

    func w(_ off: UInt64, _ v: UInt32) { t.write(offset: off, size: 4, value: v) }

    /// A hostile driver: ACK storms without reads, reads without ACKs, ACKs of every value
    /// and odd sizes, status reads around resets. No crash, no pulse without a set bit,
    /// bounded logging, and InterruptStatus only ever holds bits 0 and 1.
    func testHostileAcksAndReads() {
        for _ in 0..<10_000 { acks.ack(3) }
        XCTAssertEqual(status(), 0)
        for v in [UInt32(0), 1, 2, 3, 4, 0xFFFF_FFFF] { t.write(offset: R.interruptACK, size: 4, value: v) }
        for size in [1, 2] { t.write(offset: R.interruptACK, size: size, value: 1) }
        for off in [R.interruptACK + 1, R.interruptACK + 2] { t.write(offset: off, size: 4, value: 1) }
        XCTAssertEqual(line.count, 0)
        t.signalUsedBuffer()
        for _ in 0..<1000 { XCTAssertEqual(status(), 1) }  // reads without an ACK: the bit stays
        XCTAssertEqual(line.count, 1)
        for i in 0..<1000 {
            if i % 7 == 0 { w(R.status, 0) }
            if i % 3 == 0 { t.signalUsedBuffer() }
            acks.ack(UInt32(i & 3))
            XCTAssertEqual(status() & ~3, 0)
        }
        XCTAssertLessThan(logs.withLock { $0.count }, 20, "guest-caused lines are rate-limited")
    }

    /// A pulse before DRIVER_OK may find no handler in the guest: after DRIVER_OK the
    /// next set pulses, whatever went out before.
    func testDriverOKForgetsEarlierPulses() {
        t.signalConfigChange()  // before the driver is there
        XCTAssertEqual(line.count, 1)
        t.signalConfigChange()
        XCTAssertEqual(line.count, 1)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        dev.sink?.signalUsedBuffer()
        XCTAssertEqual(line.count, 2)
    }

    /// NEEDS_RESET in edge mode: a configuration-change pulse.
    func testNeedsResetPulsesAConfigChange() {
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)  // VERSION_1
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        XCTAssertTrue(t.isActivated)
        dev.sink?.markNeedsReset()
        XCTAssertEqual(line.count, 1)
        XCTAssertEqual(status(), 2)
        XCTAssertNotEqual(t.status & VirtioStatus.needsReset, 0)
    }
}
