import XCTest
import Glibc
import OS
import CLinux
import GuestMemory
import Virtio
@testable import Devices

@_silgen_name("unshare") private func netTestUnshare(_ flags: Int32) -> Int32

/// The device over a real TAP in a private network namespace (root only): the guest's
/// ARP request and ping reach the kernel, whose answers come back through rx.
final class NetTapTests: XCTestCase {
    static let guestMAC: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]
    static let hostIP: [UInt8] = [10, 9, 0, 1]
    static let guestIP: [UInt8] = [10, 9, 0, 2]

    func inPrivateNetns(_ body: @escaping @Sendable () throws -> Void) throws {
        guard getuid() == 0 else { throw XCTSkip("needs root for a private network namespace") }
        guard access("/dev/net/tun", R_OK | W_OK) == 0 else { throw XCTSkip("no /dev/net/tun") }
        // @unchecked Sendable: written by the one thread below, read after joining it.
        final class Box: @unchecked Sendable { var error: Error?; var skipped = false }
        let box = Box()
        var tid = pthread_t()
        let ctx = Unmanaged.passRetained(BodyBox {
            guard netTestUnshare(0x4000_0000 /* CLONE_NEWNET */) == 0 else { box.skipped = true; return }
            do { try body() } catch { box.error = error }
        }).toOpaque()
        XCTAssertEqual(pthread_create(&tid, nil, { p in
            let b = Unmanaged<BodyBox>.fromOpaque(p!).takeRetainedValue()
            b.run()
            return nil
        }, ctx), 0)
        pthread_join(tid, nil)
        if box.skipped { throw XCTSkip("unshare(CLONE_NEWNET) refused") }
        if let e = box.error { throw e }
    }

    final class BodyBox { let run: () -> Void; init(_ r: @escaping () -> Void) { run = r } }

    /// A TAP "swe2e0" with 10.9.0.1/24, up; returns its queue descriptor.
    static func makeTap() -> Int32 {
        // No IPv6 on the new TAP (this namespace's default): no MLD or router
        // solicitations taking the rx buffers the tests count.
        let v6 = open("/proc/sys/net/ipv6/conf/default/disable_ipv6", O_WRONLY | O_CLOEXEC)
        if v6 >= 0 { _ = write(v6, "1", 1); close(v6) }
        let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        precondition(fd >= 0)
        var ifr = [UInt8](repeating: 0, count: 40)
        ifr.replaceSubrange(0..<6, with: Array("swe2e0".utf8))
        let flags = Int16(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)
        withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
        precondition(ifr.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_TUNSETIFF(), $0.baseAddress) } == 0)
        var hdr: Int32 = 12
        precondition(clinux_ioctl_ptr(fd, clinux_TUNSETVNETHDRSZ(), &hdr) == 0)
        let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        precondition(s >= 0)
        defer { close(s) }
        func sockaddrIn(_ ip: [UInt8]) -> [UInt8] { [UInt8(AF_INET), 0, 0, 0] + ip + [UInt8](repeating: 0, count: 8) }
        var a = ifr
        a.replaceSubrange(16..<32, with: sockaddrIn(hostIP))
        precondition(a.withUnsafeMutableBytes { clinux_ioctl_ptr(s, UInt(SIOCSIFADDR), $0.baseAddress) } == 0)
        a.replaceSubrange(16..<32, with: sockaddrIn([255, 255, 255, 0]))
        precondition(a.withUnsafeMutableBytes { clinux_ioctl_ptr(s, UInt(SIOCSIFNETMASK), $0.baseAddress) } == 0)
        var f = ifr
        f.replaceSubrange(16..<40, with: [UInt8](repeating: 0, count: 24))
        withUnsafeBytes(of: Int16(1 /* IFF_UP */).littleEndian) { f.replaceSubrange(16..<18, with: $0) }
        precondition(f.withUnsafeMutableBytes { clinux_ioctl_ptr(s, UInt(SIOCSIFFLAGS), $0.baseAddress) } == 0)
        return fd
    }

    static func checksum(_ b: [UInt8]) -> UInt16 {
        var sum: UInt32 = 0
        var i = 0
        while i + 1 < b.count { sum += UInt32(b[i]) << 8 | UInt32(b[i + 1]); i += 2 }
        if i < b.count { sum += UInt32(b[i]) << 8 }
        while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
        return ~UInt16(sum)
    }

    /// Waits up to 3 s for a frame of `etherType` (and `match`) on rx; returns it without its vnet header.
    static func awaitFrame(_ h: NetHarness, etherType: UInt16, match: ([UInt8]) -> Bool) -> [UInt8]? {
        let deadline = monotonicNanos() + 3_000_000_000
        var seen = Int(h.rx().seenUsed)
        // With guest GSO a read waits for buffers worth a 64 KiB frame: keep 34 out.
        func topUp() {
            while h.rx().availIdx &- h.rx().usedIdx < 34 { h.addRxBuffer(2048) }
            h.rxHandler.kicked()
        }
        topUp()
        while monotonicNanos() < deadline {
            var p = pollfd(fd: h.rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 100)
            if p.revents != 0 { h.rxHandler.completionsReady() }
            while seen != Int(h.rx().usedIdx) {
                let e = h.rx().usedElem(seen)
                seen += 1
                // Descriptor e.id points at the buffer; read it from the table.
                let addr: UInt64 = try! h.mem.load(at: h.rx().desc + 16 * UInt64(e.id))
                let f = h.bytes(addr, Int(e.len))
                guard f.count >= 12 + 14 else { continue }
                let eth = Array(f[12...])
                if UInt16(eth[12]) << 8 | UInt16(eth[13]) == etherType && match(eth) { return eth }
                topUp()
            }
        }
        return nil
    }

    static func arpRequest() -> [UInt8] {
        let mac = guestMAC
        var arp: [UInt8] = [UInt8](repeating: 0xFF, count: 6) + mac + [0x08, 0x06]
        arp += [0, 1, 8, 0, 6, 4, 0, 1] + mac + guestIP + [0, 0, 0, 0, 0, 0] + hostIP
        arp += [UInt8](repeating: 0, count: 60 - arp.count)
        return arp
    }

    static func echoRequest(to hostMAC: [UInt8], payload: [UInt8], seq: UInt8) -> [UInt8] {
        var icmp: [UInt8] = [8, 0, 0, 0, 0x12, 0x34, 0, seq] + payload
        let ic = checksum(icmp)
        icmp[2] = UInt8(ic >> 8); icmp[3] = UInt8(ic & 0xFF)
        let total = 20 + icmp.count
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, seq, 0x40, 0, 64, 1, 0, 0] + guestIP + hostIP
        let c = checksum(ip)
        ip[10] = UInt8(c >> 8); ip[11] = UInt8(c & 0xFF)
        return hostMAC + guestMAC + [0x08, 0x00] + ip + icmp
    }

    /// Sends `frame` out of TAP "swe2e0" through an AF_PACKET socket: it arrives on the
    /// TAP's queue descriptor, i.e. on the device's rx side.
    static func inject(_ frame: [UInt8]) {
        let s = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), 0)
        precondition(s >= 0)
        defer { close(s) }
        var sll = [UInt8](repeating: 0, count: 20)  // struct sockaddr_ll
        withUnsafeBytes(of: UInt16(AF_PACKET).littleEndian) { sll.replaceSubrange(0..<2, with: $0) }
        withUnsafeBytes(of: Int32(if_nametoindex("swe2e0")).littleEndian) { sll.replaceSubrange(4..<8, with: $0) }
        sll[11] = 6
        let n = sll.withUnsafeBytes { a in
            frame.withUnsafeBytes { sendto(s, $0.baseAddress, frame.count, 0, a.baseAddress!.assumingMemoryBound(to: sockaddr.self), 20) }
        }
        precondition(n == frame.count, "sendto: \(String(cString: strerror(errno)))")
    }

    static let testHeader = guestMAC + [2, 0, 0, 0, 0, 9] + [0x88, 0xB5]  // local experimental ethertype

    /// An rx chain of more buffers than one readv takes (a 12-byte buffer, then an
    /// indirect table of 1024) marks the device NEEDS_RESET at once: no read is tried, so
    /// a frame waiting on the TAP cannot make the thread fail the same read over and over.
    /// After a driver reset the frame is received.
    func testRxChainOfMoreBuffersThanOneReadTakesNeedsReset() throws {
        let all = VirtioNet(queueFDs: [-1], mac: [2, 0, 0, 0, 0, 1]).deviceFeatures
        for features in [all & ~VirtioNetFeature.mrgRxbuf, all] {
            try inPrivateNetns {
                let fd = NetTapTests.makeTap()
                defer { close(fd) }
                let h = try NetHarness(features: features, tapFDs: [fd])
                h.offerIndirect(on: h.rx(), first: 12, count: 1024, each: 4, writable: true)
                h.rxHandler.kicked()
                NetTapTests.inject(NetTapTests.testHeader + Array("queued-frame".utf8))
                let wakeups = h.serveRx(milliseconds: 300)
                XCTAssertTrue(h.sink.needsReset)
                XCTAssertEqual(wakeups, 0, "the rx thread was woken for a queue that needs reset")
                XCTAssertEqual(h.device.stats[0].drops, 0)
                XCTAssertEqual(h.rx().usedIdx, 0)
                try h.resetAndRestart()
                let f = NetTapTests.awaitFrame(h, etherType: 0x88B5, match: { _ in true })
                XCTAssertEqual(f.map { Array($0[14..<26]) }, Array("queued-frame".utf8))
                XCTAssertFalse(h.sink.needsReset)
            }
        }
    }

    /// With MRG_RXBUF, chains that fit one readv each but not together: the frame is read
    /// into the chains that fit.
    func testMergeableChainsOfMoreBuffersTogetherThanOneReadTakes() throws {
        try inPrivateNetns {
            let fd = NetTapTests.makeTap()
            defer { close(fd) }
            let h = try NetHarness(features: NetDeviceTests.noGuestGSO, tapFDs: [fd])
            // 1000 bytes each, less than an MTU-sized frame: a read would want both.
            let bufs = h.offerIndirect(on: h.rx(), first: nil, count: 1000, each: 1, writable: true)
            h.offerIndirect(on: h.rx(), first: nil, count: 1000, each: 1, writable: true)
            h.rxHandler.kicked()
            let sent = NetTapTests.testHeader + Array("two-chains".utf8)
            NetTapTests.inject(sent)
            let wakeups = h.serveRx(milliseconds: 2000) { h.rx().usedIdx > 0 }
            XCTAssertLessThanOrEqual(wakeups, 2)
            XCTAssertEqual(h.rx().usedIdx, 1)
            XCTAssertEqual(h.rx().usedElem(0).len, UInt32(12 + sent.count))
            XCTAssertEqual(bufs[10...11].flatMap { h.bytes($0, 1) }, [1, 0], "num_buffers")
            XCTAssertEqual(bufs[12..<(12 + sent.count)].flatMap { h.bytes($0, 1) }, sent)
            XCTAssertEqual(h.device.stats[0].drops, 0)
            XCTAssertFalse(h.sink.needsReset)
        }
    }

    /// Without MRG_RXBUF a frame larger than the rx buffer reaches the guest cut to the
    /// buffer (tun truncates; the guest's stack drops it) and the queue goes on.
    func testFrameTooLargeForTheBufferIsCutAndRxGoesOn() throws {
        try inPrivateNetns {
            let fd = NetTapTests.makeTap()
            defer { close(fd) }
            let all = VirtioNet(queueFDs: [-1], mac: [2, 0, 0, 0, 0, 1]).deviceFeatures
            let h = try NetHarness(features: all & ~VirtioNetFeature.mrgRxbuf, tapFDs: [fd])
            let buf = h.addRxBuffer(300)
            h.rxHandler.kicked()
            let header = NetTapTests.guestMAC + [2, 0, 0, 0, 0, 9] + [0x88, 0xB5]  // local experimental ethertype
            func wait(_ done: () -> Bool) {
                let deadline = monotonicNanos() + 3_000_000_000
                while !done() && monotonicNanos() < deadline {
                    var p = pollfd(fd: h.rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
                    _ = poll(&p, 1, 100)
                    if p.revents != 0 { h.rxHandler.completionsReady() }
                }
            }
            NetTapTests.inject(header + [UInt8](repeating: 0x5A, count: 1000))
            wait { h.rx().usedIdx > 0 }
            // Cut to the buffer (this kernel) or dropped (EFAULT: the buffer goes back
            // empty, counted): never more than the buffer.
            XCTAssertEqual(h.rx().usedIdx, 1)
            if h.device.stats[0].drops == 0 {
                XCTAssertEqual(h.rx().usedElem(0).len, 300)
                XCTAssertEqual(h.bytes(buf + 12, 14), header)
            } else {
                XCTAssertEqual(h.device.stats[0].drops, 1)
                XCTAssertEqual(h.rx().usedElem(0).len, 0)
            }
            let buf2 = h.addRxBuffer(300)
            h.rxHandler.kicked()
            NetTapTests.inject(header + Array("small-frame".utf8))
            wait { h.rx().usedIdx > 1 }
            XCTAssertEqual(h.rx().usedIdx, 2)
            XCTAssertEqual(h.rx().usedElem(1).len, 12 + 14 + 11)
            XCTAssertEqual(h.bytes(buf2 + 12, 14 + 11), header + Array("small-frame".utf8))
            XCTAssertFalse(h.sink.needsReset)
        }
    }

    func testArpAndPingThroughARealTap() throws {
        try inPrivateNetns {
            let fd = NetTapTests.makeTap()
            defer { close(fd) }
            let h = try NetHarness(tapFDs: [fd])
            let mac = NetTapTests.guestMAC
            // ARP: who has 10.9.0.1? tell 10.9.0.2
            var arp: [UInt8] = [UInt8](repeating: 0xFF, count: 6) + mac + [0x08, 0x06]
            arp += [0, 1, 8, 0, 6, 4, 0, 1] + mac + NetTapTests.guestIP + [0, 0, 0, 0, 0, 0] + NetTapTests.hostIP
            arp += [UInt8](repeating: 0, count: 60 - arp.count)
            h.send([UInt8](repeating: 0, count: 12) + arp, split: [12, arp.count])
            h.txHandler.kicked()
            XCTAssertEqual(h.device.stats[1].packets, 1)
            XCTAssertEqual(h.device.stats[1].drops, 0)
            guard let reply = NetTapTests.awaitFrame(h, etherType: 0x0806, match: { $0.count >= 42 && $0[21] == 2 }) else {
                XCTFail("no ARP reply from the TAP")
                return
            }
            let hostMAC = Array(reply[22..<28])
            XCTAssertEqual(Array(reply[28..<32]), NetTapTests.hostIP)
            XCTAssertEqual(Array(reply[0..<6]), mac)
            // ICMP echo request with full checksums.
            var icmp: [UInt8] = [8, 0, 0, 0, 0x12, 0x34, 0, 1] + Array("swiftlet-ping".utf8)
            let ic = NetTapTests.checksum(icmp)
            icmp[2] = UInt8(ic >> 8); icmp[3] = UInt8(ic & 0xFF)
            let total = 20 + icmp.count
            var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 1, 0x40, 0, 64, 1, 0, 0]
                + NetTapTests.guestIP + NetTapTests.hostIP
            let c = NetTapTests.checksum(ip)
            ip[10] = UInt8(c >> 8); ip[11] = UInt8(c & 0xFF)
            let frame = hostMAC + mac + [0x08, 0x00] + ip + icmp
            h.send([UInt8](repeating: 0, count: 12) + frame, split: [12, 14, frame.count - 14])
            h.txHandler.kicked()
            XCTAssertEqual(h.device.stats[1].drops, 0)
            let echo = NetTapTests.awaitFrame(h, etherType: 0x0800, match: { $0.count >= 34 && $0[23] == 1 && $0[34] == 0 })
            XCTAssertNotNil(echo, "no ICMP echo reply")
            if let echo { XCTAssertEqual(Array(echo[42...].prefix(13)), Array("swiftlet-ping".utf8)) }
            XCTAssertGreaterThanOrEqual(h.device.stats[0].packets, 2)
            XCTAssertFalse(h.sink.needsReset)
        }
    }

    /// Eight echo requests queued together leave through the real TAP in one io_uring
    /// submission (the batching path, where the kernel allows io_uring) and every one is
    /// answered.
    func testBatchOfPingsThroughARealTap() throws {
        try inPrivateNetns {
            let fd = NetTapTests.makeTap()
            defer { close(fd) }
            let h = try NetHarness(tapFDs: [fd])
            h.send([UInt8](repeating: 0, count: 12) + NetTapTests.arpRequest())
            h.txHandler.kicked()
            guard let reply = NetTapTests.awaitFrame(h, etherType: 0x0806, match: { $0.count >= 42 && $0[21] == 2 }) else {
                XCTFail("no ARP reply from the TAP")
                return
            }
            let hostMAC = Array(reply[22..<28])
            let before = IOURing.enterCalls.load(ordering: .relaxed)
            for seq in 1...8 {
                h.send([UInt8](repeating: 0, count: 12)
                       + NetTapTests.echoRequest(to: hostMAC, payload: Array("batch-\(seq)".utf8), seq: UInt8(seq)))
            }
            h.txHandler.kicked()
            if h.txHandler.batches { XCTAssertEqual(IOURing.enterCalls.load(ordering: .relaxed) - before, 1) }
            XCTAssertEqual(h.device.stats[1].packets, 9)
            XCTAssertEqual(h.device.stats[1].drops, 0)
            for seq in 1...8 {
                let echo = NetTapTests.awaitFrame(h, etherType: 0x0800, match: {
                    $0.count >= 42 && $0[23] == 1 && $0[34] == 0 && $0[41] == UInt8(seq)
                })
                XCTAssertNotNil(echo, "no ICMP echo reply to request \(seq)")
            }
            XCTAssertFalse(h.sink.needsReset)
        }
    }
}
