import OS
import Glibc
import XCTest
import GuestMemory
import Synchronization
@testable import Virtio

/// The register page: every word a guest reads from it equals what the same read would
/// return through an exit, at every step of a driver's life; InterruptStatus and
/// NEEDS_RESET are visible in it as soon as a device thread sets them.
final class RegisterPageTests: XCTestCase {
    typealias R = VirtioMMIOReg
    var mem: GuestMemory!
    var dev: MockDevice!
    var page: RegisterPage!
    var t: VirtioMMIOTransport!

    override func setUp() {
        mem = try! GuestMemory(layout: [(0, 0x10_0000)])
        dev = MockDevice()
        page = try! RegisterPage()
        t = VirtioMMIOTransport(device: dev, memory: mem, line: CallbackLine(), registerPage: page)
    }

    func w(_ off: UInt64, _ v: UInt32) { t.write(offset: off, size: 4, value: v) }
    /// The guest's 4-byte read of the page (no exit).
    func pageWord(_ off: UInt64) -> UInt32 { UInt32(littleEndian: page.bytes.loadUnaligned(fromByteOffset: Int(off), as: UInt32.self)) }

    /// Every register word and every config byte in the page against the exit path's read.
    func assertPageMatchesExitReads(_ step: String, file: StaticString = #filePath, line: UInt = #line) {
        var off: UInt64 = 0
        while off < R.config {
            XCTAssertEqual(pageWord(off), t.read(offset: off, size: 4), "\(step): register 0x\(String(off, radix: 16))", file: file, line: line)
            off += 4
        }
        for i in 0..<dev.configSize {
            XCTAssertEqual(page.bytes.load(fromByteOffset: Int(R.config) + i, as: UInt8.self),
                           UInt8(t.read(offset: R.config + UInt64(i), size: 1)), "\(step): config byte \(i)", file: file, line: line)
        }
        for i in dev.configSize..<(RegisterPage.size - Int(R.config)) {
            XCTAssertEqual(page.bytes.load(fromByteOffset: Int(R.config) + i, as: UInt8.self), 0, "\(step): past config space", file: file, line: line)
        }
    }

    func testThePageFollowsADriversWholeLife() throws {
        assertPageMatchesExitReads("before the driver")
        XCTAssertEqual(pageWord(R.magicValue), VirtioMMIOTransport.magic)
        XCTAssertEqual(pageWord(R.deviceID), dev.deviceType)
        w(R.status, VirtioStatus.acknowledge)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        for sel: UInt32 in [0, 1, 2, 7] {
            w(R.deviceFeaturesSel, sel)
            assertPageMatchesExitReads("device features window \(sel)")
        }
        w(R.driverFeaturesSel, 0); w(R.driverFeatures, 1)
        w(R.driverFeaturesSel, 1); w(R.driverFeatures, 1)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        assertPageMatchesExitReads("FEATURES_OK")
        XCTAssertEqual(pageWord(R.status) & VirtioStatus.featuresOK, VirtioStatus.featuresOK)
        for (i, base) in [(UInt32(0), UInt64(0x1000)), (1, 0x4000)] {
            w(R.queueSel, i)
            assertPageMatchesExitReads("queue \(i) selected")
            w(R.queueNum, 64)
            w(R.queueDescLow, UInt32(base)); w(R.queueDescHigh, 0)
            w(R.queueDriverLow, UInt32(base + 0x400)); w(R.queueDriverHigh, 0)
            w(R.queueDeviceLow, UInt32(base + 0x1000)); w(R.queueDeviceHigh, 0)
            w(R.queueReady, 1)
            assertPageMatchesExitReads("queue \(i) ready")
            XCTAssertEqual(pageWord(R.queueReady), 1)
            XCTAssertEqual(pageWord(R.queueDescLow), UInt32(base))
        }
        w(R.queueSel, 99)
        assertPageMatchesExitReads("an absent queue selected")
        XCTAssertEqual(pageWord(R.queueNumMax), 0)
        // A config write the device takes, and one it ignores.
        t.write(offset: R.config + 20, size: 2, value: 0xBEEF)
        t.write(offset: R.config + 2, size: 1, value: 0xFF)
        assertPageMatchesExitReads("config writes")
        XCTAssertEqual(page.bytes.load(fromByteOffset: Int(R.config) + 20, as: UInt16.self), UInt16(0xBEEF).littleEndian)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        XCTAssertEqual(dev.activations.count, 1)
        assertPageMatchesExitReads("DRIVER_OK")
        t.signalConfigChange()
        XCTAssertEqual(pageWord(R.configGeneration), 1)
        XCTAssertEqual(pageWord(R.interruptStatus), VirtioInterrupt.configChange)
        assertPageMatchesExitReads("a config change")
        w(R.interruptACK, VirtioInterrupt.configChange)
        XCTAssertEqual(pageWord(R.interruptStatus), 0)
        w(R.status, 0)
        assertPageMatchesExitReads("reset")
        XCTAssertEqual(pageWord(R.status), 0)
        XCTAssertEqual(pageWord(R.queueReady), 0)
    }

