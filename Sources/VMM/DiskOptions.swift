// --disk path=FILE[,readonly=on|off][,num_queues=N][,direct=on|off][,serial=ID]
//
// Parsing (usage errors, exit 64) and opening (exit 66 for an image that is missing,
// unreadable, a directory, locked or given twice; 65 for an image whose size is not a
// whole number of 512-byte sectors). Every error is one line that says what to do.
//
// Decisions:
//   - num_queues: 1...8 (VirtioBlockLimits.maxQueues), whatever the vCPU count. Each queue
//     costs one host thread; the guest driver uses min(num_queues, its CPUs).
//   - A directory is "input missing or unreadable" (66), like a missing file.
//   - Size not a multiple of 512: refused (65), never silently rounded: the guest would
//     not see the tail and a later resize would surprise. Empty images are refused too.
//   - direct=on opens with O_DIRECT; a filesystem that refuses it (tmpfs: EINVAL) is a
//     usage error telling to use direct=off. Guest buffers that are not 512-aligned go
//     through a second, buffered descriptor of the same file.
//   - Locks: flock(LOCK_EX | LOCK_NB) for a writable image, LOCK_SH for a read-only one, so
//     two swiftlets (or this one twice) never write one image. The same file (st_dev and
//     st_ino) given twice is refused unless every use is readonly=on.
//   - Commas inside a value are written ",," (as with QEMU).
import Glibc
import OS
import Devices
import Virtio
import GuestMemory
import KVM
import Boot


public struct DiskOptions: Equatable, Sendable {
    public var path: String
    public var readOnly: Bool = false
    public var numQueues: Int = 1
    public var direct: Bool = false
    /// GET_ID answer (at most 20 bytes); nil: none (the guest reads zeroes).
    public var serial: String? = nil

    public init(path: String, readOnly: Bool = false, numQueues: Int = 1, direct: Bool = false, serial: String? = nil) {
        self.path = path
        self.readOnly = readOnly
        self.numQueues = numQueues
        self.direct = direct
        self.serial = serial
    }

    public static let maxQueues = VirtioBlockLimits.maxQueues
    public static let maxSerialBytes = VirtioBlockLimits.idBytes

    /// What is wrong with a non-empty `value` as the disk's GET_ID serial, or nil.
    static func serialProblem(_ value: String) -> String? {
        guard value.utf8.count <= maxSerialBytes else {
            return "'\(shown(value))' is \(value.utf8.count) bytes: at most \(maxSerialBytes)"
        }
        guard value.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7f }) else {
            return "may only hold printable ASCII characters"
        }
        return nil
    }

    /// Parses one --disk value.
    public static func parse(_ text: String) throws -> DiskOptions {
        func usage(_ s: String) -> SwiftletError { SwiftletError(.usage, "--disk: \(s)") }
        // Split on ',' with ",," standing for a comma inside a value.
        var items: [String] = []
        var cur: [UInt8] = []
        let bytes = Array(text.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: ",") {
                if i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: ",") {
                    cur.append(bytes[i]); i += 2; continue
                }
                items.append(String(decoding: cur, as: UTF8.self)); cur = []; i += 1; continue
            }
            cur.append(bytes[i]); i += 1
        }
        items.append(String(decoding: cur, as: UTF8.self))

        var path: String? = nil
        var o = DiskOptions(path: "")
        var seen = Set<String>()
        for item in items {
            guard !item.isEmpty else {
                throw usage("empty option in '\(shown(text))': use path=FILE[,readonly=on|off][,num_queues=N][,direct=on|off][,serial=ID]")
            }
            guard let eq = item.firstIndex(of: "=") else {
                throw usage("'\(shown(item))' is not key=value: use path=FILE[,readonly=on|off][,num_queues=N][,direct=on|off][,serial=ID]")
            }
            let key = String(item[..<eq])
            let value = String(item[item.index(after: eq)...])
            guard !seen.contains(key) else { throw usage("\(shown(key))= given twice") }
            seen.insert(key)
            func onOff() throws -> Bool {
                switch value {
                case "on": return true
                case "off": return false
                default: throw usage("\(key)='\(shown(value))' is not valid: use \(key)=on or \(key)=off")
                }
            }
            switch key {
            case "path":
                guard !value.isEmpty else { throw usage("path= is empty: give the disk image file, e.g. path=disk.img") }
                path = value
            case "readonly": o.readOnly = try onOff()
            case "direct": o.direct = try onOff()
            case "num_queues":
                guard !value.isEmpty, value.utf8.count <= 3, value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                      let n = Int(value), n >= 1, n <= maxQueues else {
                    throw usage("num_queues='\(shown(value))' is not valid: use a number from 1 to \(maxQueues)")
                }
                o.numQueues = n
            case "serial":
                guard !value.isEmpty else { throw usage("serial= is empty: give up to \(maxSerialBytes) characters or leave it out") }
                if let problem = serialProblem(value) { throw usage("serial \(problem)") }
                o.serial = value
            default:
                throw usage("unknown option '\(shown(key))': use path, readonly, num_queues, direct or serial")
            }
        }
        guard let path else {
            throw usage("missing path=: use --disk path=FILE[,readonly=on|off][,num_queues=N][,direct=on|off][,serial=ID]")
        }
        o.path = path
        return o
    }
}

