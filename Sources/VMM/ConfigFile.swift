// --config-file: Firecracker's JSON configuration file, with swiftlet's own keys, merged
// with the command line (README "Configuration file").
//
// Read: Firecracker's `boot-source`, `drives`, `network-interfaces`, `machine-config` and
// `entropy` (a virtio-rng device; its rate_limiter is refused) and `vsock` (guest_cid; a
// uds_path is refused: swiftlet's vsock is vhost-vsock) with the keys its API documents, plus swiftlet's extension keys (drives: num_queues,
// direct, serial; network-interfaces: queues, offload, vhost; a top-level `swiftlet` object for
// the settings Firecracker has no place for). Firecracker's other sections
// (balloon, logger, ...) are accepted only as null, which Firecracker reads as "not
// configured"; anything else in them is an error saying swiftlet has no such device.
//
// Every problem is one SwiftletError naming the JSON path ("drives[1].path_on_host:
// missing: ..."), status 64; a file that is not JSON is one line with the byte offset
// (JSON module), status 64; a missing or unreadable file is status 66.
//
// Decisions:
//   - Unknown keys, wrong types and missing required keys are errors, never ignored.
//     null for an optional key means the same as leaving it out (as Firecracker's serde
//     Option fields read it). Integers are written without a fraction or exponent.
//   - Strings may not hold U+0000: paths and the command line reach the kernel and libc
//     as C strings, where a NUL would cut them short.
//   - is_root_device (as Firecracker): at most one drive; it is moved to the front, so
//     the guest sees it as /dev/vda, and "root=/dev/vda" (or "root=PARTUUID=<partuuid>")
//     and "ro" or "rw" (is_read_only) are added to the kernel command line, before any
//     " -- " (what follows it belongs to the guest's /init).
//   - Flags given on the command line replace the file's value of the same setting;
//     --disk replaces the file's whole drives list, --net its network-interfaces (the
//     first --disk or --net given drops every drive or interface of the file).
//   - Left out of the file and the command line: swiftlet's own defaults (1 vCPU,
//     512 MiB, console=ttyS0 reboot=k panic=1), not Firecracker's (128 MiB, its own
//     boot_args).
import Glibc
import OS
import Devices
import JSON

/// One virtio-blk disk with its configuration-file identity.
public struct DriveSpec: Equatable, Sendable {
    /// drive_id (from --disk: "disk0", "disk1", ...).
    public var id: String
    public var options: DiskOptions
    public var isRoot: Bool
    /// With isRoot: "root=PARTUUID=<partuuid>" instead of "root=/dev/vda".
    public var partuuid: String?

    public init(id: String, options: DiskOptions, isRoot: Bool = false, partuuid: String? = nil) {
        self.id = id
        self.options = options
        self.isRoot = isRoot
        self.partuuid = partuuid
    }
}

/// One virtio-net device with its configuration-file identity.
public struct NetSpec: Equatable, Sendable {
    /// iface_id (from --net: "net0", "net1", ...).
    public var id: String
    public var options: NetOptions

    public init(id: String, options: NetOptions) {
        self.id = id
        self.options = options
    }
}

/// The settings one source gives (the configuration file or the command line); nil is
/// "not given there". `over` merges two sources, `machineConfig` applies the defaults.
public struct Settings: Equatable {
    public var kernel: String?
    public var initrd: String?
    public var cmdline: String?
    public var cpus: Int?
    public var memoryBytes: UInt64?
    public var drives: [DriveSpec]?
    public var nets: [NetSpec]?
    public var serial: SerialMode?
    public var logLevel: LogLevel?
    public var timeoutNanos: UInt64?
    public var metrics: String?
    public var isaDebugExit: Bool?
    public var virtioDiscovery: VirtioDiscovery?
    public var virtioIrq: VirtioInterruptMode?
    public var kernelDecompress: Bool?
    /// "auto", "none" or a directory (resolveKernelCache).
    public var kernelCache: String?
    /// --rng, or an `entropy` object in the file.
    public var rng: Bool?
    /// --vsock, or a `vsock` object in the file.
    public var vsock: VsockOptions?
    /// --device values, or the file's swiftlet.devices (each checked by `parseDevice`).
    public var devices: [String]?

