// LZ4 "legacy" frames, the format of an LZ4-compressed Linux kernel payload
// (CONFIG_KERNEL_LZ4, which Debian's x86 kernels use): the magic 0x184C2102, then
// blocks, each a 4-byte little-endian compressed size and one LZ4 block that
// decompresses on its own to at most 8 MiB. The kernel's piggy appends the
// uncompressed size as a last 4-byte word.
//
// swiftlet decompresses the payload itself so that the guest does not have to: in a
// nested guest the kernel's own decompressor (copy, decompress, then move the ELF
// segments) takes a large share of the boot. Everything here is hostile input: every
// length, offset and copy is checked against the input and the output limit.

public enum LZ4Error: Error, Equatable, CustomStringConvertible {
    case badMagic
    case truncated(at: Int)
    case blockTooLarge(size: Int, at: Int)
    case outputTooLarge(limit: Int)
    case badOffset(at: Int)
    case blockOutputTooLarge(at: Int)
    case sizeMismatch(trailer: Int, produced: Int)
    case blockCount(blocks: Int, trailer: Int)

    public var description: String {
        switch self {
        case .badMagic: return "not an LZ4 legacy frame"
        case let .truncated(at): return "LZ4 data ends early (at byte \(at))"
        case let .blockTooLarge(size, at): return "LZ4 block of \(size) bytes at byte \(at) is larger than a block can be"
        case let .outputTooLarge(limit): return "LZ4 data decompresses to more than \(limit) bytes"
        case let .badOffset(at): return "LZ4 match at byte \(at) points before the start of its block"
        case let .blockOutputTooLarge(at): return "LZ4 block at byte \(at) decompresses to more than 8 MiB"
        case let .sizeMismatch(trailer, produced):
            return "LZ4 payload says it decompresses to \(trailer) bytes, but gives \(produced)"
        case let .blockCount(blocks, trailer):
            return "LZ4 payload has \(blocks) blocks, which cannot make the \(trailer) bytes it says it decompresses to"
        }
    }
}

public enum LZ4 {
    public static let legacyMagic: UInt32 = 0x184C_2102
    /// Uncompressed size of a legacy block (at most).
    public static let legacyBlockSize = 8 << 20
    /// LZ4_compressBound(8 MiB): the largest compressed legacy block.
    public static let maxCompressedBlock = legacyBlockSize + legacyBlockSize / 255 + 16

    public static func isLegacyFrame(_ b: UnsafeRawBufferPointer) -> Bool {
        b.count >= 4 && le32(b, 0) == legacyMagic
    }

    static func le32(_ b: UnsafeRawBufferPointer, _ o: Int) -> UInt32 {
        UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
    }

    /// Decompresses a legacy frame of `input` (more frames may follow; a last lone 4-byte
    /// word is the kernel's uncompressed-size trailer and must match). At most `limit`
    /// bytes of output.
    public static func decompressLegacy(_ input: [UInt8], limit: Int) throws -> [UInt8] {
        try input.withUnsafeBytes { try decompressLegacy($0, limit: limit) }
    }

    /// A legacy frame's blocks (where each compressed block starts in the input, and its
    /// size) and the kernel's uncompressed-size trailer, if there is one. Every size is
    /// checked against the input.
    public struct LegacyFrame {
        public let blocks: [(start: Int, size: Int)]
        public let trailer: Int?
    }

    public static func parseLegacyFrame(_ input: UnsafeRawBufferPointer) throws -> LegacyFrame {
        guard isLegacyFrame(input) else { throw LZ4Error.badMagic }
        let n = input.count
        var pos = 4
        var blocks: [(start: Int, size: Int)] = []
        var trailer: Int?
        while pos < n {
            guard n - pos >= 4 else { throw LZ4Error.truncated(at: pos) }
            let word = le32(input, pos)
            if word == legacyMagic { pos += 4; continue }  // concatenated frames
            if n - pos == 4 { trailer = Int(word); pos += 4; break }
            let size = Int(word)
            guard size <= maxCompressedBlock else { throw LZ4Error.blockTooLarge(size: size, at: pos) }
            pos += 4
            guard size <= n - pos else { throw LZ4Error.truncated(at: n) }
            blocks.append((pos, size))
            pos += size
        }
        return LegacyFrame(blocks: blocks, trailer: trailer)
    }

    /// Decodes one block of a legacy frame into `dst` (at most `dst.count` bytes, and
    /// never more than a legacy block holds); returns the bytes written. Bytes of `dst`
    /// past that count may have been overwritten.
    public static func decodeLegacyBlock(_ input: UnsafeRawBufferPointer, _ block: (start: Int, size: Int),
                                         into dst: UnsafeMutableRawBufferPointer) throws -> Int {
        guard block.start >= 0, block.size >= 0, block.start <= input.count - block.size else {
            throw LZ4Error.truncated(at: input.count)
        }
        guard let base = dst.baseAddress else {
            if block.size == 0 { return 0 }
            throw LZ4Error.blockOutputTooLarge(at: block.start)
        }
        switch decodeBlock(input.baseAddress! + block.start, block.size, base.assumingMemoryBound(to: UInt8.self),
                           min(dst.count, legacyBlockSize), inputOffset: block.start) {
        case let .success(k): return k
        case let .failure(e): throw e
        }
    }

