// What every virtqueue handler does the same way: take chains from the available ring,
// hand back used entries, interrupt the driver when it asked to be told, stop for good
// when the guest breaks the ring (NEEDS_RESET), and count.
//
// A handler owns one `QueueServer` and runs on its queue's thread only (VirtioQueueHandler),
// so the server needs no lock. Its usual loop is `drain`:
//
//     let end = server.drain(budget: 256) { chain in
//         ... serve the chain, then server.stage(chain.head, length: n) ...
//     }
//
// which turns the driver's notifications off, serves chains until the ring is empty (or a
// budget or the handler says stop), publishes the used ring and interrupts if the driver
// wants it, then turns notifications back on and checks the ring once more: chains the
// driver added between the last pop and that moment would otherwise wait for a kick that
// never comes (the EVENT_IDX race; without EVENT_IDX the same holds for the NO_NOTIFY flag).
import Synchronization

/// Counters of one queue. The device keeps them across resets (a queue's server and
/// handler are made anew at each activation); any thread may read them.
public final class QueueCounters: Sendable {
    let notifyCount = Atomic<UInt64>(0)
    let interruptCount = Atomic<UInt64>(0)
    let servedCount = Atomic<UInt64>(0)
    let byteCount = Atomic<UInt64>(0)
    let dropCount = Atomic<UInt64>(0)

    public init() {}

    /// Queue notifications (kicks) from the driver that woke the queue's thread.
    public var notifications: UInt64 { notifyCount.load(ordering: .relaxed) }
    /// Interrupts this queue asked for (used buffers the driver wanted to hear of).
    public var interrupts: UInt64 { interruptCount.load(ordering: .relaxed) }
    /// Requests (or frames) served: what one is, is the device's to say.
    public var served: UInt64 { servedCount.load(ordering: .relaxed) }
    /// Payload bytes of what was served.
    public var bytes: UInt64 { byteCount.load(ordering: .relaxed) }
    /// Chains or frames dropped: hostile chains, frames the backend refused, bad commands.
    public var drops: UInt64 { dropCount.load(ordering: .relaxed) }

    public func notified() { notifyCount.wrappingAdd(1, ordering: .relaxed) }
    public func interrupted() { interruptCount.wrappingAdd(1, ordering: .relaxed) }
    /// One more served, with `n` payload bytes.
    public func count(bytes n: Int = 0) {
        servedCount.wrappingAdd(1, ordering: .relaxed)
        if n > 0 { byteCount.wrappingAdd(UInt64(n), ordering: .relaxed) }
    }
    public func drop() { dropCount.wrappingAdd(1, ordering: .relaxed) }
}

/// One queue as its handler serves it: the ring, the interrupt sink, whether the guest
/// broke it, whether it was stopped, and its counters. Used on the queue's thread only.
public final class QueueServer {
    /// Why `drain` returned.
    public enum DrainEnd: Equatable, Sendable {
        /// The ring is empty and the driver's notifications are on: wait for a kick.
        case empty
        /// `budget` chains were served; more may wait (notifications are still off).
        case budget
        /// `while` said stop (e.g. the in-flight limit); resumed by the handler.
        case paused
        /// The queue is broken or stopped.
        case stopped
    }

    public let index: Int
    public let queue: SplitQueue
    public let interrupt: any VirtioInterruptSink
    public let counters: QueueCounters
    /// Starts every log line of this queue, e.g. "virtio-net net0 rx0".
    public let label: String
    let stopKind: StaticString
    let log: RateLimitedLog?
    let interruptsOnlyForNewEntries: Bool
    // Touched per chain by the queue's thread alone: no runtime exclusivity check
    // (see SplitQueue's indices).
    /// The guest broke the queue: nothing more is served until a reset.
    @exclusivity(unchecked) public var broken = false
    /// The handler was stopped (quiesce): nothing more is served.
    @exclusivity(unchecked) public var quiesced = false
    /// Used entries staged since the last publish.
    @exclusivity(unchecked) public private(set) var staged = 0

