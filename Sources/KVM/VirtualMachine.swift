// A KVM virtual machine: memory slots, in-kernel irqchip and PIT, interrupts, eventfds, vCPUs.
import Glibc
import CLinux
import GuestMemory
import OS

/// A KVM VM (KVM_CREATE_VM). Owns its file descriptor; keeps the Hypervisor and any
/// registered GuestMemory alive as long as it lives (KVM must never see freed memory).
public final class VirtualMachine: Sendable {
    public let fd: Int32
    public let hypervisor: Hypervisor
    /// Guest memory registered with KVM, kept mapped as long as the VM lives.
    private let keepAlive = Locked<[GuestMemory]>([])

    /// Default addresses from docs/DESIGN.md.
    public static let defaultTSSAddress: UInt64 = 0xfffb_d000
    public static let defaultIdentityMapAddress: UInt64 = 0xfffb_c000

    init(hypervisor: Hypervisor) throws {
        // Type 0: the default machine type. Retry on EINTR (KVM_CREATE_VM may be interrupted).
        var fd: Int32
        repeat { fd = clinux_ioctl_int(hypervisor.fd, clinux_KVM_CREATE_VM(), 0) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw KVMError.ioctl(name: "KVM_CREATE_VM", errno: errno) }
        self.fd = fd
        self.hypervisor = hypervisor
    }

    deinit { close(fd) }

    /// KVM_CHECK_EXTENSION on the VM fd (answers for this VM); 0 when absent.
    public func checkExtension(_ cap: Capability) -> Int {
        Int(max(0, clinux_ioctl_int(fd, clinux_KVM_CHECK_EXTENSION(), UInt(cap.rawValue))))
    }

    private func check(_ r: Int32, _ name: String) throws {
        if r < 0 { throw KVMError.ioctl(name: name, errno: errno) }
    }

    /// KVM_SET_TSS_ADDR: three pages KVM (Intel) needs below 4 GiB, outside RAM.
    public func setTSSAddress(_ address: UInt64 = defaultTSSAddress) throws {
        try check(clinux_ioctl_int(fd, clinux_KVM_SET_TSS_ADDR(), UInt(address)), "KVM_SET_TSS_ADDR")
    }

