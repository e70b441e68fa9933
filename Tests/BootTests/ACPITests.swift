import XCTest
@testable import Boot
@testable import GuestMemory

/// A minimal AML decoder for the subset the DSDT uses, to check structure independently
/// of the encoder.
struct AMLDecoder {
    enum Value: Equatable {
        case int(UInt64), string(String), buffer([UInt8]), package([Value])
    }
    var b: [UInt8]
    var i = 0
    var names: [String: Value] = [:]
    var devices: [String] = []

    init(_ b: [UInt8]) { self.b = b }

    mutating func pkgLength() throws -> Int {
        let start = i
        let lead = b[i]; i += 1
        let extra = Int(lead >> 6)
        if extra == 0 { return start + Int(lead & 0x3f) }
        var len = Int(lead & 0x0f)
        for k in 0..<extra { len |= Int(b[i]) << (4 + 8 * k); i += 1 }
        return start + len
    }

    mutating func nameString() -> String {
        var s = ""
        if b[i] == 0x5c { s = "\\"; i += 1 }
        var count = 1
        if b[i] == 0x2e { count = 2; i += 1 } else if b[i] == 0x2f { count = Int(b[i + 1]); i += 2 } else if b[i] == 0 { i += 1; return s }
        var segs: [String] = []
        for _ in 0..<count { segs.append(String(decoding: b[i..<i + 4], as: UTF8.self)); i += 4 }
        return s + segs.joined(separator: ".")
    }

    mutating func dataObject() throws -> Value {
        let op = b[i]; i += 1
        func le(_ n: Int) -> UInt64 { var v: UInt64 = 0; for k in 0..<n { v |= UInt64(b[i + k]) << (8 * k) }; i += n; return v }
        switch op {
        case 0x00: return .int(0)
        case 0x01: return .int(1)
        case 0xff: return .int(UInt64.max)
        case 0x0a: return .int(le(1))
        case 0x0b: return .int(le(2))
        case 0x0c: return .int(le(4))
        case 0x0e: return .int(le(8))
        case 0x0d:
            let start = i
            while b[i] != 0 { i += 1 }
            i += 1
            return .string(String(decoding: b[start..<i - 1], as: UTF8.self))
        case 0x11:
            let end = try pkgLength()
            guard case let .int(n) = try dataObject() else { throw DecodeError.bad("buffer size") }
            guard Int(n) == end - i else { throw DecodeError.bad("buffer size \(n) != \(end - i)") }
            let bytes = Array(b[i..<end]); i = end
            return .buffer(bytes)
        case 0x12:
            let end = try pkgLength()
            let n = Int(b[i]); i += 1
            var els: [Value] = []
            while i < end { els.append(try dataObject()) }
            guard els.count == n, i == end else { throw DecodeError.bad("package") }
            return .package(els)
        default:
            throw DecodeError.bad("opcode \(op) at \(i - 1)")
        }
    }

    enum DecodeError: Error { case bad(String) }

    static func join(_ scope: String, _ n: String) -> String {
        n.hasPrefix("\\") ? n : (scope == "\\" ? "\\" + n : scope + "." + n)
    }

    mutating func termList(end: Int, scope: String) throws {
        while i < end {
            let op = b[i]; i += 1
            switch op {
            case 0x10:
                let e = try pkgLength()
                let n = nameString()
                try termList(end: e, scope: AMLDecoder.join(scope, n))
                guard i == e else { throw DecodeError.bad("scope length") }
            case 0x5b where b[i] == 0x82:
                i += 1
                let e = try pkgLength()
                let n = AMLDecoder.join(scope, nameString())
                devices.append(n)
                try termList(end: e, scope: n)
                guard i == e else { throw DecodeError.bad("device length") }
            case 0x08:
                let n = nameString()
                names[AMLDecoder.join(scope, n)] = try dataObject()
            default:
                throw DecodeError.bad("term opcode \(op) at \(i - 1)")
            }
        }
    }

    static func decode(_ aml: [UInt8]) throws -> AMLDecoder {
        var d = AMLDecoder(aml)
        try d.termList(end: aml.count, scope: "\\")
        return d
    }
}

