import XCTest
import Glibc
import Synchronization
import OS
import GuestMemory
import Virtio
import Vhost
@testable import Devices

/// Records TUNSETOFFLOAD / TUNSETQUEUE calls.
final class RecordingTapControl: NetTapControl {
    let calls = Locked<(offloads: [UInt32], enabled: [Int: Bool])>(([], [:]))
    func setOffload(_ flags: UInt32) throws { calls.withLock { $0.offloads.append(flags) } }
    func setQueueEnabled(pair: Int, _ on: Bool) throws { calls.withLock { $0.enabled[pair] = on } }
    var offloads: [UInt32] { calls.withLock { $0.offloads } }
    var attached: [Int] { calls.withLock { $0.enabled.filter { $0.value }.keys.sorted() } }
}

/// One driver-side split queue in the harness's guest memory.
final class DriverQueue {
    let mem: GuestMemory
    let desc: UInt64, avail: UInt64, used: UInt64
    let size: UInt16
    var nextDesc = 0
    var availIdx: UInt16 = 0
    var seenUsed: UInt16 = 0
    var queue: SplitQueue!

    init(mem: GuestMemory, base: UInt64, size: UInt16, features: UInt64) throws {
        self.mem = mem
        desc = base
        avail = base + 16 * UInt64(size)
        used = (avail + 6 + 2 * UInt64(size) + 0xFFF) & ~0xFFF
        self.size = size
        queue = try SplitQueue(memory: mem, layout: QueueLayout(size: UInt32(size), descTable: desc, availRing: avail, usedRing: used),
                               maxSize: size, eventIdx: features & VirtioFeature.eventIdx != 0,
                               indirectDescriptors: features & VirtioFeature.indirectDesc != 0)
    }

    @discardableResult
    func chain(_ parts: [(addr: UInt64, len: UInt32, writable: Bool)]) -> UInt16 {
        let first = nextDesc % Int(size)
        for (k, p) in parts.enumerated() {
            let i = (first + k) % Int(size)
            let last = k == parts.count - 1
            var flags: UInt16 = p.writable ? VirtqDesc.write : 0
            if !last { flags |= VirtqDesc.next }
            let d = desc + UInt64(16 * i)
            try! mem.store(p.addr, at: d)
            try! mem.store(p.len, at: d + 8)
            try! mem.store(flags, at: d + 12)
            try! mem.store(UInt16(last ? 0 : (i + 1) % Int(size)), at: d + 14)
        }
        nextDesc += parts.count
        return UInt16(first)
    }

    func offer(_ head: UInt16) {
        try! mem.store(head, at: avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try! mem.store(availIdx, at: avail + 2)
    }

    var usedIdx: UInt16 { try! mem.load(at: used + 2) }
    func usedElem(_ slot: Int) -> (id: UInt32, len: UInt32) {
        (try! mem.load(at: used + 4 + 8 * UInt64(slot % Int(size))),
         try! mem.load(at: used + 8 + 8 * UInt64(slot % Int(size))))
    }
}

/// Plays the virtio-net driver over real guest memory and real SplitQueues; the "TAP" is
/// a datagram socketpair (one frame per read/write, as with a TAP queue descriptor).
final class NetHarness {
    let mem: GuestMemory
    let device: VirtioNet
    let control = RecordingTapControl()
    /// What the device told its transport since the last (re)activation.
    private(set) var sink = RecordingSink()
    /// Device ends (given to the device) and host ends (the test's "network"), per pair.
    var deviceFDs: [Int32] = []
    var hostFDs: [Int32] = []
    var queues: [DriverQueue] = []
    var nextAddr: UInt64 = 0x20_0000
    let features: UInt64
    let pairs: Int
    let queueSize: UInt16
    var ownsFDs = true

