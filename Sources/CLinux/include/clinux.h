// The C shim: kernel UAPI headers from linux-libc-dev, plus inline accessors for
// ioctl request numbers and macros that Swift cannot import. Nothing else lives in C.
#ifndef SWIFTLET_CLINUX_H
#define SWIFTLET_CLINUX_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <linux/kvm.h>
#include <linux/if_tun.h>
#include <linux/if.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_net.h>

// Swift imports variadic ioctl(2) poorly: fixed-arity wrappers.
static inline int clinux_ioctl_none(int fd, unsigned long req) { return ioctl(fd, req, 0); }
static inline int clinux_ioctl_int(int fd, unsigned long req, unsigned long arg) { return ioctl(fd, req, arg); }
static inline int clinux_ioctl_ptr(int fd, unsigned long req, void *arg) { return ioctl(fd, req, arg); }

// KVM ioctl request numbers (function-like macros in linux/kvm.h).
#define CLINUX_REQ(name, expr) static inline unsigned long clinux_##name(void) { return (unsigned long)(expr); }
CLINUX_REQ(KVM_GET_API_VERSION, KVM_GET_API_VERSION)
CLINUX_REQ(KVM_CREATE_VM, KVM_CREATE_VM)
CLINUX_REQ(KVM_CHECK_EXTENSION, KVM_CHECK_EXTENSION)
CLINUX_REQ(KVM_GET_VCPU_MMAP_SIZE, KVM_GET_VCPU_MMAP_SIZE)
CLINUX_REQ(KVM_GET_SUPPORTED_CPUID, KVM_GET_SUPPORTED_CPUID)
CLINUX_REQ(KVM_GET_MSR_INDEX_LIST, KVM_GET_MSR_INDEX_LIST)
CLINUX_REQ(KVM_GET_MSR_FEATURE_INDEX_LIST, KVM_GET_MSR_FEATURE_INDEX_LIST)
CLINUX_REQ(KVM_CREATE_VCPU, KVM_CREATE_VCPU)
CLINUX_REQ(KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION)
CLINUX_REQ(KVM_SET_TSS_ADDR, KVM_SET_TSS_ADDR)
CLINUX_REQ(KVM_SET_IDENTITY_MAP_ADDR, KVM_SET_IDENTITY_MAP_ADDR)
CLINUX_REQ(KVM_CREATE_IRQCHIP, KVM_CREATE_IRQCHIP)
CLINUX_REQ(KVM_CREATE_PIT2, KVM_CREATE_PIT2)
CLINUX_REQ(KVM_IRQ_LINE, KVM_IRQ_LINE)
CLINUX_REQ(KVM_GET_IRQCHIP, KVM_GET_IRQCHIP)
CLINUX_REQ(KVM_IRQFD, KVM_IRQFD)
CLINUX_REQ(KVM_IOEVENTFD, KVM_IOEVENTFD)
CLINUX_REQ(KVM_REGISTER_COALESCED_MMIO, KVM_REGISTER_COALESCED_MMIO)
CLINUX_REQ(KVM_RUN, KVM_RUN)
CLINUX_REQ(KVM_GET_REGS, KVM_GET_REGS)
CLINUX_REQ(KVM_SET_REGS, KVM_SET_REGS)
CLINUX_REQ(KVM_GET_SREGS, KVM_GET_SREGS)
CLINUX_REQ(KVM_SET_SREGS, KVM_SET_SREGS)
CLINUX_REQ(KVM_SET_CPUID2, KVM_SET_CPUID2)
CLINUX_REQ(KVM_GET_MSRS, KVM_GET_MSRS)
CLINUX_REQ(KVM_SET_MSRS, KVM_SET_MSRS)
CLINUX_REQ(KVM_GET_FPU, KVM_GET_FPU)
CLINUX_REQ(KVM_SET_FPU, KVM_SET_FPU)
CLINUX_REQ(KVM_GET_LAPIC, KVM_GET_LAPIC)
CLINUX_REQ(KVM_SET_LAPIC, KVM_SET_LAPIC)
CLINUX_REQ(KVM_SET_SIGNAL_MASK, KVM_SET_SIGNAL_MASK)
CLINUX_REQ(KVM_GET_VCPU_EVENTS, KVM_GET_VCPU_EVENTS)
CLINUX_REQ(KVM_SET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS)
CLINUX_REQ(KVM_SET_GSI_ROUTING, KVM_SET_GSI_ROUTING)
CLINUX_REQ(KVM_ENABLE_CAP, KVM_ENABLE_CAP)
CLINUX_REQ(KVM_GET_TSC_KHZ, KVM_GET_TSC_KHZ)
CLINUX_REQ(KVM_SET_TSC_KHZ, KVM_SET_TSC_KHZ)
CLINUX_REQ(KVM_SET_CLOCK, KVM_SET_CLOCK)
// TUN/TAP.
CLINUX_REQ(TUNSETIFF, TUNSETIFF)
CLINUX_REQ(TUNGETIFF, TUNGETIFF)
CLINUX_REQ(TUNSETOFFLOAD, TUNSETOFFLOAD)
CLINUX_REQ(TUNSETVNETHDRSZ, TUNSETVNETHDRSZ)
CLINUX_REQ(TUNSETQUEUE, TUNSETQUEUE)
CLINUX_REQ(TUNGETFEATURES, TUNGETFEATURES)
CLINUX_REQ(TUNSETPERSIST, TUNSETPERSIST)
#undef CLINUX_REQ

