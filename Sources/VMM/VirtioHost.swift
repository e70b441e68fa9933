// Runs a virtio-mmio device in the machine.
//
// A `VirtioMMIOSlot` owns one device's register window [base, base+0x1000), its
// `VirtioMMIOTransport`, its interrupt line (the device's GSI) and, while the
// driver has the device running (DRIVER_OK), per active queue:
//   - an eventfd registered as ioeventfd on QueueNotify (base + 0x050, 4 bytes,
//     datamatch = queue index), so the guest's kick never exits to swiftlet;
//   - one thread per group of queues (the device's queueHandlerGroups: "blk0-q0" for
//     each virtio-blk queue, "net0-q0+1" for each virtio-net rx/tx pair) that polls the
//     group's kick eventfds, a stop eventfd and the handlers' completion fds, and calls
//     the handlers. A handler that brings its own kick eventfd (`ownKick`: virtio-net
//     with vhost, whose kicks the host kernel takes) has that one registered, and the
//     thread does not poll it.
// The device calls the transport's VirtioInterruptSink, which sets the InterruptStatus
// bit and decides when the slot's `InterruptLine` goes up or down (VirtioInterruptMode
// picks the line). Level-triggered, as in QEMU, the line is high while InterruptStatus
// is nonzero:
//   - line (`IRQLine`): KVM_IRQ_LINE high when a bit is set, low when the
//     driver's InterruptACK (or a reset) clears the last one, as QEMU does;
//   - irqfd (`ResampledIrqfd`): an irqfd with KVM_IRQFD_FLAG_RESAMPLE asserts the GSI
//     until the guest's EOI; KVM then deasserts it and signals the resample eventfd, and
//     the "<name>-irq" thread asks the transport to re-assert it if InterruptStatus is
//     still nonzero.
// With `edge` (the default) the interrupt is edge-triggered instead (the DSDT says Edge,
// as Firecracker's): the transport raises the GSI with KVM_IRQ_LINE (`IRQLine`) when it sets
// an InterruptStatus bit with no edge since the guest last read InterruptStatus, and
// lowers it at that read (on the vCPU thread, which exits for the read anyway), so the
// queue thread makes one ioctl per interrupt; `AckIoeventfds` registers an ioeventfd per InterruptACK
// value 0-3 (4 bytes, datamatch), so Linux's ACK completes in KVM; the transport takes the
// values at the next InterruptStatus read (its generation rule keeps a bit set again
// after that read). An interrupt then costs the guest one exit to swiftlet, the read; with
// the register page (`VirtioRegisterMode.page`, the default) none: the read is a read of
// memory, each pulse is raised and lowered at once, and the ACKs are taken by the next
// signal (MMIOTransport's `pagedEdgeSet`).
// Other ACK writes (other values or sizes) still exit and are applied at once.
//
// The slot needs three things of the VM, behind `VirtioVM`: the irqchip line, irqfds and
// ioeventfds. KVM's VirtualMachine provides them; unit tests use a fake.
//
// Driver reset (status 0) and machine stop deregister the ioeventfds, stop and join the
// queue threads (each waits for its requests in flight), then the device forgets its
// queues. Re-activation after a reset starts everything again.
//
// The vCPU threads see only the register accesses that are not kicks: the machine routes
// MMIO exits in the window to `read(offset:size:)` / `write(offset:size:value:)`. A kick
// that does exit (an ioeventfd KVM refused) still reaches the queue thread: the transport
// passes it to the device it runs (`queueNotified`).
import Glibc
import GuestMemory
import OS
import KVM
import Boot
import Devices
import Virtio
import Seccomp
import Synchronization

