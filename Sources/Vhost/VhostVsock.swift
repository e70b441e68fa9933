// vhost-vsock: the rx and tx queues of a virtio-vsock device served by the host kernel,
// which is then the other end of the guest's AF_VSOCK sockets (host sockets reach the
// guest at its CID).
//
// One /dev/vhost-vsock descriptor per device: the ring calls of every vhost device
// (rings 0 rx and 1 tx; the event queue stays with the VMM), plus
//
//     VHOST_VSOCK_SET_GUEST_CID   the guest's context ID, unique on the host for as long
//                                 as the descriptor is open (EADDRINUSE if taken)
//     VHOST_VSOCK_SET_RUNNING     1: serve the rings; 0: stop (before a reset)
import Glibc
import CLinux
import OS

/// The calls a virtio-vsock device makes on its vhost-vsock instance. `VhostVsock`
/// makes them on /dev/vhost-vsock; tests use a fake.
public protocol VhostVsockBackend: VhostBackend {
    /// VHOST_VSOCK_SET_RUNNING.
    func setRunning(_ running: Bool) throws
}

/// Feature bits of virtio-vsock (virtio 1.2 §5.10.3).
public enum VsockFeature {
    /// VIRTIO_VSOCK_F_STREAM is implied by the device; SEQPACKET is bit 1.
    public static let seqpacket: UInt64 = 1 << 1
}

/// One open /dev/vhost-vsock with its guest CID set, owned by this process. Owns its fd.
public final class VhostVsock: VhostVsockBackend, VhostDescriptor {
    public static let path = "/dev/vhost-vsock"
    public let fd: Int32
    public let cid: UInt64

    /// Opens /dev/vhost-vsock, takes ownership (VHOST_SET_OWNER) and claims `cid`
    /// (VHOST_VSOCK_SET_GUEST_CID: `.setup` with EADDRINUSE when another VM has it).
    public init(cid: UInt64) throws(VhostOpenError) {
        let fd = try openVhostDevice(VhostVsock.path)
        var c = cid
        if clinux_ioctl_ptr(fd, clinux_VHOST_VSOCK_SET_GUEST_CID(), &c) != 0 {
            let e = errno
            Glibc.close(fd)
            throw .setup(VhostError(call: "VHOST_VSOCK_SET_GUEST_CID", errno: e))
        }
        self.fd = fd
        self.cid = cid
    }

    deinit { Glibc.close(fd) }

    public func setRunning(_ running: Bool) throws {
        var r: Int32 = running ? 1 : 0
        try vhostCheck(clinux_ioctl_ptr(fd, clinux_VHOST_VSOCK_SET_RUNNING(), &r), "VHOST_VSOCK_SET_RUNNING")
    }
}
