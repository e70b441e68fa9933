// Builds a machine from a configuration and runs its lifecycle: inputs checked, guest
// memory mapped and loaded, KVM VM and vCPUs created, legacy devices wired, vCPU threads
// run until the guest powers off, reboots or crashes, then everything is torn down and
// the documented exit status returned.
import Glibc
import CLinux
import GuestMemory
import OS
import KVM
import Boot
import Devices
import Virtio
import Seccomp

/// Start-up phases (name, monotonic ns), printed at --log-level debug.
// nonisolated(unsafe): appended to and read by the main thread only.
nonisolated(unsafe) var startupPhases: [(String, UInt64)] = []
@inline(__always) func phase(_ name: String) { startupPhases.append((name, monotonicNanos())) }

/// How a run ended; decides the exit status. The first report wins.
enum Outcome {
    case poweredOff
    case rebooted
    case crashed(String)
    case failed(String)
    case signalled(Int32)
    /// The guest chose the status: the exit register, or isa-debug-exit (`debugPort`).
    case guestExit(Int32, debugPort: Bool)
    /// --timeout ran out (its duration in nanoseconds).
    case timedOut(UInt64)

    var status: Int32 {
        switch self {
        case .poweredOff: return ExitStatus.poweredOff.rawValue
        case .rebooted: return ExitStatus.rebooted.rawValue
        case .crashed: return ExitStatus.guestCrashed.rawValue
        case .failed: return ExitStatus.runtimeError.rawValue
        case .signalled(let s): return 128 + s
        case .guestExit(let s, _): return s
        case .timedOut: return ExitStatus.timedOut.rawValue
        }
    }

    var summary: String {
        switch self {
        case .poweredOff: return "guest powered off"
        case .rebooted: return "guest rebooted"
        case .crashed(let why): return "guest crashed: \(why)"
        case .failed(let why): return "stopped on a host error: \(why)"
        case .signalled(let s): return "stopped by signal \(s)"
        case .guestExit(let s, let port): return "guest exit status \(s) (\(port ? "isa-debug-exit" : "exit register"))"
        case .timedOut(let ns): return "timed out (--timeout \(formatDuration(ns))): guest stopped"
        }
    }

    /// Printed at the default log level: swiftlet's own failures, and a guest's non-zero
    /// status (the rest only at --log-level info).
    var loggedByDefault: Bool {
        switch self {
        case .crashed, .failed, .timedOut: return true
        case .guestExit(let s, _): return s != 0
        default: return false
        }
    }

    /// --metrics "exit": who chose the status ("guest" only when the guest wrote the number
    /// itself) and a one-word reason.
    var metricsJSON: String {
        let reason: String
        switch self {
        case .poweredOff: reason = "poweroff"
        case .rebooted: reason = "reboot"
        case .crashed: reason = "crash"
        case .failed: reason = "host-error"
        case .signalled: reason = "signal"
        case .guestExit(_, let port): reason = port ? "isa-debug-exit" : "exit-register"
        case .timedOut: reason = "timeout"
        }
        let by: String
        if case .guestExit = self { by = "guest" } else { by = "swiftlet" }
        return "{\"status\": \(status), \"by\": \"\(by)\", \"reason\": \"\(reason)\"}"
    }
}

/// The KVM work every start needs whatever its configuration: /dev/kvm opened, the VM
/// created, and KVM's CPUID and MSR lists for the vCPUs. On a nested or PVM host
/// KVM_CREATE_VM takes 0.4 to 1.3 ms (it switches static keys, which patches kernel text
/// on every CPU) and KVM_GET_SUPPORTED_CPUID about 1 ms (every CPUID it executes is an
/// exit to the hypervisor below), so `start()` does all of it on a thread of its own,
/// from the first line of `main`, while the main thread parses the command line and
/// loads the kernel. Whatever failed there is done again on the main thread, where its
/// error is reported; a VM made for a start that stops early (--help, a usage error, a
/// bad kernel) is closed with the process.
public final class KVMPrefetch: Sendable {
    private struct Fetched: Sendable {
        var kvm: Hypervisor?
        var vm: VirtualMachine?
        var lists: (cpuid: [CPUIDEntry], msrs: [UInt32])?
    }
    private final class Box: Sendable {
        let fetched = Locked(Fetched())
    }
    private let box = Box()
    private let thread: OSThread?

