// Pure tests: no guest runs. The decoder is fed crafted kvm_run buffers; the CPUID and MSR
// helpers get synthetic tables; host classification uses paths made for the test.
import XCTest
import Glibc
import OS
import CLinux
@testable import KVM

final class ExitDecoderTests: XCTestCase {
    let mapSize = 3 * 4096

    /// A zeroed fake kvm_run mapping.
    func withRun(_ body: (UnsafeMutableRawPointer) throws -> Void) rethrows {
        let p = UnsafeMutableRawPointer.allocate(byteCount: mapSize, alignment: 4096)
        defer { p.deallocate() }
        memset(p, 0, mapSize)
        try body(p)
    }

    func setIO(_ p: UnsafeMutableRawPointer, out: Bool, size: UInt8, port: UInt16, count: UInt32, offset: UInt64) {
        p.storeBytes(of: UInt32(KVM_EXIT_IO), toByteOffset: RunLayout.exitReason, as: UInt32.self)
        p.storeBytes(of: out ? UInt8(KVM_EXIT_IO_OUT) : UInt8(KVM_EXIT_IO_IN), toByteOffset: RunLayout.ioDirection, as: UInt8.self)
        p.storeBytes(of: size, toByteOffset: RunLayout.ioSize, as: UInt8.self)
        p.storeBytes(of: port, toByteOffset: RunLayout.ioPort, as: UInt16.self)
        p.storeBytes(of: count, toByteOffset: RunLayout.ioCount, as: UInt32.self)
        p.storeBytes(of: offset, toByteOffset: RunLayout.ioDataOffset, as: UInt64.self)
    }

    func testLayoutMatchesUAPI() {
        XCTAssertEqual(RunLayout.immediateExit, 1)
        XCTAssertEqual(RunLayout.exitReason, 8)
        XCTAssertEqual(RunLayout.ioDirection, 32)
        XCTAssertEqual(RunLayout.mmioPhysAddr, 32)
        XCTAssertEqual(RunLayout.mmioData, 40)
        XCTAssertEqual(RunLayout.mmioLen, 48)
        XCTAssertEqual(RunLayout.mmioIsWrite, 52)
    }

    func testValidIOExitPointsInsideMapping() throws {
        try withRun { p in
            setIO(p, out: true, size: 2, port: 0x3f8, count: 3, offset: 4096)
            p.storeBytes(of: UInt16(0xbeef), toByteOffset: 4096, as: UInt16.self)
            guard case let .io(port, size, w, count, data) = try VCPUExit.decode(run: p, mapSize: mapSize) else { return XCTFail() }
            XCTAssertEqual(port, 0x3f8); XCTAssertEqual(size, 2); XCTAssertTrue(w); XCTAssertEqual(count, 3)
            XCTAssertEqual(data, p + 4096)
            XCTAssertEqual(data.load(as: UInt16.self), 0xbeef)
            // Exactly filling the mapping is fine.
            setIO(p, out: false, size: 4, port: 0x60, count: 1, offset: UInt64(mapSize - 4))
            guard case let .io(_, _, w2, _, d2) = try VCPUExit.decode(run: p, mapSize: mapSize) else { return XCTFail() }
            XCTAssertFalse(w2)
            XCTAssertEqual(d2, p + mapSize - 4)
        }
    }

    func testIOExitOutsideMappingIsRefused() throws {
        try withRun { p in
            let bad: [(UInt8, UInt32, UInt64, String)] = [
                (4, 1, UInt64(mapSize - 3), "last item crosses the end"),
                (1, 1, UInt64(mapSize), "starts at the end"),
                (1, 1, UInt64.max - 1, "offset overflows"),
                (4, UInt32.max, 4096, "count overflows the mapping"),
                (2, 2048 * 3, 4096, "string I/O runs past the end"),
                (1, 1, 0, "inside the kvm_run header"),
                (1, 1, UInt64(RunLayout.size - 1), "overlaps the header"),
                (3, 1, 4096, "size 3"),
                (0, 1, 4096, "size 0"),
                (8, 1, 4096, "size 8"),
                (1, 0, 4096, "count 0"),
            ]
            for (size, count, off, what) in bad {
                setIO(p, out: true, size: size, port: 0x3f8, count: count, offset: off)
                XCTAssertThrowsError(try VCPUExit.decode(run: p, mapSize: mapSize), what) { e in
                    guard case .badRunData = e as? KVMError else { return XCTFail("\(what): \(e)") }
                }
            }
        }
    }

