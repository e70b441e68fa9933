// virtio-net with vhost-net: the host kernel serves a queue pair's rx and tx rings; swiftlet
// keeps the control queue, the pair's thread and the interrupt.
//
// Per queue pair and activation, a `VhostPair` holds the pair's /dev/vhost-net instance
// (VhostNetBackend, one per pair for the device's life), its TAP queue descriptor and the
// kick, call and err eventfds of its two rings (0 rx, 1 tx: `VhostRings`, whose file
// says how the pair's thread "net0-q0+1" relays the kernel's calls as interrupts).
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

/// The virtio features vhost-net implements itself (the ring and header layout). The guest
/// is offered one of them only when the kernel has it; offloads are the TAP's, and MAC,
/// MTU, status, control queue and MQ are swiftlet's.
public enum VhostNetRingFeatures {
    public static let all: UInt64 = VirtioNetFeature.mrgRxbuf | VirtioFeature.indirectDesc | VirtioFeature.eventIdx
        | VirtioFeature.version1
}

/// One queue pair served by vhost-net, for one activation.
final class VhostPair: VhostRingOwner {
    let pair: Int
    let vhost: any VhostNetBackend
    let tapFD: Int32
    /// Rings 0 rx, 1 tx.
    let rings: VhostRings
    struct State {
        var attached = false
        /// Next available index per ring, for the next attach.
        var bases: [UInt32] = [0, 0]
        /// Stopped for good (reset, machine stop, a ring error).
        var closed = false
    }
    let state = Locked(State())

    init(pair: Int, vhost: any VhostNetBackend, tapFD: Int32) throws {
        self.pair = pair
        self.vhost = vhost
        self.tapFD = tapFD
        rings = try VhostRings(vhost: vhost, count: 2)
    }

    /// Gives the kernel the features, guest RAM and both rings (not attached yet).
    func configure(features: UInt64, memory: GuestMemory, rings queues: [SplitQueue]) throws {
        try rings.configure(features: features, memory: memory, rings: queues)
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
        for k in rings.kicks { try? k.write(1) }
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
            rings.unbind()
        }
    }
}

extension VhostQueue {
    /// Ring `index % 2` of `pair`, virtqueue `index` of a virtio-net device called `name`.
    convenience init(index: Int, pair: VhostPair, interrupt: any VirtioInterruptSink, counters: QueueCounters,
                     name: String, log: RateLimitedLog?) throws {
        try self.init(index: index, ring: index % 2, owner: pair, interrupt: interrupt, counters: counters,
                      label: "virtio-net \(name) \(index % 2 == 0 ? "rx" : "tx")\(index / 2)", kernelSide: "vhost-net",
                      log: log)
    }
}