    private init() {
        let box = self.box
        // No thread (pthread_create failed): everything is asked of KVM on the main thread.
        thread = try? spawnThread(name: "kvm-prefetch") {
            guard access("/dev/kvm", F_OK) == 0, let kvm = try? Hypervisor() else { return }
            box.fetched.withLock { $0.kvm = kvm }
            if let vm = try? kvm.createVM() { box.fetched.withLock { $0.vm = vm } }
            if let cpuid = try? kvm.supportedCPUID(), let msrs = try? kvm.msrIndexList() {
                box.fetched.withLock { $0.lists = (cpuid, msrs) }
            }
        }
    }

    /// Starts the background work.
    public static func start() -> KVMPrefetch { KVMPrefetch() }

    /// Waits for the background work (if any). Idempotent.
    func join() { thread?.join() }

    /// /dev/kvm as the background thread opened it, nil if it could not.
    func hypervisor() -> Hypervisor? {
        join()
        return box.fetched.withLock { $0.kvm }
    }

    /// The VM the background thread created on `kvm`, handed out once; otherwise a new one.
    func createVM(_ kvm: Hypervisor) throws -> VirtualMachine {
        join()
        let vm = box.fetched.withLock { f -> VirtualMachine? in
            defer { f.vm = nil }
            return f.vm.flatMap { $0.hypervisor === kvm ? $0 : nil }
        }
        return try vm ?? kvm.createVM()
    }

    /// The CPUID and MSR lists: from the background thread if it got them, otherwise from `kvm` now.
    func lists(_ kvm: Hypervisor) throws -> (cpuid: [CPUIDEntry], msrs: [UInt32]) {
        join()
        if let f = box.fetched.withLock({ $0.lists }) { return f }
        return (try kvm.supportedCPUID(), try kvm.msrIndexList())
    }
}

/// Runs the VM described by `config` to its end. Returns the exit status; throws
/// `SwiftletError` for anything that stops it from starting.
/// `prefetch`: the KVM work started before the command line was parsed (started here if nil).
public func run(_ config: MachineConfig, prefetch: KVMPrefetch? = nil) throws -> Int32 {
    try validate(config)
    let prefetch = prefetch ?? KVMPrefetch.start()
    defer { prefetch.join() }
    // Inputs first: a bad kernel or initrd is reported the same on every host.
    let memory: GuestMemory
    do {
        memory = try GuestMemory(layout: X86Layout.ramLayout(memoryBytes: config.memoryBytes))
    } catch {
        throw SwiftletError(.runtimeError, "\(error): give the guest less memory")
    }
    let devices = try openDevices(deviceSpecs(config))
    let virtio = try virtioDescriptions(count: devices.count, interrupts: config.virtioInterrupts)
    var cmdline = config.cmdline
    if config.virtioDiscovery == .cmdline {
        cmdline = insertKernelParameters(virtio.map {
            "virtio_mmio.device=\($0.size >> 10)K@0x\(String($0.address, radix: 16)):\($0.gsi)"
        }, into: cmdline)
    }
    var bootConfig = LinuxBootConfig(kernelPath: config.kernelPath, initrdPath: config.initrdPath,
                                     cmdline: cmdline, cpus: config.cpus,
                                     virtioDevices: config.virtioDiscovery == .acpi ? virtio : [],
                                     extraReserved: [], serial: true, rtc: true)
    bootConfig.decompressKernel = config.decompressKernel
    bootConfig.kernelCacheDir = config.kernelCacheDir
    let boot: BootCPUState
    do {
        phase("inputs checked, RAM mapped")
        boot = try loadLinux(bootConfig, into: memory)
        phase("kernel and initrd loaded, boot tables written")
    } catch let e as BootError {
        throw SwiftletError(ExitStatus(rawValue: e.exitStatus) ?? .badInput, e.description)
    }

    // The vCPU limit is checked before refusing a PVM host, so that a bad --cpus is a
    // usage error everywhere.
    let fetched = prefetch.hypervisor()
    let host = HostCheck.classify(opened: fetched != nil)
    let kvm: Hypervisor
    switch host {
    case .usable, .pvmHost:
        if let k = fetched {
            kvm = k
        } else {
            do { kvm = try Hypervisor() } catch { throw SwiftletError(.hostUnavailable, "\(error)") }
        }
    default:
        throw SwiftletError(.hostUnavailable, host.message)
    }
    if config.cpus > kvm.maxVCPUs {
        throw SwiftletError(.usage, "--cpus \(config.cpus) is above this host's KVM limit of \(kvm.maxVCPUs) vCPUs: use --cpus \(kvm.maxVCPUs) or fewer")
    }
    // SWIFTLET_ALLOW_PVM=1 lets guests built for PVM's limits (no IDT delivery, no SSE:
    // the start-up benchmark's tiny guest) run on a PVM host.
    let allowPVM = host == .pvmHost && getenv("SWIFTLET_ALLOW_PVM").map { String(cString: $0) == "1" } == true
    guard host.isUsable || allowPVM else { throw SwiftletError(.hostUnavailable, host.message) }
    // seccomp: the SIGSYS handler first; each thread then installs its role's filter on
    // itself (the -irq threads while the machine is built, the rest in Machine.run).
    Seccomp.mode = config.seccomp
    Seccomp.mainMayWriteFiles = config.metricsPath.map { $0 != "-" } ?? false
    Seccomp.mainReadsProcStatus = config.logLevel >= .debug
    if config.seccomp == .on {
        let e = Seccomp.installViolationHandler()
        if e != 0 { throw SwiftletError(.runtimeError, "seccomp: cannot install the SIGSYS handler: \(errnoText(e))") }
    }
    let machine = try Machine(config: config, kvm: kvm, memory: memory, boot: boot, devices: devices, prefetch: prefetch)
    return machine.run()
}