    func testMMIOAndOtherExits() throws {
        try withRun { p in
            p.storeBytes(of: UInt32(KVM_EXIT_MMIO), toByteOffset: RunLayout.exitReason, as: UInt32.self)
            p.storeBytes(of: UInt64(0xd000_1000), toByteOffset: RunLayout.mmioPhysAddr, as: UInt64.self)
            p.storeBytes(of: UInt32(4), toByteOffset: RunLayout.mmioLen, as: UInt32.self)
            p.storeBytes(of: UInt8(1), toByteOffset: RunLayout.mmioIsWrite, as: UInt8.self)
            guard case let .mmio(a, l, w, d) = try VCPUExit.decode(run: p, mapSize: mapSize) else { return XCTFail() }
            XCTAssertEqual(a, 0xd000_1000); XCTAssertEqual(l, 4); XCTAssertTrue(w); XCTAssertEqual(d, p + 40)
            for len: UInt32 in [0, 9, 0xffff_ffff] {
                p.storeBytes(of: len, toByteOffset: RunLayout.mmioLen, as: UInt32.self)
                XCTAssertThrowsError(try VCPUExit.decode(run: p, mapSize: mapSize), "MMIO length \(len)")
            }
            func decode(_ reason: Int32) throws -> VCPUExit {
                p.storeBytes(of: UInt32(bitPattern: reason), toByteOffset: RunLayout.exitReason, as: UInt32.self)
                return try VCPUExit.decode(run: p, mapSize: mapSize)
            }
            guard case .hlt = try decode(KVM_EXIT_HLT) else { return XCTFail() }
            guard case .shutdown = try decode(KVM_EXIT_SHUTDOWN) else { return XCTFail() }
            guard case .interrupted = try decode(KVM_EXIT_INTR) else { return XCTFail() }
            p.storeBytes(of: UInt32(KVM_SYSTEM_EVENT_RESET), toByteOffset: RunLayout.systemEventType, as: UInt32.self)
            guard case .systemEvent(type: UInt32(KVM_SYSTEM_EVENT_RESET)) = try decode(KVM_EXIT_SYSTEM_EVENT) else { return XCTFail() }
            p.storeBytes(of: UInt32(KVM_INTERNAL_ERROR_EMULATION), toByteOffset: RunLayout.internalSuberror, as: UInt32.self)
            guard case .internalError(suberror: 1) = try decode(KVM_EXIT_INTERNAL_ERROR) else { return XCTFail() }
            p.storeBytes(of: UInt64(0x80000021), toByteOffset: RunLayout.failEntryReason, as: UInt64.self)
            guard case .failEntry(reason: 0x80000021) = try decode(KVM_EXIT_FAIL_ENTRY) else { return XCTFail() }
            guard case .unknown(12345) = try decode(12345) else { return XCTFail() }
        }
    }

    func testMappingSmallerThanKvmRunIsRefused() throws {
        try withRun { p in
            XCTAssertThrowsError(try VCPUExit.decode(run: p, mapSize: 100))
        }
    }
}

final class CPUIDSetupTests: XCTestCase {
    let sig = CPUIDEntry(function: 0x4000_0000, eax: 0x4000_0001, ebx: 0x4b4d_564b, ecx: 0x564b_4d56, edx: 0x4d)

