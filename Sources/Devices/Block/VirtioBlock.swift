// virtio-blk (virtio 1.2 §5.2): the device model and its per-queue request engine.
//
// The guest is hostile. Per request: the header is 16 device-readable bytes, the status
// is the last device-writable byte, data lengths are whole 512-byte sectors, sector +
// length lies inside the disk (no overflow), writes to a read-only disk fail, and
// discard / write-zeroes segment lists are checked (count, sectors, flags). A request
// that breaks these rules fails with S_IOERR or S_UNSUPP and the device carries on. A
// chain that cannot carry a status at all (no device-writable byte), a malformed
// descriptor chain or a broken ring marks the device DEVICE_NEEDS_RESET and the queue
// stops. Data moves with preadv/pwritev straight between the file and the chain's
// buffers in guest memory.
//
// Engine: per queue either synchronous (requests run on the queue thread) or a pool of
// I/O threads with up to `maxInFlight` requests in flight (see BlockEngine). The used
// ring is published once per batch and the driver is interrupted only when EVENT_IDX
// (or VRING_AVAIL_F_NO_INTERRUPT) says so.
import Glibc
import CLinux
import GuestMemory
import OS
import Virtio

/// How a queue runs its requests.
public enum BlockEngine: Equatable, Sendable {
    /// On the queue thread, one after the other.
    case synchronous
    /// On `threads` I/O threads per queue, at most `maxInFlight` requests in flight.
    case threadPool(threads: Int, maxInFlight: Int)

    /// The default: synchronous for a page-cache image (a copy from the page cache costs
    /// less than handing the request to another thread), a pool of 4 threads with 8
    /// requests in flight for O_DIRECT (each request waits for the device, which has queue
    /// depth to use). BlockTests.testEngineThroughput measures both engines both ways.
    public static func `default`(direct: Bool) -> BlockEngine {
        direct ? .threadPool(threads: 4, maxInFlight: VirtioBlockLimits.maxInFlightPerQueue) : .synchronous
    }
}

public final class VirtioBlock: HostedVirtioDevice, VirtioStaticConfig {
    public let disk: DiskImage
    public let numQueues: Int
    public let engine: BlockEngine
    /// Used for I/O thread names: "\(name)-q\(i)-io\(j)".
    public let name: String
    let log: RateLimitedLog?
    public let config: [UInt8]
    let handlers = Locked<[BlockQueue]>([])
    /// Per-queue counters for `--metrics`; they live as long as the device, so a driver
    /// reset (or a guest reboot) does not lose them.
    public let stats: [BlockQueueStats]

    /// `numQueues` is clamped to 1...VirtioBlockLimits.maxQueues; `engine` nil: the default for the disk.
    public init(disk: DiskImage, numQueues: Int = 1, engine: BlockEngine? = nil, name: String = "blk",
                log: RateLimitedLog? = nil) {
        self.disk = disk
        self.numQueues = min(max(numQueues, 1), VirtioBlockLimits.maxQueues)
        self.engine = engine ?? .default(direct: disk.direct)
        self.name = name
        self.log = log
        self.stats = (0..<self.numQueues).map { _ in BlockQueueStats() }
        var w = ByteWriter(size: VirtioBlockConfig.size)
        w.set(disk.sectors, at: VirtioBlockConfig.capacity)
        w.set(VirtioBlockLimits.sizeMax, at: VirtioBlockConfig.sizeMax)
        w.set(VirtioBlockLimits.segMax, at: VirtioBlockConfig.segMax)
        w.set(UInt32(VirtioBlockLimits.sectorSize), at: VirtioBlockConfig.blkSize)
        w.set(UInt16(self.numQueues), at: VirtioBlockConfig.numQueues)
        if !disk.readOnly {
            w.set(VirtioBlockLimits.maxDiscardSectors, at: VirtioBlockConfig.maxDiscardSectors)
            w.set(VirtioBlockLimits.maxDiscardSegments, at: VirtioBlockConfig.maxDiscardSeg)
            w.set(VirtioBlockLimits.discardAlignment, at: VirtioBlockConfig.discardSectorAlignment)
            w.set(VirtioBlockLimits.maxDiscardSectors, at: VirtioBlockConfig.maxWriteZeroesSectors)
            w.set(VirtioBlockLimits.maxDiscardSegments, at: VirtioBlockConfig.maxWriteZeroesSeg)
            w.set(UInt8(1), at: VirtioBlockConfig.writeZeroesMayUnmap)
        }
        config = w.bytes
    }

