// The machine configuration and the parsers for user-supplied values.
import Glibc
import OS
import Devices
import Virtio
@_exported import enum Seccomp.SeccompMode
@_exported import enum OS.ExitStatus
@_exported import struct OS.SwiftletError
@_exported import struct Devices.VsockOptions
@_exported import func Devices.parseRng
@_exported import func Virtio.parseDevice

public enum SerialMode: Equatable {
    case none
    case stdio
    case file(String)

    /// `none`, `stdio` or `file=PATH`.
    public static func parse(_ s: String) throws -> SerialMode {
        switch s {
        case "none": return .none
        case "stdio": return .stdio
        default:
            if s.hasPrefix("file="), s.count > 5 { return .file(String(s.dropFirst(5))) }
            throw SwiftletError(.usage, "--serial '\(s)' is not valid: use none, stdio or file=PATH")
        }
    }
}

/// How the guest finds its virtio-mmio devices.
public enum VirtioDiscovery: Equatable {
    /// DSDT devices with _HID "LNRO0005": what stock distribution kernels need.
    case acpi
    /// `virtio_mmio.device=<size>@<addr>:<irq>` on the command line, for kernels built
    /// with VIRTIO_MMIO_CMDLINE_DEVICES (Firecracker-style guest kernels).
    case cmdline

    public static func parse(_ s: String) throws -> VirtioDiscovery {
        switch s {
        case "acpi": return .acpi
        case "cmdline": return .cmdline
        default: throw SwiftletError(.usage, "--virtio-discovery '\(s)' is not valid: use acpi (stock kernels) or cmdline (kernels with VIRTIO_MMIO_CMDLINE_DEVICES)")
        }
    }
}

/// How a virtio-mmio device's interrupt is triggered and driven.
public enum VirtioInterruptMode: Equatable, Sendable {
    /// KVM_IRQ_LINE: the line is set high when InterruptStatus becomes nonzero (from the
    /// queue thread) and low when the driver's InterruptACK clears it (from the vCPU
    /// thread), as QEMU's virtio-mmio does: the level always follows InterruptStatus
    /// exactly, with no EOI round trip through a resample thread.
    case line
    /// KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: a queue thread's eventfd write asserts the
    /// line; KVM deasserts it at the guest's EOI and a "-irq" thread re-asserts it while
    /// InterruptStatus is nonzero.
    case irqfd
    /// Edge-triggered (the DSDT says Edge): KVM_IRQ_LINE raises the GSI when the queue
    /// thread sets an InterruptStatus bit (one edge until the driver's next InterruptStatus
    /// read lowers it), and the driver's InterruptACK of 0-3 is caught by ioeventfds and
    /// applied at its next InterruptStatus read, so an interrupt costs the guest one exit
    /// to swiftlet (the read). With the register page (the default) the read is a read of
    /// memory, each edge is raised and lowered at once, and the next signal takes the
    /// ACKs: no exit to swiftlet. The default.
    case edge

    public static func parse(_ s: String) throws -> VirtioInterruptMode {
        switch s {
        case "line": return .line
        case "irqfd": return .irqfd
        case "edge": return .edge
        default: throw SwiftletError(.usage, "--virtio-irq '\(s)' is not valid: use edge (edge-triggered, InterruptACK without an exit; the default), line (level-triggered, KVM_IRQ_LINE) or irqfd (KVM_IRQFD with resampling)")
        }
    }

    /// The name `parse` takes.
    public var name: String {
        switch self {
        case .line: return "line"
        case .irqfd: return "irqfd"
        case .edge: return "edge"
        }
    }

    /// Whether the DSDT declares the interrupt level-triggered.
    public var levelTriggered: Bool { self != .edge }
}

public typealias LogLevel = Virtio.LogLevel

extension LogLevel {
    public static func parse(_ s: String) throws -> LogLevel {
        switch s.lowercased() {
        case "error": return .error
        case "warn", "warning": return .warn
        case "info": return .info
        case "debug": return .debug
        default: throw SwiftletError(.usage, "--log-level '\(s)' is not valid: use error, warn, info or debug")
        }
    }
}

