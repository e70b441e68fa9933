// KVM module overview.
//
// Types (each owns its file descriptor and closes it in deinit):
//   Hypervisor      /dev/kvm: API version, capabilities, supported CPUID, MSR list, limits.
//   HostCheck       classifies the host (missing / no permission / PVM / usable) without a VM.
//   VirtualMachine  KVM_CREATE_VM: TSS and identity-map addresses, irqchip, PIT2, memory
//                   slots, KVM_IRQ_LINE, irqfd and ioeventfd (on OS.EventFD), vCPUs.
//   VCPU            KVM_CREATE_VCPU + kvm_run mapping; registers, MSRs, CPUID, LAPIC, FPU,
//                   XSAVE/MXCSR, MP state; run() -> VCPUExit; kick().
//   CPUIDSetup, MSRSetup, FPUSetup, LAPICState, LongModeBoot, RealModeBoot: boot values.
//
// Running a vCPU (one pthread per vCPU, started with OS.spawnThread):
//   let t = try spawnThread(name: "vcpu0") {
//       try? vcpu.withKickEnabled {
//           while !stopping { switch try vcpu.run() { case .io(...): ...; case .interrupted: continue; ... } }
//       }
//   }
//   // to stop: set `stopping`, then vcpu.kick(), then t.join().
// `.interrupted` may also be spurious (any signal): always re-check your own stop flag.
// `.io` / `.mmio` data pointers are valid until the next run(); for reads, fill them in
// before calling run() again.
//
// Kick mechanism: SIGRTMIN with a no-op handler (no SA_RESTART), blocked in the vCPU thread
// and unblocked only inside KVM_RUN through KVM_SET_SIGNAL_MASK; kick() sets
// kvm_run.immediate_exit and pthread_kill()s the thread. See VCPU for details.
//
// Behaviour observed on the PVM development host (kvm_pvm loaded), asserted by the tests:
//   - all capabilities in Capability.requiredForLinux are present;
//   - real-mode and long-mode tiny guests run; port I/O, MMIO, HLT, ioeventfd and irqfd work;
//   - exceptions and interrupts cannot be delivered through a legacy IDT: int3 ends in
//     KVM_EXIT_INTERNAL_ERROR (emulation), an IOAPIC interrupt in KVM_EXIT_SHUTDOWN;
//   - SSE instructions in such guests end in KVM_EXIT_INTERNAL_ERROR (emulation);
//   - KVM_GET_FPU returns mxcsr 0 (as on all KVM: kvm_fpu.mxcsr is ignored; use XSAVE).
