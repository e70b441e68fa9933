// seccomp-BPF allowlists, one per thread role, each installed by a thread on itself
// (docs/DESIGN.md "seccomp"). A filter is inherited by the threads its thread creates
// afterwards and stacks with theirs (the most restrictive answer wins), so a role that
// creates threads after its filter is on allows everything its children need: the
// vCPU role's list includes the queue-worker and disk I/O pool lists.
//
// Each program checks the architecture first (AUDIT_ARCH_X86_64, anything else kills the
// process), then the system call number, then arguments where they matter (ioctl
// requests, clone flags, no executable mappings). A call outside the list gets
// SECCOMP_RET_TRAP (--seccomp on: the SIGSYS handler prints one line and ends swiftlet
// with status 1) or SECCOMP_RET_LOG (--seccomp log: allowed, logged by the kernel).
import Glibc
import OS
import CLinux

/// --seccomp: on (a forbidden call ends swiftlet), log (allowed and logged by the
/// kernel), off (no filter).
public enum SeccompMode: String, Sendable, Equatable {
    case on, log, off

    public static func parse(_ s: String) -> SeccompMode? { SeccompMode(rawValue: s) }
}

/// What a thread does, which decides its allowlist.
public enum ThreadRole: String, Sendable, CaseIterable {
    /// The main thread once the machine is built: stdin, signals, --timeout, teardown.
    case main
    /// A vCPU thread: KVM_RUN and the exits it handles (device registers, activation).
    case vcpu
    /// A virtio queue thread ("blk0-q0", "net0-q0+1").
    case queue
    /// A disk I/O pool thread ("blk0-q0-io0").
    case io
    /// A resampling irqfd thread ("blk0-irq").
    case irq
}

/// Process-wide seccomp settings, set once by the machine before any thread starts.
public enum Seccomp {
    // nonisolated(unsafe), these three: set by the machine on the main thread before it
    // starts any thread, only read afterwards.
    /// The mode threads install their filters with; libraries and tests leave it off.
    nonisolated(unsafe) public static var mode: SeccompMode = .off
    /// The main thread may open (and rename) a --metrics file after its filter is on.
    nonisolated(unsafe) public static var mainMayWriteFiles = false
    /// The main thread reads /proc/self/status and asks mincore about guest RAM after its
    /// filter is on (--log-level debug's memory line).
    nonisolated(unsafe) public static var mainReadsProcStatus = false

    /// Installs the SIGSYS handler that reports a trapped call (call once, before any filter).
    public static func installViolationHandler() -> Int32 {
        clinux_install_sigsys_handler() == 0 ? 0 : errno
    }

    /// Installs `role`'s filter on the calling thread, labelled `name` in a violation line.
    /// Returns 0 or an errno; does nothing when `mode` is off.
    @discardableResult
    public static func install(_ role: ThreadRole, name: String, mode: SeccompMode? = nil) -> Int32 {
        let mode = mode ?? self.mode
        if mode == .off { return 0 }
        clinux_seccomp_set_thread_label(String(decoding: Array(name.utf8.prefix(15)), as: UTF8.self))
        var prog = program(for: role, mode: mode)
        let r = prog.withUnsafeMutableBufferPointer { clinux_seccomp_install(UInt16($0.count), $0.baseAddress) }
        return r == 0 ? 0 : errno
    }

    /// Installs `role`'s filter, or ends swiftlet with one line and status 1 if the kernel
    /// refuses it (for threads that have no way to report a failure).
    public static func installOrExit(_ role: ThreadRole, name: String) {
        let e = install(role, name: name)
        guard e != 0 else { return }
        writeStderr("swiftlet: seccomp: cannot install the \(role.rawValue) filter on thread \(name): \(errnoText(e)): run with --seccomp off on this kernel\n")
        _exit(1)
    }

    /// The BPF program of `role`.
    public static func program(for role: ThreadRole, mode: SeccompMode) -> [sock_filter] {
        let deny = mode == .log ? UInt32(SECCOMP_RET_LOG) : UInt32(SECCOMP_RET_TRAP)
        return BPFBuilder.build(rules: rules(for: role), deny: deny)
    }

