// --net tap=NAME[,mac=MAC][,queues=N][,offload=on|off][,mtu=M][,vhost=on|off|auto]
//
// Parsing (usage errors, exit 64) and opening the TAP (exit 69 when the host cannot give
// us one: no /dev/net/tun, no permission, a busy or single-queue TAP). Every error is
// one line that says what to do.
//
// Decisions:
//   - queues: queue pairs, 1...8 (VirtioNetLimits.maxQueuePairs), whatever the vCPU
//     count (as for --disk num_queues): the guest driver uses min(pairs, its CPUs). Each
//     pair costs one TAP queue file descriptor and two host threads (rx and tx).
//   - mac: six hex pairs separated by ':'; multicast (odd first byte) and all-zero
//     addresses are refused. Default 52:54:00:12:34:NN, NN = 0x56 + the --net index.
//   - mtu: 68...65535 (what Linux accepts for Ethernet), default 1500. It is what the
//     guest is told (VIRTIO_NET_F_MTU); the TAP's own MTU is not changed.
//   - offload=on (default): checksum, TSO4/6 and ECN offloads offered both ways; the TAP
//     is set (TUNSETOFFLOAD) to what the guest accepted when the driver starts the device.
//   - vhost=auto (default): each queue pair's rx and tx rings are served by the host
//     kernel (vhost-net, one /dev/vhost-net instance per pair, Devices/Net/VhostPair.swift)
//     when /dev/vhost-net opens and works; otherwise the userspace data path, with one
//     info line saying why. vhost=on: the same, but a host where it cannot work is an
//     error (status 69), checked before any TAP is opened. vhost=off: userspace always.
//     /dev/vhost-net is opened (and VHOST_SET_OWNER issued) before the TAP.
//   - The TAP is opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, once per
//     queue pair, non-blocking, with a 12-byte vnet header (virtio_net_hdr_v1). A TAP
//     that does not exist yet is created and, being non-persistent, disappears when
//     swiftlet's descriptors close (on every exit, even a crash). An existing TAP (e.g.
//     `ip tuntap add dev NAME mode tap multi_queue`) is attached and left as it was; a
//     single-queue one (`ip tuntap add dev NAME mode tap`) only with queues=1.
import Glibc
import OS
import CLinux
import Devices
import Virtio
import GuestMemory
import KVM
import Boot
import Vhost

/// --net vhost=: who serves the rx and tx queues.
public enum VhostMode: String, Equatable, Sendable {
    case on, off, auto
}

public struct NetOptions: Equatable, Sendable {
    public var tap: String
    /// nil: 52:54:00:12:34:(0x56 + index).
    public var mac: [UInt8]? = nil
    public var queues: Int = 1
    public var offload: Bool = true
    public var mtu: Int = 1500
    public var vhost: VhostMode = .auto

    public init(tap: String, mac: [UInt8]? = nil, queues: Int = 1, offload: Bool = true, mtu: Int = 1500,
                vhost: VhostMode = .auto) {
        self.tap = tap
        self.mac = mac
        self.queues = queues
        self.offload = offload
        self.mtu = mtu
        self.vhost = vhost
    }

    public static let maxQueues = VirtioNetLimits.maxQueuePairs
    public static let mtuRange = 68...65535
    static let form = "tap=NAME[,mac=MAC][,queues=N][,offload=on|off][,mtu=M][,vhost=on|off|auto]"

    /// The MAC address the device gets as --net number `index`.
    public func macAddress(index: Int) -> [UInt8] {
        mac ?? [0x52, 0x54, 0x00, 0x12, 0x34, UInt8(truncatingIfNeeded: 0x56 + index)]
    }

