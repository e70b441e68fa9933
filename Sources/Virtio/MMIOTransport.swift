// virtio-mmio transport, version 2 (modern only; virtio 1.2 §4.2.2).
//
// Register accesses arrive from vCPU threads (MMIO exits) and are serialized by a mutex.
// Device worker threads never take that mutex: they signal through atomics
// (interrupt status, NEEDS_RESET, config generation), so a reset that stops and joins
// the workers from inside a register write cannot deadlock.
//
// The interrupt is level-triggered by default, as on virtio-mmio hardware: the transport
// owns InterruptStatus and alone decides when its `InterruptLine` goes up (a bit was set)
// and down (the driver's InterruptACK or a reset cleared the last bit). Line changes are
// serialized by a second small mutex and always re-read InterruptStatus, so a raise racing
// an acknowledgement ends with the line matching InterruptStatus.
//
// Edge-triggered (`InterruptTrigger.edge`): `InterruptLine.raise()` starts one edge, and
// the next InterruptStatus read (or a reset, or DRIVER_OK) ends it with `lower()`, so the
// next raise is a new edge. The driver's InterruptACK may be caught without an exit (`DeferredInterruptAcks`, ioeventfds
// in the VMM) and applied only at the next InterruptStatus read, which exits anyway. So
// that a deferred ACK never clears a bit set after the driver last looked, every bit has a
// generation, bumped each time the bit is set; each InterruptStatus read snapshots them, and
// a deferred ACK clears a bit only while its generation still equals the snapshot (no set
// since that read). Otherwise the bit stays set. Bits, generations and pulses change under
// one mutex (`edgeLock`).
//
// Why nothing is lost, for a driver that handles an interrupt as Linux's vm_interrupt
// does (read InterruptStatus, write it to InterruptACK, then look at the queues whose bit
// it read): a deferred ACK clears bit b only if b was set at the last read and not set
// again since; that read's handler looks at the queues after its ACK, so it sees every
// buffer used before that read. A set after the read keeps the bit, and is either pulsed
// or folded into a pulse sent after the read: a pulse whose handler has not read yet
// brings one more read (the local APIC holds an edge that arrives while the vector is in
// service), which sees the bit.
//
// With the register page (RegisterPage.swift) no InterruptStatus read exits, so a pulse
// ends when the next signal finds an ACK the guest wrote since (`pagedEdgeSet`), and each
// pulse is a whole edge (raised and lowered at once).
import OS
import GuestMemory
import Synchronization

/// How a running device talks back to its transport.
public protocol VirtioInterruptSink: AnyObject, Sendable {
    /// Sets InterruptStatus bit 0 (used buffer), then signals the interrupt.
    func signalUsedBuffer()
    /// Bumps ConfigGeneration, sets InterruptStatus bit 1, then signals the interrupt.
    func signalConfigChange()
    /// The driver broke the rules: sets DEVICE_NEEDS_RESET and (once DRIVER_OK) raises a
    /// configuration-change interrupt. The device must stop using its queues.
    func markNeedsReset()
}

/// A device's interrupt line (its GSI on the irqchip), driven by the transport.
public protocol InterruptLine: AnyObject, Sendable {
    /// Assert the line: InterruptStatus is nonzero. Called again for a new interrupt the
    /// driver must see (a config change, the guest's EOI with bits still set) even while
    /// the line is up; a line the irqchip lowers at the guest's EOI (a resampling irqfd)
    /// must assert it again then.
    func raise()
    /// InterruptStatus is zero: deassert the line (a line the irqchip lowers itself at the
    /// guest's EOI ignores this).
    func lower()
}

/// InterruptACK writes the VMM caught without an exit (edge-triggered interrupts): the
/// transport takes them at the next InterruptStatus read and applies them there.
public protocol DeferredInterruptAcks: AnyObject, Sendable {
    /// The values written since the last call, ORed together (0 if none). Called with the
    /// transport's `edgeLock` held.
    func take() -> UInt32
    /// Forgets the values written so far (a device reset, and DRIVER_OK with the register
    /// page).
    func drain()
}

/// How the transport's interrupt is triggered.
public enum InterruptTrigger: Sendable {
    /// The line follows InterruptStatus (raised when a bit is set, lowered when the last
    /// bit is cleared).
    case level
    /// `raise()` starts an edge when a bit is set, unless one already went out since the
    /// last InterruptStatus read; that read ends it (`lower()`). `acks`: InterruptACK
    /// writes that did not exit.
    case edge(acks: (any DeferredInterruptAcks)?)
}