    public static func decompressLegacy(_ input: UnsafeRawBufferPointer, limit: Int) throws -> [UInt8] {
        // First pass: the total output size bound, so the output is allocated once.
        let frame = try parseLegacyFrame(input)
        let blocks = frame.blocks, trailer = frame.trailer
        // Output capacity: the trailer's size when there is one, else 8 MiB a block; never
        // more than `limit`. Pages never written are never touched.
        let perBlocks = blocks.count.multipliedReportingOverflow(by: legacyBlockSize)
        var cap = perBlocks.overflow ? limit : min(limit, perBlocks.partialValue)
        if let t = trailer {
            guard t <= limit else { throw LZ4Error.outputTooLarge(limit: limit) }
            cap = min(cap, t)
        }
        let out = try [UInt8](unsafeUninitializedCapacity: max(cap, 1)) { buf, count in
            count = 0
            for (start, size) in blocks {
                let room = min(legacyBlockSize, cap - count)
                switch decodeBlock(input.baseAddress! + start, size, buf.baseAddress! + count, room, inputOffset: start) {
                case let .success(k): count += k
                case let .failure(e):
                    if case .blockOutputTooLarge = e, room < legacyBlockSize {
                        throw LZ4Error.outputTooLarge(limit: trailer.map { min($0, limit) } ?? limit)
                    }
                    throw e
                }
            }
        }
        if let t = trailer, t != out.count { throw LZ4Error.sizeMismatch(trailer: t, produced: out.count) }
        return out
    }

    enum BlockResult { case success(Int), failure(LZ4Error) }

    /// One LZ4 block: `src[0..<srcLen]` into `dst[0..<room]`; returns the bytes written.
    /// Bytes of `dst` past the returned count but inside `room` may be overwritten (the
    /// short copies below move 8 bytes at a time); nothing outside `dst[0..<room]` is.
    static func decodeBlock(_ src: UnsafeRawPointer, _ srcLen: Int, _ dst: UnsafeMutablePointer<UInt8>, _ room: Int,
                            inputOffset: Int) -> BlockResult {
        let s = src.assumingMemoryBound(to: UInt8.self)
        let d = UnsafeMutableRawPointer(dst)
        var ip = 0, op = 0
        func tooLarge() -> BlockResult { .failure(.blockOutputTooLarge(at: inputOffset)) }
        @inline(__always) func copy8(_ to: Int, _ from: UnsafeRawPointer) {
            d.storeBytes(of: from.loadUnaligned(as: UInt64.self), toByteOffset: to, as: UInt64.self)
        }
        if srcLen == 0 { return .success(0) }
        while true {
            guard ip < srcLen else { return .failure(.truncated(at: inputOffset + ip)) }
            let token = Int(s[ip]); ip += 1
            var lit = token >> 4
            if lit == 15 {
                while true {
                    guard ip < srcLen else { return .failure(.truncated(at: inputOffset + ip)) }
                    let b = Int(s[ip]); ip += 1
                    lit += b
                    guard lit <= srcLen else { return .failure(.truncated(at: inputOffset + ip)) }
                    if b != 255 { break }
                }
            }
            guard lit <= srcLen - ip else { return .failure(.truncated(at: inputOffset + srcLen)) }
            guard lit <= room - op else { return tooLarge() }
            // Most literal runs are short: two 8-byte moves (reading and writing up to 16
            // bytes, both checked) instead of a memcpy call.
            if lit <= 16 && srcLen - ip >= 16 && room - op >= 16 {
                copy8(op, src + ip)
                copy8(op + 8, src + ip + 8)
            } else {
                (dst + op).update(from: s + ip, count: lit)
            }
            ip += lit; op += lit
            if ip == srcLen { return .success(op) }  // the last sequence has literals only
            guard srcLen - ip >= 2 else { return .failure(.truncated(at: inputOffset + srcLen)) }
            let offset = Int(s[ip]) | Int(s[ip + 1]) << 8
            ip += 2
            guard offset != 0, offset <= op else { return .failure(.badOffset(at: inputOffset + ip - 2)) }
            var mlen = token & 15
            if mlen == 15 {
                while true {
                    guard ip < srcLen else { return .failure(.truncated(at: inputOffset + ip)) }
                    let b = Int(s[ip]); ip += 1
                    mlen += b
                    guard mlen <= room else { return tooLarge() }
                    if b != 255 { break }
                }
            }
            mlen += 4
            guard mlen <= room - op else { return tooLarge() }
            let from = op - offset
            if offset >= 8 && room - op >= mlen + 7 {
                // Far enough back that every 8-byte move reads bytes already final.
                var k = 0
                while k < mlen {
                    copy8(op + k, UnsafeRawPointer(d + from + k))
                    k += 8
                }
                op += mlen
                continue
            }
            // An overlapping match repeats the `offset` bytes before it; copy it in
            // non-overlapping chunks that double (runs of zeros in a vmlinux are MiBs long).
            var left = mlen
            while left > 0 {
                let chunk = min(left, op - from)
                (dst + op).update(from: dst + from, count: chunk)
                op += chunk
                left -= chunk
            }
        }
    }
}
