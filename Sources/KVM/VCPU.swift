// A vCPU: its kvm_run mapping, register state, KVM_RUN and exit decoding, and the kick.
import OS
import Glibc
import CLinux

/// Why KVM_RUN returned. Pointers point into the vCPU's kvm_run mapping and are valid
/// only until the next `run()` on that vCPU.
public enum VCPUExit {
    /// Port I/O: `count` items of `size` bytes at `data` (to fill in for reads, to consume for writes).
    case io(port: UInt16, size: Int, isWrite: Bool, count: Int, data: UnsafeMutableRawPointer)
    /// MMIO at `address`, `length` (1...8) bytes; `data` is kvm_run.mmio.data (8 bytes).
    case mmio(address: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer)
    /// The guest executed HLT (only seen without an in-kernel irqchip).
    case hlt
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    case shutdown
    /// KVM_EXIT_SYSTEM_EVENT: `type` is KVM_SYSTEM_EVENT_SHUTDOWN (1), _RESET (2) or _CRASH (3).
    case systemEvent(type: UInt32)
    /// KVM_EXIT_INTERNAL_ERROR; suberror 1 is an emulation failure.
    case internalError(suberror: UInt32)
    /// KVM_EXIT_FAIL_ENTRY with the hardware reason.
    case failEntry(reason: UInt64)
    /// KVM_RUN returned EINTR/EAGAIN (a signal, a kick, or immediate_exit), or KVM_EXIT_INTR.
    case interrupted
    /// Any other exit reason.
    case unknown(UInt32)
}

extension VCPUExit: CustomStringConvertible {
    /// One line for logs, e.g. `io(port: 0x3f8, size: 1, out, count: 1)`.
    public var description: String {
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case let .io(port, size, w, count, _):
            return "io(port: \(hex(port)), size: \(size), \(w ? "out" : "in"), count: \(count))"
        case let .mmio(a, l, w, _):
            return "mmio(address: \(hex(a)), length: \(l), \(w ? "write" : "read"))"
        case .hlt: return "hlt"
        case .shutdown: return "shutdown (triple fault)"
        case let .systemEvent(t): return "systemEvent(type: \(t))"
        case let .internalError(s): return "internalError(suberror: \(s)\(s == 1 ? ", emulation" : ""))"
        case let .failEntry(r): return "failEntry(reason: \(hex(r)))"
        case .interrupted: return "interrupted"
        case let .unknown(r): return "unknown(exit reason \(r))"
        }
    }
}

/// Offsets into struct kvm_run (from the C header, so they track the UAPI).
enum RunLayout {
    static let immediateExit = Int(clinux_kvm_run_off_immediate_exit())
    static let exitReason = Int(clinux_kvm_run_off_exit_reason())
    static let ioDirection = Int(clinux_kvm_run_off_io_direction())
    static let ioSize = Int(clinux_kvm_run_off_io_size())
    static let ioPort = Int(clinux_kvm_run_off_io_port())
    static let ioCount = Int(clinux_kvm_run_off_io_count())
    static let ioDataOffset = Int(clinux_kvm_run_off_io_data_offset())
    static let mmioPhysAddr = Int(clinux_kvm_run_off_mmio_phys_addr())
    static let mmioData = Int(clinux_kvm_run_off_mmio_data())
    static let mmioLen = Int(clinux_kvm_run_off_mmio_len())
    static let mmioIsWrite = Int(clinux_kvm_run_off_mmio_is_write())
    static let failEntryReason = Int(clinux_kvm_run_off_fail_entry_reason())
    static let internalSuberror = Int(clinux_kvm_run_off_internal_suberror())
    static let systemEventType = Int(clinux_kvm_run_off_system_event_type())
    static let size = Int(clinux_kvm_run_size())
}

