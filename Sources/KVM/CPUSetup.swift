// Register-side setup of a vCPU for a Linux guest: CPUID, MSRs, FPU, LAPIC, long-mode entry.
// The pure parts (CPUID fix-up, MSR selection, sregs/regs values) are testable without KVM.
// Guest memory contents (page tables, GDT, zero page) are written by the Boot module at the
// addresses in docs/DESIGN.md; `LongModeBoot` holds the matching register values.
import CLinux

// MARK: CPUID

public enum CPUIDSetup {
    /// Number of APIC-ID bits needed for `count` contiguous ids (0 for one vCPU).
    public static func idBits(_ count: UInt32) -> UInt32 {
        count <= 1 ? 0 : UInt32(32 - (count - 1).leadingZeroBitCount)
    }

    /// The CPUID table for vCPU `vcpuID` of `vcpuCount`, from KVM_GET_SUPPORTED_CPUID.
    ///
    /// Topology presented: one package, one socket, `vcpuCount` cores, one thread per core;
    /// APIC ID = x2APIC ID = vCPU id. Changes (only to leaves present in `supported`):
    /// - leaf 1: EBX[31:24] initial APIC ID, EBX[23:16] logical processor count, EDX.HTT when
    ///   more than one vCPU; ECX.hypervisor (bit 31) set; ECX.TSC-deadline (bit 24) set when
    ///   `tscDeadlineTimer` and cleared otherwise. Older kernels leave that bit out of
    ///   KVM_GET_SUPPORTED_CPUID and advertise KVM_CAP_TSC_DEADLINE_TIMER instead (as QEMU and
    ///   cloud-hypervisor do, pass true only with that capability and the in-kernel irqchip).
    /// - leaf 4 (Intel caches): EAX[31:26] cores per package - 1, EAX[25:14] threads sharing
    ///   the cache - 1 (L1/L2: one core; L3 and up: the whole package).
    /// - leaves 0xB and 0x1F: replaced by subleaf 0 (SMT: shift 0, 1 thread), subleaf 1
    ///   (core: shift idBits, vcpuCount), subleaf 2 (invalid); EDX = this vCPU's x2APIC ID.
    /// - AMD 0x80000001: ECX.CmpLegacy (bit 1) when more than one vCPU.
    /// - AMD 0x80000008: ECX[7:0] cores - 1, ECX[15:12] APIC ID size = idBits.
    /// - AMD 0x8000001D: EAX[25:14] like leaf 4. AMD 0x8000001E: EAX extended APIC ID,
    ///   EBX[7:0] core (compute unit) id, EBX[15:8] threads per core - 1 = 0, ECX node 0.
    /// - KVM's own leaves (0x40000000...) are left exactly as KVM gives them.
    public static func fixUp(_ supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: UInt32,
                             tscDeadlineTimer: Bool) -> [CPUIDEntry] {
        let count = max(1, vcpuCount)
        let bits = idBits(count)
        let addressable = (UInt32(1) << bits) - 1  // max addressable ids - 1 in the package
        var out: [CPUIDEntry] = []
        var topologyLeavesDone: Set<UInt32> = []
        for var e in supported {
            switch e.function {
            case 1:
                e.ebx = (e.ebx & 0x0000_ffff) | ((vcpuID & 0xff) << 24) | (min(count, 255) << 16)
                if count > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(UInt32(1) << 28) }
                e.ecx |= 1 << 31
                if tscDeadlineTimer { e.ecx |= 1 << 24 } else { e.ecx &= ~(UInt32(1) << 24) }
            case 4:
                let level = (e.eax >> 5) & 7
                if e.eax & 0x1f != 0 {  // a real cache (type != 0)
                    let sharing = level >= 3 ? min(addressable, 0xfff) : 0
                    e.eax = (e.eax & 0x3fff) | (min(addressable, 63) << 26) | (sharing << 14)
                } else {
                    e.eax = 0
                }
            case 0xb, 0x1f:
                if topologyLeavesDone.insert(e.function).inserted {
                    out += topologyLeaf(e.function, vcpuID: vcpuID, count: count)
                }
                continue
            case 0x8000_0001:
                if count > 1 { e.ecx |= 1 << 1 } else { e.ecx &= ~(UInt32(1) << 1) }
            case 0x8000_0008:
                e.ecx = (e.ecx & ~UInt32(0xf0ff)) | ((bits & 0xf) << 12) | ((count - 1) & 0xff)
            case 0x8000_001d:
                let level = (e.eax >> 5) & 7
                if e.eax & 0x1f != 0 {
                    let sharing = level >= 3 ? min(addressable, 0xfff) : 0
                    e.eax = (e.eax & ~(UInt32(0xfff) << 14)) | (sharing << 14)
                }
            case 0x8000_001e:
                e.eax = vcpuID
                e.ebx = (e.ebx & ~UInt32(0xffff)) | (vcpuID & 0xff)
                e.ecx = 0
                e.edx = 0
            default:
                break
            }
            out.append(e)
        }
        return out
    }

    /// Leaf 0xB / 0x1F subleaves 0-2 for one package of `count` single-thread cores.
    public static func topologyLeaf(_ function: UInt32, vcpuID: UInt32, count: UInt32) -> [CPUIDEntry] {
        let f = CPUIDEntry.significantIndex
        return [
            CPUIDEntry(function: function, index: 0, flags: f, eax: 0, ebx: 1, ecx: (1 << 8) | 0, edx: vcpuID),
            CPUIDEntry(function: function, index: 1, flags: f, eax: idBits(count), ebx: count, ecx: (2 << 8) | 1, edx: vcpuID),
            CPUIDEntry(function: function, index: 2, flags: f, eax: 0, ebx: 0, ecx: 2, edx: vcpuID),
        ]
    }

    /// Leaf 1 EDX bit 12: the CPU has MTRRs.
    public static func hasMTRR(_ entries: [CPUIDEntry]) -> Bool {
        entries.first { $0.function == 1 }.map { $0.edx & (1 << 12) != 0 } ?? false
    }
}

