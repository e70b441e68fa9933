// /dev/kvm: the system-wide KVM handle, capability checks and host classification.
import Glibc
import CLinux
import OS

/// A KVM capability: its KVM_CAP_* number and name (for error messages).
public struct Capability: Hashable, Sendable, CustomStringConvertible {
    public let name: String
    public let rawValue: Int32
    public init(_ name: String, _ rawValue: Int32) { self.name = name; self.rawValue = rawValue }
    public var description: String { name }

    public static let irqchip = Capability("KVM_CAP_IRQCHIP", KVM_CAP_IRQCHIP)
    public static let hlt = Capability("KVM_CAP_HLT", KVM_CAP_HLT)
    public static let userMemory = Capability("KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY)
    public static let setTSSAddr = Capability("KVM_CAP_SET_TSS_ADDR", KVM_CAP_SET_TSS_ADDR)
    public static let setIdentityMapAddr = Capability("KVM_CAP_SET_IDENTITY_MAP_ADDR", KVM_CAP_SET_IDENTITY_MAP_ADDR)
    public static let pit2 = Capability("KVM_CAP_PIT2", KVM_CAP_PIT2)
    public static let pitState2 = Capability("KVM_CAP_PIT_STATE2", KVM_CAP_PIT_STATE2)
    public static let irqfd = Capability("KVM_CAP_IRQFD", KVM_CAP_IRQFD)
    public static let readonlyMem = Capability("KVM_CAP_READONLY_MEM", KVM_CAP_READONLY_MEM)
    public static let irqfdResample = Capability("KVM_CAP_IRQFD_RESAMPLE", KVM_CAP_IRQFD_RESAMPLE)
    public static let ioeventfd = Capability("KVM_CAP_IOEVENTFD", KVM_CAP_IOEVENTFD)
    public static let extCPUID = Capability("KVM_CAP_EXT_CPUID", KVM_CAP_EXT_CPUID)
    public static let mpState = Capability("KVM_CAP_MP_STATE", KVM_CAP_MP_STATE)
    public static let immediateExit = Capability("KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT)
    public static let irqRouting = Capability("KVM_CAP_IRQ_ROUTING", KVM_CAP_IRQ_ROUTING)
    public static let signalMSI = Capability("KVM_CAP_SIGNAL_MSI", KVM_CAP_SIGNAL_MSI)
    public static let tscDeadlineTimer = Capability("KVM_CAP_TSC_DEADLINE_TIMER", KVM_CAP_TSC_DEADLINE_TIMER)
    public static let x2apicAPI = Capability("KVM_CAP_X2APIC_API", KVM_CAP_X2APIC_API)
    public static let nrVCPUs = Capability("KVM_CAP_NR_VCPUS", KVM_CAP_NR_VCPUS)
    public static let maxVCPUs = Capability("KVM_CAP_MAX_VCPUS", KVM_CAP_MAX_VCPUS)
    public static let maxVCPUID = Capability("KVM_CAP_MAX_VCPU_ID", KVM_CAP_MAX_VCPU_ID)
    public static let nrMemslots = Capability("KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS)
    public static let getTSCKHz = Capability("KVM_CAP_GET_TSC_KHZ", KVM_CAP_GET_TSC_KHZ)
    public static let adjustClock = Capability("KVM_CAP_ADJUST_CLOCK", KVM_CAP_ADJUST_CLOCK)
    public static let vcpuEvents = Capability("KVM_CAP_VCPU_EVENTS", KVM_CAP_VCPU_EVENTS)
    public static let xsave = Capability("KVM_CAP_XSAVE", KVM_CAP_XSAVE)
    public static let xcrs = Capability("KVM_CAP_XCRS", KVM_CAP_XCRS)
    public static let xsave2 = Capability("KVM_CAP_XSAVE2", KVM_CAP_XSAVE2)
    public static let syncMMU = Capability("KVM_CAP_SYNC_MMU", KVM_CAP_SYNC_MMU)
    /// The coalesced-I/O ring's page offset in the vCPU mapping (0: none).
    public static let coalescedMMIO = Capability("KVM_CAP_COALESCED_MMIO", KVM_CAP_COALESCED_MMIO)
    public static let coalescedPIO = Capability("KVM_CAP_COALESCED_PIO", KVM_CAP_COALESCED_PIO)

    /// Every capability above (for diagnostics).
    public static let all: [Capability] = [
        irqchip, hlt, userMemory, setTSSAddr, setIdentityMapAddr, pit2, pitState2, irqfd, irqfdResample, ioeventfd,
        extCPUID, mpState, immediateExit, irqRouting, signalMSI, tscDeadlineTimer, x2apicAPI,
        nrVCPUs, maxVCPUs, maxVCPUID, nrMemslots, getTSCKHz, adjustClock, vcpuEvents, xsave, xsave2, xcrs, syncMMU,
        coalescedMMIO, coalescedPIO,
    ]

    /// What swiftlet needs to boot a Linux guest with an in-kernel irqchip, PIT and virtio.
    public static let requiredForLinux: [Capability] = [
        irqchip, userMemory, setTSSAddr, setIdentityMapAddr, pit2, irqfd, irqfdResample, ioeventfd,
        extCPUID, mpState, immediateExit,
    ]
}

/// One CPUID leaf as KVM describes it (struct kvm_cpuid_entry2 without padding).
public struct CPUIDEntry: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var function: UInt32
    public var index: UInt32
    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX (1) when `index` (the subleaf, ECX) matters.
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0,
                eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    public static let significantIndex: UInt32 = 1  // KVM_CPUID_FLAG_SIGNIFCANT_INDEX

    public var description: String {
        func h(_ v: UInt32) -> String { let s = String(v, radix: 16); return String(repeating: "0", count: 8 - s.count) + s }
        return "\(h(function)).\(index): \(h(eax)) \(h(ebx)) \(h(ecx)) \(h(edx))"
    }
}

/// The KVM system handle (/dev/kvm). Owns its file descriptor.
public final class Hypervisor: Sendable {
    public let fd: Int32
    public let path: String

    /// Opens /dev/kvm read-write and checks the API version is 12.
    public init(path: String = "/dev/kvm") throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw KVMError.open(path: path, errno: errno) }
        self.fd = fd
        self.path = path
        let v = clinux_ioctl_none(fd, clinux_KVM_GET_API_VERSION())
        guard v >= 0 else { let e = errno; close(fd); throw KVMError.ioctl(name: "KVM_GET_API_VERSION", errno: e) }
        guard v == KVM_API_VERSION else { close(fd); throw KVMError.apiVersion(v) }
    }

