// io_uring through its raw system calls (io_uring_setup, io_uring_register,
// io_uring_enter) and its mmap'd rings, no liburing: several reads or writes handed to
// the kernel in one system call. The ring is made disabled, restricted to the operations
// its owner names (IORING_REGISTER_RESTRICTIONS: a submission of any other operation
// fails), then enabled; a kernel without io_uring, or one that refuses it (sysctl
// kernel.io_uring_disabled, a container's seccomp), makes `init` throw and the caller
// falls back to plain system calls.
import Glibc
import CLinux
import Synchronization

// @unchecked Sendable: made on one thread (the activating vCPU) and then used by one
// thread at a time (the queue thread that owns its handler; deinit on whichever thread
// drops the handler after that thread was joined).
public final class IOURing: @unchecked Sendable {
    public let fd: Int32
    /// Submission queue entries (a power of two, at least what was asked for).
    public let capacity: Int
    let sqRing: UnsafeMutableRawPointer
    let sqRingSize: Int
    /// nil when the kernel maps both rings in one area (IORING_FEAT_SINGLE_MMAP).
    let cqRing: UnsafeMutableRawPointer?
    let cqRingSize: Int
    let sqes: UnsafeMutableRawPointer
    let sqesSize: Int
    let sqHead: UnsafeMutablePointer<Atomic<UInt32>>
    let sqTail: UnsafeMutablePointer<Atomic<UInt32>>
    let sqMask: UInt32
    let sqArray: UnsafeMutablePointer<UInt32>
    let cqHead: UnsafeMutablePointer<Atomic<UInt32>>
    let cqTail: UnsafeMutablePointer<Atomic<UInt32>>
    let cqMask: UInt32
    let cqes: UnsafeMutableRawPointer
    /// Our submission tail (entries prepared; the kernel sees them at `submitAndWait`).
    var tail: UInt32
    /// Submitted and not yet reaped.
    public private(set) var inFlight = 0

    /// io_uring_enter calls made by every ring of the process (benchmarks count them
    /// beside the read/write-class calls).
    public static let enterCalls = Atomic<UInt64>(0)

    static let sqeSize = Int(clinux_io_uring_sqe_size())
    static let cqeSize = Int(clinux_io_uring_cqe_size())

    /// A ring of at least `entries` submission entries whose submissions may only be
    /// the io_uring operations `operations` (IORING_OP_*). Throws SystemError naming the
    /// call that failed; nothing is left open then.
    public init(entries: UInt32, operations: [UInt8]) throws {
        var p = io_uring_params()
        p.flags = clinux_IORING_SETUP_R_DISABLED()
        let fd = clinux_io_uring_setup(entries, &p)
        guard fd >= 0 else { throw SystemError(call: "io_uring_setup", errno: errno) }
        var mapped: [(UnsafeMutableRawPointer, Int)] = []
        func fail(_ call: String, _ e: Int32) -> SystemError {
            for (a, n) in mapped { munmap(a, n) }
            close(fd)
            return SystemError(call: call, errno: e)
        }
        func map(_ size: Int, _ offset: UInt) throws -> UnsafeMutableRawPointer {
            let a = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off_t(offset))
            guard let a, a != MAP_FAILED else { throw fail("mmap of the io_uring rings", errno) }
            mapped.append((a, size))
            return a
        }
        let single = p.features & clinux_IORING_FEAT_SINGLE_MMAP() != 0
        let sqSize = Int(p.sq_off.array) + Int(p.sq_entries) * 4
        let cqSize = Int(p.cq_off.cqes) + Int(p.cq_entries) * IOURing.cqeSize
        let sq = try map(single ? max(sqSize, cqSize) : sqSize, clinux_IORING_OFF_SQ_RING())
        let cq = single ? sq : try map(cqSize, clinux_IORING_OFF_CQ_RING())
        let sqesBytes = Int(p.sq_entries) * IOURing.sqeSize
        let sqes = try map(sqesBytes, clinux_IORING_OFF_SQES())

        // Only the named operations, then enable the ring.
        let rsize = Int(clinux_io_uring_restriction_size())
        var restrictions = [UInt8](repeating: 0, count: rsize * operations.count)
        for (i, op) in operations.enumerated() {
            withUnsafeBytes(of: clinux_IORING_RESTRICTION_SQE_OP().littleEndian) {
                restrictions.replaceSubrange(i * rsize..<(i * rsize + 2), with: $0)
            }
            restrictions[i * rsize + 2] = op
        }
        if restrictions.withUnsafeMutableBytes({
            clinux_io_uring_register(fd, clinux_IORING_REGISTER_RESTRICTIONS(), $0.baseAddress, UInt32(operations.count))
        }) < 0 {
            throw fail("io_uring_register (restrictions)", errno)
        }
        if clinux_io_uring_register(fd, clinux_IORING_REGISTER_ENABLE_RINGS(), nil, 0) < 0 {
            throw fail("io_uring_register (enable)", errno)
        }

