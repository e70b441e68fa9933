// libFuzzer target over the Virtio module: descriptor-chain parsing, the used ring and
// notification paths of SplitQueue, and the virtio-mmio register interface.
//
// Fuzzing build (libFuzzer, needs lld; see Fuzz/README.md):
//   swift build --scratch-path .build-fuzz --product VirtqueueFuzz \
//     -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING -Xswiftc -use-ld=lld
//   .build-fuzz/debug/VirtqueueFuzz -max_total_time=60 Fuzz/corpus
// Plain build (no libFuzzer): runs the given input files once each, or, without
// arguments, a deterministic batch of pseudo-random inputs (a smoke test).
//
// Input layout: byte 0 selects the mode (bit 7 clear: queue, set: transport), bytes
// 1..7 are parameters, the rest is copied into guest RAM at 0 (queue mode) or read as
// register operations (transport mode). Invariants are checked with precondition: a
// finding is a crash.
import Glibc
import GuestMemory
import Virtio

// Guest RAM: [0, 64 KiB) and [68 KiB, 72 KiB), with a hole in between and nothing
// past 72 KiB, so chains can point into holes, straddle ends and overflow.
let ramA: UInt64 = 0x1_0000
let ramBBase: UInt64 = 0x1_1000
let ramBSize: UInt64 = 0x1000
let memory = try! GuestMemory(layout: [(0, ramA), (ramBBase, ramBSize)])

@inline(__always) func check(_ c: @autoclosure () -> Bool, _ m: @autoclosure () -> String) {
    if !c() { fatalError("invariant violated: \(m())") }
}

struct Params {
    let bytes: UnsafeRawBufferPointer
    func u8(_ i: Int) -> UInt8 { i < bytes.count ? bytes[i] : 0 }
    func u16(_ i: Int) -> UInt16 { UInt16(u8(i)) | UInt16(u8(i + 1)) << 8 }
}

/// An independent, deliberately simple walk of one chain with GuestMemory's checked
/// loads: the oracle popAvailable() is compared against (same segments, or the same
/// error), so an unchecked index that reads host memory outside the table is caught even
/// when that memory happens to be mapped.
func referenceWalk(_ q: SplitQueue, head: UInt16) -> Result<[(UInt64, UInt32, Bool)], ChainError> {
    var out: [(UInt64, UInt32, Bool)] = []
    var table = q.layout.descTable
    var count = Int(q.size)
    var i = Int(head)
    var steps = 0
    var indirect = false
    var writable = false
    var total: UInt64 = 0
    while true {
        steps += 1
        if steps > count { return .failure(.chainTooLong(limit: count)) }
        precondition(i < count)
        let d = table + UInt64(16 * i)
        let addr: UInt64 = try! memory.load(at: d)
        let len: UInt32 = try! memory.load(at: d + 8)
        let flags: UInt16 = try! memory.load(at: d + 12)
        let next: UInt16 = try! memory.load(at: d + 14)
        if flags & 4 != 0 {
            if !q.indirectDescriptors { return .failure(.indirectNotNegotiated) }
            if indirect { return .failure(.nestedIndirect) }
            if flags & 1 != 0 { return .failure(.indirectWithNext) }
            if len == 0 || len % 16 != 0 || len / 16 > 1024 { return .failure(.indirectBadLength(len)) }
            if !memory.isValid(addr, length: UInt64(len)) { return .failure(.indirectOutOfBounds(address: addr, length: len)) }
            table = addr
            count = Int(len / 16)
            i = 0
            steps = 0
            indirect = true
            continue
        }
        let w = flags & 2 != 0
        if !w && writable { return .failure(.readableAfterWritable) }
        writable = writable || w
        if len == 0 ? (try? memory.pointer(addr, length: 0)) == nil : !memory.isValid(addr, length: UInt64(len)) {
            return .failure(.bufferOutOfBounds(address: addr, length: len))
        }
        total += UInt64(len)
        if total > UInt64(UInt32.max) { return .failure(.totalLengthTooLarge) }
        if len > 0 { out.append((addr, len, w)) }
        if flags & 1 == 0 { return .success(out) }
        if Int(next) >= count { return .failure(.nextOutOfRange(index: next, tableSize: count)) }
        i = Int(next)
    }
}

