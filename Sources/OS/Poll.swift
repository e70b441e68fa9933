// The loop of a device thread: poll a stop eventfd and a set of descriptors, hand the
// ready ones to the caller, until stopped.
import Glibc

/// Which of the watched descriptors a poll found readable (index into `watch`). A view
/// of the poll array: nothing is allocated per wake-up.
public struct PollReadiness {
    let fds: [pollfd]
    public var count: Int { fds.count - 1 }
    public subscript(i: Int) -> Bool { fds[i + 1].revents != 0 }
}

/// Polls `stop` and `watch` until `stop` is readable, calling `onReady` with which of
/// `watch` are readable. A failing poll is reported once to `onFailure` (with its errno)
/// and the thread then only waits for `stop` (no spinning).
public func pollUntilStopped(stop: EventFD, watch: [Int32], onFailure: (Int32) -> Void,
                             _ onReady: (PollReadiness) -> Void) {
    var fds = [pollfd(fd: stop.fd, events: Int16(POLLIN), revents: 0)]
        + watch.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
    while true {
        for i in fds.indices { fds[i].revents = 0 }
        let r = poll(&fds, nfds_t(fds.count), -1)
        if r < 0 {
            let e = errno
            if e == EINTR { continue }
            onFailure(e)
            var p = pollfd(fd: stop.fd, events: Int16(POLLIN), revents: 0)
            while poll(&p, 1, -1) < 0 && errno == EINTR {}
            return
        }
        if fds[0].revents != 0 { return }
        onReady(PollReadiness(fds: fds))
    }
}
