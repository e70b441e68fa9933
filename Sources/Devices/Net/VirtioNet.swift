// virtio-net (virtio 1.2 §5.1) over a multi-queue TAP: the device model.
//
// Queues: rx0, tx0, rx1, tx1, ..., ctrl (the control queue is queue 2 * pairs, where
// pairs is `queuePairs` with VIRTIO_NET_F_MQ negotiated and 1 without it). Each rx and
// each tx queue has its own handler; queue pair i uses TAP queue file descriptor i for
// both directions, and its two handlers share one host thread ("net0-q0+1": VirtioHost
// runs one thread per `queueHandlerGroups` entry). The control queue has its own handler
// and thread.
//
// RX: packets are read with readv straight into the guest's buffers (vnet header
// first); with MRG_RXBUF one packet may fill several chains and num_buffers says how
// many. When the guest has no buffers the thread stops polling the TAP until the next rx
// kick (the packets wait in the TAP's queue, which drops beyond its length, like a NIC).
// With MRG_RXBUF a read waits for buffers worth a whole frame (64 KiB + headers with
// guest GSO, else MTU + 18); it reads into less only when the guest cannot give more for
// it (its whole ring handed over, 64 chains, or as many buffers as one readv takes). A
// frame larger than the buffers given reaches the guest cut short (tun truncates; older
// kernels fail the read with EFAULT and drop it; the first chain then goes back empty,
// counted) and the guest's stack drops it: reading into whatever the ring held made TCP
// host->guest lose a 64 KiB frame whenever the ring ran low.
// TX: writev straight from the guest's buffers (the chain starts with the 12-byte
// virtio_net_hdr_v1; the kernel validates it). At most VirtioNetLimits.budget packets
// per wake-up per queue.
//
// With vhost (VhostPair.swift) the host kernel serves the rx and tx rings of each pair
// instead of the rx and tx handlers below; the control queue stays here and starts and
// stops the pairs' vhost rings. If the kernel refuses the rings when the driver starts the
// device, the device logs it and serves that activation and every later one in userspace.
//
// The guest is hostile: rx chains that cannot hold the header, tx chains shorter than
// the header, frames the TAP refuses and malformed control commands are dropped (used
// length 0) and counted; a malformed descriptor chain, a chain of more buffers than one
// readv/writev takes (GuestMemory.maxIovecsPerCall) or a broken ring marks the device
// DEVICE_NEEDS_RESET and that queue stops. Nothing a guest writes can crash swiftlet or
// make a thread retry without progress: a failed read gives the guest's first chain back
// empty, a failed write drops the frame.
import Glibc
import CLinux
import GuestMemory
import OS
import Virtio
import Vhost

/// What the device asks of its TAP beyond reading and writing frames. Errors are logged.
public protocol NetTapControl: AnyObject, Sendable {
    /// TUNSETOFFLOAD with TunOffload flags.
    func setOffload(_ flags: UInt32) throws
    /// TUNSETQUEUE: attach (true) or detach queue pair `pair`'s file descriptor.
    func setQueueEnabled(pair: Int, _ enabled: Bool) throws
}

/// Counters of one queue (rx: frames to the guest; tx: frames from it; ctrl: commands).
public typealias NetQueueStats = QueueCounters

extension QueueCounters {
    /// virtio-net: frames (or control commands) that went through.
    public var packets: UInt64 { served }
}

public final class VirtioNet: HostedVirtioDevice, VirtioStaticConfig {
    public let name: String
    public let mac: [UInt8]
    public let mtu: UInt16
    public let queuePairs: Int
    public let offload: Bool
    /// One TAP queue file descriptor per queue pair (not owned: the caller closes them).
    public let queueFDs: [Int32]
    let control: NetTapControl?
    let log: RateLimitedLog?
    public let config: [UInt8]
    /// Counters per virtqueue index (rx0, tx0, ..., ctrl), kept across resets.
    public let stats: [NetQueueStats]
    /// One vhost-net instance per queue pair, or none (userspace data path).
    let vhost: [any VhostNetBackend]
    /// What the vhost-net instances offer (VHOST_GET_FEATURES).
    let vhostFeatures: UInt64
    /// tx queues batch frames through io_uring where the kernel allows (NetTxBatching).
    public let txBatching: Bool
    struct State {
        var handlers: [VirtioQueueHandler] = []
        /// The pairs vhost serves in this activation (none: userspace).
        var vhostPairs: [VhostPair] = []
        var pairsActive = 1
        var negotiated: UInt64 = 0
        /// The kernel refused the rings once: userspace from then on.
        var vhostRefused = false
    }
    let state = Locked(State())

