// Constants from the virtio 1.2 specification, spelled out in Swift so the queue and
// transport code reads like the spec (values cross-checked against linux/virtio_*.h in
// the tests).

/// Device status bits (virtio 1.2 §2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let needsReset: UInt32 = 0x40
    public static let failed: UInt32 = 0x80
    /// The bits a driver sets; NEEDS_RESET is the device's own.
    public static let setByDriver: UInt32 = acknowledge | driver | driverOK | featuresOK | failed
}

/// Transport-level feature bits (virtio 1.2 §6).
public enum VirtioFeature {
    public static let indirectDesc: UInt64 = 1 << 28
    public static let eventIdx: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
    public static let accessPlatform: UInt64 = 1 << 33
    public static let ringPacked: UInt64 = 1 << 34
    public static let inOrder: UInt64 = 1 << 35
    public static let notificationData: UInt64 = 1 << 38
    public static let ringReset: UInt64 = 1 << 40

    /// Device-specific feature bits: 0..23 and 50..63 (§2.2).
    public static let deviceSpecificMask: UInt64 = 0x00FF_FFFF | (~UInt64(0) << 50)
    /// Transport features this implementation supports when a device offers them.
    public static let transportSupported: UInt64 = indirectDesc | eventIdx
}

/// Virtio device IDs (§5).
public enum VirtioDeviceType {
    public static let net: UInt32 = 1
    public static let block: UInt32 = 2
    public static let console: UInt32 = 3
    public static let entropy: UInt32 = 4
    public static let balloon: UInt32 = 5
    public static let vsock: UInt32 = 19
}

/// Split virtqueue flag bits (§2.7).
public enum VirtqDesc {
    public static let next: UInt16 = 1
    public static let write: UInt16 = 2
    public static let indirect: UInt16 = 4
}

public enum VirtqRingFlags {
    /// used.flags: the device asks the driver not to notify (without EVENT_IDX).
    public static let usedNoNotify: UInt16 = 1
    /// avail.flags: the driver asks the device not to interrupt (without EVENT_IDX).
    public static let availNoInterrupt: UInt16 = 1
}

/// virtio-mmio register offsets (virtio 1.2 §4.2.2, version 2 layout).
public enum VirtioMMIOReg {
    public static let magicValue: UInt64 = 0x000
    public static let version: UInt64 = 0x004
    public static let deviceID: UInt64 = 0x008
    public static let vendorID: UInt64 = 0x00c
    public static let deviceFeatures: UInt64 = 0x010
    public static let deviceFeaturesSel: UInt64 = 0x014
    public static let driverFeatures: UInt64 = 0x020
    public static let driverFeaturesSel: UInt64 = 0x024
    public static let queueSel: UInt64 = 0x030
    public static let queueNumMax: UInt64 = 0x034
    public static let queueNum: UInt64 = 0x038
    public static let queueReady: UInt64 = 0x044
    public static let queueNotify: UInt64 = 0x050
    public static let interruptStatus: UInt64 = 0x060
    public static let interruptACK: UInt64 = 0x064
    public static let status: UInt64 = 0x070
    public static let queueDescLow: UInt64 = 0x080
    public static let queueDescHigh: UInt64 = 0x084
    public static let queueDriverLow: UInt64 = 0x090
    public static let queueDriverHigh: UInt64 = 0x094
    public static let queueDeviceLow: UInt64 = 0x0a0
    public static let queueDeviceHigh: UInt64 = 0x0a4
    public static let shmSel: UInt64 = 0x0ac
    public static let shmLenLow: UInt64 = 0x0b0
    public static let shmLenHigh: UInt64 = 0x0b4
    public static let shmBaseLow: UInt64 = 0x0b8
    public static let shmBaseHigh: UInt64 = 0x0bc
    public static let queueReset: UInt64 = 0x0c0
    public static let configGeneration: UInt64 = 0x0fc
    public static let config: UInt64 = 0x100
}

/// Interrupt status bits (§4.2.2).
public enum VirtioInterrupt {
    public static let usedBuffer: UInt32 = 1
    public static let configChange: UInt32 = 2
}
