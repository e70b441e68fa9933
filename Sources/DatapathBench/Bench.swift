import Glibc
import CLinux
import GuestMemory
import OS
import Virtio
import Devices
import Seccomp
import Synchronization

// MARK: namespace and TAP

let tapName = "dpbench0"
let maxPairs = 2
let ringSize = VirtioNetLimits.queueSize
let rxBufferSize = 4096
/// The GSO frame: 45 TCP segments of 1448 bytes behind 54 bytes of headers, as Linux's
/// TSO frames are (the stack hands a device only frames shorter than its gso_max_size,
/// 65536).
let gsoFrameSize = 54 + 45 * 1448
let guestMAC: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
let peerMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01]

/// One line on stderr, then exit with `status`.
func fail(_ status: Int32, _ s: String) -> Never {
    writeStderr("swiftlet-datapath-bench: \(s)\n")
    exit(status)
}

@_silgen_name("unshare") func c_unshare(_ flags: Int32) -> Int32

/// What is made once, in the namespace, and then only read.
final class World: @unchecked Sendable {
    let tapFDs: [Int32]
    let ifindex: Int32
    let tapControl: TapQueueControl
    let mem: GuestMemory
    let device: VirtioNet
    let millis: Int
    let seccompOn: Bool
    var flowPorts: [UInt16] = []
    init(tapFDs: [Int32], ifindex: Int32, mem: GuestMemory, millis: Int, seccompOn: Bool) {
        self.tapFDs = tapFDs
        self.ifindex = ifindex
        tapControl = TapQueueControl(fds: tapFDs)
        self.mem = mem
        device = VirtioNet(queueFDs: tapFDs, mac: guestMAC, mtu: 1500, control: UDPGSOTapControl(tapControl), name: "dp")
        self.millis = millis
        self.seccompOn = seccompOn
    }
}

/// TUN_F_USO4 | TUN_F_USO6: the TAP takes UDP GSO frames whole (the rx source's).
let usoOffloads: UInt32 = 0x20 | 0x40

/// The device's TAP control, adding UDP GSO to the offloads it sets (see rx sources).
final class UDPGSOTapControl: NetTapControl {
    let inner: TapQueueControl
    init(_ inner: TapQueueControl) { self.inner = inner }
    func setOffload(_ flags: UInt32) throws { try inner.setOffload(flags == 0 ? 0 : flags | usoOffloads) }
    func setQueueEnabled(pair: Int, _ enabled: Bool) throws { try inner.setQueueEnabled(pair: pair, enabled) }
}

/// Set once by main before any other thread starts; read-only afterwards.
nonisolated(unsafe) var world: World!
var tapFDs: [Int32] { world.tapFDs }
var ifindex: Int32 { world.ifindex }
var tapControl: TapQueueControl { world.tapControl }
var mem: GuestMemory { world.mem }
var device: VirtioNet { world.device }
var millis: Int { world.millis }
var seccompOn: Bool { world.seccompOn }
var flowPorts: [UInt16] { world.flowPorts }
/// What a Linux guest accepts of them.
var features: UInt64 { world.device.deviceFeatures }

/// struct ifreq with `name`, zeroed otherwise.
func ifreqBytes(_ name: String) -> [UInt8] {
    var r = [UInt8](repeating: 0, count: 40)
    r.replaceSubrange(0..<name.utf8.count, with: Array(name.utf8))
    return r
}

/// Enters a private network namespace and makes the TAP; exits with one line if it cannot.
func makeWorld(millis: Int, seccompOn: Bool) throws -> World {

    if c_unshare(0x4000_0000 /* CLONE_NEWNET */) != 0 {
        let e = errno
        fail(e == EPERM || e == EACCES ? 77 : 1,
             "cannot make a private network namespace (unshare: \(errnoText(e))): run as root or with CAP_SYS_ADMIN and CAP_NET_ADMIN")
    }
    // No IPv6 on the TAP: its router solicitations and MLD reports would be frames too.
    do {
        let fd = open("/proc/sys/net/ipv6/conf/default/disable_ipv6", O_WRONLY)
        if fd >= 0 { _ = write(fd, "1", 1); close(fd) }
    }


    var tapFDs: [Int32] = []
    for q in 0..<maxPairs {
        let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            fail(e == EPERM || e == EACCES ? 77 : 1, "cannot open /dev/net/tun: \(errnoText(e)): run as root, or load the tun module")
        }
        var ifr = ifreqBytes(tapName)
        let flags = Int16(truncatingIfNeeded: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)
        withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
        if ifr.withUnsafeMutableBytes({ clinux_ioctl_ptr(fd, clinux_TUNSETIFF(), $0.baseAddress) }) != 0 {
            let e = errno
            fail(e == EPERM || e == EACCES ? 77 : 1, "cannot create TAP \(tapName) queue \(q): \(errnoText(e)): run as root or with CAP_NET_ADMIN")
        }
        var hdr = Int32(VirtioNetHeader.size)
        if clinux_ioctl_ptr(fd, clinux_TUNSETVNETHDRSZ(), &hdr) != 0 { fail(1, "TUNSETVNETHDRSZ: \(errnoText(errno))") }
        tapFDs.append(fd)
    }
    let ifindex = Int32(if_nametoindex(tapName))
    do {
        let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var ifr = ifreqBytes(tapName)
        guard s >= 0, ifr.withUnsafeMutableBytes({ clinux_ioctl_ptr(s, 0x8913 /* SIOCGIFFLAGS */, $0.baseAddress) }) == 0 else {
            fail(1, "cannot read \(tapName)'s flags: \(errnoText(errno))")
        }
        ifr[16] |= 1  // IFF_UP
        guard ifr.withUnsafeMutableBytes({ clinux_ioctl_ptr(s, 0x8914 /* SIOCSIFFLAGS */, $0.baseAddress) }) == 0 else {
            fail(1, "cannot bring \(tapName) up: \(errnoText(errno))")
        }
        close(s)
    }

    return World(tapFDs: tapFDs, ifindex: ifindex, mem: try GuestMemory(layout: [(base: 0, size: 16 << 20)]),
                 millis: millis, seccompOn: seccompOn)
}

