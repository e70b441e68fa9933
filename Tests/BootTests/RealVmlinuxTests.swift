import XCTest
import Glibc
@testable import Boot
@testable import GuestMemory

/// LZ4 "legacy" frame decoder (what the kernel's CONFIG_KERNEL_LZ4 payload uses), to get
/// the real ELF vmlinux out of the test bzImage without external tools. Nil on anything
/// it does not understand.
func lz4LegacyDecompress(_ src: [UInt8], maxOutput: Int = 256 << 20) -> [UInt8]? {
    guard src.count >= 8, le(src, 0, UInt32.self) == 0x184c_2102 else { return nil }
    // Unsafe pointers throughout: this runs on ~50 MB in debug builds.
    var out = [UInt8](repeating: 0, count: maxOutput)
    var n = 0
    let ok: Bool = src.withUnsafeBufferPointer { sb in
        out.withUnsafeMutableBufferPointer { ob in
            let s = sb.baseAddress!, o = ob.baseAddress!
            let count = sb.count
            var p = 4
            while p + 4 <= count {
                let size = Int(UInt32(s[p]) | UInt32(s[p + 1]) << 8 | UInt32(s[p + 2]) << 16 | UInt32(s[p + 3]) << 24)
                if size == 0x184c_2102 { p += 4; continue }
                guard size <= count - p - 4 else { break }   // the trailing uncompressed-size word
                p += 4
                let end = p + size
                while p < end {
                    let token = Int(s[p]); p += 1
                    var lit = token >> 4
                    if lit == 15 { while p < end { let b = Int(s[p]); p += 1; lit += b; if b != 255 { break } } }
                    guard lit <= end - p, lit <= maxOutput - n else { return false }
                    (o + n).update(from: s + p, count: lit); n += lit; p += lit
                    if p >= end { break }
                    guard p + 2 <= end else { return false }
                    let off = Int(s[p]) | Int(s[p + 1]) << 8; p += 2
                    var ml = (token & 15) + 4
                    if token & 15 == 15 { while p < end { let b = Int(s[p]); p += 1; ml += b; if b != 255 { break } } }
                    guard off > 0, off <= n, ml <= maxOutput - n else { return false }
                    if off >= ml {
                        (o + n).update(from: o + n - off, count: ml)
                    } else {
                        for k in 0..<ml { o[n + k] = o[n - off + k] }
                    }
                    n += ml
                }
            }
            return true
        }
    }
    guard ok else { return nil }
    out.removeLast(out.count - n)
    return out
}

final class RealVmlinuxTests: XCTestCase {
    /// The ELF vmlinux inside the test bzImage, when its payload is LZ4 (Debian's is).
    func testRealVmlinuxFromBzImage() throws {
        let (_, k) = try requireKernel()
        let setup = (Int(k[0x1f1] == 0 ? 4 : k[0x1f1]) + 1) * 512
        let po = Int(le(k, 0x248, UInt32.self)), pl = Int(le(k, 0x24c, UInt32.self))
        XCTAssertLessThanOrEqual(setup + po + pl, k.count)
        let payload = Array(k[(setup + po)..<(setup + po + pl)])
        guard le(payload, 0, UInt32.self) == 0x184c_2102 else {
            // Not LZ4 (a different kernel build): the bzImage tests cover it; nothing to check here.
            print("test kernel payload is not LZ4 (magic \(payload.prefix(4))): real vmlinux check not applicable")
            return
        }
        let vmlinux = try XCTUnwrap(lz4LegacyDecompress(payload), "LZ4 payload did not decode")
        XCTAssertEqual(vmlinux.count, Int(le(payload, payload.count - 4, UInt32.self)))
        let ram = ramOf(256 * MiB)
        let img = try parseKernel(vmlinux, ram: ram)
        XCTAssertEqual(img.format, .elf)
        XCTAssertEqual(img.entry, 0x100_0000)       // phys_startup_64
        XCTAssertEqual(img.loadAddress, 0x100_0000)
        XCTAssertGreaterThanOrEqual(img.segments.count, 3)
        let m = try makeMemory(256 * MiB)
        try loadKernelSegments(img, from: vmlinux, into: m)
        for s in img.segments {
            let n = min(s.fileSize, 4096)
            XCTAssertEqual(try m.readBytes(at: s.address, count: n), Array(vmlinux[s.fileOffset..<s.fileOffset + n]))
        }
        // Too little memory for it.
        assertThrowsBoot(try parseKernel(vmlinux, ram: ramOf(32 * MiB))) { if case .elfSegmentOutsideRAM = $0 { return true }; return false }
        // Truncated vmlinux: segments past the end.
        assertThrowsBoot(try parseKernel(Array(vmlinux.prefix(vmlinux.count / 2)), ram: ram)) {
            if case .elfSegmentOutsideFile = $0 { return true }; return false
        }
    }

    func testLZ4DecoderRejectsGarbage() {
        XCTAssertNil(lz4LegacyDecompress([]))
        XCTAssertNil(lz4LegacyDecompress([1, 2, 3, 4, 5, 6, 7, 8]))
        // Magic, one 3-byte block: a match offset beyond the output.
        XCTAssertNil(lz4LegacyDecompress([0x02, 0x21, 0x4c, 0x18, 3, 0, 0, 0, 0x00, 0x05, 0x00]))
        // Literal-only block "abc".
        XCTAssertEqual(lz4LegacyDecompress([0x02, 0x21, 0x4c, 0x18, 4, 0, 0, 0, 0x30, 0x61, 0x62, 0x63]), Array("abc".utf8))
    }
}
