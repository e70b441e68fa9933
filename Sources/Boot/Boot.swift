// Boot module: everything needed to start a Linux guest in 64-bit mode, as pure data
// written into guest memory. Nothing here touches KVM; the VMM copies `BootCPUState`
// into the vCPU registers.
//
//  - Kernel parsing (bzImage boot protocol >= 2.06 with XLF_KERNEL_64, or ELF64 vmlinux)
//    with every field of the untrusted file checked before it is used.
//  - initrd placement, command line, zero page (struct boot_params) with the e820 map.
//  - Boot GDT/IDT, identity page tables for the low 4 GiB, initial register state.
//  - ACPI (RSDP/XSDT/FADT/MADT/DSDT, hardware-reduced) and an MP table.
//
// See docs/DESIGN.md for the guest address map; `X86Layout` holds the same numbers.
//
// Decisions (the why is next to each in the code):
//  - e820: [0, 0x9fc00) RAM, [0x9fc00, 0xa0000) reserved (MP table), [0xa0000, 0xe0000)
//    not listed (legacy hole), [0xe0000, 0x100000) type 2 reserved (ACPI tables and the
//    high MP config table), [1 MiB, low end) RAM, [4 GiB, ...) RAM; extra ranges type 2.
//  - RSDP at 0xe0000 (found by the BIOS-area scan) and in boot_params.acpi_rsdp_addr.
//  - FADT rev 6.5, HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON; IAPC_BOOT_ARCH
//    = no VGA | no MSI | no ASPM (8042 bit clear so Linux skips the i8042 probe; CMOS RTC
//    present); sleep control/status and reset registers are byte I/O port 0x3c0.
//  - MADT: LAPIC per vCPU (id = index), IOAPIC id 0 at 0xfec00000 GSI base 0, ISO IRQ0->GSI2,
//    LAPIC NMI on LINT1; flags 0 (no PCAT_COMPAT).
//  - DSDT: COM1 (PNP0501, IO 0x3f8/8, IRQNoFlags 4), RTC (PNP0B00, IO 0x70/2, IRQNoFlags 8),
//    virtio-mmio "LNRO0005" with Interrupt(Consumer, Edge, ActiveHigh, Exclusive), _S5_ {5,0,0,0}.
//  - MP table: floating pointer at 0x9fc00; config table after it for <= 40 vCPUs, else at
//    0xf0000. vCPUs: 1...254.
//  - CR0 = PE|ET|NE|PG (0x80000031), CR4 = PAE, EFER = LME|LMA, RSP 0x8ff0, RSI 0x7000.
import GuestMemory
import Glibc
import OS

/// What kind of problem a `BootError` is, so the CLI can map it to an exit status.
public enum BootErrorCategory: Sendable, Equatable {
    /// Bad input data (not a kernel, truncated, too old, too large...): exit status 65.
    case badInput
    /// An input file is missing or unreadable: exit status 66.
    case missingInput
    /// A bad value from the command line / VMM configuration (cpus, devices): exit status 64.
    case usage

