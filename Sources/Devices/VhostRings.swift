// Rings served by a host kernel vhost device (vhost-net, vhost-vsock): their eventfds,
// their setup, and the handler that relays the kernel's interrupts on a queue thread.
//
// Per ring, three eventfds:
//   - kick: the queue's ioeventfd on QueueNotify (the handler's `ownKick`): the guest's
//     notify goes to the kernel and never reaches swiftlet;
//   - call: written by the kernel when the driver should be interrupted. The device's
//     queue thread (never a vCPU) polls it through the handler's completionFD, reads it
//     and then sets the InterruptStatus used-buffer bit and raises the line (the
//     transport's signalUsedBuffer): virtio-mmio has one InterruptStatus register, so
//     the bit must be set by swiftlet before the guest sees the interrupt, which an irqfd
//     straight from the kernel would not do. Reading before raising is what keeps an
//     interrupt from being lost: a call the kernel makes after the read leaves the
//     eventfd readable and brings another round, whereas one made between raising and a
//     later read would be taken with nothing raised for it;
//   - err: written by the kernel when the guest broke a ring: DEVICE_NEEDS_RESET and the
//     owner stops its rings.
import Glibc
import GuestMemory
import OS
import Virtio
import Vhost

/// The eventfds of `count` rings of one vhost instance (ring r of the instance is the
/// r-th ring given to `configure`), made for one activation.
final class VhostRings: Sendable {
    let vhost: any VhostBackend
    let kicks: [EventFD]
    let calls: [EventFD]
    let errs: [EventFD]

    init(vhost: any VhostBackend, count: Int) throws {
        self.vhost = vhost
        kicks = try (0..<count).map { _ in try EventFD() }
        calls = try (0..<count).map { _ in try EventFD() }
        errs = try (0..<count).map { _ in try EventFD() }
    }

    var count: Int { kicks.count }

    /// Gives the kernel the features, guest RAM and the rings (from base 0) with their
    /// eventfds; nothing runs yet (a vhost-net backend, vhost-vsock's SET_RUNNING).
    func configure(features: UInt64, memory: GuestMemory, rings: [SplitQueue]) throws {
        precondition(rings.count == count)
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

    /// Unbinds every ring's eventfds; errors are ignored (the instance is configured
    /// from scratch at the next activation).
    func unbind() {
        for r in 0..<count {
            try? vhost.setVringKick(r, -1)
            try? vhost.setVringCall(r, -1)
            try? vhost.setVringErr(r, -1)
        }
    }
}

/// What owns vhost rings: stops them for good on a ring error or a quiesce.
protocol VhostRingOwner: AnyObject, Sendable {
    var rings: VhostRings { get }
    /// Stops the kernel's work on the rings and unbinds their eventfds. Idempotent.
    func close()
}

/// One vhost-served ring as its queue thread sees it: no kicks to serve (the kernel takes
/// them), only the kernel's call and err eventfds to relay.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone;
// everything else is immutable or behind the owner's lock.
public final class VhostQueue: VirtioQueueHandler, @unchecked Sendable {
    public let queueIndex: Int
    let ring: Int
    let owner: any VhostRingOwner
    let interrupt: any VirtioInterruptSink
    let counters: QueueCounters
    let label: String
    /// Who reported the broken ring, in the warning ("vhost-net").
    let kernelSide: String
    let log: RateLimitedLog?
    /// Holds this ring's call and err eventfds: the completion fd.
    let watch: Epoll

    init(index: Int, ring: Int, owner: any VhostRingOwner, interrupt: any VirtioInterruptSink, counters: QueueCounters,
         label: String, kernelSide: String, log: RateLimitedLog?) throws {
        queueIndex = index
        self.ring = ring
        self.owner = owner
        self.interrupt = interrupt
        self.counters = counters
        self.label = label
        self.kernelSide = kernelSide
        self.log = log
        watch = try Epoll()
        for fd in [owner.rings.calls[ring].fd, owner.rings.errs[ring].fd] {
            let e = watch.add(fd)
            if e != 0 { throw SystemError(call: "epoll_ctl", errno: e) }
        }
    }

    public var ownKick: EventFD? { owner.rings.kicks[ring] }
    public var completionFD: Int32 { watch.fd }

    /// The kernel serves the ring; nothing to do on the thread's first round.
    public func kicked() { completionsReady() }

    public func completionsReady() {
        if let n = try? owner.rings.errs[ring].read(), n > 0 {
            log?.warn("vhost ring error", "\(label): \(kernelSide) reported a broken ring: device needs reset")
            owner.close()
            interrupt.markNeedsReset()
        }
        // Read first, then raise (see the file's header).
        if let n = try? owner.rings.calls[ring].read(), n > 0 {
            counters.interrupted()
            interrupt.signalUsedBuffer()
        }
    }

    public func quiesce() { owner.close() }
}
