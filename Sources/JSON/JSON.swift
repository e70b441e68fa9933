// A small, strict JSON parser and writer (RFC 8259) for swiftlet's --config-file.
//
// Strict on purpose: a configuration file that is not exactly JSON is refused with the
// byte offset of the first problem rather than half understood. Refused:
//   - anything after the value but whitespace (space, tab, CR, LF), and an empty input;
//   - a byte order mark (RFC 8259 8.1: JSON text is UTF-8 without one);
//   - invalid UTF-8 (overlong forms, UTF-8-encoded surrogates, above U+10FFFF);
//   - control characters U+0000-U+001F written raw inside a string;
//   - escapes other than \" \\ \/ \b \f \n \r \t \uXXXX, and a \u surrogate that is not
//     a high one followed at once by a low one;
//   - numbers outside the grammar (leading zeros, "+1", ".5", "1.", NaN, Infinity);
//   - the same member name twice in one object (compared byte for byte);
//   - arrays and objects nested deeper than `JSON.maxDepth`.
// The parser is recursive descent with that depth limit, so its stack use is bounded
// whatever the input; everything else is linear in the input's length. Numbers are kept
// as their literal text: `JSONNumber.int64` is the only conversion, and it says when a
// literal is not an integer or does not fit.
//
// This module imports nothing (not even Glibc): it is pure computation on bytes.

/// A JSON number as written in the document (grammar-checked).
public struct JSONNumber: Equatable, Sendable, CustomStringConvertible {
    /// The literal, e.g. "512", "-1", "1.5e3".
    public let literal: String

    init(literal: String) { self.literal = literal }

    public init(_ value: Int64) { literal = String(value) }
    public init(_ value: Int) { literal = String(value) }

    /// Written without a fraction or an exponent ("512", not "512.0" or "5.12e2").
    public var isInteger: Bool {
        !literal.utf8.contains(where: { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") })
    }

    /// The value, when the literal is an integer that fits in an Int64; nil otherwise.
    public var int64: Int64? {
        guard isInteger else { return nil }
        var digits = Substring(literal).utf8[...]
        let negative = digits.first == UInt8(ascii: "-")
        if negative { digits = digits.dropFirst() }
        guard !digits.isEmpty, digits.count <= 19 else { return nil }
        var v: Int64 = 0
        for d in digits {
            let (m, o1) = v.multipliedReportingOverflow(by: 10)
            let (a, o2) = negative ? m.subtractingReportingOverflow(Int64(d &- 0x30))
                                   : m.addingReportingOverflow(Int64(d &- 0x30))
            guard !o1, !o2 else { return nil }
            v = a
        }
        return v
    }

    public var description: String { literal }
}

/// One member of a JSON object, in document order.
public struct JSONMember: Equatable, Sendable {
    public var key: String
    public var value: JSONValue

    public init(_ key: String, _ value: JSONValue) {
        self.key = key
        self.value = value
    }
}

/// A parsed JSON value. Objects keep their members in document order.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(JSONNumber)
    case string(String)
    case array([JSONValue])
    case object([JSONMember])

    /// "null", "a boolean", "a number", "a string", "an array" or "an object" (for messages).
    public var kindName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}

/// Why a document is not JSON, and where: `offset` counts bytes from 0; `line` and
/// `column` (in bytes) count from 1.
public struct JSONError: Error, Equatable, Sendable, CustomStringConvertible {
    public let offset: Int
    public let line: Int
    public let column: Int
    public let reason: String

    public var description: String {
        "invalid JSON at byte \(offset) (line \(line), column \(column)): \(reason)"
    }
}

public enum JSON {
    /// Arrays and objects may be nested this deep; one more is an error.
    public static let maxDepth = 64

    /// Parses one JSON document (RFC 8259, strictly: see the top of this file).
    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        var p = Parser(bytes: bytes)
        return try p.document()
    }

    public static func parse(_ text: String) throws -> JSONValue { try parse(Array(text.utf8)) }

    /// The value as JSON text: objects and arrays one member per line, indented by two
    /// spaces; strings escaped as RFC 8259 requires (control characters, '"' and '\').
    public static func serialize(_ value: JSONValue) -> String {
        var out = ""
        write(value, level: 0, into: &out)
        return out
    }