    public init() {}

    /// This source's values where it gives them, `base`'s otherwise; lists (drives,
    /// nets) are taken whole from one source.
    public func over(_ base: Settings) -> Settings {
        var s = Settings()
        s.kernel = kernel ?? base.kernel
        s.initrd = initrd ?? base.initrd
        s.cmdline = cmdline ?? base.cmdline
        s.cpus = cpus ?? base.cpus
        s.memoryBytes = memoryBytes ?? base.memoryBytes
        s.drives = drives ?? base.drives
        s.nets = nets ?? base.nets
        s.serial = serial ?? base.serial
        s.logLevel = logLevel ?? base.logLevel
        s.timeoutNanos = timeoutNanos ?? base.timeoutNanos
        s.metrics = metrics ?? base.metrics
        s.isaDebugExit = isaDebugExit ?? base.isaDebugExit
        s.virtioDiscovery = virtioDiscovery ?? base.virtioDiscovery
        s.virtioIrq = virtioIrq ?? base.virtioIrq
        s.kernelDecompress = kernelDecompress ?? base.kernelDecompress
        s.kernelCache = kernelCache ?? base.kernelCache
        s.rng = rng ?? base.rng
        s.vsock = vsock ?? base.vsock
        s.devices = devices ?? base.devices
        return s
    }
}

// MARK: reading the file

/// A configuration file larger than this is refused (status 64).
public let maxConfigFileBytes = 1 << 20

/// The bytes of --config-file `path` (a regular file or a pipe such as `<(...)`).
public func readConfigFile(_ path: String) throws -> [UInt8] {
    let p = shown(path)
    guard !path.isEmpty else { throw SwiftletError(.usage, "--config-file needs a file, e.g. --config-file vm.json") }
    var fd = open(path, O_RDONLY | O_CLOEXEC)
    while fd < 0 && errno == EINTR { fd = open(path, O_RDONLY | O_CLOEXEC) }
    if fd < 0 {
        let e = errno
        if e == ENOENT || e == ENOTDIR { throw SwiftletError(.missingInput, "--config-file \(p) does not exist") }
        throw SwiftletError(.missingInput, "--config-file \(p) cannot be read: \(errnoText(e))")
    }
    defer { close(fd) }
    var st = stat()
    if fstat(fd, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR {
        throw SwiftletError(.missingInput, "--config-file \(p) is a directory: give a JSON file")
    }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            throw SwiftletError(.missingInput, "--config-file \(p) cannot be read: \(errnoText(errno))")
        }
        if n == 0 { break }
        out.append(contentsOf: chunk[0..<n])
        if out.count > maxConfigFileBytes {
            throw SwiftletError(.usage, "--config-file \(p) is larger than \(maxConfigFileBytes >> 20) MiB: a configuration is a few hundred bytes; is this the right file?")
        }
    }
    return out
}

/// Reads, parses and checks --config-file `path`.
public func loadConfigFile(_ path: String) throws -> Settings {
    let bytes = try readConfigFile(path)
    let doc: JSONValue
    do {
        doc = try JSON.parse(bytes)
    } catch let e as JSONError {
        throw SwiftletError(.usage, "--config-file \(shown(path)): \(e)")
    }
    return try parseConfig(doc)
}

// MARK: the schema

/// The keys of each object: Firecracker's documented ones, then swiftlet's.
enum ConfigKeys {
    static let top = ["boot-source", "drives", "network-interfaces", "machine-config", "entropy", "vsock"]
    /// Firecracker sections swiftlet has no device or feature for: accepted as null only.
    static let unsupportedSections = ["balloon", "cpu-config", "logger", "memory-hotplug", "metrics",
                                      "mmds-config", "pmem"]
    static let topExtensions = ["swiftlet"]
    static let bootSource = ["kernel_image_path", "initrd_path", "boot_args"]
    static let drive = ["drive_id", "path_on_host", "is_root_device", "is_read_only", "partuuid", "cache_type",
                        "io_engine", "rate_limiter", "socket"]
    static let driveExtensions = ["num_queues", "direct", "serial"]
    static let net = ["iface_id", "host_dev_name", "guest_mac", "mtu", "rx_rate_limiter", "tx_rate_limiter"]
    static let netExtensions = ["queues", "offload", "vhost"]
    static let machine = ["vcpu_count", "mem_size_mib", "smt", "track_dirty_pages", "huge_pages", "cpu_template"]
    static let entropy = ["rate_limiter"]
    static let vsock = ["vsock_id", "guest_cid", "uds_path"]
    static let swiftlet = ["serial", "log_level", "timeout", "metrics", "isa_debug_exit", "virtio_discovery",
                           "virtio_irq", "kernel_decompress", "kernel_cache", "devices"]
}

