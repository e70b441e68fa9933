// A 16550A UART as Linux's 8250 driver drives it: transmit is immediate (every THR
// write goes straight to the output), receive has a 64-byte FIFO fed from the host's
// input, and interrupts follow IER/IIR. Accessed from vCPU threads and the input
// thread, so all state is behind one lock.
import OS
import Glibc

public final class Serial16550: PortDevice, Sendable {
    // Register offsets.
    static let DATA: UInt16 = 0, IER: UInt16 = 1, IIR: UInt16 = 2, LCR: UInt16 = 3
    static let MCR: UInt16 = 4, LSR: UInt16 = 5, MSR: UInt16 = 6, SCR: UInt16 = 7
    // IER bits.
    static let IER_RDI: UInt8 = 0x01, IER_THRI: UInt8 = 0x02
    // IIR values.
    static let IIR_NONE: UInt8 = 0x01, IIR_THRI: UInt8 = 0x02, IIR_RDI: UInt8 = 0x04
    static let IIR_FIFO: UInt8 = 0xc0
    // LSR bits.
    static let LSR_DR: UInt8 = 0x01, LSR_THRE: UInt8 = 0x20, LSR_TEMT: UInt8 = 0x40
    static let LCR_DLAB: UInt8 = 0x80
    static let MCR_LOOP: UInt8 = 0x10
    static let fifoSize = 64

    /// The registers and the receive FIFO.
    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03
        var mcr: UInt8 = 0x08
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0c
        var dlm: UInt8 = 0
        var fcr: UInt8 = 0
        var thrInterruptPending = false
        var rx: [UInt8] = []
        var rxHead = 0

        func iir() -> UInt8 {
            if ier & IER_RDI != 0 && rxHead < rx.count { return IIR_RDI | IIR_FIFO }
            if ier & IER_THRI != 0 && thrInterruptPending { return IIR_THRI | IIR_FIFO }
            return IIR_NONE | IIR_FIFO
        }
    }
    private let state = Locked(State())

    private let output: @Sendable (UInt8) -> Void
    private let interrupt: @Sendable () -> Void

    /// `output` receives every byte the guest transmits; `interrupt` raises the UART's
    /// interrupt line (an edge on its GSI).
    public init(output: @escaping @Sendable (UInt8) -> Void, interrupt: @escaping @Sendable () -> Void) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Bytes the receive FIFO can take now.
    public var receiveSpace: Int { state.withLock { s in Self.fifoSize - (s.rx.count - s.rxHead) } }

    /// Queues host input for the guest; returns how many bytes were taken (the FIFO
    /// holds 64, the rest must be offered again once the guest has read).
    @discardableResult
    public func enqueueInput(_ bytes: UnsafeRawBufferPointer) -> Int {
        var raise = false
        let taken: Int = state.withLock { s in
            if s.rxHead > 0 && s.rxHead == s.rx.count { s.rx.removeAll(keepingCapacity: true); s.rxHead = 0 }
            let n = min(bytes.count, Self.fifoSize - (s.rx.count - s.rxHead))
            guard n > 0 else { return 0 }
            s.rx.append(contentsOf: bytes[0..<n])
            raise = s.ier & Self.IER_RDI != 0
            return n
        }
        if raise { interrupt() }
        return taken
    }

    public func read(offset: UInt16, size: Int) -> UInt32 {
        var v: UInt8 = 0
        state.withLock { s in
            switch offset {
            case Self.DATA:
                if s.lcr & Self.LCR_DLAB != 0 { v = s.dll; return }
                if s.rxHead < s.rx.count { v = s.rx[s.rxHead]; s.rxHead += 1 }
            case Self.IER:
                v = s.lcr & Self.LCR_DLAB != 0 ? s.dlm : s.ier
            case Self.IIR:
                v = s.iir()
                // Reading IIR while it reports THR empty clears that condition.
                if v & 0x0f == Self.IIR_THRI { s.thrInterruptPending = false }
            case Self.LCR: v = s.lcr
            case Self.MCR: v = s.mcr
            case Self.LSR:
                v = Self.LSR_THRE | Self.LSR_TEMT
                if s.rxHead < s.rx.count { v |= Self.LSR_DR }
            case Self.MSR:
                // Loopback maps MCR outputs onto the modem status inputs (the 8250
                // driver's probe checks this); otherwise report DCD, DSR and CTS.
                if s.mcr & Self.MCR_LOOP != 0 {
                    v = ((s.mcr & 0x01) << 5) | ((s.mcr & 0x02) << 3) | ((s.mcr & 0x04) << 4) | ((s.mcr & 0x08) << 4)
                } else {
                    v = 0xb0
                }
            case Self.SCR: v = s.scr
            default: v = 0
            }
        }
        return UInt32(v)
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        let b = UInt8(truncatingIfNeeded: value)
        var raise = false
        var out: UInt8? = nil
        state.withLock { s in
            switch offset {
            case Self.DATA:
                if s.lcr & Self.LCR_DLAB != 0 { s.dll = b; return }
                if s.mcr & Self.MCR_LOOP != 0 {
                    if s.rx.count - s.rxHead < Self.fifoSize { s.rx.append(b) }
                    raise = s.ier & Self.IER_RDI != 0
                } else {
                    out = b
                }
                s.thrInterruptPending = true
                raise = raise || s.ier & Self.IER_THRI != 0
            case Self.IER:
                if s.lcr & Self.LCR_DLAB != 0 { s.dlm = b; return }
                let enablingTHRI = (b & Self.IER_THRI != 0) && (s.ier & Self.IER_THRI == 0)
                s.ier = b & 0x0f
                // The transmitter is always empty: enabling its interrupt fires it.
                if enablingTHRI { s.thrInterruptPending = true; raise = true }
                if s.ier & Self.IER_RDI != 0 && s.rxHead < s.rx.count { raise = true }
            case Self.IIR:
                s.fcr = b
                if b & 0x02 != 0 { s.rx.removeAll(keepingCapacity: true); s.rxHead = 0 }
            case Self.LCR: s.lcr = b
            case Self.MCR: s.mcr = b & 0x1f
            case Self.SCR: s.scr = b
            default: break
            }
        }
        if let out { output(out) }
        if raise { interrupt() }
    }
}
