// The unpacked-kernel cache (--kernel-cache DIR): the vmlinux segments swiftlet unpacked
// from a bzImage, kept in a file so the next boot of the same kernel file reads them
// straight into guest memory instead of decoding the LZ4 payload again at every boot.
//
// One file per kernel file version, named after a hash of its key: the kernel file's
// device, inode, size, mtime and ctime. A changed or replaced kernel file has another
// key, so a stale entry is never used. Layout, all little-endian UInt64:
//   magic "SWKCACH3" | key (7) | entry | loadAddress | end | n |
//   n x (address, fileSize, memSize, offset in the vmlinux)
//   then the n segments' file bytes, each from the next page-aligned file offset (bss
//   is not stored: it is zeroed). The segments' all-zero pages are holes in the file
//   (a third of a distribution kernel: .bss, .brk and .init.scratch are in its file
//   image): a load reads only the file's data (lseek SEEK_DATA/SEEK_HOLE) into guest
//   RAM, which is fresh and so zero already, and a page the guest never touches is
//   never faulted in. A file system without holes stores and reads the zeros.
// A cache file is written to a temporary name and renamed into place, so a reader sees
// a whole file or none. Reading trusts nothing in it: a file that is not the user's own
// regular file, has another key or size, or describes segments outside guest RAM is a
// miss (swiftlet unpacks again and replaces it); it can never make swiftlet read or
// write outside guest memory.
import GuestMemory
import Glibc
import OS

enum KernelCache {
    static let magic: [UInt8] = Array("SWKCACH3".utf8)
    /// Segment data starts at multiples of this in the file, so a zero page is a whole hole.
    static let page = 4096
    static let segmentWords = 4
    static let maxSegments = 64
    static let keyWords = 7
    /// Words before the segment table: magic, key, entry, loadAddress, end, n.
    static let fixedWords = 1 + keyWords + 4

    /// "vmlinux-<FNV-1a of the key>.unpacked".
    static func fileName(key: [UInt64]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for w in key { for b in 0..<8 { h = (h ^ ((w >> (8 * UInt64(b))) & 0xFF)) &* 0x0100_0000_01b3 } }
        let hex = String(h, radix: 16)
        return "vmlinux-" + String(repeating: "0", count: 16 - hex.count) + hex + ".unpacked"
    }

