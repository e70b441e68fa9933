import XCTest
import Glibc
import OS
@testable import Boot
import GuestMemory

final class KernelCacheTests: XCTestCase {
    func tempDir() -> String {
        var t = Array("/tmp/swiftlet-kcache-XXXXXX".utf8CString)
        let p = t.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(p != nil)
        return String(nulTerminated: t)
    }

    func removeDir(_ d: String) {
        for n in files(d) { unlink(d + "/" + n) }
        rmdir(d)
    }

    func files(_ d: String) -> [String] {
        var out: [String] = []
        if let dp = opendir(d) {
            while let e = readdir(dp) {
                let n = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if n != "." && n != ".." { out.append(n) }
            }
            closedir(dp)
        }
        return out.sorted()
    }

    func segmentBytes(_ m: GuestMemory, _ k: KernelImage) throws -> [[UInt8]] {
        try k.segments.map { try m.readBytes(at: $0.address, count: Int($0.memSize)) }
    }

    /// First boot unpacks and writes the cache; the next reads it and gives the guest the
    /// very same bytes; a changed kernel file is a miss and gets its own entry.
    func testColdThenWarmGiveTheSameGuestMemory() throws {
        let (path, k) = try requireKernel()
        let dir = tempDir()
        defer { removeDir(dir) }
        let copy = tempFile(k, name: "kc-bz")
        defer { unlink(copy) }
        var cfg = LinuxBootConfig(kernelPath: copy, cmdline: "console=ttyS0")
        cfg.decompressKernel = true
        cfg.kernelCacheDir = dir
        let cold = try makeMemory(256 * MiB)
        let a = try loadLinuxDetailed(cfg, into: cold)
        XCTAssertEqual(files(dir).count, 1)
        XCTAssertTrue(files(dir)[0].hasPrefix("vmlinux-") && files(dir)[0].hasSuffix(".unpacked"))
        var st = stat()
        XCTAssertEqual(stat(dir + "/" + files(dir)[0], &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)

        let warm = try makeMemory(256 * MiB)
        try warm.write([UInt8](repeating: 0x5A, count: 1 << 20), at: a.kernel.segments.last!.address + UInt64(a.kernel.segments.last!.fileSize))
        let b = try loadLinuxDetailed(cfg, into: warm)
        XCTAssertEqual(a.kernel, b.kernel)
        XCTAssertEqual(a.cpu.rip, b.cpu.rip)
        XCTAssertTrue(try segmentBytes(cold, a.kernel) == segmentBytes(warm, b.kernel), "warm boot: the same segments, bss zeroed")
        // The segments' zero pages are holes: the file takes fewer blocks than its size
        // (on a file system with holes; /tmp is tmpfs here)
        var cs = stat()
        XCTAssertEqual(stat(dir + "/" + files(dir)[0], &cs), 0)
        if st.st_blocks * 512 < st.st_size { XCTAssertLessThan(cs.st_blocks * 512, cs.st_size) }
        // The hit came from the cache file, not from unpacking again.
        let mapped = try mapKernelFile(copy)
        guard case let .bzImage(h) = b.kernel.format else { return XCTFail() }
        let bz = try parseBzImage(k, ram: ramOf(256 * MiB))
        XCTAssertNotNil(KernelCache.load(dir: dir, key: mapped.identity, kernel: bz, header: h, into: try makeMemory(256 * MiB)))

        // A new version of the file (other mtime): a miss, unpacked, a second entry.
        var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
        XCTAssertEqual(utimensat(AT_FDCWD, copy, &times, 0), 0)
        XCTAssertNil(KernelCache.load(dir: dir, key: try mapKernelFile(copy).identity, kernel: bz, header: h, into: try makeMemory(256 * MiB)))
        _ = try loadLinuxDetailed(cfg, into: try makeMemory(256 * MiB))
        XCTAssertEqual(files(dir).count, 2)
        _ = path
    }

    /// Hostile or damaged cache files are misses: never an error, never a write outside
    /// guest memory, and the boot still gets the right kernel (unpacked again).
    func testDamagedCacheFilesAreMisses() throws {
        let (_, k) = try requireKernel()
        let dir = tempDir()
        defer { removeDir(dir) }
        let copy = tempFile(k, name: "kc-bz2")
        defer { unlink(copy) }
        var cfg = LinuxBootConfig(kernelPath: copy)
        cfg.decompressKernel = true
        cfg.kernelCacheDir = dir
        let ref = try makeMemory(256 * MiB)
        let info = try loadLinuxDetailed(cfg, into: ref)
        let name = dir + "/" + files(dir)[0]
        let good = try readKernelFile(name)
        let key = try mapKernelFile(copy).identity
        guard case let .bzImage(h) = info.kernel.format else { return XCTFail() }
        let bz = try parseBzImage(k, ram: ramOf(256 * MiB))
        func word(_ i: Int) -> UInt64 { good.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self) } }
        func setting(_ i: Int, _ v: UInt64) -> [UInt8] {
            var b = good
            withUnsafeBytes(of: v.littleEndian) { b.replaceSubrange(8 * i..<8 * i + 8, with: $0) }
            return b
        }
        let n = Int(word(KernelCache.fixedWords - 1))
        let seg0 = KernelCache.fixedWords
        let cases: [(String, [UInt8])] = [
            ("empty", []),
            ("truncated header", Array(good[0..<40])),
            ("truncated data", Array(good[0..<good.count - 1])),
            ("one byte more", good + [0]),
            ("bad magic", setting(0, 0x4141_4141_4141_4141)),
            ("other key", setting(1, word(1) ^ 1)),
            ("no segments", setting(KernelCache.fixedWords - 1, 0)),
            ("too many segments", setting(KernelCache.fixedWords - 1, 1 << 40)),
            ("segment past guest RAM", setting(seg0, 300 * UInt64(MiB))),
            ("segment address wraps", setting(seg0, UInt64.max - 4095)),
            ("file size over mem size", setting(seg0 + 1, word(seg0 + 2) + 1)),
            ("huge mem size", setting(seg0 + 2, UInt64.max)),
            ("end below load", setting(KernelCache.keyWords + 3, 0)),
            ("entry outside the segments", setting(KernelCache.keyWords + 1, 0x10)),
        ]
        XCTAssertGreaterThanOrEqual(n, 3)
        for (what, bytes) in cases {
            unlink(name)
            let fd = open(name, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
            XCTAssertGreaterThanOrEqual(fd, 0)
            if !bytes.isEmpty { XCTAssertTrue(bytes.withUnsafeBytes { KernelCache.writeFully(fd, $0.baseAddress!, $0.count) }) }
            close(fd)
            let m = try makeMemory(256 * MiB)
            XCTAssertNil(KernelCache.load(dir: dir, key: key, kernel: bz, header: h, into: m), what)
            // The boot goes on: unpacked again, the entry replaced by a good one.
            let again = try loadLinuxDetailed(cfg, into: m)
            XCTAssertEqual(again.kernel, info.kernel, what)
            XCTAssertTrue(try segmentBytes(m, again.kernel) == segmentBytes(ref, info.kernel), what)
            XCTAssertTrue(try readKernelFile(name) == good, "\(what): replaced by a good entry")
        }
        // A symlink in its place is not followed.
        unlink(name)
        XCTAssertEqual(symlink(copy, name), 0)
        XCTAssertNil(KernelCache.load(dir: dir, key: key, kernel: bz, header: h, into: try makeMemory(256 * MiB)))
        unlink(name)
        // An unwritable directory: the boot still works and leaves nothing behind.
        var bad = cfg
        bad.kernelCacheDir = dir + "/missing"
        XCTAssertEqual(try loadLinuxDetailed(bad, into: try makeMemory(256 * MiB)).kernel, info.kernel)
        XCTAssertEqual(files(dir), [])
    }

