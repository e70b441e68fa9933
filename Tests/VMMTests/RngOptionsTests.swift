import XCTest
import JSON
@testable import VMM

/// --rng and the configuration file's `entropy` object.
final class RngOptionsTests: XCTestCase {
    func testParse() throws {
        XCTAssertEqual(try parseRng("on"), true)
        XCTAssertEqual(try parseRng("off"), false)
        for bad in ["", "ON", "On", "yes", "1", "true", "on,", " on", "on\n", "off=1", "o\u{0}n", "\u{1b}[2J"] {
            do {
                _ = try parseRng(bad)
                XCTFail("'\(bad)' accepted")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, bad)
                XCTAssertTrue(e.message.hasPrefix("--rng '"), e.message)
                XCTAssertTrue(e.message.contains("use on"), e.message)
                XCTAssertFalse(e.message.contains("\n"), "one line: \(e.message)")
                XCTAssertFalse(e.message.contains("\u{1b}"), "control characters escaped")
            }
        }
    }

    func settings(_ text: String) throws -> Settings { try parseConfig(try JSON.parse(Array(text.utf8))) }

    func configError(_ text: String, _ expect: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let s = try settings(text)
            XCTFail("accepted: \(s)", file: file, line: line)
        } catch let e as SwiftletError {
            XCTAssertEqual(e.status, .usage, file: file, line: line)
            XCTAssertTrue(e.message.hasPrefix(expect), e.message, file: file, line: line)
            XCTAssertFalse(e.message.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    func testEntropySection() throws {
        XCTAssertEqual(try settings(#"{"entropy": {}}"#).rng, true)
        XCTAssertEqual(try settings(#"{"entropy": {"rate_limiter": null}}"#).rng, true)
        XCTAssertNil(try settings(#"{"entropy": null}"#).rng, "null: not configured, as Firecracker reads it")
        XCTAssertNil(try settings(#"{}"#).rng)
        configError(#"{"entropy": {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}}"#,
                    "entropy.rate_limiter: rate limiters are not supported")
        configError(#"{"entropy": {"rate_limiter": 0}}"#, "entropy.rate_limiter:")
        configError(#"{"entropy": true}"#, "entropy: expected an object")
        configError(#"{"entropy": []}"#, "entropy: expected an object")
        configError(#"{"entropy": {"bytes": 1}}"#, "entropy.bytes: unknown key")
    }

    func testFlagOverFileAndDefault() throws {
        var flags = Settings()
        flags.kernel = "k"
        let file = try settings(#"{"entropy": {}}"#)
        XCTAssertTrue(try machineConfig(flags.over(file), startNanos: 0).rng)
        XCTAssertFalse(try machineConfig(flags, startNanos: 0).rng, "off by default")
        flags.rng = false
        XCTAssertFalse(try machineConfig(flags.over(file), startNanos: 0).rng, "--rng off wins over the file")
    }

    func testPrintConfigRoundTrip() throws {
        var s = Settings()
        s.kernel = "k"
        s.kernelCache = "none"
        for rng in [true, false] {
            s.rng = rng
            let text = try effectiveConfigText(s)
            XCTAssertTrue(text.contains(rng ? #""entropy": {}"# : #""entropy": null"#), text)
            let back = try settings(text)
            XCTAssertEqual(back.rng ?? false, rng)
            XCTAssertEqual(try effectiveConfigText(back), text)
        }
    }
}