/// The TAP interface's packet counters (this namespace's /proc/self/net/dev):
/// rx = frames written to the TAP, tx = frames sent out through it.
func tapCounters() -> (rx: UInt64, tx: UInt64, rxDrop: UInt64, txDrop: UInt64) {
    let fd = open("/proc/self/net/dev", O_RDONLY)
    guard fd >= 0 else { return (0, 0, 0, 0) }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 8192)
    let n = read(fd, &buf, buf.count)
    guard n > 0 else { return (0, 0, 0, 0) }
    for line in String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n") {
        let parts = line.split(separator: ":", maxSplits: 1)
        guard parts.count == 2, parts[0].trimmingSpaces == tapName else { continue }
        let v = parts[1].split(separator: " ").compactMap { UInt64($0) }
        if v.count >= 12 { return (v[1], v[9], v[3], v[11]) }
    }
    return (0, 0, 0, 0)
}

extension Substring {
    var trimmingSpaces: String { String(split(separator: " ").first ?? "") }
}

// MARK: frames

func checksum(_ b: [UInt8], _ range: Range<Int>, initial: UInt32 = 0) -> UInt16 {
    var s = initial
    var i = range.lowerBound
    while i + 1 < range.upperBound { s += UInt32(b[i]) << 8 | UInt32(b[i + 1]); i += 2 }
    if i < range.upperBound { s += UInt32(b[i]) << 8 }
    while s > 0xFFFF { s = (s & 0xFFFF) + (s >> 16) }
    return UInt16(s)
}

/// An Ethernet + IPv4 + TCP frame of `size` bytes, the TCP checksum left for the
/// offload (pseudo-header sum in place, as a sender with checksum offload leaves it).
func makeFrame(size: Int, toGuest: Bool, port: UInt16) -> [UInt8] {
    var f = [UInt8](repeating: 0, count: size)
    f.replaceSubrange(0..<6, with: toGuest ? guestMAC : peerMAC)
    f.replaceSubrange(6..<12, with: toGuest ? peerMAC : guestMAC)
    f[12] = 0x08; f[13] = 0x00
    let ipLen = size - 14
    let src: [UInt8] = toGuest ? [10, 0, 0, 1] : [10, 0, 0, 2]
    let dst: [UInt8] = toGuest ? [10, 0, 0, 2] : [10, 0, 0, 1]
    f.replaceSubrange(14..<34, with: [0x45, 0, UInt8(ipLen >> 8), UInt8(ipLen & 0xFF), 0, 0, 0x40, 0, 64, 6, 0, 0] + src + dst)
    let ipsum = ~checksum(f, 14..<34)
    f[24] = UInt8(ipsum >> 8); f[25] = UInt8(ipsum & 0xFF)
    let (sp, dp): (UInt16, UInt16) = toGuest ? (5201, port) : (port, 5201)
    f.replaceSubrange(34..<54, with: [UInt8(sp >> 8), UInt8(sp & 0xFF), UInt8(dp >> 8), UInt8(dp & 0xFF),
                                      0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0])
    for i in 54..<size { f[i] = UInt8(truncatingIfNeeded: i &* 7) }
    let tcpLen = size - 34
    let pseudo = checksum(src + dst + [0, 6, UInt8(tcpLen >> 8), UInt8(tcpLen & 0xFF)], 0..<12)
    f[50] = UInt8(pseudo >> 8); f[51] = UInt8(pseudo & 0xFF)
    return f
}