    /// The cache keeps the 4 most recently used entries and drops temporary files of
    /// writers that died long ago (not those of a writer at work).
    func testPruneKeepsTheMostRecentlyUsed() throws {
        let dir = tempDir()
        defer { removeDir(dir) }
        func make(_ name: String, age: Int) {
            let fd = open(dir + "/" + name, O_CREAT | O_WRONLY, 0o600)
            XCTAssertGreaterThanOrEqual(fd, 0)
            close(fd)
            let t = timespec(tv_sec: time(nil) - age, tv_nsec: 0)
            var times = [t, t]
            XCTAssertEqual(utimensat(AT_FDCWD, dir + "/" + name, &times, 0), 0)
        }
        for (i, age) in [500, 100, 4000, 30, 2000, 60].enumerated() { make("vmlinux-\(i).unpacked", age: age) }
        make(".vmlinux-old", age: 3600)
        make(".vmlinux-new", age: 5)
        make("unrelated", age: 99999)
        KernelCache.prune(dir: dir)
        XCTAssertEqual(files(dir), [".vmlinux-new", "unrelated", "vmlinux-0.unpacked", "vmlinux-1.unpacked",
                                    "vmlinux-3.unpacked", "vmlinux-5.unpacked"])
    }
}

final class KernelCacheSparseTests: XCTestCase {
    /// A file of 5 pages: data, hole, data, hole, 100 bytes of data; readData fills only
    /// the data parts of the destination and leaves the holes' part as it was.
    func testReadDataSkipsHolesAndReadsData() throws {
        var t = Array("/tmp/swiftlet-sparse-XXXXXX".utf8CString)
        let fd = t.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd); unlink(String(nulTerminated: t)) }
        let pg = KernelCache.page
        let size = 4 * pg + 100
        XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
        let a = [UInt8](repeating: 0xA1, count: pg), c = [UInt8](repeating: 0xC3, count: pg), e = [UInt8](repeating: 0xE5, count: 100)
        XCTAssertTrue(a.withUnsafeBytes { KernelCache.pwriteFully(fd, $0.baseAddress!, pg, offset: 0) })
        XCTAssertTrue(c.withUnsafeBytes { KernelCache.pwriteFully(fd, $0.baseAddress!, pg, offset: UInt64(2 * pg)) })
        XCTAssertTrue(e.withUnsafeBytes { KernelCache.pwriteFully(fd, $0.baseAddress!, 100, offset: UInt64(4 * pg)) })
        // Destination pre-filled with a marker: a hole must leave it alone (the cache's
        // reader relies on fresh, zero guest RAM there).
        var dst = [UInt8](repeating: 0x77, count: size)
        XCTAssertTrue(dst.withUnsafeMutableBytes { KernelCache.readData(fd, into: $0.baseAddress!, count: size, offset: 0) })
        XCTAssertEqual(Array(dst[0..<pg]), a)
        XCTAssertEqual(Array(dst[2 * pg..<3 * pg]), c)
        XCTAssertEqual(Array(dst[4 * pg..<size]), e)
        let holes = Array(dst[pg..<2 * pg]) + Array(dst[3 * pg..<4 * pg])
        // On a file system with holes they are skipped; without, they read as zeros.
        XCTAssertTrue(holes.allSatisfy { $0 == 0x77 } || holes.allSatisfy { $0 == 0 })
        // A range that starts inside a hole and one past the end of the data.
        var mid = [UInt8](repeating: 0x77, count: pg + 10)
        XCTAssertTrue(mid.withUnsafeMutableBytes { KernelCache.readData(fd, into: $0.baseAddress!, count: pg + 10, offset: UInt64(pg + pg / 2 + 0)) })
        XCTAssertEqual(Array(mid[pg / 2..<pg]), Array(c[0..<pg / 2]))
        var none = [UInt8](repeating: 0x77, count: 10)
        XCTAssertFalse(none.withUnsafeMutableBytes { KernelCache.readData(fd, into: $0.baseAddress!, count: 10, offset: UInt64(size)) },
                       "a range past the end of the file is a short read")
    }

    func testIsZero() {
        XCTAssertTrue([UInt8](repeating: 0, count: 4096).withUnsafeBytes { KernelCache.isZero($0.baseAddress!, 4096) })
        for i in [0, 7, 8, 4095, 4090] {
            var b = [UInt8](repeating: 0, count: 4096); b[i] = 1
            XCTAssertFalse(b.withUnsafeBytes { KernelCache.isZero($0.baseAddress!, 4096) }, "byte \(i)")
        }
        XCTAssertTrue([UInt8](repeating: 0, count: 13).withUnsafeBytes { KernelCache.isZero($0.baseAddress!, 13) })
    }
}
