// Split virtqueues (virtio 1.2 §2.7), device side.
//
// The guest is hostile: every index, address, length and chain read from guest memory
// is validated before use, and guest memory is only touched through pointers that
// GuestMemory has checked to lie wholly inside RAM. Each descriptor is read exactly once
// (into locals) so the guest cannot change it between check and use.
//
// A queue is driven by one thread at a time (the device's worker); the type is not
// internally synchronized.
//
// A device worker's loop (the transport hands the device its queues and an
// `interrupt: VirtioInterruptSink` at activation):
//
//     while running {
//         wait for the queue's ioeventfd
//         repeat {
//             q.disableNotifications()
//             while let chain = try q.popAvailable() {     // on a thrown error:
//                 let written = serve(chain)                //   .badChain -> interrupt.markNeedsReset()
//                 try q.stageUsed(head: chain.head, length: written)   // (or addUsed(head, 0) and go on)
//             }                                            //   anything else -> markNeedsReset(), stop
//             q.publishUsed()
//             if q.needsNotification() { interrupt.signalUsedBuffer() }
//         } while q.enableNotifications()   // buffers raced in: go round again before sleeping
//     }
import Glibc
import GuestMemory
import Synchronization

/// Which of the three split-queue areas an error refers to.
public enum VirtqueueArea: String, Sendable {
    case descriptorTable = "descriptor table"
    case availRing = "available ring"
    case usedRing = "used ring"
}

/// What is wrong with one descriptor chain. The chain's head has been consumed from the
/// available ring; the device either returns it with `addUsed(head:length: 0)` and goes
/// on, or (recommended) marks itself NEEDS_RESET.
public enum ChainError: Error, Equatable, Sendable {
    /// A `next` index (or an index inside an indirect table) is past the table.
    case nextOutOfRange(index: UInt16, tableSize: Int)
    /// More descriptors than the table holds: the chain loops.
    case chainTooLong(limit: Int)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable
    /// A buffer [address, address+length) is not wholly inside one RAM region.
    case bufferOutOfBounds(address: UInt64, length: UInt32)
    /// The chain's buffers add up to more than UInt32.max bytes.
    case totalLengthTooLarge
    /// An INDIRECT descriptor while VIRTIO_F_INDIRECT_DESC was not negotiated.
    case indirectNotNegotiated
    /// An indirect table whose length is 0, not a multiple of 16, or too large.
    case indirectBadLength(UInt32)
    /// An indirect table not wholly inside RAM.
    case indirectOutOfBounds(address: UInt64, length: UInt32)
    /// An INDIRECT descriptor inside an indirect table.
    case nestedIndirect
    /// INDIRECT and NEXT on the same descriptor.
    case indirectWithNext
}

public enum VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Queue size 0, not a power of two, or larger than the device's maximum (or 32768).
    case invalidSize(UInt32, max: UInt16)
    /// A ring address without the alignment §2.7 requires (16 / 2 / 4).
    case misaligned(VirtqueueArea, address: UInt64)
    /// A ring not wholly inside one RAM region.
    case ringOutOfBounds(VirtqueueArea, address: UInt64, length: UInt64)
    /// avail.idx moved more than the queue size past what the device has consumed.
    case availIndexJump(lastSeen: UInt16, availIdx: UInt16, size: UInt16)
    /// A head index in the available ring that is not < queue size.
    case headOutOfRange(head: UInt16, size: UInt16)
    /// One bad descriptor chain (see ChainError).
    case badChain(head: UInt16, ChainError)
    /// Device bug: addUsed with a head that is not < size, or more used entries than
    /// chains popped.
    case invalidUsed(head: UInt16)

    public var description: String {
        switch self {
        case let .invalidSize(s, m): return "virtqueue size \(s) invalid (power of two, 1...\(m))"
        case let .misaligned(a, addr): return "virtqueue \(a.rawValue) at 0x\(String(addr, radix: 16)) misaligned"
        case let .ringOutOfBounds(a, addr, l):
            return "virtqueue \(a.rawValue) 0x\(String(addr, radix: 16))+0x\(String(l, radix: 16)) outside guest RAM"
        case let .availIndexJump(last, idx, size):
            return "avail idx jumped from \(last) to \(idx) (queue size \(size))"
        case let .headOutOfRange(h, s): return "descriptor head \(h) >= queue size \(s)"
        case let .badChain(h, e): return "bad descriptor chain at head \(h): \(e)"
        case let .invalidUsed(h): return "device returned invalid used head \(h)"
        }
    }
}