    /// "aa:bb:cc:dd:ee:ff" -> 6 bytes, or nil.
    public static func parseMAC(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.utf8.count == 2, p.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x66) }),
                  let b = UInt8(p, radix: 16) else { return nil }
            out.append(b)
        }
        return out
    }

    /// What is wrong with a non-empty `value` as a TAP interface name, or nil.
    static func tapNameProblem(_ value: String) -> String? {
        // IFNAMSIZ is 16 with the terminating NUL; '/' and whitespace are not allowed in names.
        guard value.utf8.count <= 15, value != ".", value != "..",
              value.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: ":") }) else {
            return "'\(shown(value))' is not a valid interface name: use at most 15 characters, no '/', ':' or spaces"
        }
        return nil
    }

    /// `value` as a unicast MAC address, or what is wrong with it.
    static func unicastMAC(_ value: String) -> (mac: [UInt8]?, problem: String?) {
        guard let m = parseMAC(value) else {
            return (nil, "'\(shown(value))' is not a MAC address: use six hex pairs, e.g. 52:54:00:12:34:56")
        }
        guard m[0] & 1 == 0 else { return (nil, "\(shown(value)) is a multicast address: the first byte must be even, e.g. 52:54:00:...") }
        guard m != [0, 0, 0, 0, 0, 0] else { return (nil, "\(shown(value)) is all zeroes: give a unicast address, e.g. 52:54:00:12:34:56") }
        return (m, nil)
    }

    /// Parses one --net value.
    public static func parse(_ text: String) throws -> NetOptions {
        func usage(_ s: String) -> SwiftletError { SwiftletError(.usage, "--net: \(s)") }
        var o = NetOptions(tap: "")
        var tap: String? = nil
        var seen = Set<String>()
        for item in text.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
            guard !item.isEmpty else { throw usage("empty option in '\(shown(text))': use \(form)") }
            guard let eq = item.firstIndex(of: "=") else { throw usage("'\(shown(item))' is not key=value: use \(form)") }
            let key = String(item[..<eq])
            let value = String(item[item.index(after: eq)...])
            guard !seen.contains(key) else { throw usage("\(shown(key))= given twice") }
            seen.insert(key)
            func number(max: Int) -> Int? {
                guard !value.isEmpty, value.utf8.count <= 6, value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                      let n = Int(value), n <= max else { return nil }
                return n
            }
            switch key {
            case "tap":
                guard !value.isEmpty else { throw usage("tap= is empty: give a TAP interface name, e.g. tap=tap0") }
                if let problem = tapNameProblem(value) { throw usage("tap name \(problem)") }
                tap = value
            case "mac":
                let (m, problem) = unicastMAC(value)
                guard let m else { throw usage("mac=\(problem ?? "")") }
                o.mac = m
            case "queues":
                guard let n = number(max: maxQueues), n >= 1 else {
                    throw usage("queues='\(shown(value))' is not valid: use a number of queue pairs from 1 to \(maxQueues)")
                }
                o.queues = n
            case "offload":
                switch value {
                case "on": o.offload = true
                case "off": o.offload = false
                default: throw usage("offload='\(shown(value))' is not valid: use offload=on or offload=off")
                }
            case "mtu":
                guard let n = number(max: mtuRange.upperBound), mtuRange.contains(n) else {
                    throw usage("mtu='\(shown(value))' is not valid: use a number from \(mtuRange.lowerBound) to \(mtuRange.upperBound)")
                }
                o.mtu = n
            case "vhost":
                guard let m = VhostMode(rawValue: value) else {
                    throw usage("vhost='\(shown(value))' is not valid: use vhost=on, vhost=off or vhost=auto")
                }
                o.vhost = m
            default:
                throw usage("unknown option '\(shown(key))': use tap, mac, queues, offload, mtu or vhost")
            }
        }
        guard let tap else { throw usage("missing tap=: use --net \(form)") }
        o.tap = tap
        return o
    }
}

/// A TAP opened for one --net: one non-blocking queue file descriptor per queue pair.
// @unchecked Sendable: `fds` changes only in close(), which its owner calls after every
// user of the descriptors (the device's threads) has stopped.
public final class OpenTap: @unchecked Sendable {
    public let options: NetOptions
    public private(set) var fds: [Int32]
    /// swiftlet created the interface (it goes away when `fds` are closed).
    public let created: Bool
    /// One vhost-net instance per queue pair, or none (userspace data path).
    public let vhost: OpenVhost?

    init(options: NetOptions, fds: [Int32], created: Bool, vhost: OpenVhost? = nil) {
        self.options = options
        self.fds = fds
        self.created = created
        self.vhost = vhost
    }

    deinit { close() }

