// A small AML (ACPI Machine Language) encoder: enough for a DSDT made of Scope, Device
// and Name objects holding integers, strings, EISA ids, packages and resource templates
// (ACPI 6.5 spec, chapter 20 "ACPI Machine Language Specification" and 6.4 "Resource
// Data Types"). No methods.

public enum AML {
    // Opcodes.
    public static let zeroOp: UInt8 = 0x00
    public static let oneOp: UInt8 = 0x01
    public static let nameOp: UInt8 = 0x08
    public static let bytePrefix: UInt8 = 0x0a
    public static let wordPrefix: UInt8 = 0x0b
    public static let dwordPrefix: UInt8 = 0x0c
    public static let stringPrefix: UInt8 = 0x0d
    public static let qwordPrefix: UInt8 = 0x0e
    public static let scopeOp: UInt8 = 0x10
    public static let bufferOp: UInt8 = 0x11
    public static let packageOp: UInt8 = 0x12
    public static let extOpPrefix: UInt8 = 0x5b
    public static let deviceOp: UInt8 = 0x82
    public static let rootChar: UInt8 = 0x5c
    public static let dualNamePrefix: UInt8 = 0x2e
    public static let multiNamePrefix: UInt8 = 0x2f

    /// PkgLength for a package whose contents (after the PkgLength) are `contentLength`
    /// bytes. The encoded length counts the PkgLength bytes themselves.
    public static func pkgLength(_ contentLength: Int) -> [UInt8] {
        precondition(contentLength >= 0 && contentLength < 0x0fff_fff0, "AML package too large")
        if contentLength + 1 < 0x40 { return [UInt8(contentLength + 1)] }
        for extra in 1...3 {
            let total = contentLength + 1 + extra
            if total < 1 << (4 + 8 * extra) {
                var out: [UInt8] = [UInt8(extra << 6) | UInt8(total & 0xf)]
                for k in 0..<extra { out.append(UInt8((total >> (4 + 8 * k)) & 0xff)) }
                return out
            }
        }
        fatalError("unreachable")
    }

    /// A 4-character NameSeg: "COM1", "_S5" -> "_S5_". Characters must be A-Z, 0-9 or _,
    /// the first not a digit.
    public static func nameSeg(_ s: String) -> [UInt8] {
        var b = Array(s.utf8)
        precondition(!b.isEmpty && b.count <= 4, "bad AML NameSeg \(s)")
        for (i, c) in b.enumerated() {
            let ok = (c >= 0x41 && c <= 0x5a) || c == 0x5f || (i > 0 && c >= 0x30 && c <= 0x39)
            precondition(ok, "bad AML NameSeg \(s)")
        }
        while b.count < 4 { b.append(0x5f) }
        return b
    }

    /// A NameString: optional root prefix "\", then segments separated by ".".
    public static func nameString(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var rest = Substring(s)
        if rest.first == "\\" { out.append(rootChar); rest = rest.dropFirst() }
        if rest.isEmpty { return out + [0x00] } // NullName
        let segs = rest.split(separator: ".", omittingEmptySubsequences: false).map { nameSeg(String($0)) }
        switch segs.count {
        case 1: out += segs[0]
        case 2: out += [dualNamePrefix] + segs[0] + segs[1]
        default:
            precondition(segs.count < 256)
            out += [multiNamePrefix, UInt8(segs.count)]
            for x in segs { out += x }
        }
        return out
    }

    /// An integer in its shortest encoding (Zero, One, Byte/Word/DWord/QWord constant).
    public static func integer(_ v: UInt64) -> [UInt8] {
        switch v {
        case 0: return [zeroOp]
        case 1: return [oneOp]
        case ...0xff: return [bytePrefix, UInt8(v)]
        case ...0xffff: return [wordPrefix] + le(v, 2)
        case ...0xffff_ffff: return [dwordPrefix] + le(v, 4)
        default: return [qwordPrefix] + le(v, 8)
        }
    }

    /// A string constant (ASCII, NUL-terminated).
    public static func string(_ s: String) -> [UInt8] {
        let b = Array(s.utf8)
        precondition(b.allSatisfy { $0 > 0 && $0 < 0x80 }, "AML strings are ASCII without NUL")
        return [stringPrefix] + b + [0]
    }