    /// `queueFDs.count` is the number of queue pairs (1...VirtioNetLimits.maxQueuePairs).
    /// `vhost`: one vhost-net instance per pair (owned by this process, VHOST_SET_OWNER
    /// done) and what they offer, or empty for the userspace data path. `txBatching`:
    /// userspace tx queues write frames in io_uring batches where the kernel gives them a
    /// ring (NetTxBatching).
    public init(queueFDs: [Int32], mac: [UInt8], mtu: UInt16 = 1500, offload: Bool = true,
                control: NetTapControl? = nil, name: String = "net", log: RateLimitedLog? = nil,
                vhost: [any VhostNetBackend] = [], vhostFeatures: UInt64 = 0,
                txBatching: Bool = NetTxBatching.enabledByEnvironment) {
        self.txBatching = txBatching
        precondition(!queueFDs.isEmpty && queueFDs.count <= VirtioNetLimits.maxQueuePairs && mac.count == 6)
        precondition(vhost.isEmpty || vhost.count == queueFDs.count)
        self.vhost = vhost
        self.vhostFeatures = vhostFeatures
        self.queueFDs = queueFDs
        self.queuePairs = queueFDs.count
        self.mac = mac
        self.mtu = mtu
        self.offload = offload
        self.control = control
        self.name = name
        self.log = log
        var w = ByteWriter(size: VirtioNetConfig.size)
        w.set(mac, at: VirtioNetConfig.mac)
        w.set(VirtioNetConfig.linkUp, at: VirtioNetConfig.status)
        w.set(UInt16(queueFDs.count), at: VirtioNetConfig.maxVirtqueuePairs)
        w.set(mtu, at: VirtioNetConfig.mtu)
        config = w.bytes
        stats = (0..<(2 * queueFDs.count + 1)).map { _ in NetQueueStats() }
    }

    // MARK: VirtioDevice

    public var deviceType: UInt32 { VirtioDeviceType.net }

    public var queueMaxSizes: [UInt16] {
        Array(repeating: VirtioNetLimits.queueSize, count: 2 * queuePairs) + [VirtioNetLimits.ctrlQueueSize]
    }

    public var deviceFeatures: UInt64 {
        var f = VirtioNetFeature.mac | VirtioNetFeature.status | VirtioNetFeature.mtu | VirtioNetFeature.mrgRxbuf
            | VirtioNetFeature.ctrlVQ | VirtioNetFeature.ctrlRx | VirtioNetFeature.mq
            | VirtioFeature.indirectDesc | VirtioFeature.eventIdx | VirtioFeature.version1
        if offload { f |= VirtioNetFeature.offloads }
        // Ring features the kernel lacks are not offered (the userspace fallback serves
        // whatever vhost would have).
        if !vhost.isEmpty { f &= ~(VhostNetRingFeatures.all & ~vhostFeatures) }
        return f
    }

    /// vhost-net serves the data queues of the current activation.
    public var usesVhost: Bool { state.withLock { !$0.vhostPairs.isEmpty } }


    /// The MAC is not writable through config space with VERSION_1: writes are ignored.
    public func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {}