    /// KVM_SET_IDENTITY_MAP_ADDR: one page KVM (Intel, no unrestricted guest) needs, outside RAM.
    public func setIdentityMapAddress(_ address: UInt64 = defaultIdentityMapAddress) throws {
        var a = address
        try check(clinux_ioctl_ptr(fd, clinux_KVM_SET_IDENTITY_MAP_ADDR(), &a), "KVM_SET_IDENTITY_MAP_ADDR")
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC (GSIs 0-23) and per-vCPU LAPICs.
    /// Must come before creating vCPUs.
    public func createIRQChip() throws {
        try check(clinux_ioctl_none(fd, clinux_KVM_CREATE_IRQCHIP()), "KVM_CREATE_IRQCHIP")
    }

    /// KVM_CREATE_PIT2 with flags 0 (in-kernel i8254 PIT; needs the irqchip first).
    public func createPIT2() throws {
        var cfg = kvm_pit_config()
        cfg.flags = 0
        try check(clinux_ioctl_ptr(fd, clinux_KVM_CREATE_PIT2(), &cfg), "KVM_CREATE_PIT2")
    }

    /// KVM_SET_USER_MEMORY_REGION. KVM itself validates alignment and overlap; its refusal
    /// comes back as `KVMError.ioctl(name: "KVM_SET_USER_MEMORY_REGION", ...)`. A size of 0 deletes the slot.
    public func setUserMemoryRegion(slot: UInt32, guestBase: UInt64, size: UInt64,
                                    host: UnsafeMutableRawPointer?, flags: UInt32 = 0) throws {
        var r = kvm_userspace_memory_region()
        r.slot = slot
        r.flags = flags
        r.guest_phys_addr = guestBase
        r.memory_size = size
        r.userspace_addr = UInt64(UInt(bitPattern: host))
        try check(clinux_ioctl_ptr(fd, clinux_KVM_SET_USER_MEMORY_REGION(), &r), "KVM_SET_USER_MEMORY_REGION")
    }

    /// The first slot `mapReadOnly` hands out (guest RAM takes the slots from 0).
    public static let firstReadOnlySlot: UInt32 = 256
    private let nextReadOnlySlot = Locked<UInt32>(VirtualMachine.firstReadOnlySlot)

    /// Maps `size` bytes at `host` (page aligned, kept mapped by the caller until `unmap`)
    /// read-only at `guestBase` (KVM_MEM_READONLY): guest reads come from that memory
    /// without an exit, guest writes exit as MMIO (or reach an ioeventfd there). Returns
    /// the slot. Throws when KVM has no read-only memory or refuses the slot.
    /// `owner`, if given, is kept alive as long as the VM (the memory's owner: KVM must
    /// never see it freed while the slot exists).
    public func mapReadOnly(host: UnsafeMutableRawPointer, guestBase: UInt64, size: UInt64,
                            owner: (any AnyObject & Sendable)? = nil) throws -> UInt32 {
        guard checkExtension(.readonlyMem) > 0 else { throw KVMError.missingCapabilities([Capability.readonlyMem.name]) }
        let slot = try nextReadOnlySlot.withLock { next in
            try setUserMemoryRegion(slot: next, guestBase: guestBase, size: size, host: host, flags: UInt32(KVM_MEM_READONLY))
            defer { next += 1 }
            return next
        }
        if let owner { keepAliveOwners.withLock { $0.append(owner) } }
        return slot
    }
    private let keepAliveOwners = Locked<[any AnyObject & Sendable]>([])

    /// Deletes a slot `mapReadOnly` made.
    public func unmap(slot: UInt32, guestBase: UInt64) throws {
        try setUserMemoryRegion(slot: slot, guestBase: guestBase, size: 0, host: nil, flags: UInt32(KVM_MEM_READONLY))
    }

    /// Registers every region of `memory` as consecutive slots from `firstSlot`; returns the slots.
    /// The VM keeps `memory` alive.
    @discardableResult
    public func registerMemory(_ memory: GuestMemory, firstSlot: UInt32 = 0) throws -> [UInt32] {
        var slots: [UInt32] = []
        for (i, region) in memory.regions.enumerated() {
            let slot = firstSlot + UInt32(i)
            try setUserMemoryRegion(slot: slot, guestBase: region.guestBase, size: region.size, host: region.host)
            slots.append(slot)
        }
        keepAlive.withLock { $0.append(memory) }
        return slots
    }

    /// KVM_IRQ_LINE: drives GSI `gsi` (IOAPIC pin, and PIC for 0-15) high or low.
    public func irqLine(gsi: UInt32, level: Bool) throws {
        var l = kvm_irq_level()
        l.irq = gsi
        l.level = level ? 1 : 0
        try check(clinux_ioctl_ptr(fd, clinux_KVM_IRQ_LINE(), &l), "KVM_IRQ_LINE")
    }

    /// KVM_GET_IRQCHIP for the IOAPIC: its IRR, one bit per pin whose line is asserted
    /// (a level-triggered pin stays set while its line is high, masked or not).
    public func ioapicIRR() throws -> UInt32 {
        var c = kvm_irqchip()
        c.chip_id = UInt32(KVM_IRQCHIP_IOAPIC)
        try check(clinux_ioctl_ptr(fd, clinux_KVM_GET_IRQCHIP(), &c), "KVM_GET_IRQCHIP")
        return c.chip.ioapic.irr
    }

    /// KVM_IRQFD: a write to `eventfd` raises GSI `gsi` (edge). Needs the in-kernel irqchip.
    public func registerIrqfd(eventfd: EventFD, gsi: UInt32) throws {
        try irqfd(eventfd.fd, gsi: gsi, flags: 0)
    }

    /// KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN.
    public func deassignIrqfd(eventfd: EventFD, gsi: UInt32) throws {
        try irqfd(eventfd.fd, gsi: gsi, flags: UInt32(KVM_IRQFD_FLAG_DEASSIGN))
    }

    /// KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: a level-triggered line. A write to `eventfd`
    /// asserts GSI `gsi` and it stays asserted until the guest EOIs it; then KVM deasserts
    /// it and signals `resample`, and the owner re-asserts if its interrupt is still
    /// pending. Needs KVM_CAP_IRQFD_RESAMPLE and an irqchip pin as the GSI's route.
    public func registerIrqfd(_ eventfd: EventFD, gsi: UInt32, resample: EventFD) throws {
        try irqfd(eventfd.fd, gsi: gsi, flags: UInt32(KVM_IRQFD_FLAG_RESAMPLE), resamplefd: resample.fd)
    }

    /// Same as `registerIrqfd(eventfd:gsi:)`.
    public func registerIrqfd(_ eventfd: EventFD, gsi: UInt32) throws { try registerIrqfd(eventfd: eventfd, gsi: gsi) }
    /// Same as `deassignIrqfd(eventfd:gsi:)`.
    public func deassignIrqfd(_ eventfd: EventFD, gsi: UInt32) throws { try deassignIrqfd(eventfd: eventfd, gsi: gsi) }

    private func irqfd(_ efd: Int32, gsi: UInt32, flags: UInt32, resamplefd: Int32 = 0) throws {
        var s = kvm_irqfd()
        s.fd = UInt32(bitPattern: efd)
        s.gsi = gsi
        s.flags = flags
        s.resamplefd = UInt32(bitPattern: resamplefd)
        try check(clinux_ioctl_ptr(fd, clinux_KVM_IRQFD(), &s), "KVM_IRQFD")
    }

    /// KVM_IOEVENTFD: a guest write of `length` bytes (1, 2, 4 or 8; 0 = any length, MMIO only)
    /// to `address` (MMIO, or an I/O port when `pio`) signals `eventfd` inside KVM with no exit
    /// to swiftlet. With `datamatch`, only writes of exactly that value do; others exit as usual.
    public func registerIoeventfd(eventfd: EventFD, address: UInt64, length: UInt32,
                                  datamatch: UInt64? = nil, pio: Bool = false) throws {
        try ioeventfd(eventfd.fd, address: address, length: length, datamatch: datamatch, pio: pio, deassign: false)
    }

    /// KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN (same arguments as when registered).
    public func deassignIoeventfd(eventfd: EventFD, address: UInt64, length: UInt32,
                                  datamatch: UInt64? = nil, pio: Bool = false) throws {
        try ioeventfd(eventfd.fd, address: address, length: length, datamatch: datamatch, pio: pio, deassign: true)
    }

    /// Same as `registerIoeventfd(eventfd:address:length:datamatch:pio:)`.
    public func registerIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32,
                                  datamatch: UInt64? = nil, pio: Bool = false) throws {
        try registerIoeventfd(eventfd: eventfd, address: address, length: length, datamatch: datamatch, pio: pio)
    }
    /// Same as `deassignIoeventfd(eventfd:address:length:datamatch:pio:)`.
    public func deassignIoeventfd(_ eventfd: EventFD, address: UInt64, length: UInt32,
                                  datamatch: UInt64? = nil, pio: Bool = false) throws {
        try deassignIoeventfd(eventfd: eventfd, address: address, length: length, datamatch: datamatch, pio: pio)
    }