private func usage(_ message: String) -> SwiftletError { SwiftletError(.usage, message) }

private func list(_ keys: [String]) -> String {
    guard keys.count > 1 else { return keys.first ?? "" }
    return keys.dropLast().joined(separator: ", ") + " and " + keys.last!
}

/// The members of one JSON object, checked against the keys it may have.
private struct Fields {
    let path: String
    let members: [JSONMember]

    /// `what`: the object's name in the unknown-key message ("a drive").
    init(_ value: JSONValue, at path: String, what: String, keys: [String], extensions: [String] = [],
         alsoAllowed: [String] = []) throws {
        guard case .object(let m) = value else {
            throw usage("\(path.isEmpty ? "the configuration" : path): expected an object, got \(value.kindName)")
        }
        for member in m where !keys.contains(member.key) && !extensions.contains(member.key) && !alsoAllowed.contains(member.key) {
            let ext = extensions.isEmpty ? "" : ", and swiftlet's \(list(extensions))"
            throw usage("\(Fields.join(path, member.key)): unknown key: \(what) takes \(list(keys))\(ext)")
        }
        self.path = path
        self.members = m
    }

    static func join(_ path: String, _ key: String) -> String {
        path.isEmpty ? shown(key) : path + "." + shown(key)
    }

    func path(_ key: String) -> String { Fields.join(path, key) }

    /// The value of `key`; nil when absent or null.
    func value(_ key: String) -> JSONValue? {
        guard let v = members.first(where: { $0.key == key })?.value else { return nil }
        if case .null = v { return nil }
        return v
    }

    func has(_ key: String) -> Bool { members.contains(where: { $0.key == key }) }

    /// An optional string; `missing` given: a required one (absent or null is an error).
    func string(_ key: String, missing: String? = nil) throws -> String? {
        guard let v = value(key) else {
            if let missing {
                if has(key) { throw usage("\(path(key)): expected a string, got null") }
                throw usage("\(path(key)): missing: \(missing)")
            }
            return nil
        }
        guard case .string(let s) = v else { throw usage("\(path(key)): expected a string, got \(v.kindName)") }
        guard !s.unicodeScalars.contains("\0") else {
            throw usage("\(path(key)): contains a NUL character (\\u0000), which no path, name or command line can hold")
        }
        return s
    }

    /// A string that may not be empty.
    func nonEmptyString(_ key: String, missing: String? = nil, empty: String) throws -> String? {
        guard let s = try string(key, missing: missing) else { return nil }
        guard !s.isEmpty else { throw usage("\(path(key)): is empty: \(empty)") }
        return s
    }

    func bool(_ key: String, missing: String? = nil) throws -> Bool? {
        guard let v = value(key) else {
            if let missing {
                if has(key) { throw usage("\(path(key)): expected true or false, got null") }
                throw usage("\(path(key)): missing: \(missing)")
            }
            return nil
        }
        guard case .bool(let b) = v else { throw usage("\(path(key)): expected true or false, got \(v.kindName)") }
        return b
    }

    /// An integer in `range`; `what` names the unit in the range message.
    func int(_ key: String, range: ClosedRange<Int64>, what: String, missing: String? = nil) throws -> Int? {
        guard let v = value(key) else {
            if let missing {
                if has(key) { throw usage("\(path(key)): expected an integer, got null") }
                throw usage("\(path(key)): missing: \(missing)")
            }
            return nil
        }
        guard case .number(let n) = v else { throw usage("\(path(key)): expected an integer, got \(v.kindName)") }
        let shownNumber = n.literal.count > 24 ? String(n.literal.prefix(20)) + "..." : n.literal
        guard n.isInteger else {
            throw usage("\(path(key)): \(shownNumber) is not an integer: write a whole number without a fraction or exponent")
        }
        guard let i = n.int64, range.contains(i) else {
            throw usage("\(path(key)): \(shownNumber) is out of range: give \(range.lowerBound) to \(range.upperBound) \(what)")
        }
        return Int(i)
    }