/// Where the driver placed a queue: what the transport's queue registers hold.
public struct QueueLayout: Equatable, Sendable {
    public var size: UInt32
    public var descTable: UInt64
    public var availRing: UInt64
    public var usedRing: UInt64

    public init(size: UInt32, descTable: UInt64, availRing: UInt64, usedRing: UInt64) {
        self.size = size
        self.descTable = descTable
        self.availRing = availRing
        self.usedRing = usedRing
    }
}

/// One validated buffer of a descriptor chain.
// @unchecked Sendable: `host` points into guest RAM (see GuestRegion), inside the buffer
// the driver handed over with the chain; the chain goes to one thread at a time.
public struct ChainSegment: @unchecked Sendable {
    /// Guest physical address.
    public let address: UInt64
    public let length: UInt32
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    public let isWritable: Bool
    /// Host address of `address`; [host, host+length) lies inside guest RAM.
    public let host: UnsafeMutableRawPointer
}

/// A validated descriptor chain: readable segments first, then writable ones.
/// Zero-length descriptors are validated (address inside or at the end of a RAM
/// region) and count towards the chain length, but do not appear in `segments`.
/// Host pointers stay valid while `memory` is alive (the chain keeps it alive).
// @unchecked Sendable: its segments' host pointers (see ChainSegment).
public struct DescriptorChain: @unchecked Sendable {
    public let head: UInt16
    /// The first segment is kept inline and the others in `more`, so a chain of one buffer
    /// (virtio-net's mergeable rx buffers: 16 or more per 64 KiB frame) allocates nothing.
    let first: ChainSegment?
    let more: [ChainSegment]
    /// Segments 0..<readableCount are device-readable, the rest device-writable.
    public let readableCount: Int
    public let readableLength: UInt32
    public let writableLength: UInt32
    /// Number of descriptors walked (including zero-length ones and the indirect one).
    public let descriptorCount: Int
    let memory: GuestMemory

    init(head: UInt16, first: ChainSegment?, more: [ChainSegment], readableCount: Int,
         readableLength: UInt32, writableLength: UInt32, descriptorCount: Int, memory: GuestMemory) {
        self.head = head
        self.first = first
        self.more = more
        self.readableCount = readableCount
        self.readableLength = readableLength
        self.writableLength = writableLength
        self.descriptorCount = descriptorCount
        self.memory = memory
    }

    /// Number of segments (descriptors with a non-zero length).
    public var segmentCount: Int { first == nil ? 0 : 1 + more.count }
    /// Number of device-writable segments: the iovecs `appendIovecs(writable: true)` makes.
    public var writableCount: Int { segmentCount - readableCount }
    /// Segment `i` (< segmentCount).
    @inline(__always)
    public func segment(_ i: Int) -> ChainSegment { i == 0 ? first! : more[i - 1] }
    /// All segments, readable ones first (allocates: for inspection, not the data path).
    public var segments: [ChainSegment] { (0..<segmentCount).map { segment($0) } }
    public var readableSegments: ArraySlice<ChainSegment> { segments[0..<readableCount] }
    public var writableSegments: ArraySlice<ChainSegment> { segments[readableCount...] }

    /// iovecs over the device-readable part (for writev to a host fd).
    public func readableIovecs() -> [iovec] { iovecs(writable: false) }
    /// iovecs over the device-writable part (for readv from a host fd).
    public func writableIovecs() -> [iovec] { iovecs(writable: true) }

