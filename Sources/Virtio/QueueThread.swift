// The body of a virtio queue thread: one group of queues (one queue, or a virtio-net
// rx/tx pair), a kick eventfd per queue and one stop eventfd. VirtioHost runs it on the
// threads it starts at DRIVER_OK; `scripts/bench datapath` runs the very same loop.
import OS

/// Serves every queue once, then on every kick and completion until `stop` is signalled;
/// then quiesces every handler. A handler's completions are retired before its kick is
/// served. A kick eventfd a handler handed to someone else (`ownKick`: vhost) is not
/// polled here. `onPoll` runs after each wake-up (counters); `onPollFailure` gets the
/// errno of a failed poll, after which the loop ends.
public func serveQueueGroup(handlers: [VirtioQueueHandler], kicks: [EventFD], stop: EventFD,
                            onPollFailure: (Int32) -> Void, onPoll: () -> Void = {}) {
    for h in handlers { h.kicked() }
    var watch: [Int32] = []
    var slots: [(handler: Int, kick: Bool)] = []
    for (k, h) in handlers.enumerated() {
        if h.completionFD >= 0 { watch.append(h.completionFD); slots.append((k, false)) }
        if h.ownKick == nil { watch.append(kicks[k].fd); slots.append((k, true)) }
    }
    pollUntilStopped(stop: stop, watch: watch, onFailure: onPollFailure) { ready in
        onPoll()
        for j in slots.indices where ready[j] {
            let s = slots[j]
            if s.kick {
                _ = try? kicks[s.handler].read()
                handlers[s.handler].kicked()
            } else {
                handlers[s.handler].completionsReady()
            }
        }
    }
    for h in handlers { h.quiesce() }
}