#endif

// ---- Added for Sources/KVM (append-only section, own include guard) ----
#ifndef SWIFTLET_CLINUX_KVM_H
#define SWIFTLET_CLINUX_KVM_H
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <signal.h>
#include <pthread.h>
#include <sys/eventfd.h>
#define CLINUX_REQ2(name, expr) static inline unsigned long clinux_##name(void) { return (unsigned long)(expr); }
CLINUX_REQ2(KVM_GET_MP_STATE, KVM_GET_MP_STATE)
CLINUX_REQ2(KVM_SET_MP_STATE, KVM_SET_MP_STATE)
CLINUX_REQ2(KVM_GET_CPUID2, KVM_GET_CPUID2)
CLINUX_REQ2(KVM_GET_XCRS, KVM_GET_XCRS)
CLINUX_REQ2(KVM_SET_XCRS, KVM_SET_XCRS)
CLINUX_REQ2(KVM_GET_XSAVE, KVM_GET_XSAVE)
CLINUX_REQ2(KVM_SET_XSAVE, KVM_SET_XSAVE)
CLINUX_REQ2(KVM_GET_XSAVE2, KVM_GET_XSAVE2)
#undef CLINUX_REQ2

// struct kvm_run field offsets (the exit union is anonymous; Swift decodes the
// mmap'd page by offset, checked against the mapping size).
#define CLINUX_OFF(name, expr) static inline unsigned long clinux_kvm_run_off_##name(void) { return (unsigned long)offsetof(struct kvm_run, expr); }
CLINUX_OFF(immediate_exit, immediate_exit)
CLINUX_OFF(exit_reason, exit_reason)
CLINUX_OFF(io_direction, io.direction)
CLINUX_OFF(io_size, io.size)
CLINUX_OFF(io_port, io.port)
CLINUX_OFF(io_count, io.count)
CLINUX_OFF(io_data_offset, io.data_offset)
CLINUX_OFF(mmio_phys_addr, mmio.phys_addr)
CLINUX_OFF(mmio_data, mmio.data)
CLINUX_OFF(mmio_len, mmio.len)
CLINUX_OFF(mmio_is_write, mmio.is_write)
CLINUX_OFF(fail_entry_reason, fail_entry.hardware_entry_failure_reason)
CLINUX_OFF(internal_suberror, internal.suberror)
CLINUX_OFF(system_event_type, system_event.type)
#undef CLINUX_OFF
static inline unsigned long clinux_kvm_run_size(void) { return (unsigned long)sizeof(struct kvm_run); }