final class AMLTests: XCTestCase {
    func testPkgLength() {
        XCTAssertEqual(AML.pkgLength(0), [0x01])
        XCTAssertEqual(AML.pkgLength(0x3e), [0x3f])
        XCTAssertEqual(AML.pkgLength(0x3f), [0x41, 0x04])
        XCTAssertEqual(AML.pkgLength(0xffd), [0x4f, 0xff])
        XCTAssertEqual(AML.pkgLength(0xffe), [0x81, 0x00, 0x01])
        XCTAssertEqual(AML.pkgLength(0xffffc), [0x8f, 0xff, 0xff])
        XCTAssertEqual(AML.pkgLength(0xffffd), [0xc1, 0x00, 0x00, 0x01])
        // Round trip through the decoder for many sizes.
        for n in [0, 1, 0x3d, 0x3e, 0x3f, 0x40, 0x100, 0xffc, 0xffd, 0xffe, 0xfff, 0x1000, 0x12345, 0xffffc, 0xffffd, 0x100000] {
            let enc = AML.pkgLength(n)
            var d = AMLDecoder(enc + [UInt8](repeating: 0, count: n))
            XCTAssertEqual(try d.pkgLength(), enc.count + n, "\(n)")
        }
    }

    func testIntegersStringsNames() {
        XCTAssertEqual(AML.integer(0), [0x00])
        XCTAssertEqual(AML.integer(1), [0x01])
        XCTAssertEqual(AML.integer(2), [0x0a, 0x02])
        XCTAssertEqual(AML.integer(0x100), [0x0b, 0x00, 0x01])
        XCTAssertEqual(AML.integer(0xd000_1000), [0x0c, 0x00, 0x10, 0x00, 0xd0])
        XCTAssertEqual(AML.integer(0x1_0000_0000), [0x0e, 0, 0, 0, 0, 1, 0, 0, 0])
        XCTAssertEqual(AML.string("AB"), [0x0d, 0x41, 0x42, 0x00])
        XCTAssertEqual(AML.nameString("_S5"), Array("_S5_".utf8))
        XCTAssertEqual(AML.nameString("\\_SB"), [0x5c] + Array("_SB_".utf8))
        XCTAssertEqual(AML.nameString("\\_SB.COM1"), [0x5c, 0x2e] + Array("_SB_COM1".utf8))
        XCTAssertEqual(AML.nameString("\\_SB.PCI0.S08"), [0x5c, 0x2f, 3] + Array("_SB_PCI0S08_".utf8))
        XCTAssertEqual(AML.eisaIdValue("PNP0501"), 0x0105_d041)
        XCTAssertEqual(AML.eisaIdValue("PNP0B00"), 0x000b_d041)
        XCTAssertEqual(AML.eisaId("PNP0501"), [0x0c, 0x41, 0xd0, 0x05, 0x01])
    }

    func testResourceDescriptors() {
        XCTAssertEqual(AML.io(min: 0x3f8, max: 0x3f8, alignment: 1, length: 8), [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08])
        XCTAssertEqual(AML.irqNoFlags(4), [0x22, 0x10, 0x00])
        XCTAssertEqual(AML.irqNoFlags(8), [0x22, 0x00, 0x01])
        XCTAssertEqual(AML.memory32Fixed(base: 0xd000_1000, length: 0x1000),
                       [0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00])
        XCTAssertEqual(AML.interrupt(edge: true, activeLow: false, shared: false, [5]),
                       [0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00])
        XCTAssertEqual(AML.interrupt(edge: false, activeLow: true, shared: true, [0x17]),
                       [0x89, 0x06, 0x00, 0x0d, 0x01, 0x17, 0x00, 0x00, 0x00])
    }