    /// - stopKind: the log kind (rate-limited per kind) of the line written when the
    ///   guest breaks the queue.
    /// - interruptsOnlyForNewEntries: `publish` asks whether to interrupt only when
    ///   entries were staged since the last publish; otherwise on every publish, so an
    ///   interrupt a driver without EVENT_IDX suppressed goes out as soon as it wants
    ///   interrupts again.
    public init(index: Int, queue: SplitQueue, interrupt: any VirtioInterruptSink, counters: QueueCounters,
                label: String, stopKind: StaticString, log: RateLimitedLog?, interruptsOnlyForNewEntries: Bool = false) {
        self.index = index
        self.queue = queue
        self.interrupt = interrupt
        self.counters = counters
        self.label = label
        self.stopKind = stopKind
        self.log = log
        self.interruptsOnlyForNewEntries = interruptsOnlyForNewEntries
    }

    /// Neither broken nor stopped.
    public var isServing: Bool { !broken && !quiesced }

    /// The guest broke the queue: one (rate-limited) line, DEVICE_NEEDS_RESET, and this
    /// queue serves nothing more.
    public func fail(_ why: String) {
        broken = true
        log?.warn(stopKind, "\(label): \(why): device needs reset")
        interrupt.markNeedsReset()
    }

    /// The next available chain; nil when the ring is empty or broken (a malformed ring
    /// or chain fails the queue).
    public func pop() -> DescriptorChain? {
        guard !broken else { return nil }
        do { return try queue.popAvailable() } catch {
            fail("\(error)")
            return nil
        }
    }

    /// Puts `head` in the used ring with `length` bytes written (visible at the next
    /// `publish`). False when the ring refused it (the queue then failed).
    @discardableResult
    public func stage(_ head: UInt16, length: UInt32) -> Bool {
        do {
            try queue.stageUsed(head: head, length: length)
            staged += 1
            return true
        } catch {
            fail("\(error)")
            return false
        }
    }

    /// Makes the staged entries visible to the driver without deciding on an interrupt:
    /// a polling driver takes them at once, and the next `publish` asks about every entry
    /// made visible since the last one asked (so none is missed).
    public func makeVisible() {
        queue.publishUsed()
    }

    /// Makes the staged entries visible to the driver and interrupts it if it asked to
    /// be (EVENT_IDX's used_event, or the NO_INTERRUPT flag).
    public func publish() {
        if interruptsOnlyForNewEntries && staged == 0 { return }
        staged = 0
        queue.publishUsed()
        if queue.needsNotification() {
            counters.interrupted()
            interrupt.signalUsedBuffer()
        }
    }

    /// Before the thread sleeps until the next kick: turns the driver's notifications
    /// back on. Returns false when chains came in meanwhile; notifications are then off
    /// again and the caller must serve them (they would bring no kick).
    public func notificationsOn() -> Bool {
        guard queue.enableNotifications() else { return true }
        queue.disableNotifications()
        return false
    }

    /// Serves available chains with `serve` (which stages what it finishes) until the
    /// ring is empty and notifications are back on, `budget` chains were served, or
    /// `more` says stop (checked before each chain). Publishes after every `batch`
    /// chains and before returning, so a driver that keeps the ring full still sees its
    /// used entries.
    @discardableResult
    public func drain(budget: Int = .max, batch: Int = .max, while more: () -> Bool = { true },
                      _ serve: (DescriptorChain) -> Void) -> DrainEnd {
        var served = 0
        while isServing {
            queue.disableNotifications()
            var inBatch = 0
            while served < budget && inBatch < batch && more() {
                guard let chain = pop() else { break }
                served += 1
                inBatch += 1
                serve(chain)
                if !isServing { break }
            }
            publish()
            if !isServing { return .stopped }
            if !more() { return .paused }
            if served >= budget { return .budget }
            if inBatch >= batch { continue }
            if notificationsOn() { return .empty }
        }
        return .stopped
    }
}