    public func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64,
                         interrupt: any VirtioInterruptSink) throws {
        reset()
        let pairs = features & VirtioNetFeature.mq != 0 ? queuePairs : 1
        let hasMRG = features & VirtioNetFeature.mrgRxbuf != 0
        let guestGSO = features & (VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestTSO6) != 0
        do {
            try control?.setOffload(offload ? TunOffload.flags(forGuestFeatures: features) : 0)
        } catch {
            log?.warn("cannot set the TAP's offloads", "\(name): cannot set the TAP's offloads: \(error)")
        }
        var made: [VirtioQueueHandler] = []
        var vhostPairs: [VhostPair] = []
        if !vhost.isEmpty && !state.withLock({ $0.vhostRefused }) {
            do {
                (made, vhostPairs) = try activateVhost(queues: queues, memory: memory, features: features, pairs: pairs,
                                                       interrupt: interrupt)
            } catch {
                log?.warn("vhost-net refused the rings", "\(name): vhost-net refused the rings (\(error)): using the userspace data path")
                state.withLock { $0.vhostRefused = true }
            }
        }
        if vhostPairs.isEmpty {
            do {
                for p in 0..<pairs {
                    if let q = queues.count > 2 * p ? queues[2 * p] : nil {
                        made.append(try NetRxQueue(index: 2 * p, queue: q, fd: queueFDs[p], mergeable: hasMRG,
                                                   minFrame: guestGSO ? VirtioNetLimits.maxGSOFrame : Int(mtu) + 18,
                                                   interrupt: interrupt, stats: stats[2 * p], name: name, log: log))
                    }
                    if let q = queues.count > 2 * p + 1 ? queues[2 * p + 1] : nil {
                        made.append(try NetTxQueue(index: 2 * p + 1, queue: q, fd: queueFDs[p], interrupt: interrupt,
                                                   stats: stats[2 * p + 1], name: name, log: log, batching: txBatching))
                    }
                }
            } catch {
                for h in made { h.quiesce() }
                throw error
            }
        }
        let ctrl = 2 * pairs
        if features & VirtioNetFeature.ctrlVQ != 0, queues.count > ctrl, let q = queues[ctrl] {
            made.append(NetCtrlQueue(index: ctrl, queue: q, device: self, features: features,
                                     interrupt: interrupt, stats: stats[stats.count - 1], log: log))
        }
        state.withLock {
            $0.handlers = made
            $0.vhostPairs = vhostPairs
            $0.negotiated = features
        }
        // Only pair 0 until the driver asks for more (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET):
        // frames steered to a pair without rx buffers would wait there.
        _ = setPairs(1)
    }

    /// Configures a vhost-net pair for every pair whose two queues the driver set up, and
    /// attaches pair 0. On any refusal every pair made is closed and the error thrown.
    func activateVhost(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, pairs: Int,
                       interrupt: any VirtioInterruptSink) throws -> ([VirtioQueueHandler], [VhostPair]) {
        var made: [VirtioQueueHandler] = []
        var vps: [VhostPair] = []
        do {
            for p in 0..<pairs {
                guard queues.count > 2 * p + 1, let rx = queues[2 * p], let tx = queues[2 * p + 1] else { continue }
                let vp = try VhostPair(pair: p, vhost: vhost[p], tapFD: queueFDs[p])
                vps.append(vp)
                try vp.configure(features: features & vhostFeatures & VhostNetRingFeatures.all, memory: memory, rings: [rx, tx])
                for i in [2 * p, 2 * p + 1] {
                    made.append(try VhostQueue(index: i, pair: vp, interrupt: interrupt, counters: stats[i], name: name, log: log))
                }
            }
            try vps.first { $0.pair == 0 }?.attach()
        } catch {
            for vp in vps { vp.close() }
            throw error
        }
        return (made, vps)
    }

    public func reset() {
        let (hs, vps) = state.withLock { s -> ([VirtioQueueHandler], [VhostPair]) in
            defer {
                s.handlers = []
                s.vhostPairs = []
            }
            return (s.handlers, s.vhostPairs)
        }
        for h in hs { h.quiesce() }
        for vp in vps { vp.close() }
    }

    // MARK: HostedVirtioDevice

    public var queueHandlers: [VirtioQueueHandler] { state.withLock { $0.handlers } }
    /// One thread per queue pair (rx i and tx i, which share TAP queue i), and one for the
    /// control queue: frames both ways and their completions batch on one thread, with
    /// one wake-up where two threads would hand over to each other.
    public var queueHandlerGroups: [[VirtioQueueHandler]] {
        let groups = Dictionary(grouping: queueHandlers) { $0.queueIndex / 2 }
        return groups.keys.sorted().map { k in groups[k]!.sorted { $0.queueIndex < $1.queueIndex } }
    }

    /// Queue pairs in use (the driver's last VQ_PAIRS_SET, 1 after activation).
    public var activePairs: Int { state.withLock { $0.pairsActive } }

    /// Attaches TAP queues 0..<n and detaches the rest; rx threads of newly attached
    /// pairs poll their TAP again. With vhost, the pairs' rings stop before their TAP
    /// queues are detached and start after they are attached. False when vhost refused
    /// to start or stop a pair (logged).
    func setPairs(_ n: Int) -> Bool {
        let vps = state.withLock { $0.vhostPairs }
        var ok = true
        for vp in vps where vp.pair >= n {
            do { try vp.detach() } catch {
                ok = false
                log?.warn("cannot stop a vhost pair", "\(name): cannot stop vhost-net on queue pair \(vp.pair): \(error)")
            }
        }
        for p in 0..<queuePairs {
            do { try control?.setQueueEnabled(pair: p, p < n) } catch {
                log?.warn("cannot attach or detach a TAP queue", "\(name): cannot \(p < n ? "attach" : "detach") TAP queue \(p): \(error)")
            }
        }
        for vp in vps where vp.pair < n {
            do { try vp.attach() } catch {
                ok = false
                log?.warn("cannot start a vhost pair", "\(name): cannot start vhost-net on queue pair \(vp.pair): \(error)")
            }
        }
        let rx = state.withLock { s -> [NetRxQueue] in
            s.pairsActive = n
            return s.handlers.compactMap { $0 as? NetRxQueue }.filter { $0.queueIndex / 2 < n }
        }
        for r in rx { r.watchTap(true) }
        return ok
    }
}

// MARK: rx

/// A chain popped for a frame and not filled yet: its head, writable length and
/// descriptor count, and how many of the pending iovecs are its buffers.
struct RxChain {
    let head: UInt16
    let length: UInt32
    let descriptors: Int
    let iovecCount: Int
}

