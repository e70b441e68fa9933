// The host side of a virtio-blk disk: an open image file and the system calls that move
// data between it and guest memory (preadv/pwritev on iovecs that point straight into
// guest RAM, no bounce buffer), flush, discard and write-zeroes.
//
// Every offset and length handed to these functions has been checked by the device
// against the disk's capacity; the functions check again (cheaply) so that nothing can
// ever touch the file outside [0, capacity).
import Glibc
import CLinux
import GuestMemory
import Synchronization

/// fallocate(2) modes (linux/falloc.h; not exported by Swift's Glibc module).
public enum Falloc {
    public static let keepSize: Int32 = 0x01
    public static let punchHole: Int32 = 0x02
    public static let zeroRange: Int32 = 0x10
}

/// O_DIRECT on x86-64 (fcntl.h only defines it with _GNU_SOURCE).
public let O_DIRECT_FLAG: Int32 = 0o40000

/// fallocate(2) (the system call, see clinux_fallocate); returns 0 or an errno.
public func callFallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
    guard offset <= UInt64(Int.max), length <= UInt64(Int.max) - offset else { return EINVAL }
    while true {
        if clinux_fallocate(fd, mode, Int(offset), Int(length)) == 0 { return 0 }
        if errno != EINTR { return errno }
    }
}

/// An open disk image. Owns its file descriptors.
public final class DiskImage: Sendable {
    /// The descriptor requests use (opened with O_DIRECT when `direct`).
    public let fd: Int32
    /// A descriptor without O_DIRECT for buffers that are not sector aligned (direct only).
    let bufferedFD: Int32
    /// Size in bytes (a multiple of 512).
    public let size: UInt64
    public let readOnly: Bool
    public let direct: Bool
    /// GET_ID answer: the serial, NUL padded to 20 bytes.
    public let serial: [UInt8]
    /// Alignment O_DIRECT needs for buffer addresses and lengths.
    public static let directAlignment = 512
    let flushes = Atomic<Int>(0)
    /// fdatasync calls so far (tests, statistics).
    public var flushCount: Int { flushes.load(ordering: .acquiring) }

    /// Takes ownership of `fd` (and `bufferedFD` when >= 0). `size` is rounded down to whole sectors.
    public init(fd: Int32, bufferedFD: Int32 = -1, size: UInt64, readOnly: Bool, direct: Bool = false, serial: String = "") {
        self.fd = fd
        self.bufferedFD = bufferedFD
        self.size = size & ~(VirtioBlockLimits.sectorSize - 1)
        self.readOnly = readOnly
        self.direct = direct
        var id = Array(serial.utf8.prefix(VirtioBlockLimits.idBytes))
        id += [UInt8](repeating: 0, count: VirtioBlockLimits.idBytes - id.count)
        self.serial = id
    }

    deinit {
        close(fd)
        if bufferedFD >= 0 { close(bufferedFD) }
    }

    /// Capacity in 512-byte sectors.
    public var sectors: UInt64 { size / VirtioBlockLimits.sectorSize }

    @inline(__always)
    func inRange(_ offset: UInt64, _ length: UInt64) -> Bool {
        offset <= size && length <= size - offset
    }

    /// The descriptor for a transfer over `iovs`: the O_DIRECT one only when every buffer
    /// is aligned as O_DIRECT needs.
    func descriptor(for iovs: [iovec]) -> Int32 {
        guard direct, bufferedFD >= 0 else { return fd }
        let a = DiskImage.directAlignment
        for v in iovs where Int(bitPattern: v.iov_base) % a != 0 || v.iov_len % a != 0 { return bufferedFD }
        return fd
    }

    /// Reads (write: false) or writes the file at `offset` to/from `iovs` until every byte
    /// moved. Returns 0 or an errno (EIO for an unexpected end of file).
    public func transfer(_ iovs: [iovec], offset: UInt64, write: Bool) -> Int32 {
        var total: UInt64 = 0
        for v in iovs { total += UInt64(v.iov_len) }
        guard inRange(offset, total) else { return EINVAL }
        if total == 0 { return 0 }
        if write && readOnly { return EROFS }
        let first = descriptor(for: iovs)
        let e = DiskImage.transferAll(first, iovs, offset: offset, write: write)
        if e == EINVAL && first == fd && bufferedFD >= 0 {
            // The filesystem wants more alignment than we checked: go through the page cache.
            return DiskImage.transferAll(bufferedFD, iovs, offset: offset, write: write)
        }
        return e
    }

