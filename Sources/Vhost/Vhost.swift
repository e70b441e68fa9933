// vhost (<linux/vhost.h>): virtio data paths served by the host kernel.
//
// One /dev/vhost-* file descriptor serves some rings of one device: vhost-net one queue
// pair (vring 0 its rx queue, vring 1 its tx queue, and its backend a TAP queue,
// VHOST_NET_SET_BACKEND), vhost-vsock the rx and tx queues of a virtio-vsock device
// (VHOST_VSOCK_SET_GUEST_CID, VHOST_VSOCK_SET_RUNNING; VhostVsock.swift). The caller owns
// the device side of it all (which rings run, when to stop them); this module only
// speaks the ioctls. Every vhost device takes the same ring calls (`VhostBackend`):
//
//     VHOST_SET_OWNER                     once per descriptor (starts the kernel worker)
//     VHOST_GET_FEATURES / SET_FEATURES   ring and device features
//     VHOST_SET_MEM_TABLE                 guest RAM regions -> host addresses
//     VHOST_SET_VRING_NUM / BASE / ADDR   a ring's size, next avail index, host addresses
//     VHOST_SET_VRING_KICK / CALL / ERR   eventfds: driver notify in, interrupt and
//                                         error out (-1 unbinds)
//     VHOST_GET_VRING_BASE                the ring's next avail index (after a stop)
//
// vhost-net adds VHOST_NET_SET_BACKEND: attach a TAP queue to a ring (-1 detaches); its
// offloads are the TAP's (TUNSETOFFLOAD), not vhost features.
//
// VHOST_F_LOG_ALL (dirty logging for migration) is never used.
import Glibc
import CLinux
import OS
import GuestMemory

/// A failed vhost call: which one, and the errno.
public struct VhostError: Error, CustomStringConvertible, Equatable {
    public let call: String
    public let errno: Int32
    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(errnoText(errno))" }
}

/// Feature bits vhost-net may offer (<linux/vhost.h>, virtio 1.2).
public enum VhostFeature {
    public static let logAll: UInt64 = 1 << UInt64(clinux_VHOST_F_LOG_ALL())
}

/// One guest RAM region as vhost sees it.
public struct VhostMemoryRegion: Equatable, Sendable {
    public let guestAddress: UInt64
    public let size: UInt64
    public let hostAddress: UInt64
    public init(guestAddress: UInt64, size: UInt64, hostAddress: UInt64) {
        self.guestAddress = guestAddress
        self.size = size
        self.hostAddress = hostAddress
    }

    /// The regions of `memory`.
    public static func of(_ memory: GuestMemory) -> [VhostMemoryRegion] {
        memory.regions.map {
            VhostMemoryRegion(guestAddress: $0.guestBase, size: $0.size, hostAddress: UInt64(UInt(bitPattern: $0.host)))
        }
    }
}

/// The ring calls every vhost device takes, on one instance. `VhostDescriptor` makes them
/// on an open /dev/vhost-*; tests use a fake.
public protocol VhostBackend: AnyObject, Sendable {
    /// VHOST_GET_FEATURES.
    func features() throws -> UInt64
    /// VHOST_SET_FEATURES.
    func setFeatures(_ features: UInt64) throws
    /// VHOST_SET_MEM_TABLE.
    func setMemTable(_ regions: [VhostMemoryRegion]) throws
    /// VHOST_SET_VRING_NUM.
    func setVringNum(_ ring: Int, _ size: UInt32) throws
    /// VHOST_SET_VRING_BASE: the next available-ring index the kernel reads.
    func setVringBase(_ ring: Int, _ base: UInt32) throws
    /// VHOST_GET_VRING_BASE (stops the ring in the kernel and answers where it stopped).
    func vringBase(_ ring: Int) throws -> UInt32
    /// VHOST_SET_VRING_ADDR with host addresses of the descriptor table and both rings.
    func setVringAddr(_ ring: Int, desc: UInt64, avail: UInt64, used: UInt64) throws
    /// VHOST_SET_VRING_KICK / CALL / ERR; fd -1 unbinds.
    func setVringKick(_ ring: Int, _ fd: Int32) throws
    func setVringCall(_ ring: Int, _ fd: Int32) throws
    func setVringErr(_ ring: Int, _ fd: Int32) throws
}

/// The calls a virtio-net device makes on one vhost-net instance (one queue pair, ring 0
/// rx, 1 tx). `VhostNet` makes them on /dev/vhost-net; tests use a fake.
public protocol VhostNetBackend: VhostBackend {
    /// VHOST_NET_SET_BACKEND: the TAP queue `fd` serves ring `ring`; -1 detaches.
    func setBackend(_ ring: Int, _ fd: Int32) throws
}

/// Why a /dev/vhost-* device cannot be used.
public enum VhostOpenError: Error, Equatable {
    /// open(2) failed (ENOENT/ENODEV/ENXIO: no module; EACCES/EPERM: no permission).
    case open(errno: Int32)
    /// It opened, but VHOST_SET_OWNER (or the device's first call) failed.
    case setup(VhostError)
}