    /// The system calls (and argument conditions) of `role`.
    public static func rules(for role: ThreadRole) -> [SyscallRule] {
        var r: [SyscallRule]
        switch role {
        case .main:
            r = common + [
                .allow(SYS_poll), .allow(SYS_ppoll), .allow(SYS_readv), .allow(SYS_writev),
                .allow(SYS_tgkill, arg: 2, in: [UInt32(SIGABRT), UInt32(clinux_sigrtmin())]),
                .allow(SYS_flock), .allow(SYS_fsync), .allow(SYS_fdatasync),
                // teardown stops the devices: an rx queue takes its TAP out of its epoll set,
                // a vhost pair detaches its rings
                .allow(SYS_epoll_ctl),
                .allow(SYS_ioctl, arg: 1, in: terminalIoctls + [
                    clinux_KVM_IOEVENTFD(), clinux_KVM_IRQFD(), clinux_KVM_IRQ_LINE(),
                    clinux_TUNSETQUEUE(), clinux_TUNSETPERSIST(),
                    // where a guest stopped from outside was (its vCPUs, after their join)
                    clinux_KVM_GET_REGS(), clinux_KVM_GET_SREGS(),
                ].map(UInt32.init(truncatingIfNeeded:)) + vhostStopIoctls),
            ]
            if mainMayWriteFiles {
                r += [.allow(SYS_openat), .allow(SYS_rename), .allow(SYS_renameat), .allow(SYS_renameat2)]
            }
            if mainReadsProcStatus { r += [.allow(SYS_openat), .allow(SYS_mincore)] }
        case .vcpu:
            // vCPU threads start the queue threads and disk I/O pools when a driver sets
            // DRIVER_OK: those inherit this filter, so it allows what they need too.
            r = common + queueOwn + ioOwn + threadCreation + [
                .allow(SYS_eventfd2),
                // a virtio-net tx queue's io_uring, made at DRIVER_OK (restricted, enabled)
                .allow(SYS_io_uring_setup), .allow(SYS_io_uring_register),
                .allow(SYS_ioctl, arg: 1, in: [
                    clinux_KVM_RUN(), clinux_KVM_GET_REGS(), clinux_KVM_GET_SREGS(),
                    clinux_KVM_SET_SIGNAL_MASK(), clinux_KVM_IRQ_LINE(), clinux_KVM_IOEVENTFD(),
                    clinux_TUNSETOFFLOAD(), clinux_TUNSETQUEUE(),
                ].map(UInt32.init(truncatingIfNeeded:)) + vhostIoctls),
            ]
        case .queue:
            r = common + queueOwn + [
                .allow(SYS_ioctl, arg: 1, in: [clinux_KVM_IRQ_LINE(), clinux_TUNSETQUEUE()].map(UInt32.init(truncatingIfNeeded:))
                    + vhostIoctls),
            ]
        case .io:
            r = common + ioOwn
        case .irq:
            r = common + [.allow(SYS_poll), .allow(SYS_ppoll)]
        }
        return r
    }

