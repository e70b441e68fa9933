// virtio-net with vhost-net: the host kernel serves a queue pair's rx and tx rings; swiftlet
// keeps the control queue, the pair's thread and the interrupt.
//
// Per queue pair and activation, a `VhostPair` holds the pair's /dev/vhost-net instance
// (VhostNetBackend, one per pair for the device's life), its TAP queue descriptor and, per
// ring (0 rx, 1 tx), three eventfds:
//   - kick: the queue's ioeventfd on QueueNotify (the handler's `ownKick`): the guest's
//     notify goes to the kernel and never reaches swiftlet;
//   - call: written by the kernel when the driver should be interrupted. The pair's thread
//     ("net0-q0+1", never a vCPU) polls it through the handler's completionFD, reads it
//     and then sets the InterruptStatus used-buffer bit and raises the line (the
//     transport's signalUsedBuffer): virtio-mmio has one InterruptStatus register, so
//     the bit must be set by swiftlet before the guest sees the interrupt, which an irqfd
//     straight from the kernel would not do. Reading before raising is what keeps an
//     interrupt from being lost: a call the kernel makes after the read leaves the
//     eventfd readable and brings another round, whereas one made between raising and a
//     later read would be taken with nothing raised for it;
//   - err: written by the kernel when the guest broke a ring: DEVICE_NEEDS_RESET and the
//     pair stops.
//
// A pair is configured when the driver sets DRIVER_OK (features, memory table, both rings,
// the eventfds) and attached (VHOST_NET_SET_BACKEND with its TAP queue) only while the
// driver uses it: pair 0 from activation, the others when the control queue's
// VQ_PAIRS_SET enables them. Detaching reads each ring's next available index
// (VHOST_GET_VRING_BASE), which the next attach gives back (VHOST_SET_VRING_BASE). A reset
// (or the machine stopping) detaches and unbinds every eventfd before the rings are
// forgotten, so the kernel touches guest memory no more.
import Glibc
import GuestMemory
import OS
import Virtio
import Vhost
import Synchronization

/// The virtio features vhost-net implements itself (the ring and header layout). The guest
/// is offered one of them only when the kernel has it; offloads are the TAP's, and MAC,
/// MTU, status, control queue and MQ are swiftlet's.
public enum VhostNetRingFeatures {
    public static let all: UInt64 = VirtioNetFeature.mrgRxbuf | VirtioFeature.indirectDesc | VirtioFeature.eventIdx
        | VirtioFeature.version1
}

/// One queue pair served by vhost-net, for one activation.
final class VhostPair: Sendable {
    let pair: Int
    let vhost: any VhostNetBackend
    let tapFD: Int32
    /// Per ring (0 rx, 1 tx).
    let kicks: [EventFD]
    let calls: [EventFD]
    let errs: [EventFD]
    struct State {
        var attached = false
        /// Next available index per ring, for the next attach.
        var bases: [UInt32] = [0, 0]
        /// Stopped for good (reset, machine stop, a ring error).
        var closed = false
    }
    let state = Mutex(State())

    init(pair: Int, vhost: any VhostNetBackend, tapFD: Int32) throws {
        self.pair = pair
        self.vhost = vhost
        self.tapFD = tapFD
        kicks = [try EventFD(), try EventFD()]
        calls = [try EventFD(), try EventFD()]
        errs = [try EventFD(), try EventFD()]
    }

    /// Gives the kernel the features, guest RAM and both rings (not attached yet).
    func configure(features: UInt64, memory: GuestMemory, rings: [SplitQueue]) throws {
        try vhost.setFeatures(features)
        try vhost.setMemTable(VhostMemoryRegion.of(memory))
        for (r, q) in rings.enumerated() {
            // Validated when the queue was made: each area lies inside one RAM region.
            let (desc, avail, used) = try SplitQueue.validate(q.layout, maxSize: q.size, memory: memory)
            try vhost.setVringNum(r, UInt32(q.size))
            try vhost.setVringBase(r, 0)
            try vhost.setVringAddr(r, desc: UInt64(UInt(bitPattern: desc)), avail: UInt64(UInt(bitPattern: avail)),
                                   used: UInt64(UInt(bitPattern: used)))
            try vhost.setVringKick(r, kicks[r].fd)
            try vhost.setVringCall(r, calls[r].fd)
            try vhost.setVringErr(r, errs[r].fd)
        }
    }