    /// A string as a JSON string literal, quotes included.
    public static func quoted(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if u.value < 0x20 {
                    let h = String(u.value, radix: 16, uppercase: true)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    static func write(_ v: JSONValue, level: Int, into out: inout String) {
        let pad = String(repeating: "  ", count: level + 1)
        switch v {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let n): out += n.literal
        case .string(let s): out += quoted(s)
        case .array(let items):
            guard !items.isEmpty else { out += "[]"; return }
            out += "[\n"
            for (i, item) in items.enumerated() {
                out += pad
                write(item, level: level + 1, into: &out)
                out += i + 1 < items.count ? ",\n" : "\n"
            }
            out += String(repeating: "  ", count: level) + "]"
        case .object(let members):
            guard !members.isEmpty else { out += "{}"; return }
            out += "{\n"
            for (i, m) in members.enumerated() {
                out += pad + quoted(m.key) + ": "
                write(m.value, level: level + 1, into: &out)
                out += i + 1 < members.count ? ",\n" : "\n"
            }
            out += String(repeating: "  ", count: level) + "}"
        }
    }
}

private let quote = UInt8(ascii: "\"")
private let backslash = UInt8(ascii: "\\")

private func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }

private func hexValue(_ c: UInt8) -> UInt32? {
    switch c {
    case 0x30...0x39: return UInt32(c - 0x30)
    case 0x41...0x46: return UInt32(c - 0x41 + 10)
    case 0x61...0x66: return UInt32(c - 0x61 + 10)
    default: return nil
    }
}

private func hex2(_ b: UInt8) -> String {
    let h = String(b, radix: 16, uppercase: true)
    return h.count == 1 ? "0" + h : h
}

private func hex4(_ v: UInt32) -> String {
    let h = String(v, radix: 16, uppercase: true)
    return String(repeating: "0", count: max(0, 4 - h.count)) + h
}

private struct Parser {
    let bytes: [UInt8]
    var i = 0
    var depth = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    func error(_ reason: String, at offset: Int? = nil) -> JSONError {
        let at = min(offset ?? i, bytes.count)
        var line = 1
        var lineStart = 0
        for k in 0..<at where bytes[k] == UInt8(ascii: "\n") {
            line += 1
            lineStart = k + 1
        }
        return JSONError(offset: at, line: line, column: at - lineStart + 1, reason: reason)
    }

    /// The byte at `i` for a message: 'x' when printable ASCII, else its hex value.
    func shownByte(_ k: Int) -> String {
        guard k < bytes.count else { return "end of input" }
        let c = bytes[k]
        if c >= 0x20 && c < 0x7f { return "'\(Character(Unicode.Scalar(c)))'" }
        return "byte 0x\(hex2(c))"
    }

    mutating func skipWhitespace() {
        while i < bytes.count {
            switch bytes[i] {
            case 0x20, 0x09, 0x0A, 0x0D: i += 1
            default: return
            }
        }
    }

    mutating func document() throws -> JSONValue {
        if bytes.count >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF {
            throw error("the file starts with a byte order mark: save it as UTF-8 without one", at: 0)
        }
        skipWhitespace()
        guard i < bytes.count else { throw error("no JSON value (the document is empty)") }
        let v = try value()
        skipWhitespace()
        guard i == bytes.count else {
            throw error("unexpected \(shownByte(i)) after the JSON value: only whitespace may follow it")
        }
        return v
    }