/// A virtio device model behind a transport. Register accesses come from vCPU threads,
/// so a device is shared between threads.
public protocol VirtioDevice: AnyObject, Sendable {
    /// Virtio device ID (1 net, 2 block, ...).
    var deviceType: UInt32 { get }
    /// Maximum size of each queue (a power of two, 1...32768); the count is the number of queues.
    var queueMaxSizes: [UInt16] { get }
    /// Device-offered features. The transport adds VIRTIO_F_VERSION_1 and keeps only the
    /// device-specific bits (0-23, 50-63) plus INDIRECT_DESC and EVENT_IDX.
    var deviceFeatures: UInt64 { get }
    /// Size of the device configuration space in bytes.
    var configSize: Int { get }
    /// Reads config bytes; the transport guarantees offset + buffer.count <= configSize.
    func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer)
    /// A driver write to config space (bounds guaranteed as for reads). The device
    /// ignores writes to fields it does not allow the driver to change.
    func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer)
    /// DRIVER_OK: start working. `queues[i]` is nil for a queue the driver did not enable.
    /// `features` are the negotiated features. Throwing marks the device NEEDS_RESET.
    func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, interrupt: any VirtioInterruptSink) throws
    /// Stop: stop and join worker threads, drop the queues. Called on every driver reset
    /// (status 0), whether or not the device was activated. Must be idempotent.
    func reset()
    /// A QueueNotify write of a valid queue index reached the transport while the device
    /// is active (a kick that was not caught by an ioeventfd), on a vCPU thread.
    func queueNotified(_ queue: Int)
}

extension VirtioDevice {
    public func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {}
    public func queueNotified(_ queue: Int) {}
}

/// A device whose config space is a fixed byte image, read-only for the driver.
public protocol VirtioStaticConfig: VirtioDevice {
    var config: [UInt8] { get }
}

extension VirtioStaticConfig {
    public var configSize: Int { config.count }

    /// Copies config bytes; out-of-range reads leave the buffer as it is.
    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        let config = self.config
        guard offset >= 0, offset <= config.count, buffer.count <= config.count - offset else { return }
        config.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[offset..<offset + buffer.count]))
        }
    }
}

public final class VirtioMMIOTransport: VirtioInterruptSink {
    public static let magic: UInt32 = 0x7472_6976  // "virt"
    public static let version: UInt32 = 2
    /// "SWLT" in memory order (little-endian bytes 53 57 4c 54).
    public static let vendorID: UInt32 = 0x544C_5753

    struct QueueRegs {
        var size: UInt32
        var ready = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }

    struct State {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [QueueRegs]
        var activated = false
        /// The driver set a feature bit past 63 (none is offered): FEATURES_OK is refused.
        var driverFeaturesBeyond64 = false
    }

    public let device: any VirtioDevice
    public let memory: GuestMemory
    /// Features offered to the driver.
    public let offeredFeatures: UInt64
    let maxSizes: [UInt16]
    let line: any InterruptLine
    let log: RateLimitedLog?

    /// The edge-triggered state: per InterruptStatus bit (0 used buffer, 1 configuration
    /// change) the number of times it was set, the same at the last InterruptStatus read,
    /// and whether a pulse went out since that read.
    struct EdgeState {
        var generation: (UInt64, UInt64) = (0, 0)
        var seen: (UInt64, UInt64) = (0, 0)
        var pulsedSinceRead = false
        /// With the register page (where reads do not exit, and an ACK the VMM saw ends
        /// the pulse instead): the bits InterruptStatus had when the pending pulse went out.
        var pulseBits: UInt32 = 0
    }

    let state: Locked<State>
    /// Serializes the changes of `line` (taken after `state` where both are).
    let lineLock = Locked<Void>(())
    /// Edge-triggered: nil when level-triggered.
    let edgeAcks: (any DeferredInterruptAcks)?
    let isEdge: Bool
    /// Edge-triggered: guards InterruptStatus changes, the generations and the pulses
    /// (taken after `state` where both are; never held while the device is stopped).
    let edgeLock = Locked(EdgeState())
    /// InterruptStatus: the register page's word, or (no page) a word of our own.
    let interruptBits: SharedWord
    nonisolated(unsafe) private let ownInterruptWord: UnsafeMutableRawPointer?
    /// The page the guest reads the registers from without an exit (RegisterPage.swift),
    /// nil when every read exits.
    public let registerPage: RegisterPage?
    let needsResetFlag = Atomic<Bool>(false)
    let driverOKFlag = Atomic<Bool>(false)
    let generation = Atomic<UInt32>(0)
    /// Interrupts raised (irqfd writes) and used-buffer signals folded into a raised,
    /// still unacknowledged one.
    public let interruptsRaised = Atomic<UInt64>(0)
    public let interruptsCoalesced = Atomic<UInt64>(0)

