import XCTest
import Glibc
import OS
import GuestMemory
import Devices
import Virtio
import Boot
@testable import VMM

/// virtio-rng as the machine runs it: attachRng's slot on a FakeVM, driven through its
/// registers; the kick goes through the ioeventfd to the "rng0-q0" thread, which fills the
/// buffer from getrandom, publishes, and raises the line.
final class RngSlotTests: XCTestCase {
    func testGuestReadsRandomBytesThroughTheSlot() throws {
        let mem = try GuestMemory(layout: [(base: 0, size: 0x40_0000)])
        let vm = FakeVM()
        var mmio = RangeMap<MMIODevice>()
        var config = MachineConfig(kernelPath: "/k")
        XCTAssertTrue(deviceSpecs(config).isEmpty, "--rng off: no device")
        config.rng = true
        let specs = deviceSpecs(config)
        XCTAssertEqual(specs.map(\.kind), ["rng"])
        let slots = try attachDevices(try openDevices(specs), vm: vm, memory: mem, mmio: &mmio)
        XCTAssertEqual(slots.count, 1)
        let s = slots[0].slot
        defer { s.stop() }
        XCTAssertEqual(s.name, "rng0")
        XCTAssertEqual(s.base, X86Layout.virtioMMIOAddress(index: 0))
        XCTAssertTrue(slots[0].metrics().hasPrefix("\"queues\": [{\"queue\": 0, \"served\": 0"), slots[0].metrics())
        XCTAssertNotNil(mmio.lookup(s.base, length: 4))
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.deviceID, size: 4), 4)
        for v: UInt64 in [0, 1, 3] { s.write(offset: VirtioMMIOReg.status, size: 4, value: v) }
        s.write(offset: VirtioMMIOReg.driverFeaturesSel, size: 4, value: 1)
        s.write(offset: VirtioMMIOReg.driverFeatures, size: 4, value: VirtioFeature.version1 >> 32)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xB)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.configGeneration, size: 4), 0)
        s.write(offset: VirtioMMIOReg.queueSel, size: 4, value: 0)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.queueNumMax, size: 4), UInt64(VirtioRngLimits.queueSize))
        let (desc, avail, used): (UInt64, UInt64, UInt64) = (0x10000, 0x11000, 0x12000)
        s.write(offset: VirtioMMIOReg.queueNum, size: 4, value: 8)
        s.write(offset: VirtioMMIOReg.queueDescLow, size: 4, value: desc)
        s.write(offset: VirtioMMIOReg.queueDriverLow, size: 4, value: avail)
        s.write(offset: VirtioMMIOReg.queueDeviceLow, size: 4, value: used)
        s.write(offset: VirtioMMIOReg.queueReady, size: 4, value: 1)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xF)
        XCTAssertEqual(s.queueThreadCount, 1)
        let buf: UInt64 = 0x20000
        try mem.write([UInt8](repeating: 0, count: 2048), at: buf)
        try mem.store(buf, at: desc)
        try mem.store(UInt32(2048), at: desc + 8)
        try mem.store(VirtqDesc.write, at: desc + 12)
        try mem.store(UInt16(0), at: avail + 4)
        try mem.store(UInt16(1), at: avail + 2)
        try vm.kick(base: s.base, queue: 0)
        let deadline = monotonicNanos() + 5_000_000_000
        while (try mem.load(UInt16.self, at: used + 2)) != 1 && monotonicNanos() < deadline { usleep(1000) }
        XCTAssertEqual(try mem.load(UInt16.self, at: used + 2), 1)
        XCTAssertEqual(try mem.load(UInt32.self, at: used + 8), 2048)
        var got = [UInt8](repeating: 0, count: 2048)
        try got.withUnsafeMutableBytes { try mem.read(into: $0, at: buf) }
        XCTAssertGreaterThan(Set(got).count, 200)
        while vm.levels(s.gsi).isEmpty && monotonicNanos() < deadline { usleep(1000) }
        XCTAssertEqual(vm.levels(s.gsi), [true])
        s.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(vm.levels(s.gsi), [true, false])
        let stats = (s.device as! VirtioRng).stats
        XCTAssertEqual(stats.served, 1)
        XCTAssertTrue(slots[0].metrics().contains("\"served\": 1, \"bytes\": 2048"), slots[0].metrics())
        XCTAssertEqual(stats.bytes, 2048)
    }
}