public struct MachineConfig {
    public var kernelPath: String
    public var initrdPath: String?
    public var cmdline: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var serial: SerialMode
    public var logLevel: LogLevel
    /// monotonicNanos() when swiftlet started (for the boot-time marker).
    public var startNanos: UInt64
    public var disks: [DiskOptions] = []
    public var nets: [NetOptions] = []
    public var virtioDiscovery: VirtioDiscovery = .acpi
    /// Unpack the bzImage payload in swiftlet (LinuxBootConfig.decompressKernel): on by
    /// default, --no-kernel-decompress turns it off.
    public var decompressKernel = true
    /// --kernel-cache: the unpacked-kernel cache directory (`resolveKernelCache`), nil for none.
    public var kernelCacheDir: String? = nil
    /// --virtio-irq: how virtio interrupt lines are driven.
    public var virtioInterrupts: VirtioInterruptMode = .edge
    /// Where the guest's reads of the virtio-mmio windows go (SWIFTLET_VIRTIO_REGISTERS).
    public var virtioRegisters: VirtioRegisterMode = .fromEnvironment
    /// --metrics: "-" (stderr) or a file, written at exit and on SIGUSR1.
    public var metricsPath: String? = nil
    /// --timeout: nanoseconds after swiftlet's start (`startNanos`) at which a guest still
    /// running is stopped (status 124); nil for no limit.
    public var timeoutNanos: UInt64? = nil
    /// --isa-debug-exit: QEMU's isa-debug-exit at ports 0xf4-0xf7.
    public var isaDebugExit = false
    /// --seccomp: each thread's allowlist enforced (on), only logged (log), or none (off).
    public var seccomp: SeccompMode = .on
    /// --rng: a virtio-rng device (after the disks and network interfaces).
    public var rng = false
    /// --vsock: a virtio-vsock device on vhost-vsock (after the rng).
    public var vsock: VsockOptions? = nil
    /// --device: devices by kind (`deviceKinds`), after all the others.
    public var devices: [any VirtioDeviceSpec] = []

    public init(kernelPath: String, initrdPath: String? = nil, cmdline: String = MachineConfig.defaultCmdline,
                cpus: Int = 1, memoryBytes: UInt64 = MachineConfig.defaultMemory, serial: SerialMode = .stdio,
                logLevel: LogLevel = .warn, startNanos: UInt64 = 0) {
        self.kernelPath = kernelPath
        self.initrdPath = initrdPath
        self.cmdline = cmdline
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.serial = serial
        self.logLevel = logLevel
        self.startNanos = startNanos
    }

    public static let defaultCmdline = "console=ttyS0 reboot=k panic=1"
    public static let defaultMemory: UInt64 = 512 << 20
    /// Below this the stock kernel cannot even decompress itself.
    public static let minimumMemory: UInt64 = 64 << 20
    /// Guest RAM ends below 1 TiB of guest physical address space.
    public static let maximumMemory: UInt64 = 1 << 40
}

/// `cmdline` with `params` inserted before a " -- " (what follows it belongs to init).
public func insertKernelParameters(_ params: [String], into cmdline: String) -> String {
    guard !params.isEmpty else { return cmdline }
    var words = cmdline.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
    if words == [""] { words = [] }
    let at = words.firstIndex(of: "--") ?? words.count
    words.insert(contentsOf: params, at: at)
    return words.joined(separator: " ")
}

/// Parses a memory size: a number with an optional unit K, M, G or T (binary: KiB, MiB,
/// GiB, TiB; "M", "MB", "MiB" and lower case all mean MiB). A bare number means MiB, as
/// with QEMU's -m and Firecracker's mem_size_mib.
public func parseSize(_ text: String, flag: String = "--memory") throws -> UInt64 {
    let s = text.trimmingWhitespace()
    let bad = SwiftletError(.usage, "\(flag) '\(text)' is not a size: use a whole number with an optional unit K, M, G or T, e.g. 512M or 2G")
    let digits = s.prefix(while: { $0.isASCII && $0.isNumber })
    guard !digits.isEmpty, digits.count <= 20, let n = UInt64(digits) else { throw bad }
    let unit = s.dropFirst(digits.count).lowercased()
    let shift: UInt64
    switch unit {
    case "": shift = 20
    case "b": shift = 0
    case "k", "kb", "kib": shift = 10
    case "m", "mb", "mib": shift = 20
    case "g", "gb", "gib": shift = 30
    case "t", "tb", "tib": shift = 40
    default: throw bad
    }
    guard n <= (UInt64.max >> shift) else {
        throw SwiftletError(.usage, "\(flag) '\(text)' is too large")
    }
    return n << shift
}