// @unchecked Sendable: the `var`s (vCPUs, bus maps, slots, windows) are set while the main
// thread builds the machine, before any thread that reads them starts, and never change
// afterwards; firstRunNanos is written by vCPU 0 before its first KVM_RUN and read by the
// main thread after joining it. What changes while threads run is behind `runState`.
final class Machine: @unchecked Sendable {
    let config: MachineConfig
    let memory: GuestMemory
    let kvm: Hypervisor
    let vm: VirtualMachine
    var vcpus: [VCPU] = []
    var pio = RangeMap<PortDevice>()
    var mmio = RangeMap<MMIODevice>()
    var slots: [VirtioMMIOSlot] = []
    /// KVM's coalesced I/O ring, when the latching ports are registered with it.
    var coalesced: CoalescedRing?
    /// --metrics: KVM exits by kind, and the counting wrappers of the virtio windows.
    let exitCounters = ExitCounters()
    var windows: [CountedVirtioWindow] = []
    let serial: Serial16550
    let serialIRQ: EventFD
    let console: ConsoleOutput
    let bootMarker: BootMarker
    /// --timeout: monotonicNanos() deadline, nil for none.
    let deadline: UInt64?
    /// Written once by whoever ends the run; the main thread waits on it.
    let stopEvent: EventFD
    /// How the run ends, and what --log-level debug notes about exits on the way.
    struct RunState {
        var outcome: Outcome? = nil
        var stopping = false
        var unhandledSeen = Set<String>()
        /// At --log-level debug, the first exit to each port and MMIO page, with its time
        /// since swiftlet started: a rough map of where a boot spends its time ("first
        /// exit" lines).
        var firstExitSeen = Set<UInt64>()
        var firstExits: [String] = []
        /// Exits per port or MMIO page and direction (debug): the "exits by place" line.
        var exitCounts: [UInt64: (what: String, count: Int)] = [:]
    }
    private let runState = Locked(RunState())
    /// --log-level debug: accesses to nothing are logged (each kind once, 256 at most), and
    /// the first exit to each port and MMIO page is noted.
    private let debugExits: Bool
    private func noteUnhandled(_ what: String) {
        let first = runState.withLock { s in
            s.unhandledSeen.count < 256 && s.unhandledSeen.insert(what).inserted
        }
        if first { log("unhandled \(what)") }
    }
    private func noteExit(_ key: UInt64, _ what: @autoclosure () -> String) {
        let t = monotonicNanos()
        let start = config.startNanos
        runState.withLock { s in
            if s.exitCounts[key] != nil {
                s.exitCounts[key]!.count += 1
            } else if s.exitCounts.count < 256 {
                s.exitCounts[key] = (what(), 1)
            }
            guard s.firstExits.count < 64, s.firstExitSeen.insert(key).inserted else { return }
            s.firstExits.append("first exit +\((t &- start) / 1000) us: \(what())")
        }
    }
    /// monotonicNanos() just before vCPU 0's first KVM_RUN.
    private var firstRunNanos: UInt64 = 0
    /// Opened by the main thread once its seccomp filter is on; vCPU threads wait for it.
    private let runGate: Gate
    #if DEBUG
    /// Debug builds only: SWIFTLET_DEBUG_SECCOMP_SELFTEST=vcpu|main makes that thread call
    /// a forbidden system call (getppid) right after installing its filter (tests).
    static let seccompSelfTest: String? = getenv("SWIFTLET_DEBUG_SECCOMP_SELFTEST").map { String(cString: $0) }
    #endif