    /// - line: the device's interrupt line; the transport raises it when an
    ///   InterruptStatus bit is set and lowers it when InterruptStatus becomes zero.
    /// - log: the device's log (every line the transport writes can be caused by the guest).
    /// - trigger: level (the line follows InterruptStatus) or edge (a pulse per new
    ///   interrupt; deferred InterruptACKs).
    /// - registerPage: the page the guest reads as the register window (mapped read-only
    ///   into the VM by the caller); nil: reads exit.
    public init(device: any VirtioDevice, memory: GuestMemory, line: any InterruptLine, trigger: InterruptTrigger = .level,
                log: RateLimitedLog? = nil, registerPage: RegisterPage? = nil) {
        self.device = device
        self.memory = memory
        self.offeredFeatures = (device.deviceFeatures & (VirtioFeature.deviceSpecificMask | VirtioFeature.transportSupported))
            | VirtioFeature.version1
        self.maxSizes = device.queueMaxSizes.map { min($0, SplitQueue.maxQueueSize) }
        self.line = line
        self.log = log
        switch trigger {
        case .level: (isEdge, edgeAcks) = (false, nil)
        case .edge(let acks): (isEdge, edgeAcks) = (true, acks)
        }
        self.state = Locked(State(queues: maxSizes.map { QueueRegs(size: UInt32($0)) }))
        self.registerPage = registerPage
        if let registerPage {
            ownInterruptWord = nil
            interruptBits = SharedWord(registerPage.bytes + Int(VirtioMMIOReg.interruptStatus))
        } else {
            let w = UnsafeMutableRawPointer.allocate(byteCount: 4, alignment: 4)
            ownInterruptWord = w
            interruptBits = SharedWord(w)
        }
        interruptBits.store(0)
        state.withLock { render($0, config: true) }
    }

    deinit { ownInterruptWord?.deallocate() }

    // MARK: observers (VMM, tests)

    /// Status register as the driver reads it (including NEEDS_RESET).
    public var status: UInt32 {
        state.withLock { $0.status } | (needsResetFlag.load(ordering: .acquiring) ? VirtioStatus.needsReset : 0)
    }
    public var interruptStatus: UInt32 { interruptBits.load() }
    public var isActivated: Bool { state.withLock { $0.activated } }
    public var needsReset: Bool { needsResetFlag.load(ordering: .acquiring) }
    public var configGeneration: UInt32 { generation.load(ordering: .acquiring) }
    /// Features the driver wrote (negotiated once FEATURES_OK is set).
    public var driverFeatures: UInt64 { state.withLock { $0.driverFeatures } }
    public var queueCount: Int { maxSizes.count }
    /// The queue registers of queue i (nil if there is no such queue).
    public func queueLayout(_ i: Int) -> (layout: QueueLayout, ready: Bool)? {
        state.withLock { s in
            guard i >= 0, i < s.queues.count else { return nil }
            let q = s.queues[i]
            return (QueueLayout(size: q.size, descTable: q.desc, availRing: q.driver, usedRing: q.device), q.ready)
        }
    }

    // MARK: the interrupt line

    /// Raises the line if InterruptStatus is (still) nonzero.
    func raiseLine() {
        lineLock.withLock { _ in
            if interruptBits.load() != 0 { line.raise() }
        }
    }

    /// Lowers the line if InterruptStatus is (still) zero.
    func lowerLineIfClear() {
        lineLock.withLock { _ in
            if interruptBits.load() == 0 { line.lower() }
        }
    }

    // MARK: VirtioInterruptSink

