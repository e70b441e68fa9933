// Shared helpers for the KVM tests: a tiny VM on this machine's /dev/kvm, page tables and a
// GDT for 64-bit guests, and a watchdog so a guest that never exits fails instead of hanging.
import XCTest
import Glibc
import CLinux
import GuestMemory
import OS
@testable import KVM

/// Where the test guests live (inside a 4 MiB RAM region at 0).
enum GuestLayout {
    static let ramSize: UInt64 = 4 << 20
    static let realModeCode: UInt64 = 0x1000
    static let longModeCode: UInt64 = 0x10000
    static let gdt: UInt64 = 0x500
    static let pml4: UInt64 = 0x9000
    static let pdpt: UInt64 = 0xa000
    static let pd0: UInt64 = 0xb000  // four PDs, 0xb000..0xe000
    static let mmio: UInt64 = 0xd000_0000
}

/// A VM with RAM at [0, 4 MiB) and one vCPU.
final class TestVM {
    let kvm: Hypervisor
    let vm: VirtualMachine
    let mem: GuestMemory
    var vcpus: [VCPU] = []
    var vcpu: VCPU { vcpus[0] }

    init(irqchip: Bool = false, vcpuCount: Int = 1) throws {
        kvm = try Hypervisor()
        vm = try kvm.createVM()
        try vm.setTSSAddress()
        try vm.setIdentityMapAddress()
        if irqchip {
            try vm.createIRQChip()
            try vm.createPIT2()
        }
        mem = try GuestMemory(layout: [(base: 0, size: GuestLayout.ramSize)])
        try vm.registerMemory(mem)
        for i in 0..<vcpuCount { vcpus.append(try vm.createVCPU(id: UInt32(i))) }
    }

    /// Real mode at 0000:1000 with `code` there.
    func startRealMode(_ code: [UInt8], vcpu v: VCPU? = nil) throws {
        try mem.write(code, at: GuestLayout.realModeCode)
        try (v ?? vcpu).setupRealMode(RealModeBoot(ip: UInt16(GuestLayout.realModeCode), sp: 0x8000))
    }

    /// Identity-maps the low 4 GiB with 2 MiB pages (PML4 0x9000, PDPT 0xa000, PDs 0xb000-0xe000)
    /// and writes the GDT (null, null, code64 0x10, data 0x18) at 0x500, as docs/DESIGN.md says.
    func buildLongModeTables() throws {
        try mem.store(UInt64(GuestLayout.pdpt | 3), at: GuestLayout.pml4)  // present, writable
        for i in 0..<4 {
            let pd = GuestLayout.pd0 + UInt64(i) * 0x1000
            try mem.store(pd | 3, at: GuestLayout.pdpt + UInt64(i) * 8)
            for j in 0..<512 {
                let phys = UInt64(i) << 30 | UInt64(j) << 21
                try mem.store(phys | 0x83, at: pd + UInt64(j) * 8)  // present, writable, 2 MiB page
            }
        }
        try mem.store(UInt64(0), at: GuestLayout.gdt)
        try mem.store(UInt64(0), at: GuestLayout.gdt + 8)
        try mem.store(LongModeBoot.codeDescriptor, at: GuestLayout.gdt + 16)
        try mem.store(LongModeBoot.dataDescriptor, at: GuestLayout.gdt + 24)
    }

    /// 64-bit mode at 0x10000 with `code` there; returns the boot values used.
    @discardableResult
    func startLongMode(_ code: [UInt8], vcpu v: VCPU? = nil, adjust: (inout LongModeBoot) -> Void = { _ in }) throws -> LongModeBoot {
        try buildLongModeTables()
        try mem.write(code, at: GuestLayout.longModeCode)
        var boot = LongModeBoot(entry: GuestLayout.longModeCode)
        adjust(&boot)
        try (v ?? vcpu).setupLongMode(boot)
        return boot
    }
}

/// Kicks a vCPU if not cancelled within `seconds`.
final class Watchdog {
    private let state = Shared<(cancelled: Bool, fired: Bool)>((false, false))
    private var thread: OSThread?

    init(vcpu: VCPU, seconds: Double) throws {
        let state = self.state
        thread = try spawnThread(name: "kvm-watchdog") {
            let deadline = monotonicSeconds() + seconds
            while monotonicSeconds() < deadline {
                if state.withLock({ $0.cancelled }) { return }
                usleep(2000)
            }
            state.withLock { $0.fired = true }
            vcpu.kick()
        }
    }

    var didFire: Bool { state.withLock { $0.fired } }

    func cancel() {
        state.withLock { $0.cancelled = true }
        thread?.join()
    }
}