/// The chains popped but not filled yet, oldest first, and their writable buffers as
/// iovecs in the same order, so the buffers of the first chains are one slice for readv.
/// Kept across frames: a frame takes the first chains; their entries are dropped by
/// moving a start index, and the arrays are compacted once the dropped part is large.
/// Host pointers in the iovecs stay valid while the queue's GuestMemory lives.
struct RxPending {
    var chains: [RxChain] = []
    var chainStart = 0
    var iovs: [iovec] = []
    var iovStart = 0

    var count: Int { chains.count - chainStart }
    var isEmpty: Bool { chainStart == chains.count }

    subscript(i: Int) -> RxChain { chains[chainStart + i] }

    mutating func append(_ chain: DescriptorChain) {
        let before = iovs.count
        chain.appendIovecs(writable: true, to: &iovs)
        chains.append(RxChain(head: chain.head, length: chain.writableLength, descriptors: chain.descriptorCount,
                              iovecCount: iovs.count - before))
    }

    /// Drops the first `n` chains (and their iovecs).
    mutating func removeFirst(_ n: Int) {
        for i in 0..<n { iovStart += chains[chainStart + i].iovecCount }
        chainStart += n
        if chainStart == chains.count {
            chains.removeAll(keepingCapacity: true)
            iovs.removeAll(keepingCapacity: true)
            chainStart = 0
            iovStart = 0
        } else if chainStart >= 256 {
            chains.removeFirst(chainStart)
            iovs.removeFirst(iovStart)
            chainStart = 0
            iovStart = 0
        }
    }

    /// Writes `bytes` `offset` bytes into the writable buffers of the first chain, and
    /// never past them (chains shorter than a virtio-net header are never pending, so
    /// the header's bytes are there).
    func writeFirst(_ bytes: UnsafeRawBufferPointer, offset: Int) {
        guard !isEmpty else { return }
        var skip = offset, done = 0
        var i = iovStart
        let end = iovStart + chains[chainStart].iovecCount
        while done < bytes.count && i < end {
            let v = iovs[i]
            i += 1
            if skip >= v.iov_len { skip -= v.iov_len; continue }
            let n = min(v.iov_len - skip, bytes.count - done)
            (v.iov_base! + skip).copyMemory(from: bytes.baseAddress! + done, byteCount: n)
            done += n
            skip = 0
        }
    }
}