    /// Byte-exact AML for one virtio-mmio device, as iasl compiles
    /// Device(VR00){Name(_HID,"LNRO0005") Name(_UID,Zero) Name(_CCA,One)
    ///   Name(_CRS,ResourceTemplate(){Memory32Fixed(ReadWrite,0xD0001000,0x1000)
    ///   Interrupt(ResourceConsumer,Edge,ActiveHigh,Exclusive){5}})}
    func testVirtioDeviceBytes() {
        let expected: [UInt8] = [
            0x5b, 0x82, 0x41, 0x04, 0x56, 0x52, 0x30, 0x30,                               // Device(VR00), PkgLength 65
            0x08, 0x5f, 0x48, 0x49, 0x44, 0x0d, 0x4c, 0x4e, 0x52, 0x4f, 0x30, 0x30, 0x30, 0x35, 0x00, // _HID
            0x08, 0x5f, 0x55, 0x49, 0x44, 0x00,                                           // _UID Zero
            0x08, 0x5f, 0x43, 0x43, 0x41, 0x01,                                           // _CCA One
            0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x1a, 0x0a, 0x17,                         // _CRS Buffer(23)
            0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00,       // Memory32Fixed
            0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00,                         // Interrupt
            0x79, 0x00,                                                                   // EndTag
        ]
        XCTAssertEqual(ACPI.virtioDevice(index: 0, VirtioMMIODeviceDescription(address: 0xd000_1000, size: 0x1000, gsi: 5,
                                                                               levelTriggered: false)), expected)
        // The default is Interrupt(ResourceConsumer,Level,ActiveHigh,Exclusive): flags 0x01.
        var level = expected
        level[level.count - 8] = 0x01
        XCTAssertEqual(ACPI.virtioDevice(index: 0, VirtioMMIODeviceDescription(address: 0xd000_1000, size: 0x1000, gsi: 5)), level)
    }

    func testCOM1AndS5Bytes() {
        let aml = ACPI.dsdtAML(virtio: [], serial: true, rtc: false)
        let com1: [UInt8] = [
            0x5b, 0x82, 0x2b, 0x43, 0x4f, 0x4d, 0x31,
            0x08, 0x5f, 0x48, 0x49, 0x44, 0x0c, 0x41, 0xd0, 0x05, 0x01,
            0x08, 0x5f, 0x55, 0x49, 0x44, 0x00,
            0x08, 0x5f, 0x43, 0x52, 0x53, 0x11, 0x10, 0x0a, 0x0d,
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00,
        ]
        let s5: [UInt8] = [0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00]
        let scopeBody = Array("_SB_".utf8) + com1
        XCTAssertEqual(aml, [0x10] + AML.pkgLength(scopeBody.count) + scopeBody + s5)
        XCTAssertEqual(com1.count - 2, 0x2b)
    }

    /// The DSDT body for COM1, RTC and three virtio-mmio devices (0xd0001000.., GSI 5-7),
    /// as iasl 20200925 compiles the ASL that `iasl -d` printed for our table: byte-identical.
    func testDSDTMatchesIASL() {
        let iasl = "1044125f53425f5b822b434f4d31085f4849440c41d00501085f55494400085f43525311100a0d4701f803f803010822100079005b82255254435f085f4849440c41d00b00085f43525311100a0d470170007000010222000179005b82410456523030085f4849440d4c4e524f3030303500085f55494400085f43434101085f435253111a0a1786090001001000d00010000089060003010500000079005b82410456523031085f4849440d4c4e524f3030303500085f55494401085f43434101085f435253111a0a1786090001002000d00010000089060003010600000079005b82420456523032085f4849440d4c4e524f3030303500085f5549440a02085f43434101085f435253111a0a1786090001003000d0001000008906000301070000007900085f53355f1207040a05000000"
        var expected: [UInt8] = []
        var it = iasl.makeIterator()
        while let a = it.next(), let b = it.next() { expected.append(UInt8(String([a, b]), radix: 16)!) }
        let virtio = (0..<3).map {
            VirtioMMIODeviceDescription(address: X86Layout.virtioMMIOAddress(index: $0), size: 0x1000, gsi: X86Layout.virtioGSI(index: $0)!,
                                        levelTriggered: false)
        }
        XCTAssertEqual(ACPI.dsdtAML(virtio: virtio, serial: true, rtc: true), expected)
    }

