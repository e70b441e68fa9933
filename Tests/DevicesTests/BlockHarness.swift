import XCTest
import Glibc
import OS
import Synchronization
import GuestMemory
import Virtio
@testable import Devices

/// Records what the device told its transport.
final class RecordingSink: VirtioInterruptSink {
    let usedSignals = Atomic<Int>(0)
    let resets = Atomic<Int>(0)
    func signalUsedBuffer() { usedSignals.wrappingAdd(1, ordering: .acquiringAndReleasing) }
    func signalConfigChange() {}
    func markNeedsReset() { resets.wrappingAdd(1, ordering: .acquiringAndReleasing) }
    var used: Int { usedSignals.load(ordering: .acquiring) }
    var needsReset: Bool { resets.load(ordering: .acquiring) > 0 }
}

/// What callbacks on other threads (or that must be @Sendable) saw, in order.
final class Recorded<T: Sendable>: Sendable {
    private let items = Locked<[T]>([])
    func append(_ x: T) { items.withLock { $0.append(x) } }
    func removeAll() { items.withLock { $0.removeAll() } }
    var all: [T] { items.withLock { $0 } }
    var count: Int { items.withLock { $0.count } }
}

/// An interrupt line nobody looks at.
final class NoLine: InterruptLine {
    func raise() {}
    func lower() {}
}

/// A temporary image file on the real filesystem; removed on deinit.
final class TempImage {
    let path: String
    init(size: Int, fill: UInt8? = nil) {
        var tmpl = Array("/tmp/swiftlet-blk-XXXXXX".utf8CString)
        let fd = mkstemp(&tmpl)
        precondition(fd >= 0)
        path = String(nulTerminated: tmpl)
        if let fill {
            let b = [UInt8](repeating: fill, count: size)
            precondition(pwrite(fd, b, size, 0) == size)
        } else {
            precondition(ftruncate(fd, off_t(size)) == 0)
        }
        close(fd)
    }
    deinit { unlink(path) }

    func bytes(at offset: Int, count: Int) -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY)
        defer { close(fd) }
        var b = [UInt8](repeating: 0, count: count)
        let n = pread(fd, &b, count, off_t(offset))
        precondition(n == count)
        return b
    }

    func write(_ b: [UInt8], at offset: Int) {
        let fd = Glibc.open(path, O_RDWR)
        defer { close(fd) }
        precondition(pwrite(fd, b, b.count, off_t(offset)) == b.count)
        fsync(fd)
    }

    /// st_blocks (512-byte units actually allocated).
    var blocks: Int {
        var st = stat()
        precondition(stat(path, &st) == 0)
        return Int(st.st_blocks)
    }

    func open(readOnly: Bool = false, serial: String = "", size: UInt64? = nil) -> DiskImage {
        let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        precondition(fd >= 0)
        var st = stat()
        fstat(fd, &st)
        return DiskImage(fd: fd, size: size ?? UInt64(st.st_size), readOnly: readOnly, serial: serial)
    }
}

/// Plays the virtio-blk driver over real guest memory, a real SplitQueue and a real file.
final class BlockHarness {
    static let desc: UInt64 = 0x1000
    static let avail: UInt64 = 0x3000
    static let used: UInt64 = 0x4000
    static let dataStart: UInt64 = 0x10000

    let mem: GuestMemory
    let image: TempImage
    let disk: DiskImage
    let device: VirtioBlock
    let sink = RecordingSink()
    let size: UInt16
    var queue: SplitQueue!
    var nextDesc = 0
    var nextAddr = BlockHarness.dataStart
    var availIdx: UInt16 = 0

    init(sizeBytes: Int = 1 << 20, fill: UInt8? = nil, readOnly: Bool = false, serial: String = "",
         engine: BlockEngine = .synchronous, queueSize: UInt16 = 64, eventIdx: Bool = false,
         features: UInt64? = nil) throws {
        mem = try GuestMemory(layout: [(base: 0, size: 0x40_0000)])
        image = TempImage(size: sizeBytes, fill: fill)
        disk = image.open(readOnly: readOnly, serial: serial)
        device = VirtioBlock(disk: disk, numQueues: 1, engine: engine, name: "tblk")
        size = queueSize
        var f = features ?? device.deviceFeatures
        if !eventIdx { f &= ~VirtioFeature.eventIdx }
        queue = try SplitQueue(memory: mem, layout: QueueLayout(size: UInt32(queueSize), descTable: BlockHarness.desc,
                                                                availRing: BlockHarness.avail, usedRing: BlockHarness.used),
                               maxSize: VirtioBlockLimits.queueSize, eventIdx: f & VirtioFeature.eventIdx != 0,
                               indirectDescriptors: f & VirtioFeature.indirectDesc != 0)
        try device.activate(queues: [queue], memory: mem, features: f, interrupt: sink)
    }

    deinit { device.reset() }

    var handler: BlockQueue { device.queueHandlers[0] as! BlockQueue }

    /// Guest memory for a buffer (16-byte aligned, never reused in one harness).
    func alloc(_ len: Int, fill: UInt8 = 0) -> UInt64 {
        let a = nextAddr
        nextAddr += UInt64((len + 15) & ~15) + 16
        try! mem.write([UInt8](repeating: fill, count: len), at: a)
        return a
    }

    func header(type: UInt32, sector: UInt64, length: Int = 16) -> UInt64 {
        let a = alloc(max(length, 16))
        try! mem.store(type, at: a)
        try! mem.store(UInt32(0), at: a + 4)
        try! mem.store(sector, at: a + 8)
        return a
    }