/// One receive queue: TAP -> guest.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone
// (`server`, `pending`, `loggedError`); other threads (the control queue's pairs
// command, teardown) only call watchTap, which changes the epoll set, a kernel object.
public final class NetRxQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    /// The ring, its interrupt sink, broken/stopped state and counters (queue thread only).
    let server: QueueServer
    let fd: Int32
    let mergeable: Bool
    /// With MRG_RXBUF, bytes of buffers gathered before a read (header + largest frame).
    let wanted: Int
    let name: String
    let log: RateLimitedLog?
    /// Holds the TAP fd (for reading) while the guest has buffers: our completion fd.
    let tapWatch: Epoll
    /// Chains popped but not filled yet (kept for the next frame). `receive` moves it
    /// into a local while it runs, so the per-frame work touches no class property.
    var pending = RxPending()
    var loggedError = false

    init(index: Int, queue: SplitQueue, fd: Int32, mergeable: Bool, minFrame: Int, interrupt: any VirtioInterruptSink,
         stats: NetQueueStats, name: String, log: RateLimitedLog?) throws {
        queueIndex = index
        server = QueueServer(index: index, queue: queue, interrupt: interrupt, counters: stats,
                             label: "virtio-net \(name) rx\(index / 2)", stopKind: "rx queue stopped", log: log)
        self.fd = fd
        self.mergeable = mergeable
        wanted = VirtioNetHeader.size + minFrame
        self.name = name
        self.log = log
        tapWatch = try Epoll()
    }

    var queue: SplitQueue { server.queue }
    var stats: NetQueueStats { server.counters }
    /// The guest broke the queue (tests set it to stop a loop).
    var broken: Bool {
        get { server.broken }
        set { server.broken = newValue }
    }

    public var completionFD: Int32 { tapWatch.fd }

    /// Start (true) or stop polling the TAP for frames. Safe from any thread. Stopping
    /// takes the TAP out of the epoll set: with no events asked for, epoll still reports
    /// a TAP in error or hung up, and the thread would wake for it again and again.
    /// (Adding what is there or removing what is not fails harmlessly.)
    func watchTap(_ on: Bool) {
        if on { tapWatch.add(fd) } else { tapWatch.remove(fd) }
    }

    public func kicked() {
        stats.notified()
        guard server.isServing else { return }
        queue.disableNotifications()
        watchTap(true)
        receive()
    }

    public func completionsReady() { receive() }

    public func quiesce() {
        server.quiesced = true
        watchTap(false)
        pending = RxPending()
    }

    /// Pops one usable chain into `pending`; false when the ring is empty (or broken).
    /// Chains that cannot hold the header are returned at once, empty, and counted; a
    /// chain of more buffers than one readv takes breaks the device (a frame is one read,
    /// so it cannot be split over several).
    func popOne(_ pending: inout RxPending) -> Bool {
        while let chain = server.pop() {
            if chain.writableLength < UInt32(VirtioNetHeader.size) || chain.readableCount > 0 {
                stats.drop()
                guard server.stage(chain.head, length: 0) else { return false }
                continue
            }
            guard chain.writableCount <= GuestMemory.maxIovecsPerCall else {
                server.fail("chain at head \(chain.head) has \(chain.writableCount) buffers, more than one read takes (\(GuestMemory.maxIovecsPerCall))")
                return false
            }
            pending.append(chain)
            return true
        }
        return false
    }

    /// How many of the pending chains (the first ones) the next frame may fill, popping
    /// more as needed, and how many iovecs they make: one chain, or with MRG_RXBUF chains
    /// adding up to `wanted` bytes, the largest frame the TAP may hand out. tun cuts a
    /// frame short when the buffers given to readv cannot hold it, and a cut GSO frame is
    /// lost (the guest drops it as truncated and TCP must retransmit ~44 segments), so
    /// fewer bytes are read into only when the guest cannot give more for this frame: it
    /// has handed over its whole ring, or a cap is reached (chains per frame, iovecs per
    /// read). 0 chains only when the ring ran empty first: then the thread waits for the
    /// guest's next rx kick; a Linux guest refills its whole ring once it has taken what
    /// is used.
    func gather(_ pending: inout RxPending) -> (chains: Int, iovecs: Int) {
        if !mergeable {
            return !pending.isEmpty || popOne(&pending) ? (1, pending[0].iovecCount) : (0, 0)
        }
        var total = 0, descriptors = 0, iovecs = 0, use = 0
        while total < wanted {
            if use == pending.count {
                guard use < NetRxQueue.maxChainsPerFrame, popOne(&pending) else { break }
            }
            let c = pending[use]
            if iovecs + c.iovecCount > GuestMemory.maxIovecsPerCall { return (use, iovecs) }
            total += Int(c.length)
            descriptors += c.descriptors
            iovecs += c.iovecCount
            use += 1
        }
        if total >= wanted || use >= NetRxQueue.maxChainsPerFrame || descriptors >= Int(queue.size) { return (use, iovecs) }
        return (0, 0)
    }

    /// Most chains one frame may fill (num_buffers); 64 of Linux's smallest mergeable
    /// buffers (1518 bytes) hold a 64 KiB GSO frame.
    static let maxChainsPerFrame = 64

    /// Reads up to `budget` frames from the TAP into guest buffers.
    func receive() {
        guard server.isServing else {
            // Watched again from another thread (the control queue's pairs command).
            watchTap(false)
            return
        }
        var p = RxPending()
        swap(&p, &pending)
        defer {
            swap(&p, &pending)
            server.publish()
            if broken { watchTap(false) }
        }
        var served = 0
        var sinceSignal = 0
        while served < VirtioNetLimits.budget && !broken {
            let (useCount, iovecCount) = gather(&p)
            if broken { return }
            if useCount == 0 {
                // Out of buffers: sleep on the rx kick, not on the TAP. Buffers that came
                // in meanwhile are taken at once (the ring was empty, so they are new).
                if !server.notificationsOn() { continue }
                watchTap(false)
                return
            }
            let start = p.iovStart
            let n = p.iovs.withUnsafeBufferPointer { readv(fd, $0.baseAddress! + start, Int32(iovecCount)) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { return }  // nothing waiting; epoll wakes us
                if e == EFAULT || e == EINVAL || e == EMSGSIZE {
                    // The frame did not fit the guest's buffers (tun dropped it), or the
                    // buffers were refused: the first chain goes back empty, so a read that
                    // fails again and again still uses up the guest's buffers, never loops.
                    stats.drop()
                    served += 1
                    guard server.stage(p[0].head, length: 0) else { return }
                    p.removeFirst(1)
                    continue
                }
                if !loggedError {
                    loggedError = true
                    log?.warn("read from the TAP failed", "virtio-net \(name) rx\(queueIndex / 2): read from the TAP failed: \(errnoText(e))")
                }
                // Not about this frame (e.g. EBADFD: the TAP is gone): read again only
                // after the next kick, even if buffers came in meanwhile (the TAP could
                // stay readable and fail every read).
                watchTap(false)
                _ = queue.enableNotifications()
                return
            }
            served += 1
            var left = n
            var k = 0
            repeat {
                let len = min(left, Int(p[k].length))
                guard server.stage(p[k].head, length: UInt32(len)) else { return }
                left -= len
                k += 1
            } while left > 0 && k < useCount
            // tun skips num_buffers (it writes 10 header bytes of our 12): fill it in.
            var nb = UInt16(k).littleEndian
            withUnsafeBytes(of: &nb) { p.writeFirst($0, offset: VirtioNetHeader.numBuffersOffset) }
            p.removeFirst(k)
            stats.count(bytes: max(0, n - VirtioNetHeader.size))
            // Each frame is the guest's as soon as it is written: a polling NAPI takes it
            // while the next one is read. Whether to interrupt is asked once per
            // `signalBatch` buffers and when the TAP runs dry (vhost-net's rx batching):
            // a driver that sleeps hears of a burst once, not once per frame.
            sinceSignal += k
            if sinceSignal >= VirtioNetLimits.signalBatch {
                sinceSignal = 0
                server.publish()
            } else {
                server.makeVisible()
            }
        }
    }
}

