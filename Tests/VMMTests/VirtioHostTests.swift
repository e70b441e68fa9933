// VirtioMMIOSlot on this machine's /dev/kvm: a VM with the in-kernel irqchip and guest
// memory, a virtio-blk device driven through its registers as a driver would, requests
// posted in guest memory, kicks written to the ioeventfd's eventfd as KVM would on the
// guest's QueueNotify write. (No vCPU runs: the PVM host cannot run an unmodified guest.)
import XCTest
import Glibc
import Synchronization
import OS
import GuestMemory
import KVM
import Virtio
import Boot
@testable import Devices
@testable import VMM

// @unchecked Sendable: the driver threads of testResetDuringTrafficFromConcurrentDrivers
// call postWrite and usedIdx, which read only constants of the test (queue bases and size)
// and write guest memory.
final class VirtioHostTests: XCTestCase, @unchecked Sendable {
    static let ram: UInt64 = 4 << 20

    struct Env {
        let vm: VirtualMachine
        let mem: GuestMemory
        let image: String
    }

    func makeEnv() throws -> Env {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { throw XCTSkip("no /dev/kvm") }
        let kvm = try Hypervisor()
        let vm = try kvm.createVM()
        try vm.createIRQChip()
        let mem = try GuestMemory(layout: [(base: 0, size: VirtioHostTests.ram)])
        try vm.registerMemory(mem)
        var t = Array("/tmp/swiftlet-host-XXXXXX".utf8CString)
        let fd = mkstemp(&t)
        ftruncate(fd, 1 << 20)
        close(fd)
        let path = String(nulTerminated: t)
        addTeardownBlock { unlink(path) }
        return Env(vm: vm, mem: mem, image: path)
    }