    // MARK: VirtioDevice

    public var deviceType: UInt32 { VirtioDeviceType.block }
    public var queueMaxSizes: [UInt16] { Array(repeating: VirtioBlockLimits.queueSize, count: numQueues) }

    public var deviceFeatures: UInt64 {
        var f = VirtioBlockFeature.sizeMax | VirtioBlockFeature.segMax | VirtioBlockFeature.blkSize
            | VirtioBlockFeature.flush | VirtioBlockFeature.mq
            | VirtioFeature.indirectDesc | VirtioFeature.eventIdx | VirtioFeature.version1
        if disk.readOnly {
            f |= VirtioBlockFeature.readOnly
        } else {
            f |= VirtioBlockFeature.discard | VirtioBlockFeature.writeZeroes
        }
        return f
    }


    /// Every field is read-only for the driver (CONFIG_WCE is not offered): writes are ignored.
    public func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {}

    public func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64,
                         interrupt: any VirtioInterruptSink) throws {
        reset()
        var made: [BlockQueue] = []
        do {
            for (i, q) in queues.enumerated() {
                guard let q else { continue }
                made.append(try BlockQueue(index: i, queue: q, disk: disk, features: features, interrupt: interrupt,
                                           engine: engine, name: "\(name)-q\(i)",
                                           stats: i < stats.count ? stats[i] : BlockQueueStats(), log: log))
            }
        } catch {
            for h in made { h.quiesce() }
            throw error
        }
        handlers.withLock { $0 = made }
    }

    public func reset() {
        let hs = handlers.withLock { h -> [BlockQueue] in
            defer { h = [] }
            return h
        }
        for h in hs { h.quiesce() }
    }

    // MARK: HostedVirtioDevice

    public var queueHandlers: [VirtioQueueHandler] { handlers.withLock { $0 } }
}

/// One request after validation.
// @unchecked Sendable: the iovecs point into guest memory (GuestMemory keeps it mapped for
// the device's life); a request goes to exactly one I/O thread, and the queue thread does
// not touch its buffers again until that thread has reported it done.
enum BlockOp: @unchecked Sendable {
    /// Already answered (status and used length).
    case done(status: UInt8, used: UInt32)
    /// The chain cannot carry a status: the device must be reset.
    case fatal(String)
    case read(iovs: [iovec], offset: UInt64, used: UInt32)
    case write(iovs: [iovec], offset: UInt64)
    case flush
    case discard([(offset: UInt64, length: UInt64)])
    case writeZeroes([(offset: UInt64, length: UInt64, unmap: Bool)])
}

/// One queue's counters, owned by the device (they outlive the queue's handler): a
/// request is one chain taken from the ring.
public typealias BlockQueueStats = QueueCounters

extension QueueCounters {
    /// virtio-blk: requests taken from the ring.
    public var requests: UInt64 { served }
}