/// An opened, locked disk image ready to back a virtio-blk device.
public final class OpenDisk: Sendable {
    public let options: DiskOptions
    public let image: DiskImage
    public let device: UInt64
    public let inode: UInt64

    init(options: DiskOptions, image: DiskImage, device: UInt64, inode: UInt64) {
        self.options = options
        self.image = image
        self.device = device
        self.inode = inode
    }

    /// The virtio-blk device model for this disk.
    public func makeDevice(name: String, engine: BlockEngine? = nil,
                           log: RateLimitedLog? = nil) -> VirtioBlock {
        VirtioBlock(disk: image, numQueues: options.numQueues, engine: engine, name: name, log: log)
    }
}

/// A --disk: a virtio-blk device on an image file.
public struct DiskDeviceSpec: VirtioDeviceSpec {
    public let options: DiskOptions
    public var kind: String { "blk" }

    public func open(earlier: [any VirtioBackend]) throws -> any VirtioBackend {
        try openDisk(options, alreadyOpen: earlier.compactMap { $0 as? OpenDisk })
    }
}

extension OpenDisk: VirtioBackend {
    public func makeDevice(name: String, ordinal: Int, log: RateLimitedLog?) throws -> BuiltDevice {
        let blk = makeDevice(name: name, log: log)
        return BuiltDevice(blk) {
            let qs = blk.stats.enumerated().map { i, q in
                "{\"queue\": \(i), \"requests\": \(q.requests), \"interrupts\": \(q.interrupts)}"
            }
            return "\"queues\": [\(qs.joined(separator: ", "))]"
        }
    }

    /// Nothing to do: the image is closed and unlocked when its last user (this backend,
    /// then the device) goes away.
    public func close() {}
}

