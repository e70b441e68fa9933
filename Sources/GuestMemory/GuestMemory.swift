// Guest physical memory: regions mapped into swiftlet as anonymous shared memory,
// with every access checked against the regions. A guest-supplied address or length
// can never make swiftlet read or write outside guest RAM: every accessor either returns
// a pointer to a range that lies wholly inside one region, or throws.
import Glibc
import OS

public enum GuestMemoryError: Error, Equatable, CustomStringConvertible {
    /// [address, address+length) is not wholly inside one RAM region (or overflows).
    case outOfBounds(address: UInt64, length: UInt64)
    /// mmap of guest RAM failed.
    case mapFailed(size: UInt64, errno: Int32)
    /// Regions overlap, are empty, or are not page aligned.
    case badLayout(String)

    public var description: String {
        switch self {
        case let .outOfBounds(a, l):
            return "guest range 0x\(String(a, radix: 16))+0x\(String(l, radix: 16)) is outside guest RAM"
        case let .mapFailed(size, e):
            return "cannot map \(size >> 20) MiB of guest memory: \(errnoText(e))"
        case let .badLayout(s):
            return "bad guest memory layout: \(s)"
        }
    }
}

/// One contiguous range of guest physical RAM backed by one host mapping.
// @unchecked Sendable: every property is immutable and the mapping lives until deinit.
// The bytes behind `host` are guest RAM, which the guest itself writes from any vCPU:
// swiftlet's threads share it as devices share a machine's memory, each within the
// buffers a ring gave it.
public final class GuestRegion: @unchecked Sendable {
    public let guestBase: UInt64
    public let size: UInt64
    public let host: UnsafeMutableRawPointer
    private let owned: Bool

    /// Maps `size` bytes of anonymous private memory (MAP_NORESERVE: pages are only
    /// committed when the guest touches them), aligned for transparent huge pages;
    /// `GuestMemory` asks for them on all of RAM as soon as it is mapped, so no 4 KiB page
    /// of guest RAM is ever left for khugepaged to collapse while the guest runs.
    public init(guestBase: UInt64, size: UInt64) throws {
        guard size > 0, size % 4096 == 0, guestBase % 4096 == 0 else {
            throw GuestMemoryError.badLayout("region 0x\(String(guestBase, radix: 16)) size 0x\(String(size, radix: 16)) not page aligned")
        }
        guard guestBase &+ size > guestBase else {
            throw GuestMemoryError.badLayout("region wraps the address space")
        }
        // Reserve 2 MiB more than needed and trim, so the region starts on a huge-page
        // boundary (older kernels do not align large anonymous mappings themselves).
        let huge = 2 << 20
        let span = Int(size) + huge
        guard let raw = mmap(nil, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              raw != MAP_FAILED else { throw GuestMemoryError.mapFailed(size: size, errno: errno) }
        let head = (huge - Int(bitPattern: raw) % huge) % huge
        if head > 0 { munmap(raw, head) }
        let p = raw + head
        munmap(p + Int(size), span - head - Int(size))
        self.guestBase = guestBase
        self.size = size
        self.host = p
        self.owned = true
    }

    deinit { if owned { munmap(host, Int(size)) } }

    @inline(__always)
    public var guestEnd: UInt64 { guestBase + size }

    @inline(__always)
    func contains(_ addr: UInt64, _ len: UInt64) -> Bool {
        // No overflow: check the start, then the length against what is left.
        addr >= guestBase && addr < guestEnd && len <= guestEnd - addr
    }
}

/// Guest physical memory: a sorted set of non-overlapping regions.
public final class GuestMemory: Sendable {
    public let regions: [GuestRegion]

    /// Creates and maps the regions. `layout` is (guest base, size) pairs.
    public init(layout: [(base: UInt64, size: UInt64)]) throws {
        let sorted = layout.sorted { $0.base < $1.base }
        var regions: [GuestRegion] = []
        for r in sorted {
            if let last = regions.last, r.base < last.guestEnd {
                throw GuestMemoryError.badLayout("regions overlap at 0x\(String(r.base, radix: 16))")
            }
            regions.append(try GuestRegion(guestBase: r.base, size: r.size))
        }
        guard !regions.isEmpty else { throw GuestMemoryError.badLayout("no regions") }
        self.regions = regions
        adviseHugePages()
    }

    /// Total RAM in bytes.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }
    /// One past the highest RAM address.
    public var end: UInt64 { regions.last!.guestEnd }

    @inline(__always)
    func region(for addr: UInt64, _ len: UInt64) -> GuestRegion? {
        // At most a handful of regions: a linear scan is faster than a search.
        for r in regions where r.contains(addr, len) { return r }
        return nil
    }

    /// Asks for transparent huge pages on all of RAM: the guest's first touches (kernel
    /// load, page cache, the kernel's own allocations) then fault in 2 MiB at a time, which
    /// matters most when every fault is a nested exit. Advice only: a kernel without THP,
    /// or with it set to never, still works, so failures are ignored.
    private func adviseHugePages() {
        for r in regions { _ = madvise(r.host, Int(r.size), 14 /* MADV_HUGEPAGE */) }
    }

    /// Bytes of guest RAM resident in host memory now (mincore over every region).
    public func residentBytes() -> UInt64 {
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        var total: UInt64 = 0
        for r in regions {
            let pages = Int((r.size + page - 1) / page)
            var vec = [UInt8](repeating: 0, count: pages)
            guard mincore(r.host, Int(r.size), &vec) == 0 else { continue }
            total += UInt64(vec.reduce(0) { $0 + Int($1 & 1) }) * page
        }
        return total
    }