    /// Sets the used-buffer bit and raises the interrupt, unless a raised interrupt is
    /// still unacknowledged: then the driver has not yet acknowledged InterruptStatus, and
    /// Linux's handler (like any conforming one) acknowledges before it looks at the
    /// queues, so it finds these buffers too. This is the level-triggered behaviour of a
    /// virtio-mmio interrupt line: one interrupt per handler run instead of one per batch,
    /// which matters most on nested KVM, where every injected interrupt is expensive. A
    /// line the irqchip lowers at the guest's EOI is raised again while bits remain
    /// (`reassertIfPending`).
    public func signalUsedBuffer() {
        if isEdge { return edgeSet(VirtioInterrupt.usedBuffer) }
        let (old, _) = interruptBits.bitwiseOr(VirtioInterrupt.usedBuffer)
        if old != 0 {
            interruptsCoalesced.wrappingAdd(1, ordering: .relaxed)
            return
        }
        interruptsRaised.wrappingAdd(1, ordering: .relaxed)
        raiseLine()
    }

    /// The interrupt line was deasserted at the guest's EOI (irqfd resample): raise it
    /// again if InterruptStatus is still nonzero.
    public func reassertIfPending() {
        guard interruptBits.load() != 0 else { return }
        interruptsRaised.wrappingAdd(1, ordering: .relaxed)
        raiseLine()
    }

    public func signalConfigChange() {
        generation.wrappingAdd(1, ordering: .sequentiallyConsistent)
        renderGeneration()
        if isEdge { return edgeSet(VirtioInterrupt.configChange) }
        interruptBits.bitwiseOr(VirtioInterrupt.configChange)
        interruptsRaised.wrappingAdd(1, ordering: .relaxed)
        raiseLine()
    }

    public func markNeedsReset() {
        if setNeedsResetFlag() { announceNeedsReset() }
    }