// MARK: MSRs

public enum MSRSetup {
    public static let IA32_TSC: UInt32 = 0x10
    public static let IA32_SYSENTER_CS: UInt32 = 0x174
    public static let IA32_SYSENTER_ESP: UInt32 = 0x175
    public static let IA32_SYSENTER_EIP: UInt32 = 0x176
    public static let IA32_MISC_ENABLE: UInt32 = 0x1a0
    public static let MTRRdefType: UInt32 = 0x2ff
    public static let STAR: UInt32 = 0xc000_0081
    public static let LSTAR: UInt32 = 0xc000_0082
    public static let CSTAR: UInt32 = 0xc000_0083
    public static let SYSCALL_MASK: UInt32 = 0xc000_0084
    public static let KERNEL_GS_BASE: UInt32 = 0xc000_0102

    /// IA32_MISC_ENABLE bit 0: fast string operations.
    public static let miscEnableFastStrings: UInt64 = 1
    /// MTRRdefType: E (bit 11) with default type 6 (write-back).
    public static let mtrrDefTypeWriteBack: UInt64 = (1 << 11) | 6

    /// Every MSR swiftlet sets before boot, in order, with its value.
    public static let bootValues: [(index: UInt32, value: UInt64)] = [
        (IA32_SYSENTER_CS, 0), (IA32_SYSENTER_ESP, 0), (IA32_SYSENTER_EIP, 0),
        (STAR, 0), (LSTAR, 0), (CSTAR, 0), (KERNEL_GS_BASE, 0), (SYSCALL_MASK, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, miscEnableFastStrings),
        (MTRRdefType, mtrrDefTypeWriteBack),
    ]

    /// The boot MSRs KVM says it handles: those in `available` (KVM_GET_MSR_INDEX_LIST).
    /// One exception: MTRRdefType is never in that list (KVM emulates MTRRs whenever the
    /// guest CPUID has MTRR, as QEMU assumes too), so it is kept when `mtrr` is true.
    public static func bootMSRs(available: [UInt32], mtrr: Bool) -> [(index: UInt32, value: UInt64)] {
        let set = Set(available)
        return bootValues.filter { set.contains($0.index) || (mtrr && $0.index == MTRRdefType) }
    }
}

