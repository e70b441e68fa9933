// The contract between a virtio device model (Sources/Devices) and the host that runs it
// (Sources/VMM/VirtioHost.swift). A device declares, through `VirtioDevice`, its type,
// features, config space and queues (`queueMaxSizes`), and through `HostedVirtioDevice`
// the handlers of the queues the driver activated and how they group onto threads. The
// host owns the threads and eventfds: per group of active queues (`queueHandlerGroups`:
// each queue alone by default; virtio-net groups each rx queue with its tx queue) it
// runs one thread that polls each queue's kick eventfd (an ioeventfd on QueueNotify), a
// stop eventfd and each handler's completion fd, and calls the handlers:
//
//     handler.kicked()               once at start, then on every kick
//     handler.completionsReady()     when completionFD is readable
//     handler.quiesce()              on stop, before the thread ends
//
// All three are called on that one thread only. A handler serves its queue through a
// `QueueServer` (QueueServer.swift).
//
// A handler whose queue someone else serves (virtio-net with vhost: the host kernel)
// gives its own kick eventfd (`ownKick`): the host registers that one as the queue's
// ioeventfd and its thread does not poll it, so the driver's notify goes to whoever the
// handler handed the eventfd to; the thread then only polls the handler's completionFD.
import OS

/// One active queue of a device (or, for a device that serves several queues as one, one
/// of them). Made on the thread that activates the device, then handed to its queue
/// thread, which alone calls the three methods below while it runs (a reset may call
/// quiesce again once that thread has been joined).
public protocol VirtioQueueHandler: AnyObject, Sendable {
    /// The queue index this handler serves.
    var queueIndex: Int { get }
    /// A file descriptor that becomes readable when backend I/O completes, or -1.
    var completionFD: Int32 { get }
    /// The driver notified the queue (or the thread just started): serve what is available.
    func kicked()
    /// completionFD became readable: retire finished requests, then serve more.
    func completionsReady()
    /// Stop: wait for every request in flight, retire it, and stop any helper threads.
    /// After this returns the handler never touches guest memory again. Idempotent.
    func quiesce()
    /// The queue's kick eventfd when the handler brings its own (see above), else nil:
    /// the host makes one and its thread serves the kicks.
    var ownKick: EventFD? { get }
}

extension VirtioQueueHandler {
    public var ownKick: EventFD? { nil }
}

/// A virtio device whose queues are served by host threads.
public protocol HostedVirtioDevice: VirtioDevice {
    /// Handlers for the queues activated by the last activate() (empty after reset()).
    var queueHandlers: [VirtioQueueHandler] { get }
    /// `queueHandlers` split into the groups that share one host thread.
    var queueHandlerGroups: [[VirtioQueueHandler]] { get }
}

extension HostedVirtioDevice {
    /// One thread per queue.
    public var queueHandlerGroups: [[VirtioQueueHandler]] { queueHandlers.map { [$0] } }
}
