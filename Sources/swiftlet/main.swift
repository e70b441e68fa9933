// The swiftlet command line.
import ArgumentParser
import Glibc
import VMM

let startNanos = VMM.monotonicNow()
// SIGUSR1 asks for a --metrics dump; before the machine runs (and takes it through its
// signalfd) it must not kill swiftlet either: block it from the start.
var earlySignals = sigset_t()
sigemptyset(&earlySignals)
sigaddset(&earlySignals, SIGUSR1)
pthread_sigmask(SIG_BLOCK, &earlySignals, nil)

struct Swiftlet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftlet",
        abstract: "Boot a Linux guest in a KVM micro-VM.",
        discussion: """
        Exit status: 0 guest powered off, 3 guest rebooted, 4 guest crashed (triple fault, \
        KVM internal error), 1 swiftlet failed while running (a host error, or a system call outside its seccomp allowlist), 124 --timeout ran out, 128+N stopped \
        by signal N, 64 usage error, 65 bad kernel/initrd data, 66 input missing or unreadable, \
        69 host cannot run the VM (no usable /dev/kvm). A guest that writes N to the exit register \
        (0xd0000004) ends the VM with status N as it is (a non-zero one is named on stderr as \
        "swiftlet: guest exit status N"; --metrics says "by": "guest").
        """)

    @Option(name: .long, help: ArgumentHelp("Linux kernel: bzImage or ELF vmlinux.", valueName: "path"))
    var kernel: String

    @Option(name: .long, help: ArgumentHelp("Initial ramdisk.", valueName: "path"))
    var initrd: String?

    @Option(name: .long, help: ArgumentHelp("Kernel command line.", valueName: "string"))
    var cmdline: String = MachineConfig.defaultCmdline

    @Option(name: .long, help: ArgumentHelp("Number of vCPUs.", valueName: "n"))
    var cpus: String = "1"

    @Option(name: .long, help: ArgumentHelp("Guest memory: 512M, 2G, ... (a bare number is MiB).", valueName: "size"))
    var memory: String = "512M"

    @Option(name: .long, help: ArgumentHelp("Serial console: none, stdio or file=PATH.", valueName: "mode"))
    var serial: String = "stdio"

    @Option(name: .long, help: ArgumentHelp("virtio-blk disk: path=FILE[,readonly=on][,num_queues=N][,direct=on][,serial=ID] (repeatable).", valueName: "options"))
    var disk: [String] = []

    @Option(name: .long, help: ArgumentHelp("virtio-net over a TAP: tap=NAME[,mac=MAC][,queues=N][,offload=on|off][,mtu=M] (repeatable).", valueName: "options"))
    var net: [String] = []

    @Option(name: .long, help: ArgumentHelp("How the guest finds virtio devices: acpi (DSDT, stock kernels) or cmdline (virtio_mmio.device=).", valueName: "mode"))
    var virtioDiscovery: String = "acpi"

    @Flag(name: .long, inversion: .prefixedNo, help: ArgumentHelp("Unpack the bzImage's payload (LZ4 or uncompressed; other compressions are left to the guest) in swiftlet, and enter the vmlinux directly, without KASLR; --no-kernel-decompress lets the guest decompress itself."))
    var kernelDecompress = true

    @Option(name: .long, help: ArgumentHelp("Where swiftlet keeps the vmlinux it unpacks from a bzImage, keyed by the kernel file's inode, size and times, so later boots of the same file read it instead of unpacking again: auto ($XDG_CACHE_HOME/swiftlet or ~/.cache/swiftlet, skipped if unusable), none, or a directory (made if missing).", valueName: "auto|none|dir"))
    var kernelCache: String = "auto"

    @Option(name: .long, help: ArgumentHelp("How virtio interrupt lines are driven: line (KVM_IRQ_LINE, as QEMU does; the default) or irqfd (KVM_IRQFD with resampling).", valueName: "mode"))
    var virtioIrq: String = "line"

    @Option(name: .long, help: ArgumentHelp("Write counters (KVM exits, per-device register exits, per-queue packets/requests) as JSON at exit and on SIGUSR1: - for stderr, or a file.", valueName: "path"))
    var metrics: String?

    @Option(name: .long, help: ArgumentHelp("Stop a guest still running this long after swiftlet started, with a clean teardown and status 124: seconds, or a number with s, m, h or d (30, 90s, 2m, 1h).", valueName: "duration"))
    var timeout: String?

    @Flag(name: .long, help: ArgumentHelp("QEMU's isa-debug-exit at ports 0xf4-0xf7 (as -device isa-debug-exit,iobase=0xf4,iosize=0x04): a write of V ends the VM with status (V << 1) | 1."))
    var isaDebugExit = false

    @Option(name: .long, help: ArgumentHelp("seccomp-BPF allowlist per thread (main, vCPU, virtio queue, disk I/O, irq): on (a forbidden system call ends swiftlet with status 1 and one line naming the thread and the call), log (allowed, logged by the kernel's audit log) or off.", valueName: "on|log|off"))
    var seccomp: String = "on"

    @Option(name: .long, help: ArgumentHelp("error, warn, info or debug (info prints the boot-time marker and an exit summary).", valueName: "level"))
    var logLevel: String = "warn"

    func config() throws -> MachineConfig {
        guard let n = Int(cpus) else {
            throw SwiftletError(.usage, "--cpus '\(cpus)' is not a number: give a whole number of vCPUs, e.g. --cpus 2")
        }
        var c = MachineConfig(kernelPath: kernel, initrdPath: initrd, cmdline: cmdline, cpus: n,
                              memoryBytes: try parseSize(memory), serial: try SerialMode.parse(serial),
                              logLevel: try LogLevel.parse(logLevel), startNanos: startNanos)
        if case .file(let path) = c.serial { try checkOutputFile(path, flag: "--serial file=") }
        c.disks = try disk.map(DiskOptions.parse)
        c.nets = try net.map(NetOptions.parse)
        c.virtioDiscovery = try VirtioDiscovery.parse(virtioDiscovery)
        c.decompressKernel = kernelDecompress
        c.virtioInterrupts = try VirtioInterruptMode.parse(virtioIrq)
        c.kernelCacheDir = try resolveKernelCache(kernelCache, decompress: kernelDecompress)
        if let t = timeout { c.timeoutNanos = try parseDuration(t) }
        c.isaDebugExit = isaDebugExit
        guard let sc = SeccompMode.parse(seccomp) else {
            throw SwiftletError(.usage, "--seccomp '\(seccomp)' is not valid: use on, log or off")
        }
        c.seccomp = sc
        if let m = metrics {
            guard !m.isEmpty else { throw SwiftletError(.usage, "--metrics needs - (stderr) or a file path") }
            if m != "-" { try checkOutputFile(m, flag: "--metrics", creates: m + ".tmp") }
            c.metricsPath = m
        }
        return c
    }
}

func fail(_ status: Int32, _ line: String) -> Never {
    fputs("swiftlet: \(line)\n", stderr)
    exit(status)
}

let command: Swiftlet
do {
    command = try Swiftlet.parse()
} catch {
    let code = Swiftlet.exitCode(for: error)
    if code == .success {
        print(Swiftlet.fullMessage(for: error))
        exit(0)
    }
    // One line, naming the problem and pointing at --help; no usage dump.
    let msg = Swiftlet.message(for: error).split(separator: "\n").first.map(String.init) ?? "bad arguments"
    fail(ExitStatus.usage.rawValue, "\(msg.hasPrefix("Error: ") ? String(msg.dropFirst(7)) : msg) (see swiftlet --help)")
}

do {
    let config = try command.config()
    let outcome = try VMM.run(config)
    exit(outcome)
} catch let e as SwiftletError {
    fail(e.status.rawValue, e.message)
} catch {
    fail(ExitStatus.runtimeError.rawValue, "\(error)")
}
