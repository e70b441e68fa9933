// Counters for `--metrics`: KVM exits by kind, and per virtio-mmio device the register
// exits that cost the guest (InterruptStatus reads, InterruptACK writes, queue notifies
// that reached a vCPU instead of an ioeventfd) plus the device's own queue counters.
// Written as one JSON object at exit, and on SIGUSR1 while running.
import Glibc
import OS
import Synchronization
import Devices
import Virtio

final class ExitCounters: Sendable {
    let runs = Atomic<UInt64>(0)
    let pio = Atomic<UInt64>(0)
    let mmio = Atomic<UInt64>(0)
    let other = Atomic<UInt64>(0)
}

/// An MMIO device wrapper that counts the exits reaching a virtio-mmio window.
final class CountedVirtioWindow: MMIODevice, Sendable {
    let slot: VirtioMMIOSlot
    let exits = Atomic<UInt64>(0)
    let interruptStatusReads = Atomic<UInt64>(0)
    let interruptAcks = Atomic<UInt64>(0)
    let notifyExits = Atomic<UInt64>(0)

    func read(offset: UInt64, size: Int) -> UInt64 {
        exits.wrappingAdd(1, ordering: .relaxed)
        if offset == VirtioMMIOReg.interruptStatus { interruptStatusReads.wrappingAdd(1, ordering: .relaxed) }
        return slot.read(offset: offset, size: size)
    }

    func write(offset: UInt64, size: Int, value: UInt64) {
        exits.wrappingAdd(1, ordering: .relaxed)
        if offset == VirtioMMIOReg.interruptACK { interruptAcks.wrappingAdd(1, ordering: .relaxed) }
        if offset == VirtioMMIOReg.queueNotify { notifyExits.wrappingAdd(1, ordering: .relaxed) }
        slot.write(offset: offset, size: size, value: value)
    }

    /// The device's own counters, as JSON members (from its spec's BuiltDevice).
    let deviceJSON: @Sendable () -> String

    init(_ slot: VirtioMMIOSlot, metrics: @escaping @Sendable () -> String) {
        self.slot = slot
        self.deviceJSON = metrics
    }
}

/// Where `--metrics` goes: "-" is stderr, anything else a file rewritten on each dump.
struct MetricsSink {
    let path: String

    func write(_ json: String) {
        if path == "-" {
            writeStderr(json + "\n")
            return
        }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            writeStderr("swiftlet: cannot write metrics to \(path): \(errnoText(errno))\r\n")
            return
        }
        let bytes = Array((json + "\n").utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        rename(tmp, path)
    }
}

extension Machine {
    /// Replaces every virtio-mmio slot in the MMIO map by a counting wrapper.
    /// `metrics`: each slot's device counters, by slot.
    static func countingWindows(_ map: RangeMap<MMIODevice>,
                                metrics: [ObjectIdentifier: @Sendable () -> String]) -> (RangeMap<MMIODevice>, [CountedVirtioWindow]) {
        var out = RangeMap<MMIODevice>()
        var windows: [CountedVirtioWindow] = []
        for e in map.entries {
            if let slot = e.device as? VirtioMMIOSlot {
                let w = CountedVirtioWindow(slot, metrics: metrics[ObjectIdentifier(slot)] ?? { "\"queues\": []" })
                windows.append(w)
                out.insert(base: e.base, size: e.size, w)
            } else {
                out.insert(base: e.base, size: e.size, e.device)
            }
        }
        return (out, windows)
    }

    /// `exit`: how the run ended, for the dump at exit ("exit" member); nil while running.
    func metricsJSON(exit: Outcome? = nil) -> String {
        let e = exitCounters
        let devices = windows.map { w in
            "{\"name\": \"\(w.slot.name)\", \"mmio_exits\": \(w.exits.load(ordering: .relaxed)), "
                + "\"interrupt_status_reads\": \(w.interruptStatusReads.load(ordering: .relaxed)), "
                + "\"interrupt_acks\": \(w.interruptAcks.load(ordering: .relaxed)), "
                + "\"interrupt_acks_in_kvm\": \(w.slot.acks?.caught.load(ordering: .relaxed) ?? 0), "
                + "\"notify_exits\": \(w.notifyExits.load(ordering: .relaxed)), "
                + "\"interrupts_raised\": \(w.slot.transport.interruptsRaised.load(ordering: .relaxed)), "
                + "\"interrupts_coalesced\": \(w.slot.transport.interruptsCoalesced.load(ordering: .relaxed)), "
                + "\"register_page\": \(w.slot.readsWithoutExit), \(w.deviceJSON())}"
        }
        return "{\"exits\": {\"kvm_run\": \(e.runs.load(ordering: .relaxed)), \"pio\": \(e.pio.load(ordering: .relaxed)), "
            + "\"mmio\": \(e.mmio.load(ordering: .relaxed)), \"other\": \(e.other.load(ordering: .relaxed))}, "
            + "\"devices\": [\(devices.joined(separator: ", "))]"
            + (exit.map { ", \"exit\": \($0.metricsJSON)" } ?? "") + "}"
    }
}