func fuzzQueue(_ p: Params, _ body: UnsafeRawBufferPointer) {
    // Fresh RAM contents for every input.
    let a = try! memory.pointer(0, length: ramA)
    memset(a, 0, Int(ramA))
    memset(try! memory.pointer(ramBBase, length: ramBSize), 0, Int(ramBSize))
    let flags = p.u8(1)
    let size = UInt32(1) << UInt32(p.u8(2) % 10)  // 1...512
    // The descriptor table ends exactly at the end of region A (a guard page follows);
    // the first 16*size input bytes fill it, the rest is copied to RAM at 0 (the avail
    // ring is at 0x2000, the used ring at 0x3000, buffers and indirect tables anywhere).
    let tableBytes = Int(16 * size)
    let descTable = ramA - UInt64(tableBytes)
    if let src = body.baseAddress {
        let n = min(body.count, tableBytes)
        (a + Int(descTable)).copyMemory(from: src, byteCount: n)
        if body.count > n { a.copyMemory(from: src + n, byteCount: min(body.count - n, Int(descTable))) }
    }
    var layout = QueueLayout(size: size, descTable: descTable, availRing: 0x2000, usedRing: 0x3000)
    if flags & 0x80 != 0 {
        // Guest-chosen ring addresses: misaligned, in holes, straddling, or the default.
        layout.descTable = UInt64(p.u16(3)) << 2
        layout.availRing = UInt64(p.u16(5)) << 1
        layout.usedRing = flags & 0x40 != 0 ? (UInt64(p.u8(7)) << 10) : 0x3000
    }
    let maxSize: UInt16 = flags & 0x20 != 0 ? 512 : 256
    let q: SplitQueue
    do {
        q = try SplitQueue(memory: memory, layout: layout, maxSize: maxSize,
                           eventIdx: flags & 1 != 0, indirectDescriptors: flags & 2 != 0)
    } catch {
        return
    }
    check(q.size <= maxSize && q.size.nonzeroBitCount == 1, "accepted size \(q.size)")
    check(memory.isValid(layout.descTable, length: 16 * UInt64(size)), "desc table outside RAM accepted")
    check(memory.isValid(layout.usedRing, length: 6 + 8 * UInt64(size)), "used ring outside RAM accepted")

    var popped = 0
    let limit = 2 * Int(size) + 8
    for round in 0..<limit {
        if round & 3 == 0 { q.disableNotifications() }
        let chain: DescriptorChain?
        do {
            chain = try q.popAvailable()
        } catch VirtqueueError.badChain(let head, let e) {
            check(head < q.size, "bad chain head \(head) >= size")
            if case .failure(let r) = referenceWalk(q, head: head) {
                check(r == e, "error \(e), reference \(r)")
            } else {
                check(false, "chain \(head) rejected (\(e)) but the reference accepts it")
            }
            popped += 1
            try! q.addUsed(head: head, length: 0)
            continue
        } catch {
            check(q.brokenBy != nil, "queue-level error without broken queue: \(error)")
            break
        }
        guard let c = chain else {
            if !q.enableNotifications() { break }
            continue
        }
        popped += 1
        check(c.head < q.size, "head \(c.head) >= size")
        switch referenceWalk(q, head: c.head) {
        case .failure(let r): check(false, "chain \(c.head) accepted but the reference says \(r)")
        case .success(let segs):
            check(segs.count == c.segments.count, "segment count")
            for (s, r) in zip(c.segments, segs) {
                check(s.address == r.0 && s.length == r.1 && s.isWritable == r.2, "segment mismatch")
            }
        }
        check(c.descriptorCount >= 1, "empty chain")
        var readable: UInt64 = 0
        var writable: UInt64 = 0
        var sawWritable = false
        for (i, s) in c.segments.enumerated() {
            check(s.length > 0, "zero-length segment kept")
            check(memory.isValid(s.address, length: UInt64(s.length)), "segment outside RAM")
            check(s.host == (try? memory.pointer(s.address, length: UInt64(s.length))), "host pointer mismatch")
            check(s.isWritable == (i >= c.readableCount), "readable/writable split wrong")
            if s.isWritable { sawWritable = true; writable += UInt64(s.length) } else {
                check(!sawWritable, "readable after writable")
                readable += UInt64(s.length)
            }
            // Touch both ends: a bad pointer faults here.
            let first = s.host.load(as: UInt8.self)
            let last = s.host.load(fromByteOffset: Int(s.length) - 1, as: UInt8.self)
            if s.isWritable {
                s.host.storeBytes(of: first ^ 0x5A, as: UInt8.self)
                s.host.storeBytes(of: last ^ 0xA5, toByteOffset: Int(s.length) - 1, as: UInt8.self)
            }
        }
        check(readable == UInt64(c.readableLength) && writable == UInt64(c.writableLength), "lengths")
        check(readable + writable <= UInt64(UInt32.max), "total length")
        var hdr = [UInt8](repeating: 0, count: 16)
        let n = hdr.withUnsafeMutableBytes { c.readReadable(into: $0, offset: UInt64(round & 7)) }
        check(n <= 16, "readReadable count")
        let w = c.writeWritable([1, 2, 3], offset: UInt64(c.writableLength) &- 1)
        check(w <= 1, "writeWritable clamp")
        if round & 1 == 0 {
            try! q.stageUsed(head: c.head, length: c.writableLength)
        } else {
            try! q.addUsed(head: c.head, length: c.writableLength)
            _ = q.needsNotification()
        }
    }
    q.publishUsed()
    _ = q.needsNotification()
    check(q.nextUsed == UInt16(truncatingIfNeeded: popped), "used count \(q.nextUsed) vs popped \(popped)")
}