/// An open /dev/vhost-* descriptor owned by this process: the ring calls on `fd`.
public protocol VhostDescriptor: VhostBackend {
    var fd: Int32 { get }
}

/// Opens `path` and takes ownership (VHOST_SET_OWNER): the descriptor, owned by the caller.
public func openVhostDevice(_ path: String) throws(VhostOpenError) -> Int32 {
    let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw .open(errno: errno) }
    if clinux_ioctl_none(fd, clinux_VHOST_SET_OWNER()) != 0 {
        let e = errno
        Glibc.close(fd)
        throw .setup(VhostError(call: "VHOST_SET_OWNER", errno: e))
    }
    return fd
}

func vhostCheck(_ r: Int32, _ call: String) throws {
    if r != 0 { throw VhostError(call: call, errno: errno) }
}

extension VhostDescriptor {
    public func features() throws -> UInt64 {
        var f: UInt64 = 0
        try vhostCheck(clinux_ioctl_ptr(fd, clinux_VHOST_GET_FEATURES(), &f), "VHOST_GET_FEATURES")
        return f
    }

    public func setFeatures(_ features: UInt64) throws {
        var f = features & ~VhostFeature.logAll
        try vhostCheck(clinux_ioctl_ptr(fd, clinux_VHOST_SET_FEATURES(), &f), "VHOST_SET_FEATURES")
    }

    public func setMemTable(_ regions: [VhostMemoryRegion]) throws {
        let head = Int(clinux_vhost_memory_size())
        let each = Int(clinux_vhost_memory_region_size())
        var buf = ByteWriter(size: head + each * regions.count)
        buf.set(UInt32(regions.count), at: 0)
        for (i, r) in regions.enumerated() {
            let o = head + i * each
            buf.set(r.guestAddress, at: o)
            buf.set(r.size, at: o + 8)
            buf.set(r.hostAddress, at: o + 16)
        }
        var bytes = buf.bytes
        try vhostCheck(bytes.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_VHOST_SET_MEM_TABLE(), $0.baseAddress) },
                       "VHOST_SET_MEM_TABLE")
    }

    func vringState(_ req: UInt, _ ring: Int, _ num: UInt32, _ call: String) throws -> UInt32 {
        var s = vhost_vring_state(index: UInt32(ring), num: num)
        try vhostCheck(clinux_ioctl_ptr(fd, req, &s), call)
        return s.num
    }

    func vringFile(_ req: UInt, _ ring: Int, _ file: Int32, _ call: String) throws {
        var f = vhost_vring_file(index: UInt32(ring), fd: file)
        try vhostCheck(clinux_ioctl_ptr(fd, req, &f), call)
    }

    public func setVringNum(_ ring: Int, _ size: UInt32) throws {
        _ = try vringState(clinux_VHOST_SET_VRING_NUM(), ring, size, "VHOST_SET_VRING_NUM")
    }
    public func setVringBase(_ ring: Int, _ base: UInt32) throws {
        _ = try vringState(clinux_VHOST_SET_VRING_BASE(), ring, base, "VHOST_SET_VRING_BASE")
    }
    public func vringBase(_ ring: Int) throws -> UInt32 {
        try vringState(clinux_VHOST_GET_VRING_BASE(), ring, 0, "VHOST_GET_VRING_BASE")
    }

    public func setVringAddr(_ ring: Int, desc: UInt64, avail: UInt64, used: UInt64) throws {
        var a = vhost_vring_addr()
        a.index = UInt32(ring)
        a.flags = 0
        a.desc_user_addr = desc
        a.avail_user_addr = avail
        a.used_user_addr = used
        a.log_guest_addr = 0
        try vhostCheck(clinux_ioctl_ptr(fd, clinux_VHOST_SET_VRING_ADDR(), &a), "VHOST_SET_VRING_ADDR")
    }

    public func setVringKick(_ ring: Int, _ file: Int32) throws {
        try vringFile(clinux_VHOST_SET_VRING_KICK(), ring, file, "VHOST_SET_VRING_KICK")
    }
    public func setVringCall(_ ring: Int, _ file: Int32) throws {
        try vringFile(clinux_VHOST_SET_VRING_CALL(), ring, file, "VHOST_SET_VRING_CALL")
    }
    public func setVringErr(_ ring: Int, _ file: Int32) throws {
        try vringFile(clinux_VHOST_SET_VRING_ERR(), ring, file, "VHOST_SET_VRING_ERR")
    }
}

/// One open /dev/vhost-net, owned by this process (VHOST_SET_OWNER done). Owns its fd.
public final class VhostNet: VhostNetBackend, VhostDescriptor {
    public static let path = "/dev/vhost-net"
    public let fd: Int32
    public typealias OpenError = VhostOpenError

    /// Opens /dev/vhost-net and takes ownership (VHOST_SET_OWNER).
    public init() throws(VhostOpenError) {
        fd = try openVhostDevice(VhostNet.path)
    }

    deinit { Glibc.close(fd) }

    public func setBackend(_ ring: Int, _ file: Int32) throws {
        try vringFile(clinux_VHOST_NET_SET_BACKEND(), ring, file, "VHOST_NET_SET_BACKEND")
    }
}