/// virtio_net_hdr_v1 for `size`: NEEDS_CSUM, and TCPV4 GSO above the MTU.
func vnetHeader(size: Int) -> [UInt8] {
    let gso = size > 1514
    var h = [UInt8](repeating: 0, count: VirtioNetHeader.size)
    h[0] = 1                      // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[1] = gso ? 1 : 0            // VIRTIO_NET_HDR_GSO_TCPV4
    h[2] = 54                     // hdr_len
    if gso { h[4] = UInt8(1448 & 0xFF); h[5] = UInt8(1448 >> 8) }  // gso_size
    h[6] = 34                     // csum_start
    h[8] = 16                     // csum_offset
    return h
}

// MARK: guest memory and the driver's rings

// Layout: rings at 0x10000 * (1 + queue index); per pair p a 1 MiB area at
// 0x40_0000 + p * 0x40_0000: tx frame (header + frame) at +0, indirect table at
// +0x2_0000, rx buffers at +0x3_0000 (ringSize * 4096); control buffers at 0xE0_0000.
func pairArea(_ p: Int) -> UInt64 { 0x40_0000 + UInt64(p) * 0x40_0000 }

/// A split queue as the driver sees it: descriptors, available ring, used ring.
final class DriverRing: @unchecked Sendable {
    let size: UInt16
    let descAddr: UInt64, availAddr: UInt64, usedAddr: UInt64
    let desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer
    var availIdx: UInt16 = 0
    var seenUsed: UInt16 = 0

    init(base: UInt64, size: UInt16) throws {
        self.size = size
        try mem.zero(base, length: 0x10000)
        descAddr = base
        availAddr = base + 16 * UInt64(size)
        usedAddr = (availAddr + 6 + 2 * UInt64(size) + 0xFFF) & ~0xFFF
        desc = try mem.pointer(descAddr, length: 16 * UInt64(size))
        avail = try mem.pointer(availAddr, length: 6 + 2 * UInt64(size))
        used = try mem.pointer(usedAddr, length: 6 + 8 * UInt64(size))
    }

    func deviceQueue(features: UInt64) throws -> SplitQueue {
        try SplitQueue(memory: mem, layout: QueueLayout(size: UInt32(size), descTable: descAddr, availRing: availAddr, usedRing: usedAddr),
                       maxSize: size, eventIdx: features & VirtioFeature.eventIdx != 0,
                       indirectDescriptors: features & VirtioFeature.indirectDesc != 0)
    }