    func testDSDTDecodes() throws {
        let virtio = (0..<18).map {
            VirtioMMIODeviceDescription(address: X86Layout.virtioMMIOAddress(index: $0), size: 0x1000, gsi: X86Layout.virtioGSI(index: $0)!)
        }
        let aml = ACPI.dsdtAML(virtio: virtio, serial: true, rtc: true)
        let d = try AMLDecoder.decode(aml)
        XCTAssertEqual(d.devices.first, "\\_SB_.COM1")
        XCTAssertEqual(d.devices.count, 20)
        XCTAssertEqual(d.names["\\_S5_"], .package([.int(5), .int(0), .int(0), .int(0)]))
        XCTAssertEqual(d.names["\\_SB_.COM1._HID"], .int(0x0105_d041))
        XCTAssertEqual(d.names["\\_SB_.RTC_._HID"], .int(0x000b_d041))
        XCTAssertEqual(d.names["\\_SB_.RTC_._CRS"], .buffer([0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x22, 0x00, 0x01, 0x79, 0x00]))
        for (i, v) in virtio.enumerated() {
            let n = "\\_SB_.VR" + (i < 10 ? "0" : "") + String(i)
            XCTAssertEqual(d.names[n + "._HID"], .string("LNRO0005"))
            XCTAssertEqual(d.names[n + "._UID"], .int(UInt64(i)))
            XCTAssertEqual(d.names[n + "._CCA"], .int(1))
            XCTAssertEqual(d.names[n + "._CRS"], .buffer(AML.memory32Fixed(base: UInt32(v.address), length: 0x1000)
                + AML.interrupt(edge: false, activeLow: false, shared: false, [v.gsi]) + [0x79, 0x00]))
        }
        // Without serial and RTC only the virtio devices and _S5_ remain.
        let bare = try AMLDecoder.decode(ACPI.dsdtAML(virtio: [], serial: false, rtc: false))
        XCTAssertEqual(bare.devices, [])
        XCTAssertNotNil(bare.names["\\_S5_"])
    }
}

final class ACPITablesTests: XCTestCase {
    struct Tables {
        var rsdp: [UInt8]
        var byName: [String: (address: UInt64, bytes: [UInt8])] = [:]
    }

    /// Reads the tables back from guest memory following the pointers, checking each.
    func readTables(_ m: GuestMemory, file: StaticString = #filePath, line: UInt = #line) throws -> Tables {
        let rsdp = try m.readBytes(at: 0xe0000, count: 36)
        XCTAssertEqual(Array(rsdp[0..<8]), Array("RSD PTR ".utf8), file: file, line: line)
        XCTAssertEqual(sum(rsdp[0..<20]), 0, "RSDP checksum", file: file, line: line)
        XCTAssertEqual(sum(rsdp), 0, "RSDP extended checksum", file: file, line: line)
        XCTAssertEqual(rsdp[15], 2)
        XCTAssertEqual(le(rsdp, 16, UInt32.self), 0)
        XCTAssertEqual(le(rsdp, 20, UInt32.self), 36)
        var t = Tables(rsdp: rsdp)
        func table(_ addr: UInt64) throws -> [UInt8] {
            let len = Int(try m.load(UInt32.self, at: addr + 4))
            XCTAssertGreaterThanOrEqual(len, 36, file: file, line: line)
            let b = try m.readBytes(at: addr, count: len)
            XCTAssertEqual(sum(b), 0, "\(String(decoding: b[0..<4], as: UTF8.self)) checksum", file: file, line: line)
            XCTAssertEqual(Array(b[10..<16]), Array("SWIFTL".utf8), file: file, line: line)
            XCTAssertTrue(addr >= 0xe0000 && addr + UInt64(len) <= 0xf0000, file: file, line: line)
            t.byName[String(decoding: b[0..<4], as: UTF8.self)] = (addr, b)
            return b
        }
        let xsdt = try table(le(rsdp, 24, UInt64.self))
        XCTAssertEqual(Array(xsdt[0..<4]), Array("XSDT".utf8))
        for k in stride(from: 36, to: xsdt.count, by: 8) { _ = try table(le(xsdt, k, UInt64.self)) }
        let fadt = try XCTUnwrap(t.byName["FACP"], file: file, line: line).bytes
        _ = try table(le(fadt, 140, UInt64.self))
        return t
    }