    /// `tapFDs`: real TAP queue descriptors (not closed by the harness) instead of socketpairs.
    init(pairs: Int = 1, features: UInt64? = nil, queueSize: UInt16 = 64, mtu: UInt16 = 1500,
         tapFDs: [Int32]? = nil, log: RateLimitedLog? = nil, vhost: [any VhostNetBackend] = [],
         vhostFeatures: UInt64 = 0, txBatching: Bool = true) throws {
        mem = try GuestMemory(layout: [(base: 0, size: 0x80_0000)])
        if let tapFDs { deviceFDs = tapFDs }
        for _ in 0..<(tapFDs == nil ? pairs : 0) {
            var sv: [Int32] = [0, 0]
            precondition(socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0, &sv) == 0)
            precondition(fcntl(sv[0], F_SETFL, O_NONBLOCK) == 0 && fcntl(sv[1], F_SETFL, O_NONBLOCK) == 0)
            deviceFDs.append(sv[0])
            hostFDs.append(sv[1])
        }
        ownsFDs = tapFDs == nil
        device = VirtioNet(queueFDs: deviceFDs, mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], mtu: mtu,
                           control: tapFDs.map { TapQueueControl(fds: $0) } ?? control, name: "tnet", log: log,
                           vhost: vhost, vhostFeatures: vhostFeatures, txBatching: txBatching)
        var f = features ?? device.deviceFeatures
        f &= device.deviceFeatures
        self.features = f
        self.pairs = pairs
        self.queueSize = queueSize
        try start()
    }

    /// Fresh rings (zeroed), handed to the device as at DRIVER_OK.
    func start() throws {
        let used = features & VirtioNetFeature.mq != 0 ? pairs : 1
        queues = []
        for i in 0..<(2 * used + 1) {
            let base = 0x10000 + UInt64(i) * 0x10000
            try mem.zero(base, length: 0x10000)
            queues.append(try DriverQueue(mem: mem, base: base, size: queueSize, features: features))
        }
        var qs: [SplitQueue?] = queues.map { $0.queue }
        while qs.count < 2 * pairs + 1 { qs.append(nil) }
        try device.activate(queues: qs, memory: mem, features: features, interrupt: sink)
    }

    /// What a driver reset and a new initialization do to the device.
    func resetAndRestart() throws {
        device.reset()
        sink = RecordingSink()
        try start()
    }

    deinit {
        device.reset()
        if ownsFDs { for fd in deviceFDs + hostFDs { close(fd) } }
    }

    func rx(_ pair: Int = 0) -> DriverQueue { queues[2 * pair] }
    func tx(_ pair: Int = 0) -> DriverQueue { queues[2 * pair + 1] }
    var ctrl: DriverQueue { queues[queues.count - 1] }

    func handler(_ index: Int) -> VirtioQueueHandler { device.queueHandlers.first { $0.queueIndex == index }! }
    var rxHandler: NetRxQueue { handler(0) as! NetRxQueue }
    var txHandler: NetTxQueue { handler(1) as! NetTxQueue }
    var ctrlHandler: NetCtrlQueue { handler(queues.count - 1) as! NetCtrlQueue }

    func alloc(_ len: Int, fill: UInt8 = 0) -> UInt64 {
        let a = nextAddr
        nextAddr += UInt64((len + 15) & ~15) + 16
        try! mem.write([UInt8](repeating: fill, count: max(len, 1)), at: a)
        return a
    }

    func bytes(_ addr: UInt64, _ n: Int) -> [UInt8] { try! mem.readBytes(at: addr, count: n) }

    /// Offers one device-writable rx buffer of `len` bytes; returns its address.
    @discardableResult
    func addRxBuffer(_ len: Int, pair: Int = 0) -> UInt64 {
        let a = alloc(len, fill: 0xEE)
        rx(pair).offer(rx(pair).chain([(a, UInt32(len), true)]))
        return a
    }

    /// Plays rx queue 0's thread for `milliseconds` (or until `done`): waits on its
    /// completion fd and serves it whenever it is readable. Returns how many times it was.
    func serveRx(milliseconds: Int, until done: () -> Bool = { false }) -> Int {
        let deadline = monotonicNanos() + UInt64(milliseconds) * 1_000_000
        var wakeups = 0
        while monotonicNanos() < deadline && !done() {
            var p = pollfd(fd: rxHandler.completionFD, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 20) > 0 {
                wakeups += 1
                rxHandler.completionsReady()
            }
        }
        return wakeups
    }

    /// Offers a chain of a `first`-byte buffer (none when nil) and then an indirect table
    /// of `count` buffers of `each` bytes, all device-writable (rx) or all readable (tx),
    /// on `queue`. Returns the buffers' addresses in chain order.
    @discardableResult
    func offerIndirect(on q: DriverQueue, first: Int?, count: Int, each: Int, writable: Bool) -> [UInt64] {
        let w: UInt16 = writable ? VirtqDesc.write : 0
        var bufs: [UInt64] = []
        if let first { bufs.append(alloc(first, fill: 0xEE)) }
        let table = alloc(16 * count)
        for k in 0..<count {
            let b = alloc(each, fill: 0xEE)
            bufs.append(b)
            let d = table + UInt64(16 * k)
            try! mem.store(b, at: d)
            try! mem.store(UInt32(each), at: d + 8)
            try! mem.store(w | (k < count - 1 ? VirtqDesc.next : 0), at: d + 12)
            try! mem.store(UInt16(k < count - 1 ? k + 1 : 0), at: d + 14)
        }
        let head = q.nextDesc % Int(q.size)
        var i = head
        if let first {
            let next = (i + 1) % Int(q.size)
            let d = q.desc + UInt64(16 * i)
            try! mem.store(bufs[0], at: d)
            try! mem.store(UInt32(first), at: d + 8)
            try! mem.store(w | VirtqDesc.next, at: d + 12)
            try! mem.store(UInt16(next), at: d + 14)
            i = next
        }
        let d = q.desc + UInt64(16 * i)
        try! mem.store(table, at: d)
        try! mem.store(UInt32(16 * count), at: d + 8)
        try! mem.store(VirtqDesc.indirect, at: d + 12)
        try! mem.store(UInt16(0), at: d + 14)
        q.nextDesc += first == nil ? 1 : 2
        q.offer(UInt16(head))
        return bufs
    }

    /// The host sends one frame (with its 12-byte vnet header) to the guest.
    func hostSend(_ frame: [UInt8], pair: Int = 0) {
        let hdr = [UInt8](repeating: 0, count: 12)
        let b = hdr + frame
        precondition(write(hostFDs[pair], b, b.count) == b.count)
    }

    /// The next frame the guest sent, with its vnet header, or nil.
    func hostReceive(pair: Int = 0) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: 70000)
        let n = read(hostFDs[pair], &b, b.count)
        return n < 0 ? nil : Array(b[0..<n])
    }

    /// A tx chain from the guest: `data` split into readable descriptors of the given sizes.
    func send(_ data: [UInt8], split: [Int]? = nil, pair: Int = 0) {
        var parts: [(addr: UInt64, len: UInt32, writable: Bool)] = []
        var off = 0
        for s in split ?? [data.count] {
            let a = alloc(s)
            try! mem.write(Array(data[off..<off + s]), at: a)
            parts.append((a, UInt32(s), false))
            off += s
        }
        tx(pair).offer(tx(pair).chain(parts))
    }

    /// A control command; returns the ack byte's address (preset to 0xFF).
    func command(_ cls: UInt8, _ cmd: UInt8, _ data: [UInt8], ackLength: Int = 1, headerLength: Int = 2) -> UInt64 {
        var parts: [(addr: UInt64, len: UInt32, writable: Bool)] = []
        let body = [cls, cmd] + data
        let readable = Array(body.prefix(headerLength + data.count))
        if !readable.isEmpty {
            let a = alloc(readable.count)
            try! mem.write(readable, at: a)
            parts.append((a, UInt32(readable.count), false))
        }
        let ack = alloc(max(ackLength, 1), fill: 0xFF)
        if ackLength > 0 { parts.append((ack, UInt32(ackLength), true)) }
        ctrl.offer(ctrl.chain(parts))
        return ack
    }
}

