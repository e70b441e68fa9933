// A VirtioVM without KVM: records the interrupt line's level and the irqfds and
// ioeventfds a slot registers, so VirtioMMIOSlot runs in unit tests on any host. The
// eventfds are real: a test kicks a queue by writing the registered ioeventfd, as KVM
// would on the guest's QueueNotify write.
import Glibc
import OS
@testable import VMM
import Virtio

final class FakeVM: VirtioVM {
    struct Ioeventfd {
        let eventfd: EventFD
        let address: UInt64
        let length: UInt32
        let datamatch: UInt64?
    }
    struct Irqfd {
        let eventfd: EventFD
        let resample: EventFD
    }
    struct State {
        /// KVM_IRQ_LINE calls per GSI, in order.
        var levels: [UInt32: [Bool]] = [:]
        var irqfds: [UInt32: Irqfd] = [:]
        var ioeventfds: [Ioeventfd] = []
        /// Refuse ioeventfds (as KVM does when it has no room).
        var refuseIoeventfds = false
        /// Read-only pages mapped, by token: the page and its guest address.
        var pages: [UInt32: (page: RegisterPage, address: UInt64)] = [:]
        var nextPageToken: UInt32 = 256
        /// Refuse read-only pages (a KVM without KVM_CAP_READONLY_MEM).
        var refusePages = false
    }
    let state = Locked(State())

    func irqLine(gsi: UInt32, level: Bool) throws {
        state.withLock { $0.levels[gsi, default: []].append(level) }
    }

    func registerIrqfd(_ eventfd: EventFD, gsi: UInt32, resample: EventFD) throws {
        try state.withLock { s in
            guard s.irqfds[gsi] == nil else { throw SystemError(call: "KVM_IRQFD", errno: EBUSY) }
            s.irqfds[gsi] = Irqfd(eventfd: eventfd, resample: resample)
        }
    }

    func deassignIrqfd(_ eventfd: EventFD, gsi: UInt32) throws {
        try state.withLock { s in
            guard s.irqfds[gsi]?.eventfd === eventfd else { throw SystemError(call: "KVM_IRQFD", errno: ENOENT) }
            s.irqfds[gsi] = nil
        }
    }

    func registerIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws {
        try state.withLock { s in
            if s.refuseIoeventfds { throw SystemError(call: "KVM_IOEVENTFD", errno: ENOSPC) }
            // KVM refuses a second ioeventfd for the same address and value.
            guard !pio, !s.ioeventfds.contains(where: { $0.address == address && $0.datamatch == datamatch }) else {
                throw SystemError(call: "KVM_IOEVENTFD", errno: EEXIST)
            }
            s.ioeventfds.append(Ioeventfd(eventfd: eventfd, address: address, length: length, datamatch: datamatch))
        }
    }

    func deassignIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws {
        try state.withLock { s in
            guard let i = s.ioeventfds.firstIndex(where: { $0.eventfd === eventfd && $0.address == address && $0.datamatch == datamatch }) else {
                throw SystemError(call: "KVM_IOEVENTFD", errno: ENOENT)
            }
            s.ioeventfds.remove(at: i)
        }
    }

    func mapRegisterPage(_ page: RegisterPage, at address: UInt64) throws -> UInt32 {
        try state.withLock { s in
            if s.refusePages { throw SystemError(call: "KVM_SET_USER_MEMORY_REGION", errno: EINVAL) }
            guard !s.pages.values.contains(where: { $0.address == address }) else {
                throw SystemError(call: "KVM_SET_USER_MEMORY_REGION", errno: EEXIST)
            }
            defer { s.nextPageToken += 1 }
            s.pages[s.nextPageToken] = (page, address)
            return s.nextPageToken
        }
    }

    func unmapRegisterPage(_ token: UInt32, at address: UInt64) throws {
        try state.withLock { s in
            guard s.pages[token]?.address == address else { throw SystemError(call: "KVM_SET_USER_MEMORY_REGION", errno: ENOENT) }
            s.pages[token] = nil
        }
    }

    /// The guest's read of `size` bytes at `address` from a mapped register page (as KVM
    /// serves it without an exit); nil where no page is mapped.
    func readPage(_ address: UInt64, size: Int = 4) -> UInt32? {
        state.withLock { s -> UInt32? in
            guard let (page, base) = s.pages.values.first(where: { address >= $0.address && address + UInt64(size) <= $0.address + UInt64(RegisterPage.size) }).map({ ($0.page, $0.address) }) else { return nil }
            var v: UInt32 = 0
            withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(start: page.bytes + Int(address - base), count: size)) }
            return UInt32(littleEndian: v)
        }
    }
    var mappedPages: Int { state.withLock { $0.pages.count } }

    func levels(_ gsi: UInt32) -> [Bool] { state.withLock { $0.levels[gsi] ?? [] } }
    func irqfd(_ gsi: UInt32) -> Irqfd? { state.withLock { $0.irqfds[gsi] } }
    var ioeventfds: [Ioeventfd] { state.withLock { $0.ioeventfds } }
    /// The guest's QueueNotify write of `queue` at the window at `base`, caught by the ioeventfd.
    func kick(base: UInt64, queue: Int) throws {
        let e = state.withLock { s in
            s.ioeventfds.first { $0.address == base + 0x50 && $0.datamatch == UInt64(queue) }?.eventfd
        }
        guard let e else { throw SystemError(call: "no ioeventfd for queue \(queue)", errno: ENOENT) }
        try e.write(1)
    }
}