    /// iovecs over `length` bytes of the readable or writable part starting `skipping`
    /// bytes into it (e.g. a virtio-blk request without its header and status byte).
    /// Clamped to what the part holds.
    public func iovecs(writable: Bool, skipping: UInt64 = 0, length: UInt64 = .max) -> [iovec] {
        var out: [iovec] = []
        appendIovecs(writable: writable, skipping: skipping, length: length, to: &out)
        return out
    }

    /// `iovecs(writable:skipping:length:)` appended to `out` (a reused array: no
    /// allocation on a data path once it has grown).
    public func appendIovecs(writable: Bool, skipping: UInt64 = 0, length: UInt64 = .max, to out: inout [iovec]) {
        var skip = skipping
        var left = length
        for i in (writable ? readableCount..<segmentCount : 0..<readableCount) where left > 0 {
            let s = segment(i)
            let l = UInt64(s.length)
            if skip >= l { skip -= l; continue }
            let n = min(l - skip, left)
            out.append(iovec(iov_base: s.host + Int(skip), iov_len: Int(n)))
            left -= n
            skip = 0
        }
    }

    /// Copies up to `into.count` bytes of the readable part, starting `offset` bytes into
    /// it, out of guest memory. Returns the number of bytes copied.
    @discardableResult
    public func readReadable(into dst: UnsafeMutableRawBufferPointer, offset: UInt64 = 0) -> Int {
        guard let base = dst.baseAddress else { return 0 }
        var done = 0
        for v in iovecs(writable: false, skipping: offset, length: UInt64(dst.count)) {
            (base + done).copyMemory(from: v.iov_base!, byteCount: v.iov_len)
            done += v.iov_len
        }
        return done
    }

    /// Copies `src` into the writable part starting `offset` bytes into it. Returns the
    /// number of bytes copied (less than src.count if the part is too short).
    @discardableResult
    public func writeWritable(_ src: UnsafeRawBufferPointer, offset: UInt64 = 0) -> Int {
        guard let base = src.baseAddress else { return 0 }
        var done = 0
        for v in iovecs(writable: true, skipping: offset, length: UInt64(src.count)) {
            v.iov_base!.copyMemory(from: base + done, byteCount: v.iov_len)
            done += v.iov_len
        }
        return done
    }

    @discardableResult
    public func writeWritable(_ bytes: [UInt8], offset: UInt64 = 0) -> Int {
        bytes.withUnsafeBytes { writeWritable($0, offset: offset) }
    }
}

// Atomic accessors for the 16-bit ring indices in guest memory. The ring addresses are
// validated aligned (avail 2, used 4) and regions are page aligned on both sides, so the
// host addresses are naturally aligned for UInt16.
@inline(__always)
func loadIndex(_ p: UnsafeMutableRawPointer, acquire: Bool) -> UInt16 {
    let a = p.assumingMemoryBound(to: Atomic<UInt16>.self)
    return UInt16(littleEndian: acquire ? a.pointee.load(ordering: .acquiring) : a.pointee.load(ordering: .relaxed))
}

@inline(__always)
func storeIndex(_ p: UnsafeMutableRawPointer, _ v: UInt16, release: Bool) {
    let a = p.assumingMemoryBound(to: Atomic<UInt16>.self)
    if release { a.pointee.store(v.littleEndian, ordering: .releasing) } else { a.pointee.store(v.littleEndian, ordering: .relaxed) }
}

/// A split virtqueue, device side.
// @unchecked Sendable: made on the activating thread and then used by its queue's thread
// alone (the indices below are that thread's); the rings themselves are shared with the
// driver, which is what the atomic index accesses and fences are for.
public final class SplitQueue: @unchecked Sendable {
    /// Largest queue size the spec allows.
    public static let maxQueueSize: UInt16 = 32768
    /// Most descriptors one indirect table may hold (QEMU's VIRTQUEUE_MAX_SIZE). Devices
    /// that use indirect descriptors must advertise segment limits below this.
    public static let maxIndirectDescriptors = 1024

