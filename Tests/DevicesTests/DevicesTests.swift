import XCTest
import Glibc
import OS
@testable import Devices

final class SerialTests: XCTestCase {
    final class Sink: Sendable {
        let output = Recorded<UInt8>()
        let interrupts = Recorded<Void>()
        var bytes: [UInt8] { output.all }
        var irqs: Int { interrupts.count }
    }

    func makeSerial() -> (Serial16550, Sink) {
        let s = Sink()
        let u = Serial16550(output: { s.output.append($0) }, interrupt: { s.interrupts.append(()) })
        return (u, s)
    }

    func testTransmitGoesToOutput() {
        let (u, s) = makeSerial()
        for c in "hi\n".utf8 { u.write(offset: 0, size: 1, value: UInt32(c)) }
        XCTAssertEqual(s.bytes, Array("hi\n".utf8))
        XCTAssertEqual(u.read(offset: 5, size: 1) & 0x60, 0x60, "THR empty and transmitter empty")
        XCTAssertEqual(s.irqs, 0, "no interrupt while IER is 0")
    }

    func testTHREInterruptFiresOnEnableAndClearsOnIIRRead() {
        let (u, s) = makeSerial()
        u.write(offset: 1, size: 1, value: 0x02)
        XCTAssertEqual(s.irqs, 1)
        XCTAssertEqual(u.read(offset: 2, size: 1) & 0x0f, 0x02)
        XCTAssertEqual(u.read(offset: 2, size: 1) & 0x0f, 0x01, "reading IIR cleared THRI")
        u.write(offset: 0, size: 1, value: 0x41)
        XCTAssertEqual(s.irqs, 2)
    }

    func testReceiveFIFOBoundsAndInterrupts() {
        let (u, s) = makeSerial()
        u.write(offset: 1, size: 1, value: 0x01)
        let input = [UInt8](repeating: 0x61, count: 100)
        let taken = input.withUnsafeBytes { u.enqueueInput($0) }
        XCTAssertEqual(taken, 64, "FIFO holds 64 bytes; the rest waits")
        XCTAssertEqual(s.irqs, 1)
        XCTAssertEqual(u.read(offset: 2, size: 1) & 0x0f, 0x04)
        var got = 0
        while u.read(offset: 5, size: 1) & 1 == 1 { _ = u.read(offset: 0, size: 1); got += 1 }
        XCTAssertEqual(got, 64)
        XCTAssertEqual(u.receiveSpace, 64)
        XCTAssertEqual(u.read(offset: 0, size: 1), 0, "empty FIFO reads 0")
    }

    func testDivisorLatchAndScratch() {
        let (u, s) = makeSerial()
        u.write(offset: 3, size: 1, value: 0x80)
        u.write(offset: 0, size: 1, value: 0x01)
        u.write(offset: 1, size: 1, value: 0x02)
        XCTAssertEqual(u.read(offset: 0, size: 1), 1)
        XCTAssertEqual(u.read(offset: 1, size: 1), 2)
        u.write(offset: 3, size: 1, value: 0x03)
        XCTAssertTrue(s.bytes.isEmpty, "DLAB writes are not output")
        u.write(offset: 7, size: 1, value: 0x5a)
        XCTAssertEqual(u.read(offset: 7, size: 1), 0x5a)
        XCTAssertEqual(u.read(offset: 42, size: 1), 0, "offsets past the UART read 0")
        u.write(offset: 42, size: 1, value: 0xff)
    }

    func testLoopbackAsThe8250ProbeUsesIt() {
        let (u, s) = makeSerial()
        u.write(offset: 4, size: 1, value: 0x10 | 0x0a)  // loop, RTS, OUT2
        XCTAssertEqual(u.read(offset: 6, size: 1) & 0xf0, 0x90)
        u.write(offset: 0, size: 1, value: 0x55)
        XCTAssertTrue(s.bytes.isEmpty)
        XCTAssertEqual(u.read(offset: 0, size: 1), 0x55)
    }
}