    func setDesc(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16 = 0) {
        let d = desc + 16 * i
        d.storeBytes(of: addr.littleEndian, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    func index(_ p: UnsafeMutableRawPointer) -> UnsafeMutablePointer<Atomic<UInt16>> {
        p.assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    /// Puts `head` in the next available slot (seen by the device at `publish`).
    func push(_ head: UInt16) {
        index(avail + 4 + 2 * Int(availIdx % size)).pointee.store(head.littleEndian, ordering: .relaxed)
        availIdx &+= 1
    }

    /// Publishes the available index; returns whether the device asked for a kick
    /// (EVENT_IDX: the new entries cross avail_event).
    func publish(from old: UInt16) -> Bool {
        index(avail + 2).pointee.store(availIdx.littleEndian, ordering: .releasing)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let event = UInt16(littleEndian: index(used + 4 + 8 * Int(size)).pointee.load(ordering: .relaxed))
        return SplitQueue.needEvent(event: event, new: availIdx, old: old)
    }

    var usedIdx: UInt16 { UInt16(littleEndian: index(used + 2).pointee.load(ordering: .acquiring)) }

    func usedElem(_ slot: UInt16) -> (id: UInt16, len: UInt32) {
        let e = used + 4 + 8 * Int(slot % size)
        return (UInt16(truncatingIfNeeded: UInt32(littleEndian: e.load(as: UInt32.self))),
                UInt32(littleEndian: e.load(fromByteOffset: 4, as: UInt32.self)))
    }

    /// Asks for an interrupt once the used index passes `v`; true when it already has
    /// (the driver must look again instead of sleeping).
    func interruptAfter(_ v: UInt16) -> Bool {
        index(avail + 4 + 2 * Int(size)).pointee.store(v.littleEndian, ordering: .relaxed)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return usedIdx != seenUsed
    }
}

// MARK: interrupts

/// Which pair's queue thread is running (pthread key value pair + 1; 0 elsewhere).
nonisolated(unsafe) var pairKey = pthread_key_t()

/// The transport's side of the device contract: a used-buffer interrupt wakes the
/// driver thread of the pair whose queue thread raised it (one eventfd write, as an
/// irqfd would be); counted.
final class CountingSink: VirtioInterruptSink, @unchecked Sendable {
    let irq: [EventFD]
    let ctrlIrq: EventFD
    let needsReset = Atomic<Bool>(false)
    init() throws {
        irq = try (0..<maxPairs).map { _ in try EventFD() }
        ctrlIrq = try EventFD()
    }
    func signalUsedBuffer() {
        let p = Int(bitPattern: pthread_getspecific(pairKey))
        try? (p > 0 && p <= irq.count ? irq[p - 1] : ctrlIrq).write(1)
    }
    func signalConfigChange() {}
    func markNeedsReset() { needsReset.store(true, ordering: .relaxed) }
}

// MARK: threads

/// What a measured thread tells the main thread: its kernel thread id (for /proc's io
/// counters) and how often its poll returned.
final class ThreadInfo: @unchecked Sendable {
    let tid = Atomic<Int32>(0)
    let polls = Atomic<UInt64>(0)
    let frames = Atomic<UInt64>(0)
    let bytes = Atomic<UInt64>(0)
    let errors = Atomic<UInt64>(0)
    var thread: OSThread?

    func recordTid() {
        var b = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/thread-self", &b, 63)
        if n > 0, let t = Int32(String(decoding: b[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self).split(separator: "/").last ?? "") {
            tid.store(t, ordering: .releasing)
        }
    }

    /// CPU time of the thread, ns.
    var cpuNanos: UInt64 {
        guard let t = thread else { return 0 }
        var clk = clockid_t()
        guard pthread_getcpuclockid(t.handle, &clk) == 0 else { return 0 }
        var ts = timespec()
        guard clock_gettime(clk, &ts) == 0 else { return 0 }
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// User-mode CPU time of the thread, ns (/proc's utime, in clock ticks).
    var userNanos: UInt64 {
        let fd = open("/proc/self/task/\(tid.load(ordering: .acquiring))/stat", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 1024)
        let n = read(fd, &buf, buf.count)
        guard n > 0, let close = buf[0..<n].lastIndex(of: UInt8(ascii: ")")) else { return 0 }
        let fields = String(decoding: buf[(close + 1)..<n], as: UTF8.self).split(separator: " ")
        guard fields.count > 11, let ticks = UInt64(fields[11]) else { return 0 }
        return ticks * 1_000_000_000 / UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
    }

    /// Read- plus write-class system calls of the thread (syscr + syscw).
    var ioCalls: UInt64 {
        let fd = open("/proc/self/task/\(tid.load(ordering: .acquiring))/io", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 512)
        let n = read(fd, &buf, buf.count)
        guard n > 0 else { return 0 }
        var total: UInt64 = 0
        for line in String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n") {
            if line.hasPrefix("syscr:") || line.hasPrefix("syscw:") {
                total += UInt64(line.split(separator: " ").last ?? "") ?? 0
            }
        }
        return total
    }
}

final class StopFlag: Sendable {
    let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .relaxed) }
    func set() { flag.store(true, ordering: .relaxed) }
}

func waitReadable(_ fd: Int32, millis: Int32) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, millis) > 0
}

// MARK: the cases

enum Direction: String { case tx, rx }

struct Case {
    let dir: Direction
    let size: Int
    let pairs: Int
}

struct Sample {
    var frames: UInt64 = 0, bytes: UInt64 = 0, wallNanos: UInt64 = 0, cpuNanos: UInt64 = 0, userNanos: UInt64 = 0, ioCalls: UInt64 = 0
    var polls: UInt64 = 0, kicks: UInt64 = 0, interrupts: UInt64 = 0, drops: UInt64 = 0, tapFrames: UInt64 = 0
}

/// The guest buffers of one pair's frames, as iovecs: the tx frame (header + frame split
/// as the tx chain splits it) and the rx buffers one read fills (enough 4096-byte
/// buffers for the largest frame, as the device gathers them).
func txSegments(size: Int) -> [(addr: UInt64, len: Int)] {
    if size <= 1514 { return [(0, VirtioNetHeader.size + size)] }
    var segs: [(addr: UInt64, len: Int)] = [(0, VirtioNetHeader.size + 1024)]
    var off = VirtioNetHeader.size + 1024
    for _ in 0..<15 { segs.append((UInt64(off), 4096)); off += 4096 }
    segs.append((UInt64(off), VirtioNetHeader.size + size - off))
    return segs
}

func writeTxFrame(pair p: Int, size: Int) throws {
    try mem.write(vnetHeader(size: size) + makeFrame(size: size, toGuest: false, port: UInt16(41000 + p)), at: pairArea(p))
}

func iovecs(_ segs: [(addr: UInt64, len: Int)], base: UInt64) throws -> [iovec] {
    try segs.map { iovec(iov_base: try mem.pointer(base + $0.addr, length: UInt64($0.len)), iov_len: $0.len) }
}

let rxChainsPerRead = (VirtioNetHeader.size + VirtioNetLimits.maxGSOFrame + rxBufferSize - 1) / rxBufferSize