/// What a virtio-mmio slot needs from the VM.
public protocol VirtioVM: AnyObject, Sendable {
    /// Drives GSI `gsi` high or low (KVM_IRQ_LINE).
    func irqLine(gsi: UInt32, level: Bool) throws
    /// A level-triggered irqfd: a write to `eventfd` asserts `gsi` until the guest's EOI,
    /// then the irqchip deasserts it and signals `resample`.
    func registerIrqfd(_ eventfd: EventFD, gsi: UInt32, resample: EventFD) throws
    func deassignIrqfd(_ eventfd: EventFD, gsi: UInt32) throws
    /// A guest write of `length` bytes of `datamatch` to `address` signals `eventfd`
    /// without an exit.
    func registerIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws
    func deassignIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws
    /// Maps `page` read-only at `address`, so that the guest's reads there do not exit,
    /// and keeps `page` as long as the VM lives; returns the token `unmapRegisterPage` takes.
    func mapRegisterPage(_ page: RegisterPage, at address: UInt64) throws -> UInt32
    func unmapRegisterPage(_ token: UInt32, at address: UInt64) throws
}

extension VirtualMachine: VirtioVM {
    public func mapRegisterPage(_ page: RegisterPage, at address: UInt64) throws -> UInt32 {
        try mapReadOnly(host: page.bytes, guestBase: address, size: UInt64(RegisterPage.size), owner: page)
    }

    public func unmapRegisterPage(_ token: UInt32, at address: UInt64) throws {
        try unmap(slot: token, guestBase: address)
    }
}

/// Where the guest's reads of a virtio-mmio window go.
public enum VirtioRegisterMode: Equatable, Sendable {
    /// A read-only page of the window's registers (RegisterPage): reads do not exit.
    case page
    /// Every read exits to swiftlet.
    case exit

    /// SWIFTLET_VIRTIO_REGISTERS=exit: every read exits; `page` otherwise.
    public static var fromEnvironment: VirtioRegisterMode {
        getenv("SWIFTLET_VIRTIO_REGISTERS").map { String(cString: $0) == "exit" } == true ? .exit : .page
    }
}

/// One running group of queues (one queue, or a virtio-net rx/tx pair): a kick eventfd
/// per queue, one stop eventfd, one thread.
final class QueueWorker {
    private(set) var indices: [Int] = []
    private(set) var kicks: [EventFD] = []
    let stop: EventFD
    /// Per queue: its kick eventfd is registered as an ioeventfd.
    var ioeventfd: [Bool] = []
    var thread: OSThread?

    init(stop: EventFD) { self.stop = stop }

    func add(index: Int, kick: EventFD, ioeventfd registered: Bool) {
        indices.append(index)
        kicks.append(kick)
        ioeventfd.append(registered)
    }

    /// The group's thread (Virtio's `serveQueueGroup`); a failed poll is logged.
    static func loop(handlers: [VirtioQueueHandler], kicks: [EventFD], stop: EventFD, log: RateLimitedLog?) {
        let what = "virtio queue " + handlers.map { String($0.queueIndex) }.joined(separator: "+")
        serveQueueGroup(handlers: handlers, kicks: kicks, stop: stop, onPollFailure: { e in
            log?.warn("queue thread poll failed", "\(what): poll failed: \(errnoText(e))")
        })
    }
}

/// Wraps the device the transport sees: activation starts the queue threads, reset stops them.
final class HostedDeviceAdapter: VirtioDevice {
    let inner: any HostedVirtioDevice
    let vm: any VirtioVM
    let notifyAddress: UInt64
    let name: String
    let log: RateLimitedLog?
    struct State {
        var workers: [QueueWorker] = []
        /// The machine stopped: no activation any more.
        var shutDown = false
    }
    let state = Locked(State())
    /// The running groups of queues (tests look at their eventfds).
    var workers: [QueueWorker] { state.withLock { $0.workers } }

    init(inner: any HostedVirtioDevice, vm: any VirtioVM, base: UInt64, name: String, log: RateLimitedLog?) {
        self.inner = inner
        self.vm = vm
        self.notifyAddress = base + VirtioMMIOReg.queueNotify
        self.name = name
        self.log = log
    }