// MARK: tx

/// The tx path's batching: frames the guest queued together go to the TAP in one
/// io_uring_enter (one IORING_OP_WRITEV per frame) instead of one writev each.
public enum NetTxBatching {
    /// SWIFTLET_NET_TX_URING=off turns it off (plain writev per frame); it is on otherwise,
    /// wherever the kernel gives the queue an io_uring (else writev, silently).
    public static let enabledByEnvironment: Bool =
        getenv("SWIFTLET_NET_TX_URING").map { String(cString: $0) != "off" } ?? true
    /// Most frames, and bytes of frames, in one submission: the guest gets its buffers
    /// back when the whole batch is written, so a batch of large frames stays short.
    public static let maxFrames = 32
    public static let maxBytes = 256 << 10
    /// Fewer frames than this go out with writev each: io_uring_enter costs more than
    /// one writev for a single frame.
    public static let minFrames = 4
}

/// One transmit queue: guest -> TAP.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone.
public final class NetTxQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    /// The ring, its interrupt sink, broken/stopped state and counters (queue thread only).
    let server: QueueServer
    let fd: Int32
    let name: String
    let log: RateLimitedLog?
    /// Written when a wake-up ran out of budget with work left: brings the thread back.
    let again: EventFD
    var loggedError = false
    /// The io_uring frames are batched through; nil: one writev per frame.
    let ring: IOURing?
    /// The ring failed or the TAP refused RWF_NOWAIT: writev from then on. The ring stays
    /// open until the handler goes (after its thread was joined): closing it while the
    /// thread lives makes the kernel interrupt the thread's poll with task_work.
    var ringRefused = false
    /// The batch being gathered: each frame's chain head, length, and its iovecs in `iovs`.
    var batch: [(head: UInt16, length: Int, first: Int, count: Int)] = []
    var batchBytes = 0
    /// The iovecs of the batch (stable memory: the kernel reads them until the batch
    /// completes). Holds one chain of the most buffers one writev takes.
    let iovs: UnsafeMutablePointer<iovec>
    var iovCount = 0
    var scratch: [iovec] = []

    /// `batching`: gather frames into io_uring submissions when the kernel gives this
    /// queue a ring (io_uring_setup refused: one writev per frame).
    init(index: Int, queue: SplitQueue, fd: Int32, interrupt: any VirtioInterruptSink, stats: NetQueueStats,
         name: String, log: RateLimitedLog?, batching: Bool = NetTxBatching.enabledByEnvironment) throws {
        queueIndex = index
        server = QueueServer(index: index, queue: queue, interrupt: interrupt, counters: stats,
                             label: "virtio-net \(name) tx\(index / 2)", stopKind: "tx queue stopped", log: log)
        self.fd = fd
        self.name = name
        self.log = log
        again = try EventFD()
        ring = batching ? try? IOURing(entries: UInt32(NetTxBatching.maxFrames), operations: [clinux_IORING_OP_WRITEV()]) : nil
        iovs = .allocate(capacity: GuestMemory.maxIovecsPerCall)
        batch.reserveCapacity(NetTxBatching.maxFrames)
    }

    deinit { iovs.deallocate() }

    var stats: NetQueueStats { server.counters }

    /// Frames go to the TAP in io_uring batches.
    public var batches: Bool { ring != nil && !ringRefused }

    public var completionFD: Int32 { again.fd }

    public func kicked() {
        stats.notified()
        transmit()
    }

    public func completionsReady() {
        _ = try? again.read()
        transmit()
    }

    public func quiesce() {
        server.quiesced = true
        batch.removeAll()
        iovCount = 0
    }

    func transmit() {
        let end = server.drain(budget: VirtioNetLimits.budget) { chain in
            if batches {
                enqueue(chain)
                return
            }
            send(chain)
            guard server.isServing, server.stage(chain.head, length: 0) else { return }
            // Hand the buffer back at once: the guest frees its skb on completion, and
            // TCP small queues hold its sender until then (a 64 KiB frame's write takes
            // the host's whole TCP receive path), so a batch published only at its end
            // stalls the sender for the batch.
            server.publish()
        }
        flush()
        // More may wait: come back after the used ring is published.
        if end == .budget { try? again.write(1) }
    }

    /// Checks a frame's chain: false when it is dropped (counted) or breaks the device
    /// (a chain of more buffers than one writev takes: one write is one frame).
    func acceptable(_ chain: DescriptorChain) -> Bool {
        guard chain.readableCount <= GuestMemory.maxIovecsPerCall else {
            server.fail("chain at head \(chain.head) has \(chain.readableCount) buffers, more than one write takes (\(GuestMemory.maxIovecsPerCall))")
            return false
        }
        let len = Int(chain.readableLength)
        guard len >= VirtioNetHeader.size, len <= VirtioNetHeader.size + VirtioNetLimits.maxGSOFrame else {
            stats.drop()
            return false
        }
        return true
    }

    /// Writes one frame to the TAP, or drops it (counted).
    func send(_ chain: DescriptorChain) {
        guard acceptable(chain) else { return }
        let iovs = chain.readableIovecs()
        var n: Int
        repeat {
            n = iovs.withUnsafeBufferPointer { writev(fd, $0.baseAddress, Int32($0.count)) }
        } while n < 0 && errno == EINTR
        finished(length: Int(chain.readableLength), result: n < 0 ? -Int(errno) : n)
    }

    /// Counts a frame's write (`result`: bytes or -errno); a failed write drops it.
    func finished(length: Int, result: Int) {
        if result < 0 {
            // EINVAL: a header or frame the kernel refused; EAGAIN/EIO: the TAP is full or down.
            let e = Int32(-result)
            stats.drop()
            if !loggedError && e != EAGAIN && e != EINVAL {
                loggedError = true
                log?.warn("write to the TAP failed", "virtio-net \(name) tx\(queueIndex / 2): write to the TAP failed: \(errnoText(e))")
            }
            return
        }
        stats.count(bytes: length - VirtioNetHeader.size)
    }

    /// Adds a frame to the batch (a refused chain is handed back at once, empty); writes
    /// the batch when it is full.
    func enqueue(_ chain: DescriptorChain) {
        guard acceptable(chain) else {
            if server.isServing { server.stage(chain.head, length: 0) }
            return
        }
        if iovCount + chain.readableCount > GuestMemory.maxIovecsPerCall { flush() }
        scratch.removeAll(keepingCapacity: true)
        chain.appendIovecs(writable: false, to: &scratch)
        for (i, v) in scratch.enumerated() { iovs[iovCount + i] = v }
        let length = Int(chain.readableLength)
        batch.append((chain.head, length, iovCount, scratch.count))
        iovCount += scratch.count
        batchBytes += length
        if batch.count >= NetTxBatching.maxFrames || batchBytes >= NetTxBatching.maxBytes { flush() }
    }

    /// Writes the batch (one io_uring_enter; writev each when it is small), hands its
    /// buffers back and publishes. A failing ring is left unused (one warning): writev
    /// from then on.
    func flush() {
        defer {
            batch.removeAll(keepingCapacity: true)
            iovCount = 0
            batchBytes = 0
        }
        guard !batch.isEmpty, server.isServing else { return }
        var written = [Bool](repeating: false, count: batch.count)
        if let ring, !ringRefused, batch.count >= NetTxBatching.minFrames {
            for (k, f) in batch.enumerated() {
                ring.prepareVectored(op: clinux_IORING_OP_WRITEV(), fd: fd, iovecs: iovs + f.first, count: f.count, userData: UInt64(k))
            }
            do { try ring.submitAndWait() } catch {
                log?.warn("io_uring failed", "virtio-net \(name) tx\(queueIndex / 2): \(error): writing frames with writev")
                ringRefused = true
            }
            ring.reap { k, res in
                guard k < UInt64(written.count), !written[Int(k)] else { return }
                // RWF_NOWAIT refused (a kernel whose tun lacks it): the frame goes out
                // with writev below, and so does every later one (no ring).
                if res == -EOPNOTSUPP {
                    ringRefused = true
                    return
                }
                written[Int(k)] = true
                finished(length: batch[Int(k)].length, result: Int(res))
            }
        }
        for (k, f) in batch.enumerated() where !written[k] {
            var n: Int
            repeat { n = writev(fd, iovs + f.first, Int32(f.count)) } while n < 0 && errno == EINTR
            finished(length: f.length, result: n < 0 ? -Int(errno) : n)
        }
        for f in batch { guard server.stage(f.head, length: 0) else { return } }
        server.publish()
    }
}

