import XCTest
import Glibc
import OS
import KVM
import CLinux
@testable import Devices
import Vhost
import Virtio
@testable import VMM

final class NetOptionsTests: XCTestCase {
    func testParsesEveryOption() throws {
        XCTAssertEqual(try NetOptions.parse("tap=tap0"), NetOptions(tap: "tap0"))
        let o = try NetOptions.parse("tap=swt0,mac=52:54:00:AB:cd:01,queues=4,offload=off,mtu=9000")
        XCTAssertEqual(o, NetOptions(tap: "swt0", mac: [0x52, 0x54, 0, 0xAB, 0xCD, 1], queues: 4, offload: false, mtu: 9000))
        XCTAssertEqual(try NetOptions.parse("mtu=68,tap=a").mtu, 68)
        XCTAssertEqual(try NetOptions.parse("tap=a,mtu=65535").mtu, 65535)
        XCTAssertEqual(try NetOptions.parse("tap=a,queues=8").queues, 8)
        XCTAssertEqual(NetOptions(tap: "a").macAddress(index: 1), [0x52, 0x54, 0, 0x12, 0x34, 0x57])
        XCTAssertEqual(try NetOptions.parse("tap=a").vhost, .auto)
        XCTAssertEqual(try NetOptions.parse("tap=a,vhost=on").vhost, .on)
        XCTAssertEqual(try NetOptions.parse("vhost=off,tap=a").vhost, .off)
        XCTAssertEqual(try NetOptions.parse("tap=a,vhost=auto").vhost, .auto)
    }

    /// On a host without /dev/vhost-net: vhost=on is one error line naming the fix
    /// (status 69), auto one info line and the userspace path, off nothing at all.
    func testVhostWithoutVhostNet() throws {
        guard access(VhostNet.path, F_OK) != 0 else { throw XCTSkip("this host has /dev/vhost-net") }
        var lines: [String] = []
        XCTAssertNil(try openVhost(NetOptions(tap: "a", vhost: .off), index: 0) { lines.append($0) })
        XCTAssertEqual(lines, [])
        XCTAssertNil(try openVhost(NetOptions(tap: "a", queues: 2, vhost: .auto), index: 3) { lines.append($0) })
        XCTAssertEqual(lines, ["net3: /dev/vhost-net is missing: using the userspace data path (vhost=auto)"])
        do {
            _ = try openVhost(NetOptions(tap: "a", vhost: .on), index: 0) { lines.append($0) }
            XCTFail("vhost=on opened")
        } catch let e as SwiftletError {
            XCTAssertEqual(e.status, .hostUnavailable)
            XCTAssertEqual(e.message, "--net a: vhost=on but /dev/vhost-net is missing: load the vhost_net module (modprobe vhost_net) or use vhost=off")
        }
        XCTAssertEqual(lines.count, 1)
    }

    func testRefusesHostileValuesWithOneLine() {
        let bad: [(String, String)] = [
            ("", "empty option"),
            ("mac=52:54:00:12:34:56", "missing tap="),
            ("tap=", "tap= is empty"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=0123456789abcdef", "not a valid interface name"),
            ("tap=a b", "not a valid interface name"),
            ("tap=a\n", "not a valid interface name"),
            ("tap=a,tap=b", "given twice"),
            ("tap=a,mac=52:54:00:12:34", "not a MAC address"),
            ("tap=a,mac=52:54:00:12:34:5g", "not a MAC address"),
            ("tap=a,mac=52:54:00:12:34:567", "not a MAC address"),
            ("tap=a,mac=+2:54:00:12:34:56", "not a MAC address"),
            ("tap=a,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=a,mac=00:00:00:00:00:00", "all zeroes"),
            ("tap=a,queues=0", "from 1 to 8"),
            ("tap=a,queues=9", "from 1 to 8"),
            ("tap=a,queues=-1", "from 1 to 8"),
            ("tap=a,queues=99999999999999999999", "from 1 to 8"),
            ("tap=a,queues=", "from 1 to 8"),
            ("tap=a,mtu=67", "from 68 to 65535"),
            ("tap=a,mtu=65536", "from 68 to 65535"),
            ("tap=a,mtu=1e3", "from 68 to 65535"),
            ("tap=a,offload=yes", "offload=on or offload=off"),
            ("tap=a,vhost=yes", "vhost=on, vhost=off or vhost=auto"),
            ("tap=a,vhost=", "vhost=on, vhost=off or vhost=auto"),
            ("tap=a,vhost=ON", "vhost=on, vhost=off or vhost=auto"),
            ("tap=a,vhost=on ", "vhost=on, vhost=off or vhost=auto"),
            ("tap=a,vhost=on,vhost=off", "given twice"),
            ("tap=a,vhostnet=on", "unknown option"),
            ("tap=a,", "empty option"),
            ("tap", "not key=value"),
        ]
        for (text, expect) in bad {
            do {
                _ = try NetOptions.parse(text)
                XCTFail("accepted \(text.debugDescription)")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .usage, text)
                XCTAssertTrue(e.message.contains(expect), "\(text.debugDescription): \(e.message)")
                XCTAssertFalse(e.message.contains("\n"), text)
                XCTAssertTrue(e.message.hasPrefix("--net: "), e.message)
            } catch {
                XCTFail("\(error)")
            }
        }
    }