    init(config: MachineConfig, kvm: Hypervisor, memory: GuestMemory, boot: BootCPUState, devices: [OpenedDevice],
         prefetch: KVMPrefetch) throws {
        self.config = config
        debugExits = config.logLevel >= .debug
        self.memory = memory
        self.kvm = kvm
        deadline = config.timeoutNanos.map { t in
            let (d, o) = config.startNanos.addingReportingOverflow(t)
            return o ? UInt64.max : d
        }
        do {
            try kvm.requireCapabilities()
        } catch {
            throw SwiftletError(.hostUnavailable, "\(error)")
        }
        stopEvent = try EventFD()
        serialIRQ = try EventFD()
        runGate = try Gate()
        console = try ConsoleOutput(mode: config.serial)

        phase("KVM opened")
        vm = try prefetch.createVM(kvm)
        // RAM before the irqchip: once the irqchip exists, installing a memory slot waits
        // for an SRCU grace period that `scripts/bench startup` shows as milliseconds.
        _ = try vm.registerMemory(memory)
        phase("VM created, memory registered")
        try vm.setTSSAddress(X86Layout.kvmTSS)
        try vm.setIdentityMapAddress(X86Layout.kvmIdentityMap)
        try vm.createIRQChip()
        try vm.createPIT2()
        phase("irqchip and PIT created")

        // Devices handled inline on the vCPU threads.
        let console = self.console
        let irq = serialIRQ
        serial = Serial16550(output: { console.write($0) }, interrupt: { try? irq.write(1) })
        try vm.registerIrqfd(serialIRQ, gsi: 4)
        let logLevel = config.logLevel
        bootMarker = BootMarker(start: config.startNanos, onMark: { ns in
            if logLevel >= .info { log("boot marker: guest reached userspace \(ns / 1_000_000) ms after swiftlet started") }
        })
        let onEvent: @Sendable (MachineEvent) -> Void = { [unowned self] e in
            self.finish(e == .powerOff ? .poweredOff : .rebooted)
        }
        pio.insert(base: UInt64(X86Layout.com1Port), size: 8, serial)
        pio.insert(base: UInt64(X86Layout.rtcPort), size: 2, CMOSRTC())
        pio.insert(base: UInt64(X86Layout.i8042DataPort), size: 5, I8042(onEvent: onEvent))
        pio.insert(base: UInt64(X86Layout.acpiSleepPort), size: 1, ACPISleepRegister(onEvent: onEvent))
        pio.insert(base: UInt64(PCIHostBridge.port), size: PCIHostBridge.size, PCIHostBridge())
        mmio.insert(base: BootMarker.address, size: BootMarker.size, bootMarker)
        mmio.insert(base: GuestExitRegister.address, size: GuestExitRegister.size,
                    GuestExitRegister(onExit: { [unowned self] s in self.finish(.guestExit(s, debugPort: false)) }))
        if config.isaDebugExit {
            pio.insert(base: UInt64(ISADebugExit.port), size: UInt64(ISADebugExit.size),
                       ISADebugExit(onExit: { [unowned self] s in self.finish(.guestExit(s, debugPort: true)) }))
        }
        let deviceLog = logSink(level: config.logLevel)
        let attached = try attachDevices(devices, vm: vm, memory: memory, mmio: &mmio,
                                         interrupts: config.virtioInterrupts, registers: config.virtioRegisters,
                                         log: deviceLog)
        slots = attached.map(\.slot)
        (mmio, windows) = Machine.countingWindows(
            mmio, metrics: Dictionary(uniqueKeysWithValues: attached.map { (ObjectIdentifier($0.slot), $0.metrics) }))

        // vCPUs: CPUID and MSRs from KVM's own lists, FPU, LAPIC LINT0/1; the boot vCPU
        // enters the kernel's 64-bit entry point, the others wait for INIT/SIPI.
        phase("devices wired")
        let (cpuid, msrs) = try prefetch.lists(kvm)
        let tscDeadline = kvm.has(.tscDeadlineTimer)
        for id in 0..<config.cpus {
            let v = try vm.createVCPU(id: UInt32(id))
            try v.setupCPUID(supported: cpuid, vcpuCount: UInt32(config.cpus), tscDeadlineTimer: tscDeadline)
            try v.setupBootMSRs(available: msrs, cpuid: cpuid)
            try v.setupFPU()
            try v.setupLAPIC()
            if id == 0 {
                var lm = LongModeBoot(entry: boot.rip)
                lm.bootParams = boot.rsi
                lm.stackPointer = boot.rsp
                lm.pml4 = boot.cr3
                lm.gdtBase = boot.gdtBase
                lm.gdtLimit = boot.gdtLimit
                lm.idtBase = boot.idtBase
                lm.idtLimit = boot.idtLimit
                try v.setupLongMode(lm)
            }
            vcpus.append(v)
        }
        // Writes that only latch a register index or address (the CMOS RTC's 0x70-0x71,
        // PCI configuration 0xcf8-0xcff, whose data writes swiftlet ignores) wait in
        // KVM's coalesced ring instead of exiting; they are applied, in order, before the
        // next port exit is served, which is the data read they select. Without the
        // capability every write exits as before.
        if vm.checkExtension(.coalescedPIO) > 0, let ring = vcpus.first?.coalescedRing() {
            coalesced = ring
            try? vm.registerCoalescedPIO(port: X86Layout.rtcPort, size: 2)
            try? vm.registerCoalescedPIO(port: PCIHostBridge.port, size: UInt32(PCIHostBridge.size))
        }
    }