    /// Every role: memory, locks, signals, time, stderr, thread naming and exit.
    static let common: [SyscallRule] = [
        .allow(SYS_futex), .allow(SYS_read), .allow(SYS_write),
        .allow(SYS_close),
        .allowIfClear(SYS_mmap, arg: 2, mask: UInt32(PROT_EXEC)),
        .allowIfClear(SYS_mprotect, arg: 2, mask: UInt32(PROT_EXEC)),
        .allow(SYS_munmap), .allow(SYS_mremap), .allow(SYS_madvise), .allow(SYS_brk),
        .allow(SYS_rt_sigprocmask), .allow(SYS_rt_sigreturn), .allow(SYS_rt_sigtimedwait),
        .allow(SYS_sigaltstack),
        .allow(SYS_clock_gettime), .allow(SYS_gettimeofday), .allow(SYS_clock_nanosleep),
        .allow(SYS_nanosleep), .allow(SYS_sched_yield), .allow(SYS_getrandom),
        .allow(SYS_getpid), .allow(SYS_gettid),
        .allow(SYS_tgkill, arg: 2, in: [UInt32(SIGABRT)]),
        .allow(SYS_fstat), .allow(SYS_newfstatat), .allow(SYS_lseek),
        // libc opens files for reading on its own on some paths (time zone, message
        // catalogues behind strerror, CPU counts): opening for reading only, never to
        // write, create or truncate.
        .allowIfClear(SYS_openat, arg: 2, mask: UInt32(O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND)),
        .allow(SYS_prctl, arg: 0, in: [UInt32(PR_SET_NAME), UInt32(PR_GET_NAME), UInt32(PR_SET_NO_NEW_PRIVS)]),
        .allow(SYS_seccomp, arg: 0, in: [UInt32(SECCOMP_SET_MODE_FILTER)]),
        .allow(SYS_exit), .allow(SYS_exit_group),
    ]
    /// A queue thread's own calls (a disk served inline, a TAP watched through an epoll
    /// instance that the rx queue makes when the driver starts it, eventfds, the tx
    /// queue's io_uring batches).
    static let queueOwn: [SyscallRule] = [
        .allow(SYS_poll), .allow(SYS_ppoll), .allow(SYS_readv), .allow(SYS_writev),
        .allow(SYS_io_uring_enter),
        // io_uring's task_work (TWA_SIGNAL: e.g. the kernel detaching a ring from the
        // thread) interrupts a poll, which the kernel then resumes through restart_syscall
        .allow(SYS_restart_syscall),
        .allow(SYS_epoll_create1), .allow(SYS_epoll_ctl), .allow(SYS_epoll_wait), .allow(SYS_epoll_pwait),
        .allow(SYS_preadv), .allow(SYS_pwritev), .allow(SYS_pread64), .allow(SYS_pwrite64),
        .allow(SYS_fdatasync), .allow(SYS_fallocate),
    ]
    /// A disk I/O pool thread's own calls.
    static let ioOwn: [SyscallRule] = [
        .allow(SYS_preadv), .allow(SYS_pwritev), .allow(SYS_pread64), .allow(SYS_pwrite64),
        .allow(SYS_fdatasync), .allow(SYS_fallocate),
    ]
    /// pthread_create: threads only (clone with CLONE_THREAD; clone3, whose flags a filter
    /// cannot see, fails with ENOSYS so glibc falls back to clone).
    static let threadCreation: [SyscallRule] = [
        .errno(SYS_clone3, ENOSYS),
        .allowIfSet(SYS_clone, arg: 0, mask: UInt32(truncatingIfNeeded: clinux_CLONE_THREAD())),
        .allow(SYS_set_robust_list), .allow(SYS_rseq),
    ]
    /// vhost ring setup, start and stop: a vCPU thread configures the rings at
    /// DRIVER_OK (and stops them at a reset); for vhost-net the control queue's thread
    /// starts and stops pairs; a device's thread stops its rings on a ring error or at
    /// stop. (VHOST_SET_OWNER, VHOST_GET_FEATURES and VHOST_VSOCK_SET_GUEST_CID run
    /// before any filter.)
    static var vhostIoctls: [UInt32] {
        [clinux_VHOST_SET_FEATURES(), clinux_VHOST_SET_MEM_TABLE(), clinux_VHOST_SET_VRING_NUM(),
         clinux_VHOST_SET_VRING_ADDR(), clinux_VHOST_SET_VRING_BASE(), clinux_VHOST_GET_VRING_BASE(),
         clinux_VHOST_SET_VRING_KICK(), clinux_VHOST_SET_VRING_CALL(), clinux_VHOST_SET_VRING_ERR(),
         clinux_VHOST_NET_SET_BACKEND(), clinux_VHOST_VSOCK_SET_RUNNING()].map(UInt32.init(truncatingIfNeeded:))
    }
    /// Stopping vhost rings (teardown on the main thread): detach vhost-net pairs, stop
    /// vhost-vsock, read the ring bases, unbind the eventfds.
    static var vhostStopIoctls: [UInt32] {
        [clinux_VHOST_GET_VRING_BASE(), clinux_VHOST_SET_VRING_KICK(), clinux_VHOST_SET_VRING_CALL(),
         clinux_VHOST_SET_VRING_ERR(), clinux_VHOST_NET_SET_BACKEND(), clinux_VHOST_VSOCK_SET_RUNNING()]
            .map(UInt32.init(truncatingIfNeeded:))
    }
    static var terminalIoctls: [UInt32] {
        [clinux_TCGETS(), clinux_TCSETS(), clinux_TCSETSW(), clinux_TCSETSF()].map(UInt32.init(truncatingIfNeeded:))
    }
}

/// One system call of an allowlist and what it may be called with.
public struct SyscallRule: Sendable {
    public enum Check: Sendable {
        /// Any arguments.
        case any
        /// The low 32 bits of argument `arg` are one of `values` (ioctl requests are 32-bit
        /// in the kernel; prctl options, signal numbers).
        case oneOf(arg: Int, values: [UInt32])
        /// No bit of `mask` set in argument `arg` (low 32 bits).
        case clear(arg: Int, mask: UInt32)
        /// Every bit of `mask` set in argument `arg` (low 32 bits).
        case set(arg: Int, mask: UInt32)
        /// Not allowed: fails with this errno instead of the deny action.
        case fail(errno: Int32)
    }
    public let nr: UInt32
    public let check: Check

    public static func allow(_ nr: some BinaryInteger, arg: Int, in values: [UInt32]) -> SyscallRule {
        SyscallRule(nr: UInt32(nr), check: .oneOf(arg: arg, values: values))
    }
    public static func allow(_ nr: some BinaryInteger) -> SyscallRule { SyscallRule(nr: UInt32(nr), check: .any) }
    public static func allowIfClear(_ nr: some BinaryInteger, arg: Int, mask: UInt32) -> SyscallRule {
        SyscallRule(nr: UInt32(nr), check: .clear(arg: arg, mask: mask))
    }
    public static func allowIfSet(_ nr: some BinaryInteger, arg: Int, mask: UInt32) -> SyscallRule {
        SyscallRule(nr: UInt32(nr), check: .set(arg: arg, mask: mask))
    }
    public static func errno(_ nr: some BinaryInteger, _ e: Int32) -> SyscallRule { SyscallRule(nr: UInt32(nr), check: .fail(errno: e)) }
}