// MARK: control

/// The control queue: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, receive-mode commands (accepted),
/// everything else VIRTIO_NET_ERR.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone.
public final class NetCtrlQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    /// The ring, its interrupt sink, broken/stopped state and counters (queue thread only).
    let server: QueueServer
    weak var device: VirtioNet?
    let features: UInt64

    init(index: Int, queue: SplitQueue, device: VirtioNet, features: UInt64, interrupt: any VirtioInterruptSink,
         stats: NetQueueStats, log: RateLimitedLog?) {
        queueIndex = index
        server = QueueServer(index: index, queue: queue, interrupt: interrupt, counters: stats,
                             label: "virtio-net ctrl", stopKind: "control queue stopped", log: log)
        self.device = device
        self.features = features
    }

    var stats: NetQueueStats { server.counters }

    public var completionFD: Int32 { -1 }
    public func completionsReady() {}
    public func quiesce() { server.quiesced = true }

    public func kicked() {
        stats.notified()
        server.drain { chain in
            var used: UInt32 = 0
            if chain.writableLength == 0 {
                stats.drop()  // nowhere to put the answer
            } else {
                let ack = command(chain)
                _ = chain.writeWritable([ack], offset: UInt64(chain.writableLength - 1))
                used = 1
                if ack == VirtioNetCtrl.ok { stats.count(bytes: Int(chain.readableLength)) } else { stats.drop() }
            }
            server.stage(chain.head, length: used)
        }
    }

    /// The answer to one command (never trusts a length or value).
    func command(_ chain: DescriptorChain) -> UInt8 {
        var hdr: [UInt8] = [0, 0]
        guard hdr.withUnsafeMutableBytes({ chain.readReadable(into: $0) }) == 2 else { return VirtioNetCtrl.err }
        let dataLength = Int(chain.readableLength) - 2
        switch (hdr[0], hdr[1]) {
        case (VirtioNetCtrl.classMQ, VirtioNetCtrl.mqVQPairsSet):
            guard features & VirtioNetFeature.mq != 0, dataLength >= 2, let device else { return VirtioNetCtrl.err }
            var v: UInt16 = 0
            _ = withUnsafeMutableBytes(of: &v) { chain.readReadable(into: $0, offset: 2) }
            let pairs = Int(UInt16(littleEndian: v))
            guard pairs >= 1, pairs <= device.queuePairs else { return VirtioNetCtrl.err }
            return device.setPairs(pairs) ? VirtioNetCtrl.ok : VirtioNetCtrl.err
        case (VirtioNetCtrl.classRx, let cmd) where VirtioNetCtrl.rxCommands.contains(cmd):
            guard features & VirtioNetFeature.ctrlRx != 0, dataLength >= 1 else { return VirtioNetCtrl.err }
            return VirtioNetCtrl.ok  // the TAP delivers everything; the guest's stack filters
        case (VirtioNetCtrl.classMAC, VirtioNetCtrl.macTableSet):
            guard features & VirtioNetFeature.ctrlRx != 0, dataLength >= 8 else { return VirtioNetCtrl.err }
            return VirtioNetCtrl.ok
        default:
            return VirtioNetCtrl.err
        }
    }
}