final class LegacyTests: XCTestCase {
    func testRTCReportsBCDTime() {
        // 2026-11-21 10:20:33 UTC, a Saturday.
        let rtc = CMOSRTC(now: { 1_795_256_433 })
        func reg(_ i: UInt8) -> UInt32 { rtc.write(offset: 0, size: 1, value: UInt32(i)); return rtc.read(offset: 1, size: 1) }
        XCTAssertEqual(reg(0x00), 0x33)
        XCTAssertEqual(reg(0x02), 0x20)
        XCTAssertEqual(reg(0x04), 0x10)
        XCTAssertEqual(reg(0x07), 0x21)
        XCTAssertEqual(reg(0x08), 0x11)
        XCTAssertEqual(reg(0x09), 0x26)
        XCTAssertEqual(reg(0x32), 0x20)
        XCTAssertEqual(reg(0x06), 0x07)
        XCTAssertEqual(reg(0x0d), 0x80)
        XCTAssertEqual(reg(0x0a) & 0x80, 0, "update never in progress")
        // NMI-mask bit and out-of-range indices stay inside the 128-byte NVRAM.
        rtc.write(offset: 0, size: 1, value: 0xff)
        rtc.write(offset: 1, size: 1, value: 0x12)
        XCTAssertEqual(rtc.read(offset: 1, size: 1), 0x12)
    }

    /// The RTC's own UTC arithmetic agrees with libc's gmtime_r, leap days, century
    /// years and dates before 1970 included.
    func testRTCCalendarMatchesGmtime() {
        var stamps: [Int64] = [0, -1, 86_399, 86_400, 951_782_400, 951_868_800, 4_107_542_400, -2_208_988_800,
                               1_795_256_433, 253_402_300_799, -62_135_596_800]
        var x: UInt64 = 0x9e37_79b9_7f4a_7c15
        for _ in 0..<20_000 {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            stamps.append(Int64(x % 20_000_000_000) - 5_000_000_000)
        }
        for t in stamps {
            var tt = time_t(t)
            var tm = Glibc.tm()
            XCTAssertNotNil(gmtime_r(&tt, &tm))
            let d = CMOSRTC.utc(t)
            XCTAssertEqual([d.year, d.month, d.day, d.hour, d.minute, d.second, d.weekday],
                           [tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, tm.tm_wday],
                           "t = \(t)")
        }
    }

    func testResetAndSleepRegisters() {
        let recorded = Recorded<MachineEvent>()
        var events: [MachineEvent] { recorded.all }
        let kbd = I8042(onEvent: { recorded.append($0) })
        kbd.write(offset: 4, size: 1, value: 0xd1)
        kbd.write(offset: 0, size: 1, value: 0xfe)
        XCTAssertEqual(events, [])
        kbd.write(offset: 4, size: 1, value: 0xfe)
        XCTAssertEqual(events, [.reboot])
        XCTAssertEqual(kbd.read(offset: 4, size: 1) & 0x02, 0, "input buffer empty so reboot=k proceeds")

        recorded.removeAll()
        let pm = ACPISleepRegister(onEvent: { recorded.append($0) })
        pm.write(offset: 0, size: 1, value: (3 << 2) | 0x20)  // S3: ignored
        pm.write(offset: 0, size: 1, value: 5 << 2)           // no SLP_EN: ignored
        XCTAssertEqual(events, [])
        pm.write(offset: 0, size: 1, value: (5 << 2) | 0x20)
        pm.write(offset: 0, size: 1, value: 1)
        XCTAssertEqual(events, [.powerOff, .reboot])
    }

    func testBootMarkerRecordsFirstMagicWriteOnly() {
        let marks = Recorded<UInt64>()
        let m = BootMarker(start: monotonicNanos(), onMark: { marks.append($0) })
        m.write(offset: 0, size: 1, value: 122)
        m.write(offset: 4, size: 1, value: 123)
        XCTAssertNil(m.elapsedNanos)
        m.write(offset: 0, size: 1, value: 123)
        m.write(offset: 0, size: 1, value: 123)
        XCTAssertNotNil(m.elapsedNanos)
        XCTAssertEqual(marks.count, 1)
    }