        self.fd = fd
        capacity = Int(p.sq_entries)
        sqRing = sq
        sqRingSize = single ? max(sqSize, cqSize) : sqSize
        cqRing = single ? nil : cq
        cqRingSize = cqSize
        self.sqes = sqes
        sqesSize = sqesBytes
        sqHead = (sq + Int(p.sq_off.head)).assumingMemoryBound(to: Atomic<UInt32>.self)
        sqTail = (sq + Int(p.sq_off.tail)).assumingMemoryBound(to: Atomic<UInt32>.self)
        sqMask = (sq + Int(p.sq_off.ring_mask)).load(as: UInt32.self)
        sqArray = (sq + Int(p.sq_off.array)).assumingMemoryBound(to: UInt32.self)
        cqHead = (cq + Int(p.cq_off.head)).assumingMemoryBound(to: Atomic<UInt32>.self)
        cqTail = (cq + Int(p.cq_off.tail)).assumingMemoryBound(to: Atomic<UInt32>.self)
        cqMask = (cq + Int(p.cq_off.ring_mask)).load(as: UInt32.self)
        cqes = cq + Int(p.cq_off.cqes)
        tail = sqTail.pointee.load(ordering: .relaxed)
    }

    deinit {
        munmap(sqes, sqesSize)
        if let cqRing { munmap(cqRing, cqRingSize) }
        munmap(sqRing, sqRingSize)
        close(fd)
    }

    /// Entries prepared and not yet taken by the kernel.
    var unsubmitted: Int { Int(tail &- sqHead.pointee.load(ordering: .acquiring)) }

    /// Room for this many more entries before the next submission: every entry prepared
    /// or in flight holds a submission slot until its completion is reaped (so the
    /// completion ring, twice the submission ring, never overflows).
    public var room: Int { capacity - unsubmitted - inFlight }

    /// Prepares one readv or writev (`op`: IORING_OP_READV or _WRITEV) of `count` iovecs
    /// at the file's current position (offset -1), with RWF_NOWAIT: a call that would
    /// wait completes with -EAGAIN instead of being retried when the file is ready, so
    /// `submitAndWait` never waits for it; a file that cannot do that completes it with
    /// -EOPNOTSUPP. The iovecs must stay valid until its completion is reaped. False
    /// when the ring is full.
    @discardableResult
    public func prepareVectored(op: UInt8, fd: Int32, iovecs: UnsafePointer<iovec>, count: Int, userData: UInt64) -> Bool {
        guard room > 0 else { return false }
        let idx = tail & sqMask
        let e = sqes + Int(idx) * IOURing.sqeSize
        e.initializeMemory(as: UInt8.self, repeating: 0, count: IOURing.sqeSize)
        e.storeBytes(of: op, toByteOffset: 0, as: UInt8.self)                            // opcode
        e.storeBytes(of: fd, toByteOffset: 4, as: Int32.self)                             // fd
        e.storeBytes(of: UInt64.max, toByteOffset: 8, as: UInt64.self)                    // off: -1
        e.storeBytes(of: UInt64(UInt(bitPattern: iovecs)), toByteOffset: 16, as: UInt64.self)  // addr
        e.storeBytes(of: UInt32(count), toByteOffset: 24, as: UInt32.self)                // len
        e.storeBytes(of: UInt32(clinux_RWF_NOWAIT()), toByteOffset: 28, as: UInt32.self)   // rw_flags
        e.storeBytes(of: userData, toByteOffset: 32, as: UInt64.self)                     // user_data
        sqArray[Int(idx)] = idx
        tail &+= 1
        return true
    }

    /// Hands every prepared entry to the kernel and waits until every submitted entry
    /// has completed (with RWF_NOWAIT they complete during the submission). Throws when io_uring_enter fails for another reason than EINTR; the
    /// entries not submitted then are dropped (their completions never come).
    public func submitAndWait() throws {
        sqTail.pointee.store(tail, ordering: .releasing)
        while true {
            let toSubmit = UInt32(unsubmitted)
            let ready = Int(cqTail.pointee.load(ordering: .acquiring) &- cqHead.pointee.load(ordering: .relaxed))
            if toSubmit == 0 && ready >= inFlight { return }
            IOURing.enterCalls.wrappingAdd(1, ordering: .relaxed)
            let r = clinux_io_uring_enter(fd, toSubmit, UInt32(inFlight) + toSubmit, clinux_IORING_ENTER_GETEVENTS())
            if r < 0 {
                let e = errno
                if e == EINTR { continue }
                // Forget what the kernel did not take: nothing will complete it.
                tail = sqHead.pointee.load(ordering: .acquiring)
                sqTail.pointee.store(tail, ordering: .releasing)
                throw SystemError(call: "io_uring_enter", errno: e)
            }
            inFlight += Int(r)
        }
    }

    /// Hands each completion to `body` (user data, result: bytes moved or -errno) and
    /// frees its entry. Returns how many there were.
    @discardableResult
    public func reap(_ body: (UInt64, Int32) -> Void) -> Int {
        var h = cqHead.pointee.load(ordering: .relaxed)
        let t = cqTail.pointee.load(ordering: .acquiring)
        var n = 0
        while h != t {
            let c = cqes + Int(h & cqMask) * IOURing.cqeSize
            body(c.load(as: UInt64.self), c.load(fromByteOffset: 8, as: Int32.self))
            h &+= 1
            n += 1
        }
        cqHead.pointee.store(h, ordering: .releasing)
        inFlight -= n
        return n
    }
}
