import XCTest
import JSON
import Virtio
@testable import Devices
@testable import VMM

/// --device KIND[,key=value...], the kinds in `deviceKinds`, and swiftlet.devices.
final class DeviceKindTests: XCTestCase {
    func testEveryKindParsesToItsSpec() throws {
        XCTAssertEqual(deviceKinds.map(\.name), ["rng", "vsock"])
        XCTAssertEqual(try parseDevice("rng", kinds: deviceKinds).kind, "rng")
        let v = try XCTUnwrap(try parseDevice("vsock,cid=42", kinds: deviceKinds) as? VsockDeviceSpec)
        XCTAssertEqual(v.options, VsockOptions(cid: 42))
    }

    func testHostileValuesAreOneUsageLine() {
        let bad: [(String, String)] = [
            ("", "--device '': '' is not a device kind: use one of rng, vsock,cid=N"),
            (",", "--device ',': '' is not a device kind"),
            ("RNG", "--device 'RNG': 'RNG' is not a device kind"),
            ("rng ", "--device 'rng ': 'rng ' is not a device kind"),
            ("blk,path=/tmp/x", "--device 'blk,path=/tmp/x': 'blk' is not a device kind"),
            ("rng,", "--device rng: empty option in 'rng,': use --device rng"),
            ("rng,,", "--device rng: empty option"),
            ("rng,x=1", "--device rng: unknown option 'x': use --device rng"),
            ("rng,x", "--device rng: 'x' is not key=value: use --device rng"),
            ("vsock", "--device vsock: missing cid=: use --device vsock,cid=N"),
            ("vsock,", "--device vsock: empty option"),
            ("vsock,cid=2", "--device vsock: cid='2' is not valid"),
            ("vsock,cid=3,cid=4", "--device vsock: cid= given twice"),
            ("vsock,cid=3,,", "--device vsock: empty option"),
            ("vsock,=3", "--device vsock: unknown option ''"),
            ("vsock,cid=3,uds_path=/x", "--device vsock: unknown option 'uds_path': use --device vsock,cid=N"),
            ("\u{1b}[2J", "--device '\\u{1B}[2J': '\\u{1B}[2J' is not a device kind"),
            ("vsock,cid=\n", "--device vsock: cid='\\n' is not valid"),
            (String(repeating: "rng,", count: 10_000), "--device rng: 'rng' is not key=value"),
        ]
        for (text, want) in bad {
            do {
                let s = try parseDevice(text, kinds: deviceKinds)
                XCTFail("'\(text.prefix(40))' accepted as \(s)")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, text)
                XCTAssertTrue(e.message.hasPrefix(want), "\(text.prefix(40)): \(e.message.prefix(200))")
                XCTAssertFalse(e.message.contains("\n"), "one line: \(e.message.prefix(200))")
                XCTAssertFalse(e.message.contains("\u{1b}"), "control characters escaped")
            } catch {
                XCTFail("\(error)")
            }
        }
    }

    func testOrderAfterTheOtherDevicesAsGiven() throws {
        var s = Settings()
        s.kernel = "/k"
        s.rng = true
        s.vsock = VsockOptions(cid: 3)
        s.devices = ["rng", "vsock,cid=4", "rng"]
        let c = try machineConfig(s, startNanos: 0)
        XCTAssertEqual(deviceSpecs(c).map(\.kind), ["rng", "vsock", "rng", "vsock", "rng"])
        XCTAssertEqual((deviceSpecs(c)[3] as? VsockDeviceSpec)?.options.cid, 4)
    }

    func settings(_ text: String) throws -> Settings { try parseConfig(try JSON.parse(Array(text.utf8))) }

    func testConfigFileListFlagsReplaceItAndPrintConfigReadsBack() throws {
        let file = try settings(#"{"swiftlet": {"devices": ["vsock,cid=7", "rng"]}}"#)
        XCTAssertEqual(file.devices, ["vsock,cid=7", "rng"])
        XCTAssertNil(try settings(#"{"swiftlet": {"devices": null}}"#).devices)
        XCTAssertEqual(try settings(#"{"swiftlet": {"devices": []}}"#).devices, [])
        var flags = Settings()
        flags.devices = ["rng"]
        XCTAssertEqual(flags.over(file).devices, ["rng"], "--device replaces the file's whole list")
        XCTAssertEqual(Settings().over(file).devices, ["vsock,cid=7", "rng"])
        var merged = Settings().over(file)
        merged.kernel = "/k"
        let text = try effectiveConfigText(merged)
        XCTAssertEqual(try settings(text).devices, ["vsock,cid=7", "rng"])
        for (doc, want) in [
            (#"{"swiftlet": {"devices": "rng"}}"#, "swiftlet.devices: expected an array of strings"),
            (#"{"swiftlet": {"devices": [1]}}"#, "swiftlet.devices[0]: expected a string"),
            (#"{"swiftlet": {"devices": ["rng", null]}}"#, "swiftlet.devices[1]: expected a string"),
            (#"{"swiftlet": {"devices": ["rng", "vsock"]}}"#, "swiftlet.devices[1] vsock: missing cid="),
            (#"{"swiftlet": {"devices": ["net,tap=x"]}}"#, "swiftlet.devices[0] 'net,tap=x': 'net' is not a device kind"),
            (#"{"swiftlet": {"device": ["rng"]}}"#, "swiftlet.device: unknown key"),
        ] {
            do {
                let s = try settings(doc)
                XCTFail("accepted: \(s)")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, doc)
                XCTAssertTrue(e.message.hasPrefix(want), "\(doc): \(e.message)")
            }
        }
    }
}