    /// A Firecracker key swiftlet has no feature for: absent or null only.
    func nullOnly(_ key: String, _ why: String) throws {
        if value(key) != nil { throw usage("\(path(key)): \(why): leave it out or set it to null") }
    }
}

/// A Firecracker drive_id or iface_id: 1 to 64 ASCII letters, digits or '_' (as Firecracker
/// checks them).
private func checkID(_ s: String, at path: String) throws {
    guard (1...64).contains(s.utf8.count),
          s.utf8.allSatisfy({ ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5f }) else {
        throw usage("\(path): '\(shown(s))' is not a valid id: use 1 to 64 letters, digits or '_', e.g. rootfs")
    }
}

/// A flag parser's error re-said for the file: "--serial 'x' is not valid: ..." becomes
/// "swiftlet.serial: 'x' is not valid: ...".
private func restated(_ e: Error, flag: String, path: String) -> Error {
    guard let s = e as? SwiftletError, s.message.hasPrefix(flag + " ") else { return e }
    return SwiftletError(s.status, path + ": " + String(s.message.dropFirst(flag.count + 1)))
}

/// Checks a parsed configuration document and returns what it sets.
public func parseConfig(_ doc: JSONValue) throws -> Settings {
    let top = try Fields(doc, at: "", what: "the configuration", keys: ConfigKeys.top,
                         extensions: ConfigKeys.topExtensions, alsoAllowed: ConfigKeys.unsupportedSections)
    var s = Settings()
    for section in ConfigKeys.unsupportedSections {
        guard let v = top.value(section) else { continue }
        if section == "pmem", case .array(let a) = v, a.isEmpty { continue }
        switch section {
        case "logger":
            throw usage("logger: not supported by swiftlet, which logs to stderr: leave the section out or set it to null, and see swiftlet.log_level")
        case "metrics":
            throw usage("metrics: not supported by swiftlet: leave the section out or set it to null, and see swiftlet.metrics for swiftlet's own counters")
        default:
            throw usage("\(section): not supported by swiftlet: leave the section out or set it to null")
        }
    }

    if let v = top.value("boot-source") {
        let b = try Fields(v, at: "boot-source", what: "boot-source", keys: ConfigKeys.bootSource)
        s.kernel = try b.nonEmptyString("kernel_image_path",
                                        missing: "give the guest kernel (bzImage or vmlinux), e.g. \"kernel_image_path\": \"vmlinux.bin\"",
                                        empty: "give the guest kernel (bzImage or vmlinux)")
        s.initrd = try b.nonEmptyString("initrd_path", empty: "give the initrd file, or null for none")
        s.cmdline = try b.string("boot_args")
    }

    if let v = top.value("drives") {
        guard case .array(let items) = v else { throw usage("drives: expected an array, got \(v.kindName)") }
        var drives: [DriveSpec] = []
        var rootIndex: Int? = nil
        for (i, item) in items.enumerated() {
            let path = "drives[\(i)]"
            let d = try Fields(item, at: path, what: "a drive", keys: ConfigKeys.drive, extensions: ConfigKeys.driveExtensions)
            let id = try d.string("drive_id", missing: "give the drive a name, e.g. \"drive_id\": \"rootfs\"")!
            try checkID(id, at: d.path("drive_id"))
            if let j = drives.firstIndex(where: { $0.id == id }) {
                throw usage("\(d.path("drive_id")): '\(id)' is also drives[\(j)]'s drive_id: give each drive its own")
            }
            try d.nullOnly("socket", "vhost-user drives are not supported by swiftlet")
            let file = try d.nonEmptyString("path_on_host",
                                            missing: "give the disk image file, e.g. \"path_on_host\": \"rootfs.ext4\"",
                                            empty: "give the disk image file")!
            let isRoot = try d.bool("is_root_device", missing: "say whether the guest boots from this drive: \"is_root_device\": true or false")!
            var o = DiskOptions(path: file)
            o.readOnly = try d.bool("is_read_only") ?? false
            let partuuid = try d.nonEmptyString("partuuid", empty: "give the root partition's UUID, or null")
            if let u = partuuid {
                guard u.utf8.count <= 64, u.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "\"") }) else {
                    throw usage("\(d.path("partuuid")): '\(shown(u))' is not a partition UUID: use one word of printable ASCII, e.g. 0eaa91a0-01")
                }
            }
            if let c = try d.string("cache_type"), c != "Unsafe" && c != "Writeback" {
                throw usage("\(d.path("cache_type")): '\(shown(c))' is not valid: use Unsafe or Writeback (swiftlet passes the guest's flushes to the disk either way)")
            }
            if let e = try d.string("io_engine"), e != "Sync" {
                if e == "Async" {
                    throw usage("\(d.path("io_engine")): Async (io_uring) is not supported by swiftlet: use Sync or leave it out; \"direct\": true gives O_DIRECT with a pool of I/O threads")
                }
                throw usage("\(d.path("io_engine")): '\(shown(e))' is not valid: use Sync")
            }
            try d.nullOnly("rate_limiter", "rate limiters are not supported by swiftlet")
            o.numQueues = try d.int("num_queues", range: 1...Int64(DiskOptions.maxQueues), what: "queues") ?? 1
            o.direct = try d.bool("direct") ?? false
            if let serial = try d.nonEmptyString("serial", empty: "give up to \(DiskOptions.maxSerialBytes) characters, or null for none") {
                if let problem = DiskOptions.serialProblem(serial) { throw usage("\(d.path("serial")): \(problem)") }
                o.serial = serial
            }
            if isRoot {
                if let r = rootIndex {
                    throw usage("\(d.path("is_root_device")): drives[\(r)] is the root device already: only one drive can be")
                }
                rootIndex = i
            }
            drives.append(DriveSpec(id: id, options: o, isRoot: isRoot, partuuid: partuuid))
        }
        // The root device goes first, so that the guest sees it as /dev/vda.
        if let r = rootIndex, r > 0 { drives.insert(drives.remove(at: r), at: 0) }
        s.drives = drives
    }

    if let v = top.value("network-interfaces") {
        guard case .array(let items) = v else { throw usage("network-interfaces: expected an array, got \(v.kindName)") }
        var nets: [NetSpec] = []
        for (i, item) in items.enumerated() {
            let path = "network-interfaces[\(i)]"
            let n = try Fields(item, at: path, what: "a network interface", keys: ConfigKeys.net, extensions: ConfigKeys.netExtensions)
            let id = try n.string("iface_id", missing: "give the interface a name, e.g. \"iface_id\": \"eth0\"")!
            try checkID(id, at: n.path("iface_id"))
            if let j = nets.firstIndex(where: { $0.id == id }) {
                throw usage("\(n.path("iface_id")): '\(id)' is also network-interfaces[\(j)]'s iface_id: give each interface its own")
            }
            let tap = try n.nonEmptyString("host_dev_name", missing: "give the host's TAP device, e.g. \"host_dev_name\": \"tap0\"",
                                           empty: "give the host's TAP device, e.g. tap0")!
            if let problem = NetOptions.tapNameProblem(tap) { throw usage("\(n.path("host_dev_name")): \(problem)") }
            if let j = nets.firstIndex(where: { $0.options.tap == tap }) {
                throw usage("\(n.path("host_dev_name")): TAP \(shown(tap)) is also network-interfaces[\(j)]'s: give each interface its own TAP")
            }
            var o = NetOptions(tap: tap)
            if let m = try n.string("guest_mac") {
                let (mac, problem) = NetOptions.unicastMAC(m)
                guard let mac else { throw usage("\(n.path("guest_mac")): \(problem ?? "")") }
                o.mac = mac
            }
            o.mtu = try n.int("mtu", range: Int64(NetOptions.mtuRange.lowerBound)...Int64(NetOptions.mtuRange.upperBound), what: "bytes") ?? 1500
            try n.nullOnly("rx_rate_limiter", "rate limiters are not supported by swiftlet")
            try n.nullOnly("tx_rate_limiter", "rate limiters are not supported by swiftlet")
            o.queues = try n.int("queues", range: 1...Int64(NetOptions.maxQueues), what: "queue pairs") ?? 1
            o.offload = try n.bool("offload") ?? true
            if let v = try n.string("vhost") {
                guard let m = VhostMode(rawValue: v) else {
                    throw usage("\(n.path("vhost")): '\(shown(v))' is not valid: use \"on\", \"off\" or \"auto\"")
                }
                o.vhost = m
            }
            nets.append(NetSpec(id: id, options: o))
        }
        s.nets = nets
    }

    if let v = top.value("entropy") {
        let e = try Fields(v, at: "entropy", what: "entropy", keys: ConfigKeys.entropy)
        try e.nullOnly("rate_limiter", "rate limiters are not supported by swiftlet")
        s.rng = true
    }

    if let v = top.value("vsock") {
        let f = try Fields(v, at: "vsock", what: "vsock", keys: ConfigKeys.vsock)
        if let id = try f.string("vsock_id") { try checkID(id, at: f.path("vsock_id")) }
        let range = VsockOptions.range
        let cid = try f.int("guest_cid", range: Int64(range.lowerBound)...Int64(range.upperBound), what: "as the context ID (0-2 and 4294967295 are reserved)",
                            missing: "give the guest's context ID, e.g. \"guest_cid\": 3")!
        try f.nullOnly("uds_path", "swiftlet's vsock is the host kernel's vhost-vsock, which host programs reach over AF_VSOCK at the guest_cid, not through a Unix socket")
        s.vsock = VsockOptions(cid: UInt64(cid))
    }

    if let v = top.value("machine-config") {
        let m = try Fields(v, at: "machine-config", what: "machine-config", keys: ConfigKeys.machine)
        s.cpus = try m.int("vcpu_count", range: 1...maxConfigVCPUs, what: "vCPUs", missing: "give the number of vCPUs, e.g. \"vcpu_count\": 1")
        let mib = try m.int("mem_size_mib", range: Int64(MachineConfig.minimumMemory >> 20)...Int64(MachineConfig.maximumMemory >> 20),
                            what: "MiB", missing: "give the guest's memory in MiB, e.g. \"mem_size_mib\": 512")!
        s.memoryBytes = UInt64(mib) << 20
        if try m.bool("smt") == true {
            throw usage("\(m.path("smt")): true is not supported: swiftlet's vCPUs are single-threaded cores: use false or leave it out")
        }
        _ = try m.bool("track_dirty_pages")  // only snapshots use it, and swiftlet makes none
        if let h = try m.string("huge_pages"), h != "None" {
            guard h == "Transparent" || h == "2M" else {
                throw usage("\(m.path("huge_pages")): '\(shown(h))' is not valid: use None")
            }
            throw usage("\(m.path("huge_pages")): \(h) is not supported by swiftlet: use None or leave it out")
        }
        if let t = try m.string("cpu_template"), t != "None" {
            throw usage("\(m.path("cpu_template")): CPU templates are not supported by swiftlet (the guest sees the CPUID that KVM supports): use None or leave it out")
        }
    }

    if let v = top.value("swiftlet") {
        let w = try Fields(v, at: "swiftlet", what: "swiftlet", keys: ConfigKeys.swiftlet)
        func parsed<T>(_ key: String, _ flag: String, _ parse: (String) throws -> T) throws -> T? {
            guard let text = try w.string(key) else { return nil }
            do { return try parse(text) } catch { throw restated(error, flag: flag, path: w.path(key)) }
        }
        s.serial = try parsed("serial", "--serial", SerialMode.parse)
        s.logLevel = try parsed("log_level", "--log-level", LogLevel.parse)
        s.timeoutNanos = try parsed("timeout", "--timeout") { try parseDuration($0) }
        s.metrics = try w.nonEmptyString("metrics", empty: "give - (stderr) or a file, or null for none")
        s.isaDebugExit = try w.bool("isa_debug_exit")
        s.virtioDiscovery = try parsed("virtio_discovery", "--virtio-discovery", VirtioDiscovery.parse)
        s.virtioIrq = try parsed("virtio_irq", "--virtio-irq", VirtioInterruptMode.parse)
        s.kernelDecompress = try w.bool("kernel_decompress")
        s.kernelCache = try w.nonEmptyString("kernel_cache", empty: "give auto, none or a directory")
        if let v = w.value("devices") {
            guard case .array(let items) = v else {
                throw usage("\(w.path("devices")): expected an array of strings such as \"vsock,cid=3\", got \(v.kindName)")
            }
            s.devices = try items.enumerated().map { i, item in
                let at = "\(w.path("devices"))[\(i)]"
                guard case .string(let text) = item else {
                    throw usage("\(at): expected a string such as \"vsock,cid=3\", got \(item.kindName)")
                }
                _ = try parseDevice(text, kinds: deviceKinds, flag: at)
                return text
            }
        }
    }
    return s
}