    /// Queue threads of this process whose name starts with `prefix` (/proc/self/task/*/comm).
    func threads(_ prefix: String) -> [String] {
        guard let dir = opendir("/proc/self/task") else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name.hasPrefix(".") { continue }
            guard let f = fopen("/proc/self/task/\(name)/comm", "r") else { continue }
            var buf = [CChar](repeating: 0, count: 64)
            if fgets(&buf, 64, f) != nil {
                let comm = String(nulTerminated: buf).trimmingCharacters(in: "\n")
                if comm.hasPrefix(prefix) { names.append(comm) }
            }
            fclose(f)
        }
        return names.sorted()
    }

    /// threads(prefix) once it equals `expect` (names are set by the new threads themselves), or after 2 s.
    func waitThreads(_ prefix: String, _ expect: [String]) -> [String] {
        let deadline = monotonicNanos() + 2_000_000_000
        var t = threads(prefix)
        while t != expect && monotonicNanos() < deadline { usleep(1000); t = threads(prefix) }
        return t
    }

    // Queue i: desc 0x10000 + i*0x4000, avail +0x1000, used +0x2000; size 16.
    func qbase(_ i: Int) -> UInt64 { 0x10000 + UInt64(i) * 0x4000 }
    let qsize: UInt16 = 16

    /// The driver's side of initialization (virtio 1.2 §3.1.1) through the MMIO interface.
    func driverInit(_ s: VirtioMMIOSlot, queues: Int, features wanted: UInt64) {
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.magicValue, size: 4), 0x7472_6976)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.version, size: 4), 2)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.deviceID, size: 4), 2)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 1)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 3)
        s.write(offset: VirtioMMIOReg.deviceFeaturesSel, size: 4, value: 0)
        var offered = s.read(offset: VirtioMMIOReg.deviceFeatures, size: 4)
        s.write(offset: VirtioMMIOReg.deviceFeaturesSel, size: 4, value: 1)
        offered |= s.read(offset: VirtioMMIOReg.deviceFeatures, size: 4) << 32
        let f = offered & wanted
        XCTAssertEqual(f, wanted, "offered 0x\(String(offered, radix: 16))")
        s.write(offset: VirtioMMIOReg.driverFeaturesSel, size: 4, value: 0)
        s.write(offset: VirtioMMIOReg.driverFeatures, size: 4, value: f & 0xFFFF_FFFF)
        s.write(offset: VirtioMMIOReg.driverFeaturesSel, size: 4, value: 1)
        s.write(offset: VirtioMMIOReg.driverFeatures, size: 4, value: f >> 32)
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xB)
        XCTAssertEqual(s.read(offset: VirtioMMIOReg.status, size: 4) & UInt64(VirtioStatus.featuresOK), UInt64(VirtioStatus.featuresOK))
        for i in 0..<queues {
            s.write(offset: VirtioMMIOReg.queueSel, size: 4, value: UInt64(i))
            XCTAssertEqual(s.read(offset: VirtioMMIOReg.queueNumMax, size: 4), 256)
            s.write(offset: VirtioMMIOReg.queueNum, size: 4, value: UInt64(qsize))
            s.write(offset: VirtioMMIOReg.queueDescLow, size: 4, value: qbase(i))
            s.write(offset: VirtioMMIOReg.queueDescHigh, size: 4, value: 0)
            s.write(offset: VirtioMMIOReg.queueDriverLow, size: 4, value: qbase(i) + 0x1000)
            s.write(offset: VirtioMMIOReg.queueDriverHigh, size: 4, value: 0)
            s.write(offset: VirtioMMIOReg.queueDeviceLow, size: 4, value: qbase(i) + 0x2000)
            s.write(offset: VirtioMMIOReg.queueDeviceHigh, size: 4, value: 0)
            s.write(offset: VirtioMMIOReg.queueReady, size: 4, value: 1)
        }
        s.write(offset: VirtioMMIOReg.status, size: 4, value: 0xF)
    }

    /// Posts an OUT request of `data` at `sector` on queue `q`, slot `n` of its ring.
    func postWrite(_ mem: GuestMemory, queue q: Int, n: Int, sector: UInt64, data: [UInt8]) throws -> UInt64 {
        let b = qbase(q)
        let buf = 0x100000 + UInt64(q) * 0x40000 + UInt64(n) * 0x2000
        try mem.store(VirtioBlockRequest.output, at: buf)
        try mem.store(UInt32(0), at: buf + 4)
        try mem.store(sector, at: buf + 8)
        try mem.write(data, at: buf + 0x1000)
        try mem.store(UInt8(0xFF), at: buf + 0x80)
        let d0 = UInt16(3 * (n % 5))
        func desc(_ i: UInt16, _ a: UInt64, _ l: UInt32, _ f: UInt16, _ next: UInt16) throws {
            let p = b + 16 * UInt64(i)
            try mem.store(a, at: p); try mem.store(l, at: p + 8); try mem.store(f, at: p + 12); try mem.store(next, at: p + 14)
        }
        try desc(d0, buf, 16, VirtqDesc.next, d0 + 1)
        try desc(d0 + 1, buf + 0x1000, UInt32(data.count), VirtqDesc.next, d0 + 2)
        try desc(d0 + 2, buf + 0x80, 1, VirtqDesc.write, 0)
        let avail = b + 0x1000
        try mem.store(d0, at: avail + 4 + 2 * UInt64(n % Int(qsize)))
        try mem.store(UInt16(n + 1), at: avail + 2)
        return buf + 0x80
    }

    func usedIdx(_ mem: GuestMemory, _ q: Int) -> UInt16 { (try? mem.load(UInt16.self, at: qbase(q) + 0x2002)) ?? 0 }

    func waitUsed(_ mem: GuestMemory, _ q: Int, _ target: UInt16, file: StaticString = #filePath, line: UInt = #line) {
        let deadline = monotonicNanos() + 5_000_000_000
        while usedIdx(mem, q) != target && monotonicNanos() < deadline { usleep(1000) }
        XCTAssertEqual(usedIdx(mem, q), target, "used ring of queue \(q)", file: file, line: line)
    }

    func fileBytes(_ path: String, _ off: Int, _ n: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var b = [UInt8](repeating: 0, count: n)
        _ = pread(fd, &b, n, off_t(off))
        return b
    }

    func testActivateKickInterruptResetReactivate() throws {
        let env = try makeEnv()
        let disk = try openDisk(DiskOptions(path: env.image, numQueues: 2))
        let slot = try VirtioMMIOSlot.block(disk, index: 0, name: "tblk0", vm: env.vm, memory: env.mem)
        defer { slot.stop() }
        XCTAssertEqual(slot.acpiDescription, VirtioMMIODeviceDescription(address: 0xD000_1000, size: 0x1000, gsi: 5))
        XCTAssertEqual(VirtioMMIOSlot.acpiDescription(index: 0), slot.acpiDescription)
        XCTAssertEqual(VirtioMMIOSlot.acpiDescription(index: 3), VirtioMMIODeviceDescription(address: 0xD000_4000, size: 0x1000, gsi: 9))
        XCTAssertNil(VirtioMMIOSlot.acpiDescription(index: X86Layout.maxVirtioDevices))
        XCTAssertEqual(slot.queueThreadCount, 0, "nothing runs before DRIVER_OK")
        XCTAssertEqual(waitThreads("tblk0-q", []), [])

        let features = VirtioFeature.version1 | VirtioBlockFeature.flush | VirtioBlockFeature.mq | VirtioBlockFeature.blkSize
        driverInit(slot, queues: 2, features: features)
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.status, size: 4), 0xF)
        XCTAssertEqual(slot.queueThreadCount, 2)
        XCTAssertEqual(waitThreads("tblk0-q", ["tblk0-q0", "tblk0-q1"]), ["tblk0-q0", "tblk0-q1"])

        // Queue 0: kick through the ioeventfd's eventfd, as KVM does on the guest's write.
        let s0 = try postWrite(env.mem, queue: 0, n: 0, sector: 4, data: [UInt8](repeating: 0xA5, count: 1024))
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 0)
        let w0 = slot.adapter.workers.first { $0.indices == [0] }!
        XCTAssertTrue(w0.ioeventfd[0], "ioeventfd registered on QueueNotify")
        try w0.kicks[0].write(1)
        waitUsed(env.mem, 0, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: s0), VirtioBlockStatus.ok)
        XCTAssertEqual(fileBytes(env.image, 4 * 512, 1024), [UInt8](repeating: 0xA5, count: 1024))
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1, "used-buffer interrupt")
        slot.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 0)

        // Queue 1: a QueueNotify write that exits to swiftlet reaches the queue thread too.
        let s1 = try postWrite(env.mem, queue: 1, n: 0, sector: 100, data: [UInt8](repeating: 0x3C, count: 512))
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 1)
        waitUsed(env.mem, 1, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: s1), VirtioBlockStatus.ok)
        XCTAssertEqual(fileBytes(env.image, 100 * 512, 512), [UInt8](repeating: 0x3C, count: 512))
        // Hostile notifies: absent queue, odd sizes, offsets past the registers.
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 7)
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 2, value: 0)
        slot.write(offset: 0xFFF, size: 8, value: ~0)
        slot.write(offset: 0x5000, size: 4, value: 1)
        XCTAssertEqual(slot.read(offset: 0x5000, size: 4), 0)
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.magicValue, size: 3), 0)

        // Reset: threads joined, ioeventfds gone, queues forgotten.
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.status, size: 4), 0)
        XCTAssertEqual(slot.queueThreadCount, 0)
        XCTAssertEqual(waitThreads("tblk0-q", []), [], "queue threads joined")
        // KVM refuses a duplicate ioeventfd: registering the same one again proves it was deassigned.
        let probe = try EventFD()
        let notifyAddr = slot.base + VirtioMMIOReg.queueNotify
        XCTAssertNoThrow(try env.vm.registerIoeventfd(probe, address: notifyAddr, length: 4, datamatch: 0))
        try env.vm.deassignIoeventfd(probe, address: notifyAddr, length: 4, datamatch: 0)
        XCTAssertEqual(slot.transport.queueLayout(0)?.ready, false)

        // Re-activation: fresh rings (indices start at 0 again).
        for q in 0..<2 { try env.mem.zero(qbase(q), length: 0x3000) }
        driverInit(slot, queues: 2, features: features)
        XCTAssertEqual(waitThreads("tblk0-q", ["tblk0-q0", "tblk0-q1"]), ["tblk0-q0", "tblk0-q1"])
        let s2 = try postWrite(env.mem, queue: 0, n: 0, sector: 8, data: [UInt8](repeating: 0x77, count: 512))
        try slot.adapter.workers.first { $0.indices == [0] }!.kicks[0].write(1)
        waitUsed(env.mem, 0, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: s2), VirtioBlockStatus.ok)
        XCTAssertEqual(fileBytes(env.image, 8 * 512, 512), [UInt8](repeating: 0x77, count: 512))

        // Machine stop: threads joined, no re-activation.
        slot.stop()
        XCTAssertEqual(waitThreads("tblk0-q", []), [])
        slot.stop()
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        driverInit(slot, queues: 1, features: features)
        XCTAssertEqual(slot.queueThreadCount, 0)
        XCTAssertNotEqual(slot.read(offset: VirtioMMIOReg.status, size: 4) & UInt64(VirtioStatus.needsReset), 0)
    }

    /// The interrupt line seen from KVM's IOAPIC: with KVM_IRQ_LINE (the default) it is
    /// high exactly while InterruptStatus is nonzero; with the resampled irqfd it is
    /// asserted by the used-buffer interrupt (and only deasserted at the guest's EOI).
    func testInterruptLineFollowsInterruptStatus() throws {
        for mode in [VirtioInterruptMode.line, .irqfd] {
            let env = try makeEnv()
            let disk = try openDisk(DiskOptions(path: env.image, numQueues: 1))
            let slot = try VirtioMMIOSlot.block(disk, index: 2, name: "tblkl", vm: env.vm, memory: env.mem, interrupts: mode)
            defer { slot.stop() }
            let bit = UInt32(1) << slot.gsi
            XCTAssertEqual(try env.vm.ioapicIRR() & bit, 0, "\(mode): low at start")
            XCTAssertEqual(waitThreads("tblkl", mode == .irqfd ? ["tblkl-irq"] : []), mode == .irqfd ? ["tblkl-irq"] : [], "\(mode)")
            driverInit(slot, queues: 1, features: VirtioFeature.version1)
            for n in 0..<3 {
                _ = try postWrite(env.mem, queue: 0, n: n, sector: UInt64(n), data: [UInt8](repeating: 0x11, count: 512))
                try slot.adapter.workers[0].kicks[0].write(1)
                waitUsed(env.mem, 0, UInt16(n + 1))
                // The used ring is published before the interrupt is raised, and KVM may
                // inject an irqfd's interrupt from a work queue: give both a moment.
                let deadline = monotonicNanos() + 2_000_000_000
                while (try env.vm.ioapicIRR()) & bit == 0 && monotonicNanos() < deadline { usleep(1000) }
                XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1)
                XCTAssertEqual(try env.vm.ioapicIRR() & bit, bit, "\(mode): raised for request \(n)")
                slot.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
                if mode == .line {
                    XCTAssertEqual(try env.vm.ioapicIRR() & bit, 0, "line: lowered by InterruptACK")
                }
            }
            slot.stop()
            XCTAssertEqual(waitThreads("tblkl-irq", []), [], "\(mode): no -irq thread left")
        }
    }

    /// Edge-triggered on this machine's KVM: it takes the plain irqfd and the four
    /// InterruptACK ioeventfds (4 bytes, datamatch 0-3, beside the QueueNotify ones), and
    /// gives them back at stop, with nothing logged.
    func testEdgeRegistrationsOnKVM() throws {
        let env = try makeEnv()
        final class Lines: Sendable { let all = Locked<[String]>([]) }
        let lines = Lines()
        let disk = try openDisk(DiskOptions(path: env.image, numQueues: 1))
        let slot = try VirtioMMIOSlot.block(disk, index: 4, name: "tblke", vm: env.vm, memory: env.mem, interrupts: .edge,
                                            log: { _, line in lines.all.withLock { $0.append(line) } })
        defer { slot.stop() }
        let acks = try XCTUnwrap(slot.acks)
        XCTAssertEqual(acks.fds.map { $0 != nil }, [true, true, true, true], "KVM took every ACK ioeventfd")
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        XCTAssertEqual(slot.adapter.workers[0].ioeventfd, [true])
        _ = try postWrite(env.mem, queue: 0, n: 0, sector: 3, data: [UInt8](repeating: 3, count: 512))
        try slot.adapter.workers[0].kicks[0].write(1)
        waitUsed(env.mem, 0, 1)
        waitFor { slot.transport.interruptStatus != 0 }
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1)
        try acks.fds[1]?.write(1)  // as KVM does on the guest's 4-byte write of 1
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 0)
        slot.stop()
        XCTAssertEqual(lines.all.withLock { $0 }, [], "nothing refused, nothing failed to deregister")
    }

    /// The register page on this machine's KVM: a read-only memory slot at the window
    /// (KVM_MEM_READONLY) that KVM takes, InterruptStatus set in it by the queue thread
    /// and cleared when the ACK (caught by its ioeventfd) is seen; machine stop removes it.
    func testRegisterPageOnKVM() throws {
        let env = try makeEnv()
        final class Lines: Sendable { let all = Locked<[String]>([]) }
        let lines = Lines()
        let disk = try openDisk(DiskOptions(path: env.image, numQueues: 1))
        let slot = try VirtioMMIOSlot.block(disk, index: 5, name: "tblkp", vm: env.vm, memory: env.mem, interrupts: .edge,
                                            registers: .page, log: { _, line in lines.all.withLock { $0.append(line) } })
        defer { slot.stop() }
        XCTAssertTrue(slot.readsWithoutExit, "KVM took the read-only slot: \(lines.all.withLock { $0 })")
        let page = try XCTUnwrap(slot.transport.registerPage)
        func word(_ off: UInt64) -> UInt32 { UInt32(littleEndian: page.bytes.loadUnaligned(fromByteOffset: Int(off), as: UInt32.self)) }
        XCTAssertEqual(word(VirtioMMIOReg.magicValue), 0x7472_6976)
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        XCTAssertEqual(UInt64(word(VirtioMMIOReg.status)), slot.read(offset: VirtioMMIOReg.status, size: 4))
        _ = try postWrite(env.mem, queue: 0, n: 0, sector: 3, data: [UInt8](repeating: 3, count: 512))
        try slot.adapter.workers[0].kicks[0].write(1)
        waitUsed(env.mem, 0, 1)
        waitFor { word(VirtioMMIOReg.interruptStatus) != 0 }
        XCTAssertEqual(word(VirtioMMIOReg.interruptStatus), 1)
        try XCTUnwrap(slot.acks?.fds[1]).write(1)  // as KVM does on the guest's 4-byte write of 1
        _ = try postWrite(env.mem, queue: 0, n: 1, sector: 4, data: [UInt8](repeating: 4, count: 512))
        try slot.adapter.workers[0].kicks[0].write(1)
        waitUsed(env.mem, 0, 2)
        waitFor { slot.transport.interruptsRaised.load(ordering: .relaxed) == 2 }
        XCTAssertEqual(word(VirtioMMIOReg.interruptStatus), 1, "the ACK ended the first pulse; the second set the bit again")
        slot.stop()
        XCTAssertEqual(lines.all.withLock { $0 }, [], "nothing refused")
    }

    /// The register page on a fake VM: mapped at the window's base for the slot's life;
    /// a VM that refuses it leaves every read exiting, with one warning.
    func testRegisterPageOnAFakeVMAndItsRefusal() throws {
        let env = try makeFakeEnv()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 3, name: "tfakep", vm: env.vm, memory: env.mem, registers: .page)
        XCTAssertEqual(env.vm.mappedPages, 1)
        XCTAssertEqual(env.vm.readPage(slot.base + VirtioMMIOReg.magicValue), 0x7472_6976)
        XCTAssertEqual(env.vm.readPage(slot.base + VirtioMMIOReg.deviceID), 2)
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        XCTAssertEqual(env.vm.readPage(slot.base + VirtioMMIOReg.status).map(UInt64.init), slot.read(offset: VirtioMMIOReg.status, size: 4))
        slot.stop()
        XCTAssertEqual(env.vm.mappedPages, 1, "the page stays in the VM (which keeps it) until the VM goes")

        let env2 = try makeFakeEnv()
        env2.vm.state.withLock { $0.refusePages = true }
        final class Lines: Sendable { let all = Locked<[String]>([]) }
        let lines = Lines()
        let disk2 = try openDisk(DiskOptions(path: env2.image))
        let refused = try VirtioMMIOSlot.block(disk2, index: 4, name: "tfakeq", vm: env2.vm, memory: env2.mem, registers: .page,
                                               log: { _, line in lines.all.withLock { $0.append(line) } })
        defer { refused.stop() }
        XCTAssertFalse(refused.readsWithoutExit)
        XCTAssertNil(refused.transport.registerPage)
        XCTAssertEqual(lines.all.withLock { $0.filter { $0.contains("no read-only register page") }.count }, 1)
        driverInit(refused, queues: 1, features: VirtioFeature.version1)
    }

    func testManyKicksAndBatchesOnePoolQueue() throws {
        let env = try makeEnv()
        let disk = try openDisk(DiskOptions(path: env.image, direct: true))
        XCTAssertEqual(disk.makeDevice(name: "x").engine, .threadPool(threads: 4, maxInFlight: 8))
        let slot = try VirtioMMIOSlot.block(disk, index: 3, name: "tblk3", vm: env.vm, memory: env.mem)
        defer { slot.stop() }
        XCTAssertEqual(slot.gsi, 9, "GSI 8 is skipped")
        driverInit(slot, queues: 1, features: VirtioFeature.version1 | VirtioFeature.eventIdx)
        let expect = ["tblk3-q0", "tblk3-q0-io0", "tblk3-q0-io1", "tblk3-q0-io2", "tblk3-q0-io3"]
        XCTAssertEqual(waitThreads("tblk3-q0", expect), expect, "the queue thread and its I/O pool")
        let w = slot.adapter.workers[0]
        // 40 requests in rounds of 1..5, kicked each round; 4 KiB-aligned data for O_DIRECT.
        var n = 0
        var round = 1
        while n < 40 {
            for _ in 0..<min(round, 40 - n) {
                _ = try postWrite(env.mem, queue: 0, n: n, sector: UInt64(n * 8), data: [UInt8](repeating: UInt8(n), count: 4096))
                n += 1
            }
            try w.kicks[0].write(1)
            waitUsed(env.mem, 0, UInt16(n))  // a driver never has more than the queue size outstanding
            round = round % 5 + 1
        }
        waitUsed(env.mem, 0, 40)
        for i in 0..<40 { XCTAssertEqual(fileBytes(env.image, i * 4096, 4096), [UInt8](repeating: UInt8(i), count: 4096), "request \(i)") }
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4) & 1, 1)
        // Status 0 with requests possibly in flight: joins cleanly.
        _ = try postWrite(env.mem, queue: 0, n: 40, sector: 0, data: [UInt8](repeating: 1, count: 4096))
        try w.kicks[0].write(1)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertEqual(waitThreads("tblk3-q0", []), [])
        XCTAssertEqual(waitThreads("tblk3-q0-io", []), [], "I/O pool threads joined")
    }

    func testHostileDriverGetsNeedsResetNotACrash() throws {
        let env = try makeEnv()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 1, name: "tblk1", vm: env.vm, memory: env.mem)
        defer { slot.stop() }
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        // A head index past the queue size.
        try env.mem.store(UInt16(999), at: qbase(0) + 0x1000 + 4)
        try env.mem.store(UInt16(1), at: qbase(0) + 0x1000 + 2)
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 0)
        let deadline = monotonicNanos() + 5_000_000_000
        while slot.read(offset: VirtioMMIOReg.status, size: 4) & UInt64(VirtioStatus.needsReset) == 0 && monotonicNanos() < deadline {
            usleep(1000)
        }
        XCTAssertNotEqual(slot.read(offset: VirtioMMIOReg.status, size: 4) & UInt64(VirtioStatus.needsReset), 0)
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4) & 2, 2, "config-change interrupt")
        // A queue outside guest RAM never activates.
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 1)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 3)
        slot.write(offset: VirtioMMIOReg.driverFeaturesSel, size: 4, value: 1)
        slot.write(offset: VirtioMMIOReg.driverFeatures, size: 4, value: 1)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0xB)
        slot.write(offset: VirtioMMIOReg.queueSel, size: 4, value: 0)
        slot.write(offset: VirtioMMIOReg.queueNum, size: 4, value: 16)
        slot.write(offset: VirtioMMIOReg.queueDescLow, size: 4, value: VirtioHostTests.ram - 16)
        slot.write(offset: VirtioMMIOReg.queueReady, size: 4, value: 1)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0xF)
        XCTAssertNotEqual(slot.read(offset: VirtioMMIOReg.status, size: 4) & UInt64(VirtioStatus.needsReset), 0)
        XCTAssertEqual(slot.queueThreadCount, 0)
    }

    func testAttachDisksIntoTheMMIOMap() throws {
        let env = try makeEnv()
        var t2 = Array("/tmp/swiftlet-host-XXXXXX".utf8CString)
        let fd = mkstemp(&t2)
        ftruncate(fd, 1 << 20)
        close(fd)
        let second = String(nulTerminated: t2)
        defer { unlink(second) }
        let disks = try openDevices([DiskDeviceSpec(options: DiskOptions(path: env.image)),
                                     DiskDeviceSpec(options: DiskOptions(path: second, readOnly: true))])
        XCTAssertEqual(disks.map(\.name), ["blk0", "blk1"])
        var mmio = RangeMap<MMIODevice>()
        let slots = try attachDevices(disks, vm: env.vm, memory: env.mem, mmio: &mmio).map(\.slot)
        defer { for s in slots { s.stop() } }
        XCTAssertEqual(slots.map(\.acpiDescription), try virtioDescriptions(count: 2))
        XCTAssertEqual(slots.map(\.gsi), [5, 6])
        for (i, base) in [UInt64(0xD000_1000), 0xD000_2000].enumerated() {
            guard let (dev, off) = mmio.lookup(base + VirtioMMIOReg.deviceID, length: 4) else { return XCTFail("no device at \(base)") }
            XCTAssertTrue(dev === slots[i])
            XCTAssertEqual(dev.read(offset: off, size: 4), 2)
        }
        // Read-only disk: VIRTIO_BLK_F_RO offered.
        slots[1].write(offset: VirtioMMIOReg.deviceFeaturesSel, size: 4, value: 0)
        XCTAssertNotEqual(slots[1].read(offset: VirtioMMIOReg.deviceFeatures, size: 4) & (1 << 5), 0)
        XCTAssertThrowsError(try virtioDescriptions(count: X86Layout.maxVirtioDevices + 1))
        // A second attach at the same indices cannot overlap the first.
        XCTAssertThrowsError(try attachDevices([disks[1]], vm: env.vm, memory: env.mem, mmio: &mmio))
    }

    /// A real vCPU (simple guests do run on this PVM host) kicks through QueueNotify: KVM's
    /// ioeventfd catches the write of the queue index with no exit; a write of another value
    /// exits and is routed to the slot like the machine does.
    func testGuestKickThroughKVMIoeventfd() throws {
        let env = try makeEnv()
        try env.vm.setTSSAddress()
        try env.vm.setIdentityMapAddress()
        let vcpu = try env.vm.createVCPU(id: 0)
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 0, name: "tblkg", vm: env.vm, memory: env.mem)
        defer { slot.stop() }
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        let status = try postWrite(env.mem, queue: 0, n: 0, sector: 2, data: [UInt8](repeating: 0xC3, count: 512))
        // Real mode, DS based at the device window.
        try env.mem.write([
            0x66, 0xB8, 0x00, 0x00, 0x00, 0x00,  // mov eax, 0
            0x66, 0xA3, 0x50, 0x00,              // mov [0x50], eax   QueueNotify = 0: ioeventfd, no exit
            0x66, 0xB8, 0x07, 0x00, 0x00, 0x00,  // mov eax, 7
            0x66, 0xA3, 0x50, 0x00,              // mov [0x50], eax   QueueNotify = 7: no match, MMIO exit
            0x66, 0xA1, 0x00, 0x00,              // mov eax, [0x00]   MagicValue: MMIO exit (read)
            0xE6, 0x80,                          // out 0x80, al
            0xF4,
        ], at: 0x1000)
        try vcpu.setupRealMode(RealModeBoot(ip: 0x1000, sp: 0x8000))
        var sr = try vcpu.getSregs()
        sr.ds.base = slot.base
        sr.ds.selector = 0
        sr.ds.limit = 0xFFFF
        try vcpu.setSregs(sr)

        var exits: [String] = []
        var magic: UInt64 = 0
        let done = EventFDFlag()
        let dog = try spawnThread(name: "tblkg-dog") {
            let deadline = monotonicNanos() + 10_000_000_000
            while !done.isSet && monotonicNanos() < deadline { usleep(2000) }
            if !done.isSet { vcpu.kick() }
        }
        defer { done.set(); dog.join() }
        try vcpu.withKickEnabled {
            loop: while true {
                let e = try vcpu.run()
                switch e {
                case let .mmio(address, length, isWrite, data):
                    XCTAssertTrue(address >= slot.base && address < slot.base + 0x1000)
                    if isWrite {
                        var v: UInt64 = 0
                        memcpy(&v, data, length)
                        exits.append("w \(address - slot.base) \(v)")
                        slot.write(offset: address - slot.base, size: length, value: v)
                    } else {
                        var v = slot.read(offset: address - slot.base, size: length)
                        memcpy(data, &v, length)
                        exits.append("r \(address - slot.base)")
                        magic = v
                    }
                case let .io(port, _, _, _, _):
                    XCTAssertEqual(port, 0x80)
                    break loop
                default:
                    XCTFail("unexpected exit \(e)")
                    break loop
                }
            }
        }
        XCTAssertEqual(exits, ["w 80 7", "r 0"], "the kick of queue 0 did not exit")
        XCTAssertEqual(magic, 0x7472_6976)
        waitUsed(env.mem, 0, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: status), VirtioBlockStatus.ok)
        XCTAssertEqual(fileBytes(env.image, 2 * 512, 512), [UInt8](repeating: 0xC3, count: 512))
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1)
    }

    /// Two driver threads kick their queues through the MMIO path (as two vCPUs would) while
    /// the main thread resets the device mid-traffic: no deadlock, threads joined, and the
    /// device works again after re-initialization. Both engines.
    func testResetDuringTrafficFromConcurrentDrivers() throws {
        for direct in [false, true] {
            let env = try makeEnv()
            let disk = try openDisk(DiskOptions(path: env.image, numQueues: 2, direct: direct))
            let slot = try VirtioMMIOSlot.block(disk, index: 0, name: "tblks", vm: env.vm, memory: env.mem)
            defer { slot.stop() }
            let features = VirtioFeature.version1 | VirtioBlockFeature.mq | VirtioFeature.eventIdx
            driverInit(slot, queues: 2, features: features)
            let progress = [Counter(), Counter()]
            var drivers: [OSThread] = []
            for q in 0..<2 {
                let mem = env.mem
                drivers.append(try spawnThread(name: "tblks-drv\(q)") { [self] in
                    for n in 0..<30 {
                        guard (try? self.postWrite(mem, queue: q, n: n, sector: UInt64(q * 512 + n * 8),
                                                   data: [UInt8](repeating: UInt8(n), count: 4096))) != nil else { return }
                        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: UInt64(q))
                        let deadline = monotonicNanos() + 300_000_000
                        while self.usedIdx(mem, q) != UInt16(n + 1) && monotonicNanos() < deadline {
                            _ = slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4)
                            usleep(50)
                        }
                        if self.usedIdx(mem, q) != UInt16(n + 1) { return }  // the device was reset
                        progress[q].add()
                    }
                })
            }
            let deadline = monotonicNanos() + 5_000_000_000
            while (progress[0].value < 5 || progress[1].value < 5) && monotonicNanos() < deadline { usleep(100) }
            let t0 = monotonicNanos()
            slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
            XCTAssertLessThan(monotonicNanos() - t0, 2_000_000_000, "reset returned promptly")
            XCTAssertEqual(slot.queueThreadCount, 0)
            for d in drivers { d.join() }
            XCTAssertEqual(waitThreads("tblks-q", []), [])
            XCTAssertGreaterThanOrEqual(progress[0].value, 5)
            // Everything the device completed is in the file.
            for q in 0..<2 {
                for n in 0..<progress[q].value {
                    XCTAssertEqual(fileBytes(env.image, (q * 512 + n * 8) * 512, 4096), [UInt8](repeating: UInt8(n), count: 4096))
                }
            }
            for q in 0..<2 { try env.mem.zero(qbase(q), length: 0x3000) }
            driverInit(slot, queues: 2, features: features)
            _ = try postWrite(env.mem, queue: 1, n: 0, sector: 2000, data: [UInt8](repeating: 0xEE, count: 512))
            slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 1)
            waitUsed(env.mem, 1, 1)
            XCTAssertEqual(fileBytes(env.image, 2000 * 512, 512), [UInt8](repeating: 0xEE, count: 512))
        }
    }

    /// Device lines are warnings: none at --log-level error, all (within the rate limit)
    /// at warn and above.
    func testDeviceLinesFollowTheLogLevel() {
        // @unchecked Sendable: the log's sink runs on the test's thread (warn is called there).
        final class Got: @unchecked Sendable { var lines: [String] = [] }
        for (level, shown) in [(LogLevel.error, 0), (.warn, 1), (.info, 1), (.debug, 1)] {
            let got = Got()
            let log = RateLimitedLog(name: "blk0", sink: logSink(level: level, print: { got.lines.append($0) }))
            log.warn("ignored queue notify", "virtio-mmio: ignored queue notify 9 of 4 bytes at 0x50")
            XCTAssertEqual(got.lines.count, shown, "--log-level \(level)")
        }
    }

    // MARK: on a fake VM (no /dev/kvm needed)

    struct FakeEnv {
        let vm: FakeVM
        let mem: GuestMemory
        let image: String
    }

    func makeFakeEnv() throws -> FakeEnv {
        let mem = try GuestMemory(layout: [(base: 0, size: VirtioHostTests.ram)])
        var t = Array("/tmp/swiftlet-host-XXXXXX".utf8CString)
        let fd = mkstemp(&t)
        ftruncate(fd, 1 << 20)
        close(fd)
        let path = String(nulTerminated: t)
        addTeardownBlock { unlink(path) }
        return FakeEnv(vm: FakeVM(), mem: mem, image: path)
    }

    /// Activation registers one ioeventfd per queue on QueueNotify; a kick through it is
    /// served; the line goes up with the used-buffer interrupt and down with the driver's
    /// InterruptACK; a reset deassigns every ioeventfd.
    func testSlotOnAFakeVMKicksThroughIoeventfdsAndDrivesTheLine() throws {
        let env = try makeFakeEnv()
        let disk = try openDisk(DiskOptions(path: env.image, numQueues: 2))
        let slot = try VirtioMMIOSlot.block(disk, index: 0, name: "tfake0", vm: env.vm, memory: env.mem)
        defer { slot.stop() }
        XCTAssertTrue(env.vm.ioeventfds.isEmpty, "nothing registered before DRIVER_OK")
        driverInit(slot, queues: 2, features: VirtioFeature.version1 | VirtioBlockFeature.mq)
        XCTAssertEqual(env.vm.ioeventfds.map { $0.address }, [slot.base + 0x50, slot.base + 0x50])
        XCTAssertEqual(env.vm.ioeventfds.map { $0.datamatch }, [0, 1])
        XCTAssertEqual(env.vm.ioeventfds.map { $0.length }, [4, 4])
        let s0 = try postWrite(env.mem, queue: 0, n: 0, sector: 4, data: [UInt8](repeating: 0x5A, count: 512))
        try env.vm.kick(base: slot.base, queue: 0)
        waitUsed(env.mem, 0, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: s0), VirtioBlockStatus.ok)
        XCTAssertEqual(fileBytes(env.image, 4 * 512, 512), [UInt8](repeating: 0x5A, count: 512))
        waitFor { !env.vm.levels(slot.gsi).isEmpty }  // raised just after the used ring is published
        XCTAssertEqual(env.vm.levels(slot.gsi), [true], "raised once for the used buffer")
        slot.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false], "lowered by the acknowledgement")
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertTrue(env.vm.ioeventfds.isEmpty, "a reset deassigns the ioeventfds")
        XCTAssertEqual(slot.queueThreadCount, 0)
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false], "the line was already down")
    }

    /// A VM that refuses ioeventfds: the slot still runs, and the guest's kicks reach the
    /// queue thread through the MMIO exit.
    func testRefusedIoeventfdFallsBackToMMIOKicks() throws {
        let env = try makeFakeEnv()
        env.vm.state.withLock { $0.refuseIoeventfds = true }
        final class Lines: Sendable { let all = Locked<[String]>([]) }
        let lines = Lines()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 1, name: "tfake1", vm: env.vm, memory: env.mem,
                                            log: { _, line in lines.all.withLock { $0.append(line) } })
        defer { slot.stop() }
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        XCTAssertEqual(slot.queueThreadCount, 1)
        XCTAssertTrue(lines.all.withLock { $0.contains { $0.contains("no ioeventfd") } })
        let s0 = try postWrite(env.mem, queue: 0, n: 0, sector: 9, data: [UInt8](repeating: 0x42, count: 512))
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 0)
        waitUsed(env.mem, 0, 1)
        XCTAssertEqual(try env.mem.load(UInt8.self, at: s0), VirtioBlockStatus.ok)
        waitFor { !env.vm.levels(slot.gsi).isEmpty }
        XCTAssertEqual(env.vm.levels(slot.gsi), [true])
    }

    /// The resampling irqfd: registered at construction with its resample eventfd, written
    /// for the used-buffer interrupt; at the guest's EOI (the resample eventfd) the -irq
    /// thread asserts it again only while InterruptStatus is nonzero; machine stop joins
    /// the thread and deassigns it.
    func testResampledIrqfdOnAFakeVM() throws {
        let env = try makeFakeEnv()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 2, name: "tfakei", vm: env.vm, memory: env.mem, interrupts: .irqfd)
        defer { slot.stop() }
        let irqfd = try XCTUnwrap(env.vm.irqfd(slot.gsi))
        let resample = irqfd.resample
        XCTAssertEqual(waitThreads("tfakei", ["tfakei-irq"]), ["tfakei-irq"])
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        _ = try postWrite(env.mem, queue: 0, n: 0, sector: 1, data: [UInt8](repeating: 1, count: 512))
        try env.vm.kick(base: slot.base, queue: 0)
        waitUsed(env.mem, 0, 1)
        XCTAssertTrue(waitReadable(irqfd.eventfd))
        XCTAssertEqual(try irqfd.eventfd.read(), 1, "asserted once")
        // EOI before the driver acknowledged: asserted again.
        try resample.write(1)
        XCTAssertTrue(waitReadable(irqfd.eventfd), "re-asserted after EOI while InterruptStatus is nonzero")
        XCTAssertEqual(try irqfd.eventfd.read(), 1)
        // Acknowledged, then EOI: stays down.
        slot.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        try resample.write(1)
        XCTAssertFalse(waitReadable(irqfd.eventfd, milliseconds: 200), "nothing pending: not re-asserted")
        XCTAssertTrue(env.vm.levels(slot.gsi).isEmpty, "no KVM_IRQ_LINE with an irqfd")
        slot.stop()
        XCTAssertNil(env.vm.irqfd(slot.gsi), "deassigned")
        XCTAssertEqual(waitThreads("tfakei", []), [])
    }

    /// Edge-triggered (--virtio-irq edge): one ioeventfd per InterruptACK value 0-3 is
    /// registered with the slot, the DSDT says Edge; a completion raises the GSI with
    /// KVM_IRQ_LINE and the next InterruptStatus read lowers it, so each raise is an edge;
    /// the driver's ACK through the ioeventfd is applied at its next InterruptStatus read,
    /// but never clears a bit set after the read it acknowledges; machine stop deassigns.
    func testEdgeLineAndAckIoeventfdsOnAFakeVM() throws {
        let env = try makeFakeEnv()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 2, name: "tfakee", vm: env.vm, memory: env.mem, interrupts: .edge)
        defer { slot.stop() }
        XCTAssertFalse(slot.acpiDescription.levelTriggered)
        XCTAssertEqual(VirtioMMIOSlot.acpiDescription(index: 2, interrupts: .edge), slot.acpiDescription)
        XCTAssertEqual(try virtioDescriptions(count: 1, interrupts: .edge).map(\.levelTriggered), [false])
        XCTAssertEqual(try virtioDescriptions(count: 1, interrupts: .irqfd).map(\.levelTriggered), [true])
        XCTAssertNil(env.vm.irqfd(slot.gsi), "no irqfd")
        let ackAddress = slot.base + VirtioMMIOReg.interruptACK
        let acks = env.vm.ioeventfds.filter { $0.address == ackAddress }
        XCTAssertEqual(acks.map(\.datamatch), [0, 1, 2, 3])
        XCTAssertEqual(acks.map(\.length), [4, 4, 4, 4])
        XCTAssertEqual(waitThreads("tfakee", []), [], "no -irq thread")
        func guestAck(_ v: UInt64) throws {
            try XCTUnwrap(env.vm.ioeventfds.first { $0.address == ackAddress && $0.datamatch == v }).eventfd.write(1)
        }
        func status() -> UInt64 { slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4) }
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        _ = try postWrite(env.mem, queue: 0, n: 0, sector: 1, data: [UInt8](repeating: 1, count: 512))
        try env.vm.kick(base: slot.base, queue: 0)
        waitUsed(env.mem, 0, 1)
        waitFor { !env.vm.levels(slot.gsi).isEmpty }
        XCTAssertEqual(env.vm.levels(slot.gsi), [true], "an edge up")
        XCTAssertEqual(status(), 1)
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false], "ended by the read")
        try guestAck(1)
        // A completion after the driver's read and ACK.
        _ = try postWrite(env.mem, queue: 0, n: 1, sector: 2, data: [UInt8](repeating: 2, count: 512))
        try env.vm.kick(base: slot.base, queue: 0)
        waitUsed(env.mem, 0, 2)
        waitFor { env.vm.levels(slot.gsi).count == 3 }
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false, true], "a new edge: set after the last read")
        XCTAssertEqual(status(), 1, "the ACK was for the first: the bit stays")
        try guestAck(1)
        try guestAck(0)  // after a spurious interrupt Linux writes back 0
        XCTAssertEqual(status(), 0, "acknowledged, nothing set since")
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false, true, false], "a read with no edge out lowers nothing")
        // A reset with an ACK pending: dropped.
        try guestAck(1)
        slot.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
        XCTAssertEqual(status(), 0)
        for a in acks { XCTAssertNil(try a.eventfd.read(), "drained at reset (datamatch \(a.datamatch ?? 99))") }
        slot.stop()
        XCTAssertTrue(env.vm.ioeventfds.isEmpty, "ACK ioeventfds deassigned")
    }

    /// Edge-triggered on a VM that refuses ioeventfds: the ACK exits and is applied at once.
    func testEdgeWithoutAckIoeventfds() throws {
        let env = try makeFakeEnv()
        env.vm.state.withLock { $0.refuseIoeventfds = true }
        final class Lines: Sendable { let all = Locked<[String]>([]) }
        let lines = Lines()
        let disk = try openDisk(DiskOptions(path: env.image))
        let slot = try VirtioMMIOSlot.block(disk, index: 1, name: "tfakef", vm: env.vm, memory: env.mem, interrupts: .edge,
                                            log: { _, line in lines.all.withLock { $0.append(line) } })
        defer { slot.stop() }
        XCTAssertEqual(lines.all.withLock { $0.filter { $0.contains("InterruptACK") }.count }, 4)
        driverInit(slot, queues: 1, features: VirtioFeature.version1)
        _ = try postWrite(env.mem, queue: 0, n: 0, sector: 1, data: [UInt8](repeating: 1, count: 512))
        slot.write(offset: VirtioMMIOReg.queueNotify, size: 4, value: 0)
        waitUsed(env.mem, 0, 1)
        waitFor { !env.vm.levels(slot.gsi).isEmpty }
        XCTAssertEqual(slot.read(offset: VirtioMMIOReg.interruptStatus, size: 4), 1)
        slot.write(offset: VirtioMMIOReg.interruptACK, size: 4, value: 1)
        XCTAssertEqual(slot.transport.interruptStatus, 0)
        XCTAssertEqual(env.vm.levels(slot.gsi), [true, false])
    }

    func waitFor(_ condition: () -> Bool) {
        let deadline = monotonicNanos() + 2_000_000_000
        while !condition() && monotonicNanos() < deadline { usleep(1000) }
    }

    func waitReadable(_ e: EventFD, milliseconds: Int32 = 2000) -> Bool {
        var p = pollfd(fd: e.fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, milliseconds) == 1
    }

    func testTooManyDevicesIsAUsageError() throws {
        let env = try makeEnv()
        let disk = try openDisk(DiskOptions(path: env.image))
        XCTAssertThrowsError(try VirtioMMIOSlot.block(disk, index: X86Layout.maxVirtioDevices, name: "b", vm: env.vm, memory: env.mem))
        XCTAssertThrowsError(try VirtioMMIOSlot.block(disk, index: -1, name: "b", vm: env.vm, memory: env.mem))
    }
}

final class Counter: Sendable {
    private let v = Atomic<Int>(0)
    var value: Int { v.load(ordering: .acquiring) }
    func add() { v.wrappingAdd(1, ordering: .acquiringAndReleasing) }
}

/// A flag shared with a watchdog thread.
final class EventFDFlag: Sendable {
    private let v = Atomic<Bool>(false)
    var isSet: Bool { v.load(ordering: .acquiring) }
    func set() { v.store(true, ordering: .releasing) }
}

private extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
