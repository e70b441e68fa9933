// The serial console's host side: where guest output goes, raw mode for a terminal on
// stdin (restored on every exit path, crashes included), and the input pump.
import Glibc
import OS
import Devices

/// The termios to restore, kept where a signal handler can reach it.
// nonisolated(unsafe), these two: written by the main thread only (entering and leaving
// raw mode); read by the crash-signal handler, which runs on the thread that crashed and
// ends the process.
nonisolated(unsafe) private var savedTermios = termios()
nonisolated(unsafe) private var termiosSaved: Int32 = 0

private func restoreTerminalFromSignal(_ sig: Int32) {
    if termiosSaved != 0 { tcsetattr(0, TCSANOW, &savedTermios) }
    signal(sig, SIG_DFL)
    raise(sig)
}

/// Puts stdin into raw mode while the guest owns the console.
final class RawTerminal {
    private(set) var active = false

    init() {}

    func enter() {
        guard isatty(0) == 1, tcgetattr(0, &savedTermios) == 0 else { return }
        var raw = savedTermios
        cfmakeraw(&raw)
        // Keep output processing off (the guest sends CR LF itself), reads return as soon
        // as one byte is there.
        raw.c_cc.6 = 1   // VMIN
        raw.c_cc.5 = 0   // VTIME
        guard tcsetattr(0, TCSANOW, &raw) == 0 else { return }
        termiosSaved = 1
        active = true
        for sig in [SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP] {
            signal(sig, restoreTerminalFromSignal)
        }
    }

    func restore() {
        guard active else { return }
        tcsetattr(0, TCSANOW, &savedTermios)
        termiosSaved = 0
        active = false
    }

    deinit { restore() }
}

/// Where guest serial output goes. Writes are unbuffered: the console must show the
/// guest's last words even if swiftlet is killed.
final class ConsoleOutput: Sendable {
    private let fd: Int32
    private let owned: Bool

    init(mode: SerialMode) throws {
        switch mode {
        case .none:
            fd = -1; owned = false
        case .stdio:
            fd = 1; owned = false
        case .file(let path):
            let f = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard f >= 0 else {
                throw SwiftletError(.usage, "cannot open serial output file \(path): \(errnoText(errno)): give a writable path to --serial file=PATH")
            }
            fd = f; owned = true
        }
    }

    deinit { if owned { close(fd) } }

    func write(_ byte: UInt8) {
        guard fd >= 0 else { return }
        var b = byte
        while Glibc.write(fd, &b, 1) < 0 && errno == EINTR {}
    }
}