extension VCPUExit {
    /// Decodes the exit in a kvm_run area of `mapSize` bytes. Throws `KVMError.badRunData` for
    /// anything that would make swiftlet touch memory outside the mapping (I/O data offset or
    /// size out of range, MMIO length above 8) instead of returning a pointer to it.
    public static func decode(run: UnsafeMutableRawPointer, mapSize: Int) throws -> VCPUExit {
        guard mapSize >= RunLayout.size else {
            throw KVMError.badRunData("mapping of \(mapSize) bytes is smaller than struct kvm_run (\(RunLayout.size))")
        }
        let reason = run.load(fromByteOffset: RunLayout.exitReason, as: UInt32.self)
        switch Int32(bitPattern: reason) {
        case KVM_EXIT_IO:
            let dir = run.load(fromByteOffset: RunLayout.ioDirection, as: UInt8.self)
            let size = Int(run.load(fromByteOffset: RunLayout.ioSize, as: UInt8.self))
            let port = run.load(fromByteOffset: RunLayout.ioPort, as: UInt16.self)
            let count = Int(run.load(fromByteOffset: RunLayout.ioCount, as: UInt32.self))
            let off = run.load(fromByteOffset: RunLayout.ioDataOffset, as: UInt64.self)
            guard size == 1 || size == 2 || size == 4 else {
                throw KVMError.badRunData("I/O exit on port 0x\(String(port, radix: 16)) with size \(size)")
            }
            guard count >= 1, count <= mapSize else {
                throw KVMError.badRunData("I/O exit on port 0x\(String(port, radix: 16)) with count \(count)")
            }
            // The data must lie after the kvm_run header and wholly inside the mapping.
            let bytes = UInt64(size * count)
            guard off >= UInt64(RunLayout.size), off <= UInt64(mapSize), bytes <= UInt64(mapSize) - off else {
                throw KVMError.badRunData("I/O data at offset 0x\(String(off, radix: 16)) (+\(bytes)) lies outside the \(mapSize)-byte kvm_run mapping")
            }
            return .io(port: port, size: size, isWrite: dir == UInt8(KVM_EXIT_IO_OUT), count: count, data: run + Int(off))
        case KVM_EXIT_MMIO:
            let addr = run.load(fromByteOffset: RunLayout.mmioPhysAddr, as: UInt64.self)
            let len = Int(run.load(fromByteOffset: RunLayout.mmioLen, as: UInt32.self))
            let w = run.load(fromByteOffset: RunLayout.mmioIsWrite, as: UInt8.self)
            guard len >= 1, len <= 8 else {
                throw KVMError.badRunData("MMIO exit at 0x\(String(addr, radix: 16)) with length \(len)")
            }
            return .mmio(address: addr, length: len, isWrite: w != 0, data: run + RunLayout.mmioData)
        case KVM_EXIT_HLT:
            return .hlt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: run.load(fromByteOffset: RunLayout.systemEventType, as: UInt32.self))
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(suberror: run.load(fromByteOffset: RunLayout.internalSuberror, as: UInt32.self))
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: run.load(fromByteOffset: RunLayout.failEntryReason, as: UInt64.self))
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .unknown(reason)
        }
    }
}

/// The LAPIC register page (struct kvm_lapic_state: 1 KiB, registers at their MMIO offsets).
public struct LAPICState {
    public var raw: kvm_lapic_state
    public init(raw: kvm_lapic_state = kvm_lapic_state()) { self.raw = raw }

    public static let lvtLINT0 = 0x350
    public static let lvtLINT1 = 0x360
    public static let deliveryModeExtINT: UInt32 = 7
    public static let deliveryModeNMI: UInt32 = 4

