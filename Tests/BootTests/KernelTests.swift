import XCTest
import Glibc
@testable import Boot
@testable import GuestMemory

final class BzImageTests: XCTestCase {
    func testRealKernelHeader() throws {
        let (_, k) = try requireKernel()
        let img = try parseKernel(k, ram: ramOf(256 * MiB))
        guard case let .bzImage(h) = img.format else { return XCTFail("not detected as a bzImage") }
        XCTAssertGreaterThanOrEqual(h.version, 0x0206)
        XCTAssertNotEqual(h.xloadflags & SetupHeader.xlfKernel64, 0)
        XCTAssertEqual(h.headerEnd, 0x202 + Int(k[0x201]))
        XCTAssertEqual(h.bytes, Array(k[0x1f1..<h.headerEnd]))
        let setupSects = k[0x1f1] == 0 ? 4 : Int(k[0x1f1])
        XCTAssertEqual(h.setupSects, setupSects)
        // pref_address (Debian: 0x1000000), aligned to kernel_alignment.
        XCTAssertEqual(img.loadAddress, h.prefAddress)
        XCTAssertEqual(img.loadAddress % UInt64(h.kernelAlignment), 0)
        XCTAssertEqual(img.entry, img.loadAddress + 0x200)
        XCTAssertGreaterThan(h.initSize, 0)
        XCTAssertEqual(img.end, img.loadAddress + ((max(UInt64(h.initSize), UInt64(k.count - (setupSects + 1) * 512)) + 0xfff) & ~0xfff))
        XCTAssertEqual(img.segments, [KernelSegment(fileOffset: (setupSects + 1) * 512, fileSize: k.count - (setupSects + 1) * 512,
                                                    address: img.loadAddress, memSize: UInt64(k.count - (setupSects + 1) * 512))])
        XCTAssertEqual(img.cmdlineMax, Int(h.cmdlineSize))
        XCTAssertEqual(img.initrdAddrMax, UInt64(h.initrdAddrMax))
        if h.version >= 0x020f {
            // The Debian 6.1 cloud kernel specifically.
            XCTAssertEqual(h.prefAddress, 0x100_0000)
            XCTAssertTrue(h.relocatable)
        }
    }

    func testRealKernelTruncatedEverywhere() throws {
        let (_, k) = try requireKernel()
        let ram = ramOf(256 * MiB)
        var cuts = [1, 3, 4, 0x100, 0x1f1, 0x1ff, 0x200, 0x201, 0x202, 0x205, 0x206, 0x207, 0x210, 0x236,
                    0x23c, 0x26b, 0x26c, 0x400, 0x1000, 0x27ff, 0x2800, 0x2801, k.count / 2, k.count - 1]
        let s = (Int(k[0x1f1]) + 1) * 512
        cuts += [s - 1, s, s + 1]
        for c in cuts where c < k.count {
            let t = Array(k.prefix(c))
            assertThrowsBoot(try parseKernel(t, ram: ram), "cut at \(c)") { e in
                if c < 0x200 { if case .notAKernel = e { return true } ; return false }
                if case .truncatedKernel = e { return true }
                return false
            }
        }
        assertThrows(.emptyKernel("kernel"), try parseKernel([], ram: ram))
    }

