// The register page: a virtio-mmio window whose reads never exit. The VMM maps one page
// of its own memory read-only into the guest at the window (a KVM_MEM_READONLY slot): a
// guest read of any register or of config space reads that page, and a write still exits
// (KVM finds the slot read-only) and reaches the transport as before. The transport keeps
// the page equal to what a read that exited would return:
//   - InterruptStatus (0x060) is not a copy: the page word is the transport's own
//     InterruptStatus, changed only with atomic operations, so a bit a device thread sets
//     is visible to the guest before the interrupt that announces it;
//   - Status (0x070) is rendered at every register write and gains DEVICE_NEEDS_RESET with
//     an atomic OR when a device thread fails;
//   - ConfigGeneration (0x0fc) is stored whenever it moves;
//   - every other register, and config space from 0x100, is rendered after each register
//     or config write (the only things that change them).
import Glibc
import OS
import Synchronization

/// The page itself: anonymous memory, unmapped when the last holder (the transport,
/// the VMM's slot) lets go. Whoever maps it into a VM removes that mapping first.
public final class RegisterPage: @unchecked Sendable {
    public static let size = 0x1000
    public let bytes: UnsafeMutableRawPointer

    public init() throws {
        let p = mmap(nil, Self.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError(call: "mmap", errno: errno) }
        bytes = p
    }

    deinit { munmap(bytes, Self.size) }
}

/// A 32-bit word another party can read at any time (a word of the register page, or a
/// word of our own), changed only atomically.
struct SharedWord: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Atomic<UInt32>>

    init(_ p: UnsafeMutableRawPointer) { pointer = p.assumingMemoryBound(to: Atomic<UInt32>.self) }

    /// Acquiring.
    func load() -> UInt32 { UInt32(littleEndian: pointer.pointee.load(ordering: .acquiring)) }
    /// Releasing.
    func store(_ v: UInt32) { pointer.pointee.store(v.littleEndian, ordering: .releasing) }
    /// Sequentially consistent: a later sequentially consistent load of another variable
    /// cannot be ordered before it (the store-then-check of renderStatus/renderGeneration).
    func storeThenCheck(_ v: UInt32) { pointer.pointee.store(v.littleEndian, ordering: .sequentiallyConsistent) }
    /// Sequentially consistent (markNeedsReset's side of renderStatus's store-then-check).
    func bitwiseOrThenCheck(_ v: UInt32) { pointer.pointee.bitwiseOr(v.littleEndian, ordering: .sequentiallyConsistent) }
    /// Acquiring and releasing; returns the old and new values.
    @discardableResult
    func bitwiseOr(_ v: UInt32) -> (oldValue: UInt32, newValue: UInt32) {
        let r = pointer.pointee.bitwiseOr(v.littleEndian, ordering: .acquiringAndReleasing)
        return (UInt32(littleEndian: r.oldValue), UInt32(littleEndian: r.newValue))
    }
    /// Acquiring and releasing; returns the old and new values.
    @discardableResult
    func bitwiseAnd(_ v: UInt32) -> (oldValue: UInt32, newValue: UInt32) {
        let r = pointer.pointee.bitwiseAnd(v.littleEndian, ordering: .acquiringAndReleasing)
        return (UInt32(littleEndian: r.oldValue), UInt32(littleEndian: r.newValue))
    }
}

extension VirtioMMIOTransport {
    /// Renders the registers that `s` decides (all but InterruptStatus) into the register
    /// page; with `config`, config space too. State lock held.
    func render(_ s: State, config: Bool) {
        guard let page = registerPage?.bytes else { return }
        var off: UInt64 = 0
        while off < VirtioMMIOReg.config {
            switch off {
            case VirtioMMIOReg.interruptStatus: break
            case VirtioMMIOReg.status: renderStatus(s.status)
            case VirtioMMIOReg.configGeneration: renderGeneration()
            default: SharedWord(page + Int(off)).store(registerValue(off, s))
            }
            off += 4
        }
        guard config else { return }
        // Built aside and copied whole: a byte that did not change is only ever rewritten
        // with its own value, so a guest reading meanwhile never sees a transient.
        let room = RegisterPage.size - Int(VirtioMMIOReg.config)
        var bytes = [UInt8](repeating: 0, count: room)
        let n = min(max(device.configSize, 0), room)
        if n > 0 {
            bytes.withUnsafeMutableBytes { device.readConfig(offset: 0, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
        }
        bytes.withUnsafeBytes { (page + Int(VirtioMMIOReg.config)).copyMemory(from: $0.baseAddress!, byteCount: room) }
    }

    /// Status as the driver reads it: `status` and DEVICE_NEEDS_RESET. A device thread that
    /// sets NEEDS_RESET meanwhile ORs it in after its flag (markNeedsReset): the second look
    /// keeps it. Both sides are sequentially consistent: with only release and acquire,
    /// the second look could be done before the store lands, miss the flag, and the store
    /// would then overwrite the device thread's OR.
    func renderStatus(_ status: UInt32) {
        guard let page = registerPage?.bytes else { return }
        let w = SharedWord(page + Int(VirtioMMIOReg.status))
        w.storeThenCheck(status | (needsResetFlag.load(ordering: .sequentiallyConsistent) ? VirtioStatus.needsReset : 0))
        if needsResetFlag.load(ordering: .sequentiallyConsistent) { w.bitwiseOr(VirtioStatus.needsReset) }
    }

    /// ConfigGeneration into the page, again until the stored value is the current one
    /// (sequentially consistent for the reason renderStatus gives).
    func renderGeneration() {
        guard let page = registerPage?.bytes else { return }
        let w = SharedWord(page + Int(VirtioMMIOReg.configGeneration))
        var g = generation.load(ordering: .sequentiallyConsistent)
        while true {
            w.storeThenCheck(g)
            let now = generation.load(ordering: .sequentiallyConsistent)
            if now == g { return }
            g = now
        }
    }
}
