// virtio-vsock (virtio 1.2 §5.10, device type 19) served by the host kernel's vhost-vsock.
//
// Three queues: rx (0), tx (1) and event (2); the config space is the guest's context ID
// (le64 guest_cid). The host kernel serves rx and tx (VhostRings.swift: the kick is the
// queue's ioeventfd, the kernel's calls are relayed as interrupts by the device's thread
// "vsock0-q0+1+2"), so host sockets reach the guest at its CID with no data through
// swiftlet. The event queue stays here: the device only holds the driver's buffers there,
// since the one event (transport reset) is sent only on migration, which swiftlet does
// not do.
//
// At DRIVER_OK the activating vCPU gives the kernel the negotiated features, the guest
// RAM and both rings, then VHOST_VSOCK_SET_RUNNING 1. A reset (or the machine stopping)
// quiesces the thread's handlers, which close the rings: SET_RUNNING 0, GET_VRING_BASE of
// each ring (the kernel stops them), then every eventfd unbound, so the kernel touches
// guest memory no more; the next DRIVER_OK sets everything up again from base 0. A ring
// error from the kernel (the guest broke a ring) closes the rings and sets
// DEVICE_NEEDS_RESET.
import Glibc
import GuestMemory
import OS
import Virtio
import Vhost

public enum VirtioVsockLimits {
    /// Size of each queue offered to the driver (what QEMU's vhost-vsock-device offers).
    public static let queueSize: UInt16 = 128
    /// The rings and features the device may offer: the ring features every vhost device
    /// has, VERSION_1 and SEQPACKET, each only when the kernel has it.
    public static let features: UInt64 = VirtioFeature.version1 | VirtioFeature.indirectDesc | VirtioFeature.eventIdx
        | VsockFeature.seqpacket
    /// Context IDs a guest may have: 0-2 are the hypervisor, reserved and the host;
    /// 0xFFFFFFFF is VMADDR_CID_ANY (the kernel also takes CIDs above 32 bits; swiftlet
    /// keeps to the 32-bit ones every guest can name).
    public static let cids: ClosedRange<UInt64> = 3...0xFFFF_FFFE
}

public final class VirtioVsock: HostedVirtioDevice, VirtioStaticConfig {
    /// Used in log lines and thread names ("vsock0").
    public let name: String
    public let cid: UInt64
    let vhost: any VhostVsockBackend
    /// What the vhost-vsock instance offers (VHOST_GET_FEATURES).
    let vhostFeatures: UInt64
    let log: RateLimitedLog?
    public let config: [UInt8]
    /// Counters of rx, tx and event (rx and tx: the interrupts the kernel asked for;
    /// event: the driver's notifications); they outlive resets.
    public let stats = [QueueCounters(), QueueCounters(), QueueCounters()]
    struct State {
        var handlers: [VirtioQueueHandler] = []
        var rings: VsockRings? = nil
    }
    let state = Locked(State())

    /// `vhost`: the device's vhost-vsock instance, owned by this process with `cid` set
    /// (VHOST_SET_OWNER, VHOST_VSOCK_SET_GUEST_CID), and what it offers.
    public init(cid: UInt64, vhost: any VhostVsockBackend, vhostFeatures: UInt64, name: String = "vsock",
                log: RateLimitedLog? = nil) {
        self.cid = cid
        self.vhost = vhost
        self.vhostFeatures = vhostFeatures
        self.name = name
        self.log = log
        var w = ByteWriter(size: 8)
        w.set(cid, at: 0)
        config = w.bytes
    }

    // MARK: VirtioDevice

    public var deviceType: UInt32 { VirtioDeviceType.vsock }
    public var queueMaxSizes: [UInt16] { Array(repeating: VirtioVsockLimits.queueSize, count: 3) }
    public var deviceFeatures: UInt64 { vhostFeatures & VirtioVsockLimits.features }

    /// guest_cid is read-only.
    public func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {}