    static func transferAll(_ fd: Int32, _ input: [iovec], offset: UInt64, write: Bool) -> Int32 {
        var iovs = input
        var start = 0
        var off = offset
        while start < iovs.count {
            let count = min(iovs.count - start, GuestMemory.maxIovecsPerCall)
            let n: Int = iovs.withUnsafeMutableBufferPointer { b in
                write ? pwritev(fd, b.baseAddress! + start, Int32(count), off_t(off))
                      : preadv(fd, b.baseAddress! + start, Int32(count), off_t(off))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if n == 0 { return EIO }  // end of file inside the disk: the image shrank
            off += UInt64(n)
            var left = n
            while left > 0 && start < iovs.count {
                if left >= iovs[start].iov_len {
                    left -= iovs[start].iov_len
                    start += 1
                } else {
                    iovs[start].iov_base = iovs[start].iov_base! + left
                    iovs[start].iov_len -= left
                    left = 0
                }
            }
            while start < iovs.count && iovs[start].iov_len == 0 { start += 1 }
        }
        return 0
    }

    /// fdatasync(2). Returns 0 or an errno.
    public func flush() -> Int32 {
        defer { flushes.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        while fdatasync(fd) != 0 {
            if errno != EINTR { return errno }
        }
        return 0
    }

    /// Punches a hole (the range reads back as zeroes). A filesystem without hole
    /// punching makes this a no-op: discard is a hint. Returns 0 or an errno.
    public func discard(offset: UInt64, length: UInt64) -> Int32 {
        guard inRange(offset, length) else { return EINVAL }
        guard !readOnly else { return EROFS }
        if length == 0 { return 0 }
        let e = callFallocate(fd, mode: Falloc.punchHole | Falloc.keepSize, offset: offset, length: length)
        return (e == EOPNOTSUPP || e == ENOSYS) ? 0 : e
    }

    /// Makes the range read as zeroes: a hole when `unmap`, else FALLOC_FL_ZERO_RANGE, and
    /// when the filesystem supports neither, by writing zeroes. Returns 0 or an errno.
    public func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Int32 {
        guard inRange(offset, length) else { return EINVAL }
        guard !readOnly else { return EROFS }
        if length == 0 { return 0 }
        if unmap {
            let e = callFallocate(fd, mode: Falloc.punchHole | Falloc.keepSize, offset: offset, length: length)
            if e == 0 { return 0 }
            if e != EOPNOTSUPP && e != ENOSYS { return e }
        }
        let e = callFallocate(fd, mode: Falloc.zeroRange | Falloc.keepSize, offset: offset, length: length)
        if e == 0 { return 0 }
        if e != EOPNOTSUPP && e != ENOSYS && e != EINVAL { return e }
        return writeZeroBytes(offset: offset, length: length)
    }

    /// An aligned zero buffer for writing zeroes (O_DIRECT needs aligned memory).
    static let zeroChunk = 64 << 10
    // nonisolated(unsafe): zeroed once when first used (a lazy global: initialised exactly
    // once), then only ever read, by pwritev on any thread.
    nonisolated(unsafe) static let zeroBuffer: UnsafeMutableRawPointer = {
        var p: UnsafeMutableRawPointer? = nil
        if posix_memalign(&p, 4096, zeroChunk) != 0 || p == nil { p = calloc(1, zeroChunk) }
        memset(p!, 0, zeroChunk)
        return p!
    }()

    func writeZeroBytes(offset: UInt64, length: UInt64) -> Int32 {
        var off = offset
        var left = length
        while left > 0 {
            let n = Int(min(left, UInt64(DiskImage.zeroChunk)))
            let e = transfer([iovec(iov_base: DiskImage.zeroBuffer, iov_len: n)], offset: off, write: true)
            if e != 0 { return e }
            off += UInt64(n)
            left -= UInt64(n)
        }
        return 0
    }
}
