// The C shim: kernel UAPI headers from linux-libc-dev, plus inline accessors for
// ioctl request numbers and macros that Swift cannot import. Nothing else lives in C.
#ifndef SWIFTLET_CLINUX_H
#define SWIFTLET_CLINUX_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
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
