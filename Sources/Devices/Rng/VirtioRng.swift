// virtio-rng (virtio 1.2 §5.4, device type 4): one request queue, no config space, no
// device features beyond VERSION_1.
//
// The driver offers device-writable buffers; the device fills each chain with bytes from
// getrandom(2) (the host kernel's CSPRNG, the same source as /dev/urandom once it is
// seeded) straight into guest memory, at most `VirtioRngLimits.maxBytesPerChain` per
// chain, and returns the length written.
//
// The guest is hostile. The driver must not place device-readable buffers in this queue
// (§5.4.6.1), and a chain with nothing to write into is no request: either one is a
// broken driver, and the queue server marks the device DEVICE_NEEDS_RESET and stops the
// queue. A malformed chain or ring does the same (QueueServer.pop).
import Glibc
import CLinux
import GuestMemory
import OS
import Virtio

public enum VirtioRngLimits {
    /// Queue size offered to the driver (Linux's virtio-rng keeps one buffer in flight).
    public static let queueSize: UInt16 = 64
    /// Bytes written into one chain at most: a driver asking for more gets this much (the
    /// used length says so), so one request never holds the queue thread long.
    public static let maxBytesPerChain: UInt32 = 64 << 10
}

/// What fills a buffer with random bytes: getrandom(2) in the machine; tests may give
/// another source (e.g. one that fails) to see the device's answer.
/// Returns the number of bytes written, or -errno.
public typealias RandomSource = @Sendable (UnsafeMutableRawBufferPointer) -> Int

/// Fills `buffer` from getrandom(2) (flags 0: blocks only until the host's pool is first
/// seeded, which happens early in the host's boot). Short reads (a signal, or requests
/// above 32 MiB) are continued; returns the bytes written, or -errno if none were.
public func getrandomFill(_ buffer: UnsafeMutableRawBufferPointer) -> Int {
    guard let base = buffer.baseAddress else { return 0 }
    var done = 0
    while done < buffer.count {
        let n = getrandom(base + done, buffer.count - done, 0)
        if n > 0 { done += n; continue }
        if n < 0 && errno == EINTR { continue }
        return done > 0 ? done : -(n < 0 ? Int(errno) : Int(EIO))
    }
    return done
}

public final class VirtioRng: HostedVirtioDevice {
    /// Used in log lines and thread names ("rng0").
    public let name: String
    let log: RateLimitedLog?
    let source: RandomSource
    let handler = Locked<RngQueue?>(nil)
    /// The request queue's counters (a request is one chain); they outlive resets.
    public let stats = QueueCounters()

    public init(name: String = "rng", source: @escaping RandomSource = getrandomFill, log: RateLimitedLog? = nil) {
        self.name = name
        self.source = source
        self.log = log
    }

    // MARK: VirtioDevice

    public var deviceType: UInt32 { VirtioDeviceType.entropy }
    public var queueMaxSizes: [UInt16] { [VirtioRngLimits.queueSize] }
    /// VERSION_1 (the transport adds it too) and the ring features every queue server handles.
    public var deviceFeatures: UInt64 { VirtioFeature.version1 | VirtioFeature.indirectDesc | VirtioFeature.eventIdx }
    public var configSize: Int { 0 }
    public func readConfig(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {}

    public func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64,
                         interrupt: any VirtioInterruptSink) throws {
        reset()
        guard let q = queues.first ?? nil else { return }
        let h = RngQueue(queue: q, interrupt: interrupt, counters: stats, source: source,
                         label: "virtio-rng \(name)", log: log)
        handler.withLock { $0 = h }
    }

    public func reset() {
        let h = handler.withLock { h -> RngQueue? in
            defer { h = nil }
            return h
        }
        h?.quiesce()
    }

    // MARK: HostedVirtioDevice

    public var queueHandlers: [VirtioQueueHandler] { handler.withLock { $0.map { [$0] } ?? [] } }
}

extension VirtioRng {
    /// Its one queue's counters, for --metrics.
    public var queueCounters: [QueueCounters] { [stats] }
}

/// The request queue: fills each chain with random bytes.
// @unchecked Sendable: made on the activating thread, then used by its queue thread alone
// (`server` is that thread's; `source` is Sendable).
public final class RngQueue: VirtioQueueHandler, @unchecked Sendable {
    public var queueIndex: Int { 0 }
    public var completionFD: Int32 { -1 }
    let server: QueueServer
    let source: RandomSource
    let log: RateLimitedLog?

    init(queue: SplitQueue, interrupt: any VirtioInterruptSink, counters: QueueCounters, source: @escaping RandomSource,
         label: String, log: RateLimitedLog?) {
        server = QueueServer(index: 0, queue: queue, interrupt: interrupt, counters: counters, label: label,
                             stopKind: "queue stopped", log: log, interruptsOnlyForNewEntries: true)
        self.source = source
        self.log = log
    }

    public func kicked() {
        server.counters.notified()
        server.drain { serve($0) }
    }

    public func completionsReady() {}

    public func quiesce() {
        guard !server.quiesced else { return }
        server.quiesced = true
        server.publish()
    }

    func serve(_ chain: DescriptorChain) {
        guard chain.readableLength == 0 else {
            server.fail("head \(chain.head): \(chain.readableLength) device-readable bytes in an entropy request")
            return
        }
        guard chain.writableLength > 0 else {
            server.fail("head \(chain.head): entropy request without a device-writable buffer")
            return
        }
        var left = Int(min(chain.writableLength, VirtioRngLimits.maxBytesPerChain))
        var written = 0
        for i in chain.readableCount..<chain.segmentCount where left > 0 {
            let s = chain.segment(i)
            let n = min(Int(s.length), left)
            let r = source(UnsafeMutableRawBufferPointer(start: s.host, count: n))
            if r < 0 {
                log?.warn("getrandom failed", "\(server.label): getrandom: \(errnoText(Int32(-r)))")
                break
            }
            written += min(r, n)
            left -= min(r, n)
            if r < n { break }
        }
        server.counters.count(bytes: written)
        server.stage(chain.head, length: UInt32(written))
    }
}