/// Opens and locks one image. `alreadyOpen`: the disks opened before, to refuse the same
/// image twice unless all uses are read-only.
public func openDisk(_ o: DiskOptions, alreadyOpen: [OpenDisk] = []) throws -> OpenDisk {
    let path = o.path
    let p = shown(path)
    var st = stat()
    if stat(path, &st) != 0 {
        let e = errno
        if e == ENOENT || e == ENOTDIR { throw SwiftletError(.missingInput, "disk image \(p) does not exist: check the --disk path=, or create it, e.g. truncate -s 1G \(p)") }
        throw SwiftletError(.missingInput, "cannot access disk image \(p): \(errnoText(e))")
    }
    let type = st.st_mode & S_IFMT
    if type == S_IFDIR { throw SwiftletError(.missingInput, "disk image \(p) is a directory: give an image file") }
    guard type == S_IFREG || type == S_IFBLK else {
        throw SwiftletError(.missingInput, "disk image \(p) is not a regular file or block device: give an image file")
    }
    for d in alreadyOpen where d.device == UInt64(st.st_dev) && d.inode == UInt64(st.st_ino) {
        if !(o.readOnly && d.options.readOnly) {
            throw SwiftletError(.usage, "disk image \(p) is given twice (also as \(shown(d.options.path))): a shared image must be readonly=on every time")
        }
    }

    let access = o.readOnly ? O_RDONLY : O_RDWR
    var flags = access | O_CLOEXEC
    if o.direct { flags |= O_DIRECT_FLAG }
    var fd = open(path, flags)
    if fd < 0 && errno == EINTR { fd = open(path, flags) }
    if fd < 0 {
        let e = errno
        if o.direct && e == EINVAL {
            throw SwiftletError(.usage, "disk image \(p): its filesystem does not support O_DIRECT (direct=on): use direct=off")
        }
        if !o.readOnly && (e == EACCES || e == EPERM || e == EROFS) {
            let r = open(path, O_RDONLY | O_CLOEXEC)
            if r >= 0 {
                close(r)
                throw SwiftletError(.missingInput, "disk image \(p) is read-only (\(errnoText(e))): add readonly=on to use it read-only")
            }
        }
        if e == ENOENT { throw SwiftletError(.missingInput, "disk image \(p) does not exist: check the --disk path=, or create it, e.g. truncate -s 1G \(p)") }
        if e == EACCES || e == EPERM {
            throw SwiftletError(.missingInput, "cannot open disk image \(p): \(errnoText(e)): give a file you can read (and write, without readonly=on)")
        }
        throw SwiftletError(.missingInput, "cannot open disk image \(p): \(errnoText(e))")
    }
    var ok = false
    var buffered: Int32 = -1
    defer {
        if !ok {
            close(fd)
            if buffered >= 0 { close(buffered) }
        }
    }
    if flock(fd, (o.readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0 {
        let e = errno
        if e == EWOULDBLOCK {
            throw SwiftletError(.missingInput, "disk image \(p) is in use (locked by another process): stop it, or use readonly=on in both")
        }
        throw SwiftletError(.missingInput, "cannot lock disk image \(p): \(errnoText(e))")
    }
    let end = lseek(fd, 0, SEEK_END)
    guard end >= 0 else { throw SwiftletError(.missingInput, "cannot get the size of disk image \(p): \(errnoText(errno))") }
    let size = UInt64(end)
    if size == 0 { throw SwiftletError(.badInput, "disk image \(p) is empty: give it a size, e.g. truncate -s 1G \(p)") }
    if size % VirtioBlockLimits.sectorSize != 0 {
        let up = (size + 511) / 512 * 512
        throw SwiftletError(.badInput, "disk image \(p) is \(size) bytes, not a multiple of 512: resize it, e.g. truncate -s \(up) \(p)")
    }
    if o.direct {
        buffered = open(path, access | O_CLOEXEC)
        if buffered < 0 { throw SwiftletError(.missingInput, "cannot open disk image \(p): \(errnoText(errno))") }
    }
    ok = true
    let image = DiskImage(fd: fd, bufferedFD: buffered, size: size, readOnly: o.readOnly, direct: o.direct,
                          serial: o.serial ?? "")
    return OpenDisk(options: o, image: image, device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
}

extension VirtioMMIOSlot {
    /// A virtio-blk device for `disk` as virtio-mmio device `index` (address and GSI from
    /// X86Layout), with queue threads named "\(name)-qN".
    public static func block(_ disk: OpenDisk, index: Int, name: String, vm: any VirtioVM, memory: GuestMemory,
                             engine: BlockEngine? = nil, interrupts: VirtioInterruptMode = .line,
                             registers: VirtioRegisterMode = .exit, log: LogSink? = nil) throws -> VirtioMMIOSlot {
        let deviceLog = log.map { RateLimitedLog(name: name, sink: $0) }
        return try VirtioMMIOSlot(vm: vm, memory: memory, device: disk.makeDevice(name: name, engine: engine, log: deviceLog),
                                  index: index, name: name, interrupts: interrupts, registers: registers, log: deviceLog)
    }
}