    func testGuestExitRegisterDecoding() {
        typealias R = GuestExitRegister
        XCTAssertEqual(R.address, BootMarker.address + BootMarker.size, "right after the marker, same page")
        XCTAssertEqual(R.address & ~0xfff, BootMarker.address)
        for size in [1, 2, 4] {
            XCTAssertEqual(R.status(offset: 0, size: size, value: 0), 0)
            XCTAssertEqual(R.status(offset: 0, size: size, value: 7), 7)
            XCTAssertEqual(R.status(offset: 0, size: size, value: 255), 255)
        }
        // wider values never wrap to success: 256 is 255, not 0
        XCTAssertEqual(R.status(offset: 0, size: 2, value: 256), 255)
        XCTAssertEqual(R.status(offset: 0, size: 4, value: 0x1_00), 255)
        XCTAssertEqual(R.status(offset: 0, size: 4, value: 0xffff_ffff), 255)
        // bits beyond the access width are not the guest's (a byte write of 0x100 is 0)
        XCTAssertEqual(R.status(offset: 0, size: 1, value: 0xffff_ff01), 1)
        XCTAssertEqual(R.status(offset: 0, size: 2, value: 0xffff_0000), 0)
        XCTAssertEqual(R.status(offset: 0, size: 4, value: 0xffff_ffff_0000_0003), 3)
        // not a write of the register
        for (off, size) in [(1, 1), (2, 2), (3, 1), (4, 4), (0x1000, 4), (UInt64.max, 1)] as [(UInt64, Int)] {
            XCTAssertNil(R.status(offset: off, size: size, value: 1), "offset \(off)")
        }
        for size in [0, 3, 8, 16, -1, Int.max] { XCTAssertNil(R.status(offset: 0, size: size, value: 1), "size \(size)") }

        let exits = Recorded<Int32>()
        var got: [Int32] { exits.all }
        let r = R(onExit: { exits.append($0) })
        r.write(offset: 2, size: 1, value: 9)
        r.write(offset: 0, size: 8, value: 9)
        XCTAssertEqual(got, [])
        r.write(offset: 0, size: 4, value: 42)
        XCTAssertEqual(got, [42])
        XCTAssertEqual(r.read(offset: 0, size: 4), 0)
    }

    func testISADebugExitIsQEMUsEncoding() {
        typealias D = ISADebugExit
        XCTAssertEqual(D.port, 0xf4)
        XCTAssertEqual(D.status(size: 1, value: 0), 1)
        XCTAssertEqual(D.status(size: 1, value: 1), 3)
        XCTAssertEqual(D.status(size: 1, value: 0x10), 33)
        XCTAssertEqual(D.status(size: 4, value: 0x10), 33)
        XCTAssertEqual(D.status(size: 1, value: 0x7f), 255)
        // exit() keeps 8 bits of (V << 1) | 1
        XCTAssertEqual(D.status(size: 1, value: 0x80), 1)
        XCTAssertEqual(D.status(size: 1, value: 0xff), 255)
        XCTAssertEqual(D.status(size: 2, value: 0x1234), Int32((0x1234 << 1 | 1) & 0xff))
        XCTAssertEqual(D.status(size: 4, value: 0xffff_ffff), 255)
        XCTAssertEqual(D.status(size: 1, value: 0xffff_ff00), 1, "only the access's bytes")
        XCTAssertEqual(D.status(size: 0, value: 2), 5, "a width KVM never gives is taken whole")
        XCTAssertEqual(D.status(size: -1, value: 2), 5)
        for v: UInt32 in [0, 1, 2, 0x55, 0x80, 0xffff, 0xdead_beef] {
            let st = D.status(size: 4, value: v)
            XCTAssertTrue((0...255).contains(st) && st & 1 == 1, "always odd: \(v) -> \(st)")
        }
        let exits = Recorded<Int32>()
        var got: [Int32] { exits.all }
        let d = D(onExit: { exits.append($0) })
        d.write(offset: 3, size: 1, value: 2)
        XCTAssertEqual(got, [5], "every port of the 4 (iosize=0x04)")
    }