// Byte store/load visible to another thread (kvm_run.immediate_exit is set from a
// thread other than the one in KVM_RUN).
static inline void clinux_atomic_store_u8(void *p, uint8_t v) { __atomic_store_n((uint8_t *)p, v, __ATOMIC_SEQ_CST); }
static inline uint8_t clinux_atomic_load_u8(const void *p) { return __atomic_load_n((const uint8_t *)p, __ATOMIC_SEQ_CST); }
// The coalesced I/O ring's indices, shared with KVM (it advances `last`, swiftlet `first`).
static inline uint32_t clinux_atomic_load_acquire_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline void clinux_atomic_store_release_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }

// KVM ioeventfd flags are defined through an enum of bit numbers; export them plainly.
static inline uint32_t clinux_KVM_IOEVENTFD_FLAG_DATAMATCH(void) { return KVM_IOEVENTFD_FLAG_DATAMATCH; }
static inline uint32_t clinux_KVM_IOEVENTFD_FLAG_PIO(void) { return KVM_IOEVENTFD_FLAG_PIO; }
static inline uint32_t clinux_KVM_IOEVENTFD_FLAG_DEASSIGN(void) { return KVM_IOEVENTFD_FLAG_DEASSIGN; }

// sigset helpers (sigset_t and its macros are awkward from Swift).
static inline int clinux_sigset_with_only(sigset_t *s, int sig) { sigemptyset(s); return sigaddset(s, sig); }
static inline int clinux_sigdelset(sigset_t *s, int sig) { return sigdelset(s, sig); }
static inline int clinux_sigismember(const sigset_t *s, int sig) { return sigismember(s, sig); }
// Installs a handler that does nothing, without SA_RESTART, so the signal only
// interrupts blocking system calls (KVM_RUN) in the thread it is sent to.
static inline void clinux_noop_signal_handler(int sig) { (void)sig; }
static inline int clinux_install_noop_handler(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = clinux_noop_signal_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(sig, &sa, NULL);
}
// Removes one pending instance of `sig` from the calling thread without blocking.
static inline int clinux_consume_pending_signal(int sig) {
    sigset_t s; sigemptyset(&s); sigaddset(&s, sig);
    struct timespec ts = {0, 0};
    return sigtimedwait(&s, NULL, &ts);
}
static inline int clinux_sigrtmin(void) { return SIGRTMIN; }
#include <unistd.h>
#include <sys/syscall.h>

/* fallocate(2) as its system call: glibc declares fallocate() only under _GNU_SOURCE,
   and the fully static release binary has no dynamic symbol table to dlsym it from.
   Returns 0, or -1 with errno set. */
static inline int clinux_fallocate(int fd, int mode, long offset, long len) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}
// Names the calling thread (pthread_setname_np needs _GNU_SOURCE; prctl is variadic).
#include <sys/prctl.h>
static inline int clinux_set_thread_name(const char *name) { return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL); }
#endif // SWIFTLET_CLINUX_KVM_H

// ---- seccomp-BPF (Sources/Seccomp; append-only section, own include guard) ----
#ifndef SWIFTLET_CLINUX_SECCOMP_H
#define SWIFTLET_CLINUX_SECCOMP_H
#include <errno.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <linux/filter.h>
#include <linux/audit.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <signal.h>
#include <string.h>
#include <termios.h>

static inline uint32_t clinux_AUDIT_ARCH_X86_64(void) { return AUDIT_ARCH_X86_64; }
static inline uint32_t clinux_seccomp_data_nr_offset(void) { return (uint32_t)offsetof(struct seccomp_data, nr); }
static inline uint32_t clinux_seccomp_data_arch_offset(void) { return (uint32_t)offsetof(struct seccomp_data, arch); }
static inline uint32_t clinux_seccomp_data_arg_offset(int i) { return (uint32_t)(offsetof(struct seccomp_data, args) + 8 * i); }