func rxIovecs(pair p: Int) throws -> [iovec] {
    try (0..<rxChainsPerRead).map {
        iovec(iov_base: try mem.pointer(pairArea(p) + 0x3_0000 + UInt64($0 * rxBufferSize), length: UInt64(rxBufferSize)), iov_len: rxBufferSize)
    }
}

/// Reads whatever waits on the TAP queues (between cases).
func drainTap() {
    var b = [UInt8](repeating: 0, count: 70000)
    for fd in tapFDs { while read(fd, &b, b.count) > 0 {} }
}

// MARK: rx sources

// The frames to the guest come from UDP sockets in the namespace, sent to the guest's
// address (10.0.0.2, a permanent neighbour entry with the guest's MAC) through the TAP
// (10.0.0.1/24). A GSO-sized frame is one UDP_SEGMENT send: one GSO super-frame
// (gso_type UDP_L4) on the TAP. A GSO frame of TCPV4 cannot be made without a TCP peer:
// AF_PACKET's are marked untrusted (SKB_GSO_DODGY), and tun, lacking NETIF_F_GSO_ROBUST,
// has the kernel cut them into MTU-sized frames before they reach its queue. For the
// device both are the same work: one readv of a vnet header and 64 KiB.

/// The source's datagram payload for a frame of `size` bytes (Ethernet + IPv4 + UDP).
func payloadSize(_ size: Int) -> Int { size - 14 - 20 - 8 }
let udpSegment = 1472

/// A UDP socket bound to 10.0.0.1:`port`, connected to the guest's 10.0.0.2:5201, whose
/// send buffer holds about `sendBufferFrames` frames of `size` (then send blocks).
func udpSource(port: UInt16, size: Int, sendBufferFrames: Int) -> Int32 {
    let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    guard s >= 0 else { fail(1, "UDP socket: \(errnoText(errno))") }
    var one: Int32 = 1
    _ = setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, 4)
    if size > 1514 {
        var seg = Int32(udpSegment)
        guard setsockopt(s, Int32(IPPROTO_UDP), 103 /* UDP_SEGMENT */, &seg, 4) == 0 else { fail(1, "UDP_SEGMENT: \(errnoText(errno))") }
    }
    // The kernel doubles it; a frame's skb costs about its size plus 1 KiB.
    var sndbuf = Int32(sendBufferFrames * (size + 1024) / 2)
    guard setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, 4) == 0 else { fail(1, "SO_SNDBUFFORCE: \(errnoText(errno))") }
    var tv = timeval(tv_sec: 0, tv_usec: 50_000)
    _ = setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    func addr(_ ip: [UInt8], _ port: UInt16) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = UInt32(ip[0]) | UInt32(ip[1]) << 8 | UInt32(ip[2]) << 16 | UInt32(ip[3]) << 24
        return a
    }
    var local = addr([10, 0, 0, 1], port), remote = addr([10, 0, 0, 2], 5201)
    let len = socklen_t(MemoryLayout<sockaddr_in>.size)
    guard withUnsafePointer(to: &local, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) } }) == 0,
          withUnsafePointer(to: &remote, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, len) } }) == 0 else {
        fail(1, "UDP source on 10.0.0.1:\(port): \(errnoText(errno))")
    }
    return s
}

/// Gives the TAP 10.0.0.1/24 and a permanent neighbour 10.0.0.2 at the guest's MAC.
func addressTap() {
    let s = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    defer { close(s) }
    func sin(_ ip: [UInt8]) -> [UInt8] { [UInt8(AF_INET), 0, 0, 0] + ip + [UInt8](repeating: 0, count: 8) }
    var ifr = ifreqBytes(tapName)
    ifr.replaceSubrange(16..<32, with: sin([10, 0, 0, 1]))
    guard ifr.withUnsafeMutableBytes({ clinux_ioctl_ptr(s, 0x8916 /* SIOCSIFADDR */, $0.baseAddress) }) == 0 else {
        fail(1, "cannot give \(tapName) its address: \(errnoText(errno))")
    }
    ifr.replaceSubrange(16..<32, with: sin([255, 255, 255, 0]))
    guard ifr.withUnsafeMutableBytes({ clinux_ioctl_ptr(s, 0x891C /* SIOCSIFNETMASK */, $0.baseAddress) }) == 0 else {
        fail(1, "cannot set \(tapName)'s netmask: \(errnoText(errno))")
    }
    // struct arpreq: arp_pa, arp_ha (sockaddr each), arp_flags, arp_netmask, arp_dev[16].
    var arp = sin([10, 0, 0, 2]) + [1, 0] + guestMAC + [UInt8](repeating: 0, count: 8)
    arp += [0x06, 0, 0, 0]  // ATF_COM | ATF_PERM
    arp += [UInt8](repeating: 0, count: 16) + Array(tapName.utf8) + [UInt8](repeating: 0, count: 16 - tapName.utf8.count)
    guard arp.withUnsafeMutableBytes({ clinux_ioctl_ptr(s, 0x8955 /* SIOCSARP */, $0.baseAddress) }) == 0 else {
        fail(1, "cannot add the guest's neighbour entry: \(errnoText(errno))")
    }
}