/// A value shared with threads a test starts, behind a mutex.
final class Shared<Value: Sendable>: Sendable {
    private let mutex: Locked<Value>
    init(_ value: Value) { mutex = Locked(value) }
    func withLock<R: Sendable>(_ body: (inout Value) throws -> R) rethrows -> R {
        try mutex.withLock { v in try body(&v) }
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs until an exit that is not `.interrupted`; a watchdog kicks after `timeout` seconds,
/// which fails the test (a guest that should have exited did not).
func runToExit(_ vcpu: VCPU, timeout: Double = 10, file: StaticString = #filePath, line: UInt = #line) throws -> VCPUExit {
    try vcpu.withKickEnabled {
        let dog = try Watchdog(vcpu: vcpu, seconds: timeout)
        defer { dog.cancel() }
        while true {
            let exit = try vcpu.run()
            if case .interrupted = exit {
                if dog.didFire {
                    XCTFail("guest did not exit within \(timeout) s", file: file, line: line)
                    vcpu.clearImmediateExit()
                    return exit
                }
                continue
            }
            return exit
        }
    }
}

/// Runs for at most `seconds`; returns the first exit other than `.interrupted`, or nil when
/// the deadline kick came first (immediate_exit is cleared again).
func runWithDeadline(_ vcpu: VCPU, seconds: Double) throws -> VCPUExit? {
    try vcpu.withKickEnabled {
        let dog = try Watchdog(vcpu: vcpu, seconds: seconds)
        defer { dog.cancel() }
        while true {
            let exit = try vcpu.run()
            if case .interrupted = exit {
                if dog.didFire { vcpu.clearImmediateExit(); return nil }
                continue
            }
            return exit
        }
    }
}

/// This machine's KVM is PVM (see HostCheck).
let isPVMHost = access("/sys/module/kvm_pvm", F_OK) == 0

/// Describes an exit for failure messages.
func describe(_ e: VCPUExit) -> String {
    switch e {
    case let .io(port, size, w, count, data):
        return ".io(port: 0x\(String(port, radix: 16)), size: \(size), \(w ? "out" : "in"), count: \(count), first: 0x\(String(data.loadUnaligned(as: UInt32.self) & (size == 4 ? 0xffff_ffff : (1 << (size * 8)) - 1), radix: 16)))"
    case let .mmio(a, l, w, data):
        return ".mmio(0x\(String(a, radix: 16)), \(l), \(w ? "write" : "read"), data: 0x\(String(data.loadUnaligned(as: UInt64.self), radix: 16)))"
    case .hlt: return ".hlt"
    case .shutdown: return ".shutdown"
    case let .systemEvent(t): return ".systemEvent(\(t))"
    case let .internalError(s): return ".internalError(\(s))"
    case let .failEntry(r): return ".failEntry(0x\(String(r, radix: 16)))"
    case .interrupted: return ".interrupted"
    case let .unknown(r): return ".unknown(\(r))"
    }
}

/// Asserts an `.io` exit and returns (port, size, isWrite, value of the first item).
@discardableResult
func expectIO(_ e: VCPUExit, port: UInt16, size: Int, isWrite: Bool, value: UInt32? = nil,
              file: StaticString = #filePath, line: UInt = #line) -> UnsafeMutableRawPointer? {
    guard case let .io(p, s, w, count, data) = e else {
        XCTFail("expected .io on port 0x\(String(port, radix: 16)), got \(describe(e))", file: file, line: line)
        return nil
    }
    XCTAssertEqual(p, port, "port", file: file, line: line)
    XCTAssertEqual(s, size, "size", file: file, line: line)
    XCTAssertEqual(w, isWrite, "direction", file: file, line: line)
    XCTAssertEqual(count, 1, "count", file: file, line: line)
    if let value, isWrite {
        let mask: UInt32 = size == 4 ? 0xffff_ffff : (1 << (size * 8)) - 1
        XCTAssertEqual(data.loadUnaligned(as: UInt32.self) & mask, value, "data", file: file, line: line)
    }
    return data
}

@discardableResult
func expectMMIO(_ e: VCPUExit, address: UInt64, length: Int, isWrite: Bool, value: UInt64? = nil,
                file: StaticString = #filePath, line: UInt = #line) -> UnsafeMutableRawPointer? {
    guard case let .mmio(a, l, w, data) = e else {
        XCTFail("expected .mmio at 0x\(String(address, radix: 16)), got \(describe(e))", file: file, line: line)
        return nil
    }
    XCTAssertEqual(a, address, "address", file: file, line: line)
    XCTAssertEqual(l, length, "length", file: file, line: line)
    XCTAssertEqual(w, isWrite, "direction", file: file, line: line)
    if let value, isWrite {
        let mask: UInt64 = length == 8 ? .max : (1 << (UInt64(length) * 8)) - 1
        XCTAssertEqual(data.loadUnaligned(as: UInt64.self) & mask, value, "data", file: file, line: line)
    }
    return data
}

func expectHLT(_ e: VCPUExit, file: StaticString = #filePath, line: UInt = #line) {
    guard case .hlt = e else { XCTFail("expected .hlt, got \(describe(e))", file: file, line: line); return }
}