// Sets no_new_privs and installs `len` instructions as a filter on the calling thread only
// (no SECCOMP_FILTER_FLAG_TSYNC). Returns 0, or -1 with errno set.
static inline int clinux_seccomp_install(unsigned short len, struct sock_filter *filter) {
    struct sock_fprog prog = { len, filter };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0) return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0UL, &prog);
}

// The calling thread's name as the SIGSYS handler prints it, set when its filter is installed.
// (A function-local thread-local: Swift emits the static inline functions it uses, not
// file-scope variables of a header.)
static inline char *clinux_seccomp_thread_label(void) { static __thread char label[16]; return label; }
static inline void clinux_seccomp_set_thread_label(const char *name) {
    char *label = clinux_seccomp_thread_label();
    strncpy(label, name, 15);
    label[15] = 0;
}

// Names of the system calls the filters allow plus common forbidden ones; NULL otherwise.
static inline const char *clinux_syscall_name(long nr) {
    switch (nr) {
#define CLINUX_SYSNAME(n) case SYS_##n: return #n;
    CLINUX_SYSNAME(read) CLINUX_SYSNAME(write) CLINUX_SYSNAME(open) CLINUX_SYSNAME(openat)
    CLINUX_SYSNAME(close) CLINUX_SYSNAME(stat) CLINUX_SYSNAME(fstat) CLINUX_SYSNAME(lstat)
    CLINUX_SYSNAME(newfstatat) CLINUX_SYSNAME(statx) CLINUX_SYSNAME(poll) CLINUX_SYSNAME(ppoll)
    CLINUX_SYSNAME(lseek) CLINUX_SYSNAME(mmap) CLINUX_SYSNAME(mprotect) CLINUX_SYSNAME(munmap)
    CLINUX_SYSNAME(mremap) CLINUX_SYSNAME(madvise) CLINUX_SYSNAME(brk) CLINUX_SYSNAME(rt_sigaction)
    CLINUX_SYSNAME(rt_sigprocmask) CLINUX_SYSNAME(rt_sigreturn) CLINUX_SYSNAME(rt_sigtimedwait)
    CLINUX_SYSNAME(ioctl) CLINUX_SYSNAME(pread64) CLINUX_SYSNAME(pwrite64) CLINUX_SYSNAME(readv)
    CLINUX_SYSNAME(writev) CLINUX_SYSNAME(preadv) CLINUX_SYSNAME(pwritev) CLINUX_SYSNAME(preadv2)
    CLINUX_SYSNAME(pwritev2) CLINUX_SYSNAME(access) CLINUX_SYSNAME(pipe) CLINUX_SYSNAME(pipe2)
    CLINUX_SYSNAME(select) CLINUX_SYSNAME(pselect6) CLINUX_SYSNAME(sched_yield) CLINUX_SYSNAME(dup)
    CLINUX_SYSNAME(dup2) CLINUX_SYSNAME(dup3) CLINUX_SYSNAME(nanosleep) CLINUX_SYSNAME(clock_nanosleep)
    CLINUX_SYSNAME(getpid) CLINUX_SYSNAME(getppid) CLINUX_SYSNAME(gettid) CLINUX_SYSNAME(socket)
    CLINUX_SYSNAME(connect) CLINUX_SYSNAME(accept) CLINUX_SYSNAME(accept4) CLINUX_SYSNAME(sendto)
    CLINUX_SYSNAME(recvfrom) CLINUX_SYSNAME(sendmsg) CLINUX_SYSNAME(recvmsg) CLINUX_SYSNAME(bind)
    CLINUX_SYSNAME(listen) CLINUX_SYSNAME(socketpair) CLINUX_SYSNAME(clone) CLINUX_SYSNAME(clone3)
    CLINUX_SYSNAME(fork) CLINUX_SYSNAME(vfork) CLINUX_SYSNAME(execve) CLINUX_SYSNAME(execveat)
    CLINUX_SYSNAME(exit) CLINUX_SYSNAME(exit_group) CLINUX_SYSNAME(wait4) CLINUX_SYSNAME(kill)
    CLINUX_SYSNAME(tkill) CLINUX_SYSNAME(tgkill) CLINUX_SYSNAME(uname) CLINUX_SYSNAME(fcntl)
    CLINUX_SYSNAME(flock) CLINUX_SYSNAME(fsync) CLINUX_SYSNAME(fdatasync) CLINUX_SYSNAME(ftruncate)
    CLINUX_SYSNAME(getcwd) CLINUX_SYSNAME(chdir) CLINUX_SYSNAME(rename) CLINUX_SYSNAME(renameat)
    CLINUX_SYSNAME(renameat2) CLINUX_SYSNAME(mkdir) CLINUX_SYSNAME(mkdirat) CLINUX_SYSNAME(unlink)
    CLINUX_SYSNAME(unlinkat) CLINUX_SYSNAME(chmod) CLINUX_SYSNAME(fchmod) CLINUX_SYSNAME(chown)
    CLINUX_SYSNAME(getuid) CLINUX_SYSNAME(geteuid) CLINUX_SYSNAME(setuid) CLINUX_SYSNAME(ptrace)
    CLINUX_SYSNAME(sigaltstack) CLINUX_SYSNAME(prctl) CLINUX_SYSNAME(arch_prctl) CLINUX_SYSNAME(mount)
    CLINUX_SYSNAME(futex) CLINUX_SYSNAME(set_robust_list) CLINUX_SYSNAME(get_robust_list)
    CLINUX_SYSNAME(set_tid_address) CLINUX_SYSNAME(rseq) CLINUX_SYSNAME(clock_gettime)
    CLINUX_SYSNAME(gettimeofday) CLINUX_SYSNAME(getrandom) CLINUX_SYSNAME(eventfd2)
    CLINUX_SYSNAME(signalfd4) CLINUX_SYSNAME(timerfd_create) CLINUX_SYSNAME(epoll_create1)
    CLINUX_SYSNAME(epoll_ctl) CLINUX_SYSNAME(epoll_wait) CLINUX_SYSNAME(epoll_pwait)
    CLINUX_SYSNAME(fallocate) CLINUX_SYSNAME(seccomp) CLINUX_SYSNAME(bpf) CLINUX_SYSNAME(memfd_create)
    CLINUX_SYSNAME(io_uring_setup) CLINUX_SYSNAME(io_uring_enter) CLINUX_SYSNAME(io_uring_register)
    CLINUX_SYSNAME(restart_syscall)
    CLINUX_SYSNAME(sched_getaffinity)
    CLINUX_SYSNAME(sched_setaffinity) CLINUX_SYSNAME(getrlimit) CLINUX_SYSNAME(prlimit64)
    CLINUX_SYSNAME(sysinfo) CLINUX_SYSNAME(membarrier) CLINUX_SYSNAME(process_vm_readv)
    CLINUX_SYSNAME(process_vm_writev) CLINUX_SYSNAME(pidfd_open) CLINUX_SYSNAME(getdents64) CLINUX_SYSNAME(mincore)
#undef CLINUX_SYSNAME
    default: return 0;
    }
}