    /// A synthetic Intel-like table.
    var intel: [CPUIDEntry] {
        [
            CPUIDEntry(function: 0, eax: 0x1f, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69),
            CPUIDEntry(function: 1, eax: 0x906ea, ebx: 0x0010_0800 | 0x3f00_0000, ecx: 0x0100_0000 | 0x2000_0000, edx: 0x1000 | (1 << 28)),
            CPUIDEntry(function: 4, index: 0, flags: 1, eax: 0x1c00_4121, ebx: 0x01c0_003f, ecx: 0x3f),  // L1d
            CPUIDEntry(function: 4, index: 1, flags: 1, eax: 0x1c00_4143, ebx: 0x03c0_003f, ecx: 0x3ff), // L2
            CPUIDEntry(function: 4, index: 2, flags: 1, eax: 0x1c03_c163, ebx: 0x02c0_003f, ecx: 0x2fff), // L3
            CPUIDEntry(function: 4, index: 3, flags: 1),
            CPUIDEntry(function: 0xb, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
            CPUIDEntry(function: 0xb, index: 1, flags: 1, eax: 4, ebx: 12, ecx: 0x201, edx: 7),
            CPUIDEntry(function: 0x1f, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
            sig,
            CPUIDEntry(function: 0x8000_0001, ecx: 0x121, edx: 0x2c10_0800),
        ]
    }

    func leaf(_ t: [CPUIDEntry], _ f: UInt32, _ i: UInt32 = 0) -> CPUIDEntry? {
        t.first { $0.function == f && $0.index == i }
    }

    func testLeaf1APICIDCountHypervisorAndTSCDeadline() throws {
        for (id, count) in [(UInt32(0), UInt32(1)), (3, 4), (5, 8), (200, 256)] {
            let t = CPUIDSetup.fixUp(intel, vcpuID: id, vcpuCount: count, tscDeadlineTimer: false)
            let l1 = try XCTUnwrap(leaf(t, 1))
            XCTAssertEqual(l1.ebx >> 24, id & 0xff, "APIC ID")
            XCTAssertEqual((l1.ebx >> 16) & 0xff, min(count, 255), "logical count")
            XCTAssertEqual(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept")
            XCTAssertEqual(l1.ecx >> 31, 1, "hypervisor bit")
            XCTAssertEqual((l1.ecx >> 24) & 1, 0, "TSC deadline dropped without KVM_CAP_TSC_DEADLINE_TIMER")
            XCTAssertEqual((l1.ecx >> 29) & 1, 1, "other feature bits kept")
            XCTAssertEqual((l1.edx >> 28) & 1, count > 1 ? 1 : 0, "HTT")
            XCTAssertEqual(l1.eax, 0x906ea)
        }
        let keep = CPUIDSetup.fixUp(intel, vcpuID: 0, vcpuCount: 1, tscDeadlineTimer: true)
        XCTAssertEqual((leaf(keep, 1)!.ecx >> 24) & 1, 1, "TSC deadline kept with the capability")
        var older = intel
        older[1].ecx &= ~(UInt32(1) << 24)  // kernels that report it only as KVM_CAP_TSC_DEADLINE_TIMER
        let added = CPUIDSetup.fixUp(older, vcpuID: 0, vcpuCount: 1, tscDeadlineTimer: true)
        XCTAssertEqual((leaf(added, 1)!.ecx >> 24) & 1, 1, "TSC deadline set from the capability")
    }

    func testX2APICTopologyLeaves() throws {
        let t = CPUIDSetup.fixUp(intel, vcpuID: 5, vcpuCount: 6, tscDeadlineTimer: true)
        for f: UInt32 in [0xb, 0x1f] {
            let subs = t.filter { $0.function == f }.sorted { $0.index < $1.index }
            XCTAssertEqual(subs.map(\.index), [0, 1, 2], "leaf 0x\(String(f, radix: 16)) subleaves")
            XCTAssertTrue(subs.allSatisfy { $0.edx == 5 && $0.flags == CPUIDEntry.significantIndex })
            XCTAssertEqual(subs[0].eax, 0); XCTAssertEqual(subs[0].ebx, 1); XCTAssertEqual(subs[0].ecx, 0x100)  // SMT
            XCTAssertEqual(subs[1].eax, 3); XCTAssertEqual(subs[1].ebx, 6); XCTAssertEqual(subs[1].ecx, 0x201)  // core: 3 bits for 6 ids
            XCTAssertEqual(subs[2].ecx, 2); XCTAssertEqual(subs[2].ebx, 0)                                     // invalid level
        }
        XCTAssertEqual(CPUIDSetup.idBits(1), 0)
        XCTAssertEqual(CPUIDSetup.idBits(2), 1)
        XCTAssertEqual(CPUIDSetup.idBits(4), 2)
        XCTAssertEqual(CPUIDSetup.idBits(5), 3)
        XCTAssertEqual(CPUIDSetup.idBits(256), 8)
    }

    func testLeaf4CoresPerPackage() throws {
        let t = CPUIDSetup.fixUp(intel, vcpuID: 0, vcpuCount: 4, tscDeadlineTimer: true)
        let l1d = try XCTUnwrap(leaf(t, 4, 0)), l3 = try XCTUnwrap(leaf(t, 4, 2)), end = try XCTUnwrap(leaf(t, 4, 3))
        XCTAssertEqual(l1d.eax >> 26, 3, "cores per package - 1")
        XCTAssertEqual((l1d.eax >> 14) & 0xfff, 0, "L1 not shared")
        XCTAssertEqual(l1d.eax & 0x3fff, 0x0121, "cache type/level kept")
        XCTAssertEqual(l3.eax >> 26, 3)
        XCTAssertEqual((l3.eax >> 14) & 0xfff, 3, "L3 shared by the package")
        XCTAssertEqual(end.eax, 0, "terminator stays type 0")
        XCTAssertEqual(l1d.ebx, 0x01c0_003f, "geometry kept")
    }

    func testAMDLeaves() throws {
        let amd: [CPUIDEntry] = [
            CPUIDEntry(function: 0, eax: 0x10, ebx: 0x6874_7541, ecx: 0x444d_4163, edx: 0x6974_6e65),
            CPUIDEntry(function: 1, ebx: 0x0002_0800, ecx: 0x8120_2000, edx: 0x078b_fbff),
            CPUIDEntry(function: 0x8000_0001, ecx: 0x0040_0393, edx: 0x23d3_fbff),
            CPUIDEntry(function: 0x8000_0008, eax: 0x3030, ebx: 0x5002_0005, ecx: 0x0001_7001),
            CPUIDEntry(function: 0x8000_001d, index: 0, flags: 1, eax: 0x0000_4121, ebx: 0x01c0_003f, ecx: 0x3f),
            CPUIDEntry(function: 0x8000_001d, index: 3, flags: 1, eax: 0x0000_4163, ebx: 0x03c0_003f, ecx: 0x7fff, edx: 1),
            CPUIDEntry(function: 0x8000_001e, eax: 9, ebx: 0x0000_0109, ecx: 0x0000_0303),
            sig,
        ]
        let t = CPUIDSetup.fixUp(amd, vcpuID: 2, vcpuCount: 3, tscDeadlineTimer: true)
        let e1 = try XCTUnwrap(leaf(t, 0x8000_0001))
        XCTAssertEqual((e1.ecx >> 1) & 1, 1, "CmpLegacy with several cores")
        XCTAssertEqual(e1.ecx & ~UInt32(2), 0x0040_0391, "other bits kept")
        let e8 = try XCTUnwrap(leaf(t, 0x8000_0008))
        XCTAssertEqual(e8.ecx & 0xff, 2, "NC = cores - 1")
        XCTAssertEqual((e8.ecx >> 12) & 0xf, 2, "ApicIdSize")
        XCTAssertEqual(e8.ecx >> 16, 1, "upper bits kept")
        XCTAssertEqual(e8.eax, 0x3030)
        let e1e = try XCTUnwrap(leaf(t, 0x8000_001e))
        XCTAssertEqual(e1e.eax, 2, "extended APIC ID")
        XCTAssertEqual(e1e.ebx & 0xff, 2, "core id")
        XCTAssertEqual((e1e.ebx >> 8) & 0xff, 0, "one thread per core")
        XCTAssertEqual(e1e.ecx, 0, "node 0, one node")
        XCTAssertEqual((leaf(t, 0x8000_001d, 0)!.eax >> 14) & 0xfff, 0, "L1 per core")
        XCTAssertEqual((leaf(t, 0x8000_001d, 3)!.eax >> 14) & 0xfff, 3, "L3 shared by the package")
        XCTAssertEqual(leaf(t, 1)!.ebx >> 24, 2)
        XCTAssertEqual(leaf(t, 0x4000_0000), sig, "KVM signature leaf untouched")
        XCTAssertEqual(t.count, amd.count, "no leaves invented")
        XCTAssertFalse(t.contains { $0.function == 0xb }, "no leaf 0xB added when KVM has none")

        let single = CPUIDSetup.fixUp(amd, vcpuID: 0, vcpuCount: 1, tscDeadlineTimer: true)
        XCTAssertEqual((leaf(single, 0x8000_0001)!.ecx >> 1) & 1, 0, "no CmpLegacy for one vCPU")
        XCTAssertEqual(leaf(single, 0x8000_0008)!.ecx & 0xf0ff, 0)
    }

    func testRealKVMTableFixUpIsConsistent() throws {
        // The host's own table: every vCPU gets its own APIC ID, nothing else differs between vCPUs
        // except topology fields.
        let kvm = try Hypervisor()
        let supported = try kvm.supportedCPUID()
        let a = CPUIDSetup.fixUp(supported, vcpuID: 0, vcpuCount: 2, tscDeadlineTimer: true)
        let b = CPUIDSetup.fixUp(supported, vcpuID: 1, vcpuCount: 2, tscDeadlineTimer: true)
        XCTAssertEqual(a.count, b.count)
        XCTAssertEqual(leaf(a, 1)!.ebx >> 24, 0)
        XCTAssertEqual(leaf(b, 1)!.ebx >> 24, 1)
        XCTAssertEqual(Set(a.map(\.function)), Set(supported.map(\.function)), "same leaves as KVM's")
    }
}

final class MSRSetupTests: XCTestCase {
    func testOnlyListedMSRsAreSet() {
        let available: [UInt32] = [0x174, 0x175, 0xc000_0081, 0xc000_0102, 0x10, 0x1a0, 0x12345]
        let m = MSRSetup.bootMSRs(available: available, mtrr: false)
        XCTAssertEqual(m.map(\.index), [0x174, 0x175, 0xc000_0081, 0xc000_0102, 0x10, 0x1a0])
        XCTAssertEqual(m.first { $0.index == 0x1a0 }?.value, 1, "fast strings")
        XCTAssertTrue(m.filter { $0.index != 0x1a0 }.allSatisfy { $0.value == 0 })
        XCTAssertTrue(MSRSetup.bootMSRs(available: [], mtrr: false).isEmpty)
        let withMTRR = MSRSetup.bootMSRs(available: available, mtrr: true)
        XCTAssertEqual(withMTRR.last?.index, 0x2ff)
        XCTAssertEqual(withMTRR.last?.value, 0x806, "E | write-back")
    }

    func testAllBootValues() {
        let all = MSRSetup.bootMSRs(available: MSRSetup.bootValues.map(\.index), mtrr: false)
        XCTAssertEqual(all.count, 11)
        XCTAssertEqual(Set(all.map(\.index)), [0x174, 0x175, 0x176, 0xc000_0081, 0xc000_0082, 0xc000_0083,
                                               0xc000_0084, 0xc000_0102, 0x10, 0x1a0, 0x2ff])
    }

    func testFPUAndLAPICValues() {
        let f = FPUSetup.bootFPU()
        XCTAssertEqual(f.fcw, 0x37f)
        XCTAssertEqual(f.mxcsr, 0x1f80)
        var l = LAPICState()
        l.setRegister(LAPICState.lvtLINT0, 0x0001_0000)  // masked, fixed
        l.setRegister(LAPICState.lvtLINT1, 0x0001_0700)
        l.configureLINTsForLinux()
        XCTAssertEqual(l.register(LAPICState.lvtLINT0), 0x0001_0700, "ExtINT, mask bit kept")
        XCTAssertEqual(l.register(LAPICState.lvtLINT1), 0x0001_0400, "NMI")
    }

    func testLongModeRegisterValues() {
        var b = LongModeBoot(entry: 0x100_0200)
        b.pml4 = 0x9000
        var s = kvm_sregs()
        b.apply(to: &s)
        XCTAssertEqual(s.cr0, 0x8000_0031)
        XCTAssertEqual(s.cr4, 0x20)
        XCTAssertEqual(s.efer, 0x500)
        XCTAssertEqual(s.cr3, 0x9000)
        XCTAssertEqual(s.gdt.base, 0x500); XCTAssertEqual(s.gdt.limit, 31)
        XCTAssertEqual(s.idt.base, 0x520); XCTAssertEqual(s.idt.limit, 0)
        XCTAssertEqual(s.cs.selector, 0x10); XCTAssertEqual(s.cs.type, 0xb); XCTAssertEqual(s.cs.l, 1); XCTAssertEqual(s.cs.db, 0)
        XCTAssertEqual(s.cs.g, 1); XCTAssertEqual(s.cs.limit, 0xffff_ffff); XCTAssertEqual(s.cs.present, 1); XCTAssertEqual(s.cs.s, 1)
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            XCTAssertEqual(d.selector, 0x18); XCTAssertEqual(d.type, 3); XCTAssertEqual(d.db, 1); XCTAssertEqual(d.l, 0)
        }
        var r = kvm_regs()
        r.rax = 99
        b.apply(to: &r)
        XCTAssertEqual(r.rip, 0x100_0200); XCTAssertEqual(r.rsi, 0x7000); XCTAssertEqual(r.rflags, 2); XCTAssertEqual(r.rax, 0)
        // The GDT descriptors decode to the same segments.
        // [limit, type, S, L, D/B, G, P, base]
        func decode(_ d: UInt64) -> [UInt64] {
            [(d & 0xffff) | ((d >> 32) & 0xf0000), (d >> 40) & 0xf, (d >> 44) & 1, (d >> 53) & 1, (d >> 54) & 1, (d >> 55) & 1, (d >> 47) & 1,
             ((d >> 16) & 0xffffff) | ((d >> 32) & 0xff00_0000)]
        }
        XCTAssertEqual(decode(LongModeBoot.codeDescriptor), [0xfffff, 0xb, 1, 1, 0, 1, 1, 0])
        XCTAssertEqual(decode(LongModeBoot.dataDescriptor), [0xfffff, 3, 1, 0, 1, 1, 1, 0])
    }
}

final class HostCheckTests: XCTestCase {
    func testMissingDevice() {
        let s = HostCheck.classify(device: "/nonexistent/kvm")
        XCTAssertEqual(s, .missing(path: "/nonexistent/kvm"))
        XCTAssertTrue(s.message.contains("does not exist"))
        XCTAssertTrue(s.message.contains("scripts/testbed"))
    }

    func testNoPermission() throws {
        // As root, permission bits do not stop us; a read-only sysfs file refuses O_RDWR with
        // EACCES even for root. As another user, a 0400 file of ours... does not either, so
        // pick whichever this host gives.
        let candidates = ["/sys/module/kvm/refcnt", "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "/sys/devices/system/cpu/possible"]
        guard let path = candidates.first(where: { p in
            let fd = open(p, O_RDWR | O_CLOEXEC)
            if fd >= 0 { close(fd); return false }
            return errno == EACCES
        }) else {
            return XCTFail("no file here refuses O_RDWR with EACCES; cannot exercise the no-permission case")
        }
        let s = HostCheck.classify(device: path)
        XCTAssertEqual(s, .noPermission(path: path))
        XCTAssertTrue(s.message.contains("kvm group"), s.message)
    }

    func testThisHost() {
        let pvm = access("/sys/module/kvm_pvm", F_OK) == 0
        let s = HostCheck.classify()
        XCTAssertEqual(s, pvm ? .pvmHost : .usable)
        print("HostCheck on this machine: \(s.message)")
        if pvm { XCTAssertTrue(s.message.contains("scripts/testbed")) }
        XCTAssertEqual(HostCheck.classify(pvmMarker: "/nonexistent/kvm_pvm"), .usable)
    }

    /// With the device already open (the KVM prefetch thread's Hypervisor), only the PVM
    /// marker is looked at: the device path is not opened again.
    func testAlreadyOpened() {
        XCTAssertEqual(HostCheck.classify(device: "/nonexistent/kvm", pvmMarker: "/nonexistent/kvm_pvm", opened: true), .usable)
        XCTAssertEqual(HostCheck.classify(device: "/nonexistent/kvm", pvmMarker: "/proc/self", opened: true), .pvmHost)
    }

    func testErrorsAreOneClearLine() throws {
        XCTAssertThrowsError(try Hypervisor(path: "/nonexistent/kvm")) { e in
            XCTAssertEqual("\(e)", "cannot open /nonexistent/kvm: No such file or directory")
        }
        let kvm = try Hypervisor()
        let fake = Capability("KVM_CAP_FAKE_FOR_TEST", 0x7fff_0000)
        XCTAssertFalse(kvm.has(fake))
        XCTAssertThrowsError(try kvm.requireCapabilities([.userMemory, fake, .irqchip])) { e in
            XCTAssertEqual(e as? KVMError, .missingCapabilities(["KVM_CAP_FAKE_FOR_TEST"]))
            XCTAssertEqual("\(e)", "KVM lacks required capability: KVM_CAP_FAKE_FOR_TEST")
        }
        XCTAssertEqual("\(KVMError.ioctl(name: "KVM_RUN", errno: EFAULT))", "KVM_RUN failed: Bad address")
    }
}

final class CoalescedRingTests: XCTestCase {
    let pageSize = 4096

    /// A fake ring page: `first`, `last` and entries (port, len, pio flag, value).
    func withRing(first: UInt32, last: UInt32, entries: [(index: Int, port: UInt64, len: UInt32, pio: UInt32, value: UInt64)],
                  _ body: (CoalescedRing, UnsafeMutableRawPointer) throws -> Void) rethrows {
        let p = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 4096)
        defer { p.deallocate() }
        memset(p, 0, pageSize)
        p.storeBytes(of: first, as: UInt32.self)
        p.storeBytes(of: last, toByteOffset: 4, as: UInt32.self)
        for e in entries {
            let o = 8 + e.index * 24
            p.storeBytes(of: e.port, toByteOffset: o, as: UInt64.self)
            p.storeBytes(of: e.len, toByteOffset: o + 8, as: UInt32.self)
            p.storeBytes(of: e.pio, toByteOffset: o + 12, as: UInt32.self)
            p.storeBytes(of: e.value, toByteOffset: o + 16, as: UInt64.self)
        }
        try body(CoalescedRing(page: p, pageSize: pageSize), p)
    }

    func testCapacityIsKVMsMax() {
        withRing(first: 0, last: 0, entries: []) { r, _ in XCTAssertEqual(r.capacity, 170) }  // (4096 - 8) / 24
    }

    func testDrainAppliesWritesInOrderAndWraps() {
        withRing(first: 169, last: 2, entries: [
            (169, 0x70, 1, 1, 0x0b), (0, 0x71, 1, 1, 0x82), (1, 0xcf8, 4, 1, 0x8000_0008),
        ]) { r, p in
            var got: [String] = []
            XCTAssertEqual(r.drain { got.append("\(String($0, radix: 16)) \($1) \(String($2, radix: 16))") }, 3)
            XCTAssertEqual(got, ["70 1 b", "71 1 82", "cf8 4 80000008"])
            XCTAssertEqual(p.load(as: UInt32.self), 2, "first must reach last")
            XCTAssertEqual(r.drain { _, _, _ in XCTFail("empty ring") }, 0)
        }
    }

    func testDrainSkipsWhatIsNoPortWriteAndMasksToLength() {
        withRing(first: 0, last: 4, entries: [
            (0, 0xd000_0000, 4, 0, 1),            // MMIO: not ours
            (1, 0x1_0000, 1, 1, 1),               // no such port
            (2, 0x70, 3, 1, 1),                   // bad length
            (3, 0x70, 2, 1, 0xdead_beef_1234),    // 2 bytes: only the low 16 bits
        ]) { r, p in
            var got: [(UInt16, Int, UInt32)] = []
            XCTAssertEqual(r.drain { got.append(($0, $1, $2)) }, 4)
            XCTAssertEqual(got.count, 1)
            XCTAssertEqual(got.first?.0, 0x70); XCTAssertEqual(got.first?.1, 2); XCTAssertEqual(got.first?.2, 0x1234)
            XCTAssertEqual(p.load(as: UInt32.self), 4)
        }
    }

    func testIndicesOutOfRangeLeaveTheRingAlone() {
        for (first, last) in [(UInt32(170), UInt32(0)), (0, 170), (UInt32.max, 1)] {
            withRing(first: first, last: last, entries: [(0, 0x70, 1, 1, 1)]) { r, p in
                XCTAssertEqual(r.drain { _, _, _ in XCTFail("nothing may be applied") }, 0)
                XCTAssertEqual(p.load(as: UInt32.self), first)
            }
        }
    }
}

final class PagingRootTests: XCTestCase {
    let pe: UInt64 = 1, pg: UInt64 = 1 << 31, pae: UInt64 = 1 << 5, pcide: UInt64 = 1 << 17
    let lme: UInt64 = 1 << 8, lma: UInt64 = 1 << 10

    func testNoPagingHasNoRoot() {
        XCTAssertNil(pagingRoot(cr0: pe, cr3: 0x1000, cr4: pae, efer: lme | lma))
        XCTAssertNil(pagingRoot(cr0: 0, cr3: 0xffff_ffff_ffff_ffff, cr4: 0, efer: 0))
    }

    func testLongModeRootDropsPCIDAndNoFlushBits() {
        let cr0 = pe | pg
        var r = pagingRoot(cr0: cr0, cr3: 0x1_23c3_2000, cr4: pae, efer: lme | lma)
        XCTAssertEqual(r?.address, 0x1_23c3_2000); XCTAssertEqual(r?.length, 4096)
        r = pagingRoot(cr0: cr0, cr3: (1 << 63) | 0x16f4_a000 | 0x5, cr4: pae | pcide, efer: lme | lma)
        XCTAssertEqual(r?.address, 0x16f4_a000)
        r = pagingRoot(cr0: cr0, cr3: 0xffff_ffff_ffff_ffff, cr4: pae, efer: lme | lma)
        XCTAssertEqual(r?.address, 0x000f_ffff_ffff_f000)
    }

    func testPAEAndLegacyRoots() {
        var r = pagingRoot(cr0: pe | pg, cr3: 0xffff_ffff_ffff_ffe7, cr4: pae, efer: 0)
        XCTAssertEqual(r?.address, 0xffff_ffe0); XCTAssertEqual(r?.length, 32)
        r = pagingRoot(cr0: pe | pg, cr3: 0x1_0000_3fff, cr4: 0, efer: 0)
        XCTAssertEqual(r?.address, 0x3000); XCTAssertEqual(r?.length, 4096)
    }
}
