import XCTest
import Glibc
import CLinux
import GuestMemory
@testable import Vhost

final class VhostTests: XCTestCase {
    /// The request numbers the shim takes from <linux/vhost.h>, against the same numbers
    /// worked out from _IO/_IOR/_IOW/_IOWR (type 0xAF) by hand.
    func testRequestNumbers() {
        func io(_ dir: UInt, _ nr: UInt, _ size: UInt) -> UInt { dir << 30 | size << 16 | 0xAF << 8 | nr }
        let (none, write, read) = (UInt(0), UInt(1), UInt(2))
        XCTAssertEqual(clinux_VHOST_SET_OWNER(), io(none, 0x01, 0))
        XCTAssertEqual(clinux_VHOST_GET_FEATURES(), io(read, 0x00, 8))
        XCTAssertEqual(clinux_VHOST_SET_FEATURES(), io(write, 0x00, 8))
        XCTAssertEqual(clinux_VHOST_SET_MEM_TABLE(), io(write, 0x03, 8))
        XCTAssertEqual(clinux_VHOST_SET_VRING_NUM(), io(write, 0x10, 8))
        XCTAssertEqual(clinux_VHOST_SET_VRING_ADDR(), io(write, 0x11, 40))
        XCTAssertEqual(clinux_VHOST_SET_VRING_BASE(), io(write, 0x12, 8))
        XCTAssertEqual(clinux_VHOST_GET_VRING_BASE(), io(read | write, 0x12, 8))
        XCTAssertEqual(clinux_VHOST_SET_VRING_KICK(), io(write, 0x20, 8))
        XCTAssertEqual(clinux_VHOST_SET_VRING_CALL(), io(write, 0x21, 8))
        XCTAssertEqual(clinux_VHOST_SET_VRING_ERR(), io(write, 0x22, 8))
        XCTAssertEqual(clinux_VHOST_NET_SET_BACKEND(), io(write, 0x30, 8))
        XCTAssertEqual(clinux_VHOST_VSOCK_SET_GUEST_CID(), io(write, 0x60, 8))
        XCTAssertEqual(clinux_VHOST_VSOCK_SET_RUNNING(), io(write, 0x61, 4))
        XCTAssertEqual(clinux_vhost_memory_size(), 8)
        XCTAssertEqual(clinux_vhost_memory_region_size(), 32)
        XCTAssertEqual(VhostFeature.logAll, 1 << 26)
    }

    func testMemoryRegionsAreTheGuestRAMRegions() throws {
        let mem = try GuestMemory(layout: [(base: 0, size: 0x10_0000), (base: 0x1_0000_0000, size: 0x20_0000)])
        XCTAssertEqual(VhostMemoryRegion.of(mem), [
            VhostMemoryRegion(guestAddress: 0, size: 0x10_0000, hostAddress: UInt64(UInt(bitPattern: mem.regions[0].host))),
            VhostMemoryRegion(guestAddress: 0x1_0000_0000, size: 0x20_0000, hostAddress: UInt64(UInt(bitPattern: mem.regions[1].host))),
        ])
    }

    /// Opening: the errno of open(2) when there is no /dev/vhost-net; on a host that has
    /// one, an owned instance that answers GET_FEATURES with VERSION_1.
    func testOpen() throws {
        if access(VhostNet.path, F_OK) != 0 {
            XCTAssertThrowsError(try VhostNet()) { XCTAssertEqual($0 as? VhostNet.OpenError, .open(errno: ENOENT)) }
            return
        }
        guard access(VhostNet.path, R_OK | W_OK) == 0 else { throw XCTSkip("no permission for /dev/vhost-net") }
        let v = try VhostNet()
        XCTAssertNotEqual(try v.features() & (1 << 32), 0)
    }

    /// The same for /dev/vhost-vsock; on a host that has it, the instance holds its CID:
    /// a second instance with the same CID gets EADDRINUSE, another CID opens.
    func testOpenVsock() throws {
        if access(VhostVsock.path, F_OK) != 0 {
            XCTAssertThrowsError(try VhostVsock(cid: 3)) { XCTAssertEqual($0 as? VhostOpenError, .open(errno: ENOENT)) }
            return
        }
        guard access(VhostVsock.path, R_OK | W_OK) == 0 else { throw XCTSkip("no permission for /dev/vhost-vsock") }
        let cid = UInt64(0x5A00_0000) + UInt64(getpid() & 0xFFFF)
        let v = try VhostVsock(cid: cid)
        XCTAssertNotEqual(try v.features() & (1 << 32), 0)
        XCTAssertThrowsError(try VhostVsock(cid: cid)) {
            XCTAssertEqual($0 as? VhostOpenError, .setup(VhostError(call: "VHOST_VSOCK_SET_GUEST_CID", errno: EADDRINUSE)))
        }
        _ = try VhostVsock(cid: cid + 1)
    }
}