    /// Runs `body` on a thread of its own inside a new, private network namespace (root
    /// only; the rest of the test process keeps the machine's namespace). nil: skipped.
    func inPrivateNetns(_ body: @escaping @Sendable () throws -> Void) throws {
        guard getuid() == 0 else { throw XCTSkip("needs root for a private network namespace") }
        guard access("/dev/net/tun", R_OK | W_OK) == 0 else { throw XCTSkip("no /dev/net/tun") }
        // @unchecked Sendable: written by the one thread below, read after joining it.
        final class Box: @unchecked Sendable { var error: Error?; var skipped = false }
        let box = Box()
        let t = try spawnThread(name: "netns-test") {
            guard swiftlet_test_unshare(0x4000_0000 /* CLONE_NEWNET */) == 0 else { box.skipped = true; return }
            do { try body() } catch { box.error = error }
        }
        t.join()
        if box.skipped { throw XCTSkip("unshare(CLONE_NEWNET) refused") }
        if let e = box.error { throw e }
    }

    /// The machine's device list: disks, nets, rng, named by kind and position, opened in
    /// that order; a backend that fails leaves none of the earlier ones open.
    func testDeviceSpecsOpenInOrderAndALaterFailureClosesTheTAPs() throws {
        try inPrivateNetns {
            var image = Array("/tmp/swiftlet-spec-XXXXXX".utf8CString)
            let fd = mkstemp(&image)
            ftruncate(fd, 1 << 20)
            close(fd)
            let path = String(nulTerminated: image)
            defer { unlink(path) }
            var config = MachineConfig(kernelPath: "/k")
            config.disks = [DiskOptions(path: path, readOnly: true), DiskOptions(path: path, readOnly: true)]
            config.nets = [NetOptions(tap: "swspec0"), NetOptions(tap: "swspec1", queues: 2)]
            config.rng = true
            let specs = deviceSpecs(config)
            XCTAssertEqual(specs.map(\.kind), ["blk", "blk", "net", "net", "rng"])
            var devices: [OpenedDevice]? = try openDevices(specs)
            XCTAssertEqual(devices?.map(\.name), ["blk0", "blk1", "net0", "net1", "rng0"])
            XCTAssertEqual(devices?.map(\.ordinal), [0, 1, 0, 1, 0])
            XCTAssertNotEqual(if_nametoindex("swspec1"), 0)
            for d in devices ?? [] { d.backend.close() }
            devices = nil
            XCTAssertEqual(if_nametoindex("swspec0"), 0)

            let failing: [any VirtioDeviceSpec] = [NetDeviceSpec(options: NetOptions(tap: "swspec2")),
                                                   DiskDeviceSpec(options: DiskOptions(path: path + "-missing"))]
            XCTAssertThrowsError(try openDevices(failing)) { e in
                XCTAssertEqual((e as? SwiftletError)?.status, .missingInput)
            }
            XCTAssertEqual(if_nametoindex("swspec2"), 0, "the TAP opened before the failing disk is gone")
        }
    }

