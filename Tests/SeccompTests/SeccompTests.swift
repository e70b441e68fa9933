// Each role's filter installed in a forked child (the test process itself stays
// unfiltered): an allowed call passes, a forbidden one ends the child with status 1 and
// the one-line report, --seccomp log lets it through.
import XCTest
import Glibc
import CLinux
import OS
@testable import Seccomp

final class SeccompTests: XCTestCase {
    /// Runs `body` in a child with `role`'s filter (mode `mode`) installed; returns the
    /// child's exit status (or 128+signal) and its stderr.
    func inChild(_ role: ThreadRole, mode: SeccompMode = .on, before: (() -> Void)? = nil,
                 _ body: @escaping () -> Int32) -> (status: Int32, stderr: String) {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        let label = "test-\(role.rawValue)"
        let pid = fork()
        if pid == 0 {
            dup2(fds[1], 2)
            close(fds[0])
            before?()
            if mode == .on, Seccomp.installViolationHandler() != 0 { _exit(90) }
            if Seccomp.install(role, name: label, mode: mode) != 0 { _exit(91) }
            _exit(body())
        }
        close(fds[1])
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 512)
        while true {
            let n = read(fds[0], &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        close(fds[0])
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        let status = (st & 0x7f) == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
        return (status, String(decoding: out, as: UTF8.self))
    }

    func testEveryRoleTrapsAForbiddenCallWithOneLine() {
        for role in ThreadRole.allCases {
            let r = inChild(role) { Int32(truncatingIfNeeded: clinux_syscall0(Int(SYS_getppid))) == 0 ? 0 : 0 }
            XCTAssertEqual(r.status, 1, "\(role): \(r.stderr)")
            XCTAssertEqual(r.stderr, "swiftlet: seccomp: thread test-\(role.rawValue) made forbidden syscall \(SYS_getppid) (getppid)\n")
        }
    }

    func testAllowedCallsPass() {
        for role in ThreadRole.allCases {
            let r = inChild(role) {
                let msg = "ok"
                _ = msg.withCString { write(2, $0, 2) }
                let p = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 16)  // mmap, munmap
                p.deallocate()
                return clinux_syscall0(Int(SYS_gettid)) > 0 ? 7 : 8
            }
            XCTAssertEqual(r.status, 7, "\(role): \(r.stderr)")
            XCTAssertEqual(r.stderr, "ok")
        }
    }

    /// A virtio-net tx queue's io_uring: the vCPU that starts the device makes and
    /// restricts it (io_uring_setup, io_uring_register) and may submit; the queue thread
    /// only submits (io_uring_enter); no other role has io_uring at all.
    func testIOURingOnlyWhereNetTxUsesIt() {
        let v = inChild(.vcpu) {
            guard let r = try? IOURing(entries: 4, operations: [clinux_IORING_OP_WRITEV()]) else { return 5 }
            guard let e = try? EventFD() else { return 6 }
            let b = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            b.storeBytes(of: UInt64(1), as: UInt64.self)
            var v = iovec(iov_base: b, iov_len: 8)
            r.prepareVectored(op: clinux_IORING_OP_WRITEV(), fd: e.fd, iovecs: &v, count: 1, userData: 1)
            guard (try? r.submitAndWait()) != nil else { return 8 }
            var res: Int32 = 0
            r.reap { _, x in res = x }
            return res == 8 && (try? e.read()) == 1 ? 7 : 9
        }
        if v.status == 5 { return }  // this kernel refuses io_uring: nothing to allow
        XCTAssertEqual(v.status, 7, v.stderr)
        let q = inChild(.queue) { clinux_io_uring_enter(-1, 0, 0, 0) < 0 && errno == EBADF ? 7 : 8 }
        XCTAssertEqual(q.status, 7, q.stderr)
        // A poll the ring's task_work interrupts is resumed through restart_syscall
        // (called directly, with nothing to resume, it fails with EINTR). A forked child
        // inherits its parent thread's restart block, so the child first takes a signal:
        // returning from a handler leaves nothing to resume.
        let rs = inChild(.queue, before: {
            signal(SIGUSR2) { _ in }
            raise(SIGUSR2)
        }) { clinux_syscall0(Int(SYS_restart_syscall)) < 0 && errno == EINTR ? 7 : 8 }
        XCTAssertEqual(rs.status, 7, rs.stderr)
        let qs = inChild(.queue) {
            var p = io_uring_params()
            return clinux_io_uring_setup(4, &p) >= 0 ? 0 : 5
        }
        XCTAssertEqual(qs.status, 1)
        XCTAssertTrue(qs.stderr.hasSuffix("made forbidden syscall \(SYS_io_uring_setup) (io_uring_setup)\n"), qs.stderr)
        for role in [ThreadRole.main, .io, .irq] {
            let r = inChild(role) { clinux_io_uring_enter(-1, 0, 0, 0) < 0 ? 5 : 0 }
            XCTAssertEqual(r.status, 1, "\(role)")
            XCTAssertTrue(r.stderr.hasSuffix("made forbidden syscall \(SYS_io_uring_enter) (io_uring_enter)\n"), r.stderr)
        }
    }

