// Small legacy devices: CMOS RTC, i8042 (reset only), the ACPI sleep/reset register,
// the boot-time marker, the guest exit register and QEMU's isa-debug-exit port.
import Glibc
import OS

/// CMOS RTC at ports 0x70 (index) and 0x71 (data), reporting the host's UTC time in BCD,
/// 24-hour mode. Without it the stock kernel spends seconds probing absent ports.
public final class CMOSRTC: PortDevice, Sendable {
    struct State {
        var index: UInt8 = 0
        var nvram = [UInt8](repeating: 0, count: 128)
    }
    private let state: Locked<State>
    private let now: @Sendable () -> time_t

    public init(now: @escaping @Sendable () -> time_t = { time(nil) }) {
        self.now = now
        var s = State()
        s.nvram[0x0a] = 0x26  // 32.768 kHz divider, 1024 Hz rate, UIP clear
        s.nvram[0x0b] = 0x02  // 24-hour, BCD
        s.nvram[0x0d] = 0x80  // RTC valid (battery good)
        state = Locked(s)
    }

    @inline(__always) static func bcd(_ v: Int32) -> UInt8 { UInt8((v / 10) << 4 | (v % 10)) }

    /// The UTC calendar date and time of `t` seconds since the epoch, by arithmetic alone
    /// (libc's gmtime_r reads the time zone file on first use, which a vCPU thread's
    /// seccomp filter does not allow). Month 1-12, day 1-31, weekday 0 = Sunday.
    static func utc(_ t: Int64) -> (year: Int32, month: Int32, day: Int32, hour: Int32, minute: Int32, second: Int32, weekday: Int32) {
        let secs = ((t % 86_400) + 86_400) % 86_400
        let days = (t - secs) / 86_400
        let weekday = ((days % 7) + 11) % 7  // 1970-01-01 was a Thursday
        // civil_from_days: eras of 400 years (146097 days) starting on March 1st
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        return (Int32(clamping: year), Int32(month), Int32(day), Int32(secs / 3600), Int32(secs / 60 % 60),
                Int32(secs % 60), Int32(weekday))
    }

    public func read(offset: UInt16, size: Int) -> UInt32 {
        state.withLock { s in
            guard offset == 1 else { return UInt32(s.index) }
            let d = Self.utc(Int64(now()))
            let v: UInt8
            switch s.index {
            case 0x00: v = Self.bcd(d.second)
            case 0x02: v = Self.bcd(d.minute)
            case 0x04: v = Self.bcd(d.hour)
            case 0x06: v = Self.bcd(d.weekday + 1)
            case 0x07: v = Self.bcd(d.day)
            case 0x08: v = Self.bcd(d.month)
            case 0x09: v = Self.bcd(d.year % 100)
            case 0x32: v = Self.bcd(d.year / 100)
            case 0x0c: v = 0  // no interrupt flags pending
            default: v = s.nvram[Int(s.index & 0x7f)]
            }
            return UInt32(v)
        }
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        state.withLock { s in
            if offset == 0 {
                s.index = UInt8(truncatingIfNeeded: value) & 0x7f  // bit 7 is the NMI mask
            } else if offset == 1 {
                // Time registers are read from the host clock; keep the control bits the
                // guest sets (it may ask for binary or 12-hour mode: honoured only as storage).
                switch s.index {
                case 0x0a: s.nvram[0x0a] = (UInt8(truncatingIfNeeded: value) & 0x7f)
                case 0x0c, 0x0d: break  // read-only
                default: s.nvram[Int(s.index)] = UInt8(truncatingIfNeeded: value)
                }
            }
        }
    }
}

/// i8042 keyboard controller, just enough for Linux's `reboot=k`: the reset command
/// (0xFE written to the command port) ends the VM as a reboot.
public final class I8042: PortDevice, Sendable {
    private let onEvent: @Sendable (MachineEvent) -> Void
    public init(onEvent: @escaping @Sendable (MachineEvent) -> Void) { self.onEvent = onEvent }

    // Base port 0x60: offset 0 is data (0x60), offset 4 is status/command (0x64).
    public func read(offset: UInt16, size: Int) -> UInt32 { 0 }  // no data, buffers empty

    public func write(offset: UInt16, size: Int, value: UInt32) {
        if offset == 4 && UInt8(truncatingIfNeeded: value) == 0xfe { onEvent(.reboot) }
    }
}