    /// The cached segments for `key` loaded into `memory`, as the image `kernel` (the
    /// bzImage's, for its header and limits) unpacks to; nil on a miss or an unusable file.
    static func load(dir: String, key: [UInt64], kernel: KernelImage, header h: SetupHeader,
                     into memory: GuestMemory) -> KernelImage? {
        guard key.count == keyWords else { return nil }
        let fd = open(dir + "/" + fileName(key: key), O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_uid == geteuid(), st.st_size > 0 else { return nil }
        let fileSize = UInt64(st.st_size)
        func words(_ n: Int, at offset: UInt64) -> [UInt64]? {
            var w = [UInt64](repeating: 0, count: n)
            let want = 8 * n
            let got = w.withUnsafeMutableBytes { preadFully(fd, $0.baseAddress!, want, offset: offset) == 0 }
            return got ? w.map { UInt64(littleEndian: $0) } : nil
        }
        guard let fixed = words(fixedWords, at: 0) else { return nil }
        let m = withUnsafeBytes(of: fixed[0].littleEndian) { Array($0) }
        guard m == magic, Array(fixed[1...keyWords]) == key else { return nil }
        let entry = fixed[keyWords + 1], loadAddress = fixed[keyWords + 2], end = fixed[keyWords + 3]
        let n = fixed[keyWords + 4]
        guard n >= 1, n <= UInt64(maxSegments), loadAddress < end,
              let table = words(segmentWords * Int(n), at: UInt64(8 * fixedWords)) else { return nil }
        var segments: [KernelSegment] = []
        var dataOffset = UInt64(8 * (fixedWords + segmentWords * Int(n)))
        var data: [UInt64] = []
        func aligned(_ x: UInt64) -> UInt64 { (x + UInt64(page) - 1) & ~UInt64(page - 1) }
        for i in 0..<Int(n) {
            let t = segmentWords * i
            let address = table[t], size = table[t + 1], memSize = table[t + 2], elfOffset = table[t + 3]
            guard size <= memSize, memSize <= 1 << 30, address >= loadAddress,
                  address <= end, memSize <= end - address,
                  (try? memory.pointer(address, length: memSize)) != nil,
                  dataOffset <= fileSize, size <= fileSize, aligned(dataOffset) <= fileSize - size,
                  elfOffset <= 1 << 30 else { return nil }
            dataOffset = aligned(dataOffset)
            segments.append(KernelSegment(fileOffset: Int(elfOffset), fileSize: Int(size), address: address, memSize: memSize))
            data.append(dataOffset)
            dataOffset += size
        }
        guard dataOffset == fileSize,
              segments.contains(where: { entry >= $0.address && entry < $0.address + $0.memSize }) else { return nil }
        for (s, at) in zip(segments, data) {
            guard let dst = try? memory.pointer(s.address, length: s.memSize),
                  readData(fd, into: dst, count: s.fileSize, offset: at) else { return nil }
            if s.memSize > UInt64(s.fileSize) {
                (dst + s.fileSize).initializeMemory(as: UInt8.self, repeating: 0, count: Int(s.memSize) - s.fileSize)
            }
        }
        _ = futimens(fd, nil)  // most recently used: kept longest by `prune`
        return KernelImage(format: .bzImage(h), segments: segments, entry: entry, loadAddress: loadAddress, end: end,
                           cmdlineMax: kernel.cmdlineMax, initrdAddrMax: kernel.initrdAddrMax)
    }

    /// lseek's SEEK_DATA and SEEK_HOLE (Linux; glibc declares them only with _GNU_SOURCE).
    static let seekData: Int32 = 3, seekHole: Int32 = 4

    /// Reads the data of file range [offset, offset + count) into `dst`, skipping the
    /// file's holes: `dst` must be zero already (fresh guest RAM), as a hole reads.
    static func readData(_ fd: Int32, into dst: UnsafeMutableRawPointer, count: Int, offset: UInt64) -> Bool {
        let start = off_t(offset), end = off_t(offset) + off_t(count)
        // A hole past the end of the file would read as zeros: a file shorter than the
        // range (one that shrank since it was checked) is a failed read, as with pread.
        var st = stat()
        guard fstat(fd, &st) == 0, end <= st.st_size else { return false }
        var pos = start
        while pos < end {
            let d = lseek(fd, pos, seekData)
            if d < 0 {
                // ENXIO: no data after pos (the rest is a hole). Anything else (a file
                // system without SEEK_DATA): read the rest as it is.
                if errno == ENXIO { return true }
                return preadFully(fd, dst + Int(pos - start), Int(end - pos), offset: UInt64(pos)) == 0
            }
            if d >= end { return true }
            let h = lseek(fd, max(d, pos), seekHole)
            let stop = h < 0 ? end : min(max(h, d + 1), end)
            let from = max(d, pos)
            guard preadFully(fd, dst + Int(from - start), Int(stop - from), offset: UInt64(from)) == 0 else { return false }
            pos = stop
        }
        return true
    }

    /// Writes `image`'s segments, as they are in `memory` now, for `key`. Best effort:
    /// any failure leaves no file behind (the next boot unpacks again).
    static func store(dir: String, key: [UInt64], image: KernelImage, memory: GuestMemory) {
        guard key.count == keyWords, !image.segments.isEmpty, image.segments.count <= maxSegments else { return }
        var header: [UInt64] = [magic.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }.littleEndian]
        header += key + [image.entry, image.loadAddress, image.end, UInt64(image.segments.count)]
        for s in image.segments { header += [s.address, UInt64(s.fileSize), s.memSize, UInt64(s.fileOffset)] }
        var template = Array((dir + "/.vmlinux-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { return }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        let tmp = String(nulTerminated: template)
        var ok = fchmod(fd, 0o600) == 0
        ok = ok && header.map(\.littleEndian).withUnsafeBytes { writeFully(fd, $0.baseAddress!, $0.count) }
        // Each segment from a page-aligned offset; its all-zero pages are left as holes
        // (the file's size is set first, so a trailing zero page is a hole too).
        var at = UInt64(8 * header.count)
        var places: [UInt64] = []
        for s in image.segments {
            at = (at + UInt64(page) - 1) & ~UInt64(page - 1)
            places.append(at)
            at += UInt64(s.fileSize)
        }
        ok = ok && ftruncate(fd, off_t(at)) == 0
        for (s, place) in zip(image.segments, places) where ok {
            guard let src = try? memory.pointer(s.address, length: UInt64(s.fileSize)) else { ok = false; break }
            var off = 0
            while ok && off < s.fileSize {
                let n = min(page, s.fileSize - off)
                if !isZero(src + off, n) { ok = pwriteFully(fd, src + off, n, offset: place + UInt64(off)) }
                off += n
            }
        }
        ok = close(fd) == 0 && ok
        if !ok || rename(tmp, dir + "/" + fileName(key: key)) != 0 { unlink(tmp) }
        prune(dir: dir)
    }

    /// Entries kept: the most recently used (written or read) ones.
    static let keep = 4

    /// Removes all but the `keep` most recently used entries, and temporary files left
    /// by writers that died more than 10 minutes ago.
    static func prune(dir: String) {
        guard let dp = opendir(dir) else { return }
        var entries: [(name: String, mtime: Int)] = []
        let now = time(nil)
        while let e = readdir(dp) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            let isEntry = name.hasPrefix("vmlinux-") && name.hasSuffix(".unpacked")
            guard isEntry || name.hasPrefix(".vmlinux-") else { continue }
            var st = stat()
            guard lstat(dir + "/" + name, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_uid == geteuid() else { continue }
            if isEntry {
                entries.append((name, st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec))
            } else if now - st.st_mtim.tv_sec > 600 {
                unlink(dir + "/" + name)
            }
        }
        closedir(dp)
        for old in entries.sorted(by: { $0.mtime > $1.mtime }).dropFirst(keep) { unlink(dir + "/" + old.name) }
    }

    static func isZero(_ p: UnsafeRawPointer, _ n: Int) -> Bool {
        var i = 0
        while i + 8 <= n { if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }; i += 8 }
        while i < n { if p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }; i += 1 }
        return true
    }

    static func pwriteFully(_ fd: Int32, _ src: UnsafeRawPointer, _ count: Int, offset: UInt64) -> Bool {
        var done = 0
        while done < count {
            let n = pwrite(fd, src + done, count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    static func writeFully(_ fd: Int32, _ src: UnsafeRawPointer, _ count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = write(fd, src + done, min(count - done, 1 << 30))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }
}