/// The largest vcpu_count the file may ask for; the host's KVM limit is checked at start-up.
let maxConfigVCPUs: Int64 = 4096

// MARK: the effective configuration

/// The error when neither the command line nor the file names a kernel.
private let noKernel = SwiftletError(.usage, "no kernel given: use --kernel PATH, or boot-source.kernel_image_path in --config-file")

/// The kernel command line parameters is_root_device adds, or none.
public func rootDeviceParameters(_ drives: [DriveSpec]) -> [String] {
    guard let root = drives.first(where: { $0.isRoot }) else { return [] }
    return [root.partuuid.map { "root=PARTUUID=\($0)" } ?? "root=/dev/vda", root.options.readOnly ? "ro" : "rw"]
}

/// The machine to build from the merged settings: swiftlet's defaults where nothing was
/// given, the root device's parameters added to the command line, the kernel cache
/// resolved (which makes its directory).
public func machineConfig(_ s: Settings, startNanos: UInt64) throws -> MachineConfig {
    guard let kernel = s.kernel else { throw noKernel }
    let drives = s.drives ?? []
    let cmdline = insertKernelParameters(rootDeviceParameters(drives), into: s.cmdline ?? MachineConfig.defaultCmdline)
    var c = MachineConfig(kernelPath: kernel, initrdPath: s.initrd, cmdline: cmdline, cpus: s.cpus ?? 1,
                          memoryBytes: s.memoryBytes ?? MachineConfig.defaultMemory, serial: s.serial ?? .stdio,
                          logLevel: s.logLevel ?? .warn, startNanos: startNanos)
    c.disks = drives.map(\.options)
    c.nets = (s.nets ?? []).map(\.options)
    c.virtioDiscovery = s.virtioDiscovery ?? .acpi
    c.decompressKernel = s.kernelDecompress ?? true
    c.virtioInterrupts = s.virtioIrq ?? .edge
    c.kernelCacheDir = try resolveKernelCache(s.kernelCache ?? "auto", decompress: c.decompressKernel)
    c.timeoutNanos = s.timeoutNanos
    c.isaDebugExit = s.isaDebugExit ?? false
    c.metricsPath = s.metrics
    c.rng = s.rng ?? false
    c.vsock = s.vsock
    c.devices = try (s.devices ?? []).map { try parseDevice($0, kinds: deviceKinds) }
    return c
}

