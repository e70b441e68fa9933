import XCTest
import Glibc
import OS
import CLinux
import GuestMemory
import Virtio
@testable import Devices

final class BlockTests: XCTestCase {
    let ok = VirtioBlockStatus.ok
    let ioerr = VirtioBlockStatus.ioError
    let unsupp = VirtioBlockStatus.unsupported

    // MARK: constants, config, features

    func testConstantsMatchLinuxHeaders() {
        XCTAssertEqual(VirtioBlockRequest.input, UInt32(VIRTIO_BLK_T_IN))
        XCTAssertEqual(VirtioBlockRequest.output, UInt32(VIRTIO_BLK_T_OUT))
        XCTAssertEqual(VirtioBlockRequest.flush, UInt32(VIRTIO_BLK_T_FLUSH))
        XCTAssertEqual(VirtioBlockRequest.getID, UInt32(VIRTIO_BLK_T_GET_ID))
        XCTAssertEqual(VirtioBlockRequest.discard, UInt32(VIRTIO_BLK_T_DISCARD))
        XCTAssertEqual(VirtioBlockRequest.writeZeroes, UInt32(VIRTIO_BLK_T_WRITE_ZEROES))
        XCTAssertEqual(VirtioBlockStatus.ok, UInt8(VIRTIO_BLK_S_OK))
        XCTAssertEqual(VirtioBlockStatus.ioError, UInt8(VIRTIO_BLK_S_IOERR))
        XCTAssertEqual(VirtioBlockStatus.unsupported, UInt8(VIRTIO_BLK_S_UNSUPP))
        XCTAssertEqual(VirtioBlockFeature.sizeMax, 1 << UInt64(VIRTIO_BLK_F_SIZE_MAX))
        XCTAssertEqual(VirtioBlockFeature.segMax, 1 << UInt64(VIRTIO_BLK_F_SEG_MAX))
        XCTAssertEqual(VirtioBlockFeature.readOnly, 1 << UInt64(VIRTIO_BLK_F_RO))
        XCTAssertEqual(VirtioBlockFeature.blkSize, 1 << UInt64(VIRTIO_BLK_F_BLK_SIZE))
        XCTAssertEqual(VirtioBlockFeature.flush, 1 << UInt64(VIRTIO_BLK_F_FLUSH))
        XCTAssertEqual(VirtioBlockFeature.mq, 1 << UInt64(VIRTIO_BLK_F_MQ))
        XCTAssertEqual(VirtioBlockFeature.discard, 1 << UInt64(VIRTIO_BLK_F_DISCARD))
        XCTAssertEqual(VirtioBlockFeature.writeZeroes, 1 << UInt64(VIRTIO_BLK_F_WRITE_ZEROES))
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.capacity), VirtioBlockConfig.capacity)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.seg_max), VirtioBlockConfig.segMax)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.blk_size), VirtioBlockConfig.blkSize)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.num_queues), VirtioBlockConfig.numQueues)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.max_discard_sectors), VirtioBlockConfig.maxDiscardSectors)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.max_write_zeroes_seg), VirtioBlockConfig.maxWriteZeroesSeg)
        XCTAssertEqual(MemoryLayout<virtio_blk_config>.offset(of: \.write_zeroes_may_unmap), VirtioBlockConfig.writeZeroesMayUnmap)
        XCTAssertEqual(MemoryLayout<virtio_blk_discard_write_zeroes>.size, Int(VirtioBlockLimits.segmentSize))
    }

    func config(_ d: VirtioBlock, _ off: Int, _ n: Int) -> UInt64 {
        var v: UInt64 = 0
        withUnsafeMutableBytes(of: &v) { d.readConfig(offset: off, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
        return UInt64(littleEndian: v)
    }

    func testConfigSpaceAndFeatures() throws {
        let img = TempImage(size: 3 << 20)
        let d = VirtioBlock(disk: img.open(), numQueues: 4)
        XCTAssertEqual(d.deviceType, 2)
        XCTAssertEqual(d.queueMaxSizes, [256, 256, 256, 256])
        XCTAssertEqual(config(d, VirtioBlockConfig.capacity, 8), 3 << 11)
        XCTAssertEqual(config(d, VirtioBlockConfig.blkSize, 4), 512)
        XCTAssertEqual(config(d, VirtioBlockConfig.segMax, 4), 254)
        XCTAssertEqual(config(d, VirtioBlockConfig.sizeMax, 4), 1 << 20)
        XCTAssertEqual(config(d, VirtioBlockConfig.numQueues, 2), 4)
        XCTAssertEqual(config(d, VirtioBlockConfig.maxDiscardSeg, 4), 32)
        XCTAssertEqual(config(d, VirtioBlockConfig.writeZeroesMayUnmap, 1), 1)
        let f = d.deviceFeatures
        for bit in [VirtioBlockFeature.flush, VirtioBlockFeature.discard, VirtioBlockFeature.writeZeroes,
                    VirtioBlockFeature.mq, VirtioBlockFeature.blkSize, VirtioFeature.eventIdx, VirtioFeature.indirectDesc,
                    VirtioFeature.version1] {
            XCTAssertNotEqual(f & bit, 0)
        }
        XCTAssertEqual(f & VirtioBlockFeature.readOnly, 0)

        let ro = VirtioBlock(disk: img.open(readOnly: true), numQueues: 99)
        XCTAssertEqual(ro.numQueues, VirtioBlockLimits.maxQueues, "clamped")
        XCTAssertNotEqual(ro.deviceFeatures & VirtioBlockFeature.readOnly, 0)
        XCTAssertEqual(ro.deviceFeatures & (VirtioBlockFeature.discard | VirtioBlockFeature.writeZeroes), 0)
        // Through the real transport: VERSION_1 added, reads past the config space are zero,
        // config writes are ignored.
        let mem = try GuestMemory(layout: [(base: 0, size: 0x10000)])
        let t = VirtioMMIOTransport(device: d, memory: mem, line: NoLine())
        XCTAssertEqual(t.read(offset: VirtioMMIOReg.deviceID, size: 4), 2)
        XCTAssertEqual(t.read(offset: VirtioMMIOReg.config + 20, size: 4), 512)
        t.write(offset: VirtioMMIOReg.config, size: 4, value: 0xdead)
        XCTAssertEqual(t.read(offset: VirtioMMIOReg.config, size: 4), 3 << 11)
        XCTAssertEqual(t.read(offset: VirtioMMIOReg.config + UInt64(VirtioBlockConfig.size), size: 4), 0)
    }

    // MARK: read / write

    func writeThenRead(engine: BlockEngine) throws {
        let h = try BlockHarness(engine: engine)
        let data = pattern(8 * 512)
        let w = h.write(sector: 3, data: data)
        h.kick()
        XCTAssertEqual(h.status(w), ok)
        XCTAssertEqual(h.image.bytes(at: 3 * 512, count: data.count), data, "file holds the pattern")
        XCTAssertEqual(h.image.bytes(at: 2 * 512, count: 512), [UInt8](repeating: 0, count: 512), "nothing before")
        XCTAssertEqual(h.image.bytes(at: 11 * 512, count: 512), [UInt8](repeating: 0, count: 512), "nothing after")
        let r = h.read(sector: 3, length: data.count)
        h.kick()
        XCTAssertEqual(h.status(r), ok)
        XCTAssertEqual(h.bytes(r.data, data.count), data)
        XCTAssertEqual(h.usedIdx, 2)
        XCTAssertEqual(h.usedElem(0).id, UInt32(w.head))
        XCTAssertEqual(h.usedElem(1).id, UInt32(r.head))
        XCTAssertEqual(h.usedElem(1).len, UInt32(data.count + 1), "IN: data plus status written")
        XCTAssertEqual(h.usedElem(0).len, 1, "OUT: status only")
        XCTAssertFalse(h.sink.needsReset)
        XCTAssertEqual(h.sink.used, 2)
    }

    func testWriteThenReadSynchronous() throws { try writeThenRead(engine: .synchronous) }
    func testWriteThenReadThreadPool() throws { try writeThenRead(engine: .threadPool(threads: 4, maxInFlight: 8)) }

    func testScatteredBuffersAndIndirectTable() throws {
        let h = try BlockHarness()
        let data = pattern(2048, seed: 5)
        // OUT over an indirect table: header, three data pieces (512, 1024, 512), status.
        let hdr = h.header(type: VirtioBlockRequest.output, sector: 10)
        let a = h.alloc(512), b = h.alloc(1024), c = h.alloc(512), s = h.alloc(1, fill: 0xFF)
        try h.mem.write(Array(data[0..<512]), at: a)
        try h.mem.write(Array(data[512..<1536]), at: b)
        try h.mem.write(Array(data[1536...]), at: c)
        h.offer(h.indirect([(hdr, 16, false), (a, 512, false), (b, 1024, false), (c, 512, false), (s, 1, true)]))
        h.kick()
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s), ok)
        XCTAssertEqual(h.image.bytes(at: 10 * 512, count: 2048), data)
        // IN with the header split over two descriptors and data over two.
        let hdr2 = h.header(type: VirtioBlockRequest.input, sector: 10)
        let d1 = h.alloc(1536), d2 = h.alloc(512), s2 = h.alloc(1, fill: 0xFF)
        h.offer(h.chain([(hdr2, 8, false), (hdr2 + 8, 8, false), (d1, 1536, true), (d2, 512, true), (s2, 1, true)]))
        h.kick()
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s2), ok)
        XCTAssertEqual(h.bytes(d1, 1536) + h.bytes(d2, 512), data)
    }

    /// A request with more data buffers than one preadv/pwritev takes (1033: ten in the
    /// ring, then an indirect table) is split over several calls and moves every byte.
    func testRequestOfMoreBuffersThanOneCallTakesIsSplit() throws {
        let h = try BlockHarness()
        let direct = 10, count = direct + 1023
        XCTAssertGreaterThan(count, GuestMemory.maxIovecsPerCall)
        let data = pattern(512 * count, seed: 3)
        func post(_ type: UInt32, _ fill: [UInt8]?) -> (status: UInt64, bufs: [UInt64]) {
            let writable = type == VirtioBlockRequest.input
            let hdr = h.header(type: type, sector: 4)
            let bufs = (0..<count).map { i -> UInt64 in
                let a = h.alloc(512, fill: 0xEE)
                if let fill { try! h.mem.write(Array(fill[(i * 512)..<((i + 1) * 512)]), at: a) }
                return a
            }
            let status = h.alloc(1, fill: 0xFF)
            let table = h.alloc(16 * 1024)
            h.chain(bufs[direct...].map { ($0, 512, writable) } + [(status, 1, true)], table: table)
            let head = h.nextDesc
            let parts: [(addr: UInt64, len: UInt32, writable: Bool)] = [(hdr, 16, false)] + bufs[..<direct].map { ($0, 512, writable) }
            for (k, p) in parts.enumerated() {
                let d = BlockHarness.desc + UInt64(16 * (head + k))
                try! h.mem.store(p.addr, at: d)
                try! h.mem.store(p.len, at: d + 8)
                try! h.mem.store(VirtqDesc.next | (p.writable ? VirtqDesc.write : 0), at: d + 12)
                try! h.mem.store(UInt16(head + k + 1), at: d + 14)
            }
            let d = BlockHarness.desc + UInt64(16 * (head + parts.count))
            try! h.mem.store(table, at: d)
            try! h.mem.store(UInt32(16 * 1024), at: d + 8)
            try! h.mem.store(VirtqDesc.indirect, at: d + 12)
            h.nextDesc += parts.count + 1
            h.offer(UInt16(head))
            return (status, bufs)
        }
        let w = post(VirtioBlockRequest.output, data)
        h.kick()
        XCTAssertEqual(try h.mem.load(UInt8.self, at: w.status), ok)
        XCTAssertTrue(h.image.bytes(at: 4 * 512, count: data.count) == data)
        let r = post(VirtioBlockRequest.input, nil)
        h.kick()
        XCTAssertEqual(try h.mem.load(UInt8.self, at: r.status), ok)
        XCTAssertEqual(h.usedElem(1).len, UInt32(data.count + 1))
        XCTAssertTrue(r.bufs.flatMap { h.bytes($0, 512) } == data)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testLastSectorAndZeroLength() throws {
        let h = try BlockHarness(sizeBytes: 64 * 512)
        let w = h.write(sector: 63, data: pattern(512))
        let r = h.read(sector: 64, length: 0)  // zero-length at the very end: allowed
        h.kick()
        XCTAssertEqual(h.status(w), ok)
        XCTAssertEqual(h.status(r), ok)
        XCTAssertEqual(h.image.bytes(at: 63 * 512, count: 512), pattern(512))
    }

    func testReadBeyondCapacityFailsAndReadsNothing() throws {
        let h = try BlockHarness(sizeBytes: 64 * 512, fill: 0x11)
        let cases: [(UInt64, Int)] = [(63, 1024), (64, 512), (65, 0), (UInt64.max, 512), (UInt64.max / 512 + 1, 512), (1 << 55, 512)]
        var reqs: [BlockHarness.Request] = []
        for (sector, len) in cases { reqs.append(h.read(sector: sector, length: len)) }
        h.kick()
        for (i, r) in reqs.enumerated() {
            XCTAssertEqual(h.status(r), ioerr, "case \(cases[i])")
            XCTAssertEqual(h.bytes(r.data, cases[i].1), [UInt8](repeating: 0xEE, count: cases[i].1), "nothing read")
        }
        XCTAssertEqual(h.usedIdx, UInt16(cases.count))
        XCTAssertFalse(h.sink.needsReset, "a bad request fails alone")
    }

    func testWriteBeyondCapacityLeavesFileUnchanged() throws {
        let h = try BlockHarness(sizeBytes: 64 * 512, fill: 0x11)
        let w1 = h.write(sector: 63, data: pattern(1024))
        let w2 = h.write(sector: UInt64.max, data: pattern(512))
        h.kick()
        XCTAssertEqual(h.status(w1), ioerr)
        XCTAssertEqual(h.status(w2), ioerr)
        XCTAssertEqual(h.image.bytes(at: 0, count: 64 * 512), [UInt8](repeating: 0x11, count: 64 * 512))
        var st = stat()
        stat(h.image.path, &st)
        XCTAssertEqual(st.st_size, 64 * 512, "file not extended")
    }

    func testLengthNotMultipleOf512() throws {
        let h = try BlockHarness(fill: 0x22)
        let r = h.read(sector: 0, length: 100)
        let w = h.write(sector: 0, data: pattern(513))
        let r2 = h.read(sector: 0, length: 511)
        h.kick()
        XCTAssertEqual(h.status(r), ioerr)
        XCTAssertEqual(h.status(w), ioerr)
        XCTAssertEqual(h.status(r2), ioerr)
        XCTAssertEqual(h.bytes(r.data, 100), [UInt8](repeating: 0xEE, count: 100))
        XCTAssertEqual(h.image.bytes(at: 0, count: 1024), [UInt8](repeating: 0x22, count: 1024))
    }

    func testHeaderTooShort() throws {
        let h = try BlockHarness(fill: 0x22)
        let hdr = h.header(type: VirtioBlockRequest.output, sector: 0)
        let d = h.alloc(512, fill: 0x99), s = h.alloc(1, fill: 0xFF)
        // 8-byte header: the data descriptor would be taken as the rest of the header.
        h.offer(h.chain([(hdr, 8, false), (s, 1, true)]))
        // No header at all: only a status byte.
        let s2 = h.alloc(1, fill: 0xFF)
        h.offer(h.chain([(s2, 1, true)]))
        // Header in a device-writable buffer.
        let s3 = h.alloc(1, fill: 0xFF)
        h.offer(h.chain([(hdr, 16, true), (d, 512, true), (s3, 1, true)]))
        h.kick()
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s), ioerr)
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s2), ioerr)
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s3), ioerr)
        XCTAssertEqual(h.image.bytes(at: 0, count: 512), [UInt8](repeating: 0x22, count: 512))
        XCTAssertFalse(h.sink.needsReset)
    }

    func testStatusMissingMarksNeedsReset() throws {
        let h = try BlockHarness(fill: 0x22)
        let hdr = h.header(type: VirtioBlockRequest.output, sector: 0)
        let d = h.alloc(512, fill: 0x99)
        h.offer(h.chain([(hdr, 16, false), (d, 512, false)]))  // no writable descriptor at all
        let later = h.write(sector: 0, data: pattern(512))
        h.kick()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(h.status(later), 0xFF, "the queue stopped: later requests untouched")
        XCTAssertEqual(h.image.bytes(at: 0, count: 512), [UInt8](repeating: 0x22, count: 512))
        h.kick()
        XCTAssertEqual(h.usedIdx, 0)
    }

    func testStatusNotWritableIsLastWritableByte() throws {
        // The status is the last writable byte, wherever the driver put it: a read-only
        // "status" descriptor after a writable one is a chain error (readable after
        // writable) and the device needs a reset.
        let h = try BlockHarness(fill: 0x22)
        let hdr = h.header(type: VirtioBlockRequest.input, sector: 0)
        let d = h.alloc(512), s = h.alloc(1, fill: 0xFF)
        h.offer(h.chain([(hdr, 16, false), (d, 512, true), (s, 1, false)]))
        h.kick()
        XCTAssertTrue(h.sink.needsReset)
        XCTAssertEqual(try h.mem.load(UInt8.self, at: s), 0xFF)
    }

    func testBadChainsMarkNeedsReset() throws {
        let h = try BlockHarness()
        // next index past the table.
        let hdr = h.header(type: VirtioBlockRequest.input, sector: 0)
        try h.mem.store(hdr, at: BlockHarness.desc)
        try h.mem.store(UInt32(16), at: BlockHarness.desc + 8)
        try h.mem.store(VirtqDesc.next, at: BlockHarness.desc + 12)
        try h.mem.store(UInt16(999), at: BlockHarness.desc + 14)
        h.offer(0)
        h.kick()
        XCTAssertTrue(h.sink.needsReset)
        // A buffer outside guest RAM.
        let h2 = try BlockHarness()
        let s = h2.alloc(1)
        h2.offer(h2.chain([(h2.header(type: 0, sector: 0), 16, false), (0x1_0000_0000, 512, true), (s, 1, true)]))
        h2.kick()
        XCTAssertTrue(h2.sink.needsReset)
        // avail idx jump.
        let h3 = try BlockHarness()
        try h3.mem.store(UInt16(500), at: BlockHarness.avail + 2)
        h3.kick()
        XCTAssertTrue(h3.sink.needsReset)
    }

    // MARK: read-only disks

    func testReadOnlyRefusesWrites() throws {
        let h = try BlockHarness(fill: 0x33, readOnly: true)
        let w = h.write(sector: 0, data: pattern(512))
        let disc = h.request(type: VirtioBlockRequest.discard, payload: BlockHarness.segment(sector: 0, count: 8))
        let wz = h.request(type: VirtioBlockRequest.writeZeroes, payload: BlockHarness.segment(sector: 0, count: 8))
        let f = h.request(type: VirtioBlockRequest.flush)
        let r = h.read(sector: 0, length: 512)
        h.kick()
        XCTAssertEqual(h.status(w), ioerr)
        XCTAssertEqual(h.status(disc), unsupp, "DISCARD is not offered on a read-only disk")
        XCTAssertEqual(h.status(wz), unsupp)
        XCTAssertEqual(h.status(f), ok)
        XCTAssertEqual(h.status(r), ok)
        XCTAssertEqual(h.bytes(r.data, 512), [UInt8](repeating: 0x33, count: 512))
        XCTAssertEqual(h.image.bytes(at: 0, count: 4096), [UInt8](repeating: 0x33, count: 4096))
        // Even if the driver claims DISCARD, the disk refuses.
        let h2 = try BlockHarness(fill: 0x33, readOnly: true, features: VirtioBlock(disk: TempImage(size: 4096).open()).deviceFeatures)
        let d2 = h2.request(type: VirtioBlockRequest.discard, payload: BlockHarness.segment(sector: 0, count: 8))
        h2.kick()
        XCTAssertEqual(h2.status(d2), ioerr)
        XCTAssertEqual(h2.image.bytes(at: 0, count: 4096), [UInt8](repeating: 0x33, count: 4096))
        XCTAssertEqual(h2.disk.transfer([], offset: 0, write: true), 0)
        var b = [UInt8](repeating: 0, count: 512)
        let e = b.withUnsafeMutableBytes { h2.disk.transfer([iovec(iov_base: $0.baseAddress, iov_len: 512)], offset: 0, write: true) }
        XCTAssertEqual(e, EROFS)
    }

    // MARK: flush, GET_ID, unknown

    func testFlushCallsFdatasyncBeforeStatus() throws {
        for engine in [BlockEngine.synchronous, .threadPool(threads: 2, maxInFlight: 4)] {
            let h = try BlockHarness(engine: engine)
            let w = h.write(sector: 0, data: pattern(512))
            h.kick()
            XCTAssertEqual(h.disk.flushCount, 0)
            let f = h.request(type: VirtioBlockRequest.flush)
            XCTAssertEqual(h.status(f), 0xFF)
            h.kick()
            XCTAssertEqual(h.status(w), ok)
            XCTAssertEqual(h.status(f), ok)
            XCTAssertEqual(h.disk.flushCount, 1, "\(engine)")
            XCTAssertEqual(h.usedElem(1).len, 1)
        }
        // FLUSH not negotiated: unsupported.
        let h = try BlockHarness(features: VirtioFeature.version1)
        let f = h.request(type: VirtioBlockRequest.flush)
        h.kick()
        XCTAssertEqual(h.status(f), unsupp)
        XCTAssertEqual(h.disk.flushCount, 0)
    }

    func testGetIDReturnsSerial() throws {
        let h = try BlockHarness(serial: "swiftlet-disk-0")
        let r = h.request(type: VirtioBlockRequest.getID, writable: 20)
        let short = h.request(type: VirtioBlockRequest.getID, writable: 8)
        let none = h.request(type: VirtioBlockRequest.getID, writable: 0)
        h.kick()
        XCTAssertEqual(h.status(r), ok)
        XCTAssertEqual(h.bytes(r.data, 20), Array("swiftlet-disk-0".utf8) + [0, 0, 0, 0, 0])
        XCTAssertEqual(h.usedElem(0).len, 21)
        XCTAssertEqual(h.status(short), ok)
        XCTAssertEqual(h.bytes(short.data, 8), Array("swiftlet".utf8))
        XCTAssertEqual(h.usedElem(1).len, 9)
        XCTAssertEqual(h.status(none), ioerr)
        // A 20-byte serial fills the field with no NUL.
        let h2 = try BlockHarness(serial: "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        let r2 = h2.request(type: VirtioBlockRequest.getID, writable: 20)
        h2.kick()
        XCTAssertEqual(h2.bytes(r2.data, 20), Array("ABCDEFGHIJKLMNOPQRST".utf8))
    }

    func testUnknownTypesAreUnsupported() throws {
        let h = try BlockHarness(fill: 0x44)
        let types: [UInt32] = [2, 3, 5, 7, VirtioBlockRequest.getLifetime, VirtioBlockRequest.secureErase, 0x8000_0000, 0x8000_0001, UInt32.max]
        var reqs: [BlockHarness.Request] = []
        for t in types { reqs.append(h.request(type: t, payload: pattern(512), writable: 512)) }
        h.kick()
        for (i, r) in reqs.enumerated() { XCTAssertEqual(h.status(r), unsupp, "type \(types[i])") }
        XCTAssertEqual(h.image.bytes(at: 0, count: 512), [UInt8](repeating: 0x44, count: 512))
        XCTAssertFalse(h.sink.needsReset)
    }

    // MARK: discard and write zeroes

    func testDiscardPunchesHole() throws {
        let h = try BlockHarness(sizeBytes: 1 << 20, fill: 0x55)
        let before = h.image.blocks
        XCTAssertGreaterThanOrEqual(before, 2048)
        let d = h.request(type: VirtioBlockRequest.discard,
                          payload: BlockHarness.segment(sector: 0, count: 256) + BlockHarness.segment(sector: 1024, count: 256))
        h.kick()
        XCTAssertEqual(h.status(d), ok)
        XCTAssertLessThanOrEqual(h.image.blocks, before - 512, "st_blocks went down")
        let r = h.read(sector: 0, length: 256 * 512)
        let r2 = h.read(sector: 256, length: 512)
        h.kick()
        XCTAssertEqual(h.bytes(r.data, 256 * 512), [UInt8](repeating: 0, count: 256 * 512))
        XCTAssertEqual(h.bytes(r2.data, 512), [UInt8](repeating: 0x55, count: 512), "outside the range untouched")
        var st = stat()
        stat(h.image.path, &st)
        XCTAssertEqual(st.st_size, 1 << 20, "KEEP_SIZE")
    }

    func testDiscardAndWriteZeroesValidation() throws {
        let h = try BlockHarness(sizeBytes: 64 * 512, fill: 0x66)
        let seg = BlockHarness.segment
        let cases: [(UInt32, [UInt8], UInt8, String)] = [
            (VirtioBlockRequest.discard, seg(0, 8, 1), unsupp, "discard with unmap flag"),
            (VirtioBlockRequest.discard, seg(0, 8, 0x8000_0000), unsupp, "discard with unknown flag"),
            (VirtioBlockRequest.writeZeroes, seg(0, 8, 2), unsupp, "write zeroes with unknown flag"),
            (VirtioBlockRequest.discard, seg(60, 8, 0), ioerr, "past the end"),
            (VirtioBlockRequest.discard, seg(UInt64.max, 1, 0), ioerr, "sector overflow"),
            (VirtioBlockRequest.writeZeroes, seg(1 << 60, 1, 0), ioerr, "sector far past the end"),
            (VirtioBlockRequest.discard, [], ioerr, "no segments"),
            (VirtioBlockRequest.discard, Array(seg(0, 8, 0).prefix(12)), ioerr, "a partial segment"),
            (VirtioBlockRequest.writeZeroes, (0..<33).flatMap { _ in seg(0, 1, 0) }, ioerr, "33 segments"),
            (VirtioBlockRequest.discard, seg(0, 8, 0) + seg(64, 1, 0), ioerr, "second segment bad"),
        ]
        var reqs: [BlockHarness.Request] = []
        for c in cases { reqs.append(h.request(type: c.0, payload: c.1)) }
        h.kick()
        for (i, r) in reqs.enumerated() { XCTAssertEqual(h.status(r), cases[i].2, cases[i].3) }
        XCTAssertEqual(h.image.bytes(at: 0, count: 64 * 512), [UInt8](repeating: 0x66, count: 64 * 512), "nothing changed")
        // 32 segments is the limit and fine.
        let okReq = h.request(type: VirtioBlockRequest.writeZeroes, payload: (0..<32).flatMap { seg(UInt64($0), 1, 0) })
        h.kick()
        XCTAssertEqual(h.status(okReq), ok)
        XCTAssertEqual(h.image.bytes(at: 0, count: 32 * 512), [UInt8](repeating: 0, count: 32 * 512))
        XCTAssertEqual(h.image.bytes(at: 32 * 512, count: 512), [UInt8](repeating: 0x66, count: 512))
    }

    func testWriteZeroes() throws {
        let h = try BlockHarness(sizeBytes: 1 << 20, fill: 0x77)
        let before = h.image.blocks
        let keep = h.request(type: VirtioBlockRequest.writeZeroes, payload: BlockHarness.segment(sector: 8, count: 8))
        h.kick()
        XCTAssertEqual(h.status(keep), ok)
        XCTAssertEqual(h.image.bytes(at: 8 * 512, count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(h.image.bytes(at: 7 * 512, count: 512), [UInt8](repeating: 0x77, count: 512))
        XCTAssertEqual(h.image.bytes(at: 16 * 512, count: 512), [UInt8](repeating: 0x77, count: 512))
        let unmap = h.request(type: VirtioBlockRequest.writeZeroes, payload: BlockHarness.segment(sector: 512, count: 512, flags: 1))
        h.kick()
        XCTAssertEqual(h.status(unmap), ok)
        XCTAssertEqual(h.image.bytes(at: 512 * 512, count: 512 * 512), [UInt8](repeating: 0, count: 512 * 512))
        XCTAssertLessThanOrEqual(h.image.blocks, before - 256, "unmap frees blocks")
        // The write fallback (no fallocate) zeroes too.
        h.image.write(pattern(8192), at: 0)
        XCTAssertEqual(h.disk.writeZeroBytes(offset: 512, length: 4096), 0)
        XCTAssertEqual(h.image.bytes(at: 512, count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(h.image.bytes(at: 0, count: 512), Array(pattern(8192)[0..<512]))
    }

    // MARK: batching, notifications, engines

    func batch(engine: BlockEngine) throws {
        let h = try BlockHarness(engine: engine, queueSize: 64)
        var reqs: [BlockHarness.Request] = []
        for i in 0..<20 { reqs.append(h.write(sector: UInt64(i * 8), data: pattern(4096, seed: i))) }
        h.kick()
        XCTAssertEqual(h.usedIdx, 20)
        var heads = Set<UInt32>()
        for i in 0..<20 { heads.insert(h.usedElem(i).id) }
        XCTAssertEqual(heads, Set(reqs.map { UInt32($0.head) }), "every head exactly once")
        for (i, r) in reqs.enumerated() {
            XCTAssertEqual(h.status(r), ok)
            XCTAssertEqual(h.image.bytes(at: i * 4096, count: 4096), pattern(4096, seed: i))
        }
        if engine == .synchronous { XCTAssertEqual(h.sink.used, 1, "one publish, one interrupt for the batch") }
        XCTAssertLessThanOrEqual(h.sink.used, 20)
        XCTAssertEqual(h.handler.inFlight, 0)
        XCTAssertFalse(h.sink.needsReset)
    }

    func testBatchSynchronous() throws { try batch(engine: .synchronous) }
    func testBatchThreadPoolAboveInFlightLimit() throws { try batch(engine: .threadPool(threads: 3, maxInFlight: 4)) }

    func testEventIdxSuppressesInterrupts() throws {
        let h = try BlockHarness(eventIdx: true)
        h.setUsedEvent(0)
        h.write(sector: 0, data: pattern(512))
        h.kick()
        XCTAssertEqual(h.sink.used, 1, "first publish crosses used_event 0")
        h.setUsedEvent(10)  // the driver wants an interrupt only after the 11th
        for i in 0..<3 { h.write(sector: UInt64(i), data: pattern(512)) }
        h.kick()
        XCTAssertEqual(h.usedIdx, 4)
        XCTAssertEqual(h.sink.used, 1, "no interrupt before used_event")
        for i in 0..<8 { h.write(sector: UInt64(i), data: pattern(512)) }
        h.kick()
        XCTAssertEqual(h.usedIdx, 12)
        XCTAssertEqual(h.sink.used, 2)
        // avail_event tells the driver when to kick next.
        XCTAssertEqual(try h.mem.load(UInt16.self, at: BlockHarness.used + 4 + 8 * UInt64(h.size)), 12)
    }

    func testNoInterruptFlagWithoutEventIdx() throws {
        let h = try BlockHarness()
        try h.mem.store(VirtqRingFlags.availNoInterrupt, at: BlockHarness.avail)
        h.write(sector: 0, data: pattern(512))
        h.kick()
        XCTAssertEqual(h.usedIdx, 1)
        XCTAssertEqual(h.sink.used, 0)
    }

    func testResetQuiescesThreadPoolWithRequestsInFlight() throws {
        let h = try BlockHarness(engine: .threadPool(threads: 2, maxInFlight: 8))
        for i in 0..<8 { h.write(sector: UInt64(i * 16), data: pattern(8192, seed: i)) }
        h.handler.kicked()  // start, do not wait
        let handler = h.handler
        h.device.reset()  // waits for the requests in flight
        XCTAssertEqual(handler.inFlight, 0)
        XCTAssertEqual(h.usedIdx, 8)
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
        for i in 0..<8 { XCTAssertEqual(h.image.bytes(at: i * 8192, count: 8192), pattern(8192, seed: i)) }
        handler.kicked()  // after quiesce: inert
        h.device.reset()  // idempotent
    }

    /// --metrics counters belong to the device: a driver reset does not lose them.
    func testQueueCountersSurviveReset() throws {
        let h = try BlockHarness(engine: .threadPool(threads: 2, maxInFlight: 8))
        for i in 0..<8 { h.write(sector: UInt64(i * 16), data: pattern(4096, seed: i)) }
        h.kick()
        XCTAssertEqual(h.device.stats[0].requests, 8)
        XCTAssertGreaterThan(h.device.stats[0].interrupts, 0)
        let interrupts = h.device.stats[0].interrupts
        h.device.reset()
        XCTAssertTrue(h.device.queueHandlers.isEmpty)
        XCTAssertEqual(h.device.stats[0].requests, 8)
        XCTAssertEqual(h.device.stats[0].interrupts, interrupts)
    }

    func testImageShrunkUnderneathGivesIOError() throws {
        let h = try BlockHarness(sizeBytes: 64 * 512, fill: 0x12)
        XCTAssertEqual(truncate(h.image.path, 32 * 512), 0)
        let r = h.read(sector: 40, length: 512)
        h.kick()
        XCTAssertEqual(h.status(r), ioerr)
    }

    /// Random descriptor tables, rings and headers (fixed seed, bounded): the device never
    /// crashes, never grows or writes past the image, and every used entry is a head it popped.
    func testRandomHostileRequests() throws {
        var rng: UInt64 = 0x5eed
        func next() -> UInt64 {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return rng
        }
        let imageSize = 64 * 512
        var completed = 0, resets = 0
        for round in 0..<150 {
            let engine: BlockEngine = round % 3 == 0 ? .threadPool(threads: 2, maxInFlight: 3) : .synchronous
            let h = try BlockHarness(sizeBytes: imageSize, fill: 0x5A, engine: engine, queueSize: 16,
                                     eventIdx: round % 2 == 0)
            // Headers with plausible and hostile values in the data area.
            for k in 0..<16 {
                let a = BlockHarness.dataStart + UInt64(k) * 0x1000
                let types: [UInt32] = [0, 1, 4, 8, 11, 13, 2, UInt32(truncatingIfNeeded: next())]
                try h.mem.store(types[Int(next() % 8)], at: a)
                let sectors: [UInt64] = [0, 1, 63, 64, 65, UInt64.max, next() % 128, UInt64.max / 512]
                try h.mem.store(sectors[Int(next() % 8)], at: a + 8)
                for j in 0..<8 {  // discard / write-zeroes segments
                    try h.mem.store(next() % 80, at: a + 16 + 16 * UInt64(j))
                    try h.mem.store(UInt32(next() % 40), at: a + 24 + 16 * UInt64(j))
                    try h.mem.store(UInt32(truncatingIfNeeded: next() % 4 == 0 ? next() : 0), at: a + 28 + 16 * UInt64(j))
                }
            }
            // Mostly well-formed chains (header, data, status) with hostile values, then a
            // few random bytes of the descriptor table and ring mutated.
            var n = 0
            let lens: [UInt32] = [0, 1, 15, 16, 17, 100, 512, 513, 1024, 4096, 8192]
            while h.nextDesc + 3 <= 16 {
                let hdr = BlockHarness.dataStart + UInt64(n % 16) * 0x1000
                let data = 0x40000 + next() % 0x100000
                let dlen = lens[Int(next() % UInt64(lens.count))]
                let st = 0x200000 + UInt64(n)
                let hlen: UInt32 = next() % 6 == 0 ? UInt32(next() % 32) : 16
                h.offer(h.chain([(hdr, hlen, false), (data, dlen, next() % 2 == 0), (st, 1, next() % 8 != 0)]))
                n += 1
            }
            for _ in 0..<Int(next() % 4) {
                let off = next() % (16 * 16)
                try h.mem.store(UInt8(truncatingIfNeeded: next()), at: BlockHarness.desc + off)
            }
            if next() % 8 == 0 { try h.mem.store(UInt16(truncatingIfNeeded: next()), at: BlockHarness.avail + 4 + 2 * (next() % 16)) }
            h.handler.kicked()
            h.device.reset()  // waits for what is in flight
            var st = stat()
            stat(h.image.path, &st)
            XCTAssertEqual(Int(st.st_size), imageSize, "round \(round)")
            XCTAssertLessThanOrEqual(Int(h.usedIdx), n)
            for k in 0..<Int(h.usedIdx) { XCTAssertLessThan(h.usedElem(k).id, 16) }
            completed += Int(h.usedIdx)
            if h.sink.needsReset { resets += 1 }
        }
        print("random hostile requests: \(completed) completed, \(resets) of 150 rounds ended in NEEDS_RESET")
        XCTAssertGreaterThan(completed, 50, "some requests got through validation")
    }

    /// Engine choice: 4 KiB random reads and writes, synchronous vs a pool, on the page cache
    /// and with O_DIRECT. Prints figures; asserts only that both engines complete.
    func testEngineThroughput() throws {
        let requests = 2000
        func run(_ engine: BlockEngine, direct: Bool, write: Bool) throws -> Double {
            let h = try BlockHarness(sizeBytes: 64 << 20, fill: 0xAB, engine: engine, queueSize: 128)
            var disk = h.disk
            if direct {
                let fd = open(h.image.path, O_RDWR | O_CLOEXEC | O_DIRECT_FLAG)
                let bfd = open(h.image.path, O_RDWR | O_CLOEXEC)
                guard fd >= 0 else { throw XCTSkip("O_DIRECT unsupported here") }
                disk = DiskImage(fd: fd, bufferedFD: bfd, size: 64 << 20, readOnly: false, direct: true)
            }
            h.device.reset()
            let dev = VirtioBlock(disk: disk, engine: engine)
            try dev.activate(queues: [h.queue], memory: h.mem, features: dev.deviceFeatures & ~VirtioFeature.eventIdx, interrupt: h.sink)
            let handler = dev.queueHandlers[0] as! BlockQueue
            // Buffers 4 KiB aligned (O_DIRECT).
            var seed: UInt64 = 42
            let start = monotonicNanos()
            var done = 0
            var idx: UInt16 = 0
            while done < requests {
                let batch = min(32, requests - done)
                h.nextDesc = 0
                for i in 0..<batch {
                    seed = seed &* 6364136223846793005 &+ 1442695040888963407
                    let sector = (seed >> 33) % ((64 << 20) / 4096) * 8
                    let hdr = 0x100000 + UInt64(i) * 64
                    try h.mem.store(write ? VirtioBlockRequest.output : VirtioBlockRequest.input, at: hdr)
                    try h.mem.store(sector, at: hdr + 8)
                    let data = 0x200000 + UInt64(i) * 4096
                    h.offer(h.chain([(hdr, 16, false), (data, 4096, !write), (hdr + 32, 1, true)]))
                }
                idx &+= UInt16(batch)
                handler.kicked()
                while (try h.mem.load(UInt16.self, at: BlockHarness.used + 2)) != idx {
                    var p = pollfd(fd: handler.completionFD, events: Int16(POLLIN), revents: 0)
                    _ = poll(&p, 1, 100)
                    handler.completionsReady()
                }
                done += batch
            }
            let secs = Double(monotonicNanos() - start) / 1e9
            dev.reset()
            return Double(requests) / secs
        }
        for direct in [false, true] {
            for write in [false, true] {
                let s = try run(.synchronous, direct: direct, write: write)
                let p = try run(.threadPool(threads: 4, maxInFlight: 8), direct: direct, write: write)
                print("engine \(direct ? "O_DIRECT" : "page cache") \(write ? "write" : "read") 4K random: synchronous \(Int(s)) IOPS, pool(4 threads, 8 in flight) \(Int(p)) IOPS")
            }
        }
    }
}