    var deviceType: UInt32 { inner.deviceType }
    var queueMaxSizes: [UInt16] { inner.queueMaxSizes }
    var deviceFeatures: UInt64 { inner.deviceFeatures }
    var configSize: Int { inner.configSize }
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) { inner.readConfig(offset: offset, into: buffer) }
    func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) { inner.writeConfig(offset: offset, bytes: bytes) }

    func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, interrupt: any VirtioInterruptSink) throws {
        try state.withLock { s in
            guard !s.shutDown else { throw SwiftletError(.runtimeError, "\(name): activated after the machine stopped") }
            stopWorkers(&s)
            try inner.activate(queues: queues, memory: memory, features: features, interrupt: interrupt)
            do {
                for g in inner.queueHandlerGroups where !g.isEmpty { try startWorker(g, &s) }
            } catch {
                log?.warn("cannot start queue threads", "\(name): cannot start queue threads: \(error)")
                stopWorkers(&s)
                inner.reset()
                throw error
            }
        }
    }

    private func startWorker(_ handlers: [VirtioQueueHandler], _ s: inout State) throws {
        let indices = handlers.map(\.queueIndex)
        let stop = try EventFD()
        let w = QueueWorker(stop: stop)
        s.workers.append(w)  // before anything is registered: a failure below still deregisters it
        for h in handlers {
            let i = h.queueIndex
            let kick = try h.ownKick ?? EventFD()
            var registered = true
            do {
                try vm.registerIoeventfd(kick, address: notifyAddress, length: 4, datamatch: UInt64(i), pio: false)
            } catch {
                // Kicks then exit to the vCPU and come back through queueNotified.
                registered = false
                log?.warn("no ioeventfd", "\(name) queue \(i): no ioeventfd (\(error)): kicks go through MMIO exits")
            }
            w.add(index: i, kick: kick, ioeventfd: registered)
        }
        let log = self.log
        let kicks = w.kicks
        let threadName = "\(name)-q" + indices.map(String.init).joined(separator: "+")
        w.thread = try spawnThread(name: threadName) {
            Seccomp.installOrExit(.queue, name: threadName)
            QueueWorker.loop(handlers: handlers, kicks: kicks, stop: stop, log: log)
        }
    }

    /// Deregisters the ioeventfds, then stops and joins every queue thread.
    private func stopWorkers(_ s: inout State) {
        for w in s.workers {
            for (k, i) in w.indices.enumerated() where w.ioeventfd[k] {
                do {
                    try vm.deassignIoeventfd(w.kicks[k], address: notifyAddress, length: 4, datamatch: UInt64(i), pio: false)
                } catch {
                    log?.warn("cannot deregister an ioeventfd", "\(name) queue \(i): cannot deregister ioeventfd: \(error)")
                }
                w.ioeventfd[k] = false
            }
        }
        for w in s.workers where w.thread != nil {
            do { try w.stop.write(1) } catch { log?.warn("cannot stop a queue thread", "\(name) queues \(w.indices): cannot signal stop: \(error)") }
        }
        for w in s.workers { w.thread?.join() }
        s.workers = []
    }

    func reset() {
        state.withLock { s in
            stopWorkers(&s)
            inner.reset()
        }
    }

    /// A QueueNotify write that exited to swiftlet: pass it to the queue's thread.
    func queueNotified(_ queue: Int) {
        state.withLock { s in
            for w in s.workers {
                if let k = w.indices.firstIndex(of: queue) { try? w.kicks[k].write(1) }
            }
        }
    }

    /// Machine stop: no activation afterwards.
    func shutdown() {
        state.withLock { s in
            s.shutDown = true
            stopWorkers(&s)
            inner.reset()
        }
    }

    var threadCount: Int { state.withLock { $0.workers.filter { $0.thread != nil }.count } }
}

/// A virtio-mmio device in the machine: register window, transport, interrupt line, queue
/// threads.
public final class VirtioMMIOSlot: MMIODevice, Sendable {
    /// Size of a device's register window.
    public static let windowSize: UInt64 = 0x1000