    mutating func value() throws -> JSONValue {
        guard i < bytes.count else { throw error("unexpected end of input: expected a value") }
        switch bytes[i] {
        case UInt8(ascii: "{"): return try object()
        case UInt8(ascii: "["): return try array()
        case quote: return .string(String(decoding: try string(), as: UTF8.self))
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), 0x30...0x39: return .number(try number())
        default: throw error("unexpected \(shownByte(i)): expected a value (object, array, string, number, true, false or null)")
        }
    }

    mutating func enter() throws {
        guard depth < JSON.maxDepth else {
            throw error("arrays and objects nested deeper than \(JSON.maxDepth) levels")
        }
        depth += 1
    }

    mutating func object() throws -> JSONValue {
        try enter()
        i += 1  // {
        var members: [JSONMember] = []
        var seen = Set<[UInt8]>()
        skipWhitespace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "}") {
            i += 1
            depth -= 1
            return .object([])
        }
        while true {
            skipWhitespace()
            guard i < bytes.count else { throw error("unexpected end of input: expected a member name in double quotes") }
            guard bytes[i] == quote else {
                throw error("unexpected \(shownByte(i)): expected a member name in double quotes")
            }
            let keyAt = i
            let key = try string()
            guard seen.insert(key).inserted else {
                throw error("member name \(JSON.quoted(String(decoding: key, as: UTF8.self))) appears twice in one object", at: keyAt)
            }
            skipWhitespace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else {
                throw error("unexpected \(shownByte(i)): expected ':' after a member name")
            }
            i += 1
            skipWhitespace()
            let v = try value()
            members.append(JSONMember(String(decoding: key, as: UTF8.self), v))
            skipWhitespace()
            guard i < bytes.count else { throw error("unexpected end of input: expected ',' or '}' in an object") }
            switch bytes[i] {
            case UInt8(ascii: ","): i += 1
            case UInt8(ascii: "}"):
                i += 1
                depth -= 1
                return .object(members)
            default: throw error("unexpected \(shownByte(i)): expected ',' or '}' after an object member")
            }
        }
    }

    mutating func array() throws -> JSONValue {
        try enter()
        i += 1  // [
        var items: [JSONValue] = []
        skipWhitespace()
        if i < bytes.count && bytes[i] == UInt8(ascii: "]") {
            i += 1
            depth -= 1
            return .array([])
        }
        while true {
            skipWhitespace()
            items.append(try value())
            skipWhitespace()
            guard i < bytes.count else { throw error("unexpected end of input: expected ',' or ']' in an array") }
            switch bytes[i] {
            case UInt8(ascii: ","): i += 1
            case UInt8(ascii: "]"):
                i += 1
                depth -= 1
                return .array(items)
            default: throw error("unexpected \(shownByte(i)): expected ',' or ']' after an array element")
            }
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let start = i
        let n = word.utf8CodeUnitCount
        let w = UnsafeBufferPointer(start: word.utf8Start, count: n)
        guard i + n <= bytes.count, bytes[i..<(i + n)].elementsEqual(w) else {
            throw error("unexpected \(shownByte(i)): expected a value (did you mean \(word)?)", at: start)
        }
        i += n
    }

    mutating func number() throws -> JSONNumber {
        let start = i
        if bytes[i] == UInt8(ascii: "-") { i += 1 }
        guard i < bytes.count, isDigit(bytes[i]) else {
            throw error("a number needs a digit after '-'")
        }
        if bytes[i] == 0x30 {
            i += 1
            if i < bytes.count && isDigit(bytes[i]) { throw error("a number may not have leading zeros", at: start) }
        } else {
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        if i < bytes.count && bytes[i] == UInt8(ascii: ".") {
            i += 1
            guard i < bytes.count, isDigit(bytes[i]) else { throw error("a digit must follow the decimal point") }
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        if i < bytes.count && (bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E")) {
            i += 1
            if i < bytes.count && (bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-")) { i += 1 }
            guard i < bytes.count, isDigit(bytes[i]) else { throw error("an exponent needs digits") }
            while i < bytes.count && isDigit(bytes[i]) { i += 1 }
        }
        return JSONNumber(literal: String(decoding: bytes[start..<i], as: UTF8.self))
    }

    /// A string at `i` (on its opening quote): its bytes, unescaped and valid UTF-8.
    mutating func string() throws -> [UInt8] {
        let start = i
        i += 1
        var out: [UInt8] = []
        while true {
            guard i < bytes.count else { throw error("unterminated string (it starts at byte \(start))") }
            let c = bytes[i]
            if c == quote {
                i += 1
                return out
            }
            if c == backslash {
                try escape(into: &out)
                continue
            }
            if c < 0x20 {
                throw error("control character U+00\(hex2(c)) in a string: write it as \\u00\(hex2(c))")
            }
            if c < 0x80 {
                out.append(c)
                i += 1
                continue
            }
            let n = try utf8SequenceLength()
            out.append(contentsOf: bytes[i..<(i + n)])
            i += n
        }
    }

    /// The length of the well-formed UTF-8 sequence at `i` (Unicode 15, table 3-7).
    func utf8SequenceLength() throws -> Int {
        let c = bytes[i]
        let n: Int
        var lo: UInt8 = 0x80, hi: UInt8 = 0xBF  // the second byte's range
        switch c {
        case 0xC2...0xDF: n = 2
        case 0xE0: n = 3; lo = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: n = 3
        case 0xED: n = 3; hi = 0x9F  // not U+D800-U+DFFF
        case 0xF0: n = 4; lo = 0x90
        case 0xF1...0xF3: n = 4
        case 0xF4: n = 4; hi = 0x8F  // not above U+10FFFF
        default: throw error("invalid UTF-8: byte 0x\(hex2(c)) cannot start a character")
        }
        for k in 1..<n {
            guard i + k < bytes.count else { throw error("invalid UTF-8: the input ends inside a character") }
            let b = bytes[i + k]
            let ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF)
            guard ok else { throw error("invalid UTF-8: byte 0x\(hex2(b)) after 0x\(hex2(c))", at: i + k) }
        }
        return n
    }

    mutating func escape(into out: inout [UInt8]) throws {
        let at = i
        i += 1
        guard i < bytes.count else { throw error("unterminated string: the input ends after a backslash") }
        let e = bytes[i]
        i += 1
        switch e {
        case quote: out.append(quote)
        case backslash: out.append(backslash)
        case UInt8(ascii: "/"): out.append(UInt8(ascii: "/"))
        case UInt8(ascii: "b"): out.append(0x08)
        case UInt8(ascii: "f"): out.append(0x0C)
        case UInt8(ascii: "n"): out.append(0x0A)
        case UInt8(ascii: "r"): out.append(0x0D)
        case UInt8(ascii: "t"): out.append(0x09)
        case UInt8(ascii: "u"):
            var u = try hexQuad(escapeAt: at)
            if u >= 0xDC00 && u <= 0xDFFF {
                throw error("lone low surrogate \\u\(hex4(u)): it must follow a high surrogate \\uD800-\\uDBFF", at: at)
            }
            if u >= 0xD800 && u <= 0xDBFF {
                let lowAt = i
                guard i + 1 < bytes.count, bytes[i] == backslash, bytes[i + 1] == UInt8(ascii: "u") else {
                    throw error("lone high surrogate \\u\(hex4(u)): a low surrogate \\uDC00-\\uDFFF must follow it", at: at)
                }
                i += 2
                let low = try hexQuad(escapeAt: lowAt)
                guard low >= 0xDC00 && low <= 0xDFFF else {
                    throw error("lone high surrogate \\u\(hex4(u)): a low surrogate \\uDC00-\\uDFFF must follow it", at: at)
                }
                u = 0x10000 + ((u - 0xD800) << 10) + (low - 0xDC00)
            }
            appendUTF8(u, to: &out)
        default:
            let what = e >= 0x21 && e < 0x7f ? "\\\(Character(Unicode.Scalar(e)))" : "a backslash before byte 0x\(hex2(e))"
            throw error("invalid escape \(what) in a string: use \\\" \\\\ \\/ \\b \\f \\n \\r \\t or \\uXXXX", at: at)
        }
    }

    /// Four hex digits at `i` (after "\u").
    mutating func hexQuad(escapeAt: Int) throws -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            guard i < bytes.count, let h = hexValue(bytes[i]) else {
                throw error("\\u must be followed by four hex digits", at: escapeAt)
            }
            v = v << 4 | h
            i += 1
        }
        return v
    }

    func appendUTF8(_ u: UInt32, to out: inout [UInt8]) {
        switch u {
        case 0..<0x80:
            out.append(UInt8(u))
        case 0x80..<0x800:
            out.append(UInt8(0xC0 | (u >> 6)))
            out.append(UInt8(0x80 | (u & 0x3F)))
        case 0x800..<0x10000:
            out.append(UInt8(0xE0 | (u >> 12)))
            out.append(UInt8(0x80 | ((u >> 6) & 0x3F)))
            out.append(UInt8(0x80 | (u & 0x3F)))
        default:
            out.append(UInt8(0xF0 | (u >> 18)))
            out.append(UInt8(0x80 | ((u >> 12) & 0x3F)))
            out.append(UInt8(0x80 | ((u >> 6) & 0x3F)))
            out.append(UInt8(0x80 | (u & 0x3F)))
        }
    }
}