// SIGSYS from a SECCOMP_RET_TRAP: one preformatted line on stderr, then _exit(1).
// Async-signal-safe: stack buffer, write(2), _exit(2) only.
static inline void clinux_seccomp_sigsys_handler(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)ctx;
    char buf[192];
    size_t n = 0;
#define CLINUX_PUT(s) do { const char *p_ = (s); while (*p_ && n < sizeof buf - 2) buf[n++] = *p_++; } while (0)
    CLINUX_PUT("swiftlet: seccomp: thread ");
    const char *label = clinux_seccomp_thread_label();
    CLINUX_PUT(label[0] ? label : "?");
    CLINUX_PUT(" made forbidden syscall ");
    int nr = info ? info->si_syscall : -1;
    char digits[12];
    int d = 0;
    unsigned int u = nr < 0 ? (unsigned int)(-(long)nr) : (unsigned int)nr;
    do { digits[d++] = (char)('0' + u % 10); u /= 10; } while (u && d < 11);
    if (nr < 0 && n < sizeof buf - 2) buf[n++] = '-';
    while (d > 0 && n < sizeof buf - 2) buf[n++] = digits[--d];
    const char *name = clinux_syscall_name(nr);
    CLINUX_PUT(" (");
    CLINUX_PUT(name ? name : "unknown");
    CLINUX_PUT(")");