/// Parses a --timeout DURATION into nanoseconds: a number of seconds, whole or with up
/// to 9 decimals (`30`, `1.5`), with an optional unit s, m, h or d (`30s`, `2m`, `1h`,
/// as timeout(1) takes them). Zero, a sign, an exponent, spaces inside, non-ASCII digits
/// and more than about 584 years are refused.
public func parseDuration(_ text: String, flag: String = "--timeout") throws -> UInt64 {
    let bad = SwiftletError(.usage, "\(flag) '\(text)' is not a duration: use a number of seconds with an optional unit s, m, h or d, e.g. 30, 90s, 2m or 1h")
    let s = text.trimmingWhitespace()
    func isDigit(_ c: Character) -> Bool { c.isASCII && c.isNumber }
    let whole = s.prefix(while: isDigit)
    var rest = s.dropFirst(whole.count)
    var fraction = Substring("")
    if rest.first == "." {
        fraction = rest.dropFirst().prefix(while: isDigit)
        rest = rest.dropFirst(1 + fraction.count)
        guard !fraction.isEmpty else { throw bad }
    }
    guard !whole.isEmpty || !fraction.isEmpty, fraction.count <= 9 else { throw bad }
    let unitNanos: UInt64
    switch rest {
    case "", "s": unitNanos = 1_000_000_000
    case "m": unitNanos = 60 * 1_000_000_000
    case "h": unitNanos = 3600 * 1_000_000_000
    case "d": unitNanos = 86400 * 1_000_000_000
    default: throw bad
    }
    let tooLarge = SwiftletError(.usage, "\(flag) '\(text)' is too long: give at most 100 years, or leave \(flag) out for no limit")
    // Whole units and the fraction in nanoseconds of a unit, with overflow checks.
    let digits = whole.drop(while: { $0 == "0" })
    guard digits.count <= 20, let w = UInt64(digits.isEmpty ? "0" : String(digits)) else { throw tooLarge }
    let f = UInt64(String(fraction) + String(repeating: "0", count: 9 - fraction.count))!  // 0..<1e9
    let (wn, o1) = w.multipliedReportingOverflow(by: unitNanos)
    // f/1e9 of a unit; unitNanos is a multiple of 1e9, so this is exact.
    let fn = f * (unitNanos / 1_000_000_000)
    let (total, o2) = wn.addingReportingOverflow(fn)
    guard !o1, !o2, total <= maximumDurationNanos else { throw tooLarge }
    guard total > 0 else {
        throw SwiftletError(.usage, "\(flag) '\(text)' is zero: give a positive duration, or leave \(flag) out for no limit")
    }
    return total
}

/// The longest --timeout: 100 years (far from UInt64 and timespec limits).
public let maximumDurationNanos: UInt64 = 100 * 365 * 86400 * 1_000_000_000

/// A duration for messages: "90 s", "1.5 s", "0.001 s" (seconds, at most 3 decimals, no
/// trailing zeros).
public func formatDuration(_ nanos: UInt64) -> String {
    let ms = (nanos + 500_000) / 1_000_000
    return decimalSeconds(whole: ms / 1000, fraction: ms % 1000, digits: 3) + " s"
}

/// "W" or "W.F": `fraction` as `digits` decimals, trailing zeros dropped.
func decimalSeconds(whole: UInt64, fraction: UInt64, digits: Int) -> String {
    guard fraction != 0 else { return "\(whole)" }
    var f = String(fraction)
    f = String(repeating: "0", count: max(0, digits - f.count)) + f
    while f.hasSuffix("0") { f.removeLast() }
    return "\(whole).\(f)"
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}

/// Host memory in bytes (MemTotal), or nil if /proc/meminfo cannot be read.
public func hostMemoryBytes() -> UInt64? { procKiB("/proc/meminfo", "MemTotal:").map { $0 * 1024 } }

/// The number after `key` in a /proc file of "Key:   value kB" lines.
func procKiB(_ path: String, _ key: String) -> UInt64? {
    guard let f = fopen(path, "r") else { return nil }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, Int32(line.count), f) != nil {
        let s = String(nulTerminated: line)
        if s.hasPrefix(key) {
            return s.dropFirst(key.count).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first.flatMap { UInt64($0) }
        }
    }
    return nil
}

