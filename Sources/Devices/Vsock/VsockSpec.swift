// virtio-vsock's kind, spec and backend: `--device vsock,cid=N`, also spelt `--vsock cid=N`
// and the config file's `vsock` object (guest_cid). A virtio-vsock device served by the
// host kernel's vhost-vsock (VirtioVsock.swift). Host programs
// reach the guest over AF_VSOCK at CID N; the guest reaches the host at CID 2.
//
// Decisions:
//   - cid: decimal, 3...0xFFFFFFFE (0-2 are reserved and the host, 0xFFFFFFFF is
//     VMADDR_CID_ANY). Required: there is no default CID, since two VMs on one host may
//     not share one.
//   - /dev/vhost-vsock is opened, VHOST_SET_OWNER'd and given the CID (which the host
//     keeps for this VM until swiftlet exits) when the devices are opened, before KVM:
//     no vhost_vsock module, no permission or a CID another VM holds is one line and
//     status 69, with whatever was opened before it closed again (a TAP disappears).
//   - Firecracker's `uds_path` (its vsock proxies guest connections to Unix sockets) must
//     be null or absent: with vhost-vsock the host side is AF_VSOCK itself.
//   - The device takes the virtio-mmio index after every disk, network interface and rng.
import Glibc
import OS
import Virtio
import Vhost

/// `--device vsock,cid=N`.
public let vsockDeviceKind = VirtioDeviceKind(name: "vsock", form: VsockOptions.form) { options in
    let o = try VsockOptions.take(&options)
    return VsockDeviceSpec(options: o, given: "--device vsock,cid=\(o.cid)")
}

public struct VsockOptions: Equatable, Sendable {
    public var cid: UInt64

    public init(cid: UInt64) { self.cid = cid }

    public static let form = "cid=N"
    public static let range = VirtioVsockLimits.cids

    /// `text` (decimal digits only) as a guest CID, or nil.
    public static func cidValue(_ text: String) -> UInt64? {
        guard !text.isEmpty, text.utf8.count <= 10, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              let n = UInt64(text), range.contains(n) else { return nil }
        return n
    }

    /// Parses one --vsock value.
    public static func parse(_ text: String) throws -> VsockOptions {
        guard !text.isEmpty else { throw SwiftletError(.usage, "--vsock: empty option in '': use --vsock \(form)") }
        var options = try DeviceOptions(text, flag: "--vsock", form: form)
        return try take(&options)
    }

    /// The options of one vsock device: cid= and nothing else.
    public static func take(_ options: inout DeviceOptions) throws -> VsockOptions {
        let value = options.take("cid")
        try options.finish()
        guard let value else { throw options.usage("missing cid=: use \(DeviceOptions.hint(options.flag, options.form)), e.g. cid=3") }
        guard let n = cidValue(value) else {
            throw options.usage("cid='\(shown(value))' is not valid: use a context ID from \(range.lowerBound) to \(range.upperBound) (0-2 and 4294967295 are reserved), e.g. cid=3")
        }
        return VsockOptions(cid: n)
    }
}

/// --vsock: a virtio-vsock device on /dev/vhost-vsock.
public struct VsockDeviceSpec: VirtioDeviceSpec {
    public let options: VsockOptions
    /// How the user asked for it, for error lines: "--vsock cid=3".
    public let given: String
    public init(options: VsockOptions, given: String? = nil) {
        self.options = options
        self.given = given ?? Self.flagText(options)
    }

    /// "--vsock cid=N": how a device the user gave with --vsock is named in messages.
    static func flagText(_ o: VsockOptions) -> String { "--vsock cid=\(o.cid)" }
    public var kind: String { "vsock" }

    public func open(earlier: [any VirtioBackend]) throws -> any VirtioBackend {
        // Two devices of this VM on one CID: the kernel would call the second one's CID
        // taken by "another VM"; say what it is instead.
        if let twin = earlier.compactMap({ $0 as? VsockBackend }).first(where: { $0.options.cid == options.cid }) {
            throw SwiftletError(.usage, "\(given): guest CID \(options.cid) is also \(twin.given)'s: give each vsock device its own CID")
        }
        return try openVsock(options, given: given) { (cid: UInt64) throws(VhostOpenError) -> any VhostVsockBackend in try VhostVsock(cid: cid) }
    }
}

/// Opens the vhost-vsock instance of `o` with `open` (VhostVsock in the machine; tests
/// give a failing one), or throws one SwiftletError (status 69) saying why it cannot work.
func openVsock(_ o: VsockOptions, given: String? = nil, open: (UInt64) throws(VhostOpenError) -> any VhostVsockBackend) throws -> VsockBackend {
    let given = given ?? VsockDeviceSpec.flagText(o)
    let path = VhostVsock.path
    let why: String
    let fix: String
    do {
        let v = try open(o.cid)
        let f = try v.features()
        guard f & VirtioFeature.version1 != 0 else {
            throw SwiftletError(.hostUnavailable, "--vsock: \(path) does not offer VIRTIO_F_VERSION_1: use a newer host kernel")
        }
        return VsockBackend(options: o, given: given, vhost: v, features: f)
    } catch let e as VhostOpenError {
        switch e {
        case .open(let err) where err == ENOENT || err == ENODEV || err == ENXIO:
            why = "\(path) is missing"
            fix = "load the vhost_vsock module (modprobe vhost_vsock)"
        case .open(let err) where err == EACCES || err == EPERM:
            why = "cannot open \(path): \(errnoText(err))"
            fix = "run as root or give this user access to \(path)"
        case .open(let err):
            why = "cannot open \(path): \(errnoText(err))"
            fix = "check that the vhost_vsock module works"
        case .setup(let v) where v.errno == EADDRINUSE:
            why = "guest CID \(o.cid) is in use by another VM on this host"
            fix = "give this VM another CID"
        case .setup(let v):
            why = "\(path): \(v)"
            fix = "check that the vhost_vsock module works"
        }
    } catch let e as SwiftletError {
        throw e
    } catch {
        why = "\(path): \(error)"
        fix = "check that the vhost_vsock module works"
    }
    throw SwiftletError(.hostUnavailable, "\(given): \(why): \(fix)")
}

/// The vhost-vsock instance of one --vsock, owned (VHOST_SET_OWNER, the CID claimed).
final class VsockBackend: VirtioBackend {
    let options: VsockOptions
    /// How the user asked for it ("--vsock cid=3").
    let given: String
    let vhost: any VhostVsockBackend
    let features: UInt64

    init(options: VsockOptions, given: String, vhost: any VhostVsockBackend, features: UInt64) {
        self.options = options
        self.given = given
        self.vhost = vhost
        self.features = features
    }

    func makeDevice(name: String, ordinal: Int, log: RateLimitedLog?) throws -> BuiltDevice {
        let vsock = VirtioVsock(cid: options.cid, vhost: vhost, vhostFeatures: features, name: name, log: log)
        return BuiltDevice(vsock) { "\"guest_cid\": \(vsock.cid), " + queueMetricsJSON(vsock.stats) }
    }

    /// The descriptor (and the CID) goes with the last reference, when the machine is gone.
    func close() {}
}