    public let base: UInt64
    public let gsi: UInt32
    /// Thread name prefix, e.g. "blk0".
    public let name: String
    public let transport: VirtioMMIOTransport
    /// The device model.
    public let device: any HostedVirtioDevice
    let adapter: HostedDeviceAdapter
    /// The resampling irqfd and its thread (VirtioInterruptMode.irqfd), else nil.
    let irqfd: ResampledIrqfd?
    /// The InterruptACK ioeventfds (VirtioInterruptMode.edge), else nil.
    let acks: AckIoeventfds?
    public let interrupts: VirtioInterruptMode
    /// The device's log, shared by the transport, the device model and its threads.
    let log: RateLimitedLog?
    private let stopped = Atomic<Bool>(false)

    /// Builds the transport around `device` and wires its level-triggered interrupt to
    /// `gsi` (`interrupts`). `vm` must have the in-kernel irqchip and `memory` registered.
    /// Nothing runs until the driver sets DRIVER_OK. `log`: the device's (the one its
    /// device model was made with).
    /// `registers`: `.page` maps a read-only register page at `base` (one warning and
    /// `.exit` when the VM refuses it).
    public init(vm: any VirtioVM, memory: GuestMemory, device: any HostedVirtioDevice, base: UInt64, gsi: UInt32,
                name: String, interrupts: VirtioInterruptMode = .line, registers: VirtioRegisterMode = .exit,
                log: RateLimitedLog? = nil) throws {
        self.base = base
        self.gsi = gsi
        self.name = name
        self.device = device
        self.log = log
        self.interrupts = interrupts
        adapter = HostedDeviceAdapter(inner: device, vm: vm, base: base, name: name, log: log)
        let line: any InterruptLine
        var trigger = InterruptTrigger.level
        switch interrupts {
        case .line:
            line = IRQLine(vm: vm, gsi: gsi, log: log)
            (irqfd, acks) = (nil, nil)
        case .irqfd:
            let r = try ResampledIrqfd(vm: vm, gsi: gsi)
            line = r
            (irqfd, acks) = (r, nil)
        case .edge:
            let a = try AckIoeventfds(vm: vm, address: base + VirtioMMIOReg.interruptACK, name: name, log: log)
            line = IRQLine(vm: vm, gsi: gsi, log: log)
            trigger = .edge(acks: a)
            (irqfd, acks) = (nil, a)
        }
        var page: RegisterPage?
        var mapping: UInt32?
        if registers == .page {
            do {
                let p = try RegisterPage()
                mapping = try vm.mapRegisterPage(p, at: base)
                page = p
            } catch {
                log?.warn("no register page", "\(name): no read-only register page (\(error)): every register read exits")
            }
        }
        // The page holds what reads return from the moment the transport exists; the guest
        // runs only later.
        transport = VirtioMMIOTransport(device: adapter, memory: memory, line: line, trigger: trigger, log: log,
                                        registerPage: page)
        do {
            try irqfd?.start(transport: transport, name: name, log: log)
        } catch {
            // A slot that failed to build takes its register page out of the VM.
            if let mapping {
                do { try vm.unmapRegisterPage(mapping, at: base) } catch {
                    log?.warn("cannot unmap the register page", "\(name): cannot remove the register page: \(error)")
                }
            }
            throw error
        }
    }

    /// Reads of the window come from the read-only register page (no exit).
    public var readsWithoutExit: Bool { transport.registerPage != nil }

    /// Device `index` at X86Layout.virtioMMIOAddress(index:) with GSI X86Layout.virtioGSI(index:).
    public convenience init(vm: any VirtioVM, memory: GuestMemory, device: any HostedVirtioDevice, index: Int,
                            name: String, interrupts: VirtioInterruptMode = .line, registers: VirtioRegisterMode = .exit,
                            log: RateLimitedLog? = nil) throws {
        guard index >= 0, index < X86Layout.maxVirtioDevices, let gsi = X86Layout.virtioGSI(index: index) else {
            throw SwiftletError(.usage, "too many virtio devices: at most \(X86Layout.maxVirtioDevices)")
        }
        try self.init(vm: vm, memory: memory, device: device, base: X86Layout.virtioMMIOAddress(index: index),
                      gsi: gsi, name: name, interrupts: interrupts, registers: registers, log: log)
    }