    /// Whether [addr, addr+len) lies wholly inside one RAM region.
    public func isValid(_ addr: UInt64, length len: UInt64) -> Bool { region(for: addr, len) != nil }

    /// Host pointer to [addr, addr+len), which must lie wholly inside one region.
    /// A zero length is allowed anywhere inside (or at the end of) a region.
    @inline(__always)
    public func pointer(_ addr: UInt64, length len: UInt64) throws -> UnsafeMutableRawPointer {
        if len == 0 {
            for r in regions where addr >= r.guestBase && addr <= r.guestEnd {
                return r.host + Int(addr - r.guestBase)
            }
            throw GuestMemoryError.outOfBounds(address: addr, length: len)
        }
        guard let r = region(for: addr, len) else { throw GuestMemoryError.outOfBounds(address: addr, length: len) }
        return r.host + Int(addr - r.guestBase)
    }

    /// Buffer over [addr, addr+len) in host memory.
    public func buffer(_ addr: UInt64, length len: UInt64) throws -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: try pointer(addr, length: len), count: Int(len))
    }

    // MARK: bytes

    public func write(_ bytes: UnsafeRawBufferPointer, at addr: UInt64) throws {
        let dst = try pointer(addr, length: UInt64(bytes.count))
        if let src = bytes.baseAddress, bytes.count > 0 { dst.copyMemory(from: src, byteCount: bytes.count) }
    }

    public func write(_ bytes: [UInt8], at addr: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: addr) }
    }

    public func read(into dst: UnsafeMutableRawBufferPointer, at addr: UInt64) throws {
        let src = try pointer(addr, length: UInt64(dst.count))
        if let d = dst.baseAddress, dst.count > 0 { d.copyMemory(from: src, byteCount: dst.count) }
    }

    public func readBytes(at addr: UInt64, count: Int) throws -> [UInt8] {
        guard count >= 0 else { throw GuestMemoryError.outOfBounds(address: addr, length: UInt64.max) }
        let src = try pointer(addr, length: UInt64(count))
        return [UInt8](UnsafeRawBufferPointer(start: src, count: count))
    }

    /// Fills [addr, addr+len) with zeroes.
    public func zero(_ addr: UInt64, length len: UInt64) throws {
        let p = try pointer(addr, length: len)
        memset(p, 0, Int(len))
    }

    // MARK: little-endian integers

    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at addr: UInt64) throws -> T {
        let p = try pointer(addr, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: p.loadUnaligned(as: T.self))
    }

    public func store<T: FixedWidthInteger>(_ value: T, at addr: UInt64) throws {
        let p = try pointer(addr, length: UInt64(MemoryLayout<T>.size))
        p.storeBytes(of: value.littleEndian, as: T.self)
    }

    // MARK: iovecs

    /// Most iovecs one readv, writev, preadv or pwritev takes (Linux's UIO_MAXIOV, the
    /// IOV_MAX glibc reports): with more the call fails with EINVAL before it reads or
    /// writes anything.
    public static let maxIovecsPerCall = 1024

    /// Appends the iovec for [addr, addr+len) to `iovs`, for readv/writev straight into
    /// or out of guest memory. Throws if the range is not wholly inside one region.
    public func appendIovec(_ addr: UInt64, length len: UInt32, to iovs: inout [iovec]) throws {
        let p = try pointer(addr, length: UInt64(len))
        iovs.append(iovec(iov_base: p, iov_len: Int(len)))
    }
}

/// Something that guest-visible data can be written into: guest memory, or a byte
/// array standing in for it in table-building code that does not need a whole VM.
public protocol GuestWritable {
    func write(_ bytes: [UInt8], at addr: UInt64) throws
}

extension GuestMemory: GuestWritable {}

/// A little-endian byte buffer builder for guest structures (zero page, ACPI, MP tables).
public struct ByteWriter {
    public private(set) var bytes: [UInt8]

    public init(size: Int = 0) { bytes = [UInt8](repeating: 0, count: size) }

    public var count: Int { bytes.count }

    public mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { src in
            if offset + src.count > bytes.count { bytes += [UInt8](repeating: 0, count: offset + src.count - bytes.count) }
            for i in 0..<src.count { bytes[offset + i] = src[i] }
        }
    }

    public mutating func set(_ raw: [UInt8], at offset: Int) {
        if offset + raw.count > bytes.count { bytes += [UInt8](repeating: 0, count: offset + raw.count - bytes.count) }
        bytes.replaceSubrange(offset..<offset + raw.count, with: raw)
    }

    public mutating func append<T: FixedWidthInteger>(_ value: T) { set(value, at: bytes.count) }
    public mutating func append(_ raw: [UInt8]) { bytes += raw }
    public mutating func append(ascii s: String, length: Int) {
        var a = Array(s.utf8.prefix(length))
        a += [UInt8](repeating: 0x20, count: length - a.count)
        bytes += a
    }
}

/// Reads little-endian integers out of a byte array with bounds checks (for parsing
/// untrusted images: kernels, ELF files).
public struct ByteReader {
    public let bytes: UnsafeRawBufferPointer
    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public func get<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T? {
        guard offset >= 0, offset <= bytes.count - MemoryLayout<T>.size, bytes.count >= MemoryLayout<T>.size else { return nil }
        return T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