/// The hardware-reduced ACPI sleep control and reset register (one byte at port 0x3c0,
/// described in the FADT). Writing SLP_TYP=5 with SLP_EN powers off; the reset value
/// reboots.
public final class ACPISleepRegister: PortDevice, Sendable {
    public static let port: UInt16 = 0x3c0
    public static let resetValue: UInt8 = 0x01
    public static let s5Type: UInt8 = 5
    private let onEvent: @Sendable (MachineEvent) -> Void
    public init(onEvent: @escaping @Sendable (MachineEvent) -> Void) { self.onEvent = onEvent }

    public func read(offset: UInt16, size: Int) -> UInt32 { 0 }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        let v = UInt8(truncatingIfNeeded: value)
        if v == Self.resetValue {
            onEvent(.reboot)
        } else if v & 0x20 != 0 && (v >> 2) & 0x07 == Self.s5Type {
            onEvent(.powerOff)
        }
    }
}

/// The boot-time marker: when the guest writes byte 123 at its address, the time since
/// swiftlet started is recorded (first write wins) and reported.
public final class BootMarker: MMIODevice, Sendable {
    public static let address: UInt64 = 0xd000_0000
    /// One 32-bit register; the exit register follows it in the same page.
    public static let size: UInt64 = 4
    public static let magic: UInt64 = 123
    private let start: UInt64
    private let stamp = Locked<UInt64?>(nil)
    private let onMark: @Sendable (UInt64) -> Void

    /// `start` is swiftlet's start in monotonicNanos(); `onMark` gets the elapsed nanoseconds.
    public init(start: UInt64, onMark: @escaping @Sendable (UInt64) -> Void = { _ in }) {
        self.start = start
        self.onMark = onMark
    }

    public var elapsedNanos: UInt64? { stamp.withLock { $0 } }

    public func read(offset: UInt64, size: Int) -> UInt64 { 0 }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard offset == 0, value & 0xff == Self.magic else { return }
        let elapsed = monotonicNanos() &- start
        let first = stamp.withLock { stamp -> Bool in
            if stamp != nil { return false }
            stamp = elapsed
            return true
        }
        if first { onMark(elapsed) }
    }
}

/// The guest exit register, beside the boot-time marker: a write of N (any width from 1
/// to 4 bytes) ends the VM at once and swiftlet exits with status N. A value above 255
/// does not fit an exit status and ends it with 255, so that a failure never reads as
/// success. The host side of the console needs no draining: the UART writes each byte
/// out before its vCPU goes back into the guest, so all the UART output before this write
/// is out (a guest drains its own tty first).
public final class GuestExitRegister: MMIODevice, Sendable {
    public static let address: UInt64 = 0xd000_0004
    public static let size: UInt64 = 4
    private let onExit: @Sendable (Int32) -> Void

    public init(onExit: @escaping @Sendable (Int32) -> Void) { self.onExit = onExit }

    /// The exit status a write asks for, nil for a write that is not one (another
    /// offset, or a width other than 1, 2 or 4 bytes).
    public static func status(offset: UInt64, size: Int, value: UInt64) -> Int32? {
        guard offset == 0, size == 1 || size == 2 || size == 4 else { return nil }
        let v = value & (size == 1 ? 0xff : size == 2 ? 0xffff : 0xffff_ffff)
        return v > 255 ? 255 : Int32(v)
    }

    public func read(offset: UInt64, size: Int) -> UInt64 { 0 }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        if let s = Self.status(offset: offset, size: size, value: value) { onExit(s) }
    }
}

/// QEMU's isa-debug-exit as test guests use it (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`):
/// a write of V to ports 0xf4-0xf7 ends the VM with exit status (V << 1) | 1, cut to 8
/// bits as QEMU's exit() cuts it. Only with --isa-debug-exit.
public final class ISADebugExit: PortDevice, Sendable {
    public static let port: UInt16 = 0xf4
    public static let size: UInt16 = 4
    private let onExit: @Sendable (Int32) -> Void

    public init(onExit: @escaping @Sendable (Int32) -> Void) { self.onExit = onExit }

    /// The exit status for a write of `value` of `size` bytes.
    public static func status(size: Int, value: UInt32) -> Int32 {
        let v: UInt32
        switch size {
        case 1: v = value & 0xff
        case 2: v = value & 0xffff
        default: v = value
        }
        return Int32((v << 1 | 1) & 0xff)
    }

    public func read(offset: UInt16, size: Int) -> UInt32 { 0 }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        onExit(Self.status(size: size, value: value))
    }
}