    /// Every role may open a file for reading (libc does on its own, e.g. for strerror's
    /// message catalogues) but not for writing or creating one.
    func testOpenForReadingOnly() {
        for role in ThreadRole.allCases {
            let r = inChild(role) {
                let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { return 5 }
                close(fd)
                return 7
            }
            XCTAssertEqual(r.status, 7, "\(role): \(r.stderr)")
            let w = inChild(role) { open("/dev/null", O_WRONLY | O_CLOEXEC) >= 0 ? 0 : 5 }
            XCTAssertEqual(w.status, 1, "\(role) opened a file for writing: \(w.stderr)")
            XCTAssertTrue(w.stderr.hasSuffix("made forbidden syscall \(SYS_openat) (openat)\n"), w.stderr)
        }
    }

    /// The main thread that writes --metrics keeps its unconditional openat: a rule for
    /// all calls replaces the common read-only one instead of being dropped as a duplicate.
    func testUnconditionalRuleReplacesConditionalDuplicate() {
        let rules: [SyscallRule] = [.allowIfClear(SYS_openat, arg: 2, mask: UInt32(O_WRONLY)), .allow(SYS_openat),
                                    .allow(SYS_exit_group), .allow(SYS_write)]
        var prog = BPFBuilder.build(rules: rules, deny: UInt32(SECCOMP_RET_TRAP))
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        let pid = fork()
        if pid == 0 {
            let ok = prog.withUnsafeMutableBufferPointer { clinux_seccomp_install(UInt16($0.count), $0.baseAddress) } == 0
            _exit(ok ? (open("/dev/null", O_WRONLY | O_CLOEXEC) >= 0 ? 7 : 5) : 91)
        }
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        XCTAssertEqual((st & 0x7f) == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f), 7)
        close(fds[0]); close(fds[1])
    }

    func testVCPUIoctlsAreCheckedByRequest() {
        // KVM_RUN on a bad descriptor: allowed by the filter, EBADF from the kernel.
        let ok = inChild(.vcpu) {
            clinux_ioctl_none(-1, clinux_KVM_RUN()) == -1 && errno == EBADF ? 0 : 2
        }
        XCTAssertEqual(ok.status, 0, ok.stderr)
        // KVM_CREATE_VM is no vCPU's business.
        let bad = inChild(.vcpu) { clinux_ioctl_none(-1, clinux_KVM_CREATE_VM()) == -1 ? 3 : 4 }
        XCTAssertEqual(bad.status, 1)
        XCTAssertEqual(bad.stderr, "swiftlet: seccomp: thread test-vcpu made forbidden syscall \(SYS_ioctl) (ioctl)\n")
        // A queue thread may not run a vCPU.
        let q = inChild(.queue) { clinux_ioctl_none(-1, clinux_KVM_RUN()) == -1 ? 3 : 4 }
        XCTAssertEqual(q.status, 1, q.stderr)
    }

    /// vhost-vsock: the vCPU (DRIVER_OK, reset), the device's queue thread (a ring error,
    /// stop) and main (teardown) may start and stop it; SET_GUEST_CID runs before any
    /// filter and is no filtered thread's business.
    func testVhostVsockIoctls() {
        for role in [ThreadRole.vcpu, .queue, .main] {
            let ok = inChild(role) {
                clinux_ioctl_ptr(-1, clinux_VHOST_VSOCK_SET_RUNNING(), nil) == -1 && errno == EBADF ? 0 : 2
            }
            XCTAssertEqual(ok.status, 0, "\(role): \(ok.stderr)")
            let bad = inChild(role) { clinux_ioctl_ptr(-1, clinux_VHOST_VSOCK_SET_GUEST_CID(), nil) == -1 ? 3 : 4 }
            XCTAssertEqual(bad.status, 1, "\(role): \(bad.stderr)")
        }
        let io = inChild(.io) { clinux_ioctl_ptr(-1, clinux_VHOST_VSOCK_SET_RUNNING(), nil) == -1 ? 3 : 4 }
        XCTAssertEqual(io.status, 1, io.stderr)
    }

    func testNoExecutableMappingsAndThreadsOnly() {
        let exec = inChild(.vcpu) {
            let p = mmap(nil, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            return p == MAP_FAILED ? 5 : 6
        }
        XCTAssertEqual(exec.status, 1, exec.stderr)
        XCTAssertTrue(exec.stderr.contains("(mmap)"), exec.stderr)
        // clone3 fails with ENOSYS (glibc then uses clone, where the flags are checked).
        let c3 = inChild(.vcpu) { clinux_syscall3(Int(SYS_clone3), 0, 0, 0) == -1 && errno == ENOSYS ? 0 : 9 }
        XCTAssertEqual(c3.status, 0, c3.stderr)
        // A thread can be started from a vCPU thread (queue threads are), a process cannot.
        let thread = inChild(.vcpu) {
            var t = pthread_t()
            guard pthread_create(&t, nil, { _ in nil }, nil) == 0 else { return 10 }
            pthread_join(t, nil)
            return 0
        }
        XCTAssertEqual(thread.status, 0, thread.stderr)
        let fork = inChild(.vcpu) { Glibc.fork() >= 0 ? 11 : 12 }
        XCTAssertEqual(fork.status, 1, fork.stderr)
    }

    /// What the OS layer does on filtered threads: a vCPU thread starts a thread (as it
    /// starts queue threads and disk I/O pools), which installs the I/O filter and then
    /// blocks on a semaphore eventfd (a pool thread waiting for a job); a vCPU thread waits
    /// at a gate. A forbidden call would end the child with status 1.
    func testOSThreadsAndWaitsUnderTheFilters() {
        let pool = inChild(.vcpu) {
            guard let jobs = try? EventFD(nonBlocking: false, semaphore: true), let done = try? EventFD() else { return 20 }
            guard let t = try? spawnThread(name: "test-io", body: {
                guard Seccomp.install(.io, name: "test-io") == 0 else { return }
                if (try? jobs.read()) != nil { try? done.write(1) }
            }) else { return 21 }
            try? jobs.write(1)
            t.join()
            return (try? done.read()) == 1 ? 0 : 22
        }
        XCTAssertEqual(pool.status, 0, pool.stderr)
        let gate = inChild(.vcpu) {
            guard let g = try? Gate() else { return 23 }
            guard let t = try? spawnThread(name: "test-open", body: { g.open() }) else { return 24 }
            g.wait()
            t.join()
            return 0
        }
        XCTAssertEqual(gate.status, 0, gate.stderr)
    }

    func testLogModeAllowsAndOffInstallsNothing() {
        let log = inChild(.irq, mode: .log) { clinux_syscall0(Int(SYS_getppid)) > 0 ? 0 : 13 }
        XCTAssertEqual(log.status, 0, log.stderr)
        XCTAssertEqual(log.stderr, "")
        let off = inChild(.irq, mode: .off) { socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0) >= 0 ? 0 : 14 }
        XCTAssertEqual(off.status, 0, off.stderr)
    }

    func testProgramsCheckTheArchitectureFirstAndFit() {
        for role in ThreadRole.allCases {
            let p = Seccomp.program(for: role, mode: .on)
            XCTAssertEqual(p[0].k, clinux_seccomp_data_arch_offset())
            XCTAssertEqual(p[1].k, clinux_AUDIT_ARCH_X86_64())
            XCTAssertEqual(p[2].k, UInt32(SECCOMP_RET_KILL_PROCESS))
            XCTAssertLessThanOrEqual(p.count, Int(BPF_MAXINSNS))
        }
    }

    /// Threads started by a vCPU thread inherit its filter: the vCPU list must hold the
    /// queue and disk I/O lists.
    func testVCPUAllowsWhatTheThreadsItStartsNeed() {
        let vcpu = Set(Seccomp.rules(for: .vcpu).map(\.nr))
        for role in [ThreadRole.queue, .io] {
            let missing = Set(Seccomp.rules(for: role).map(\.nr)).subtracting(vcpu)
            XCTAssertTrue(missing.isEmpty, "\(role): \(missing)")
        }
    }
}