    /// Records how the run ended (first caller wins) and wakes the main thread.
    func finish(_ o: Outcome) {
        let first = runState.withLock { s -> Bool in
            if s.outcome != nil { return false }
            s.outcome = o
            s.stopping = true
            return true
        }
        if first { try? stopEvent.write(1) }
    }

    var isStopping: Bool { runState.withLock { $0.stopping } }

    func run() -> Int32 {
        // Termination signals are taken by the main thread's signalfd; block them before any
        // thread starts so every thread inherits the mask.
        var sigs = sigset_t()
        sigemptyset(&sigs)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1] { sigaddset(&sigs, s) }
        pthread_sigmask(SIG_BLOCK, &sigs, nil)
        let sigfd = signalfd(-1, &sigs, Int32(SFD_CLOEXEC | SFD_NONBLOCK))

        let terminal = RawTerminal()
        if config.serial == .stdio { terminal.enter() }
        defer { terminal.restore() }

        // seccomp ordering: the vCPU threads are created before the main thread restricts
        // itself (so they inherit no filter) and install their own filter, then wait at
        // `runGate` until the main thread has installed its filter: no KVM_RUN happens
        // before every running thread is filtered.
        var threads: [OSThread] = []
        for v in vcpus {
            do {
                threads.append(try spawnThread(name: "vcpu\(v.id)") { [unowned self] in self.vcpuLoop(v) })
            } catch {
                finish(.failed("cannot start vCPU thread: \(error)"))
                break
            }
        }
        let e = Seccomp.install(.main, name: "main")
        if e != 0 { finish(.failed("seccomp: cannot install the main thread's filter: \(errnoText(e)): run with --seccomp off on this kernel")) }
        #if DEBUG
        if Machine.seccompSelfTest == "main" { _ = clinux_syscall0(Int(SYS_getppid)) }
        #endif
        runGate.open()

