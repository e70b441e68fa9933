// The swiftlet command line.
import ArgumentParser
import Glibc
import OS
import VMM

let startNanos = monotonicNanos()
// SIGUSR1 asks for a --metrics dump; before the machine runs (and takes it through its
// signalfd) it must not kill swiftlet either: block it from the start.
var earlySignals = sigset_t()
sigemptyset(&earlySignals)
sigaddset(&earlySignals, SIGUSR1)
pthread_sigmask(SIG_BLOCK, &earlySignals, nil)
// /dev/kvm, the VM and KVM's CPU lists, on a thread of their own while the arguments are
// parsed; not for a command line that only asks for text (help, version, the effective
// configuration, a completion script), which must not touch /dev/kvm.
let prefetch: KVMPrefetch? = CommandLine.arguments.dropFirst().contains(where: asksOnlyForText) ? nil : KVMPrefetch.start()

func asksOnlyForText(_ argument: String) -> Bool {
    ["--help", "-h", "--version", "--print-config", "--experimental-dump-help"].contains(argument)
        || argument.hasPrefix("--generate-completion-script")
}

struct Swiftlet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftlet",
        abstract: "Boot a Linux guest in a KVM micro-VM.",
        discussion: """
        Exit status: 0 guest powered off, 3 guest rebooted, 4 guest crashed (triple fault, \
        KVM internal error), 1 swiftlet failed while running (a host error, or a system call outside its seccomp allowlist), 124 --timeout ran out, 128+N stopped \
        by signal N, 64 usage error, 65 bad kernel/initrd data, 66 input missing or unreadable, \
        69 host cannot run the VM (no usable /dev/kvm, /dev/vhost-vsock or guest CID). A guest that writes N to the exit register \
        (0xd0000004) ends the VM with status N as it is (a non-zero one is named on stderr as \
        "swiftlet: guest exit status N"; --metrics says "by": "guest").

        --config-file takes Firecracker's JSON configuration (boot-source, drives, \
        network-interfaces, machine-config, entropy, vsock) and swiftlet's own keys (README "Configuration \
        file"). A flag given on the command line replaces the file's value; --disk and --net \
        replace the file's whole drives and network-interfaces lists.
        """,
        version: "swiftlet \(swiftletVersion) (commit \(swiftletCommit))")

    @Option(name: .long, help: ArgumentHelp("Firecracker-style JSON configuration file; flags given on the command line replace its values.", valueName: "path"),
            completion: .file(extensions: ["json"]))
    var configFile: String?

    @Flag(name: .long, help: ArgumentHelp("Print the effective configuration (file and flags merged) as JSON and exit without starting a VM."))
    var printConfig = false

    @Option(name: .long, help: ArgumentHelp("Linux kernel: bzImage or ELF vmlinux (required, here or in --config-file).", valueName: "path"),
            completion: .file())
    var kernel: String?

    @Option(name: .long, help: ArgumentHelp("Initial ramdisk.", valueName: "path"), completion: .file())
    var initrd: String?

    @Option(name: .long, help: ArgumentHelp("Kernel command line. (default: \(MachineConfig.defaultCmdline))", valueName: "string"))
    var cmdline: String?

    @Option(name: .long, help: ArgumentHelp("Number of vCPUs. (default: 1)", valueName: "n"))
    var cpus: String?

    @Option(name: .long, help: ArgumentHelp("Guest memory: 512M, 2G, ... (a bare number is MiB). (default: 512M)", valueName: "size"))
    var memory: String?

    @Option(name: .long, help: ArgumentHelp("Serial console: none, stdio or file=PATH. (default: stdio)", valueName: "mode"),
            completion: .list(["none", "stdio", "file="]))
    var serial: String?

    @Option(name: .long, help: ArgumentHelp("virtio-blk disk: path=FILE[,readonly=on][,num_queues=N][,direct=on][,serial=ID] (repeatable).", valueName: "options"))
    var disk: [String] = []

    @Option(name: .long, help: ArgumentHelp("virtio-net over a TAP: tap=NAME[,mac=MAC][,queues=N][,offload=on|off][,mtu=M] (repeatable).", valueName: "options"))
    var net: [String] = []

    @Option(name: .long, help: ArgumentHelp("virtio-rng fed by the host's getrandom: on or off. (default: off)", valueName: "on|off"),
            completion: .list(["on", "off"]))
    var rng: String?

    @Option(name: .long, help: ArgumentHelp("virtio-vsock served by the host kernel's vhost-vsock: cid=N, the guest's context ID (3 to 4294967294), which host programs reach over AF_VSOCK.", valueName: "cid=N"))
    var vsock: String?

    @Option(name: .long, help: ArgumentHelp("A virtio device by kind: \(deviceKinds.map(\.usageForm).joined(separator: " or ")) (repeatable; after the disks, network interfaces, --rng and --vsock, in the order given).", valueName: "kind,options"),
            completion: .list(deviceKinds.map(\.name)))
    var device: [String] = []

    @Option(name: .long, help: ArgumentHelp("How the guest finds virtio devices: acpi (DSDT, stock kernels) or cmdline (virtio_mmio.device=). (default: acpi)", valueName: "mode"),
            completion: .list(["acpi", "cmdline"]))
    var virtioDiscovery: String?

    @Flag(name: .long, inversion: .prefixedNo, help: ArgumentHelp("Unpack the bzImage's payload (LZ4 or uncompressed; other compressions are left to the guest) in swiftlet, and enter the vmlinux directly, without KASLR; --no-kernel-decompress lets the guest decompress itself. (default: --kernel-decompress)"))
    var kernelDecompress: Bool?

    @Option(name: .long, help: ArgumentHelp("Where swiftlet keeps the vmlinux it unpacks from a bzImage, keyed by the kernel file's inode, size and times, so later boots of the same file read it instead of unpacking again: auto ($XDG_CACHE_HOME/swiftlet or ~/.cache/swiftlet, skipped if unusable), none, or a directory (made if missing). (default: auto)", valueName: "auto|none|dir"),
            completion: .directory)
    var kernelCache: String?

    @Option(name: .long, help: ArgumentHelp("How virtio interrupts are driven: edge (edge-triggered, KVM_IRQ_LINE; the guest's InterruptACK does not exit; the default), line (level-triggered, KVM_IRQ_LINE, as QEMU does) or irqfd (level-triggered, KVM_IRQFD with resampling).", valueName: "mode"),
            completion: .list(["edge", "line", "irqfd"]))
    var virtioIrq: String?

    @Option(name: .long, help: ArgumentHelp("Write counters (KVM exits, per-device register exits, per-queue packets/requests) as JSON at exit and on SIGUSR1: - for stderr, or a file.", valueName: "path"),
            completion: .file())
    var metrics: String?

    @Option(name: .long, help: ArgumentHelp("Stop a guest still running this long after swiftlet started, with a clean teardown and status 124: seconds, or a number with s, m, h or d (30, 90s, 2m, 1h).", valueName: "duration"))
    var timeout: String?

    @Flag(name: .long, help: ArgumentHelp("QEMU's isa-debug-exit at ports 0xf4-0xf7 (as -device isa-debug-exit,iobase=0xf4,iosize=0x04): a write of V ends the VM with status (V << 1) | 1."))
    var isaDebugExit = false

    @Option(name: .long, help: ArgumentHelp("seccomp-BPF allowlist per thread (main, vCPU, virtio queue, disk I/O, irq): on (a forbidden system call ends swiftlet with status 1 and one line naming the thread and the call), log (allowed, logged by the kernel's audit log) or off. (default: on)", valueName: "on|log|off"),
            completion: .list(["on", "log", "off"]))
    var seccomp: String = "on"

    @Option(name: .long, help: ArgumentHelp("error, warn, info or debug (info prints the boot-time marker and an exit summary). (default: warn)", valueName: "level"),
            completion: .list(["error", "warn", "info", "debug"]))
    var logLevel: String?

    /// What the command line sets (nil where a flag was not given).
    func settings() throws -> Settings {
        var s = Settings()
        s.kernel = kernel
        s.initrd = initrd
        s.cmdline = cmdline
        if let cpus {
            guard let n = Int(cpus) else {
                throw SwiftletError(.usage, "--cpus '\(cpus)' is not a number: give a whole number of vCPUs, e.g. --cpus 2")
            }
            s.cpus = n
        }
        if let memory { s.memoryBytes = try parseSize(memory) }
        if let serial { s.serial = try SerialMode.parse(serial) }
        if let logLevel { s.logLevel = try LogLevel.parse(logLevel) }
        if !disk.isEmpty {
            s.drives = try disk.enumerated().map { DriveSpec(id: "disk\($0.offset)", options: try DiskOptions.parse($0.element)) }
        }
        if !net.isEmpty {
            s.nets = try net.enumerated().map { NetSpec(id: "net\($0.offset)", options: try NetOptions.parse($0.element)) }
        }
        if let rng { s.rng = try parseRng(rng) }
        if let vsock { s.vsock = try VsockOptions.parse(vsock) }
        if !device.isEmpty {
            s.devices = try device.map { _ = try parseDevice($0, kinds: deviceKinds); return $0 }
        }
        if let virtioDiscovery { s.virtioDiscovery = try VirtioDiscovery.parse(virtioDiscovery) }
        s.kernelDecompress = kernelDecompress
        if let virtioIrq { s.virtioIrq = try VirtioInterruptMode.parse(virtioIrq) }
        s.kernelCache = kernelCache
        if let timeout { s.timeoutNanos = try parseDuration(timeout) }
        if isaDebugExit { s.isaDebugExit = true }
        if let metrics {
            guard !metrics.isEmpty else { throw SwiftletError(.usage, "--metrics needs - (stderr) or a file path") }
            s.metrics = metrics
        }
        return s
    }
}

func fail(_ status: Int32, _ line: String) -> Never {
    writeStderr("swiftlet: \(line)\n")
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
    let flags = try command.settings()
    let file = try command.configFile.map(loadConfigFile) ?? Settings()
    let settings = flags.over(file)
    if command.printConfig {
        print(try effectiveConfigText(settings))
        exit(0)
    }
    var config = try machineConfig(settings, startNanos: startNanos)
    if case .file(let path) = config.serial { try checkOutputFile(path, flag: "--serial file=") }
    if let m = config.metricsPath, m != "-" { try checkOutputFile(m, flag: "--metrics", creates: m + ".tmp") }
    guard let sc = SeccompMode.parse(command.seccomp) else {
        throw SwiftletError(.usage, "--seccomp '\(command.seccomp)' is not valid: use on, log or off")
    }
    config.seccomp = sc
    let outcome = try VMM.run(config, prefetch: prefetch)
    exit(outcome)
} catch let e as SwiftletError {
    fail(e.status.rawValue, e.message)
} catch {
    fail(ExitStatus.runtimeError.rawValue, "\(error)")
}
