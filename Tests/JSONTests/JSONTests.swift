import XCTest
@testable import JSON

final class JSONTests: XCTestCase {
    func parse(_ s: String) throws -> JSONValue { try JSON.parse(s) }

    /// `bytes` is refused with a JSONError whose reason contains `expect` (at `offset`, if given).
    func refuse(_ bytes: [UInt8], _ expect: String, offset: Int? = nil, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let v = try JSON.parse(bytes)
            XCTFail("\(bytes.prefix(40)) parsed as \(v)", file: file, line: line)
        } catch let e as JSONError {
            XCTAssertTrue(e.reason.contains(expect), "\(e)", file: file, line: line)
            if let offset { XCTAssertEqual(e.offset, offset, "\(e)", file: file, line: line) }
            XCTAssertFalse(e.description.contains("\n"), "one line", file: file, line: line)
            XCTAssertLessThanOrEqual(e.offset, bytes.count, file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    func refuse(_ s: String, _ expect: String, offset: Int? = nil, file: StaticString = #filePath, line: UInt = #line) {
        refuse(Array(s.utf8), expect, offset: offset, file: file, line: line)
    }

    func testValues() throws {
        XCTAssertEqual(try parse("null"), .null)
        XCTAssertEqual(try parse(" true "), .bool(true))
        XCTAssertEqual(try parse("\tfalse\r\n"), .bool(false))
        XCTAssertEqual(try parse("\"\""), .string(""))
        XCTAssertEqual(try parse("[]"), .array([]))
        XCTAssertEqual(try parse("{}"), .object([]))
        XCTAssertEqual(try parse("[1, \"a\", null, [true], {\"k\": {}}]"),
                       .array([.number(JSONNumber(1)), .string("a"), .null, .array([.bool(true)]),
                               .object([JSONMember("k", .object([]))])]))
        // Members keep document order.
        guard case .object(let m) = try parse("{\"b\": 1, \"a\": 2, \"c\": 3}") else { return XCTFail() }
        XCTAssertEqual(m.map(\.key), ["b", "a", "c"])
    }

    func testNumbers() throws {
        for (text, int) in [("0", Int64(0)), ("-0", 0), ("7", 7), ("-12", -12), ("1024", 1024),
                            ("9223372036854775807", .max), ("-9223372036854775808", .min)] {
            guard case .number(let n) = try parse(text) else { return XCTFail(text) }
            XCTAssertEqual(n.literal, text)
            XCTAssertTrue(n.isInteger, text)
            XCTAssertEqual(n.int64, int, text)
        }
        for text in ["1.5", "1e3", "1E3", "-0.0", "512.0", "5.12e2", "1e-7", "1E+2", "0.5e0"] {
            guard case .number(let n) = try parse(text) else { return XCTFail(text) }
            XCTAssertFalse(n.isInteger, text)
            XCTAssertNil(n.int64, text)
        }
        for text in ["9223372036854775808", "-9223372036854775809", "99999999999999999999999"] {
            guard case .number(let n) = try parse(text) else { return XCTFail(text) }
            XCTAssertTrue(n.isInteger)
            XCTAssertNil(n.int64, "\(text) does not fit")
        }
    }

    func testHugeNumbersParseWithoutConversion() throws {
        let digits = String(repeating: "9", count: 100_000)
        guard case .number(let n) = try parse(digits) else { return XCTFail() }
        XCTAssertNil(n.int64)
        guard case .number(let e) = try parse("1e999999999999999999999") else { return XCTFail() }
        XCTAssertNil(e.int64)
        guard case .number(let f) = try parse("-0." + digits + "e-" + digits) else { return XCTFail() }
        XCTAssertFalse(f.isInteger)
    }

    func testBadNumbers() {
        refuse("01", "leading zeros", offset: 0)
        refuse("-01", "leading zeros", offset: 0)
        refuse("+1", "expected a value", offset: 0)
        refuse(".5", "expected a value", offset: 0)
        refuse("1.", "digit must follow the decimal point", offset: 2)
        refuse("1.e3", "digit must follow the decimal point")
        refuse("-", "digit after '-'", offset: 1)
        refuse("-a", "digit after '-'")
        refuse("1e", "exponent needs digits", offset: 2)
        refuse("1e+", "exponent needs digits", offset: 3)
        refuse("NaN", "expected a value")
        refuse("Infinity", "expected a value")
        refuse("-Infinity", "digit after '-'")
        refuse("0x10", "after the JSON value", offset: 1)
        refuse("1 2", "after the JSON value", offset: 2)
    }

    func testStringsAndEscapes() throws {
        XCTAssertEqual(try parse(#""a\"b\\c\/d\be\ff\ng\rh\ti""#), .string("a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti"))
        XCTAssertEqual(try parse(#""\u0041\u00e9\u20AC""#), .string("Aé€"))
        XCTAssertEqual(try parse(#""\uD83D\uDE00""#), .string("😀"), "surrogate pair")
        XCTAssertEqual(try parse(#""\udbff\udfff""#), .string("\u{10FFFF}"))
        XCTAssertEqual(try parse(#""\u0000""#), .string("\u{0}"), "an escaped NUL is JSON (the schema refuses it)")
        XCTAssertEqual(try parse("\"é€😀\""), .string("é€😀"), "raw UTF-8")
        XCTAssertEqual(try parse("\"\u{7f}\""), .string("\u{7f}"), "DEL needs no escape")
    }

    func testBadStrings() {
        refuse("\"abc", "unterminated string", offset: 4)
        refuse("\"abc\\", "ends after a backslash")
        refuse("\"a\u{0}b\"", "control character U+0000", offset: 2)
        refuse("\"a\tb\"", "control character U+0009", offset: 2)
        refuse("\"a\nb\"", "control character U+000A")
        refuse(#""\x""#, "invalid escape \\x", offset: 1)
        refuse(#""\'""#, "invalid escape")
        refuse(#""\U0041""#, "invalid escape")
        refuse(#""\u12""#, "four hex digits", offset: 1)
        refuse(#""\u12g4""#, "four hex digits")
        refuse(#""\uD800""#, "lone high surrogate", offset: 1)
        refuse(#""\uD800x""#, "lone high surrogate")
        refuse(#""\uD800\u0041""#, "lone high surrogate")
        refuse(#""\uD800\uD800""#, "lone high surrogate")
        refuse(#""\uDC00""#, "lone low surrogate", offset: 1)
        refuse(#""a\uDFFF\uD800""#, "lone low surrogate", offset: 2)
        refuse(#""\uD800\n""#, "lone high surrogate")
        refuse("'single'", "expected a value")
    }

    func testInvalidUTF8() {
        let cases: [([UInt8], String)] = [
            ([0x22, 0xFF, 0x22], "0xFF cannot start"),
            ([0x22, 0x80, 0x22], "0x80 cannot start"),
            ([0x22, 0xC0, 0x80, 0x22], "0xC0 cannot start"),       // overlong NUL
            ([0x22, 0xC1, 0xBF, 0x22], "0xC1 cannot start"),
            ([0x22, 0xE0, 0x80, 0x80, 0x22], "byte 0x80 after 0xE0"),  // overlong
            ([0x22, 0xED, 0xA0, 0x80, 0x22], "byte 0xA0 after 0xED"),  // UTF-8-encoded surrogate
            ([0x22, 0xF0, 0x80, 0x80, 0x80, 0x22], "after 0xF0"),
            ([0x22, 0xF4, 0x90, 0x80, 0x80, 0x22], "after 0xF4"),      // above U+10FFFF
            ([0x22, 0xF5, 0x80, 0x80, 0x80, 0x22], "0xF5 cannot start"),
            ([0x22, 0xC3, 0x22], "byte 0x22 after 0xC3"),              // cut short by the quote
            ([0x22, 0xE2, 0x82], "ends inside a character"),
            ([0xFF], "byte 0xFF"),
            ([0x5B, 0xC3, 0xA9, 0x5D], "byte 0xC3"),                   // non-ASCII outside a string
        ]
        for (bytes, expect) in cases { refuse(bytes, expect) }
        refuse([0xEF, 0xBB, 0xBF, 0x7B, 0x7D], "byte order mark", offset: 0)
    }

    func testNULBytes() {
        refuse([0], "byte 0x00", offset: 0)
        refuse([0x7B, 0x7D, 0], "after the JSON value", offset: 2)
        refuse([0x5B, 0, 0x5D], "byte 0x00", offset: 1)
        refuse(Array("{\"a\"\u{0}:1}".utf8), "expected ':'")
        refuse(Array("nul\u{0}".utf8), "did you mean null")
    }

    func testStructure() {
        refuse("", "empty", offset: 0)
        refuse(" \n\t ", "empty", offset: 4)
        refuse("{,}", "member name", offset: 1)
        refuse("{\"a\" 1}", "expected ':'", offset: 5)
        refuse("{\"a\":1,}", "member name", offset: 7)
        refuse("{\"a\":1 \"b\":2}", "expected ',' or '}'", offset: 7)
        refuse("{a:1}", "member name in double quotes", offset: 1)
        refuse("[1,]", "expected a value", offset: 3)
        refuse("[1 2]", "expected ',' or ']'", offset: 3)
        refuse("[,1]", "expected a value", offset: 1)
        refuse("]", "expected a value", offset: 0)
        refuse("{}}", "after the JSON value", offset: 2)
        refuse("[] x", "after the JSON value", offset: 3)
        refuse("tru", "did you mean true")
        refuse("nulll", "after the JSON value", offset: 4)
        refuse("True", "expected a value")
        refuse("// c\n{}", "expected a value")
        refuse("{} /* c */", "after the JSON value")
    }

    func testDuplicateKeys() throws {
        refuse("{\"a\":1,\"a\":2}", "\"a\" appears twice", offset: 7)
        refuse("{\"a\":1,\"\\u0061\":2}", "appears twice", offset: 7)
        refuse("{\"x\":{\"k\":1,\"k\":1}}", "\"k\" appears twice")
        // Byte for byte: U+00E9 and e + U+0301 are different names.
        XCTAssertNoThrow(try parse("{\"\u{e9}\":1,\"e\u{301}\":2}"))
        XCTAssertNoThrow(try parse("{\"a\":{\"a\":{\"a\":1}}}"), "the same name in nested objects")
    }

    func testErrorPosition() {
        do {
            _ = try JSON.parse("{\n  \"a\": 1,\n  \"b\": tru\n}")
            XCTFail()
        } catch let e as JSONError {
            XCTAssertEqual(e.offset, 19)
            XCTAssertEqual(e.line, 3)
            XCTAssertEqual(e.column, 8)
            XCTAssertEqual(e.description, "invalid JSON at byte 19 (line 3, column 8): unexpected 't': expected a value (did you mean true?)")
        } catch { XCTFail("\(error)") }
    }

    func testDepthLimit() throws {
        let ok = String(repeating: "[", count: JSON.maxDepth) + String(repeating: "]", count: JSON.maxDepth)
        XCTAssertNoThrow(try parse(ok), "exactly \(JSON.maxDepth) levels")
        let objects = String(repeating: "{\"a\":", count: JSON.maxDepth - 1) + "{}" + String(repeating: "}", count: JSON.maxDepth - 1)
        XCTAssertNoThrow(try parse(objects))
        let one = "[" + ok + "]"
        refuse(one, "nested deeper than 64", offset: JSON.maxDepth)
        // 10,000 deep (and a million): refused at level 65, no stack overflow.
        for n in [10_000, 1_000_000] {
            refuse(String(repeating: "[", count: n), "nested deeper than 64", offset: JSON.maxDepth)
            refuse(String(repeating: "{\"a\":", count: n), "nested deeper than 64")
            refuse(String(repeating: "[{\"a\":", count: n), "nested deeper than 64")
        }
    }

    /// Every proper prefix of a document is refused; none crashes.
    func testTruncated() throws {
        let doc = #"{"boot-source": {"kernel_image_path": "vmlinux.bin", "boot_args": "console=ttyS0 \u00e9 \uD83D\uDE00"}, "n": [1, -2.5e3, true, false, null], "é": "😀"}"#
        let bytes = Array(doc.utf8)
        XCTAssertNoThrow(try JSON.parse(bytes))
        for n in 0..<bytes.count {
            XCTAssertThrowsError(try JSON.parse(Array(bytes[0..<n])), "prefix of \(n) bytes") { e in
                XCTAssertTrue(e is JSONError)
            }
        }
    }

    /// Random bytes and random mutations of a valid document: parse returns or throws a
    /// JSONError, and whatever parses survives a serialize/parse round trip.
    func testRandomInputNeverCrashes() throws {
        var rng = SplitMix64(seed: 0x5eed)
        let base = Array(#"{"drives": [{"drive_id": "rootfs", "path_on_host": "a\u00e9\"b", "is_root_device": true}], "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024}, "x": [[[]], {}, -0.5e-3, "\uD83D\uDE00"]}"#.utf8)
        let alphabet = Array("{}[]\":,\\u0123456789abcdefE+-.tfn \n\t".utf8) + [0, 0x80, 0xC3, 0xED, 0xF4, 0xFF]
        var parsed = 0
        for round in 0..<20_000 {
            var b: [UInt8]
            if round % 4 == 0 {
                b = (0..<Int(rng.next() % 64)).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }
            } else {
                b = base
                for _ in 0...(rng.next() % 4) {
                    let at = Int(rng.next() % UInt64(b.count))
                    switch rng.next() % 3 {
                    case 0: b[at] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                    case 1: b.remove(at: at)
                    default: b.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: at)
                    }
                }
            }
            do {
                let v = try JSON.parse(b)
                parsed += 1
                XCTAssertEqual(try JSON.parse(JSON.serialize(v)), v)
            } catch {
                XCTAssertTrue(error is JSONError)
            }
        }
        XCTAssertGreaterThan(parsed, 0)
    }

    func testSerializeRoundTrip() throws {
        let v: JSONValue = .object([
            JSONMember("s", .string("q\"b\\s/\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é😀")),
            JSONMember("n", .number(JSONNumber(-42))),
            JSONMember("a", .array([.null, .bool(true), .bool(false), .array([]), .object([])])),
            JSONMember("o", .object([JSONMember("k", .string(""))])),
        ])
        let text = JSON.serialize(v)
        XCTAssertEqual(try JSON.parse(text), v)
        XCTAssertTrue(text.contains(#""q\"b\\s/\n\r\t\b\f\u0001\u001F"#), text)
        XCTAssertEqual(JSON.serialize(.object([JSONMember("a", .array([.number(JSONNumber(1))]))])),
                       "{\n  \"a\": [\n    1\n  ]\n}")
    }

    func testKindNames() {
        XCTAssertEqual(JSONValue.null.kindName, "null")
        XCTAssertEqual(JSONValue.string("").kindName, "a string")
        XCTAssertEqual(JSONValue.array([]).kindName, "an array")
        XCTAssertEqual(JSONValue.object([]).kindName, "an object")
        XCTAssertEqual(JSONValue.number(JSONNumber(1)).kindName, "a number")
        XCTAssertEqual(JSONValue.bool(true).kindName, "a boolean")
    }
}

/// A small deterministic generator for the random-input test.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}