#undef CLINUX_PUT
    buf[n++] = '\n';
    ssize_t w = write(2, buf, n);
    (void)w;
    _exit(1);
}
static inline int clinux_install_sigsys_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = clinux_seccomp_sigsys_handler;
    sigfillset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO;
    return sigaction(SIGSYS, &sa, NULL);
}
// Raw system calls for tests and the debug-only self-check (no libc wrapper in between).
static inline long clinux_syscall0(long nr) { return syscall(nr); }
static inline long clinux_syscall3(long nr, long a, long b, long c) { return syscall(nr, a, b, c); }
// Request numbers of the terminal and TUN ioctls the filters allow.
static inline unsigned long clinux_TCGETS(void) { return TCGETS; }
static inline unsigned long clinux_TCSETS(void) { return TCSETS; }
static inline unsigned long clinux_TCSETSW(void) { return TCSETSW; }
static inline unsigned long clinux_TCSETSF(void) { return TCSETSF; }
static inline unsigned long clinux_CLONE_THREAD(void) { return CLONE_THREAD; }
#endif // SWIFTLET_CLINUX_SECCOMP_H

// ---- Added for Sources/Vhost (own include guard) ----
#ifndef SWIFTLET_CLINUX_VHOST_H
#define SWIFTLET_CLINUX_VHOST_H
#include <linux/vhost.h>
#define CLINUX_REQ3(name, expr) static inline unsigned long clinux_##name(void) { return (unsigned long)(expr); }
CLINUX_REQ3(VHOST_GET_FEATURES, VHOST_GET_FEATURES)
CLINUX_REQ3(VHOST_SET_FEATURES, VHOST_SET_FEATURES)
CLINUX_REQ3(VHOST_SET_OWNER, VHOST_SET_OWNER)
CLINUX_REQ3(VHOST_SET_MEM_TABLE, VHOST_SET_MEM_TABLE)
CLINUX_REQ3(VHOST_SET_VRING_NUM, VHOST_SET_VRING_NUM)
CLINUX_REQ3(VHOST_SET_VRING_ADDR, VHOST_SET_VRING_ADDR)
CLINUX_REQ3(VHOST_SET_VRING_BASE, VHOST_SET_VRING_BASE)
CLINUX_REQ3(VHOST_GET_VRING_BASE, VHOST_GET_VRING_BASE)
CLINUX_REQ3(VHOST_SET_VRING_KICK, VHOST_SET_VRING_KICK)
CLINUX_REQ3(VHOST_SET_VRING_CALL, VHOST_SET_VRING_CALL)
CLINUX_REQ3(VHOST_SET_VRING_ERR, VHOST_SET_VRING_ERR)
CLINUX_REQ3(VHOST_NET_SET_BACKEND, VHOST_NET_SET_BACKEND)
CLINUX_REQ3(VHOST_VSOCK_SET_GUEST_CID, VHOST_VSOCK_SET_GUEST_CID)
CLINUX_REQ3(VHOST_VSOCK_SET_RUNNING, VHOST_VSOCK_SET_RUNNING)
#undef CLINUX_REQ3
static inline unsigned long clinux_vhost_memory_size(void) { return sizeof(struct vhost_memory); }
static inline unsigned long clinux_vhost_memory_region_size(void) { return sizeof(struct vhost_memory_region); }
static inline int clinux_VHOST_F_LOG_ALL(void) { return VHOST_F_LOG_ALL; }
#endif // SWIFTLET_CLINUX_VHOST_H