    func testRangeMapRejectsOverlapAndStraddling() {
        var map = RangeMap<Int>()
        XCTAssertTrue(map.insert(base: 0x3f8, size: 8, 1))
        XCTAssertFalse(map.insert(base: 0x3fc, size: 8, 2))
        XCTAssertFalse(map.insert(base: UInt64.max - 2, size: 8, 3))
        XCTAssertFalse(map.insert(base: 0x10, size: 0, 4))
        XCTAssertTrue(map.insert(base: 0x70, size: 2, 5))
        XCTAssertEqual(map.lookup(0x3fd)?.offset, 5)
        XCTAssertEqual(map.lookup(0x71)?.device, 5)
        XCTAssertNil(map.lookup(0x3fe, length: 4), "access straddling the end")
        XCTAssertNil(map.lookup(0x72))
    }
}

final class PCIHostBridgeTests: XCTestCase {
    /// Linux's pci_check_type1: a byte write to 0xCFB, save 0xCF8, write 0x80000000, read
    /// it back; then pci_sanity_check reads the class of 00:00.0 as a 16-bit word at 0xA.
    func testLinuxType1ProbeAndSanityCheckPass() {
        let b = PCIHostBridge()
        b.write(offset: 3, size: 1, value: 0x01)
        let saved = b.read(offset: 0, size: 4)
        b.write(offset: 0, size: 4, value: 0x8000_0000)
        XCTAssertEqual(b.read(offset: 0, size: 4), 0x8000_0000)
        b.write(offset: 0, size: 4, value: 0x8000_0008)
        XCTAssertEqual(b.read(offset: 4 + 2, size: 2), 0x0600, "host bridge class")
        b.write(offset: 0, size: 4, value: 0x8000_0000)
        XCTAssertEqual(b.read(offset: 4, size: 2), UInt32(PCIHostBridge.vendorID))
        XCTAssertEqual(b.read(offset: 6, size: 2), UInt32(PCIHostBridge.deviceID))
        b.write(offset: 0, size: 4, value: saved)
        XCTAssertEqual(b.read(offset: 0, size: 4), saved)
    }

    func testEverythingElseReadsAsNoDevice() {
        let b = PCIHostBridge()
        for addr: UInt32 in [0x0000_0000, 0x8000_0800, 0x8001_0000, 0x80ff_ff00, 0x8000_0100] {
            b.write(offset: 0, size: 4, value: addr)
            XCTAssertEqual(b.read(offset: 4, size: 4), 0xffff_ffff, "address 0x\(String(addr, radix: 16))")
            XCTAssertEqual(b.read(offset: 7, size: 1), 0xff)
        }
    }

    func testHostileAccessesAreHarmless() {
        let b = PCIHostBridge()
        b.write(offset: 0, size: 4, value: 0xffff_ffff)
        XCTAssertEqual(b.read(offset: 0, size: 4), 0x80ff_fffc, "reserved bits and the low 2 bits are not stored")
        b.write(offset: 0, size: 4, value: 0x8000_0000)
        b.write(offset: 4, size: 4, value: 0xdead_beef)  // config writes are ignored
        XCTAssertEqual(b.read(offset: 4, size: 4) & 0xffff, UInt32(PCIHostBridge.vendorID))
        XCTAssertEqual(b.read(offset: 1, size: 2), 0xffff, "unaligned address register read floats high")
        XCTAssertEqual(b.read(offset: 6, size: 4), 0xffff_ffff, "a read past the data window floats high")
        b.write(offset: 2, size: 2, value: 0)  // a partial address write changes nothing
        XCTAssertEqual(b.read(offset: 0, size: 4), 0x8000_0000)
        for r in stride(from: UInt32(0x10), to: 0x100, by: 4) {
            b.write(offset: 0, size: 4, value: 0x8000_0000 | r)
            XCTAssertEqual(b.read(offset: 4, size: 4), 0, "register 0x\(String(r, radix: 16)) of the bridge")
        }
    }
}
