// virtio-blk constants (virtio 1.2 §5.2), spelled out in Swift; cross-checked against
// linux/virtio_blk.h in the tests.

/// virtio-blk feature bits (§5.2.3).
public enum VirtioBlockFeature {
    public static let sizeMax: UInt64 = 1 << 1
    public static let segMax: UInt64 = 1 << 2
    public static let readOnly: UInt64 = 1 << 5
    public static let blkSize: UInt64 = 1 << 6
    public static let flush: UInt64 = 1 << 9
    public static let mq: UInt64 = 1 << 12
    public static let discard: UInt64 = 1 << 13
    public static let writeZeroes: UInt64 = 1 << 14
}

/// Request types (§5.2.6).
public enum VirtioBlockRequest {
    public static let input: UInt32 = 0        // IN: read from the disk
    public static let output: UInt32 = 1       // OUT: write to the disk
    public static let flush: UInt32 = 4
    public static let getID: UInt32 = 8
    public static let getLifetime: UInt32 = 10
    public static let discard: UInt32 = 11
    public static let writeZeroes: UInt32 = 13
    public static let secureErase: UInt32 = 14
}

/// Request status byte values (§5.2.6).
public enum VirtioBlockStatus {
    public static let ok: UInt8 = 0
    public static let ioError: UInt8 = 1
    public static let unsupported: UInt8 = 2
}

/// Offsets into struct virtio_blk_config (§5.2.4).
public enum VirtioBlockConfig {
    public static let capacity = 0                 // le64, 512-byte sectors
    public static let sizeMax = 8                  // le32
    public static let segMax = 12                  // le32
    public static let geometry = 16                // 4 bytes, not offered
    public static let blkSize = 20                 // le32
    public static let topology = 24                // 8 bytes, not offered
    public static let writeback = 32               // u8, CONFIG_WCE not offered
    public static let numQueues = 34               // le16
    public static let maxDiscardSectors = 36       // le32
    public static let maxDiscardSeg = 40           // le32
    public static let discardSectorAlignment = 44  // le32
    public static let maxWriteZeroesSectors = 48   // le32
    public static let maxWriteZeroesSeg = 52       // le32
    public static let writeZeroesMayUnmap = 56     // u8 (+3 unused)
    /// The config space the device exposes: everything up to the secure-erase fields.
    public static let size = 60
}

/// Sizes fixed by the spec and the limits this device advertises.
public enum VirtioBlockLimits {
    public static let sectorSize: UInt64 = 512
    public static let headerSize: UInt32 = 16
    /// struct virtio_blk_discard_write_zeroes.
    public static let segmentSize: UInt32 = 16
    public static let idBytes = 20
    public static let queueSize: UInt16 = 256
    /// seg_max: data segments per request (queue size minus header and status).
    public static let segMax: UInt32 = UInt32(queueSize) - 2
    /// size_max: the largest data segment (1 MiB).
    public static let sizeMax: UInt32 = 1 << 20
    /// max_discard_sectors / max_write_zeroes_sectors per segment (4 GiB - 512: fits le32).
    public static let maxDiscardSectors: UInt32 = UInt32.max >> 9
    public static let maxDiscardSegments: UInt32 = 32
    /// discard_sector_alignment: 4 KiB (8 sectors) so holes can be punched in whole pages.
    public static let discardAlignment: UInt32 = 8
    /// Most queues a block device can have (--disk num_queues=N).
    public static let maxQueues = 8
    /// Requests in flight per queue with the thread-pool engine.
    public static let maxInFlightPerQueue = 8
}
