// Where an x86 vCPU's page tables start, from its control registers: what a report on a
// stopped or hung guest checks against guest RAM.

/// The guest-physical range of the top-level page table that `cr3` names under the paging
/// mode the other registers select, or nil while paging is off. Long mode: a 4 KiB table at
/// CR3 bits 12-51 (the PCID in bits 0-11 and the no-flush bit 63 are not part of it); PAE
/// without long mode: the 32-byte PDPT at bits 5-31; 32-bit paging: a 4 KiB table at bits 12-31.
public func pagingRoot(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) -> (address: UInt64, length: UInt64)? {
    let pg: UInt64 = 1 << 31, pae: UInt64 = 1 << 5, lma: UInt64 = 1 << 10
    guard cr0 & pg != 0 else { return nil }
    if efer & lma != 0 { return (cr3 & 0x000f_ffff_ffff_f000, 4096) }
    if cr4 & pae != 0 { return (cr3 & 0xffff_ffe0, 32) }
    return (cr3 & 0xffff_f000, 4096)
}