    func testTablesInMemory() throws {
        let m = try makeMemory(64 * MiB)
        let virtio = [VirtioMMIODeviceDescription(address: 0xd000_1000, size: 0x1000, gsi: 5),
                      VirtioMMIODeviceDescription(address: 0xd000_2000, size: 0x1000, gsi: 6)]
        for t in ACPI.build(cpus: 4, virtio: virtio, serial: true) { try m.write(t.bytes, at: t.address) }
        let t = try readTables(m)
        XCTAssertEqual(Set(t.byName.keys), ["XSDT", "FACP", "APIC", "DSDT"])
        // Tables do not overlap.
        let spans = ([(UInt64(0xe0000), UInt64(36))] + t.byName.values.map { ($0.address, UInt64($0.bytes.count)) }).sorted { $0.0 < $1.0 }
        for (a, b) in zip(spans, spans.dropFirst()) { XCTAssertLessThanOrEqual(a.0 + a.1, b.0) }

        // FADT.
        let f = t.byName["FACP"]!.bytes
        XCTAssertEqual(f.count, 276)
        XCTAssertEqual(f[8], 6)                                         // revision
        XCTAssertEqual(f[131], 5)                                       // minor version
        XCTAssertEqual(le(f, 40, UInt32.self), 0)                       // DSDT 32-bit unused
        XCTAssertEqual(le(f, 140, UInt64.self), t.byName["DSDT"]!.address)
        let flags = le(f, 112, UInt32.self)
        XCTAssertNotEqual(flags & (1 << 20), 0, "HW_REDUCED_ACPI")
        XCTAssertNotEqual(flags & (1 << 10), 0, "RESET_REG_SUP")
        XCTAssertEqual(le(f, 109, UInt16.self), 0x1c)                   // no VGA, no MSI, no ASPM; no 8042
        XCTAssertEqual(le(f, 46, UInt16.self), 0)                       // no SCI
        let gas: [UInt8] = [1, 8, 0, 1, 0xc0, 0x03, 0, 0, 0, 0, 0, 0]
        XCTAssertEqual(Array(f[116..<128]), gas)                        // RESET_REG
        XCTAssertEqual(f[128], 1)                                       // RESET_VALUE
        XCTAssertEqual(Array(f[244..<256]), gas)                        // SLEEP_CONTROL_REG
        XCTAssertEqual(Array(f[256..<268]), gas)                        // SLEEP_STATUS_REG
        XCTAssertEqual(Array(f[268..<276]), Array("SWIFTLET".utf8))

        // MADT.
        let a = t.byName["APIC"]!.bytes
        XCTAssertEqual(le(a, 36, UInt32.self), 0xfee0_0000)
        XCTAssertEqual(le(a, 40, UInt32.self), 0)
        var off = 44
        var lapics: [(UInt8, UInt8, UInt32)] = []
        var ioapics = 0, isos = 0, nmis = 0
        while off < a.count {
            let type = a[off], len = Int(a[off + 1])
            XCTAssertGreaterThan(len, 0)
            switch type {
            case 0: XCTAssertEqual(len, 8); lapics.append((a[off + 2], a[off + 3], le(a, off + 4, UInt32.self)))
            case 1:
                XCTAssertEqual(len, 12); ioapics += 1
                XCTAssertEqual(a[off + 2], 0)
                XCTAssertEqual(le(a, off + 4, UInt32.self), 0xfec0_0000)
                XCTAssertEqual(le(a, off + 8, UInt32.self), 0)
            case 2:
                XCTAssertEqual(len, 10); isos += 1
                XCTAssertEqual(a[off + 3], 0)
                XCTAssertEqual(le(a, off + 4, UInt32.self), 2)
            case 4: XCTAssertEqual(len, 6); nmis += 1; XCTAssertEqual(a[off + 5], 1)
            default: XCTFail("unexpected MADT entry \(type)")
            }
            off += len
        }
        XCTAssertEqual(off, a.count)
        XCTAssertEqual(lapics.count, 4)
        for (i, l) in lapics.enumerated() { XCTAssertEqual(l.0, UInt8(i)); XCTAssertEqual(l.1, UInt8(i)); XCTAssertEqual(l.2, 1) }
        XCTAssertEqual(ioapics, 1); XCTAssertEqual(isos, 1); XCTAssertEqual(nmis, 1)

        // DSDT decodes.
        let dsdt = t.byName["DSDT"]!.bytes
        XCTAssertEqual(dsdt[8], 2)
        let d = try AMLDecoder.decode(Array(dsdt[36...]))
        XCTAssertEqual(d.devices, ["\\_SB_.COM1", "\\_SB_.RTC_", "\\_SB_.VR00", "\\_SB_.VR01"])
    }