    public let memory: GuestMemory
    public let layout: QueueLayout
    public let size: UInt16
    /// VIRTIO_F_EVENT_IDX negotiated.
    public let eventIdx: Bool
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    public let indirectDescriptors: Bool

    let desc: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer
    let mask: UInt16

    // The indices below are read and written on every chain by one thread, in plain
    // loads and stores that never overlap another access, so they skip the runtime
    // exclusivity check (about a third of the rx path's user-mode time with it).
    /// Next available-ring slot the device will consume (free-running, wraps at 65536).
    @exclusivity(unchecked) public private(set) var nextAvail: UInt16 = 0
    /// Next used-ring slot the device will fill (includes staged, unpublished entries).
    @exclusivity(unchecked) public private(set) var nextUsed: UInt16 = 0
    /// The used.idx value last published to the driver.
    @exclusivity(unchecked) public private(set) var publishedUsed: UInt16 = 0
    /// used.idx at the last needsNotification() check (with EVENT_IDX), or at the last
    /// notification it asked for (without).
    @exclusivity(unchecked) var signalledUsed: UInt16? = nil
    /// Set once the queue has seen a queue-level violation; every later pop rethrows it.
    @exclusivity(unchecked) public private(set) var brokenBy: VirtqueueError? = nil

    /// Checks a layout: size a power of two in 1...min(maxSize, 32768); the descriptor
    /// table (16*N bytes, 16-aligned), available ring (6+2*N, 2-aligned) and used ring
    /// (6+8*N, 4-aligned) each wholly inside one RAM region. Returns host pointers.
    @discardableResult
    public static func validate(_ l: QueueLayout, maxSize: UInt16, memory: GuestMemory) throws
        -> (desc: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer)
    {
        let limit = min(maxSize, maxQueueSize)
        guard l.size > 0, l.size <= UInt32(limit), l.size & (l.size - 1) == 0 else {
            throw VirtqueueError.invalidSize(l.size, max: limit)
        }
        let n = UInt64(l.size)
        guard l.descTable % 16 == 0 else { throw VirtqueueError.misaligned(.descriptorTable, address: l.descTable) }
        guard l.availRing % 2 == 0 else { throw VirtqueueError.misaligned(.availRing, address: l.availRing) }
        guard l.usedRing % 4 == 0 else { throw VirtqueueError.misaligned(.usedRing, address: l.usedRing) }
        func map(_ area: VirtqueueArea, _ a: UInt64, _ len: UInt64) throws -> UnsafeMutableRawPointer {
            do { return try memory.pointer(a, length: len) } catch {
                throw VirtqueueError.ringOutOfBounds(area, address: a, length: len)
            }
        }
        return (try map(.descriptorTable, l.descTable, 16 * n),
                try map(.availRing, l.availRing, 6 + 2 * n),
                try map(.usedRing, l.usedRing, 6 + 8 * n))
    }

    /// A queue over a validated layout. Indices start at 0 (the state after reset).
    public init(memory: GuestMemory, layout: QueueLayout, maxSize: UInt16 = SplitQueue.maxQueueSize,
                eventIdx: Bool = false, indirectDescriptors: Bool = false) throws {
        let p = try SplitQueue.validate(layout, maxSize: maxSize, memory: memory)
        self.memory = memory
        self.layout = layout
        self.size = UInt16(layout.size)
        self.mask = UInt16(layout.size - 1)
        self.eventIdx = eventIdx
        self.indirectDescriptors = indirectDescriptors
        self.desc = p.desc
        self.avail = p.avail
        self.used = p.used
    }

    // MARK: available ring

    /// avail.idx, read with acquire ordering (later ring and descriptor reads see what
    /// the driver wrote before publishing it).
    @inline(__always)
    func availIdx() -> UInt16 { loadIndex(avail + 2, acquire: true) }