extension SerialMode {
    /// As --serial takes it.
    var flagValue: String {
        switch self {
        case .none: return "none"
        case .stdio: return "stdio"
        case .file(let p): return "file=" + p
        }
    }
}

extension LogLevel {
    var name: String {
        switch self {
        case .error: return "error"
        case .warn: return "warn"
        case .info: return "info"
        case .debug: return "debug"
        }
    }
}

/// A duration as --timeout and swiftlet.timeout take it, exactly: seconds with up to 9
/// decimals ("90s", "1.5s").
public func durationText(_ nanos: UInt64) -> String {
    decimalSeconds(whole: nanos / 1_000_000_000, fraction: nanos % 1_000_000_000, digits: 9) + "s"
}

/// The merged settings as a configuration file (what --print-config prints): every
/// setting with its effective value, defaults included. Read back with --config-file it
/// gives the same machine. boot_args is the command line as given: the root device's
/// parameters are added at start-up, as from any file.
public func effectiveConfigDocument(_ s: Settings) throws -> JSONValue {
    guard let kernel = s.kernel else { throw noKernel }
    let memory = s.memoryBytes ?? MachineConfig.defaultMemory
    guard memory % (1 << 20) == 0 else {
        throw usage("--print-config: --memory \(memory >> 10)K is not a whole number of MiB, which mem_size_mib cannot say: give the memory in M or G")
    }
    func str(_ v: String?) -> JSONValue { v.map { .string($0) } ?? .null }
    func int(_ v: Int) -> JSONValue { .number(JSONNumber(v)) }
    let drives: [JSONValue] = (s.drives ?? []).map { d in
        .object([
            JSONMember("drive_id", .string(d.id)),
            JSONMember("path_on_host", .string(d.options.path)),
            JSONMember("is_root_device", .bool(d.isRoot)),
            JSONMember("is_read_only", .bool(d.options.readOnly)),
            JSONMember("partuuid", str(d.partuuid)),
            JSONMember("num_queues", int(d.options.numQueues)),
            JSONMember("direct", .bool(d.options.direct)),
            JSONMember("serial", str(d.options.serial)),
        ])
    }
    let nets: [JSONValue] = (s.nets ?? []).enumerated().map { i, n in
        let mac = n.options.macAddress(index: i).map { b -> String in
            let h = String(b, radix: 16)
            return h.count == 1 ? "0" + h : h
        }.joined(separator: ":")
        return .object([
            JSONMember("iface_id", .string(n.id)),
            JSONMember("host_dev_name", .string(n.options.tap)),
            JSONMember("guest_mac", .string(mac)),
            JSONMember("mtu", int(n.options.mtu)),
            JSONMember("queues", int(n.options.queues)),
            JSONMember("offload", .bool(n.options.offload)),
            JSONMember("vhost", .string(n.options.vhost.rawValue)),
        ])
    }
    let discovery: String = (s.virtioDiscovery ?? .acpi) == .acpi ? "acpi" : "cmdline"
    let irq: String = (s.virtioIrq ?? .edge).name
    return .object([
        JSONMember("boot-source", .object([
            JSONMember("kernel_image_path", .string(kernel)),
            JSONMember("initrd_path", str(s.initrd)),
            JSONMember("boot_args", .string(s.cmdline ?? MachineConfig.defaultCmdline)),
        ])),
        JSONMember("drives", .array(drives)),
        JSONMember("network-interfaces", .array(nets)),
        JSONMember("machine-config", .object([
            JSONMember("vcpu_count", int(s.cpus ?? 1)),
            JSONMember("mem_size_mib", .number(JSONNumber(Int64(memory >> 20)))),
        ])),
        JSONMember("entropy", s.rng == true ? .object([]) : .null),
        JSONMember("vsock", s.vsock.map { v in
            .object([JSONMember("guest_cid", .number(JSONNumber(Int64(v.cid)))), JSONMember("uds_path", .null)])
        } ?? .null),
        JSONMember("swiftlet", .object([
            JSONMember("serial", .string((s.serial ?? .stdio).flagValue)),
            JSONMember("log_level", .string((s.logLevel ?? .warn).name)),
            JSONMember("timeout", str(s.timeoutNanos.map(durationText))),
            JSONMember("metrics", str(s.metrics)),
            JSONMember("isa_debug_exit", .bool(s.isaDebugExit ?? false)),
            JSONMember("virtio_discovery", .string(discovery)),
            JSONMember("virtio_irq", .string(irq)),
            JSONMember("kernel_decompress", .bool(s.kernelDecompress ?? true)),
            JSONMember("kernel_cache", .string(s.kernelCache ?? "auto")),
            JSONMember("devices", .array((s.devices ?? []).map { .string($0) })),
        ])),
    ])
}

/// effectiveConfigDocument as JSON text (what --print-config prints).
public func effectiveConfigText(_ s: Settings) throws -> String {
    JSON.serialize(try effectiveConfigDocument(s))
}