// MARK: FPU

public enum FPUSetup {
    public static let fcw: UInt16 = 0x37f
    public static let mxcsr: UInt32 = 0x1f80

    /// FNINIT-like state: x87 control word 0x37f, MXCSR 0x1f80, everything else zero.
    /// Note KVM_SET_FPU ignores `mxcsr`; `VCPU.setupFPU()` sets it through XSAVE.
    public static func bootFPU() -> kvm_fpu {
        var f = kvm_fpu()
        f.fcw = fcw
        f.mxcsr = mxcsr
        return f
    }
}

// MARK: Long mode / real mode entry

/// Register values for entering a 64-bit Linux kernel (boot protocol 64-bit entry), in one
/// place. Defaults match docs/DESIGN.md: GDT at 0x500 (null, null, code 0x10, data 0x18),
/// IDT at 0x520 with limit 0, PML4 at 0x9000, zero page at 0x7000.
public struct LongModeBoot: Equatable {
    public var entry: UInt64
    public var bootParams: UInt64 = 0x7000
    /// Initial RSP (and RBP): below the PML4, above the zero page.
    public var stackPointer: UInt64 = 0x8ff0
    public var pml4: UInt64 = 0x9000
    public var gdtBase: UInt64 = 0x500
    public var gdtLimit: UInt16 = 4 * 8 - 1
    public var idtBase: UInt64 = 0x520
    public var idtLimit: UInt16 = 0
    public var codeSelector: UInt16 = 0x10
    public var dataSelector: UInt16 = 0x18

    public init(entry: UInt64) { self.entry = entry }

    public static let CR0_PE: UInt64 = 1 << 0
    public static let CR0_ET: UInt64 = 1 << 4
    public static let CR0_NE: UInt64 = 1 << 5
    public static let CR0_PG: UInt64 = 1 << 31
    public static let CR4_PAE: UInt64 = 1 << 5
    public static let EFER_LME: UInt64 = 1 << 8
    public static let EFER_LMA: UInt64 = 1 << 10

    /// CR0 = PE | ET | NE | PG (caches enabled: CD/NW clear; WP is the kernel's business).
    public static let cr0: UInt64 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    /// CR4 = PAE.
    public static let cr4: UInt64 = CR4_PAE
    /// EFER = LME | LMA (the kernel sets SCE and NX itself).
    public static let efer: UInt64 = EFER_LME | EFER_LMA
    /// RFLAGS = 2 (reserved bit 1; interrupts off).
    public static let rflags: UInt64 = 2

    /// GDT descriptors matching the segments below: base 0, limit 0xfffff, G=1.
    /// Code: type 0xb (execute/read, accessed), S=1, P=1, L=1, D=0. Data: type 3, S=1, P=1, D/B=1.
    public static let codeDescriptor: UInt64 = 0x00af_9b00_0000_ffff
    public static let dataDescriptor: UInt64 = 0x00cf_9300_0000_ffff

    /// The flat 64-bit code segment as KVM wants it (limit in bytes: 0xfffff pages = 0xffffffff).
    public var codeSegment: kvm_segment {
        var s = kvm_segment()
        s.base = 0; s.limit = 0xffff_ffff; s.selector = codeSelector
        s.type = 0xb; s.present = 1; s.dpl = 0; s.db = 0; s.s = 1; s.l = 1; s.g = 1; s.avl = 0; s.unusable = 0
        return s
    }

    /// The flat data segment (DS, ES, FS, GS, SS).
    public var dataSegment: kvm_segment {
        var s = kvm_segment()
        s.base = 0; s.limit = 0xffff_ffff; s.selector = dataSelector
        s.type = 3; s.present = 1; s.dpl = 0; s.db = 1; s.s = 1; s.l = 0; s.g = 1; s.avl = 0; s.unusable = 0
        return s
    }

    /// Sets segments, descriptor tables, CR0/CR3/CR4 and EFER; TR, LDT and the rest keep
    /// KVM's reset values (TR is a usable busy TSS there, as VMX requires).
    public func apply(to s: inout kvm_sregs) {
        s.cs = codeSegment
        let d = dataSegment
        s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
        s.gdt.base = gdtBase; s.gdt.limit = gdtLimit
        s.idt.base = idtBase; s.idt.limit = idtLimit
        s.cr0 = Self.cr0
        s.cr3 = pml4
        s.cr4 = Self.cr4
        s.efer = Self.efer
    }

