import XCTest
@testable import VMM

/// --timeout DURATION parsing, and the exit status and --metrics "exit" member of each way
/// a run can end.
final class TimeoutTests: XCTestCase {
    let s: UInt64 = 1_000_000_000

    func testValidDurations() throws {
        XCTAssertEqual(try parseDuration("30"), 30 * s)
        XCTAssertEqual(try parseDuration("30s"), 30 * s)
        XCTAssertEqual(try parseDuration("2m"), 120 * s)
        XCTAssertEqual(try parseDuration("1h"), 3600 * s)
        XCTAssertEqual(try parseDuration("1d"), 86400 * s)
        XCTAssertEqual(try parseDuration("1.5"), 1_500_000_000)
        XCTAssertEqual(try parseDuration("1.5m"), 90 * s)
        XCTAssertEqual(try parseDuration(".5"), 500_000_000)
        XCTAssertEqual(try parseDuration("0.000000001"), 1, "one nanosecond, the finest")
        XCTAssertEqual(try parseDuration("007"), 7 * s, "leading zeros are decimal")
        XCTAssertEqual(try parseDuration(" 5s\n"), 5 * s, "surrounding whitespace")
        XCTAssertEqual(try parseDuration("00000000000000000000000000000009"), 9 * s, "many leading zeros")
        XCTAssertEqual(try parseDuration("36500d"), maximumDurationNanos, "100 years")
    }

    func testHostileDurations() {
        for bad in ["", " ", "s", "m", ".", "5.", "1..5", "1.5.2", "-1", "+5", "1e3", "0x10", "1ss", "1sm",
                    "1 s", "3 0", "1h30m", "30S", "2M", "1ms", "1w", "inf", "nan", "NaN", "infinity",
                    "\u{0663}", "\u{FF11}", "1\u{0}", "\u{0}", "1,5", "½", "5s ", "５",
                    "0.0000000001", String(repeating: "9", count: 40), "-0", "∞"] {
            do {
                let v = try parseDuration(bad)
                if bad == "5s " { XCTAssertEqual(v, 5 * s); continue }
                XCTFail("'\(bad)' parsed as \(v)")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, bad)
                XCTAssertTrue(e.message.hasPrefix("--timeout '"), e.message)
                XCTAssertFalse(e.message.contains("\n"), "one line")
                XCTAssertTrue(e.message.contains(": "), "names the fix: \(e.message)")
            } catch {
                XCTFail("'\(bad)': \(error)")
            }
        }
    }

    func testZeroAndTooLongAreRefusedWithTheirOwnReason() {
        for zero in ["0", "0s", "0.0", "000m", ".0"] {
            XCTAssertThrowsError(try parseDuration(zero)) { e in
                XCTAssertTrue("\(e)".contains("is zero"), "\(zero): \(e)")
            }
        }
        for long in ["36501d", "3153600001", "18446744073709551615", "18446744073709551616",
                     "99999999999999999999d", "1000000000000000000000", "5124095576030431h"] {
            XCTAssertThrowsError(try parseDuration(long)) { e in
                XCTAssertTrue("\(e)".contains("too long"), "\(long): \(e)")
            }
        }
    }

    func testFormatDuration() {
        XCTAssertEqual(formatDuration(5 * s), "5 s")
        XCTAssertEqual(formatDuration(90 * s), "90 s")
        XCTAssertEqual(formatDuration(1_500_000_000), "1.5 s")
        XCTAssertEqual(formatDuration(1_000_000), "0.001 s")
        XCTAssertEqual(formatDuration(1), "0 s")
        XCTAssertEqual(formatDuration(maximumDurationNanos), "3153600000 s")
    }

    func testOutcomeStatusesAndWhoChoseThem() {
        XCTAssertEqual(Outcome.guestExit(7, debugPort: false).status, 7)
        XCTAssertEqual(Outcome.guestExit(0, debugPort: false).status, 0)
        XCTAssertEqual(Outcome.guestExit(33, debugPort: true).status, 33)
        XCTAssertEqual(Outcome.timedOut(5 * s).status, 124)
        XCTAssertEqual(ExitStatus.timedOut.rawValue, 124)
        XCTAssertEqual(Outcome.guestExit(7, debugPort: false).metricsJSON,
                       #"{"status": 7, "by": "guest", "reason": "exit-register"}"#)
        XCTAssertEqual(Outcome.guestExit(1, debugPort: true).metricsJSON,
                       #"{"status": 1, "by": "guest", "reason": "isa-debug-exit"}"#)
        XCTAssertEqual(Outcome.timedOut(5 * s).metricsJSON, #"{"status": 124, "by": "swiftlet", "reason": "timeout"}"#)
        XCTAssertEqual(Outcome.poweredOff.metricsJSON, #"{"status": 0, "by": "swiftlet", "reason": "poweroff"}"#)
        XCTAssertEqual(Outcome.failed("x").metricsJSON, #"{"status": 1, "by": "swiftlet", "reason": "host-error"}"#)
        XCTAssertEqual(Outcome.signalled(15).metricsJSON, #"{"status": 143, "by": "swiftlet", "reason": "signal"}"#)
        XCTAssertEqual(Outcome.rebooted.metricsJSON, #"{"status": 3, "by": "swiftlet", "reason": "reboot"}"#)
        XCTAssertEqual(Outcome.crashed("x").metricsJSON, #"{"status": 4, "by": "swiftlet", "reason": "crash"}"#)
        // a non-zero guest status and every failure of swiftlet's own are named on stderr
        XCTAssertTrue(Outcome.guestExit(1, debugPort: false).loggedByDefault)
        XCTAssertFalse(Outcome.guestExit(0, debugPort: false).loggedByDefault)
        XCTAssertTrue(Outcome.timedOut(s).loggedByDefault)
        XCTAssertFalse(Outcome.poweredOff.loggedByDefault)
        XCTAssertTrue(Outcome.guestExit(7, debugPort: false).summary.hasPrefix("guest exit status 7 "))
        XCTAssertEqual(Outcome.timedOut(5 * s).summary, "timed out (--timeout 5 s): guest stopped")
    }
}