// ---- ThreadSanitizer annotations (OS's Locked) ----
#ifndef SWIFTLET_CLINUX_TSAN_H
#define SWIFTLET_CLINUX_TSAN_H
// The TSan runtime's entry points for locks it cannot see: weak, so they are null (and
// these calls do nothing) unless a -sanitize=thread build links that runtime in.
extern void __tsan_acquire(void *addr) __attribute__((weak));
extern void __tsan_release(void *addr) __attribute__((weak));
static inline void clinux_tsan_acquire(void *addr) { if (__tsan_acquire) __tsan_acquire(addr); }
static inline void clinux_tsan_release(void *addr) { if (__tsan_release) __tsan_release(addr); }
#endif // SWIFTLET_CLINUX_TSAN_H

// ---- io_uring (OS's IOURing: raw system calls, no liburing) ----
#ifndef SWIFTLET_CLINUX_IO_URING_H
#define SWIFTLET_CLINUX_IO_URING_H
#include <linux/io_uring.h>
#include <sys/syscall.h>
#include <unistd.h>
static inline int clinux_io_uring_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(SYS_io_uring_setup, entries, p);
}
static inline int clinux_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(SYS_io_uring_enter, fd, to_submit, min_complete, flags, (void *)0, 0UL);
}
static inline int clinux_io_uring_register(int fd, unsigned opcode, void *arg, unsigned nr_args) {
    return (int)syscall(SYS_io_uring_register, fd, opcode, arg, nr_args);
}
static inline unsigned long clinux_IORING_OFF_SQ_RING(void) { return IORING_OFF_SQ_RING; }
static inline unsigned long clinux_IORING_OFF_CQ_RING(void) { return IORING_OFF_CQ_RING; }
static inline unsigned long clinux_IORING_OFF_SQES(void) { return IORING_OFF_SQES; }
static inline unsigned clinux_IORING_FEAT_SINGLE_MMAP(void) { return IORING_FEAT_SINGLE_MMAP; }
static inline unsigned clinux_IORING_SETUP_R_DISABLED(void) { return IORING_SETUP_R_DISABLED; }
static inline unsigned clinux_IORING_ENTER_GETEVENTS(void) { return IORING_ENTER_GETEVENTS; }
static inline unsigned clinux_IORING_REGISTER_RESTRICTIONS(void) { return IORING_REGISTER_RESTRICTIONS; }
static inline unsigned clinux_IORING_REGISTER_ENABLE_RINGS(void) { return IORING_REGISTER_ENABLE_RINGS; }
static inline uint16_t clinux_IORING_RESTRICTION_SQE_OP(void) { return IORING_RESTRICTION_SQE_OP; }
static inline uint8_t clinux_IORING_OP_WRITEV(void) { return IORING_OP_WRITEV; }
static inline uint8_t clinux_IORING_OP_READV(void) { return IORING_OP_READV; }
static inline int clinux_RWF_NOWAIT(void) { return RWF_NOWAIT; }
static inline unsigned long clinux_io_uring_sqe_size(void) { return sizeof(struct io_uring_sqe); }
static inline unsigned long clinux_io_uring_cqe_size(void) { return sizeof(struct io_uring_cqe); }
static inline unsigned long clinux_io_uring_restriction_size(void) { return sizeof(struct io_uring_restriction); }
#endif // SWIFTLET_CLINUX_IO_URING_H