    /// The `swiftlet` exit status for this category (docs/DESIGN.md).
    public var exitStatus: Int32 {
        switch self {
        case .badInput: return 65
        case .missingInput: return 66
        case .usage: return 64
        }
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
func mib(_ v: UInt64) -> String { "\((v + (1 << 20) - 1) >> 20) MiB" }

/// Every way loading a guest can fail. `description` is one line naming the problem
/// and the fix.
public enum BootError: Error, Equatable, CustomStringConvertible, Sendable {
    // Kernel file.
    case kernelNotFound(String)
    case kernelUnreadable(String, errno: Int32)
    case emptyKernel(String)
    /// The kernel file is larger than `maxKernelFileSize`.
    case kernelFileTooLarge(String, size: UInt64, max: UInt64)
    case notAKernel(String)
    /// The file ends before a structure it declares (detail says which).
    case truncatedKernel(String)
    /// bzImage boot protocol older than 2.06 (version as in the header, e.g. 0x0205).
    case bootProtocolTooOld(UInt16)
    /// bzImage without XLF_KERNEL_64 (no 64-bit entry point).
    case kernelNot64Bit
    /// The setup header is inconsistent (detail says which field).
    case badSetupHeader(String)
    /// The bzImage's payload claims LZ4 or ELF but does not unpack.
    case badPayload(String)
    /// The kernel needs [address, address+size) which is not inside guest RAM.
    case kernelDoesNotFit(address: UInt64, size: UInt64, ramEnd: UInt64)

    // ELF vmlinux.
    case elfWrongClass(UInt8)
    case elfWrongMachine(UInt16)
    case elfNotExecutable(UInt16)
    case elfBadHeader(String)
    case elfTooManySegments(Int, max: Int)
    case elfNoLoadableSegments
    case elfSegmentOutsideFile(index: Int, offset: UInt64, size: UInt64, fileSize: UInt64)
    case elfSegmentFileSizeExceedsMemSize(index: Int, fileSize: UInt64, memSize: UInt64)
    case elfSegmentOutsideRAM(index: Int, address: UInt64, size: UInt64)
    case elfSegmentOverlapsBootArea(index: Int, address: UInt64)
    case elfSegmentsOverlap(index: Int, other: Int)
    case elfEntryOutsideSegments(UInt64)

    // initrd.
    case initrdNotFound(String)
    case initrdUnreadable(String, errno: Int32)
    case initrdTooLarge(size: UInt64, available: UInt64)

    // Command line.
    case cmdlineTooLong(length: Int, max: Int)
    case cmdlineContainsNUL

    // Machine configuration.
    case notEnoughMemory(needed: UInt64, have: UInt64)
    case badCPUCount(Int, max: Int)
    case badDevice(String)
    case badReservedRange(base: UInt64, size: UInt64, reason: String)
    /// A write into guest memory failed: the memory layout lacks a range Boot needs.
    case guestMemory(String)

    public var category: BootErrorCategory {
        switch self {
        case .kernelNotFound, .kernelUnreadable, .initrdNotFound, .initrdUnreadable:
            return .missingInput
        case .badCPUCount, .badDevice, .badReservedRange:
            return .usage
        default:
            return .badInput
        }
    }

    public var exitStatus: Int32 { category.exitStatus }

    public var description: String {
        switch self {
        case let .kernelNotFound(p):
            return "kernel \(p) not found: check the --kernel path"
        case let .kernelUnreadable(p, e) where e == EINVAL:
            return "kernel \(p) is not a regular file: pass a bzImage (vmlinuz) or an ELF vmlinux"
        case let .kernelUnreadable(p, e):
            return "cannot read kernel \(p): \(errnoText(e)); check its permissions and that it is a regular file"
        case let .emptyKernel(p):
            return "kernel \(p) is empty: pass a bzImage (vmlinuz) or an ELF vmlinux"
        case let .kernelFileTooLarge(p, size, m):
            return "kernel \(p) is \(size) bytes, more than the \(m) bytes swiftlet reads: pass a bzImage or a vmlinux without debug info (strip it)"
        case let .notAKernel(p):
            return "\(p) is neither a bzImage (no \"HdrS\" setup header at 0x202) nor an ELF file: pass a bzImage (vmlinuz) or an ELF vmlinux"
        case let .truncatedKernel(d):
            return "kernel file is truncated (\(d)): copy the kernel again"
        case let .bootProtocolTooOld(v):
            return "kernel boot protocol \(v >> 8).\(String(format2: v & 0xff)) is older than 2.06: use a Linux 2.6.22 or newer bzImage"
        case .kernelNot64Bit:
            return "kernel has no 64-bit entry point (XLF_KERNEL_64 not set in xloadflags): use an x86-64 kernel (Linux 3.9 or newer)"
        case let .badSetupHeader(d):
            return "kernel setup header is invalid (\(d)): the bzImage is corrupt, copy it again"
        case let .badPayload(d):
            return "kernel payload does not unpack (\(d)): the bzImage is corrupt, copy it again (or run with --no-kernel-decompress to let the guest try)"
        case let .kernelDoesNotFit(a, s, end):
            return "kernel needs guest memory \(hex(a))..\(hex(a &+ s)) but guest RAM ends at \(hex(end)) (or has a hole there): give the VM at least \(mib(a &+ s + (16 << 20))) of memory"
        case let .elfWrongClass(c):
            return "ELF kernel has class \(c), not ELFCLASS64 (2): use a 64-bit vmlinux"
        case let .elfWrongMachine(m):
            return "ELF kernel is for machine \(m), not EM_X86_64 (62): use an x86-64 vmlinux"
        case let .elfNotExecutable(t):
            return "ELF kernel has type \(t), not ET_EXEC (2): pass the linked vmlinux, not an object or module"
        case let .elfBadHeader(d):
            return "ELF kernel header is invalid (\(d)): the vmlinux is corrupt, rebuild or copy it again"
        case let .elfTooManySegments(n, m):
            return "ELF kernel has \(n) program headers, more than the \(m) swiftlet accepts: the vmlinux is corrupt"
        case .elfNoLoadableSegments:
            return "ELF kernel has no PT_LOAD segment: pass the linked vmlinux"
        case let .elfSegmentOutsideFile(i, o, s, f):
            return "ELF segment \(i) (file offset \(hex(o)), \(s) bytes) extends past the end of the \(f)-byte file: the vmlinux is truncated, copy it again"
        case let .elfSegmentFileSizeExceedsMemSize(i, f, m):
            return "ELF segment \(i) has p_filesz \(hex(f)) > p_memsz \(hex(m)): the vmlinux is corrupt"
        case let .elfSegmentOutsideRAM(i, a, s):
            return "ELF segment \(i) at \(hex(a)) (\(hex(s)) bytes) is not inside guest RAM: give the VM more memory (at least \(mib(a &+ s + (16 << 20)))) or use a kernel linked below 3 GiB"
        case let .elfSegmentOverlapsBootArea(i, a):
            return "ELF segment \(i) at \(hex(a)) lies below 1 MiB, over the boot structures: use a kernel linked at 1 MiB or above"
        case let .elfSegmentsOverlap(i, o):
            return "ELF segments \(o) and \(i) overlap in physical memory: the vmlinux is corrupt"
        case let .elfEntryOutsideSegments(e):
            return "ELF entry point \(hex(e)) is not inside any PT_LOAD segment: the vmlinux is corrupt"
        case let .initrdNotFound(p):
            return "initrd \(p) not found: check the --initrd path"
        case let .initrdUnreadable(p, e) where e == EINVAL:
            return "initrd \(p) is not a regular file: pass an initramfs file"
        case let .initrdUnreadable(p, e):
            return "cannot read initrd \(p): \(errnoText(e)); check its permissions and that it is a regular file"
        case let .initrdTooLarge(s, a):
            return "initrd is \(s) bytes but only \(a) bytes of low guest RAM are free above the kernel: add at least \(mib(s > a ? s - a : 0)) of guest memory"
        case let .cmdlineTooLong(l, m):
            return "kernel command line is \(l) bytes, longer than the \(m) bytes this kernel accepts: shorten it"
        case .cmdlineContainsNUL:
            return "kernel command line contains a NUL byte: remove it"
        case let .notEnoughMemory(n, h):
            return "guest memory of \(h) bytes is too small, \(n) bytes are needed: give the VM more memory"
        case let .badCPUCount(n, m):
            return "\(n) vCPUs requested: swiftlet supports 1 to \(m); use --cpus \(m) or fewer"
        case let .badDevice(d):
            return "bad virtio-mmio device description: \(d)"
        case let .badReservedRange(b, s, r):
            return "reserved range \(hex(b))+\(hex(s)) is invalid: \(r)"
        case let .guestMemory(d):
            return "cannot write boot data into guest memory: \(d); give the VM more memory (at least 128 MiB)"
        }
    }
}

extension String {
    /// Two-digit decimal without Foundation (boot protocol minor versions: 0x020f is 2.15).
    init(format2 v: UInt16) {
        let s = String(v)
        self = s.count < 2 ? "0" + s : s
    }
}

/// Runs `body`, turning guest memory errors into `BootError.guestMemory`.
@inline(__always)
func mem<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let e as GuestMemoryError { throw BootError.guestMemory(e.description) }
}