        waitForEnd(sigfd: sigfd)

        for v in vcpus { v.kick() }
        for t in threads { t.join() }
        let o = runState.withLock { $0.outcome } ?? .failed("no outcome")
        if let path = config.metricsPath { MetricsSink(path: path).write(metricsJSON(exit: o)) }
        for s in slots { s.stop() }
        if sigfd >= 0 { close(sigfd) }
        terminal.restore()

        let elapsed = (monotonicNanos() &- config.startNanos) / 1_000_000
        var line = "\(o.summary) after \(elapsed) ms"
        if let ns = bootMarker.elapsedNanos { line += ", boot marker at \(ns / 1_000_000) ms" }
        let stoppedRunning: Bool
        switch o {
        case .timedOut, .signalled: stoppedRunning = true
        default: stoppedRunning = false
        }
        let positions = stoppedRunning ? vcpuPositions() : []
        if !positions.isEmpty { line += " (" + positions.map(\.short).joined(separator: ", ") + ")" }
        if o.loggedByDefault || config.logLevel >= .info {
            log(line)
            if config.logLevel >= .info { for p in positions { log(p.detail) } }
        }
        if config.logLevel >= .debug {
            // Absolute CLOCK_MONOTONIC too, so a harness can measure from its exec().
            var last = config.startNanos
            for (name, t) in startupPhases + [("vCPUs set up, threads started", firstRunNanos)] {
                log("startup: +\((t &- last) / 1000) us \(name)")
                last = t
            }
            log("startup: first KVM_RUN \((firstRunNanos &- config.startNanos) / 1000) us after main, at monotonic \(firstRunNanos) ns")
            for line in runState.withLock({ $0.firstExits }) { log(line) }
            let top = runState.withLock { $0.exitCounts.values.sorted { $0.count > $1.count }.prefix(12) }
            log("exits by place: " + top.map { "\($0.what) \($0.count)" }.joined(separator: ", "))
            let rss = residentSetBytes()
            let anon = (procKiB("/proc/self/status", "RssAnon:") ?? 0) * 1024
            let file = (procKiB("/proc/self/status", "RssFile:") ?? 0) * 1024
            let guest = memory.residentBytes()
            log("memory: rss \(rss >> 10) KiB, guest RAM resident \(guest >> 10) KiB, swiftlet's own \((rss &- guest) >> 10) KiB (anonymous \((anon &- guest) >> 10) KiB, mapped files \(file >> 10) KiB)")
        }
        return o.status
    }

    /// Where each vCPU of a guest stopped from outside (--timeout, a signal) was, read once
    /// the vCPU threads are joined: `short` names the instruction pointer, `detail` the
    /// registers that say which address space and mode it ran in (a hung guest's first
    /// clue). A vCPU whose state cannot be read is left out.
    private func vcpuPositions() -> [(short: String, detail: String)] {
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        return vcpus.compactMap { v in
            guard let r = try? v.getRegs(), let s = try? v.getSregs() else { return nil }
            // A page table root outside guest RAM: no address the vCPU uses can translate,
            // and every instruction fetch faults again.
            var lost = ""
            if let root = pagingRoot(cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer),
               !memory.isValid(root.address, length: root.length) {
                lost = " with its page table root \(hex(root.address)) outside guest RAM"
            }
            return ("vCPU \(v.id) at rip \(hex(r.rip))" + lost,
                    "vCPU \(v.id) stopped at rip \(hex(r.rip)) rsp \(hex(r.rsp)) rflags \(hex(r.rflags)) "
                    + "cs \(hex(s.cs.selector)) cr0 \(hex(s.cr0)) cr2 \(hex(s.cr2)) cr3 \(hex(s.cr3)) "
                    + "cr4 \(hex(s.cr4)) efer \(hex(s.efer))" + lost)
        }
    }

    /// The main thread: feeds stdin to the UART, watches for termination signals, and
    /// returns once the run has an outcome.
    private func waitForEnd(sigfd: Int32) {
        var readStdin = config.serial == .stdio
        var pending: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 256)
        while !isStopping {
            var fds = [pollfd(fd: stopEvent.fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: sigfd, events: Int16(POLLIN), revents: 0)]
            if readStdin && pending.isEmpty { fds.append(pollfd(fd: 0, events: Int16(POLLIN), revents: 0)) }
            // With input waiting for FIFO room, look again soon.
            var wait: Int32 = pending.isEmpty ? -1 : 5
            if let d = deadline {
                let now = monotonicNanos()
                if now >= d {
                    finish(.timedOut(config.timeoutNanos ?? 0))
                    break
                }
                let ms = min((d - now + 999_999) / 1_000_000, UInt64(Int32.max))
                wait = wait < 0 ? Int32(ms) : min(wait, Int32(ms))
            }
            let r = poll(&fds, nfds_t(fds.count), wait)
            if r < 0 && errno != EINTR { finish(.failed("poll: \(errnoText(errno))")); break }
            if fds[1].revents & Int16(POLLIN) != 0 {
                var info = signalfd_siginfo()
                if read(sigfd, &info, MemoryLayout<signalfd_siginfo>.size) > 0 {
                    if Int32(info.ssi_signo) == SIGUSR1 {
                        // A snapshot while running; to stderr when no --metrics was given.
                        MetricsSink(path: config.metricsPath ?? "-").write(metricsJSON())
                    } else {
                        finish(.signalled(Int32(info.ssi_signo)))
                    }
                }
            }
            if fds.count > 2 && fds[2].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let n = read(0, &buf, buf.count)
                if n > 0 { pending += buf[0..<n] } else if n == 0 || (errno != EINTR && errno != EAGAIN) { readStdin = false }
            }
            if !pending.isEmpty {
                let taken = pending.withUnsafeBytes { serial.enqueueInput($0) }
                pending.removeFirst(taken)
            }
        }
    }

    /// One vCPU: KVM_RUN until the machine stops, dispatching the exits that need swiftlet.
    private func vcpuLoop(_ v: VCPU) {
        do {
            try v.enableKick()
        } catch {
            finish(.failed("vCPU \(v.id): \(error)"))
            return
        }
        defer { v.disableKick() }
        let e = Seccomp.install(.vcpu, name: "vcpu\(v.id)")
        if e != 0 {
            finish(.failed("seccomp: cannot install the vCPU filter: \(errnoText(e)): run with --seccomp off on this kernel"))
            return
        }
        #if DEBUG
        if Machine.seccompSelfTest == "vcpu" { _ = clinux_syscall0(Int(SYS_getppid)) }
        #endif
        runGate.wait()
        if v.id == 0 { firstRunNanos = monotonicNanos() }
        while !isStopping {
            let exit: VCPUExit
            exitCounters.runs.wrappingAdd(1, ordering: .relaxed)
            do {
                exit = try v.run()
            } catch {
                finish(.failed("vCPU \(v.id): \(error)"))
                return
            }
            switch exit {
            case let .io(port, size, isWrite, count, data):
                exitCounters.pio.wrappingAdd(1, ordering: .relaxed)
                if debugExits { noteExit(UInt64(port) | (isWrite ? 1 << 32 : 0), "port 0x\(String(port, radix: 16)) \(isWrite ? "write" : "read")") }
                handlePIO(port: port, size: size, isWrite: isWrite, count: count, data: data)
            case let .mmio(address, length, isWrite, data):
                exitCounters.mmio.wrappingAdd(1, ordering: .relaxed)
                if debugExits { noteExit(address >> 12 | 1 << 63 | (isWrite ? 1 << 62 : 0), "MMIO 0x\(String(address, radix: 16)) \(isWrite ? "write" : "read")") }
                handleMMIO(address: address, length: length, isWrite: isWrite, data: data)
            case .hlt:
                // Only without an in-kernel irqchip; ours has one, so a HLT exit means the
                // vCPU stopped for good.
                finish(.crashed("vCPU \(v.id) halted"))
            case .shutdown:
                finish(.crashed("triple fault on vCPU \(v.id)"))
            case let .systemEvent(type):
                switch type {
                case 1: finish(.poweredOff)
                case 2: finish(.rebooted)
                default: finish(.crashed("system event \(type) on vCPU \(v.id)"))
                }
            case let .internalError(sub):
                finish(.crashed("KVM internal error (suberror \(sub)\(sub == 1 ? ", emulation failure" : "")) on vCPU \(v.id)\(Self.cpuState(v))"))
            case let .failEntry(reason):
                finish(.crashed("KVM entry failed (hardware reason 0x\(String(reason, radix: 16))) on vCPU \(v.id)"))
            case .interrupted:
                exitCounters.other.wrappingAdd(1, ordering: .relaxed)
                if !isStopping { v.clearImmediateExit() }
            case let .unknown(reason):
                finish(.crashed("unexpected KVM exit \(reason) on vCPU \(v.id)"))
            }
        }
    }

    /// " (rip=... rsp=... cr0=... cr3=... cr4=... efer=...)" of a vCPU stopped by a KVM
    /// internal error, for the crash line ("" when KVM cannot tell). Not for a triple
    /// fault: KVM has reset the vCPU by then.
    static func cpuState(_ v: VCPU) -> String {
        guard let r = try? v.getRegs(), let s = try? v.getSregs() else { return "" }
        func h(_ x: UInt64) -> String { "0x" + String(x, radix: 16) }
        return " (rip=\(h(r.rip)) rsp=\(h(r.rsp)) cr0=\(h(s.cr0)) cr2=\(h(s.cr2)) cr3=\(h(s.cr3)) cr4=\(h(s.cr4)) efer=\(h(s.efer)))"
    }

    @inline(__always)
    private func handlePIO(port: UInt16, size: Int, isWrite: Bool, count: Int, data: UnsafeMutableRawPointer) {
        if let ring = coalesced {
            ring.drain { p, s, v in
                if let (dev, off) = pio.lookup(UInt64(p), length: 1) { dev.write(offset: UInt16(off), size: s, value: v) }
            }
        }
        guard let (dev, off) = pio.lookup(UInt64(port), length: 1) else {
            // Nothing there: reads float high, writes vanish.
            if !isWrite { memset(data, 0xff, size * count) }
            if debugExits { noteUnhandled("port 0x\(String(port, radix: 16)) \(isWrite ? "write" : "read") size \(size)") }
            return
        }
        for i in 0..<count {
            let p = data + i * size
            if isWrite {
                let v: UInt32
                switch size {
                case 1: v = UInt32(p.load(as: UInt8.self))
                case 2: v = UInt32(p.loadUnaligned(as: UInt16.self))
                default: v = p.loadUnaligned(as: UInt32.self)
                }
                dev.write(offset: UInt16(off), size: size, value: v)
            } else {
                let v = dev.read(offset: UInt16(off), size: size)
                switch size {
                case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: v), as: UInt8.self)
                case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: v), toByteOffset: 0, as: UInt16.self)
                default: p.storeBytes(of: v, toByteOffset: 0, as: UInt32.self)
                }
            }
        }
    }

    @inline(__always)
    private func handleMMIO(address: UInt64, length: Int, isWrite: Bool, data: UnsafeMutableRawPointer) {
        guard let (dev, off) = mmio.lookup(address, length: UInt64(length)) else {
            if !isWrite { memset(data, 0, 8) }
            if debugExits { noteUnhandled("MMIO 0x\(String(address, radix: 16)) \(isWrite ? "write" : "read") size \(length)") }
            return
        }
        if isWrite {
            var v: UInt64 = 0
            memcpy(&v, data, length)
            dev.write(offset: off, size: length, value: UInt64(littleEndian: v))
        } else {
            var v = dev.read(offset: off, size: length).littleEndian
            memcpy(data, &v, length)
        }
    }
}

/// A log line on stderr (CR LF so it reads right while the terminal is raw).
func log(_ s: String) {
    writeStderr("swiftlet: \(s)\r\n")
}

/// Where the devices' log lines go: `print` (stderr) for those at `level` (--log-level)
/// or a more important one.
func logSink(level: LogLevel, print: @escaping @Sendable (String) -> Void = { log($0) }) -> LogSink {
    { lineLevel, line in if lineLevel <= level { print(line) } }
}

/// This process's resident set (VmRSS) in bytes.
func residentSetBytes() -> UInt64 { (procKiB("/proc/self/status", "VmRSS:") ?? 0) * 1024 }