    /// Closes the queue descriptors (a TAP swiftlet created disappears). Idempotent.
    public func close() {
        for fd in fds { _ = Glibc.close(fd) }
        fds = []
    }

    /// The virtio-net device model for this TAP (`index`: its --net position, for the default MAC).
    public func makeDevice(index: Int, name: String, log: RateLimitedLog? = nil) -> VirtioNet {
        VirtioNet(queueFDs: fds, mac: options.macAddress(index: index), mtu: UInt16(options.mtu),
                  offload: options.offload, control: TapQueueControl(fds: fds, owner: self), name: name, log: log,
                  vhost: vhost?.instances ?? [], vhostFeatures: vhost?.features ?? 0)
    }
}

/// The vhost-net instances of one --net: one per queue pair, each owned (VHOST_SET_OWNER).
public final class OpenVhost: Sendable {
    public let instances: [VhostNet]
    /// VHOST_GET_FEATURES (the same for every instance).
    public let features: UInt64
    init(instances: [VhostNet], features: UInt64) {
        self.instances = instances
        self.features = features
    }
}

/// Opens `pairs` vhost-net instances for --net `o` (index `index`), or nil when o.vhost is
/// off, or auto and the host cannot (then `info` gets one line saying why). vhost=on on
/// such a host: a SwiftletError (status 69).
public func openVhost(_ o: NetOptions, index: Int, info: (String) -> Void) throws -> OpenVhost? {
    guard o.vhost != .off else { return nil }
    var why: String
    var fix: String
    do {
        var instances: [VhostNet] = []
        for _ in 0..<o.queues { instances.append(try VhostNet()) }
        let f = try instances[0].features()
        if f & VirtioFeature.version1 == 0 {
            why = "/dev/vhost-net does not offer VIRTIO_F_VERSION_1"
            fix = "use a newer host kernel or vhost=off"
        } else {
            return OpenVhost(instances: instances, features: f)
        }
    } catch let e as VhostNet.OpenError {
        switch e {
        case .open(let err) where err == ENOENT || err == ENODEV || err == ENXIO:
            why = "\(VhostNet.path) is missing"
            fix = "load the vhost_net module (modprobe vhost_net) or use vhost=off"
        case .open(let err) where err == EACCES || err == EPERM:
            why = "cannot open \(VhostNet.path): \(errnoText(err))"
            fix = "run as root, give this user access to \(VhostNet.path), or use vhost=off"
        case .open(let err):
            why = "cannot open \(VhostNet.path): \(errnoText(err))"
            fix = "use vhost=off"
        case .setup(let v):
            why = "\(VhostNet.path): \(v)"
            fix = "use vhost=off"
        }
    } catch {
        why = "\(VhostNet.path): \(error)"
        fix = "use vhost=off"
    }
    if o.vhost == .on {
        throw SwiftletError(.hostUnavailable, "--net \(shown(o.tap)): vhost=on but \(why): \(fix)")
    }
    info("net\(index): \(why): using the userspace data path (vhost=auto)")
    return nil
}

/// A --net: a multiqueue virtio-net device on a TAP.
public struct NetDeviceSpec: VirtioDeviceSpec {
    public let options: NetOptions
    /// Gets the info-level lines (vhost=auto falling back to userspace).
    public let info: @Sendable (String) -> Void
    public var kind: String { "net" }

    public init(options: NetOptions, info: @escaping @Sendable (String) -> Void = { _ in }) {
        self.options = options
        self.info = info
    }

    public func open(earlier: [any VirtioBackend]) throws -> any VirtioBackend {
        let taps = earlier.compactMap { $0 as? OpenTap }
        if taps.contains(where: { $0.options.tap == options.tap }) {
            throw SwiftletError(.usage, "--net: TAP \(shown(options.tap)) is given twice: give each --net its own TAP")
        }
        let vhost = try openVhost(options, index: taps.count, info: info)
        return try openTap(options, vhost: vhost)
    }
}

