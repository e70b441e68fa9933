// A 16550A UART as Linux's 8250 driver drives it: transmit is immediate (every THR
// write goes straight to the output), receive has a 64-byte FIFO fed from the host's
// input, and interrupts follow IER/IIR. Accessed from vCPU threads and the input
// thread, so all state is behind one lock.
import Glibc

public final class Serial16550: PortDevice, @unchecked Sendable {
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

    private let lock = Mutex()
    private var ier: UInt8 = 0
    private var lcr: UInt8 = 0x03
    private var mcr: UInt8 = 0x08
    private var scr: UInt8 = 0
    private var dll: UInt8 = 0x0c
    private var dlm: UInt8 = 0
    private var fcr: UInt8 = 0
    private var thrInterruptPending = false
    private var rx: [UInt8] = []
    private var rxHead = 0

    private let output: (UInt8) -> Void
    private let interrupt: () -> Void

    /// `output` receives every byte the guest transmits; `interrupt` raises the UART's
    /// interrupt line (an edge on its GSI).
    public init(output: @escaping (UInt8) -> Void, interrupt: @escaping () -> Void) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Bytes the receive FIFO can take now.
    public var receiveSpace: Int { lock.withLock { Self.fifoSize - (rx.count - rxHead) } }

    /// Queues host input for the guest; returns how many bytes were taken (the FIFO
    /// holds 64, the rest must be offered again once the guest has read).
    @discardableResult
    public func enqueueInput(_ bytes: UnsafeRawBufferPointer) -> Int {
        var raise = false
        let taken: Int = lock.withLock {
            if rxHead > 0 && rxHead == rx.count { rx.removeAll(keepingCapacity: true); rxHead = 0 }
            let n = min(bytes.count, Self.fifoSize - (rx.count - rxHead))
            guard n > 0 else { return 0 }
            rx.append(contentsOf: bytes[0..<n])
            raise = ier & Self.IER_RDI != 0
            return n
        }
        if raise { interrupt() }
        return taken
    }

    private func iir() -> UInt8 {
        if ier & Self.IER_RDI != 0 && rxHead < rx.count { return Self.IIR_RDI | Self.IIR_FIFO }
        if ier & Self.IER_THRI != 0 && thrInterruptPending { return Self.IIR_THRI | Self.IIR_FIFO }
        return Self.IIR_NONE | Self.IIR_FIFO
    }

    public func read(offset: UInt16, size: Int) -> UInt32 {
        var v: UInt8 = 0
        lock.withLock {
            switch offset {
            case Self.DATA:
                if lcr & Self.LCR_DLAB != 0 { v = dll; return }
                if rxHead < rx.count { v = rx[rxHead]; rxHead += 1 }
            case Self.IER:
                v = lcr & Self.LCR_DLAB != 0 ? dlm : ier
            case Self.IIR:
                v = iir()
                // Reading IIR while it reports THR empty clears that condition.
                if v & 0x0f == Self.IIR_THRI { thrInterruptPending = false }
            case Self.LCR: v = lcr
            case Self.MCR: v = mcr
            case Self.LSR:
                v = Self.LSR_THRE | Self.LSR_TEMT
                if rxHead < rx.count { v |= Self.LSR_DR }
            case Self.MSR:
                // Loopback maps MCR outputs onto the modem status inputs (the 8250
                // driver's probe checks this); otherwise report DCD, DSR and CTS.
                if mcr & Self.MCR_LOOP != 0 {
                    v = ((mcr & 0x01) << 5) | ((mcr & 0x02) << 3) | ((mcr & 0x04) << 4) | ((mcr & 0x08) << 4)
                } else {
                    v = 0xb0
                }
            case Self.SCR: v = scr
            default: v = 0
            }
        }
        return UInt32(v)
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        let b = UInt8(truncatingIfNeeded: value)
        var raise = false
        var out: UInt8? = nil
        lock.withLock {
            switch offset {
            case Self.DATA:
                if lcr & Self.LCR_DLAB != 0 { dll = b; return }
                if mcr & Self.MCR_LOOP != 0 {
                    if rx.count - rxHead < Self.fifoSize { rx.append(b) }
                    raise = ier & Self.IER_RDI != 0
                } else {
                    out = b
                }
                thrInterruptPending = true
                raise = raise || ier & Self.IER_THRI != 0
            case Self.IER:
                if lcr & Self.LCR_DLAB != 0 { dlm = b; return }
                let enablingTHRI = (b & Self.IER_THRI != 0) && (ier & Self.IER_THRI == 0)
                ier = b & 0x0f
                // The transmitter is always empty: enabling its interrupt fires it.
                if enablingTHRI { thrInterruptPending = true; raise = true }
                if ier & Self.IER_RDI != 0 && rxHead < rx.count { raise = true }
            case Self.IIR:
                fcr = b
                if b & 0x02 != 0 { rx.removeAll(keepingCapacity: true); rxHead = 0 }
            case Self.LCR: lcr = b
            case Self.MCR: mcr = b & 0x1f
            case Self.SCR: scr = b
            default: break
            }
        }
        if let out { output(out) }
        if raise { interrupt() }
    }
}