/// One virtqueue of a virtio-blk device: validates and runs requests, retires them in batches.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone
// (`server`, `inFlight`); the I/O threads reach only `done` (a mutex), `completions`
// (an eventfd) and `disk`.
public final class BlockQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    /// The ring, its interrupt sink, broken/stopped state and counters (queue thread only).
    let server: QueueServer
    let disk: DiskImage
    let features: UInt64
    let pool: IOPool?
    let maxInFlight: Int
    /// Written by the I/O threads for each finished request; nil for the synchronous engine.
    let completions: EventFD?
    /// Requests started and not yet retired (queue thread only).
    var inFlight = 0
    /// Finished requests, filled by the I/O threads.
    let done = Locked<[(head: UInt16, used: UInt32)]>([])

    init(index: Int, queue: SplitQueue, disk: DiskImage, features: UInt64, interrupt: any VirtioInterruptSink,
         engine: BlockEngine, name: String, stats: BlockQueueStats = BlockQueueStats(),
         log: RateLimitedLog?) throws {
        self.queueIndex = index
        server = QueueServer(index: index, queue: queue, interrupt: interrupt, counters: stats,
                             label: "virtio-blk: queue \(index)", stopKind: "queue stopped", log: log,
                             interruptsOnlyForNewEntries: true)
        self.disk = disk
        self.features = features
        switch engine {
        case .synchronous:
            pool = nil
            maxInFlight = 1
            completions = nil
        case let .threadPool(threads, limit):
            completions = try EventFD()
            pool = try IOPool(threads: max(1, threads), name: name)
            maxInFlight = max(1, limit)
        }
    }

    deinit { pool?.shutdown() }

    public var completionFD: Int32 { completions?.fd ?? -1 }

    // MARK: VirtioQueueHandler

    public func kicked() {
        server.counters.notified()
        pump()
    }

    public func completionsReady() {
        retire()
        pump()
    }

    public func quiesce() {
        guard !server.quiesced else { return }
        server.quiesced = true
        // Requests already started finish; nothing new starts (pump checks quiesced).
        while inFlight > 0, let completions {
            var p = pollfd(fd: completions.fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 1000)
            retire()
        }
        server.publish()
        pool?.shutdown()
    }

    // MARK: engine

    /// Pops and starts requests until the ring is empty or the in-flight limit is reached,
    /// publishing the used ring once per batch (at most the queue size: a driver that
    /// keeps the ring full still sees its used entries every batch).
    func pump() {
        server.drain(batch: Int(server.queue.size), while: { pool == nil || inFlight < maxInFlight }) { start($0) }
    }

    func start(_ chain: DescriptorChain) {
        server.counters.count()
        let op = BlockQueue.prepare(chain, disk: disk, features: features)
        switch op {
        case let .fatal(why):
            server.fail("head \(chain.head): \(why)")
        case let .done(status, used):
            complete(chain, status: status, used: used)
        default:
            if let pool, let completions {
                inFlight += 1
                let submitted = pool.submit { [self] in
                    let (status, used) = BlockQueue.execute(op, disk: disk)
                    BlockQueue.writeStatus(chain, status)
                    done.withLock { $0.append((chain.head, used)) }
                    try? completions.write(1)
                }
                if !submitted {
                    inFlight -= 1
                    complete(chain, status: VirtioBlockStatus.ioError, used: 1)
                }
            } else {
                let (status, used) = BlockQueue.execute(op, disk: disk)
                complete(chain, status: status, used: used)
            }
        }
    }

    func complete(_ chain: DescriptorChain, status: UInt8, used: UInt32) {
        BlockQueue.writeStatus(chain, status)
        server.stage(chain.head, length: used)
    }

    /// Takes the requests the I/O threads finished and stages them (not published).
    func retire() {
        guard let completions else { return }
        _ = try? completions.read()
        let finished = done.withLock { d -> [(head: UInt16, used: UInt32)] in
            defer { d.removeAll(keepingCapacity: true) }
            return d
        }
        inFlight -= finished.count
        for f in finished { server.stage(f.head, length: f.used) }
        if !finished.isEmpty && !server.isServing { server.publish() }
    }

    static func writeStatus(_ chain: DescriptorChain, _ status: UInt8) {
        let n = UInt64(chain.writableLength)
        guard n > 0 else { return }
        chain.writeWritable([status], offset: n - 1)
    }

    // MARK: validation

    /// Validates a request and turns it into an operation. Pure: touches neither the
    /// file nor the used ring (GET_ID writes its answer into the chain).
    static func prepare(_ c: DescriptorChain, disk: DiskImage, features: UInt64) -> BlockOp {
        guard c.writableLength >= 1 else { return .fatal("request without a device-writable status byte") }
        let ioerr = BlockOp.done(status: VirtioBlockStatus.ioError, used: 1)
        let unsupp = BlockOp.done(status: VirtioBlockStatus.unsupported, used: 1)
        let header = VirtioBlockLimits.headerSize
        guard c.readableLength >= header else { return ioerr }
        var h = [UInt8](repeating: 0, count: Int(header))
        _ = h.withUnsafeMutableBytes { c.readReadable(into: $0) }
        let type = UInt32(h[0]) | UInt32(h[1]) << 8 | UInt32(h[2]) << 16 | UInt32(h[3]) << 24
        var sector: UInt64 = 0
        for i in 0..<8 { sector |= UInt64(h[8 + i]) << (8 * UInt64(i)) }
        let sectorSize = VirtioBlockLimits.sectorSize
        let sectors = disk.sectors

        /// [sector, sector + bytes/512) inside the disk.
        func inRange(_ sector: UInt64, bytes: UInt64) -> Bool {
            sector <= sectors && bytes / sectorSize <= sectors - sector
        }

        switch type {
        case VirtioBlockRequest.input:
            let len = UInt64(c.writableLength - 1)
            guard len % sectorSize == 0, inRange(sector, bytes: len) else { return ioerr }
            return .read(iovs: c.iovecs(writable: true, length: len), offset: sector * sectorSize, used: UInt32(len) + 1)
        case VirtioBlockRequest.output:
            let len = UInt64(c.readableLength - header)
            guard !disk.readOnly, len % sectorSize == 0, inRange(sector, bytes: len) else { return ioerr }
            return .write(iovs: c.iovecs(writable: false, skipping: UInt64(header), length: len), offset: sector * sectorSize)
        case VirtioBlockRequest.flush:
            guard features & VirtioBlockFeature.flush != 0 else { return unsupp }
            return .flush
        case VirtioBlockRequest.getID:
            let room = Int(c.writableLength - 1)
            guard room > 0 else { return ioerr }
            let n = min(room, VirtioBlockLimits.idBytes)
            c.writeWritable(Array(disk.serial[0..<n]))
            return .done(status: VirtioBlockStatus.ok, used: UInt32(n) + 1)
        case VirtioBlockRequest.discard, VirtioBlockRequest.writeZeroes:
            let isDiscard = type == VirtioBlockRequest.discard
            let feature = isDiscard ? VirtioBlockFeature.discard : VirtioBlockFeature.writeZeroes
            guard features & feature != 0 else { return unsupp }
            guard !disk.readOnly else { return ioerr }
            let bytes = c.readableLength - header
            let segSize = VirtioBlockLimits.segmentSize
            guard bytes > 0, bytes % segSize == 0, bytes / segSize <= VirtioBlockLimits.maxDiscardSegments else { return ioerr }
            var raw = [UInt8](repeating: 0, count: Int(bytes))
            _ = raw.withUnsafeMutableBytes { c.readReadable(into: $0, offset: UInt64(header)) }
            var ranges: [(offset: UInt64, length: UInt64, unmap: Bool)] = []
            for i in 0..<Int(bytes / segSize) {
                let o = i * Int(segSize)
                var s: UInt64 = 0
                for k in 0..<8 { s |= UInt64(raw[o + k]) << (8 * UInt64(k)) }
                var num: UInt32 = 0
                for k in 0..<4 { num |= UInt32(raw[o + 8 + k]) << (8 * UInt32(k)) }
                var flags: UInt32 = 0
                for k in 0..<4 { flags |= UInt32(raw[o + 12 + k]) << (8 * UInt32(k)) }
                // Discard has no flags; write-zeroes knows only bit 0 (unmap).
                if flags & (isDiscard ? ~UInt32(0) : ~UInt32(1)) != 0 { return unsupp }
                guard num <= VirtioBlockLimits.maxDiscardSectors, inRange(s, bytes: UInt64(num) * sectorSize) else { return ioerr }
                ranges.append((s * sectorSize, UInt64(num) * sectorSize, flags & 1 != 0))
            }
            if isDiscard { return .discard(ranges.map { ($0.offset, $0.length) }) }
            return .writeZeroes(ranges)
        default:
            return unsupp
        }
    }

    /// Runs an operation against the file. Returns the status and the used length.
    static func execute(_ op: BlockOp, disk: DiskImage) -> (UInt8, UInt32) {
        let ok = VirtioBlockStatus.ok
        let ioerr = VirtioBlockStatus.ioError
        switch op {
        case let .done(status, used): return (status, used)
        case .fatal: return (ioerr, 0)
        case let .read(iovs, offset, used):
            return disk.transfer(iovs, offset: offset, write: false) == 0 ? (ok, used) : (ioerr, 1)
        case let .write(iovs, offset):
            return (disk.transfer(iovs, offset: offset, write: true) == 0 ? ok : ioerr, 1)
        case .flush:
            return (disk.flush() == 0 ? ok : ioerr, 1)
        case let .discard(ranges):
            for r in ranges where disk.discard(offset: r.offset, length: r.length) != 0 { return (ioerr, 1) }
            return (ok, 1)
        case let .writeZeroes(ranges):
            for r in ranges where disk.writeZeroes(offset: r.offset, length: r.length, unmap: r.unmap) != 0 { return (ioerr, 1) }
            return (ok, 1)
        }
    }
}