    /// The compressed 32-bit EISA id of "PNP0501" etc. (three letters, four hex digits).
    public static func eisaIdValue(_ s: String) -> UInt32 {
        let b = Array(s.utf8)
        precondition(b.count == 7 && b[0..<3].allSatisfy { $0 >= 0x41 && $0 <= 0x5a }, "bad EISA id \(s)")
        func hexDigit(_ c: UInt8) -> UInt32 {
            switch c {
            case 0x30...0x39: return UInt32(c - 0x30)
            case 0x41...0x46: return UInt32(c - 0x41 + 10)
            default: preconditionFailure("bad EISA id \(s)")
            }
        }
        let vendor = (UInt32(b[0] - 0x40) << 10) | (UInt32(b[1] - 0x40) << 5) | UInt32(b[2] - 0x40)
        let product = (hexDigit(b[3]) << 12) | (hexDigit(b[4]) << 8) | (hexDigit(b[5]) << 4) | hexDigit(b[6])
        // Stored big-endian: vendor bytes first, then product bytes.
        let be = (vendor << 16) | product
        return be.byteSwapped
    }

    /// EisaId("PNP0501") as an AML integer (always a DWord, as iasl emits it).
    public static func eisaId(_ s: String) -> [UInt8] { [dwordPrefix] + le(UInt64(eisaIdValue(s)), 4) }

    /// Name(name, object).
    public static func name(_ n: String, _ object: [UInt8]) -> [UInt8] { [nameOp] + nameString(n) + object }

    /// Package(){elements...}: each element an encoded data object.
    public static func package(_ elements: [[UInt8]]) -> [UInt8] {
        precondition(elements.count < 256)
        let body = [UInt8(elements.count)] + elements.flatMap { $0 }
        return [packageOp] + pkgLength(body.count) + body
    }

    /// Buffer(){bytes}.
    public static func buffer(_ bytes: [UInt8]) -> [UInt8] {
        let body = integer(UInt64(bytes.count)) + bytes
        return [bufferOp] + pkgLength(body.count) + body
    }

    /// Scope(name){terms}.
    public static func scope(_ n: String, _ terms: [[UInt8]]) -> [UInt8] {
        let body = nameString(n) + terms.flatMap { $0 }
        return [scopeOp] + pkgLength(body.count) + body
    }

    /// Device(name){terms}.
    public static func device(_ n: String, _ terms: [[UInt8]]) -> [UInt8] {
        let body = nameString(n) + terms.flatMap { $0 }
        return [extOpPrefix, deviceOp] + pkgLength(body.count) + body
    }

    // MARK: resource templates

    /// ResourceTemplate(){descriptors}: a buffer ending with an End Tag (checksum 0).
    public static func resourceTemplate(_ descriptors: [[UInt8]]) -> [UInt8] {
        buffer(descriptors.flatMap { $0 } + [0x79, 0x00])
    }

    /// IO(Decode16, min, max, alignment, length): small item 0x08, 7 bytes.
    public static func io(min: UInt16, max: UInt16, alignment: UInt8, length: UInt8) -> [UInt8] {
        [0x47, 0x01] + le(UInt64(min), 2) + le(UInt64(max), 2) + [alignment, length]
    }

    /// IRQNoFlags(){irq} (ISA IRQ, edge, active high, exclusive): small item 0x04, 2 bytes.
    public static func irqNoFlags(_ irq: Int) -> [UInt8] {
        precondition(irq >= 0 && irq < 16)
        return [0x22] + le(UInt64(1) << irq, 2)
    }

    /// Memory32Fixed(ReadWrite/ReadOnly, base, length): large item 0x86, 9 bytes.
    public static func memory32Fixed(base: UInt32, length: UInt32, writable: Bool = true) -> [UInt8] {
        [0x86, 0x09, 0x00, writable ? 1 : 0] + le(UInt64(base), 4) + le(UInt64(length), 4)
    }

    /// Interrupt(ResourceConsumer/Producer, Edge/Level, ActiveHigh/Low, Exclusive/Shared){gsis}:
    /// Extended Interrupt Descriptor, large item 0x89.
    public static func interrupt(consumer: Bool = true, edge: Bool, activeLow: Bool, shared: Bool,
                                 _ gsis: [UInt32]) -> [UInt8] {
        precondition(!gsis.isEmpty && gsis.count < 256)
        var flags: UInt8 = 0
        if consumer { flags |= 1 << 0 }
        if edge { flags |= 1 << 1 }
        if activeLow { flags |= 1 << 2 }
        if shared { flags |= 1 << 3 }
        let len = 2 + 4 * gsis.count
        return [0x89] + le(UInt64(len), 2) + [flags, UInt8(gsis.count)] + gsis.flatMap { le(UInt64($0), 4) }
    }

    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
}