/// Per queue pair, a source port whose flow the TAP steers to that pair's queue (both
/// queues attached).
func calibrateFlows() -> [UInt16] {
    addressTap()
    _ = try? tapControl.setQueueEnabled(pair: 1, true)
    drainTap()
    var found: [UInt16?] = Array(repeating: nil, count: maxPairs)
    var b = [UInt8](repeating: 0, count: 2000)
    let payload = [UInt8](repeating: 0x5A, count: 64)
    for port in UInt16(40000)..<40256 where found.contains(where: { $0 == nil }) {
        let s = udpSource(port: port, size: 1514, sendBufferFrames: 16)
        guard send(s, payload, payload.count, 0) == payload.count else { fail(1, "send to the guest's address: \(errnoText(errno))") }
        close(s)
        for (q, fd) in tapFDs.enumerated() where read(fd, &b, b.count) > 0 {
            if found[q] == nil { found[q] = port }
        }
    }
    drainTap()
    guard found.allSatisfy({ $0 != nil }) else { fail(1, "no flow reached every TAP queue (steering: \(found))") }
    return found.map { $0! }
}

/// One source thread per pair, sending its flow's frames until stopped.
func startSources(_ c: Case, stop: StopFlag) throws -> [OSThread] {
    try (0..<c.pairs).map { p in
        let s = udpSource(port: flowPorts[p], size: c.size, sendBufferFrames: 64)
        let n = payloadSize(c.size)
        return try spawnThread(name: "dp-src\(p)") {
            let payload = [UInt8](repeating: 0x5A, count: n)
            while !stop.isSet { _ = send(s, payload, n, 0) }
            close(s)
        }
    }
}

// MARK: raw

/// iovecs into guest memory, handed to the one thread that uses them.
// @unchecked Sendable: pointers into guest memory, which outlives every thread.
final class Iovecs: @unchecked Sendable {
    let v: [iovec]
    init(_ v: [iovec]) { self.v = v }
}

func runRaw(_ c: Case) throws -> Sample {
    try tapControl.setOffload(TunOffload.flags(forGuestFeatures: VirtioNetFeature.offloads) | usoOffloads)
    _ = try? tapControl.setQueueEnabled(pair: 1, c.pairs > 1)
    let stop = StopFlag()
    var infos: [ThreadInfo] = []
    for p in 0..<c.pairs {
        let info = ThreadInfo()
        let fd = tapFDs[p]
        var iovs: [iovec]
        if c.dir == .tx {
            try writeTxFrame(pair: p, size: c.size)
            iovs = try iovecs(txSegments(size: c.size), base: pairArea(p))
        } else {
            iovs = try rxIovecs(pair: p)
        }
        let v = Iovecs(iovs)
        let dir = c.dir
        info.thread = try spawnThread(name: "dp-raw\(p)") {
            info.recordTid()
            var frames: UInt64 = 0, bytes: UInt64 = 0
            while !stop.isSet {
                let n = v.v.withUnsafeBufferPointer { dir == .tx ? writev(fd, $0.baseAddress, Int32($0.count)) : readv(fd, $0.baseAddress, Int32($0.count)) }
                if n > 0 {
                    frames += 1
                    bytes += UInt64(n - VirtioNetHeader.size)
                    if frames & 15 == 0 {
                        info.frames.store(frames, ordering: .relaxed)
                        info.bytes.store(bytes, ordering: .relaxed)
                    }
                } else if errno == EAGAIN {
                    info.polls.wrappingAdd(1, ordering: .relaxed)
                    _ = waitReadable(fd, millis: 50)
                } else if errno != EINTR {
                    info.errors.wrappingAdd(1, ordering: .relaxed)
                }
            }
            info.frames.store(frames, ordering: .relaxed)
            info.bytes.store(bytes, ordering: .relaxed)
        }
        infos.append(info)
    }
    let sources = c.dir == .rx ? try startSources(c, stop: stop) : []
    func snap() -> Sample {
        var s = Sample()
        for i in infos {
            s.frames += i.frames.load(ordering: .relaxed)
            s.bytes += i.bytes.load(ordering: .relaxed)
            s.cpuNanos += i.cpuNanos
            s.userNanos += i.userNanos
            s.ioCalls += i.ioCalls
            s.polls += i.polls.load(ordering: .relaxed)
            s.drops += i.errors.load(ordering: .relaxed)
        }
        let t = tapCounters()
        s.tapFrames = c.dir == .tx ? t.rx : t.tx
        s.wallNanos = monotonicNanos()
        return s
    }
    let result = measure(snap)
    stop.set()
    for i in infos { i.thread?.join() }
    for s in sources { s.join() }
    drainTap()
    return result
}

