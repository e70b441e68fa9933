// KVM's coalesced I/O ring (KVM_REGISTER_COALESCED_MMIO, with KVM_CAP_COALESCED_PIO for
// ports): a guest write into a registered port range does not exit to swiftlet; KVM
// appends it to a ring in a page of the vCPU mapping and the guest goes on. swiftlet
// applies the queued writes, in order, before it serves the next port exit, so a device
// whose reads depend on earlier writes (an index register, then its data port) sees them
// in the guest's order. When the ring is full KVM exits for the write as usual.
import Glibc
import CLinux
import OS

/// The ring: `struct kvm_coalesced_mmio_ring { u32 first, last; entries[] }`, each entry
/// `{ u64 phys_addr; u32 len; u32 pio; u8 data[8] }` (24 bytes). KVM writes entries and
/// advances `last`; swiftlet reads from `first` up to `last` and advances `first`.
// @unchecked Sendable: the ring is memory shared with KVM; `first` is advanced only under
// `drainLock`, and `last` is read with acquire ordering (KVM publishes it after the entry).
public final class CoalescedRing: @unchecked Sendable {
    static let headerSize = 8
    static let entrySize = 24
    private let page: UnsafeMutableRawPointer
    /// Entries the page holds: KVM_COALESCED_MMIO_MAX.
    public let capacity: UInt32
    private let drainLock = Locked(())

    /// `page` is the ring's page (`pageSize` bytes), mapped as long as this object lives.
    public init(page: UnsafeMutableRawPointer, pageSize: Int) {
        self.page = page
        capacity = UInt32((pageSize - Self.headerSize) / Self.entrySize)
    }

    /// Applies every queued port write in order: `apply(port, size, value)` with size 1,
    /// 2 or 4. An entry that is not a port write of 1, 2 or 4 bytes is skipped. Returns
    /// how many entries were taken. Indices out of range (never written so by KVM) stop
    /// the drain with the ring left as it is.
    @discardableResult
    public func drain(_ apply: (UInt16, Int, UInt32) -> Void) -> Int {
        // Cheap test first: the common case is an empty ring.
        if clinux_atomic_load_acquire_u32(page) == clinux_atomic_load_acquire_u32(page + 4) { return 0 }
        return drainLock.withLock { _ in
            var first = clinux_atomic_load_acquire_u32(page)
            let last = clinux_atomic_load_acquire_u32(page + 4)
            guard first < capacity, last < capacity else { return 0 }
            var n = 0
            while first != last {
                let e = page + Self.headerSize + Int(first) * Self.entrySize
                let address = e.loadUnaligned(as: UInt64.self)
                let len = Int(e.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let pio = e.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
                if pio == 1, address <= 0xffff, len == 1 || len == 2 || len == 4 {
                    var v: UInt32 = 0
                    for i in 0..<len { v |= UInt32(e.load(fromByteOffset: 16 + i, as: UInt8.self)) << (8 * UInt32(i)) }
                    apply(UInt16(address), len, v)
                }
                first = (first + 1) % capacity
                clinux_atomic_store_release_u32(page, first)
                n += 1
            }
            return n
        }
    }
}

extension VirtualMachine {
    /// KVM_REGISTER_COALESCED_MMIO for ports [port, port + size): the guest's writes there
    /// go into the coalesced ring instead of exiting (reads still exit). Needs
    /// KVM_CAP_COALESCED_PIO.
    public func registerCoalescedPIO(port: UInt16, size: UInt32) throws {
        var z = kvm_coalesced_mmio_zone()
        z.addr = UInt64(port)
        z.size = size
        z.pio = 1
        if clinux_ioctl_ptr(fd, clinux_KVM_REGISTER_COALESCED_MMIO(), &z) < 0 {
            throw KVMError.ioctl(name: "KVM_REGISTER_COALESCED_MMIO", errno: errno)
        }
    }
}

extension VCPU {
    /// The VM's coalesced I/O ring as this vCPU's mapping shows it (one ring per VM; every
    /// vCPU maps the same page), or nil when KVM has none or the mapping does not reach it.
    public func coalescedRing() -> CoalescedRing? {
        let offset = vm.checkExtension(.coalescedMMIO)
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard offset > 0, pageSize > 0, (offset + 1) * pageSize <= runAreaSize else { return nil }
        return CoalescedRing(page: runArea + offset * pageSize, pageSize: pageSize)
    }
}