    public func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64,
                         interrupt: any VirtioInterruptSink) throws {
        reset()
        guard queues.count == 3, let rx = queues[0], let tx = queues[1] else {
            throw VsockError("\(name): the driver started the device without its rx and tx queues")
        }
        guard features & VirtioFeature.version1 != 0 else {
            throw VsockError("\(name): the driver did not accept VIRTIO_F_VERSION_1")
        }
        let rings = try VsockRings(vhost: vhost)
        var made: [VirtioQueueHandler] = []
        do {
            try rings.start(features: features & deviceFeatures, memory: memory, rx: rx, tx: tx)
            for (i, what) in [(0, "rx"), (1, "tx")] {
                made.append(try VhostQueue(index: i, ring: i, owner: rings, interrupt: interrupt, counters: stats[i],
                                           label: "virtio-vsock \(name) \(what)", kernelSide: "vhost-vsock", log: log))
            }
        } catch {
            rings.close()
            throw error
        }
        if let ev = queues[2] { made.append(VsockEventQueue(queue: ev, counters: stats[2])) }
        state.withLock {
            $0.handlers = made
            $0.rings = rings
        }
    }

    public func reset() {
        let (hs, rings) = state.withLock { s -> ([VirtioQueueHandler], VsockRings?) in
            defer {
                s.handlers = []
                s.rings = nil
            }
            return (s.handlers, s.rings)
        }
        for h in hs { h.quiesce() }
        rings?.close()
    }

    /// The kernel runs the rings (between DRIVER_OK and a reset or a ring error).
    public var isRunning: Bool { state.withLock { $0.rings?.isRunning ?? false } }

    // MARK: HostedVirtioDevice

    public var queueHandlers: [VirtioQueueHandler] { state.withLock { $0.handlers } }
    /// One thread for the three queues: it only relays the kernel's calls.
    public var queueHandlerGroups: [[VirtioQueueHandler]] {
        let hs = queueHandlers
        return hs.isEmpty ? [] : [hs]
    }
}

/// An activation the device refuses (the transport marks it NEEDS_RESET).
public struct VsockError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

/// The rx and tx rings of one activation, served by vhost-vsock.
final class VsockRings: VhostRingOwner {
    let vhost: any VhostVsockBackend
    let rings: VhostRings
    struct State {
        var running = false
        var closed = false
    }
    let state = Locked(State())

    init(vhost: any VhostVsockBackend) throws {
        self.vhost = vhost
        rings = try VhostRings(vhost: vhost, count: 2)
    }

    /// Gives the kernel the features, guest RAM and both rings, then starts it.
    func start(features: UInt64, memory: GuestMemory, rx: SplitQueue, tx: SplitQueue) throws {
        try rings.configure(features: features, memory: memory, rings: [rx, tx])
        try state.withLock { s in
            guard !s.closed else { return }
            try vhost.setRunning(true)
            s.running = true
        }
    }

    var isRunning: Bool { state.withLock { $0.running } }

    /// Stops the kernel (SET_RUNNING 0, then GET_VRING_BASE of each ring) and unbinds the
    /// eventfds. Idempotent; errors are ignored (the next activation starts from scratch).
    func close() {
        state.withLock { s in
            guard !s.closed else { return }
            s.closed = true
            if s.running {
                try? vhost.setRunning(false)
                s.running = false
            }
            for r in 0..<2 { _ = try? vhost.vringBase(r) }
            rings.unbind()
        }
    }
}

/// The event queue: the driver's buffers wait there; the device sends no event.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone.
final class VsockEventQueue: VirtioQueueHandler, @unchecked Sendable {
    var queueIndex: Int { 2 }
    var completionFD: Int32 { -1 }
    let queue: SplitQueue
    let counters: QueueCounters

    init(queue: SplitQueue, counters: QueueCounters) {
        self.queue = queue
        self.counters = counters
    }

    func kicked() { counters.notified() }
    func completionsReady() {}
    func quiesce() {}
}