/// Warms up, then takes the difference of two snapshots `millis` apart.
func measure(_ snap: () -> Sample) -> Sample {
    usleep(200_000)
    let a = snap()
    usleep(UInt32(millis) * 1000)
    let b = snap()
    return Sample(frames: b.frames &- a.frames, bytes: b.bytes &- a.bytes, wallNanos: b.wallNanos &- a.wallNanos, cpuNanos: b.cpuNanos &- a.cpuNanos, userNanos: b.userNanos &- a.userNanos,
                  ioCalls: b.ioCalls &- a.ioCalls, polls: b.polls &- a.polls, kicks: b.kicks &- a.kicks,
                  interrupts: b.interrupts &- a.interrupts, drops: b.drops &- a.drops, tapFrames: b.tapFrames &- a.tapFrames)
}

// MARK: swiftlet


/// A queue thread as VirtioHost runs it (Virtio's serveQueueGroup), with its wake-ups counted.
func queueThread(handlers: [VirtioQueueHandler], kicks: [EventFD], stop: EventFD, pair: Int, info: ThreadInfo) {
    info.recordTid()
    pthread_setspecific(pairKey, UnsafeRawPointer(bitPattern: pair + 1))
    if seccompOn { Seccomp.installOrExit(.queue, name: "dp-q\(pair)") }
    serveQueueGroup(handlers: handlers, kicks: kicks, stop: stop,
                    onPollFailure: { e in fail(1, "queue thread poll: \(errnoText(e))") },
                    onPoll: { info.polls.wrappingAdd(1, ordering: .relaxed) })
}

/// The guest's tx path: keeps the ring full of the frame's chain, reclaims what the
/// device used, asks for an interrupt when half of what is in flight is done.
func txDriver(ring: DriverRing, kick: EventFD, irq: EventFD, stop: StopFlag) {
    var free: [UInt16] = (0..<ring.size).map { $0 }
    while !stop.isSet {
        let u = ring.usedIdx
        while ring.seenUsed != u {
            free.append(ring.usedElem(ring.seenUsed).id)
            ring.seenUsed &+= 1
        }
        if !free.isEmpty {
            let old = ring.availIdx
            for h in free { ring.push(h) }
            free.removeAll(keepingCapacity: true)
            if ring.publish(from: old) { try? kick.write(1) }
            continue
        }
        let inFlight = ring.availIdx &- ring.seenUsed
        if ring.interruptAfter(ring.seenUsed &+ inFlight / 2) { continue }
        if waitReadable(irq.fd, millis: 50) { _ = try? irq.read() }
    }
}

/// The guest's rx path (mergeable buffers, NAPI-like): asks for an interrupt at the next
/// used buffer, takes what is used, gives buffers back 64 at a time (or all when the
/// device has used every one).
func rxDriver(ring: DriverRing, kick: EventFD, irq: EventFD, stop: StopFlag) {
    var free: [UInt16] = []
    let old0 = ring.availIdx
    for h in 0..<ring.size { ring.push(h) }
    if ring.publish(from: old0) { try? kick.write(1) }
    while !stop.isSet {
        let u = ring.usedIdx
        while ring.seenUsed != u {
            free.append(ring.usedElem(ring.seenUsed).id)
            ring.seenUsed &+= 1
        }
        if free.count >= 64 || free.count == Int(ring.size) {
            let old = ring.availIdx
            for h in free { ring.push(h) }
            free.removeAll(keepingCapacity: true)
            if ring.publish(from: old) { try? kick.write(1) }
        }
        if ring.interruptAfter(ring.seenUsed) { continue }
        if waitReadable(irq.fd, millis: 50) { _ = try? irq.read() }
    }
}