extension OpenTap: VirtioBackend {
    public func makeDevice(name: String, ordinal: Int, log: RateLimitedLog?) throws -> BuiltDevice {
        let net = makeDevice(index: ordinal, name: name, log: log)
        return BuiltDevice(net) {
            let qs = net.stats.enumerated().map { i, s in
                "{\"queue\": \(i), \"packets\": \(s.packets), \"bytes\": \(s.bytes), \"drops\": \(s.drops), "
                    + "\"notifications\": \(s.notifications), \"interrupts\": \(s.interrupts)}"
            }
            return "\"active_pairs\": \(net.activePairs), \"queues\": [\(qs.joined(separator: ", "))]"
        }
    }
}

/// Opens (creating it if needed) the TAP `o.tap` with `o.queues` queues.
public func openTap(_ o: NetOptions, vhost: OpenVhost? = nil) throws -> OpenTap {
    let name = shown(o.tap)
    let existed = if_nametoindex(o.tap) != 0
    var fds: [Int32] = []
    var ok = false
    defer { if !ok { for fd in fds { close(fd) } } }
    for q in 0..<o.queues {
        let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            let e = errno
            if e == ENOENT || e == ENODEV || e == ENXIO {
                throw SwiftletError(.hostUnavailable, "--net: /dev/net/tun is missing: load the tun module (modprobe tun) or run without --net")
            }
            if e == EACCES || e == EPERM {
                throw SwiftletError(.hostUnavailable, "--net: cannot open /dev/net/tun: \(errnoText(e)): run as root or with CAP_NET_ADMIN")
            }
            throw SwiftletError(.hostUnavailable, "--net: cannot open /dev/net/tun: \(errnoText(e))")
        }
        fds.append(fd)
        var ifr = [UInt8](repeating: 0, count: 40)  // struct ifreq: ifr_name[16], ifr_flags
        ifr.replaceSubrange(0..<o.tap.utf8.count, with: Array(o.tap.utf8))
        func setIFF(multiQueue: Bool) -> Int32 {
            let flags = Int16(truncatingIfNeeded: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multiQueue ? IFF_MULTI_QUEUE : 0))
            withUnsafeBytes(of: flags.littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
            return ifr.withUnsafeMutableBytes { clinux_ioctl_ptr(fd, clinux_TUNSETIFF(), $0.baseAddress) } == 0 ? 0 : errno
        }
        var r = setIFF(multiQueue: true)
        // A single-queue TAP (plain `ip tuntap add mode tap`) refuses IFF_MULTI_QUEUE
        // with EINVAL; one queue pair does not need it.
        if r == EINVAL && existed && o.queues == 1 { r = setIFF(multiQueue: false) }
        if r != 0 {
            let e = r
            switch e {
            case EPERM, EACCES:
                if existed {
                    throw SwiftletError(.hostUnavailable, "--net: TAP \(name) belongs to another user or group: use a TAP made for this user (ip tuntap add ... user), or run as root")
                }
                throw SwiftletError(.hostUnavailable, "--net: not allowed to create TAP \(name): run as root or with CAP_NET_ADMIN, or create it first with ip tuntap add dev \(name) mode tap multi_queue")
            case EINVAL:
                if existed && o.queues == 1 {
                    throw SwiftletError(.usage, "--net: \(name) is an existing interface that is not a TAP: give a TAP, or a new name for swiftlet to create")
                }
                if existed {
                    throw SwiftletError(.hostUnavailable, "--net: TAP \(name) exists without multi_queue (or is not a TAP): use queues=1, or recreate it with ip tuntap add dev \(name) mode tap multi_queue")
                }
                throw SwiftletError(.hostUnavailable, "--net: cannot create TAP \(name): \(errnoText(e))")
            case EBUSY:
                throw SwiftletError(.hostUnavailable, "--net: TAP \(name) is in use by another process (or has fewer free queues than queues=\(o.queues)): stop it or use another TAP")
            default:
                throw SwiftletError(.hostUnavailable, "--net: cannot attach to TAP \(name) (queue \(q)): \(errnoText(e))")
            }
        }
        var hdr: Int32 = Int32(VirtioNetHeader.size)
        if clinux_ioctl_ptr(fd, clinux_TUNSETVNETHDRSZ(), &hdr) != 0 {
            throw SwiftletError(.hostUnavailable, "--net: TAP \(name): cannot set the vnet header size: \(errnoText(errno))")
        }
    }
    ok = true
    return OpenTap(options: o, fds: fds, created: !existed, vhost: vhost)
}
