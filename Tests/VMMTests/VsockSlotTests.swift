import XCTest
import Glibc
import OS
import GuestMemory
@testable import Devices
import Virtio
import Vhost
import Boot
@testable import VMM

/// A vhost-vsock instance that records the calls and keeps the eventfds bound per ring.
final class RecordingVsockVhost: VhostVsockBackend {
    struct State {
        var calls: [String] = []
        var call: [Int32] = [-1, -1]
        var kick: [Int32] = [-1, -1]
    }
    let state = Locked(State())
    var calls: [String] { state.withLock { $0.calls } }
    func note(_ s: String) { state.withLock { $0.calls.append(s) } }
    func features() throws -> UInt64 { VirtioVsockLimits.features }
    func setFeatures(_ features: UInt64) throws { note("SET_FEATURES") }
    func setMemTable(_ regions: [VhostMemoryRegion]) throws { note("SET_MEM_TABLE") }
    func setVringNum(_ ring: Int, _ size: UInt32) throws { note("SET_VRING_NUM \(ring) \(size)") }
    func setVringBase(_ ring: Int, _ base: UInt32) throws { note("SET_VRING_BASE \(ring) \(base)") }
    func vringBase(_ ring: Int) throws -> UInt32 { note("GET_VRING_BASE \(ring)"); return 0 }
    func setVringAddr(_ ring: Int, desc: UInt64, avail: UInt64, used: UInt64) throws { note("SET_VRING_ADDR \(ring)") }
    func setVringKick(_ ring: Int, _ fd: Int32) throws { state.withLock { $0.kick[ring] = fd } }
    func setVringCall(_ ring: Int, _ fd: Int32) throws { state.withLock { $0.call[ring] = fd } }
    func setVringErr(_ ring: Int, _ fd: Int32) throws {}
    func setRunning(_ running: Bool) throws { note("SET_RUNNING \(running ? 1 : 0)") }
}

/// virtio-vsock as the machine runs it: the spec's device in a slot on a FakeVM, driven
/// through its registers. rx and tx notifies go to the "kernel's" kick eventfds (the
/// registered ioeventfds), a kernel call is relayed by the "vsock0-q0+1+2" thread as an
/// interrupt, and a reset stops the kernel before the next DRIVER_OK starts it again.
final class VsockSlotTests: XCTestCase {
    func start(_ s: VirtioMMIOSlot) {
        for v: UInt64 in [0, 1, 3] { s.write(offset: VirtioMMIOReg.status, size: 4, value: v) }
        s.write(offset: VirtioMMIOReg.driverFeaturesSel, size: 4, value: 1)
        s.write(offset: VirtioMMIOReg.driverFeatures, size: 4, value: VirtioFeature.version1 >> 32)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xB)
        for q in 0..<3 {
            let base = 0x10000 * UInt64(q + 1)
            s.write(offset: VirtioMMIOReg.queueSel, size: 4, value: UInt64(q))
            XCTAssertEqual(s.read(offset: VirtioMMIOReg.queueNumMax, size: 4), 128)
            s.write(offset: VirtioMMIOReg.queueNum, size: 4, value: 64)
            s.write(offset: VirtioMMIOReg.queueDescLow, size: 4, value: base)
            s.write(offset: VirtioMMIOReg.queueDriverLow, size: 4, value: base + 0x1000)
            s.write(offset: VirtioMMIOReg.queueDeviceLow, size: 4, value: base + 0x2000)
            s.write(offset: VirtioMMIOReg.queueReady, size: 4, value: 1)
        }
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xF)
    }

    /// Two vsock devices of one VM on one CID: a usage line naming both, before the
    /// second is opened; another CID opens.
    func testTwoDevicesOnOneCIDAreRefused() throws {
        let first = try openVsock(VsockOptions(cid: 7)) { (_: UInt64) throws(VhostOpenError) -> any VhostVsockBackend in RecordingVsockVhost() }
        let spec = try XCTUnwrap(try parseDevice("vsock,cid=7", kinds: deviceKinds) as? VsockDeviceSpec)
        XCTAssertThrowsError(try spec.open(earlier: [first])) {
            XCTAssertEqual(($0 as? SwiftletError)?.status, .usage)
            XCTAssertEqual(($0 as? SwiftletError)?.message,
                           "--device vsock,cid=7: guest CID 7 is also --vsock cid=7's: give each vsock device its own CID")
        }
        // a different CID gets as far as the kernel (missing here, or opened)
        let other = VsockDeviceSpec(options: VsockOptions(cid: 8))
        do { _ = try other.open(earlier: [first]) } catch let e as SwiftletError {
            XCTAssertEqual(e.status, .hostUnavailable, e.message)
        }
    }

    func testKernelCallsRaiseTheLineAndResetStopsTheKernel() throws {
        let mem = try GuestMemory(layout: [(base: 0, size: 0x40_0000)])
        let vm = FakeVM()
        var mmio = RangeMap<MMIODevice>()
        let fake = RecordingVsockVhost()
        let backend = try openVsock(VsockOptions(cid: 1234)) { (_: UInt64) throws(VhostOpenError) -> any VhostVsockBackend in fake }
        let slots = try attachDevices([OpenedDevice(name: "vsock0", ordinal: 0, backend: backend)], vm: vm, memory: mem, mmio: &mmio)
        let s = slots[0].slot
        defer { s.stop() }
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.deviceID, size: 4), 19)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.config, size: 4), 1234)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.config + 4, size: 4), 0)
        start(s)
        XCTAssertEqual(fake.calls.last, "SET_RUNNING 1")
        XCTAssertEqual(s.queueThreadCount, 1, "one thread for the three queues")
        // rx's notify reaches the kernel's kick eventfd, not swiftlet
        try vm.kick(base: s.base, queue: 0)
        var p = pollfd(fd: fake.state.withLock { $0.kick[0] }, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 5000), 1)
        // the kernel's call on tx: the thread sets InterruptStatus and raises the line
        var one: UInt64 = 1
        XCTAssertEqual(write(fake.state.withLock { $0.call[1] }, &one, 8), 8)
        let deadline = monotonicNanos() + 5_000_000_000
        while vm.levels(s.gsi).isEmpty && monotonicNanos() < deadline { usleep(1000) }
        XCTAssertEqual(vm.levels(s.gsi), [true])
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1)
        s.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(vm.levels(s.gsi), [true, false])
        XCTAssertTrue(slots[0].metrics().hasPrefix("\"guest_cid\": 1234, \"queues\": [{\"queue\": 0,"), slots[0].metrics())
        XCTAssertTrue(slots[0].metrics().contains("{\"queue\": 1, \"served\": 0, \"bytes\": 0, \"drops\": 0, \"notifications\": 0, \"interrupts\": 1}"),
                      slots[0].metrics())
        // driver reset: the kernel stops and the eventfds are unbound, thread joined
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertEqual(s.queueThreadCount, 0)
        XCTAssertEqual(Array(fake.calls.suffix(3)), ["SET_RUNNING 0", "GET_VRING_BASE 0", "GET_VRING_BASE 1"])
        XCTAssertEqual(fake.state.withLock { $0.call + $0.kick }, [-1, -1, -1, -1])
        // and the next start rebuilds from base 0
        start(s)
        XCTAssertEqual(fake.calls.last, "SET_RUNNING 1")
        XCTAssertEqual(fake.calls.filter { $0.hasPrefix("SET_VRING_BASE") }.suffix(2), ["SET_VRING_BASE 0 0", "SET_VRING_BASE 1 0"])
        XCTAssertEqual(s.queueThreadCount, 1)
    }
}