    deinit { stop() }

    /// For the ACPI DSDT (LinuxBootConfig.virtioDevices).
    public var acpiDescription: VirtioMMIODeviceDescription {
        VirtioMMIODeviceDescription(address: base, size: VirtioMMIOSlot.windowSize, gsi: gsi,
                                    levelTriggered: interrupts.levelTriggered)
    }

    /// The description device `index` will have, before any VM exists (the boot tables are
    /// written before the VM is created). nil past the last GSI.
    public static func acpiDescription(index: Int, interrupts: VirtioInterruptMode = .line) -> VirtioMMIODeviceDescription? {
        guard index >= 0, index < X86Layout.maxVirtioDevices, let gsi = X86Layout.virtioGSI(index: index) else { return nil }
        return VirtioMMIODeviceDescription(address: X86Layout.virtioMMIOAddress(index: index), size: windowSize, gsi: gsi,
                                           levelTriggered: interrupts.levelTriggered)
    }

    /// Queue threads running now.
    public var queueThreadCount: Int { adapter.threadCount }

    /// Machine stop: stops and joins the queue threads (after their requests in flight),
    /// deregisters the ioeventfds and the irqfd. The device stays inert afterwards.
    /// Idempotent; call after the vCPU threads have been joined.
    public func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        adapter.shutdown()
        irqfd?.stop()
        acks?.stop()
        // The register page stays in the VM until the VM goes (which keeps the page): the
        // vCPUs are joined, nothing reads it, and main's seccomp filter allows no new slot.
        log?.flush()
    }

    // MARK: MMIODevice (vCPU threads)

    public func read(offset: UInt64, size: Int) -> UInt64 {
        guard size == 1 || size == 2 || size == 4 || size == 8, offset < VirtioMMIOSlot.windowSize else { return 0 }
        var v: UInt64 = 0
        withUnsafeMutableBytes(of: &v) { transport.read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<size])) }
        return UInt64(littleEndian: v)
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard size == 1 || size == 2 || size == 4 || size == 8, offset < VirtioMMIOSlot.windowSize else { return }
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { transport.write(offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
    }
}

/// A level-triggered line driven with KVM_IRQ_LINE (VirtioInterruptMode.line). The
/// transport says when it goes up or down; this only keeps KVM from being told what it
/// already knows.
final class IRQLine: InterruptLine {
    let vm: any VirtioVM
    let gsi: UInt32
    let log: RateLimitedLog?
    /// What KVM was last told, and whether a failure was logged.
    private struct Level {
        var high = false
        var loggedError = false
    }
    private let level = Locked(Level())

    init(vm: any VirtioVM, gsi: UInt32, log: RateLimitedLog?) {
        self.vm = vm
        self.gsi = gsi
        self.log = log
    }

    func raise() { set(true) }
    func lower() { set(false) }

    private func set(_ want: Bool) {
        level.withLock { l in
            guard want != l.high else { return }
            do {
                try vm.irqLine(gsi: gsi, level: want)
                l.high = want
            } catch {
                if !l.loggedError { log?.warn("interrupt line failed", "virtio interrupt line \(gsi): \(error)") }
                l.loggedError = true
            }
        }
    }
}

/// A level-triggered line through KVM_IRQFD with resampling (VirtioInterruptMode.irqfd):
/// an eventfd write asserts it, KVM deasserts it at the guest's EOI, and the "-irq"
/// thread asks the transport to re-assert it while InterruptStatus is nonzero.
final class ResampledIrqfd: InterruptLine {
    let vm: any VirtioVM
    let gsi: UInt32
    let eventfd: EventFD
    let resample: EventFD
    let stopEvent: EventFD
    private let thread = Locked<OSThread?>(nil)

    init(vm: any VirtioVM, gsi: UInt32) throws {
        self.vm = vm
        self.gsi = gsi
        eventfd = try EventFD()
        resample = try EventFD()
        stopEvent = try EventFD()
    }