    func testRealKernelCorruptions() throws {
        let (_, k) = try requireKernel()
        let ram = ramOf(256 * MiB)
        var m = k
        m[0x202] = 0x48 ^ 0xff
        assertThrows(.notAKernel("kernel"), try parseKernel(m, ram: ram))

        m = k; setLE(&m, 0x206, UInt16(0x0205))
        assertThrows(.bootProtocolTooOld(0x0205), try parseKernel(m, ram: ram))
        XCTAssertTrue(BootError.bootProtocolTooOld(0x0205).description.contains("2.05"))

        m = k; m[0x1f1] = 0xff   // setup_sects huge: the kernel would start past the header's syssize
        assertThrowsBoot(try parseKernel(m, ram: ram), "setup_sects 255") { if case .truncatedKernel = $0 { return true }; return false }

        m = k; setLE(&m, 0x260, UInt32(0xfff0_0000))   // init_size larger than RAM
        assertThrowsBoot(try parseKernel(m, ram: ram), "init_size") {
            if case let .kernelDoesNotFit(a, s, end) = $0 { return a == 0x100_0000 && s == 0xfff0_0000 && end == 256 * MiB }
            return false
        }

        m = k; setLE(&m, 0x236, le(k, 0x236, UInt16.self) & ~1)
        assertThrows(.kernelNot64Bit, try parseKernel(m, ram: ram))

        m = k; m[0x211] &= ~1
        assertThrowsBoot(try parseKernel(m, ram: ram), "zImage") { if case .badSetupHeader = $0 { return true }; return false }

        m = k; m[0x200] = 0x90
        assertThrowsBoot(try parseKernel(m, ram: ram), "no jump") { if case .badSetupHeader = $0 { return true }; return false }

        m = k; m[0x201] = 0x20   // header would end before cmdline_size
        assertThrowsBoot(try parseKernel(m, ram: ram), "short header") { if case .badSetupHeader = $0 { return true }; return false }

        m = k; setLE(&m, 0x1f4, UInt32(0xffff_ffff))   // syssize past the end
        assertThrowsBoot(try parseKernel(m, ram: ram), "syssize") { if case .truncatedKernel = $0 { return true }; return false }

        m = k; setLE(&m, 0x24c, UInt32(0xffff_0000))   // payload past the end
        assertThrowsBoot(try parseKernel(m, ram: ram), "payload") { if case .truncatedKernel = $0 { return true }; return false }

        m = k; setLE(&m, 0x230, UInt32(0x30_0000))     // alignment not a power of two
        assertThrowsBoot(try parseKernel(m, ram: ram), "alignment") { if case .badSetupHeader = $0 { return true }; return false }

        // Too little RAM for init_size.
        assertThrowsBoot(try parseKernel(k, ram: ramOf(32 * MiB)), "32 MiB") { if case .kernelDoesNotFit = $0 { return true }; return false }
    }

    func testSyntheticBzImageLoadAddresses() throws {
        let ram = ramOf(64 * MiB)
        var img = try parseBzImage(syntheticBzImage(), ram: ram)
        XCTAssertEqual(img.loadAddress, 0x100_0000)
        XCTAssertEqual(img.entry, 0x100_0200)
        XCTAssertEqual(img.end, 0x101_0000)
        XCTAssertEqual(img.segments.first?.fileOffset, 1024)
        // setup_sects 0 means 4.
        img = try parseBzImage(syntheticBzImage(setupSects: 0), ram: ram)
        XCTAssertEqual(img.segments.first?.fileOffset, 5 * 512)
        // Relocatable with pref_address below 1 MiB: moved up and aligned.
        img = try parseBzImage(syntheticBzImage(pref: 0x1000), ram: ram)
        XCTAssertEqual(img.loadAddress, 0x20_0000)
        // Unaligned pref_address rounds up to kernel_alignment.
        img = try parseBzImage(syntheticBzImage(pref: 0x110_0000), ram: ram)
        XCTAssertEqual(img.loadAddress, 0x120_0000)
        // Not relocatable and below 1 MiB: refused.
        var b = syntheticBzImage(pref: 0x1000); b[0x234] = 0
        assertThrowsBoot(try parseBzImage(b, ram: ram)) { if case .badSetupHeader = $0 { return true }; return false }
        // Protocol 2.09: no pref_address/init_size, loaded at 1 MiB; no xloadflags below 2.12.
        b = syntheticBzImage(version: 0x0209)
        assertThrows(.kernelNot64Bit, try parseBzImage(b, ram: ram))
        // pref_address in the MMIO hole / huge.
        assertThrowsBoot(try parseBzImage(syntheticBzImage(pref: 0xC000_0000), ram: ramOf(4 * GiB))) { if case .kernelDoesNotFit = $0 { return true }; return false }
        assertThrowsBoot(try parseBzImage(syntheticBzImage(pref: UInt64.max - 0x1000), ram: ram)) { _ in true }
    }

    func testSyntheticBzImageLoadsIntoMemory() throws {
        let b = syntheticBzImage()
        let m = try makeMemory(64 * MiB)
        let img = try parseKernel(b, ram: ramOf(64 * MiB))
        try loadKernelSegments(img, from: b, into: m)
        XCTAssertEqual(try m.readBytes(at: img.loadAddress, count: 0x3000), Array(b[1024...]))
    }