    /// A device thread fails the device: DEVICE_NEEDS_RESET is in the page's Status at
    /// once, and a status write racing it does not wipe it out.
    func testNeedsResetFromADeviceThreadReachesThePage() throws {
        w(R.status, VirtioStatus.acknowledge)
        let t = self.t!
        final class Box: @unchecked Sendable { let t: VirtioMMIOTransport; init(_ t: VirtioMMIOTransport) { self.t = t } }
        var th = pthread_t()
        pthread_create(&th, nil, { p in
            Unmanaged<Box>.fromOpaque(p!).takeRetainedValue().t.markNeedsReset()
            return nil
        }, Unmanaged.passRetained(Box(t)).toOpaque())
        for _ in 0..<1000 { w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver) }
        pthread_join(th, nil)
        w(R.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        XCTAssertEqual(pageWord(R.status) & VirtioStatus.needsReset, VirtioStatus.needsReset)
        XCTAssertEqual(pageWord(R.status), t.read(offset: R.status, size: 4))
        w(R.status, 0)
        XCTAssertEqual(pageWord(R.status), 0, "a reset clears it")
    }

    /// A hostile driver writing every register with every kind of value and size: the
    /// page still equals the exit path, and no write lands in the page outside a register.
    func testHostileWritesKeepThePageTrue() {
        var rng = SystemRandomNumberGenerator()
        for i in 0..<5000 {
            let off = UInt64.random(in: 0..<UInt64(RegisterPage.size), using: &rng)
            let size = [1, 2, 4, 8, 3][Int.random(in: 0..<5, using: &rng)]
            let v = UInt64.random(in: 0...UInt64.max, using: &rng)
            var le = v.littleEndian
            withUnsafeBytes(of: &le) { t.write(offset: off, from: UnsafeRawBufferPointer(rebasing: $0[0..<min(size, 8)])) }
            if i % 500 == 0 { assertPageMatchesExitReads("hostile write \(i)") }
        }
        assertPageMatchesExitReads("after the hostile writes")
    }
}

/// The edge-triggered transport with the register page: a pulse ends when an ACK the
/// guest wrote is seen (caught by the ACK ioeventfds, or one that exited), not at a read.
final class RegisterPageEdgeTests: XCTestCase {
    typealias R = VirtioMMIOReg
    final class Line: InterruptLine {
        let calls = Locked<[Bool]>([])
        func raise() { calls.withLock { $0.append(true) } }
        func lower() { calls.withLock { $0.append(false) } }
        var pulses: Int { calls.withLock { $0.filter { $0 }.count } }
    }
    var t: VirtioMMIOTransport!
    var line: Line!
    var acks: FakeAcks!
    var page: RegisterPage!

    override func setUp() {
        let mem = try! GuestMemory(layout: [(0, 0x10_0000)])
        line = Line()
        acks = FakeAcks()
        page = try! RegisterPage()
        t = VirtioMMIOTransport(device: MockDevice(), memory: mem, line: line, trigger: .edge(acks: acks), registerPage: page)
    }

    func status() -> UInt32 { UInt32(littleEndian: page.bytes.load(fromByteOffset: Int(R.interruptStatus), as: UInt32.self)) }