    /// The 32-bit register at `offset` (0..<1024, 4-byte aligned).
    public func register(_ offset: Int) -> UInt32 {
        precondition(offset >= 0 && offset <= 1020 && offset % 4 == 0, "bad LAPIC register offset")
        return withUnsafeBytes(of: raw) { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    public mutating func setRegister(_ offset: Int, _ value: UInt32) {
        precondition(offset >= 0 && offset <= 1020 && offset % 4 == 0, "bad LAPIC register offset")
        withUnsafeMutableBytes(of: &raw) { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self) }
    }

    /// Replaces the delivery mode field (bits 10:8) of an LVT register.
    public static func withDeliveryMode(_ reg: UInt32, _ mode: UInt32) -> UInt32 {
        (reg & ~UInt32(0x700)) | ((mode & 7) << 8)
    }

    /// LINT0 = ExtINT (the PIC's INTR), LINT1 = NMI: what Linux expects from a PC's BIOS.
    public mutating func configureLINTsForLinux() {
        setRegister(Self.lvtLINT0, Self.withDeliveryMode(register(Self.lvtLINT0), Self.deliveryModeExtINT))
        setRegister(Self.lvtLINT1, Self.withDeliveryMode(register(Self.lvtLINT1), Self.deliveryModeNMI))
    }
}

/// A virtual CPU. Owns its file descriptor and the kvm_run mapping.
///
/// Kick mechanism (stopping a vCPU that is inside KVM_RUN from another thread):
/// - `VCPU.kickSignal` (SIGRTMIN, a real-time signal nothing else in swiftlet uses) gets a
///   no-op handler without SA_RESTART, installed once per process.
/// - `withKickEnabled { ... }` (or `enableKick()`), called on the vCPU's own thread, blocks the
///   signal in that thread and gives KVM the same mask minus the signal via
///   KVM_SET_SIGNAL_MASK: so the signal can only arrive while the thread is inside KVM_RUN,
///   where it makes KVM_RUN return EINTR. A signal sent while the thread is outside KVM_RUN
///   stays pending and makes the next KVM_RUN return EINTR at once: no lost wake-ups.
/// - `kick()` (any thread) sets kvm_run.immediate_exit = 1 and then pthread_kill()s the thread.
///   immediate_exit keeps every later KVM_RUN returning at once until `clearImmediateExit()`.
/// - `run()` turns EINTR/EAGAIN into `.interrupted` and consumes the pending kick signal.
// @unchecked Sendable: `runArea` (the kvm_run mapping) is read and written by the thread
// that calls run(); other threads only set immediate_exit (an atomic byte store) and
// kick, whose target thread is behind a mutex.
public final class VCPU: @unchecked Sendable {
    public let fd: Int32
    public let id: UInt32
    /// Start and size of the kvm_run mapping.
    public let runArea: UnsafeMutableRawPointer
    public let runAreaSize: Int
    let vm: VirtualMachine  // the VM must outlive its vCPUs
    /// The thread `kick()` signals (set by `enableKick()`) and its signal mask before.
    private struct KickTarget {
        var thread: pthread_t?
        var maskBefore: sigset_t?
    }
    private let kickTarget = Locked(KickTarget())