// MARK: transport mode

// @unchecked Sendable: one fuzz iteration drives it from one thread.
final class FuzzDevice: VirtioDevice, @unchecked Sendable {
    let deviceType: UInt32 = VirtioDeviceType.net
    let queueMaxSizes: [UInt16] = [256, 256, 64]
    let deviceFeatures: UInt64 = 0x00FF_FFFF | VirtioFeature.eventIdx | VirtioFeature.indirectDesc
    var config = [UInt8](repeating: 0x11, count: 12)
    var configSize: Int { config.count }
    var active = false
    func readConfig(offset: Int, into b: UnsafeMutableRawBufferPointer) {
        check(offset >= 0 && offset + b.count <= config.count, "config read out of range")
        for i in 0..<b.count { b[i] = config[offset + i] }
    }
    func writeConfig(offset: Int, bytes: UnsafeRawBufferPointer) {
        check(offset >= 0 && offset + bytes.count <= config.count, "config write out of range")
        for i in 0..<bytes.count { config[offset + i] = bytes[i] }
    }
    func activate(queues: [SplitQueue?], memory: GuestMemory, features: UInt64, interrupt: any VirtioInterruptSink) throws {
        check(!active, "activated twice without reset")
        check(queues.count == 3, "queue count")
        check(features & VirtioFeature.version1 != 0, "activated without VERSION_1")
        check(features & ~(deviceFeatures | VirtioFeature.version1) == 0, "activated with unoffered features")
        for q in queues.compactMap({ $0 }) {
            check(memory.isValid(q.layout.descTable, length: 16 * UInt64(q.size)), "bad desc table activated")
            _ = try? q.popAvailable()
        }
        active = true
    }
    func reset() { active = false }
}

/// The transport's interrupt line: records its level.
// @unchecked Sendable: one fuzz iteration drives it from one thread.
final class FuzzLine: InterruptLine, @unchecked Sendable {
    var high = false
    func raise() { high = true }
    func lower() { high = false }
}