    /// How many chains the driver has made available that the device has not popped.
    /// Throws (and breaks the queue) if avail.idx jumped by more than the queue size.
    public func availableCount() throws -> Int {
        if let e = brokenBy { throw e }
        let idx = availIdx()
        let pending = idx &- nextAvail
        guard pending <= size else {
            let e = VirtqueueError.availIndexJump(lastSeen: nextAvail, availIdx: idx, size: size)
            brokenBy = e
            throw e
        }
        return Int(pending)
    }

    /// The next available descriptor chain, validated, or nil if the ring is empty.
    /// Queue-level violations (avail idx jump, head out of range) break the queue: this
    /// and every later call throws; the device should mark itself NEEDS_RESET. A bad chain
    /// throws `.badChain(head:_)` after consuming the head; the queue stays usable.
    public func popAvailable() throws -> DescriptorChain? {
        guard try availableCount() > 0 else { return nil }
        let slot = Int(nextAvail & mask)
        let head = UInt16(littleEndian: (avail + 4 + 2 * slot).loadUnaligned(as: UInt16.self))
        nextAvail &+= 1
        guard head < size else {
            let e = VirtqueueError.headOutOfRange(head: head, size: size)
            brokenBy = e
            throw e
        }
        do {
            return try readChain(head: head)
        } catch let e as ChainError {
            throw VirtqueueError.badChain(head: head, e)
        }
    }