/// Checks the values that do not need KVM: memory within bounds, cpus at least 1.
public func validate(_ c: MachineConfig, maxVCPUs: Int? = nil) throws {
    if c.memoryBytes < MachineConfig.minimumMemory {
        throw SwiftletError(.usage, "--memory \(c.memoryBytes >> 20)M is below the minimum of \(MachineConfig.minimumMemory >> 20)M: give the guest at least 64M (128M or more for the default guest)")
    }
    if c.memoryBytes % 4096 != 0 {
        throw SwiftletError(.usage, "--memory must be a whole number of 4 KiB pages: round it, e.g. to \((c.memoryBytes >> 20) + 1)M")
    }
    if c.memoryBytes > MachineConfig.maximumMemory {
        throw SwiftletError(.usage, "--memory \(c.memoryBytes >> 30)G is above swiftlet's limit of 1024G")
    }
    if let host = hostMemoryBytes(), c.memoryBytes > host {
        throw SwiftletError(.usage, "--memory \(c.memoryBytes >> 20)M is more than this host has (\(host >> 20)M): give the guest less memory")
    }
    if c.cpus < 1 {
        throw SwiftletError(.usage, "--cpus \(c.cpus) is not valid: a guest needs at least 1 vCPU")
    }
    if let m = maxVCPUs, c.cpus > m {
        throw SwiftletError(.usage, "--cpus \(c.cpus) is above this host's KVM limit of \(m) vCPUs: use --cpus \(m) or fewer")
    }
}

/// --kernel-cache: `auto` (the default) is $XDG_CACHE_HOME/swiftlet, else
/// $HOME/.cache/swiftlet, used when it can be made and written and silently skipped when
/// not (the boot only gets slower); `none` turns the cache off; anything else is a
/// directory that must be usable (`checkKernelCacheDir`). nil: no cache.
public func resolveKernelCache(_ option: String, decompress: Bool) throws -> String? {
    switch option {
    case "none": return nil
    case "auto":
        guard decompress else { return nil }
        func env(_ k: String) -> String? {
            guard let v = getenv(k).map({ String(cString: $0) }), v.hasPrefix("/") else { return nil }
            return v
        }
        let base: String
        if let x = env("XDG_CACHE_HOME") { base = x } else if let h = env("HOME") { base = h + "/.cache" } else { return nil }
        _ = mkdir(base, 0o700)
        return try? checkKernelCacheDir(base + "/swiftlet", decompress: true)
    default:
        return try checkKernelCacheDir(option, decompress: decompress)
    }
}

/// The --kernel-cache directory, made (mode 0700) if missing; one clear error otherwise.
public func checkKernelCacheDir(_ dir: String, decompress: Bool) throws -> String {
    guard decompress else {
        throw SwiftletError(.usage, "--kernel-cache keeps what swiftlet unpacks, and --no-kernel-decompress turns unpacking off: drop one of them")
    }
    guard !dir.isEmpty else { throw SwiftletError(.usage, "--kernel-cache needs a directory, e.g. --kernel-cache ~/.cache/swiftlet") }
    if mkdir(dir, 0o700) != 0 && errno != EEXIST {
        let why = errnoText(errno)
        throw SwiftletError(.usage, "--kernel-cache '\(dir)': cannot create it (\(why)): give a directory you can write")
    }
    var st = stat()
    guard stat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
        throw SwiftletError(.usage, "--kernel-cache '\(dir)' is not a directory: give a directory you can write")
    }
    guard access(dir, W_OK | X_OK) == 0 else {
        throw SwiftletError(.usage, "--kernel-cache '\(dir)': no permission to write there: give a directory you can write")
    }
    return dir
}

/// An output file (--serial file=PATH, --metrics PATH) checked before anything runs, so a
/// path swiftlet cannot write is a usage error at once rather than at the first write.
/// `creates`: the file swiftlet will create (the path itself, or --metrics's temporary
/// name); when missing it is created and removed again, so nothing is left behind.
public func checkOutputFile(_ path: String, flag: String, creates: String? = nil) throws {
    let p = flag.hasSuffix("=") ? flag + shown(path) : flag + " " + shown(path)
    var st = stat()
    if stat(path, &st) == 0 {
        if st.st_mode & S_IFMT == S_IFDIR {
            throw SwiftletError(.usage, "\(p) is a directory: give a file path inside it")
        }
        guard access(path, W_OK) == 0 else {
            throw SwiftletError(.usage, "\(p): cannot write it (\(errnoText(errno))): give a file you can write")
        }
        if creates == nil { return }
    }
    let target = creates ?? path
    if access(target, F_OK) == 0 { return }
    let fd = open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
        throw SwiftletError(.usage, "\(p): cannot create it (\(errnoText(errno))): give a file in a directory you can write")
    }
    close(fd)
    unlink(target)
}