func runSwiftlet(_ c: Case) throws -> Sample {
    let sink = try CountingSink()
    // Fresh rings for every queue (rx0, tx0, rx1, tx1, ctrl), as a driver sets up at DRIVER_OK.
    var rings: [DriverRing] = []
    for i in 0..<(2 * maxPairs + 1) {
        rings.append(try DriverRing(base: 0x10000 * UInt64(1 + i), size: i == 2 * maxPairs ? VirtioNetLimits.ctrlQueueSize : ringSize))
    }
    for p in 0..<maxPairs {
        let tx = rings[2 * p + 1], rx = rings[2 * p]
        try writeTxFrame(pair: p, size: c.size)
        let segs = txSegments(size: c.size)
        if segs.count == 1 {
            for i in 0..<Int(ringSize) { tx.setDesc(i, addr: pairArea(p), len: UInt32(segs[0].len), flags: 0) }
        } else {
            let table = pairArea(p) + 0x2_0000
            for (k, s) in segs.enumerated() {
                let d = table + UInt64(16 * k)
                try mem.store(pairArea(p) + s.addr, at: d)
                try mem.store(UInt32(s.len), at: d + 8)
                try mem.store(k < segs.count - 1 ? VirtqDesc.next : UInt16(0), at: d + 12)
                try mem.store(UInt16(k < segs.count - 1 ? k + 1 : 0), at: d + 14)
            }
            for i in 0..<Int(ringSize) { tx.setDesc(i, addr: table, len: UInt32(16 * segs.count), flags: VirtqDesc.indirect) }
        }
        for i in 0..<Int(ringSize) {
            rx.setDesc(i, addr: pairArea(p) + 0x3_0000 + UInt64(i * rxBufferSize), len: UInt32(rxBufferSize), flags: VirtqDesc.write)
        }
    }
    try device.activate(queues: try rings.map { try $0.deviceQueue(features: features) }, memory: mem, features: features, interrupt: sink)
    defer { device.reset() }
    // One thread per handler group, with a kick eventfd per queue (VirtioHost's ioeventfds).
    var kicks: [Int: EventFD] = [:]
    var workers: [(info: ThreadInfo, stop: EventFD, pair: Int)] = []
    for g in device.queueHandlerGroups {
        let ks = try g.map { h -> EventFD in
            let k = try EventFD()
            kicks[h.queueIndex] = k
            return k
        }
        let info = ThreadInfo(), stopFD = try EventFD()
        let pair = g[0].queueIndex / 2
        info.thread = try spawnThread(name: "dp-q\(pair)") {
            queueThread(handlers: g, kicks: ks, stop: stopFD, pair: pair, info: info)
        }
        workers.append((info, stopFD, pair))
    }
    defer {
        for w in workers { try? w.stop.write(1) }
        for w in workers { w.info.thread?.join() }
    }
    if c.pairs > 1 {
        // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, as the guest's ethtool -L combined N.
        let ctrl = rings[2 * maxPairs]
        let cmd: UInt64 = 0xE0_0000, ack: UInt64 = 0xE0_0100
        try mem.write([VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet, UInt8(c.pairs), 0], at: cmd)
        try mem.write([0xFF], at: ack)
        ctrl.setDesc(0, addr: cmd, len: 4, flags: VirtqDesc.next, next: 1)
        ctrl.setDesc(1, addr: ack, len: 1, flags: VirtqDesc.write)
        let old = ctrl.availIdx
        ctrl.push(0)
        _ = ctrl.publish(from: old)
        try kicks[2 * maxPairs]?.write(1)
        let deadline = monotonicNanos() + 2_000_000_000
        while ctrl.usedIdx == 0 && monotonicNanos() < deadline { usleep(1000) }
        guard try mem.readBytes(at: ack, count: 1) == [VirtioNetCtrl.ok] else { fail(1, "the device refused VQ_PAIRS_SET \(c.pairs)") }
    }
    let stop = StopFlag()
    var drivers: [OSThread] = []
    for p in 0..<c.pairs {
        let ring = rings[c.dir == .tx ? 2 * p + 1 : 2 * p]
        let kick = kicks[c.dir == .tx ? 2 * p + 1 : 2 * p]!
        let irq = sink.irq[p]
        let dir = c.dir
        drivers.append(try spawnThread(name: "dp-drv\(p)") {
            if dir == .tx { txDriver(ring: ring, kick: kick, irq: irq, stop: stop) } else { rxDriver(ring: ring, kick: kick, irq: irq, stop: stop) }
        })
    }
    let sources = c.dir == .rx ? try startSources(c, stop: stop) : []
    let measured = workers.filter { $0.pair < c.pairs }
    let queues = (0..<c.pairs).map { c.dir == .tx ? 2 * $0 + 1 : 2 * $0 }
    func snap() -> Sample {
        var s = Sample()
        for w in measured {
            s.cpuNanos += w.info.cpuNanos
            s.userNanos += w.info.userNanos
            s.ioCalls += w.info.ioCalls

            s.polls += w.info.polls.load(ordering: .relaxed)
        }
        for q in queues {
            let st = device.stats[q]
            s.frames += st.packets
            s.bytes += st.bytes
            s.kicks += st.notifications
            s.interrupts += st.interrupts
            s.drops += st.drops
        }
        // io_uring_enter calls (only the measured queue threads make any) count as I/O calls.
        s.ioCalls += IOURing.enterCalls.load(ordering: .relaxed)
        let t = tapCounters()
        s.tapFrames = c.dir == .tx ? t.rx : t.tx
        s.wallNanos = monotonicNanos()
        return s
    }
    let result = measure(snap)
    stop.set()
    for d in drivers { d.join() }
    for s in sources { s.join() }
    if sink.needsReset.load(ordering: .relaxed) { fail(1, "the device set DEVICE_NEEDS_RESET during \(c.dir) \(c.size)") }
    return result
}


func fflushStdout() { fflush(nil) }