/// NetTapControl over TAP queue file descriptors (ioctl TUNSETOFFLOAD / TUNSETQUEUE).
public final class TapQueueControl: NetTapControl {
    public let fds: [Int32]
    /// Whatever owns `fds`, kept alive (and so the descriptors open) as long as the device.
    let owner: (any AnyObject & Sendable)?
    public init(fds: [Int32], owner: (any AnyObject & Sendable)? = nil) {
        self.fds = fds
        self.owner = owner
    }

    public func setOffload(_ flags: UInt32) throws {
        guard let fd = fds.first, clinux_ioctl_int(fd, clinux_TUNSETOFFLOAD(), UInt(flags)) == 0 else {
            throw NetTapError(call: "TUNSETOFFLOAD", errno: errno)
        }
    }

    public func setQueueEnabled(pair: Int, _ enabled: Bool) throws {
        guard fds.count > 1, pair < fds.count else { return }  // a single-queue TAP has nothing to steer
        var ifr = [UInt8](repeating: 0, count: 40)  // struct ifreq: name[16], then flags
        let flags = Int16(truncatingIfNeeded: enabled ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE)
        withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
        let r = ifr.withUnsafeMutableBytes { clinux_ioctl_ptr(fds[pair], clinux_TUNSETQUEUE(), $0.baseAddress) }
        if r != 0 {
            let e = errno
            // Attaching an attached queue or detaching a detached one: EINVAL, harmless.
            if e == EINVAL { return }
            throw NetTapError(call: "TUNSETQUEUE", errno: e)
        }
    }
}

public struct NetTapError: Error, CustomStringConvertible {
    public let call: String
    public let errno: Int32
    public var description: String { "\(call): \(errnoText(errno))" }
}