    deinit { close(fd) }

    /// KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent (or on error), otherwise a positive value.
    public func checkExtension(_ cap: Capability) -> Int {
        Int(max(0, clinux_ioctl_int(fd, clinux_KVM_CHECK_EXTENSION(), UInt(cap.rawValue))))
    }

    public func has(_ cap: Capability) -> Bool { checkExtension(cap) > 0 }

    /// Throws `KVMError.missingCapabilities` naming every capability that is absent.
    public func requireCapabilities(_ caps: [Capability] = Capability.requiredForLinux) throws {
        let missing = caps.filter { !has($0) }.map(\.name)
        if !missing.isEmpty { throw KVMError.missingCapabilities(missing) }
    }

    /// Size of the per-vCPU kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
    public func vcpuMmapSize() throws -> Int {
        let r = clinux_ioctl_none(fd, clinux_KVM_GET_VCPU_MMAP_SIZE())
        guard r > 0 else { throw KVMError.ioctl(name: "KVM_GET_VCPU_MMAP_SIZE", errno: r < 0 ? errno : EINVAL) }
        return Int(r)
    }

    /// Recommended vCPU count (KVM_CAP_NR_VCPUS), at least 4 when KVM does not say (per KVM docs).
    public var recommendedVCPUs: Int { let n = checkExtension(.nrVCPUs); return n > 0 ? n : 4 }
    /// Maximum vCPUs per VM (KVM_CAP_MAX_VCPUS, falling back to KVM_CAP_NR_VCPUS per KVM docs).
    public var maxVCPUs: Int { let n = checkExtension(.maxVCPUs); return n > 0 ? n : recommendedVCPUs }
    /// vCPU ids must be below this (KVM_CAP_MAX_VCPU_ID, falling back to maxVCPUs per KVM docs).
    public var maxVCPUID: Int { let n = checkExtension(.maxVCPUID); return n > 0 ? n : maxVCPUs }