    func raise() { try? eventfd.write(1) }
    /// KVM lowers the line itself at the guest's EOI.
    func lower() {}

    func start(transport: VirtioMMIOTransport, name: String, log: RateLimitedLog?) throws {
        try vm.registerIrqfd(eventfd, gsi: gsi, resample: resample)
        let (resample, stop) = (self.resample, stopEvent)
        do {
            let t = try spawnThread(name: "\(name)-irq") {
                Seccomp.installOrExit(.irq, name: "\(name)-irq")
                // Reads the resample eventfd before it looks at InterruptStatus, so an EOI
                // after the look brings a new wake-up.
                pollUntilStopped(stop: stop, watch: [resample.fd], onFailure: { e in
                    log?.warn("queue thread poll failed", "virtio interrupt resample: poll failed: \(errnoText(e))")
                }) { _ in
                    _ = try? resample.read()
                    transport.reassertIfPending()
                }
            }
            thread.withLock { $0 = t }
        } catch {
            try? vm.deassignIrqfd(eventfd, gsi: gsi)
            throw error
        }
    }

    /// Stops and joins the -irq thread, then deassigns the irqfd. Idempotent.
    func stop() {
        guard let t = thread.withLock({ t -> OSThread? in defer { t = nil }; return t }) else { return }
        try? stopEvent.write(1)
        t.join()
        try? vm.deassignIrqfd(eventfd, gsi: gsi)
    }
}

/// The guest's InterruptACK writes of 0, 1, 2 and 3 (4 bytes), caught by one ioeventfd
/// per value (datamatch), so they complete in KVM without an exit
/// (VirtioInterruptMode.edge). The transport takes them at the next InterruptStatus read.
/// A value whose ioeventfd KVM refused exits as before and is applied at once. Writing 0
/// acknowledges nothing (Linux writes back what it read, 0 after a spurious interrupt):
/// its eventfd is only emptied at a reset, and at DRIVER_OK with the register page.
final class AckIoeventfds: DeferredInterruptAcks {
    let vm: any VirtioVM
    let address: UInt64
    /// Per value 0...3: its eventfd, nil where KVM refused the ioeventfd.
    let fds: [EventFD?]
    private let registered = Atomic<Bool>(true)
    let log: RateLimitedLog?
    /// ACKs of 1, 2 or 3 that completed in KVM, as taken so far (--metrics).
    let caught = Atomic<UInt64>(0)

    init(vm: any VirtioVM, address: UInt64, name: String, log: RateLimitedLog?) throws {
        self.vm = vm
        self.address = address
        self.log = log
        // Every eventfd first: nothing below throws, so nothing is left registered.
        let all = try (0...3).map { _ in try EventFD() }
        var fds: [EventFD?] = []
        for (v, e) in all.enumerated() {
            do {
                try vm.registerIoeventfd(e, address: address, length: 4, datamatch: UInt64(v), pio: false)
                fds.append(e)
            } catch {
                log?.warn("no ioeventfd", "\(name): no ioeventfd for InterruptACK \(v) (\(error)): it exits to swiftlet")
                fds.append(nil)
            }
        }
        self.fds = fds
    }

    func take() -> UInt32 {
        var v: UInt32 = 0
        for value in 1...3 {
            if let e = fds[value], let n = try? e.read(), n > 0 {
                v |= UInt32(value)
                caught.wrappingAdd(n, ordering: .relaxed)
            }
        }
        return v
    }

    func drain() {
        for e in fds { _ = try? e?.read() }
    }

    /// Deassigns the ioeventfds (machine stop; the vCPUs are joined). Idempotent.
    func stop() {
        guard registered.exchange(false, ordering: .acquiringAndReleasing) else { return }
        for (v, e) in fds.enumerated() {
            guard let e else { continue }
            do {
                try vm.deassignIoeventfd(e, address: address, length: 4, datamatch: UInt64(v), pio: false)
            } catch {
                log?.warn("cannot deregister an ioeventfd", "InterruptACK \(v): cannot deregister ioeventfd: \(error)")
            }
        }
    }
}