    /// Walks and validates the chain starting at `head` (< size).
    func readChain(head: UInt16) throws -> DescriptorChain {
        var first: ChainSegment? = nil
        var more: [ChainSegment] = []
        var readableCount = 0
        var readable: UInt64 = 0
        var writable: UInt64 = 0
        var seenWritable = false
        var table = desc
        var tableSize = Int(size)
        var inIndirect = false
        var index = Int(head)
        var walkedInTable = 0
        var walked = 0
        while true {
            walkedInTable += 1
            walked += 1
            if walkedInTable > tableSize { throw ChainError.chainTooLong(limit: tableSize) }
            // Read the descriptor once.
            let d = table + 16 * index
            let addr = UInt64(littleEndian: d.loadUnaligned(as: UInt64.self))
            let len = UInt32(littleEndian: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let flags = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            let next = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 14, as: UInt16.self))

            if flags & VirtqDesc.indirect != 0 {
                guard indirectDescriptors else { throw ChainError.indirectNotNegotiated }
                guard !inIndirect else { throw ChainError.nestedIndirect }
                guard flags & VirtqDesc.next == 0 else { throw ChainError.indirectWithNext }
                guard len != 0, len % 16 == 0, Int(len / 16) <= SplitQueue.maxIndirectDescriptors else {
                    throw ChainError.indirectBadLength(len)
                }
                do { table = try memory.pointer(addr, length: UInt64(len)) } catch {
                    throw ChainError.indirectOutOfBounds(address: addr, length: len)
                }
                // The WRITE flag of the descriptor that points at the table is ignored (§2.7.5.3.2).
                tableSize = Int(len / 16)
                inIndirect = true
                index = 0
                walkedInTable = 0
                continue
            }

            let isWritable = flags & VirtqDesc.write != 0
            if isWritable {
                seenWritable = true
            } else if seenWritable {
                throw ChainError.readableAfterWritable
            }
            let host: UnsafeMutableRawPointer
            do { host = try memory.pointer(addr, length: UInt64(len)) } catch {
                throw ChainError.bufferOutOfBounds(address: addr, length: len)
            }
            if isWritable { writable += UInt64(len) } else { readable += UInt64(len) }
            guard readable + writable <= UInt64(UInt32.max) else { throw ChainError.totalLengthTooLarge }
            if len > 0 {
                let seg = ChainSegment(address: addr, length: len, isWritable: isWritable, host: host)
                if first == nil { first = seg } else { more.append(seg) }
                if !isWritable { readableCount += 1 }
            }

            if flags & VirtqDesc.next == 0 { break }
            guard Int(next) < tableSize else { throw ChainError.nextOutOfRange(index: next, tableSize: tableSize) }
            index = Int(next)
        }
        return DescriptorChain(head: head, first: first, more: more, readableCount: readableCount,
                               readableLength: UInt32(readable), writableLength: UInt32(writable),
                               descriptorCount: walked, memory: memory)
    }

    // MARK: used ring

    /// Writes a used element (head, bytes written into the chain's writable part) without
    /// publishing it. Throws for a head >= size or more used entries than chains popped.
    public func stageUsed(head: UInt16, length: UInt32) throws {
        guard head < size, nextAvail &- nextUsed != 0 else { throw VirtqueueError.invalidUsed(head: head) }
        let e = used + 4 + 8 * Int(nextUsed & mask)
        e.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        e.storeBytes(of: length.littleEndian, toByteOffset: 4, as: UInt32.self)
        nextUsed &+= 1
    }

    /// Publishes every staged used element: used.idx is stored with release ordering, so
    /// the driver sees the elements before the index.
    public func publishUsed() {
        guard nextUsed != publishedUsed else { return }
        storeIndex(used + 2, nextUsed, release: true)
        publishedUsed = nextUsed
    }

    /// stageUsed + publishUsed.
    public func addUsed(head: UInt16, length: UInt32) throws {
        try stageUsed(head: head, length: length)
        publishUsed()
    }

    /// vring_need_event: whether moving the index from `old` to `new` crosses `event`
    /// (all wrapping u16).
    @inline(__always)
    public static func needEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- event &- 1) < (new &- old)
    }

    /// Whether the driver wants an interrupt for the used entries published since the
    /// last time this returned true. With EVENT_IDX: used_event from the available ring
    /// and vring_need_event; without: unless the driver set VRING_AVAIL_F_NO_INTERRUPT.
    /// Call after publishUsed(); a true answer is recorded as "signalled".
    public func needsNotification() -> Bool {
        // The used.idx store must be visible before used_event / avail.flags are read.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let new = publishedUsed
        if let old = signalledUsed, old == new { return false }
        if signalledUsed == nil, new == 0 { return false }  // nothing ever published
        let notify: Bool
        if eventIdx {
            let usedEvent = loadIndex(avail + 4 + 2 * Int(size), acquire: false)
            if let old = signalledUsed {
                notify = SplitQueue.needEvent(event: usedEvent, new: new, old: old)
            } else {
                notify = true
            }
        } else {
            let flags = loadIndex(avail, acquire: false)
            notify = flags & VirtqRingFlags.availNoInterrupt == 0
        }
        // With EVENT_IDX the next check covers only what is published after this one
        // (vhost's and QEMU's signalled_used): a used_event the device has already
        // passed without it asking is the driver's to catch, and it does, by looking at
        // the used ring after it writes used_event. Without EVENT_IDX a suppressed
        // interrupt is still owed until the driver wants interrupts again.
        if notify || eventIdx { signalledUsed = new }
        return notify
    }

    // MARK: driver notification suppression

    /// Asks the driver not to notify (kick). Without EVENT_IDX sets VRING_USED_F_NO_NOTIFY;
    /// with EVENT_IDX leaves avail_event where it is, so only the kick that crosses it
    /// (at most one) arrives.
    public func disableNotifications() {
        if !eventIdx { storeIndex(used, VirtqRingFlags.usedNoNotify, release: false) }
    }

    /// Asks the driver to notify on the next available buffer, then re-reads avail.idx
    /// after a full fence. Returns true if buffers arrived meanwhile: the caller must
    /// process them instead of sleeping (the driver may have checked the flag before our
    /// store became visible and skipped the kick).
    public func enableNotifications() -> Bool {
        if eventIdx {
            storeIndex(used + 4 + 8 * Int(size), nextAvail, release: false)
        } else {
            storeIndex(used, 0, release: false)
        }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return availIdx() != nextAvail
    }

    /// Marks the queue broken (e.g. the device found a bad chain and gave up on it).
    public func markBroken(_ e: VirtqueueError) { if brokenBy == nil { brokenBy = e } }
}