    private func ioeventfd(_ efd: Int32, address: UInt64, length: UInt32, datamatch: UInt64?,
                           pio: Bool, deassign: Bool) throws {
        var s = kvm_ioeventfd()
        s.addr = address
        s.len = length
        s.fd = efd
        var flags: UInt32 = 0
        if let d = datamatch { s.datamatch = d; flags |= clinux_KVM_IOEVENTFD_FLAG_DATAMATCH() }
        if pio { flags |= clinux_KVM_IOEVENTFD_FLAG_PIO() }
        if deassign { flags |= clinux_KVM_IOEVENTFD_FLAG_DEASSIGN() }
        s.flags = flags
        try check(clinux_ioctl_ptr(fd, clinux_KVM_IOEVENTFD(), &s), "KVM_IOEVENTFD")
    }

    /// KVM_CREATE_VCPU, then maps its kvm_run area. Ids at or above KVM_CAP_MAX_VCPU_ID are
    /// refused before asking KVM.
    public func createVCPU(id: UInt32) throws -> VCPU {
        let limit = hypervisor.maxVCPUID
        guard Int(id) < limit else { throw KVMError.vcpuIDOutOfRange(id: id, limit: limit) }
        return try VCPU(vm: self, id: id, mmapSize: try hypervisor.vcpuMmapSize())
    }

    /// KVM_CREATE_VCPU without the id check (for tests of KVM's own validation).
    public func createVCPUUnchecked(id: UInt32) throws -> VCPU {
        try VCPU(vm: self, id: id, mmapSize: try hypervisor.vcpuMmapSize())
    }
}