/// Classic BPF for seccomp: a straight list of checks, each followed by its own return, so
/// no jump goes further than one rule's block (jt/jf are 8 bits).
enum BPFBuilder {
    static func stmt(_ code: Int32, _ k: UInt32) -> sock_filter {
        sock_filter(code: UInt16(code), jt: 0, jf: 0, k: k)
    }
    static func jump(_ code: Int32, _ k: UInt32, _ jt: Int, _ jf: Int) -> sock_filter {
        sock_filter(code: UInt16(code), jt: UInt8(jt), jf: UInt8(jf), k: k)
    }

    static func build(rules: [SyscallRule], deny: UInt32) -> [sock_filter] {
        let allow = UInt32(SECCOMP_RET_ALLOW)
        let loadNr = stmt(BPF_LD | BPF_W | BPF_ABS, clinux_seccomp_data_nr_offset())
        var p: [sock_filter] = [
            stmt(BPF_LD | BPF_W | BPF_ABS, clinux_seccomp_data_arch_offset()),
            jump(BPF_JMP | BPF_JEQ | BPF_K, clinux_AUDIT_ARCH_X86_64(), 1, 0),
            stmt(BPF_RET | BPF_K, UInt32(SECCOMP_RET_KILL_PROCESS)),
            loadNr,
            // x32 system calls (bit 30) are never allowed.
            jump(BPF_JMP | BPF_JGE | BPF_K, 0x4000_0000, 0, 1),
            stmt(BPF_RET | BPF_K, deny),
        ]
        // The same number may come twice (a role's list is a union): an unconditional allow
        // replaces a conditional one, argument lists of the same kind merge, and any other
        // later duplicate is dropped (the first rule wins).
        var merged: [SyscallRule] = []
        for r in rules {
            if let i = merged.firstIndex(where: { $0.nr == r.nr }) {
                if case .any = r.check {
                    merged[i] = r
                } else if case .oneOf(let a, let v1) = merged[i].check, case .oneOf(let b, let v2) = r.check, a == b {
                    var vs = v1
                    for v in v2 where !vs.contains(v) { vs.append(v) }
                    merged[i] = SyscallRule(nr: r.nr, check: .oneOf(arg: a, values: vs))
                }
                continue
            }
            merged.append(r)
        }
        for r in merged {
            var block: [sock_filter]
            switch r.check {
            case .any:
                block = [stmt(BPF_RET | BPF_K, allow)]
            case .fail(let e):
                block = [stmt(BPF_RET | BPF_K, UInt32(SECCOMP_RET_ERRNO) | (UInt32(e) & UInt32(SECCOMP_RET_DATA)))]
            case let .oneOf(arg, values):
                block = [stmt(BPF_LD | BPF_W | BPF_ABS, clinux_seccomp_data_arg_offset(Int32(arg)))]
                for v in values {
                    block.append(jump(BPF_JMP | BPF_JEQ | BPF_K, v, 0, 1))
                    block.append(stmt(BPF_RET | BPF_K, allow))
                }
                block.append(stmt(BPF_RET | BPF_K, deny))
            case let .clear(arg, mask):
                block = [stmt(BPF_LD | BPF_W | BPF_ABS, clinux_seccomp_data_arg_offset(Int32(arg))),
                         jump(BPF_JMP | BPF_JSET | BPF_K, mask, 1, 0),
                         stmt(BPF_RET | BPF_K, allow),
                         stmt(BPF_RET | BPF_K, deny)]
            case let .set(arg, mask):
                block = [stmt(BPF_LD | BPF_W | BPF_ABS, clinux_seccomp_data_arg_offset(Int32(arg))),
                         stmt(BPF_ALU | BPF_AND | BPF_K, mask),
                         jump(BPF_JMP | BPF_JEQ | BPF_K, mask, 0, 1),
                         stmt(BPF_RET | BPF_K, allow),
                         stmt(BPF_RET | BPF_K, deny)]
            }
            precondition(block.count <= 255, "seccomp rule block too long")
            // Every block ends in a return, so A still holds the number on a miss.
            p.append(jump(BPF_JMP | BPF_JEQ | BPF_K, r.nr, 0, block.count))
            p += block
        }
        p.append(stmt(BPF_RET | BPF_K, deny))
        return p
    }
}