    /// KVM_GET_SUPPORTED_CPUID, growing the buffer (from `initialCapacity` entries) while KVM
    /// answers E2BIG.
    public func supportedCPUID(initialCapacity: Int = 128) throws -> [CPUIDEntry] {
        try cpuidIoctl(fd, clinux_KVM_GET_SUPPORTED_CPUID(), "KVM_GET_SUPPORTED_CPUID", initialCapacity: initialCapacity)
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves/restores and emulates for guests.
    public func msrIndexList() throws -> [UInt32] {
        var probe: (UInt32, UInt32) = (0, 0)
        if clinux_ioctl_ptr(fd, clinux_KVM_GET_MSR_INDEX_LIST(), &probe) == 0 { return [] }
        guard errno == E2BIG else { throw KVMError.ioctl(name: "KVM_GET_MSR_INDEX_LIST", errno: errno) }
        var n = Int(probe.0)
        while true {
            var buf = [UInt32](repeating: 0, count: 1 + n)
            buf[0] = UInt32(n)
            let r = buf.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_KVM_GET_MSR_INDEX_LIST(), $0.baseAddress) }
            if r < 0 {
                if errno == E2BIG && n < 1 << 16 { n = max(Int(buf[0]), n * 2); continue }
                throw KVMError.ioctl(name: "KVM_GET_MSR_INDEX_LIST", errno: errno)
            }
            let got = min(Int(buf[0]), n)
            return Array(buf[1..<(1 + got)])
        }
    }

    /// KVM_CREATE_VM.
    public func createVM() throws -> VirtualMachine { try VirtualMachine(hypervisor: self) }
}

func readCPUIDEntries(_ p: UnsafeRawPointer, count n: Int) -> [CPUIDEntry] {
    let entries = p.bindMemory(to: kvm_cpuid_entry2.self, capacity: n)
    return (0..<n).map { i in
        let e = entries[i]
        return CPUIDEntry(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
    }
}

/// Classifies the host's KVM without creating a VM.
public enum HostStatus: Equatable, Sendable {
    /// /dev/kvm opens read-write and this is not a PVM host.
    case usable
    /// The device node does not exist.
    case missing(path: String)
    /// The device exists but this user may not open it (EACCES/EPERM).
    case noPermission(path: String)
    /// The host KVM is PVM (kvm_pvm loaded): it runs only PVM-enabled guest kernels.
    case pvmHost
    /// Opening the device failed for another reason.
    case openFailed(path: String, errno: Int32)

    public var isUsable: Bool { self == .usable }

    /// One line naming the problem and the way out.
    public var message: String {
        switch self {
        case .usable:
            return "KVM is usable"
        case let .missing(p):
            return "\(p) does not exist: KVM is not available here (enable virtualization and load kvm_intel or kvm_amd), or use scripts/testbed"
        case let .noPermission(p):
            return "\(p) is not accessible: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root"
        case .pvmHost:
            return "this host's KVM is PVM (kvm_pvm is loaded): it cannot run an unmodified Linux kernel; use scripts/testbed"
        case let .openFailed(p, e):
            return "cannot open \(p): \(errnoText(e)); check that KVM works on this host, or use scripts/testbed"
        }
    }
}

public enum HostCheck {
    /// Checks, in order: the device exists, it opens O_RDWR, the host is not PVM.
    /// `opened`: the device was already opened O_RDWR (a `Hypervisor` exists): only PVM is checked.
    public static func classify(device: String = "/dev/kvm", pvmMarker: String = "/sys/module/kvm_pvm",
                                opened: Bool = false) -> HostStatus {
        if opened { return access(pvmMarker, F_OK) == 0 ? .pvmHost : .usable }
        var st = stat()
        if stat(device, &st) != 0 {
            let e = errno
            return e == ENOENT || e == ENOTDIR ? .missing(path: device) : (e == EACCES ? .noPermission(path: device) : .openFailed(path: device, errno: e))
        }
        let fd = open(device, O_RDWR | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            return e == EACCES || e == EPERM ? .noPermission(path: device) : .openFailed(path: device, errno: e)
        }
        close(fd)
        if access(pvmMarker, F_OK) == 0 { return .pvmHost }
        return .usable
    }
}

/// A kvm_cpuid2-returning ioctl (KVM_GET_SUPPORTED_CPUID, KVM_GET_CPUID2), growing the
/// buffer from `initialCapacity` entries while KVM answers E2BIG.
func cpuidIoctl(_ fd: Int32, _ request: UInt, _ name: String, initialCapacity: Int) throws -> [CPUIDEntry] {
    var capacity = max(1, initialCapacity)
    let header = MemoryLayout<kvm_cpuid2>.size
    let stride = MemoryLayout<kvm_cpuid_entry2>.stride
    while true {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: header + capacity * stride, alignment: 8)
        defer { buf.deallocate() }
        memset(buf, 0, header + capacity * stride)
        buf.storeBytes(of: UInt32(capacity), as: UInt32.self)
        if clinux_ioctl_ptr(fd, request, buf) < 0 {
            let e = errno
            if e == E2BIG && capacity < 65536 { capacity *= 2; continue }
            throw KVMError.ioctl(name: name, errno: e)
        }
        let n = Int(buf.load(as: UInt32.self))
        guard n <= capacity else { throw KVMError.badRunData("\(name) returned \(n) > \(capacity) entries") }
        return readCPUIDEntries(buf + header, count: n)
    }
}