/// Runs `body` on a thread of its own and waits up to `seconds` for it to return. If it
/// has not, calls `stop` (which must make it return) and waits for it. Returns whether it
/// returned in time.
func returnsInTime(_ seconds: Double, _ body: @escaping () -> Void, stop: () -> Void) -> Bool {
    // @unchecked Sendable: `body` runs on the one thread started for it.
    final class Job: @unchecked Sendable {
        let body: () -> Void
        let finished = Atomic<Bool>(false)
        init(_ b: @escaping () -> Void) { body = b }
        var done: Bool { finished.load(ordering: .acquiring) }
    }
    let job = Job(body)
    var t = pthread_t()
    let ctx = Unmanaged.passRetained(job).toOpaque()
    precondition(pthread_create(&t, nil, { p in
        let j = Unmanaged<Job>.fromOpaque(p!).takeRetainedValue()
        j.body()
        j.finished.store(true, ordering: .releasing)
        return nil
    }, ctx) == 0)
    let deadline = monotonicNanos() + UInt64(seconds * 1e9)
    while !job.done && monotonicNanos() < deadline { usleep(1000) }
    let inTime = job.done
    if !inTime { stop() }
    pthread_join(t, nil)
    return inTime
}

func frame(_ n: Int, seed: UInt8 = 1) -> [UInt8] {
    (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
}