    /// All general registers zero except RIP = entry, RSI = zero page, RSP = RBP = stack, RFLAGS = 2.
    public func apply(to r: inout kvm_regs) {
        r = kvm_regs()
        r.rip = entry
        r.rsi = bootParams
        r.rsp = stackPointer
        r.rbp = stackPointer
        r.rflags = Self.rflags
    }
}

/// Real mode at `segment:ip` (for tests and tiny guests). Only CS, the stack and RIP change;
/// the other segments keep KVM's reset values (base 0, limit 0xffff).
public struct RealModeBoot: Equatable {
    public var segment: UInt16 = 0
    public var ip: UInt16
    public var sp: UInt16 = 0

    public init(segment: UInt16 = 0, ip: UInt16, sp: UInt16 = 0) {
        self.segment = segment; self.ip = ip; self.sp = sp
    }

    public func apply(to s: inout kvm_sregs) {
        s.cs.selector = segment
        s.cs.base = UInt64(segment) << 4
        s.ss.selector = 0
        s.ss.base = 0
        s.cr0 &= ~LongModeBoot.CR0_PE
    }

    public func apply(to r: inout kvm_regs) {
        r = kvm_regs()
        r.rip = UInt64(ip)
        r.rsp = UInt64(sp)
        r.rflags = 2
    }
}

// MARK: applying to a vCPU

extension VCPU {
    /// KVM_SET_CPUID2 with `CPUIDSetup.fixUp` of `supported` for this vCPU.
    public func setupCPUID(supported: [CPUIDEntry], vcpuCount: UInt32, tscDeadlineTimer: Bool) throws {
        try setCPUID(CPUIDSetup.fixUp(supported, vcpuID: id, vcpuCount: vcpuCount, tscDeadlineTimer: tscDeadlineTimer))
    }

    /// Sets `MSRSetup.bootMSRs` (filtered by KVM's MSR list); returns what was set.
    @discardableResult
    public func setupBootMSRs(available: [UInt32], cpuid: [CPUIDEntry]) throws -> [(index: UInt32, value: UInt64)] {
        let msrs = MSRSetup.bootMSRs(available: available, mtrr: CPUIDSetup.hasMTRR(cpuid))
        try setMSRs(msrs)
        return msrs
    }

    /// FCW 0x37f via KVM_SET_FPU; MXCSR 0x1f80 via KVM_SET_XSAVE (KVM ignores kvm_fpu.mxcsr).
    /// Without KVM_CAP_XSAVE, MXCSR keeps KVM's reset value, which is also 0x1f80.
    public func setupFPU() throws {
        try setFPU(FPUSetup.bootFPU())
        if vm.checkExtension(.xsave) > 0 { try setMXCSR(FPUSetup.mxcsr) }
    }

    /// LINT0 = ExtINT, LINT1 = NMI (needs the in-kernel irqchip).
    public func setupLAPIC() throws {
        var l = try getLAPIC()
        l.configureLINTsForLinux()
        try setLAPIC(l)
    }

    /// Special and general registers for the 64-bit entry described by `boot`.
    public func setupLongMode(_ boot: LongModeBoot) throws { try setupEntry(boot) }

    public func setupRealMode(_ boot: RealModeBoot) throws { try setupEntry(boot) }

    /// Special registers on top of KVM's current ones, general registers from zero.
    private func setupEntry(_ boot: some EntryState) throws {
        var s = try getSregs()
        boot.apply(to: &s)
        try setSregs(s)
        var r = kvm_regs()
        boot.apply(to: &r)
        try setRegs(r)
    }
}

/// A vCPU entry state: what `setupLongMode` / `setupRealMode` apply.
protocol EntryState {
    func apply(to s: inout kvm_sregs)
    func apply(to r: inout kvm_regs)
}

extension LongModeBoot: EntryState {}
extension RealModeBoot: EntryState {}