    func testMaxCPUsFitBelowMPTableHigh() throws {
        let tables = ACPI.build(cpus: X86Layout.maxCPUs, virtio: (0..<18).map {
            VirtioMMIODeviceDescription(address: X86Layout.virtioMMIOAddress(index: $0), size: 0x1000, gsi: X86Layout.virtioGSI(index: $0)!)
        }, serial: true)
        let end = tables.map { $0.address + UInt64($0.bytes.count) }.max()!
        XCTAssertLessThanOrEqual(end, X86Layout.mpConfigHigh)
        for t in tables where t.address != 0xe0000 { XCTAssertEqual(sum(t.bytes), 0) }
        let madt = tables.first { $0.bytes.starts(with: Array("APIC".utf8)) }!.bytes
        XCTAssertEqual(madt.count, 44 + 254 * 8 + 12 + 10 + 6)
    }
}

final class MPTableTests: XCTestCase {
    func parse(_ m: GuestMemory, cpus: Int) throws {
        let fp = try m.readBytes(at: 0x9fc00, count: 16)
        XCTAssertEqual(Array(fp[0..<4]), Array("_MP_".utf8))
        XCTAssertEqual(sum(fp), 0)
        XCTAssertEqual(fp[8], 1)
        XCTAssertEqual(fp[9], 4)
        let cfgAddr = UInt64(le(fp, 4, UInt32.self))
        let len = Int(try m.load(UInt16.self, at: cfgAddr + 4))
        let cfg = try m.readBytes(at: cfgAddr, count: len)
        XCTAssertEqual(Array(cfg[0..<4]), Array("PCMP".utf8))
        XCTAssertEqual(sum(cfg), 0)
        XCTAssertEqual(cfg[6], 4)
        XCTAssertEqual(le(cfg, 36, UInt32.self), 0xfee0_0000)
        let count = Int(le(cfg, 34, UInt16.self))
        var off = 44, procs = 0, bsp = 0, buses = 0, ioapics = 0, ints: [UInt8: UInt8] = [:], locals = 0
        for _ in 0..<count {
            switch cfg[off] {
            case 0:
                XCTAssertEqual(cfg[off + 1], UInt8(procs)); procs += 1
                XCTAssertNotEqual(cfg[off + 3] & 1, 0)
                if cfg[off + 3] & 2 != 0 { bsp += 1; XCTAssertEqual(cfg[off + 1], 0) }
                off += 20
            case 1: buses += 1; XCTAssertEqual(Array(cfg[off + 2..<off + 8]), Array("ISA   ".utf8)); off += 8
            case 2:
                ioapics += 1; XCTAssertEqual(cfg[off + 2], 0x11); XCTAssertEqual(le(cfg, off + 4, UInt32.self), 0xfec0_0000); off += 8
            case 3: ints[cfg[off + 5]] = cfg[off + 7]; off += 8
            case 4: locals += 1; XCTAssertEqual(cfg[off + 7], locals == 1 ? 0 : 1); off += 8
            default: XCTFail("bad entry \(cfg[off])"); return
            }
        }
        XCTAssertEqual(off, len)
        XCTAssertEqual(procs, cpus); XCTAssertEqual(bsp, 1); XCTAssertEqual(buses, 1); XCTAssertEqual(ioapics, 1)
        XCTAssertEqual(ints.count, 15)
        XCTAssertEqual(ints[0], 2)
        XCTAssertNil(ints[2])
        for irq: UInt8 in 3...15 { XCTAssertEqual(ints[irq], irq) }
        XCTAssertEqual(locals, 2)
    }

    func testMPTableSizes() throws {
        XCTAssertEqual(MPTable.maxCPUsInEBDA, 40)
        for cpus in [1, 2, 8, 40, 41, 64, 254] {
            let m = try makeMemory(2 * MiB)
            for t in try MPTable.build(cpus: cpus) { try m.write(t.bytes, at: t.address) }
            try parse(m, cpus: cpus)
            let addr = MPTable.configAddress(cpus: cpus)
            if cpus <= 40 {
                XCTAssertEqual(addr, 0x9fc10)
                XCTAssertLessThanOrEqual(addr + UInt64(MPTable.configSize(cpus: cpus)), 0xa0000)
            } else {
                XCTAssertEqual(addr, 0xf0000)
                XCTAssertLessThanOrEqual(addr + UInt64(MPTable.configSize(cpus: cpus)), 0x100000)
            }
            XCTAssertEqual(MPTable.config(cpus: cpus).count, MPTable.configSize(cpus: cpus))
        }
        assertThrows(.badCPUCount(0, max: 254), try MPTable.build(cpus: 0))
        assertThrows(.badCPUCount(255, max: 254), try MPTable.build(cpus: 255))
    }
}