func fuzzTransport(_ p: Params, _ body: UnsafeRawBufferPointer) {
    let dev = FuzzDevice()
    let line = FuzzLine()
    let t = VirtioMMIOTransport(device: dev, memory: memory, line: line)
    // 8 bytes per operation: offset u16 (masked to the 0x1000 window unless bit 15), size
    // selector, write flag, value u32.
    var i = 0
    var buf = [UInt8](repeating: 0, count: 8)
    while i + 8 <= body.count {
        let raw = UInt16(body[i]) | UInt16(body[i + 1]) << 8
        let offset: UInt64 = raw & 0x8000 != 0 ? UInt64(raw) << 16 : UInt64(raw & 0x1FF)
        let size = [1, 2, 4, 8, 3, 0, 4, 4][Int(body[i + 2] & 7)]
        let isWrite = body[i + 3] & 1 != 0
        for k in 0..<4 { buf[k] = body[i + 4 + k]; buf[k + 4] = body[i + 4 + k] }
        if isWrite {
            buf.withUnsafeBytes { t.write(offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
        } else {
            buf.withUnsafeMutableBytes { t.read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<size])) }
        }
        let s = t.status
        check(dev.active == t.isActivated, "activation state mismatch")
        check(line.high == (t.interruptStatus != 0), "interrupt line does not follow InterruptStatus")
        if s & VirtioStatus.featuresOK != 0 {
            check(t.driverFeatures & VirtioFeature.version1 != 0, "FEATURES_OK without VERSION_1")
        }
        i += 8
    }
    if p.u8(1) & 1 != 0 { t.markNeedsReset() }
    t.write(offset: VirtioMMIOReg.status, size: 4, value: 0)
    check(!dev.active && t.status == 0 && t.interruptStatus == 0 && !line.high, "reset incomplete")
}

@inline(never)
func runOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size >= 8 else { return 0 }
    let all = UnsafeRawBufferPointer(start: data, count: size)
    let p = Params(bytes: UnsafeRawBufferPointer(rebasing: all[0..<8]))
    let body = UnsafeRawBufferPointer(rebasing: all[8...])
    if p.u8(0) & 0x80 == 0 { fuzzQueue(p, body) } else { fuzzTransport(p, body) }
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func LLVMFuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    runOne(data, size)
}

#if FUZZING
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt
var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv, { runOne($0, $1) }))
#else
// Plain build: replay files, or a deterministic smoke run.
let args = CommandLine.arguments.dropFirst()
if !args.isEmpty {
    for path in args {
        guard let f = fopen(path, "rb") else { perror(path); exit(1) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        fclose(f)
        _ = bytes.withUnsafeBufferPointer { runOne($0.baseAddress, $0.count) }
    }
    print("ran \(args.count) input(s)")
} else {
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    func next() -> UInt64 { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state }
    let runs = 5_000
    var input = [UInt8](repeating: 0, count: 0x3100)
    for _ in 0..<runs {
        let n = 8 + Int(next() % UInt64(input.count - 8))
        for j in 0..<n { input[j] = UInt8(truncatingIfNeeded: next()) }
        // Bias towards small descriptor fields so chains are sometimes valid.
        if input[0] & 0x80 == 0 {
            for j in stride(from: 8, to: min(n, 8 + 0x2000), by: 16) where next() & 1 == 0 {
                input[j + 2] = 0; input[j + 3] = 0; input[j + 4] = 0; input[j + 5] = 0; input[j + 6] = 0; input[j + 7] = 0
                input[j + 10] = 0; input[j + 11] = 0
                input[j + 12] &= 7; input[j + 13] = 0; input[j + 15] = 0
            }
        }
        _ = input.withUnsafeBufferPointer { runOne($0.baseAddress, n) }
    }
    print("smoke: \(runs) pseudo-random inputs, no invariant violated")
}
#endif
