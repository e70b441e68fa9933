// virtio-net constants (virtio 1.2 §5.1), spelled out in Swift; cross-checked against
// linux/virtio_net.h in the tests.

/// virtio-net feature bits (§5.1.3).
public enum VirtioNetFeature {
    public static let csum: UInt64 = 1 << 0
    public static let guestCsum: UInt64 = 1 << 1
    public static let mtu: UInt64 = 1 << 3
    public static let mac: UInt64 = 1 << 5
    public static let guestTSO4: UInt64 = 1 << 7
    public static let guestTSO6: UInt64 = 1 << 8
    public static let guestECN: UInt64 = 1 << 9
    public static let hostTSO4: UInt64 = 1 << 11
    public static let hostTSO6: UInt64 = 1 << 12
    public static let hostECN: UInt64 = 1 << 13
    public static let mrgRxbuf: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
    public static let ctrlVQ: UInt64 = 1 << 17
    public static let ctrlRx: UInt64 = 1 << 18
    public static let mq: UInt64 = 1 << 22

    /// Every offload bit (offered only with offload=on).
    public static let offloads: UInt64 = csum | guestCsum | guestTSO4 | guestTSO6 | guestECN | hostTSO4 | hostTSO6 | hostECN
}

/// Device configuration layout (§5.1.4), the fields swiftlet offers.
public enum VirtioNetConfig {
    public static let mac = 0           // u8[6]
    public static let status = 6        // le16
    public static let maxVirtqueuePairs = 8  // le16
    public static let mtu = 10          // le16
    public static let size = 12
    /// status: VIRTIO_NET_S_LINK_UP.
    public static let linkUp: UInt16 = 1
}

/// struct virtio_net_hdr_v1 (§5.1.6): 12 bytes with VERSION_1.
public enum VirtioNetHeader {
    public static let size = 12
    public static let numBuffersOffset = 10
}

/// Control virtqueue (§5.1.6.5).
public enum VirtioNetCtrl {
    public static let ok: UInt8 = 0
    public static let err: UInt8 = 1

    public static let classRx: UInt8 = 0
    public static let classMAC: UInt8 = 1
    public static let classVLAN: UInt8 = 2
    public static let classAnnounce: UInt8 = 3
    public static let classMQ: UInt8 = 4
    public static let classGuestOffloads: UInt8 = 5

    /// VIRTIO_NET_CTRL_RX_PROMISC ... NOBCAST: one u8 on/off each.
    public static let rxCommands: ClosedRange<UInt8> = 0...5
    public static let macTableSet: UInt8 = 0
    public static let mqVQPairsSet: UInt8 = 0
}

/// TUNSETOFFLOAD flags (linux/if_tun.h).
public enum TunOffload {
    public static let csum: UInt32 = 0x01
    public static let tso4: UInt32 = 0x02
    public static let tso6: UInt32 = 0x04
    public static let tsoECN: UInt32 = 0x08

    /// What the tap may hand us, given the features the guest accepted.
    public static func flags(forGuestFeatures f: UInt64) -> UInt32 {
        guard f & VirtioNetFeature.guestCsum != 0 else { return 0 }
        var o = csum
        if f & VirtioNetFeature.guestTSO4 != 0 { o |= tso4 }
        if f & VirtioNetFeature.guestTSO6 != 0 { o |= tso6 }
        if f & (VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestTSO6) != 0 && f & VirtioNetFeature.guestECN != 0 { o |= tsoECN }
        return o
    }
}

/// Limits.
public enum VirtioNetLimits {
    /// Most queue pairs (--net queues=N).
    public static let maxQueuePairs = 8
    public static let queueSize: UInt16 = 256
    public static let ctrlQueueSize: UInt16 = 64
    /// Packets served per wake-up of one queue thread.
    public static let budget = 256
    /// rx: used buffers between two interrupt decisions while frames keep coming
    /// (vhost-net's VHOST_NET_BATCH); the decision is also made when the TAP runs dry.
    public static let signalBatch = 64
    /// Largest frame tun hands out with GSO: 64 KiB plus Ethernet and VLAN headers.
    public static let maxGSOFrame = 65536 + 14 + 4
}