    init(vm: VirtualMachine, id: UInt32, mmapSize: Int) throws {
        var fd: Int32
        repeat { fd = clinux_ioctl_int(vm.fd, clinux_KVM_CREATE_VCPU(), UInt(id)) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw KVMError.ioctl(name: "KVM_CREATE_VCPU", errno: errno) }
        guard mmapSize >= RunLayout.size else { close(fd); throw KVMError.badRunData("KVM_GET_VCPU_MMAP_SIZE \(mmapSize) < sizeof(kvm_run)") }
        let p = mmap(nil, mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { let e = errno; close(fd); throw KVMError.mmap(what: "kvm_run of vCPU \(id)", errno: e) }
        self.fd = fd
        self.id = id
        self.runArea = p
        self.runAreaSize = mmapSize
        self.vm = vm
    }

    deinit {
        munmap(runArea, runAreaSize)
        close(fd)
    }

    // MARK: running

    /// KVM_RUN once and decode why it returned.
    public func run() throws -> VCPUExit {
        let r = clinux_ioctl_none(fd, clinux_KVM_RUN())
        if r < 0 {
            let e = errno
            if e == EINTR || e == EAGAIN {
                consumeKickSignal()
                return .interrupted
            }
            throw KVMError.ioctl(name: "KVM_RUN", errno: e)
        }
        return try VCPUExit.decode(run: runArea, mapSize: runAreaSize)
    }

    /// kvm_run.immediate_exit: while set, KVM_RUN returns EINTR without entering the guest.
    public var immediateExit: Bool {
        get { clinux_atomic_load_u8(runArea + RunLayout.immediateExit) != 0 }
        set { clinux_atomic_store_u8(runArea + RunLayout.immediateExit, newValue ? 1 : 0) }
    }

    public func clearImmediateExit() { immediateExit = false }

    /// The signal used by `kick()`: SIGRTMIN.
    public static let kickSignal: Int32 = clinux_sigrtmin()

    private static let handlerInstalled: Int32 = {
        clinux_install_noop_handler(VCPU.kickSignal) == 0 ? 0 : errno
    }()

    /// Call on the thread that will call `run()`: blocks the kick signal in this thread and
    /// unblocks it only inside KVM_RUN (KVM_SET_SIGNAL_MASK). `kick()` then targets this thread.
    public func enableKick() throws {
        if Self.handlerInstalled != 0 { throw KVMError.system(call: "sigaction", errno: Self.handlerInstalled) }
        var only = sigset_t()
        clinux_sigset_with_only(&only, Self.kickSignal)
        var previous = sigset_t()
        let e = pthread_sigmask(SIG_BLOCK, &only, &previous)
        if e != 0 { throw KVMError.system(call: "pthread_sigmask", errno: e) }
        // The mask inside KVM_RUN: what the thread had, minus the kick signal.
        var inside = previous
        clinux_sigdelset(&inside, Self.kickSignal)
        do { try setSignalMask(inside) } catch {
            pthread_sigmask(SIG_SETMASK, &previous, nil)
            throw error
        }
        kickTarget.withLock {
            $0.thread = pthread_self()
            $0.maskBefore = previous
        }
    }

    /// Call on the same thread as `enableKick()`, before it stops running the vCPU (and before
    /// it exits): `kick()` stops signalling it, a kick signal still pending is consumed, and
    /// the thread's signal mask is restored. immediate_exit is left as it is.
    public func disableKick() {
        var restore = kickTarget.withLock { k -> sigset_t? in
            defer { k = KickTarget() }
            guard let t = k.thread, pthread_equal(t, pthread_self()) != 0 else { return nil }
            return k.maskBefore
        }
        // No kick can signal this thread any more (kick() signals under the lock).
        while clinux_consume_pending_signal(Self.kickSignal) > 0 {}
        if restore != nil { pthread_sigmask(SIG_SETMASK, &restore!, nil) }
    }

    /// Runs `body` with the kick enabled on the calling thread, disabling it afterwards.
    public func withKickEnabled<T>(_ body: () throws -> T) throws -> T {
        try enableKick()
        defer { disableKick() }
        return try body()
    }

    /// Makes the vCPU leave (or not enter) KVM_RUN with `.interrupted`, from any thread.
    /// Leaves immediate_exit set: clear it with `clearImmediateExit()` to run again.
    public func kick() {
        immediateExit = true
        kickTarget.withLock {
            if let t = $0.thread { _ = pthread_kill(t, Self.kickSignal) }
        }
    }

    private func consumeKickSignal() {
        // Only relevant on a kick-enabled thread (where the signal is blocked outside KVM_RUN).
        guard kickTarget.withLock({ $0.thread.map { pthread_equal($0, pthread_self()) != 0 } ?? false }) else { return }
        while clinux_consume_pending_signal(Self.kickSignal) > 0 {}
    }

    /// KVM_SET_SIGNAL_MASK: the signal mask in effect while this vCPU is inside KVM_RUN.
    public func setSignalMask(_ mask: sigset_t) throws {
        // struct kvm_signal_mask { __u32 len; __u8 sigset[]; } with the kernel's 8-byte sigset.
        var buf = [UInt8](repeating: 0, count: 4 + 8)
        buf.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt32(8), as: UInt32.self)
            withUnsafeBytes(of: mask) { m in
                for i in 0..<8 { b[4 + i] = m[i] }
            }
        }
        let r = buf.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_KVM_SET_SIGNAL_MASK(), $0.baseAddress) }
        if r < 0 { throw KVMError.ioctl(name: "KVM_SET_SIGNAL_MASK", errno: errno) }
    }

    // MARK: state

    private func get<T>(_ req: UInt, _ name: String, _ value: T) throws -> T {
        var v = value
        let r = withUnsafeMutableBytes(of: &v) { clinux_ioctl_ptr(fd, req, $0.baseAddress) }
        if r < 0 { throw KVMError.ioctl(name: name, errno: errno) }
        return v
    }

    private func set<T>(_ req: UInt, _ name: String, _ value: T) throws {
        var v = value
        let r = withUnsafeMutableBytes(of: &v) { clinux_ioctl_ptr(fd, req, $0.baseAddress) }
        if r < 0 { throw KVMError.ioctl(name: name, errno: errno) }
    }

    public func getRegs() throws -> kvm_regs { try get(clinux_KVM_GET_REGS(), "KVM_GET_REGS", kvm_regs()) }
    public func setRegs(_ r: kvm_regs) throws { try set(clinux_KVM_SET_REGS(), "KVM_SET_REGS", r) }
    public func getSregs() throws -> kvm_sregs { try get(clinux_KVM_GET_SREGS(), "KVM_GET_SREGS", kvm_sregs()) }
    public func setSregs(_ s: kvm_sregs) throws { try set(clinux_KVM_SET_SREGS(), "KVM_SET_SREGS", s) }
    public func getFPU() throws -> kvm_fpu { try get(clinux_KVM_GET_FPU(), "KVM_GET_FPU", kvm_fpu()) }
    public func setFPU(_ f: kvm_fpu) throws { try set(clinux_KVM_SET_FPU(), "KVM_SET_FPU", f) }

    public func getLAPIC() throws -> LAPICState {
        LAPICState(raw: try get(clinux_KVM_GET_LAPIC(), "KVM_GET_LAPIC", kvm_lapic_state()))
    }
    public func setLAPIC(_ s: LAPICState) throws { try set(clinux_KVM_SET_LAPIC(), "KVM_SET_LAPIC", s.raw) }

    /// Size of the XSAVE buffer for this VM: KVM_CAP_XSAVE2 on the VM fd, else 4096 (struct kvm_xsave).
    public var xsaveSize: Int { max(4096, vm.checkExtension(.xsave2)) }

    /// KVM_GET_XSAVE2 (or KVM_GET_XSAVE): the guest's XSAVE image; bytes 0..<512 are the
    /// legacy FXSAVE area (FCW at 0, MXCSR at 24).
    public func getXSAVE() throws -> [UInt8] {
        let size = xsaveSize
        var buf = [UInt8](repeating: 0, count: size)
        let (req, name) = vm.checkExtension(.xsave2) > 0 ? (clinux_KVM_GET_XSAVE2(), "KVM_GET_XSAVE2") : (clinux_KVM_GET_XSAVE(), "KVM_GET_XSAVE")
        let r = buf.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, req, $0.baseAddress) }
        if r < 0 { throw KVMError.ioctl(name: name, errno: errno) }
        return buf
    }

    /// KVM_SET_XSAVE with an image from `getXSAVE()`.
    public func setXSAVE(_ image: [UInt8]) throws {
        guard image.count >= xsaveSize else { throw KVMError.invalidArgument("XSAVE image of \(image.count) bytes, KVM needs \(xsaveSize)") }
        var buf = image
        let r = buf.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_KVM_SET_XSAVE(), $0.baseAddress) }
        if r < 0 { throw KVMError.ioctl(name: "KVM_SET_XSAVE", errno: errno) }
    }

    /// MXCSR. KVM_GET_FPU/KVM_SET_FPU ignore kvm_fpu.mxcsr (always 0 on read), so this goes
    /// through the XSAVE image (legacy area offset 24).
    public func getMXCSR() throws -> UInt32 {
        let x = try getXSAVE()
        return x.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self) }
    }

    /// Sets MXCSR in the XSAVE image. KVM only takes MXCSR from an image whose header
    /// (XSTATE_BV at offset 512) has SSE or AVX state, so the SSE bit is set too: XMM
    /// registers then come from the image, which holds their current values.
    public func setMXCSR(_ value: UInt32) throws {
        var x = try getXSAVE()
        x.withUnsafeMutableBytes { b in
            b.storeBytes(of: value.littleEndian, toByteOffset: 24, as: UInt32.self)
            let bv = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 512, as: UInt64.self))
            b.storeBytes(of: (bv | 2).littleEndian, toByteOffset: 512, as: UInt64.self)
        }
        try setXSAVE(x)
    }

    /// KVM_GET_MP_STATE (KVM_MP_STATE_RUNNABLE = 0, UNINITIALIZED = 1, HALTED = 3, ...).
    public func getMPState() throws -> UInt32 {
        try get(clinux_KVM_GET_MP_STATE(), "KVM_GET_MP_STATE", kvm_mp_state()).mp_state
    }
    public func setMPState(_ state: UInt32) throws {
        var s = kvm_mp_state(); s.mp_state = state
        try set(clinux_KVM_SET_MP_STATE(), "KVM_SET_MP_STATE", s)
    }

    /// KVM_SET_CPUID2.
    public func setCPUID(_ entries: [CPUIDEntry]) throws {
        let header = MemoryLayout<kvm_cpuid2>.size
        let stride = MemoryLayout<kvm_cpuid_entry2>.stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: header + max(1, entries.count) * stride, alignment: 8)
        defer { buf.deallocate() }
        memset(buf, 0, header + max(1, entries.count) * stride)
        buf.storeBytes(of: UInt32(entries.count), as: UInt32.self)
        let out = (buf + header).bindMemory(to: kvm_cpuid_entry2.self, capacity: entries.count)
        for (i, e) in entries.enumerated() {
            var k = kvm_cpuid_entry2()
            k.function = e.function; k.index = e.index; k.flags = e.flags
            k.eax = e.eax; k.ebx = e.ebx; k.ecx = e.ecx; k.edx = e.edx
            out[i] = k
        }
        if clinux_ioctl_ptr(fd, clinux_KVM_SET_CPUID2(), buf) < 0 { throw KVMError.ioctl(name: "KVM_SET_CPUID2", errno: errno) }
    }

    /// KVM_GET_CPUID2: what was set with KVM_SET_CPUID2.
    public func getCPUID() throws -> [CPUIDEntry] {
        try cpuidIoctl(fd, clinux_KVM_GET_CPUID2(), "KVM_GET_CPUID2", initialCapacity: 256)
    }

    /// KVM_SET_MSRS. Throws naming the first MSR KVM refused.
    public func setMSRs(_ entries: [(index: UInt32, value: UInt64)]) throws {
        if entries.isEmpty { return }
        let done = try msrIoctl(clinux_KVM_SET_MSRS(), "KVM_SET_MSRS", entries.map { ($0.index, $0.value) }, readBack: nil)
        if done < entries.count {
            throw KVMError.msrRefused(index: entries[done].index, done: done, total: entries.count)
        }
    }

    /// KVM_GET_MSRS for `indices`. Throws naming the first MSR KVM refused.
    public func getMSRs(_ indices: [UInt32]) throws -> [(index: UInt32, value: UInt64)] {
        if indices.isEmpty { return [] }
        var values: [UInt64] = []
        let done = try msrIoctl(clinux_KVM_GET_MSRS(), "KVM_GET_MSRS", indices.map { ($0, 0) }, readBack: &values)
        if done < indices.count {
            throw KVMError.msrRefused(index: indices[done], done: done, total: indices.count)
        }
        return zip(indices, values).map { (index: $0, value: $1) }
    }

    private func msrIoctl(_ req: UInt, _ name: String, _ entries: [(UInt32, UInt64)], readBack: UnsafeMutablePointer<[UInt64]>?) throws -> Int {
        // struct kvm_msrs { __u32 nmsrs, pad; struct kvm_msr_entry { __u32 index, reserved; __u64 data; } entries[]; }
        let header = MemoryLayout<kvm_msrs>.size
        let stride = MemoryLayout<kvm_msr_entry>.stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: header + entries.count * stride, alignment: 8)
        defer { buf.deallocate() }
        memset(buf, 0, header + entries.count * stride)
        buf.storeBytes(of: UInt32(entries.count), as: UInt32.self)
        for (i, e) in entries.enumerated() {
            buf.storeBytes(of: e.0, toByteOffset: header + i * stride, as: UInt32.self)
            buf.storeBytes(of: e.1, toByteOffset: header + i * stride + 8, as: UInt64.self)
        }
        let r = clinux_ioctl_ptr(fd, req, buf)
        if r < 0 { throw KVMError.ioctl(name: name, errno: errno) }
        if let rb = readBack {
            rb.pointee = (0..<entries.count).map { buf.load(fromByteOffset: header + $0 * stride + 8, as: UInt64.self) }
        }
        return Int(r)
    }
}
