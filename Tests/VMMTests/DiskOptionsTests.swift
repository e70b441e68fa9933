import XCTest
import Glibc
import OS
@testable import VMM
import Devices

final class DiskOptionsTests: XCTestCase {
    func parseError(_ s: String, _ expect: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let o = try DiskOptions.parse(s)
            XCTFail("'\(s)' parsed as \(o)", file: file, line: line)
        } catch let e as SwiftletError {
            XCTAssertEqual(e.status, .usage, "'\(s)'", file: file, line: line)
            XCTAssertTrue(e.message.contains(expect), "'\(s)': \(e.message)", file: file, line: line)
            XCTAssertFalse(e.message.contains("\n"), "one line", file: file, line: line)
            XCTAssertTrue(e.message.hasPrefix("--disk: "), file: file, line: line)
        } catch {
            XCTFail("'\(s)': \(error)", file: file, line: line)
        }
    }

    func testParseValid() throws {
        XCTAssertEqual(try DiskOptions.parse("path=disk.img"), DiskOptions(path: "disk.img"))
        XCTAssertEqual(try DiskOptions.parse("path=/a/b.img,readonly=on,num_queues=4,direct=on,serial=ABC-123"),
                       DiskOptions(path: "/a/b.img", readOnly: true, numQueues: 4, direct: true, serial: "ABC-123"))
        XCTAssertEqual(try DiskOptions.parse("readonly=off,direct=off,path=x"), DiskOptions(path: "x"))
        XCTAssertEqual(try DiskOptions.parse("path=a,,b.img").path, "a,b.img", ",, is a comma")
        XCTAssertEqual(try DiskOptions.parse("path=a=b").path, "a=b", "only the first = splits")
        XCTAssertEqual(try DiskOptions.parse("path=with space.img").path, "with space.img")
        XCTAssertEqual(try DiskOptions.parse("path=x,num_queues=8").numQueues, 8)
        XCTAssertEqual(try DiskOptions.parse("path=x,num_queues=001").numQueues, 1)
        XCTAssertEqual(try DiskOptions.parse("path=x,serial=12345678901234567890").serial, "12345678901234567890")
        XCTAssertEqual(try DiskOptions.parse("path=x,serial=a b").serial, "a b")
    }

    func testParseHostile() {
        parseError("", "empty option")
        parseError(",", "empty option")
        parseError("path=x,", "empty option")
        parseError("readonly=on", "missing path=")
        parseError("path=", "path= is empty")
        parseError("path", "not key=value")
        parseError("disk.img", "not key=value")
        parseError("path=x,foo=1", "unknown option 'foo'")
        parseError("path=x,=1", "unknown option ''")
        parseError("path=x,PATH=y", "unknown option 'PATH'")
        parseError("path=x,readonly=yes", "readonly=on or readonly=off")
        parseError("path=x,readonly=", "readonly=on or readonly=off")
        parseError("path=x,readonly=ON", "readonly=on or readonly=off")
        parseError("path=x,direct=1", "direct=on or direct=off")
        parseError("path=x,num_queues=0", "from 1 to 8")
        parseError("path=x,num_queues=9", "from 1 to 8")
        parseError("path=x,num_queues=-1", "from 1 to 8")
        parseError("path=x,num_queues=+1", "from 1 to 8")
        parseError("path=x,num_queues=0x2", "from 1 to 8")
        parseError("path=x,num_queues= 2", "from 1 to 8")
        parseError("path=x,num_queues=", "from 1 to 8")
        parseError("path=x,num_queues=99999999999999999999999", "from 1 to 8")
        parseError("path=x,num_queues=٣", "from 1 to 8")  // Arabic-Indic digit
        parseError("path=x,serial=123456789012345678901", "at most 20")
        parseError("path=x,serial=üüüüüüüüüüü", "at most 20")
        parseError("path=x,serial=ab\u{1}", "printable ASCII")
        parseError("path=x,serial=é", "printable ASCII")
        parseError("path=x,serial=", "serial= is empty")
        parseError("path=x,path=y", "path= given twice")
        parseError("path=x,readonly=on,readonly=off", "readonly= given twice")
        parseError("path=x,\n=1", "unknown option '\\n'")
        parseError("path=x,readonly=\u{1b}[2J", "readonly='\\u{1B}[2J'")
    }

    // MARK: openDisk

    final class Temp {
        let path: String
        init(size: Int) {
            var t = Array("/tmp/swiftlet-disk-XXXXXX".utf8CString)
            let fd = mkstemp(&t)
            precondition(fd >= 0)
            ftruncate(fd, off_t(size))
            close(fd)
            path = String(nulTerminated: t)
        }
        deinit { unlink(path) }
    }

    func openError(_ o: DiskOptions, _ status: ExitStatus, _ expect: String, alreadyOpen: [OpenDisk] = [],
                   file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try openDisk(o, alreadyOpen: alreadyOpen)
            XCTFail("\(o) opened", file: file, line: line)
        } catch let e as SwiftletError {
            XCTAssertEqual(e.status, status, e.message, file: file, line: line)
            XCTAssertTrue(e.message.contains(expect), e.message, file: file, line: line)
            XCTAssertFalse(e.message.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    func testOpenDiskErrors() throws {
        openError(DiskOptions(path: "/nonexistent/disk.img"), .missingInput, "does not exist")
        openError(DiskOptions(path: "/tmp"), .missingInput, "is a directory")
        openError(DiskOptions(path: "/dev/null"), .missingInput, "not a regular file or block device")
        let odd = Temp(size: 1000)
        openError(DiskOptions(path: odd.path), .badInput, "not a multiple of 512: resize it, e.g. truncate -s 1024")
        let empty = Temp(size: 0)
        openError(DiskOptions(path: empty.path), .badInput, "is empty")
        let nodir = Temp(size: 512)
        openError(DiskOptions(path: nodir.path + "/x"), .missingInput, "does not exist")
        // A file that can be read but not written, even by root (sysfs attribute).
        let roFile = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
        if access(roFile, R_OK) == 0 {
            openError(DiskOptions(path: roFile), .missingInput, "add readonly=on")
        }
        // O_DIRECT on tmpfs.
        let shm = "/dev/shm/swiftlet-disk-\(getpid())"
        let fd = open(shm, O_CREAT | O_RDWR, 0o600)
        if fd >= 0 {
            ftruncate(fd, 4096)
            close(fd)
            defer { unlink(shm) }
            // tmpfs takes O_DIRECT since Linux 6.6; check the refusal only where it refuses.
            let probe = open(shm, O_RDWR | O_DIRECT_FLAG)
            if probe >= 0 { close(probe) } else {
                XCTAssertEqual(errno, EINVAL)
                openError(DiskOptions(path: shm, direct: true), .usage, "does not support O_DIRECT (direct=on): use direct=off")
            }
            XCTAssertNoThrow(try openDisk(DiskOptions(path: shm)))
        }
    }

    func testOpenDiskLocksAndDuplicates() throws {
        let t = Temp(size: 1 << 20)
        var d: OpenDisk? = try openDisk(DiskOptions(path: t.path, serial: "S1"))
        XCTAssertEqual(d!.image.sectors, 2048)
        XCTAssertFalse(d!.image.readOnly)
        XCTAssertEqual(Array(d!.image.serial.prefix(3)), Array("S1\0".utf8))
        // The same image again, writable, in this swiftlet: refused by identity.
        openError(DiskOptions(path: t.path), .usage, "given twice", alreadyOpen: [d!])
        openError(DiskOptions(path: t.path, readOnly: true), .usage, "given twice", alreadyOpen: [d!])
        // Through a symlink: same inode.
        let link = t.path + ".link"
        symlink(t.path, link)
        defer { unlink(link) }
        openError(DiskOptions(path: link), .usage, "given twice", alreadyOpen: [d!])
        // As another process would: the lock.
        openError(DiskOptions(path: t.path), .missingInput, "in use")
        openError(DiskOptions(path: t.path, readOnly: true), .missingInput, "in use")
        d = nil  // closing releases the lock
        let a = try openDisk(DiskOptions(path: t.path, readOnly: true))
        let b = try openDisk(DiskOptions(path: t.path, readOnly: true), alreadyOpen: [a])
        XCTAssertTrue(a.image.readOnly && b.image.readOnly)
        openError(DiskOptions(path: t.path), .missingInput, "in use")
        XCTAssertEqual(try openDevices([DiskDeviceSpec(options: DiskOptions(path: link, readOnly: true)),
                                        DiskDeviceSpec(options: DiskOptions(path: t.path, readOnly: true))]).count, 2)
        XCTAssertThrowsError(try openDevices([DiskDeviceSpec(options: DiskOptions(path: link, readOnly: true)),
                                              DiskDeviceSpec(options: DiskOptions(path: t.path))]))
    }

    func testOpenDiskDirect() throws {
        let t = Temp(size: 1 << 20)
        let d = try openDisk(DiskOptions(path: t.path, direct: true))
        XCTAssertTrue(d.image.direct)
        XCTAssertNotEqual(fcntl(d.image.fd, F_GETFL) & O_DIRECT_FLAG, 0)
        let dev = d.makeDevice(name: "blk0")
        XCTAssertEqual(dev.engine, .threadPool(threads: 4, maxInFlight: 8))
        let small = Temp(size: 512)
        XCTAssertEqual(try openDisk(DiskOptions(path: small.path)).makeDevice(name: "b").engine, .synchronous)
        // Unaligned buffers go through the buffered descriptor.
        var buf = [UInt8](repeating: 0x5a, count: 513)
        let e = buf.withUnsafeMutableBytes { p in
            d.image.transfer([iovec(iov_base: p.baseAddress! + 1, iov_len: 512)], offset: 512, write: true)
        }
        XCTAssertEqual(e, 0)
        var back = [UInt8](repeating: 0, count: 512)
        let r = back.withUnsafeMutableBytes { p in
            d.image.transfer([iovec(iov_base: p.baseAddress!, iov_len: 512)], offset: 512, write: false)
        }
        XCTAssertEqual(r, 0)
        XCTAssertEqual(back, [UInt8](repeating: 0x5a, count: 512))
    }
}