    /// Random byte mutations of the header area: never a crash, always a BootError or success.
    func testMutatedHeadersNeverCrash() throws {
        let base = syntheticBzImage()
        let ram = ramOf(64 * MiB)
        var rng = XorShift(s: 0x1234_5678_9abc_def1)
        for _ in 0..<5000 {
            var b = base
            for _ in 0..<(1 + rng.below(6)) {
                let off = 0x1f0 + rng.below(0x80)
                b[off] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.below(4) == 0 { b = Array(b.prefix(rng.below(b.count + 1))) }
            do { _ = try parseKernel(b, ram: ram) } catch is BootError {} catch { XCTFail("\(error)") }
        }
    }

    func testDetection() {
        let ram = ramOf(64 * MiB)
        assertThrows(.emptyKernel("k"), try parseKernel([], ram: ram, path: "k"))
        assertThrows(.notAKernel("k"), try parseKernel([1, 2, 3], ram: ram, path: "k"))
        assertThrows(.notAKernel("k"), try parseKernel([UInt8](repeating: 0x41, count: 0x1000), ram: ram, path: "k"))
        assertThrows(.notAKernel("k"), try parseKernel(Array("#!/bin/sh\necho hi\n".utf8), ram: ram, path: "k"))
        // ELF magic only: truncated ELF header.
        assertThrowsBoot(try parseKernel([0x7f, 0x45, 0x4c, 0x46], ram: ram)) { if case .truncatedKernel = $0 { return true }; return false }
        // A bzImage cut just after the boot signature.
        let b = Array(syntheticBzImage().prefix(0x203))
        assertThrowsBoot(try parseKernel(b, ram: ram)) { if case .truncatedKernel = $0 { return true }; return false }
    }

    func testFileErrors() throws {
        assertThrows(.kernelNotFound("/nonexistent/vmlinuz"), try readKernelFile("/nonexistent/vmlinuz"))
        assertThrows(.kernelUnreadable("/", errno: EISDIR), try readKernelFile("/"))
        assertThrows(.kernelUnreadable("/dev/null", errno: EINVAL), try readKernelFile("/dev/null"))
        let empty = tempFile([])
        defer { unlink(empty) }
        assertThrows(.emptyKernel(empty), try readKernelFile(empty))
        let huge = tempFile([])
        defer { unlink(huge) }
        XCTAssertEqual(truncate(huge, off_t(maxKernelFileSize + 1)), 0)   // sparse: no disk used
        assertThrows(.kernelFileTooLarge(huge, size: maxKernelFileSize + 1, max: maxKernelFileSize), try readKernelFile(huge))
        let f = tempFile([1, 2, 3, 4, 5])
        defer { unlink(f) }
        XCTAssertEqual(try readKernelFile(f), [1, 2, 3, 4, 5])
        if getuid() != 0 {
            chmod(f, 0)
            assertThrows(.kernelUnreadable(f, errno: EACCES), try readKernelFile(f))
        }
    }

    func testErrorCategories() {
        XCTAssertEqual(BootError.kernelNotFound("x").exitStatus, 66)
        XCTAssertEqual(BootError.kernelUnreadable("x", errno: EACCES).exitStatus, 66)
        XCTAssertEqual(BootError.initrdNotFound("x").exitStatus, 66)
        XCTAssertEqual(BootError.initrdUnreadable("x", errno: EACCES).exitStatus, 66)
        XCTAssertEqual(BootError.notAKernel("x").exitStatus, 65)
        XCTAssertEqual(BootError.emptyKernel("x").exitStatus, 65)
        XCTAssertEqual(BootError.truncatedKernel("x").exitStatus, 65)
        XCTAssertEqual(BootError.bootProtocolTooOld(0x205).exitStatus, 65)
        XCTAssertEqual(BootError.initrdTooLarge(size: 1, available: 0).exitStatus, 65)
        XCTAssertEqual(BootError.cmdlineTooLong(length: 5, max: 4).exitStatus, 65)
        XCTAssertEqual(BootError.badCPUCount(0, max: 254).exitStatus, 64)
        XCTAssertTrue(BootError.initrdTooLarge(size: 100 * MiB, available: 40 * MiB).description.contains("60 MiB"))
        XCTAssertTrue(BootError.cmdlineTooLong(length: 3000, max: 2047).description.contains("2047"))
    }
}