    /// Attaches the TAP queue to both rings (from where they stopped) and has the kernel
    /// look at them. Does nothing if attached or closed.
    func attach() throws {
        try state.withLock { s in
            guard !s.attached, !s.closed else { return }
            for r in 0..<2 { try vhost.setVringBase(r, s.bases[r]) }
            do {
                try vhost.setBackend(0, tapFD)
                try vhost.setBackend(1, tapFD)
            } catch {
                try? vhost.setBackend(0, -1)
                throw error
            }
            s.attached = true
        }
        // Chains the driver offered while detached brought kicks the kernel may have
        // ignored: one more look at each ring.
        for k in kicks { try? k.write(1) }
    }

    /// Detaches the TAP queue from both rings and keeps where they stopped. Does nothing
    /// if not attached.
    func detach() throws {
        try state.withLock { s in
            guard s.attached else { return }
            s.attached = false
            var failure: Error? = nil
            for r in 0..<2 {
                do { try vhost.setBackend(r, -1) } catch { failure = failure ?? error }
            }
            for r in 0..<2 {
                do { s.bases[r] = try vhost.vringBase(r) } catch { failure = failure ?? error }
            }
            if let failure { throw failure }
        }
    }

    var isAttached: Bool { state.withLock { $0.attached } }

    /// Stops the pair for good: detaches and unbinds every eventfd. Idempotent; errors are
    /// ignored (the instance is reconfigured from scratch at the next activation).
    func close() {
        state.withLock { s in
            guard !s.closed else { return }
            s.closed = true
            if s.attached {
                for r in 0..<2 { try? vhost.setBackend(r, -1) }
                s.attached = false
            }
            for r in 0..<2 {
                try? vhost.setVringKick(r, -1)
                try? vhost.setVringCall(r, -1)
                try? vhost.setVringErr(r, -1)
            }
        }
    }
}

/// One ring of a vhost-served pair as its queue thread sees it: no kicks to serve (the
/// kernel takes them), only the kernel's call and err eventfds to relay.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone
// (`loggedError`); everything else is immutable or behind VhostPair's lock.
public final class VhostNetQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    let ring: Int
    let pair: VhostPair
    let interrupt: any VirtioInterruptSink
    let counters: QueueCounters
    let label: String
    let log: RateLimitedLog?
    /// Holds this ring's call and err eventfds: the completion fd.
    let watch: Epoll

    init(index: Int, pair: VhostPair, interrupt: any VirtioInterruptSink, counters: QueueCounters, name: String,
         log: RateLimitedLog?) throws {
        queueIndex = index
        ring = index % 2
        self.pair = pair
        self.interrupt = interrupt
        self.counters = counters
        label = "virtio-net \(name) \(index % 2 == 0 ? "rx" : "tx")\(index / 2)"
        self.log = log
        watch = try Epoll()
        for fd in [pair.calls[ring].fd, pair.errs[ring].fd] {
            let e = watch.add(fd)
            if e != 0 { throw SystemError(call: "epoll_ctl", errno: e) }
        }
    }

    public var ownKick: EventFD? { pair.kicks[ring] }
    public var completionFD: Int32 { watch.fd }

    /// The kernel serves the ring; nothing to do on the thread's first round.
    public func kicked() { completionsReady() }

    public func completionsReady() {
        if let n = try? pair.errs[ring].read(), n > 0 {
            log?.warn("vhost ring error", "\(label): vhost-net reported a broken ring: device needs reset")
            pair.close()
            interrupt.markNeedsReset()
        }
        // Read first, then raise (see the file's header).
        if let n = try? pair.calls[ring].read(), n > 0 {
            counters.interrupted()
            interrupt.signalUsedBuffer()
        }
    }

    public func quiesce() { pair.close() }
}