    /// Sets DEVICE_NEEDS_RESET in the flag and on the register page; true if it was clear.
    /// A register write that breaks the device calls it under the state lock, so a reset
    /// on another vCPU comes wholly before or after it.
    private func setNeedsResetFlag() -> Bool {
        let (was, _) = needsResetFlag.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent)
        guard was else { return false }
        if let registerPage {
            SharedWord(registerPage.bytes + Int(VirtioMMIOReg.status)).bitwiseOrThenCheck(VirtioStatus.needsReset)
        }
        return true
    }

    /// The warning and, once the driver is running, the configuration-change interrupt for
    /// a NEEDS_RESET just set (called without the state lock).
    private func announceNeedsReset() {
        log?.warn("device needs reset", "virtio-mmio device type \(device.deviceType): DEVICE_NEEDS_RESET")
        if driverOKFlag.load(ordering: .acquiring) { raiseConfigChange() }
    }

    /// Sets the configuration-change bit and signals it (NEEDS_RESET).
    func raiseConfigChange() {
        if isEdge { return edgeSet(VirtioInterrupt.configChange) }
        interruptBits.bitwiseOr(VirtioInterrupt.configChange)
        raiseLine()
    }

    // MARK: edge-triggered

    /// Sets `bit`, bumps its generation and pulses, unless a pulse already went out since
    /// the last InterruptStatus read: the handler of that pulse has yet to read
    /// InterruptStatus, and will find this bit (a deferred ACK cannot clear it: its
    /// generation moved).
    func edgeSet(_ bit: UInt32) {
        edgeLock.withLock { e in
            if registerPage != nil { return pagedEdgeSet(&e, bit) }
            interruptBits.bitwiseOr(bit)
            if bit == VirtioInterrupt.usedBuffer { e.generation.0 &+= 1 } else { e.generation.1 &+= 1 }
            if e.pulsedSinceRead {
                interruptsCoalesced.wrappingAdd(1, ordering: .relaxed)
                return
            }
            e.pulsedSinceRead = true
            interruptsRaised.wrappingAdd(1, ordering: .relaxed)
            line.raise()
        }
    }

    /// edgeSet with the register page, where the guest's InterruptStatus reads do not
    /// exit. A pulse ends when the VMM sees an InterruptACK the guest wrote after it (taken
    /// from the deferred ACKs here, or an ACK that exited); the ACKed bits are cleared then.
    /// Until then a used-buffer set is folded into the pulse if the pulse went out with the
    /// used-buffer bit: the handler of that pulse reads the bit (it stays set until its
    /// ACK is seen) and, as Linux's vm_interrupt does, looks at the queues after its ACK,
    /// so it finds buffers used before that ACK; anything else pulses again.
    func pagedEdgeSet(_ e: inout EdgeState, _ bit: UInt32) {
        if e.pulsedSinceRead { takePagedAcks(&e, exited: 0) }
        let now = interruptBits.bitwiseOr(bit).newValue
        if e.pulsedSinceRead && bit == VirtioInterrupt.usedBuffer && e.pulseBits & bit != 0 {
            interruptsCoalesced.wrappingAdd(1, ordering: .relaxed)
            return
        }
        e.pulsedSinceRead = true
        e.pulseBits = now
        interruptsRaised.wrappingAdd(1, ordering: .relaxed)
        // One edge: no read exit lowers the line.
        line.raise()
        line.lower()
    }

    /// With the register page: the ACKs written since the last look (and `exited`, an ACK
    /// that exited); any nonzero one ends the pending pulse and clears the bits it names.
    func takePagedAcks(_ e: inout EdgeState, exited: UInt32) {
        let acked = (edgeAcks?.take() ?? 0) | exited
        guard acked != 0 else { return }
        interruptBits.bitwiseAnd(~acked)
        e.pulsedSinceRead = false
        e.pulseBits = 0
    }

    /// Applies the InterruptACKs that did not exit: a bit is cleared only if it was not
    /// set again since the last InterruptStatus read (its generation equals that read's).
    func applyDeferredAcks(_ e: inout EdgeState) {
        guard let acks = edgeAcks else { return }
        let v = acks.take()
        var clear: UInt32 = 0
        if v & VirtioInterrupt.usedBuffer != 0, e.generation.0 == e.seen.0 { clear |= VirtioInterrupt.usedBuffer }
        if v & VirtioInterrupt.configChange != 0, e.generation.1 == e.seen.1 { clear |= VirtioInterrupt.configChange }
        if clear != 0 { interruptBits.bitwiseAnd(~clear) }
    }

    /// An InterruptStatus read (edge-triggered): applies the deferred ACKs, then snapshots
    /// the generations and ends the edge; a set from now on pulses again.
    func edgeReadStatus() -> UInt32 {
        edgeLock.withLock { e in
            applyDeferredAcks(&e)
            e.seen = e.generation
            endPulse(&e)
            return interruptBits.load()
        }
    }

    /// Lowers the line after a pulse, so that the next raise is an edge.
    func endPulse(_ e: inout EdgeState) {
        guard e.pulsedSinceRead else { return }
        e.pulsedSinceRead = false
        e.pulseBits = 0
        line.lower()
    }

    /// An InterruptACK that exited (edge-triggered): the deferred ones first (they were
    /// written before it), then this one at once, as level-triggered.
    func edgeAck(_ value: UInt32) {
        edgeLock.withLock { e in
            if registerPage != nil { return takePagedAcks(&e, exited: value) }
            applyDeferredAcks(&e)
            interruptBits.bitwiseAnd(~value)
        }
    }

    // MARK: MMIO access

    /// A read of `data.count` bytes at `offset` into the device window. Registers
    /// (0x000-0x0ff) need aligned 4-byte accesses; config space (0x100+) takes 1, 2, 4 or
    /// 8 bytes. Anything else reads as zeroes.
    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard let base = data.baseAddress, data.count > 0 else { return }
        base.initializeMemory(as: UInt8.self, repeating: 0, count: data.count)
        if offset >= VirtioMMIOReg.config {
            guard [1, 2, 4, 8].contains(data.count), let off = configRange(offset, data.count) else {
                ignored("ignored config read", "config read", offset, data.count)
                return
            }
            device.readConfig(offset: off, into: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            ignored("ignored register access of the wrong size", "register read", offset, data.count)
            return
        }
        base.storeBytes(of: readRegister(offset).littleEndian, as: UInt32.self)
    }

    /// A write of `data` at `offset`; the same access rules as read(offset:into:).
    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard let base = data.baseAddress, data.count > 0 else { return }
        if offset >= VirtioMMIOReg.config {
            guard [1, 2, 4, 8].contains(data.count), let off = configRange(offset, data.count) else {
                ignored("ignored config write", "config write", offset, data.count)
                return
            }
            // Config writes are serialized with register accesses.
            state.withLock { s in
                device.writeConfig(offset: off, bytes: data)
                render(s, config: true)
            }
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            ignored("ignored register access of the wrong size", "register write", offset, data.count)
            return
        }
        writeRegister(offset, UInt32(littleEndian: base.loadUnaligned(as: UInt32.self)))
    }

    /// Convenience: a read of `size` (1, 2, 4) bytes, zero-extended.
    public func read(offset: UInt64, size: Int) -> UInt32 {
        guard size == 1 || size == 2 || size == 4 else { return 0 }
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<size])) }
        return UInt32(littleEndian: v)
    }

    /// Convenience: a write of the low `size` (1, 2, 4) bytes of `value`.
    public func write(offset: UInt64, size: Int, value: UInt32) {
        guard size == 1 || size == 2 || size == 4 else { return }
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { write(offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
    }

    func configRange(_ offset: UInt64, _ count: Int) -> Int? {
        let off = offset - VirtioMMIOReg.config
        let size = UInt64(max(device.configSize, 0))
        guard off < size, UInt64(count) <= size - off else { return nil }
        return Int(off)
    }

    func ignored(_ kind: StaticString, _ what: @autoclosure () -> String, _ offset: UInt64, _ count: Int) {
        log?.warn(kind, "virtio-mmio: ignored \(what()) of \(count) bytes at 0x\(String(offset, radix: 16))")
    }

    func readRegister(_ offset: UInt64) -> UInt32 {
        switch offset {
        case VirtioMMIOReg.interruptStatus:
            // With the register page a read ends no pulse (an ACK does): none exits anyway.
            return isEdge && registerPage == nil ? edgeReadStatus() : interruptBits.load()
        case VirtioMMIOReg.configGeneration: return generation.load(ordering: .acquiring)
        case VirtioMMIOReg.status: return status
        default: break
        }
        return state.withLock { registerValue(offset, $0) }
    }

    /// A register's value that `s` decides: the fixed ones, features, the selected
    /// queue's registers; 0 for write-only and reserved ones. Not InterruptStatus, Status
    /// or ConfigGeneration (readRegister has those).
    func registerValue(_ offset: UInt64, _ s: State) -> UInt32 {
        let q: QueueRegs? = s.queueSel < UInt32(s.queues.count) ? s.queues[Int(s.queueSel)] : nil
        switch offset {
        case VirtioMMIOReg.magicValue: return Self.magic
        case VirtioMMIOReg.version: return Self.version
        case VirtioMMIOReg.deviceID: return device.deviceType
        case VirtioMMIOReg.vendorID: return Self.vendorID
        case VirtioMMIOReg.shmLenLow, VirtioMMIOReg.shmLenHigh, VirtioMMIOReg.shmBaseLow, VirtioMMIOReg.shmBaseHigh:
            return 0xFFFF_FFFF  // no shared memory regions: length (and base) -1
        case VirtioMMIOReg.deviceFeatures:
            switch s.deviceFeaturesSel {
            case 0: return UInt32(truncatingIfNeeded: offeredFeatures)
            case 1: return UInt32(truncatingIfNeeded: offeredFeatures >> 32)
            default: return 0
            }
        case VirtioMMIOReg.queueNumMax: return q.map { _ in UInt32(maxSizes[Int(s.queueSel)]) } ?? 0
        case VirtioMMIOReg.queueReady: return q?.ready == true ? 1 : 0
        case VirtioMMIOReg.queueDescLow: return UInt32(truncatingIfNeeded: q?.desc ?? 0)
        case VirtioMMIOReg.queueDescHigh: return UInt32(truncatingIfNeeded: (q?.desc ?? 0) >> 32)
        case VirtioMMIOReg.queueDriverLow: return UInt32(truncatingIfNeeded: q?.driver ?? 0)
        case VirtioMMIOReg.queueDriverHigh: return UInt32(truncatingIfNeeded: (q?.driver ?? 0) >> 32)
        case VirtioMMIOReg.queueDeviceLow: return UInt32(truncatingIfNeeded: q?.device ?? 0)
        case VirtioMMIOReg.queueDeviceHigh: return UInt32(truncatingIfNeeded: (q?.device ?? 0) >> 32)
        default: return 0  // write-only, reserved, QueueReset (RING_RESET not offered)
        }
    }

    func writeRegister(_ offset: UInt64, _ value: UInt32) {
        switch offset {
        case VirtioMMIOReg.interruptACK:
            if isEdge { edgeAck(value); return }
            interruptBits.bitwiseAnd(~value)
            lowerLineIfClear()
            return
        case VirtioMMIOReg.queueNotify:
            let notify = state.withLock { s -> Int? in
                guard s.activated, value < UInt32(s.queues.count) else { return nil }
                return Int(value)
            }
            if let q = notify { device.queueNotified(q) } else { ignored("ignored queue notify", "queue notify \(value)", offset, 4) }
            return
        default: break
        }
        var markBroken = false
        state.withLock { s in
            switch offset {
            case VirtioMMIOReg.deviceFeaturesSel: s.deviceFeaturesSel = value
            case VirtioMMIOReg.driverFeaturesSel: s.driverFeaturesSel = value
            case VirtioMMIOReg.driverFeatures:
                guard s.status & VirtioStatus.featuresOK == 0, s.status & VirtioStatus.driver != 0 else {
                    ignored("ignored driver features write", "driver features write in status 0x\(String(s.status, radix: 16))", offset, 4)
                    return
                }
                switch s.driverFeaturesSel {
                case 0: s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF_0000_0000) | UInt64(value)
                case 1: s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF) | (UInt64(value) << 32)
                default:
                    // Bits past 63: this transport offers none, so a set bit there can never be accepted.
                    if value != 0 { s.driverFeaturesBeyond64 = true }
                }
            case VirtioMMIOReg.queueSel: s.queueSel = value
            case VirtioMMIOReg.status: markBroken = writeStatus(&s, value)
            case VirtioMMIOReg.queueNum, VirtioMMIOReg.queueReady,
                 VirtioMMIOReg.queueDescLow, VirtioMMIOReg.queueDescHigh,
                 VirtioMMIOReg.queueDriverLow, VirtioMMIOReg.queueDriverHigh,
                 VirtioMMIOReg.queueDeviceLow, VirtioMMIOReg.queueDeviceHigh:
                markBroken = writeQueueRegister(&s, offset, value)
            default:
                ignored("ignored register write", "write to read-only or reserved register", offset, 4)
            }
            if markBroken { markBroken = setNeedsResetFlag() }
            render(s, config: false)
        }
        if markBroken { announceNeedsReset() }
    }

    /// Returns true if the device must be marked NEEDS_RESET.
    func writeQueueRegister(_ s: inout State, _ offset: UInt64, _ value: UInt32) -> Bool {
        guard s.queueSel < UInt32(s.queues.count) else {
            ignored("ignored queue register write", "queue register write for absent queue \(s.queueSel)", offset, 4)
            return false
        }
        let i = Int(s.queueSel)
        if offset == VirtioMMIOReg.queueReady {
            if value == 0 {
                // Allowed any time; a running device keeps its queue until reset.
                s.queues[i].ready = false
                return false
            }
            guard !s.queues[i].ready else { return false }
            guard s.status & VirtioStatus.featuresOK != 0, s.status & VirtioStatus.driverOK == 0 else {
                ignored("ignored queue register write", "QueueReady outside FEATURES_OK..DRIVER_OK (status 0x\(String(s.status, radix: 16)))", offset, 4)
                return false
            }
            let q = s.queues[i]
            let l = QueueLayout(size: q.size, descTable: q.desc, availRing: q.driver, usedRing: q.device)
            do {
                try SplitQueue.validate(l, maxSize: maxSizes[i], memory: memory)
            } catch {
                log?.warn("queue refused", "virtio-mmio device type \(device.deviceType) queue \(i): \(error)")
                return true
            }
            s.queues[i].ready = true
            return false
        }
        guard !s.queues[i].ready, s.status & VirtioStatus.driverOK == 0 else {
            ignored("ignored queue register write", "queue \(i) register write while ready", offset, 4)
            return false
        }
        func low(_ v: inout UInt64) { v = (v & 0xFFFF_FFFF_0000_0000) | UInt64(value) }
        func high(_ v: inout UInt64) { v = (v & 0xFFFF_FFFF) | (UInt64(value) << 32) }
        switch offset {
        case VirtioMMIOReg.queueNum: s.queues[i].size = value  // validated at QueueReady
        case VirtioMMIOReg.queueDescLow: low(&s.queues[i].desc)
        case VirtioMMIOReg.queueDescHigh: high(&s.queues[i].desc)
        case VirtioMMIOReg.queueDriverLow: low(&s.queues[i].driver)
        case VirtioMMIOReg.queueDriverHigh: high(&s.queues[i].driver)
        case VirtioMMIOReg.queueDeviceLow: low(&s.queues[i].device)
        case VirtioMMIOReg.queueDeviceHigh: high(&s.queues[i].device)
        default: break
        }
        return false
    }

    /// The device status state machine. Returns true if the device must be marked
    /// NEEDS_RESET (activation failed).
    func writeStatus(_ s: inout State, _ value: UInt32) -> Bool {
        if value == 0 {
            reset(&s)
            return false
        }
        let old = s.status
        var new = value & VirtioStatus.setByDriver
        guard new & old == old else {
            ignored("ignored status write", "status 0x\(String(value, radix: 16)) clears bits of 0x\(String(old, radix: 16))", VirtioMMIOReg.status, 4)
            return false
        }
        let added = new & ~old
        if added & (VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK) != 0,
           new & VirtioStatus.acknowledge == 0 {
            ignored("ignored status write", "status 0x\(String(value, radix: 16)) without ACKNOWLEDGE", VirtioMMIOReg.status, 4)
            return false
        }
        if added & VirtioStatus.featuresOK != 0 {
            let f = s.driverFeatures
            if new & VirtioStatus.driver == 0 || f & ~offeredFeatures != 0 || f & VirtioFeature.version1 == 0
                || s.driverFeaturesBeyond64 {
                log?.warn("features refused", "virtio-mmio device type \(device.deviceType): features 0x\(String(f, radix: 16)) refused (offered 0x\(String(offeredFeatures, radix: 16)))")
                new &= ~(VirtioStatus.featuresOK | VirtioStatus.driverOK)
            }
        }
        var broken = false
        if added & VirtioStatus.driverOK != 0 {
            if new & VirtioStatus.featuresOK == 0 {
                new &= ~VirtioStatus.driverOK
            } else {
                s.status = new
                broken = activate(&s)
            }
        }
        s.status = new
        return broken
    }

    func activate(_ s: inout State) -> Bool {
        driverOKFlag.store(true, ordering: .releasing)
        if isEdge {
            // The driver's handler is registered by now (Linux requests the interrupt
            // before DRIVER_OK); a pulse sent before it may have found no handler, so
            // the next set pulses whatever went out before. With the register page the
            // ACKs written before DRIVER_OK go too (a handler of the driver before a reset
            // can ACK after reset's drain): the next signal takes ACKs only while a
            // pulse is pending, and such a stale ACK would clear a bit of a pulse that
            // its handler has not read yet.
            edgeLock.withLock { e in
                if registerPage != nil { edgeAcks?.drain() }
                endPulse(&e)
            }
        }
        if needsResetFlag.load(ordering: .acquiring) {
            // Marked before DRIVER_OK (e.g. a bad queue layout): now tell the driver.
            raiseConfigChange()
            return false
        }
        let f = s.driverFeatures
        var queues: [SplitQueue?] = []
        for (i, q) in s.queues.enumerated() {
            guard q.ready else { queues.append(nil); continue }
            do {
                queues.append(try SplitQueue(memory: memory,
                                             layout: QueueLayout(size: q.size, descTable: q.desc, availRing: q.driver, usedRing: q.device),
                                             maxSize: maxSizes[i],
                                             eventIdx: f & VirtioFeature.eventIdx != 0,
                                             indirectDescriptors: f & VirtioFeature.indirectDesc != 0))
            } catch {
                log?.warn("queue refused", "virtio-mmio device type \(device.deviceType) queue \(i): \(error)")
                return true
            }
        }
        do {
            try device.activate(queues: queues, memory: memory, features: f, interrupt: self)
        } catch {
            log?.warn("activation failed", "virtio-mmio device type \(device.deviceType): activation failed: \(error)")
            return true
        }
        s.activated = true
        return false
    }

    func reset(_ s: inout State) {
        // Stop the device first (joins its workers, which only touch our atomics and
        // edgeLock), then forget everything the driver set up.
        device.reset()
        driverOKFlag.store(false, ordering: .releasing)
        needsResetFlag.store(false, ordering: .releasing)
        if isEdge {
            // The device is stopped: nothing sets a bit any more. ACKs written before the
            // reset are dropped, and the next set pulses.
            edgeLock.withLock { e in
                edgeAcks?.drain()
                interruptBits.store(0)
                e.seen = e.generation
                endPulse(&e)
            }
        } else {
            interruptBits.store(0)
            lowerLineIfClear()
        }
        s = State(queues: maxSizes.map { QueueRegs(size: UInt32($0)) })
        render(s, config: true)
    }
}
