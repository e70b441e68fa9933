import XCTest
import Glibc
import JSON
import Vhost
import Virtio
@testable import Devices
@testable import VMM

/// --vsock, the configuration file's `vsock` object, and opening vhost-vsock.
final class VsockOptionsTests: XCTestCase {
    func testParse() throws {
        XCTAssertEqual(try VsockOptions.parse("cid=3"), VsockOptions(cid: 3))
        XCTAssertEqual(try VsockOptions.parse("cid=4294967294"), VsockOptions(cid: 4_294_967_294))
        XCTAssertEqual(try VsockOptions.parse("cid=0000000042"), VsockOptions(cid: 42))
        let bad: [(String, String)] = [
            ("", "--vsock: empty option"),
            ("cid", "--vsock: 'cid' is not key=value"),
            ("cid=", "--vsock: cid='' is not valid"),
            ("cid=0", "--vsock: cid='0' is not valid"),
            ("cid=1", "--vsock: cid='1' is not valid"),
            ("cid=2", "--vsock: cid='2' is not valid: use a context ID from 3 to 4294967294"),
            ("cid=4294967295", "--vsock: cid='4294967295' is not valid"),
            ("cid=4294967296", "--vsock: cid='4294967296' is not valid"),
            ("cid=18446744073709551616", "--vsock: cid='18446744073709551616' is not valid"),
            ("cid=-3", "--vsock: cid='-3' is not valid"),
            ("cid=+3", "--vsock: cid='+3' is not valid"),
            ("cid=0x10", "--vsock: cid='0x10' is not valid"),
            ("cid= 3", "--vsock: cid=' 3' is not valid"),
            ("cid=3 ", "--vsock: cid='3 ' is not valid"),
            ("cid=3\n", "--vsock: cid='3\\n' is not valid"),
            ("cid=3.0", "--vsock: cid='3.0' is not valid"),
            ("cid=٣", "--vsock: cid='٣' is not valid"),
            ("cid=3,", "--vsock: empty option"),
            ("cid=3,cid=4", "--vsock: cid= given twice"),
            ("cid=3,uds_path=/tmp/v.sock", "--vsock: unknown option 'uds_path'"),
            ("port=3", "--vsock: unknown option 'port'"),
            ("CID=3", "--vsock: unknown option 'CID'"),
            ("=3", "--vsock: unknown option ''"),
            ("cid=\u{1b}[2J", "--vsock: cid='\\u{1B}[2J' is not valid"),
        ]
        for (text, want) in bad {
            do {
                let o = try VsockOptions.parse(text)
                XCTFail("'\(text)' accepted as \(o)")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, text)
                XCTAssertTrue(e.message.hasPrefix(want), "\(text): \(e.message)")
                XCTAssertFalse(e.message.contains("\n"), "one line: \(e.message)")
                XCTAssertFalse(e.message.contains("\u{1b}"), "control characters escaped: \(e.message)")
            }
        }
        do { _ = try VsockOptions.parse("uds_path=x") } catch let e as SwiftletError {
            XCTAssertEqual(e.message, "--vsock: unknown option 'uds_path': use --vsock cid=N")
        }
        do { _ = try VsockOptions.parse("") } catch let e as SwiftletError {
            XCTAssertEqual(e.message, "--vsock: empty option in '': use --vsock cid=N")
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

    /// Firecracker's vsock object: guest_cid is the CID, vsock_id is checked as an id,
    /// uds_path must be null or absent.
    func testVsockSection() throws {
        XCTAssertEqual(try settings(#"{"vsock": {"guest_cid": 3}}"#).vsock, VsockOptions(cid: 3))
        XCTAssertEqual(try settings(#"{"vsock": {"vsock_id": "vsock0", "guest_cid": 52, "uds_path": null}}"#).vsock,
                       VsockOptions(cid: 52))
        XCTAssertNil(try settings(#"{"vsock": null}"#).vsock, "null: not configured, as Firecracker reads it")
        XCTAssertNil(try settings(#"{}"#).vsock)
        configError(#"{"vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#, "vsock.uds_path: swiftlet's vsock is the host kernel's vhost-vsock")
        configError(#"{"vsock": {"guest_cid": 3, "uds_path": 1}}"#, "vsock.uds_path:")
        configError(#"{"vsock": {}}"#, "vsock.guest_cid: missing: give the guest's context ID")
        configError(#"{"vsock": {"guest_cid": null}}"#, "vsock.guest_cid: expected an integer, got null")
        for cid in ["0", "2", "4294967295", "18446744073709551616", "-3"] {
            configError(#"{"vsock": {"guest_cid": \#(cid)}}"#, "vsock.guest_cid: \(cid) is out of range: give 3 to 4294967294")
        }
        configError(#"{"vsock": {"guest_cid": 3.5}}"#, "vsock.guest_cid: 3.5 is not an integer")
        configError(#"{"vsock": {"guest_cid": "3"}}"#, "vsock.guest_cid: expected an integer, got a string")
        configError(#"{"vsock": {"guest_cid": 3, "vsock_id": "a b"}}"#, "vsock.vsock_id: 'a b' is not a valid id")
        configError(#"{"vsock": {"guest_cid": 3, "port": 1}}"#, "vsock.port: unknown key")
        configError(#"{"vsock": 3}"#, "vsock: expected an object")
        configError(#"{"vsock": [{"guest_cid": 3}]}"#, "vsock: expected an object")
    }

    /// --vsock replaces the file's; --print-config shows the CID and uds_path null, and
    /// reads back as the same settings.
    func testFlagOverFileAndPrintConfig() throws {
        var flags = Settings()
        flags.kernel = "k"
        let file = try settings(#"{"vsock": {"guest_cid": 7}}"#)
        XCTAssertEqual(try machineConfig(flags.over(file), startNanos: 0).vsock, VsockOptions(cid: 7))
        XCTAssertNil(try machineConfig(flags, startNanos: 0).vsock, "none by default")
        flags.vsock = VsockOptions(cid: 9)
        XCTAssertEqual(try machineConfig(flags.over(file), startNanos: 0).vsock, VsockOptions(cid: 9))
        let text = try effectiveConfigText(flags.over(file))
        XCTAssertTrue(text.contains(#""vsock": {"#), text)
        XCTAssertEqual(try settings(text).vsock, VsockOptions(cid: 9))
        flags.vsock = nil
        XCTAssertNil(try settings(try effectiveConfigText(flags)).vsock)
        XCTAssertEqual(deviceSpecs(try machineConfig(flags.over(file), startNanos: 0)).map(\.kind), ["vsock"])
    }

    func openError(_ e: VhostOpenError, cid: UInt64 = 3) -> SwiftletError? {
        do {
            _ = try openVsock(VsockOptions(cid: cid)) { (_: UInt64) throws(VhostOpenError) -> any VhostVsockBackend in throw e }
            return nil
        } catch {
            return error as? SwiftletError
        }
    }

    /// Every way vhost-vsock cannot work is one line with status 69 saying what to do.
    func testOpenErrors() throws {
        XCTAssertEqual(openError(.open(errno: ENOENT))?.message,
                       "--vsock cid=3: /dev/vhost-vsock is missing: load the vhost_vsock module (modprobe vhost_vsock)")
        XCTAssertEqual(openError(.open(errno: EACCES))?.message.hasPrefix("--vsock cid=3: cannot open /dev/vhost-vsock: "), true)
        XCTAssertEqual(openError(.setup(VhostError(call: "VHOST_VSOCK_SET_GUEST_CID", errno: EADDRINUSE)), cid: 77)?.message,
                       "--vsock cid=77: guest CID 77 is in use by another VM on this host: give this VM another CID")
        XCTAssertEqual(openError(.setup(VhostError(call: "VHOST_SET_OWNER", errno: EBUSY)))?.message.hasPrefix(
            "--vsock cid=3: /dev/vhost-vsock: VHOST_SET_OWNER: "), true)
        // --device names itself
        do {
            _ = try openVsock(VsockOptions(cid: 5), given: "--device vsock,cid=5") { (_: UInt64) throws(VhostOpenError) -> any VhostVsockBackend in
                throw VhostOpenError.open(errno: ENOENT)
            }
            XCTFail("opened")
        } catch let e as SwiftletError {
            XCTAssertTrue(e.message.hasPrefix("--device vsock,cid=5: /dev/vhost-vsock is missing"), e.message)
        }
        XCTAssertEqual(try parseDevice("vsock,cid=6", kinds: deviceKinds).kind, "vsock")
        XCTAssertEqual((try parseDevice("vsock,cid=6", kinds: deviceKinds) as? VsockDeviceSpec)?.given, "--device vsock,cid=6")
        for e in [VhostOpenError.open(errno: ENOENT), .open(errno: EPERM), .open(errno: EIO),
                  .setup(VhostError(call: "VHOST_VSOCK_SET_GUEST_CID", errno: EADDRINUSE))] {
            XCTAssertEqual(openError(e)?.status, .hostUnavailable)
            XCTAssertEqual(openError(e)?.message.contains("\n"), false)
        }
    }

    /// The real spec on this host: where /dev/vhost-vsock is missing, the machine's
    /// error line.
    func testSpecWithoutVhostVsock() throws {
        guard access(VhostVsock.path, F_OK) != 0 else { throw XCTSkip("this host has /dev/vhost-vsock") }
        XCTAssertThrowsError(try openDevices([VsockDeviceSpec(options: VsockOptions(cid: 3))])) {
            XCTAssertEqual(($0 as? SwiftletError)?.status, .hostUnavailable)
        }
    }
}