    /// Writes a chain of descriptors into the table (or into `table` when given); returns the head.
    @discardableResult
    func chain(_ parts: [(addr: UInt64, len: UInt32, writable: Bool)], table: UInt64? = nil) -> UInt16 {
        let base = table ?? BlockHarness.desc
        let first = table == nil ? nextDesc : 0
        for (k, p) in parts.enumerated() {
            let i = first + k
            let last = k == parts.count - 1
            var flags: UInt16 = p.writable ? VirtqDesc.write : 0
            if !last { flags |= VirtqDesc.next }
            let d = base + UInt64(16 * i)
            try! mem.store(p.addr, at: d)
            try! mem.store(p.len, at: d + 8)
            try! mem.store(flags, at: d + 12)
            try! mem.store(UInt16(last ? 0 : i + 1), at: d + 14)
        }
        if table == nil { nextDesc += parts.count }
        return UInt16(first)
    }

    /// A one-descriptor chain pointing at an indirect table holding `parts`.
    func indirect(_ parts: [(addr: UInt64, len: UInt32, writable: Bool)]) -> UInt16 {
        let table = alloc(16 * parts.count)
        chain(parts, table: table)
        let i = nextDesc
        nextDesc += 1
        let d = BlockHarness.desc + UInt64(16 * i)
        try! mem.store(table, at: d)
        try! mem.store(UInt32(16 * parts.count), at: d + 8)
        try! mem.store(VirtqDesc.indirect, at: d + 12)
        try! mem.store(UInt16(0), at: d + 14)
        return UInt16(i)
    }

    func offer(_ head: UInt16) {
        try! mem.store(head, at: BlockHarness.avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try! mem.store(availIdx, at: BlockHarness.avail + 2)
    }

    var usedIdx: UInt16 { try! mem.load(at: BlockHarness.used + 2) }
    func usedElem(_ slot: Int) -> (id: UInt32, len: UInt32) {
        (try! mem.load(at: BlockHarness.used + 4 + 8 * UInt64(slot % Int(size))),
         try! mem.load(at: BlockHarness.used + 8 + 8 * UInt64(slot % Int(size))))
    }
    func setUsedEvent(_ v: UInt16) { try! mem.store(v, at: BlockHarness.avail + 4 + 2 * UInt64(size)) }

    /// Kicks, then (pool engine) retires completions until used.idx reaches `expect` or 5 s pass.
    func kick(expect: UInt16? = nil) {
        handler.kicked()
        let target = expect ?? availIdx
        let deadline = monotonicNanos() + 5_000_000_000
        while handler.completionFD >= 0 && usedIdx != target && monotonicNanos() < deadline {
            var p = pollfd(fd: handler.completionFD, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 100)
            if p.revents != 0 { handler.completionsReady() }
        }
    }

    // MARK: requests

    struct Request {
        let head: UInt16
        let status: UInt64
        let data: UInt64
    }

    func status(_ r: Request) -> UInt8 { try! mem.load(at: r.status) }

    /// IN: reads `length` bytes at `sector` into a fresh buffer (filled with 0xEE first).
    @discardableResult
    func read(sector: UInt64, length: Int, offer: Bool = true) -> Request {
        let h = header(type: VirtioBlockRequest.input, sector: sector)
        let d = alloc(length, fill: 0xEE)
        let s = alloc(1, fill: 0xFF)
        var parts: [(addr: UInt64, len: UInt32, writable: Bool)] = [(h, 16, false)]
        if length > 0 { parts.append((d, UInt32(length), true)) }
        parts.append((s, 1, true))
        let head = chain(parts)
        if offer { self.offer(head) }
        return Request(head: head, status: s, data: d)
    }

    @discardableResult
    func write(sector: UInt64, data: [UInt8], offer: Bool = true) -> Request {
        let h = header(type: VirtioBlockRequest.output, sector: sector)
        let d = alloc(data.count)
        try! mem.write(data, at: d)
        let s = alloc(1, fill: 0xFF)
        var parts: [(addr: UInt64, len: UInt32, writable: Bool)] = [(h, 16, false)]
        if !data.isEmpty { parts.append((d, UInt32(data.count), false)) }
        parts.append((s, 1, true))
        let head = chain(parts)
        if offer { self.offer(head) }
        return Request(head: head, status: s, data: d)
    }

    /// A request of `type` with a readable payload and `writable` data bytes before the status.
    @discardableResult
    func request(type: UInt32, sector: UInt64 = 0, payload: [UInt8] = [], writable: Int = 0) -> Request {
        let h = header(type: type, sector: sector)
        var parts: [(addr: UInt64, len: UInt32, writable: Bool)] = [(h, 16, false)]
        if !payload.isEmpty {
            let p = alloc(payload.count)
            try! mem.write(payload, at: p)
            parts.append((p, UInt32(payload.count), false))
        }
        let d = alloc(max(writable, 1), fill: 0xEE)
        if writable > 0 { parts.append((d, UInt32(writable), true)) }
        let s = alloc(1, fill: 0xFF)
        parts.append((s, 1, true))
        let head = chain(parts)
        offer(head)
        return Request(head: head, status: s, data: d)
    }

    static func segment(sector: UInt64, count: UInt32, flags: UInt32 = 0) -> [UInt8] {
        var w = ByteWriter()
        w.append(sector)
        w.append(count)
        w.append(flags)
        return w.bytes
    }

    func bytes(_ addr: UInt64, _ n: Int) -> [UInt8] { try! mem.readBytes(at: addr, count: n) }
}

func pattern(_ n: Int, seed: Int = 1) -> [UInt8] {
    (0..<n).map { UInt8(truncatingIfNeeded: ($0 &* 31) &+ seed &* 7 &+ ($0 >> 9)) }
}
