import XCTest
import Glibc
@testable import Boot

/// The LZ4 legacy-frame decoder: against the lz4 tool, against Debian's real kernel
/// payload, and against hostile frames (every error path, and random corruption).
final class LZ4Tests: XCTestCase {
    let magic: [UInt8] = [0x02, 0x21, 0x4c, 0x18]

    func le32(_ v: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    func frame(_ blocks: [[UInt8]], trailer: Int? = nil) -> [UInt8] {
        magic + blocks.flatMap { le32($0.count) + $0 } + (trailer.map(le32) ?? [])
    }
    func expectError(_ e: LZ4Error, _ input: [UInt8], limit: Int = 1 << 20, line: UInt = #line) {
        XCTAssertThrowsError(try LZ4.decompressLegacy(input, limit: limit), line: line) {
            XCTAssertEqual($0 as? LZ4Error, e, line: line)
        }
    }

    func testLiteralsOnlyAndOverlappingMatch() throws {
        // "abc", then a match of 9 at offset 3 (overlapping: "abcabcabc"), then literal "Z".
        let block: [UInt8] = [0x35, 0x61, 0x62, 0x63, 0x03, 0x00, 0x10, 0x5a]
        XCTAssertEqual(try LZ4.decompressLegacy(frame([block]), limit: 100), Array("abcabcabcabcZ".utf8))
        // Run-length: one literal, then offset 1 with an extended match length (15 + 255 + 10 + 4).
        let rle: [UInt8] = [0x1f, 0x78, 0x01, 0x00, 0xff, 0x0a, 0x00]
        XCTAssertEqual(try LZ4.decompressLegacy(frame([rle]), limit: 1000), [UInt8](repeating: 0x78, count: 1 + 284))
        // Two blocks, a trailer with the right size, and a second frame's magic in between.
        let two = magic + le32(block.count) + block + magic + le32(block.count) + block + le32(26)
        XCTAssertEqual(try LZ4.decompressLegacy(two, limit: 100).count, 26)
        // Empty frame.
        XCTAssertEqual(try LZ4.decompressLegacy(magic, limit: 0), [])
    }

    func testHostileFrames() {
        expectError(.badMagic, [])
        expectError(.badMagic, [0x04, 0x22, 0x4d, 0x18, 0, 0, 0, 0])  // the modern frame magic
        expectError(.truncated(at: 4), magic + [0x01, 0x00])
        expectError(.truncated(at: 12), magic + le32(100) + [0, 0, 0, 0])
        expectError(.blockTooLarge(size: 0x7fff_ffff, at: 4), magic + le32(0x7fff_ffff) + [0, 0, 0, 0])
        // offset 0, and an offset before the block's start
        expectError(.badOffset(at: 10), frame([[0x10, 0x61, 0x00, 0x00, 0x00]]))
        expectError(.badOffset(at: 10), frame([[0x10, 0x61, 0x02, 0x00, 0x00]]))
        // literal length runs past the block; extension bytes end early; offset cut
        expectError(.truncated(at: 11), frame([[0x50, 0x61, 0x62]]))
        expectError(.truncated(at: 10), frame([[0xf0, 0xff]]))
        expectError(.truncated(at: 11), frame([[0x10, 0x61, 0x01]]))
        // a match without the final literals-only sequence
        expectError(.truncated(at: 12), frame([[0x10, 0x61, 0x01, 0x00]]))
        // output beyond the limit, and beyond the trailer's size
        let rle: [UInt8] = [0x1f, 0x78, 0x01, 0x00, 0xff, 0x0a, 0x00]
        expectError(.outputTooLarge(limit: 100), frame([rle]), limit: 100)
        expectError(.outputTooLarge(limit: 10), frame([rle], trailer: 10))
        expectError(.outputTooLarge(limit: 5), frame([rle], trailer: 1000), limit: 5)
        expectError(.sizeMismatch(trailer: 1000, produced: 285), frame([rle], trailer: 1000), limit: 2000)
        // a block that decompresses to more than 8 MiB (the legacy block limit)
        var big: [UInt8] = [0x1f, 0x00, 0x01, 0x00]
        big += [UInt8](repeating: 0xff, count: (LZ4.legacyBlockSize + 255) / 255) + [0x00, 0x00]
        expectError(.blockOutputTooLarge(at: 8), frame([big]), limit: 64 << 20)
    }

    /// Random frames and random corruption of a valid one never crash the decoder or
    /// write past its limit: each either decodes within the limit or throws.
    func testRandomCorruptionNeverCrashes() throws {
        var rng = SystemRandomNumberGenerator()
        let text = Array(String(repeating: "swiftlet boots linux; virtio-mmio queue kick ", count: 200).utf8)
        let valid = try compressWithTool(text)
        for round in 0..<3000 {
            var f: [UInt8]
            if round % 3 == 0 {
                f = magic + (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            } else {
                f = valid
                for _ in 0..<Int.random(in: 1...8, using: &rng) {
                    let i = Int.random(in: 4..<f.count, using: &rng)
                    f[i] = UInt8.random(in: 0...255, using: &rng)
                }
                if round % 5 == 0 { f.removeLast(Int.random(in: 1..<min(40, f.count - 4), using: &rng)) }
            }
            if let out = try? LZ4.decompressLegacy(f, limit: 20_000) { XCTAssertLessThanOrEqual(out.count, 20_000) }
        }
    }

    /// Compresses with `lz4 -l` (legacy format), the Debian lz4 tool (scripts/deps).
    func compressWithTool(_ data: [UInt8]) throws -> [UInt8] {
        let dir = "/tmp/swiftlet-lz4-\(getpid())"
        mkdir(dir, 0o700)
        defer { _ = system("rm -rf '\(dir)'") }
        let input = dir + "/in", output = dir + "/out"
        let f = try XCTUnwrap(fopen(input, "wb"))
        _ = data.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
        let status = system("lz4 -l -q -f '\(input)' '\(output)' 2>/dev/null")
        XCTAssertEqual(status, 0, "lz4 -l failed: is the lz4 package installed (scripts/deps --install)?")
        return try readKernelFile(output)
    }

    func testAgreesWithTheLZ4Tool() throws {
        var rng = SystemRandomNumberGenerator()
        var data = Array(String(repeating: "virtqueue descriptor chain; ", count: 40_000).utf8)  // ~1.1 MiB, compressible
        data += (0..<300_000).map { _ in UInt8.random(in: 0...255, using: &rng) }               // incompressible
        data += [UInt8](repeating: 0, count: 9 << 20)                                              // > one 8 MiB block
        let c = try compressWithTool(data)
        XCTAssertLessThan(c.count, data.count / 4)
        XCTAssertEqual(try LZ4.decompressLegacy(c, limit: 64 << 20), data)
        expectError(.outputTooLarge(limit: data.count - 1), c, limit: data.count - 1)
    }

    /// Debian's kernel: the bzImage payload is an LZ4 legacy frame with the size trailer;
    /// it decompresses to an x86-64 ELF vmlinux of exactly the trailer's size.
    func testDebianKernelPayload() throws {
        let k = try requireKernel()
        let img = try parseBzImage(k.bytes, ram: [(0, 1 << 30)])
        guard case let .bzImage(h) = img.format else { return XCTFail("not a bzImage") }
        let start = img.segments[0].fileOffset + Int(h.payloadOffset)
        let payload = Array(k.bytes[start..<start + Int(h.payloadLength)])
        guard payload.starts(with: magic) else {
            return XCTFail("\(k.path): payload is not LZ4 (\(Array(payload.prefix(4)))); the Debian guest kernel's is")
        }
        let out = try LZ4.decompressLegacy(payload, limit: 256 << 20)
        XCTAssertEqual(Array(out.prefix(4)), [0x7f, 0x45, 0x4c, 0x46])
        let trailer = payload.suffix(4).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        XCTAssertEqual(out.count, trailer)
        let elf = try parseELFKernel(out, ram: [(0, 1 << 30)])
        XCTAssertEqual(elf.entry, 0x100_0000)
    }
}
