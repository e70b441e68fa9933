// Reading kernel and initrd files with open/fstat/read (no Foundation).
import Glibc

/// An open regular file. Closed on deinit.
final class InputFile {
    let fd: Int32
    let size: UInt64
    let path: String
    /// Which file this is, and which version of it: device, inode, size, mtime and ctime
    /// (seconds, nanoseconds). The unpacked-kernel cache's key.
    let identity: [UInt64]

    enum Failure: Error { case notFound, unreadable(Int32) }

    init(path: String) throws {
        // O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer.
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            throw (e == ENOENT || e == ENOTDIR) ? Failure.notFound : Failure.unreadable(e)
        }
        var st = stat()
        if fstat(fd, &st) != 0 { let e = errno; close(fd); throw Failure.unreadable(e) }
        let fmt = st.st_mode & S_IFMT
        if fmt == S_IFDIR { close(fd); throw Failure.unreadable(EISDIR) }
        if fmt != S_IFREG { close(fd); throw Failure.unreadable(EINVAL) }
        self.fd = fd
        self.size = UInt64(st.st_size)
        self.path = path
        identity = [UInt64(st.st_dev), UInt64(st.st_ino), UInt64(st.st_size),
                    UInt64(bitPattern: Int64(st.st_mtim.tv_sec)), UInt64(bitPattern: Int64(st.st_mtim.tv_nsec)),
                    UInt64(bitPattern: Int64(st.st_ctim.tv_sec)), UInt64(bitPattern: Int64(st.st_ctim.tv_nsec))]
    }

    deinit { close(fd) }

    /// Reads exactly `count` bytes from `offset` into `dst`; a file that shrank reads as EIO.
    func read(into dst: UnsafeMutableRawPointer, count: Int, offset: UInt64 = 0) throws {
        let e = preadFully(fd, dst, count, offset: offset)
        if e != 0 { throw Failure.unreadable(e) }
    }

    /// The whole file mapped read-only (MAP_PRIVATE), so a kernel can be parsed and copied
    /// into guest RAM with one copy. Unmapped when the returned object goes away. Pages
    /// are mapped as they are read: a boot from the unpacked-kernel cache reads only the
    /// header; `MappedBytes.prefetch()` maps everything before a whole-file read.
    func map() throws -> MappedBytes {
        guard size > 0, size <= UInt64(Int.max / 2) else { throw Failure.unreadable(EFBIG) }
        guard let p = mmap(nil, Int(size), PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw Failure.unreadable(errno)
        }
        return MappedBytes(base: p, count: Int(size), identity: identity)
    }

    /// The whole file as bytes (read straight into uninitialised storage: no zero-fill
    /// pass over a kernel-sized buffer).
    func readAll() throws -> [UInt8] {
        guard size <= UInt64(Int.max / 2) else { throw Failure.unreadable(EFBIG) }
        let n = Int(size)
        var failure: Failure?
        let out = [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            count = 0
            guard let base = buf.baseAddress, n > 0 else { return }
            do { try read(into: base, count: n); count = n } catch { failure = error as? Failure ?? .unreadable(EIO) }
        }
        if let failure { throw failure }
        return out
    }
}

/// The largest kernel file read into memory (a vmlinux with full debug info can be
/// several hundred MiB; a bzImage is 10-20 MiB).
public let maxKernelFileSize: UInt64 = 1 << 30

/// Reads a kernel image, mapping failures to the kernel errors.
/// The kernel file mapped read-only (same checks and errors as `readKernelFile`).
func mapKernelFile(_ path: String) throws -> MappedBytes {
    do {
        let f = try InputFile(path: path)
        if f.size == 0 { throw BootError.emptyKernel(path) }
        if f.size > maxKernelFileSize { throw BootError.kernelFileTooLarge(path, size: f.size, max: maxKernelFileSize) }
        return try f.map()
    } catch let e as InputFile.Failure {
        switch e {
        case .notFound: throw BootError.kernelNotFound(path)
        case let .unreadable(n): throw BootError.kernelUnreadable(path, errno: n)
        }
    }
}

public func readKernelFile(_ path: String) throws -> [UInt8] {
    do {
        let f = try InputFile(path: path)
        if f.size == 0 { throw BootError.emptyKernel(path) }
        if f.size > maxKernelFileSize { throw BootError.kernelFileTooLarge(path, size: f.size, max: maxKernelFileSize) }
        return try f.readAll()
    } catch let e as InputFile.Failure {
        switch e {
        case .notFound: throw BootError.kernelNotFound(path)
        case let .unreadable(n): throw BootError.kernelUnreadable(path, errno: n)
        }
    }
}

/// A read-only file mapping.
final class MappedBytes {
    let base: UnsafeMutableRawPointer
    let count: Int
    /// InputFile.identity of the mapped file.
    let identity: [UInt64]
    init(base: UnsafeMutableRawPointer, count: Int, identity: [UInt64]) {
        self.base = base; self.count = count; self.identity = identity
    }
    deinit { munmap(base, count) }
    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }

    /// Maps the whole file at once before it is read through (MADV_POPULATE_READ, Linux
    /// 5.14; older kernels fall back to MADV_WILLNEED and faults as it is read).
    func prefetch() {
        if madvise(base, count, 22 /* MADV_POPULATE_READ */) != 0 { _ = madvise(base, count, MADV_WILLNEED) }
    }
}

/// pread until `count` bytes from `offset` are in `dst`: 0, or the errno (EIO when the
/// file ends first).
func preadFully(_ fd: Int32, _ dst: UnsafeMutableRawPointer, _ count: Int, offset: UInt64) -> Int32 {
    var done = 0
    while done < count {
        let n = pread(fd, dst + done, min(count - done, 1 << 30), off_t(offset) + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            return errno
        }
        if n == 0 { return EIO }
        done += n
    }
    return 0
}
