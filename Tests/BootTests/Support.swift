import XCTest
import Glibc
@testable import Boot
@testable import GuestMemory

/// The guest kernel for tests: $SWIFTLET_TEST_KERNEL, else guest-images/out/vmlinuz in
/// the package, else /boot/vmlinuz-*. Nil if none exists (the caller fails the test).
func testKernelPath(file: String = #filePath) -> String? {
    if let e = getenv("SWIFTLET_TEST_KERNEL") {
        let p = String(cString: e)
        if !p.isEmpty { return p }
    }
    // #filePath is <root>/Tests/BootTests/Support.swift.
    var parts = file.split(separator: "/", omittingEmptySubsequences: false)
    if parts.count > 3 {
        parts.removeLast(3)
        let p = parts.joined(separator: "/") + "/guest-images/out/vmlinuz"
        if access(p, R_OK) == 0 { return p }
    }
    if let d = opendir("/boot") {
        defer { closedir(d) }
        var names: [String] = []
        while let ent = readdir(d) {
            let name = withUnsafeBytes(of: ent.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name.hasPrefix("vmlinuz-") { names.append(name) }
        }
        if let n = names.sorted().last, access("/boot/" + n, R_OK) == 0 { return "/boot/" + n }
    }
    return nil
}

let noKernelMessage = "no test kernel: set SWIFTLET_TEST_KERNEL to a bzImage, or build guest-images/out/vmlinuz, or install /boot/vmlinuz-*"

/// Reads the test kernel or fails the test.
func requireKernel(file: StaticString = #filePath, line: UInt = #line) throws -> (path: String, bytes: [UInt8]) {
    let p = try XCTUnwrap(testKernelPath(), noKernelMessage, file: file, line: line)
    do {
        return (p, try readKernelFile(p))
    } catch {
        XCTFail("test kernel \(p): \(error)", file: file, line: line)
        throw error
    }
}

let MiB: UInt64 = 1 << 20
let GiB: UInt64 = 1 << 30

func makeMemory(_ bytes: UInt64) throws -> GuestMemory {
    try GuestMemory(layout: X86Layout.ramLayout(memoryBytes: bytes))
}

func ramOf(_ bytes: UInt64) -> RAMLayout { X86Layout.ramLayout(memoryBytes: bytes) }

/// Writes `bytes` to a new temporary file and returns its path.
func tempFile(_ bytes: [UInt8], name: String = "boot") -> String {
    let dir = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    var template = Array((dir + "/swiftlet-\(name)-XXXXXX").utf8CString)
    let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
    precondition(fd >= 0)
    bytes.withUnsafeBytes { raw in
        var off = 0
        while off < raw.count {
            let n = write(fd, raw.baseAddress! + off, raw.count - off)
            precondition(n > 0)
            off += n
        }
    }
    close(fd)
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

func le<T: FixedWidthInteger>(_ b: [UInt8], _ off: Int, _: T.Type = T.self) -> T {
    var v: T = 0
    for i in 0..<MemoryLayout<T>.size { v |= T(b[off + i]) << (8 * i) }
    return v
}

func setLE<T: FixedWidthInteger>(_ b: inout [UInt8], _ off: Int, _ v: T) {
    for i in 0..<MemoryLayout<T>.size { b[off + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
}

func sum(_ b: ArraySlice<UInt8>) -> UInt8 { b.reduce(0) { $0 &+ $1 } }
func sum(_ b: [UInt8]) -> UInt8 { sum(b[...]) }

/// Asserts that `body` throws exactly `expected`.
func assertThrows<T>(_ expected: BootError, _ body: @autoclosure () throws -> T,
                     file: StaticString = #filePath, line: UInt = #line) {
    do {
        _ = try body()
        XCTFail("expected \(expected), got success", file: file, line: line)
    } catch let e as BootError {
        XCTAssertEqual(e, expected, file: file, line: line)
    } catch {
        XCTFail("expected \(expected), got \(error)", file: file, line: line)
    }
}

/// Asserts that `body` throws a BootError matching `pred`.
func assertThrowsBoot<T>(_ body: @autoclosure () throws -> T, file: StaticString = #filePath, line: UInt = #line,
                         _ what: String = "", _ pred: (BootError) -> Bool) {
    do {
        _ = try body()
        XCTFail("expected an error \(what), got success", file: file, line: line)
    } catch let e as BootError {
        XCTAssertTrue(pred(e), "\(what): unexpected error \(e)", file: file, line: line)
        XCTAssertFalse(e.description.isEmpty)
    } catch {
        XCTFail("\(what): not a BootError: \(error)", file: file, line: line)
    }
}

/// A small synthetic bzImage: setup header as a 2.15 64-bit relocatable kernel,
/// `setupSects` sectors of setup code, `bodySize` bytes of protected-mode kernel.
func syntheticBzImage(setupSects: UInt8 = 1, bodySize: Int = 0x3000, initSize: UInt32 = 0x10000,
                      pref: UInt64 = 0x100_0000, version: UInt16 = 0x020f) -> [UInt8] {
    let setup = (Int(setupSects == 0 ? 4 : setupSects) + 1) * 512
    var b = [UInt8](repeating: 0, count: setup + bodySize)
    b[0x1f1] = setupSects
    setLE(&b, 0x1f4, UInt32(bodySize / 16))
    setLE(&b, 0x1fe, UInt16(0xaa55))
    b[0x200] = 0xeb; b[0x201] = 0x6a
    setLE(&b, 0x202, UInt32(0x5372_6448))
    setLE(&b, 0x206, version)
    b[0x211] = 0x01
    setLE(&b, 0x22c, UInt32(0x7fff_ffff))
    setLE(&b, 0x230, UInt32(0x20_0000))
    b[0x234] = 1
    setLE(&b, 0x236, UInt16(0x7f))
    setLE(&b, 0x238, UInt32(0x7ff))
    setLE(&b, 0x248, UInt32(0x100))
    setLE(&b, 0x24c, UInt32(0x200))
    setLE(&b, 0x258, pref)
    setLE(&b, 0x260, initSize)
    for i in 0..<bodySize { b[setup + i] = UInt8(truncatingIfNeeded: i &* 7 &+ 1) }
    return b
}

struct TestSegment {
    var type: UInt32 = 1
    var offset: UInt64
    var vaddr: UInt64
    var paddr: UInt64
    var filesz: UInt64
    var memsz: UInt64
}

/// A synthetic ELF64 x86-64 executable: header, program headers at 64, file padded to
/// `fileSize` with a recognisable pattern.
func syntheticELF(entry: UInt64, segments: [TestSegment], fileSize: Int = 0x3000,
                  phnum: UInt16? = nil, phoff: UInt64 = 64) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: max(fileSize, 64 + 56 * segments.count))
    for i in 64..<b.count { b[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) }
    b[0] = 0x7f; b[1] = 0x45; b[2] = 0x4c; b[3] = 0x46
    b[4] = 2; b[5] = 1; b[6] = 1
    for i in 7..<16 { b[i] = 0 }
    setLE(&b, 16, UInt16(2))
    setLE(&b, 18, UInt16(62))
    setLE(&b, 20, UInt32(1))
    setLE(&b, 24, entry)
    setLE(&b, 32, phoff)
    setLE(&b, 40, UInt64(0))
    setLE(&b, 48, UInt32(0))
    setLE(&b, 52, UInt16(64))
    setLE(&b, 54, UInt16(56))
    setLE(&b, 56, phnum ?? UInt16(segments.count))
    setLE(&b, 58, UInt16(64)); setLE(&b, 60, UInt16(0)); setLE(&b, 62, UInt16(0))
    for (i, s) in segments.enumerated() {
        let p = Int(phoff) + i * 56
        guard p + 56 <= b.count else { break }
        setLE(&b, p, s.type)
        setLE(&b, p + 4, UInt32(7))
        setLE(&b, p + 8, s.offset)
        setLE(&b, p + 16, s.vaddr)
        setLE(&b, p + 24, s.paddr)
        setLE(&b, p + 32, s.filesz)
        setLE(&b, p + 40, s.memsz)
        setLE(&b, p + 48, UInt64(0x1000))
    }
    return b
}

/// A tiny deterministic PRNG for mutation tests.
struct XorShift {
    var s: UInt64
    mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}