    func testOpenTapCreatesAMultiQueueTapThatGoesAwayOnClose() throws {
        try inPrivateNetns {
            XCTAssertEqual(if_nametoindex("swtest0"), 0)
            let t = try openTap(NetOptions(tap: "swtest0", queues: 3))
            XCTAssertTrue(t.created)
            XCTAssertEqual(t.fds.count, 3)
            XCTAssertNotEqual(if_nametoindex("swtest0"), 0)
            for fd in t.fds { XCTAssertNotEqual(fcntl(fd, F_GETFL) & O_NONBLOCK, 0) }
            // Nothing to read yet: non-blocking.
            var b = [UInt8](repeating: 0, count: 100)
            XCTAssertEqual(read(t.fds[0], &b, b.count), -1)
            // The device's TAP control works on a real TAP.
            let c = TapQueueControl(fds: t.fds)
            XCTAssertNoThrow(try c.setOffload(TunOffload.csum | TunOffload.tso4))
            XCTAssertNoThrow(try c.setQueueEnabled(pair: 2, false))
            XCTAssertNoThrow(try c.setQueueEnabled(pair: 2, false))
            XCTAssertNoThrow(try c.setQueueEnabled(pair: 2, true))
            // Given twice: refused before touching the TAP.
            XCTAssertThrowsError(try openDevices([NetDeviceSpec(options: NetOptions(tap: "swtest1")),
                                                  NetDeviceSpec(options: NetOptions(tap: "swtest1"))]))
            XCTAssertEqual(if_nametoindex("swtest1"), 0)
            t.close()
            XCTAssertEqual(if_nametoindex("swtest0"), 0)  // created by us: gone with its descriptors
        }
    }

    func testOpenTapAttachesAnExistingPersistentTapAndLeavesIt() throws {
        try inPrivateNetns {
            // A persistent multi-queue TAP, as `ip tuntap add ... multi_queue` makes.
            let made = try openTap(NetOptions(tap: "swpers0", queues: 1))
            XCTAssertEqual(clinuxPersist(made.fds[0], true), 0)
            made.close()
            XCTAssertNotEqual(if_nametoindex("swpers0"), 0)
            let t = try openTap(NetOptions(tap: "swpers0", queues: 2))
            XCTAssertFalse(t.created)
            t.close()
            XCTAssertNotEqual(if_nametoindex("swpers0"), 0)  // left as it was
            let single = try openTap(NetOptions(tap: "swpers0", queues: 1))
            defer { single.close() }
            // Clean up the persistent TAP.
            XCTAssertEqual(clinuxPersist(single.fds[0], false), 0)
        }
    }

    func testOpenTapTakesAPersistentSingleQueueTapWithOneQueueOnly() throws {
        try inPrivateNetns {
            // What `ip tuntap add dev swsq1 mode tap` makes.
            let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
            XCTAssertGreaterThanOrEqual(fd, 0)
            var ifr = [UInt8](repeating: 0, count: 40)
            ifr.replaceSubrange(0..<5, with: Array("swsq1".utf8))
            let flags = Int16(IFF_TAP | IFF_NO_PI)
            withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
            XCTAssertEqual(ifr.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_TUNSETIFF(), $0.baseAddress) }, 0)
            XCTAssertEqual(clinuxPersist(fd, true), 0)
            close(fd)
            do {
                _ = try openTap(NetOptions(tap: "swsq1", queues: 2))
                XCTFail("two queues on a single-queue TAP")
            } catch let e as SwiftletError {
                XCTAssertTrue(e.message.contains("without multi_queue"), e.message)
            }
            let t = try openTap(NetOptions(tap: "swsq1"))
            XCTAssertFalse(t.created)
            XCTAssertEqual(clinuxPersist(t.fds[0], false), 0)
            t.close()
            XCTAssertEqual(if_nametoindex("swsq1"), 0)
        }
    }

    func testOpenTapRefusesATapInUseWithoutMultiQueue() throws {
        try inPrivateNetns {
            // A single-queue TAP held open by someone else.
            let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
            XCTAssertGreaterThanOrEqual(fd, 0)
            defer { close(fd) }
            var ifr = [UInt8](repeating: 0, count: 40)
            ifr.replaceSubrange(0..<6, with: Array("swsq00".utf8))
            let flags = Int16(IFF_TAP | IFF_NO_PI)
            withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
            XCTAssertEqual(ifr.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_TUNSETIFF(), $0.baseAddress) }, 0)
            do {
                _ = try openTap(NetOptions(tap: "swsq00"))
                XCTFail("attached to a single-queue TAP")
            } catch let e as SwiftletError {
                XCTAssertEqual(e.status, .hostUnavailable)
                XCTAssertFalse(e.message.contains("\n"))
                XCTAssertTrue(e.message.contains("swsq00"), e.message)
            }
        }
    }
}

/// unshare(2): not in Glibc's Swift module.
@_silgen_name("unshare") func swiftlet_test_unshare(_ flags: Int32) -> Int32
func clinuxPersist(_ fd: Int32, _ on: Bool) -> Int32 { clinux_ioctl_int(fd, clinux_TUNSETPERSIST(), on ? 1 : 0) }