    func testEachPulseIsAWholeEdgeAndFoldsUsedBuffersUntilAnAck() {
        t.signalUsedBuffer()
        XCTAssertEqual(line.calls.withLock { $0 }, [true, false], "one edge, lowered at once: no read exits to lower it")
        t.signalUsedBuffer()
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 1, "the pending pulse's handler will read the bit and look at the queues after its ACK")
        XCTAssertEqual(t.interruptsCoalesced.load(ordering: .relaxed), 2)
        XCTAssertEqual(status(), 1)
        XCTAssertEqual(t.read(offset: R.interruptStatus, size: 4), 1)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 1, "a read (were one to exit) ends nothing")
        acks.ack(1)
        XCTAssertEqual(status(), 1, "the ACK is seen at the next set, not before")
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2, "after an ACK: a new pulse")
        XCTAssertEqual(status(), 1)
        XCTAssertEqual(acks.pending.load(ordering: .acquiring), 0)
    }

    /// A set of a bit the pending pulse did not carry pulses again: the handler of that
    /// pulse may have read InterruptStatus before it, and Linux looks at the queues only
    /// when the used-buffer bit was read.
    func testABitThePulseDidNotCarryPulsesAgain() {
        t.signalConfigChange()
        XCTAssertEqual(line.pulses, 1)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2, "the pending pulse carried only the configuration bit")
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2, "this one carried the used-buffer bit")
        t.signalConfigChange()
        XCTAssertEqual(line.pulses, 3, "a configuration change always pulses")
        XCTAssertEqual(status(), 3)
        acks.ack(3)
        t.signalUsedBuffer()
        XCTAssertEqual(status(), 1, "both ACKed bits cleared, the new one set")
    }

    func testAnAckThatExitsEndsThePulse() {
        t.signalUsedBuffer()
        t.write(offset: R.interruptACK, size: 4, value: 1)
        XCTAssertEqual(status(), 0)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2)
        t.write(offset: R.interruptACK, size: 2, value: 1)  // registers take 4-byte writes only: ignored
        XCTAssertEqual(status(), 1)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2, "still pending")
        t.write(offset: R.interruptACK, size: 4, value: 0)  // ACKs nothing
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2, "an ACK of 0 ends no pulse")
        t.write(offset: R.interruptACK, size: 4, value: 1)
        XCTAssertEqual(status(), 0)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 3)
    }

    func testResetClearsBitsAndPendingPulse() {
        t.write(offset: R.status, size: 4, value: VirtioStatus.acknowledge)
        t.signalUsedBuffer()
        acks.ack(1)
        t.write(offset: R.status, size: 4, value: 0)
        XCTAssertEqual(status(), 0)
        XCTAssertEqual(acks.pending.load(ordering: .acquiring), 0)
        t.signalUsedBuffer()
        XCTAssertEqual(line.pulses, 2)
        XCTAssertEqual(status(), 1)
    }

    /// An ACK that the previous driver's handler wrote after the reset (reset dropped the
    /// ones before it) is gone by DRIVER_OK: the new driver's first pulse carries the
    /// used-buffer bit, and a configuration change on top of it must not take that stale
    /// ACK as the pulse's and clear the bit before the handler reads it.
    func testAnAckFromBeforeDriverOKClearsNothingAfterIt() {
        let s = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK
        t.write(offset: R.status, size: 4, value: VirtioStatus.acknowledge)
        t.write(offset: R.status, size: 4, value: 0)
        acks.ack(VirtioInterrupt.usedBuffer)
        t.write(offset: R.status, size: 4, value: VirtioStatus.acknowledge)
        t.write(offset: R.status, size: 4, value: VirtioStatus.acknowledge | VirtioStatus.driver)
        t.write(offset: R.driverFeaturesSel, size: 4, value: 1)
        t.write(offset: R.driverFeatures, size: 4, value: 1)  // VERSION_1
        t.write(offset: R.status, size: 4, value: s)
        t.write(offset: R.status, size: 4, value: s | VirtioStatus.driverOK)
        XCTAssertEqual(t.read(offset: R.status, size: 4), s | VirtioStatus.driverOK)
        XCTAssertEqual(acks.pending.load(ordering: .acquiring), 0, "DRIVER_OK drops the ACKs written before it")
        t.signalUsedBuffer()
        t.signalConfigChange()
        XCTAssertEqual(status(), VirtioInterrupt.usedBuffer | VirtioInterrupt.configChange,
                       "the used-buffer bit stays until an ACK written after its pulse")
        XCTAssertEqual(line.pulses, 2)
    }
}

/// The lost-interrupt race with the register page, edge-triggered: a device thread uses
/// buffer i, signals, and uses the next only once the driver has looked at the queue after
/// an interrupt; the driver handles each pulse as Linux's vm_interrupt does, reading
/// InterruptStatus from the page (no exit), ACKing it (caught without an exit), then
/// looking at the queue if the used-buffer bit was read. No used buffer may go unseen, and
/// in the second variant the device keeps using buffers while the driver handles pulses.
final class RegisterPageLostInterruptTests: XCTestCase {
    func testEveryUsedBufferReachesTheDriver() throws { try race(waitForDriver: true, rounds: 2000) }
    func testBuffersUsedWhileTheDriverHandlesPulses() throws { try race(waitForDriver: false, rounds: 200_000) }

    func race(waitForDriver: Bool, rounds: Int) throws {
        let mem = try GuestMemory(layout: [(0, 0x1000)])
        let acks = FakeAcks()
        let page = try RegisterPage()
        let r = try LostInterruptRace.run(rounds: rounds, waitForDriver: waitForDriver,
                                          make: { VirtioMMIOTransport(device: MockDevice(), memory: mem, line: $0, trigger: .edge(acks: acks), registerPage: page) },
                                          readStatus: { _ in SharedWord(page.bytes + Int(VirtioMMIOReg.interruptStatus)).load() },
                                          ack: { acks.ack($0) })
        XCTAssertEqual(r.seen, rounds, "lost interrupt")
        XCTAssertLessThanOrEqual(r.pulses, rounds, "at most one pulse per used buffer")
        if !waitForDriver { XCTAssertLessThan(r.pulses, rounds, "no folding at all") }
    }
}
