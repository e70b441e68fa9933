// swift-tools-version:6.0
import PackageDescription

// One job per module; see README "Source layout".
let package = Package(
    name: "swiftlet",
    products: [
        .executable(name: "swiftlet", targets: ["swiftlet"]),
        // scripts/bench datapath: virtio-net queue code against raw TAP I/O, no VM.
        .executable(name: "swiftlet-datapath-bench", targets: ["DatapathBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C shim: linux-libc-dev headers and ioctl numbers Swift cannot import as macros. Nothing else in C.
        .target(name: "CLinux"),
        // OS primitives every thread needs: eventfd, epoll, threads, the poll loop, errno text, the clock.
        .target(name: "OS", dependencies: ["CLinux"]),
        // seccomp-BPF: one allowlist per thread role, installed by each thread on itself.
        .target(name: "Seccomp", dependencies: ["CLinux", "OS"]),
        // Guest physical memory: regions, bounds-checked access, iovecs.
        .target(name: "GuestMemory", dependencies: ["CLinux", "OS"]),
        // /dev/kvm, VM, vCPU, memory slots, irqchip, ioeventfd, irqfd.
        .target(name: "KVM", dependencies: ["CLinux", "OS", "GuestMemory"]),
        // Linux boot protocol, zero page, e820, page tables, GDT, ACPI and MP tables.
        .target(name: "Boot", dependencies: ["OS", "GuestMemory"]),
        // Split virtqueues, the virtio-mmio transport, feature negotiation.
        .target(name: "Virtio", dependencies: ["CLinux", "OS", "GuestMemory"]),
        // vhost-net ioctls: the virtio-net data path in the host kernel, per queue pair.
        .target(name: "Vhost", dependencies: ["CLinux", "OS", "GuestMemory"]),
        // Legacy devices: 16550 UART, CMOS RTC, i8042, boot-time marker, guest exit register.
        .target(name: "Devices", dependencies: ["CLinux", "OS", "GuestMemory", "Virtio", "Vhost", "Seccomp"]),
        // A strict JSON (RFC 8259) parser and writer for --config-file; imports nothing.
        .target(name: "JSON"),
        // Builds a machine from a configuration and runs its lifecycle; reads --config-file.
        .target(name: "VMM", dependencies: ["CLinux", "OS", "KVM", "GuestMemory", "Boot", "Devices", "Virtio", "Vhost", "Seccomp", "JSON"]),
        .executableTarget(name: "swiftlet", dependencies: [
            "OS", "VMM",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // scripts/bench datapath: swiftlet's virtio-net queues over a TAP in a private netns, no VM.
        .executableTarget(name: "DatapathBench", dependencies: ["CLinux", "OS", "GuestMemory", "Virtio", "Devices", "Seccomp"]),
        // libFuzzer target over Virtio (Fuzz/README.md); without -DFUZZING a plain replay/smoke executable.
        .executableTarget(name: "VirtqueueFuzz", dependencies: ["Virtio", "GuestMemory"], path: "Fuzz/VirtqueueFuzz"),
        .testTarget(name: "OSTests", dependencies: ["CLinux", "OS"]),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "OS", "GuestMemory", "CLinux"]),
        .testTarget(name: "BootTests", dependencies: ["Boot", "OS", "GuestMemory"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "GuestMemory", "OS"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "OS", "GuestMemory", "Virtio", "Vhost"]),
        .testTarget(name: "SeccompTests", dependencies: ["Seccomp", "OS", "CLinux"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "OS", "Devices", "Virtio", "Vhost", "GuestMemory", "KVM", "JSON"]),
        .testTarget(name: "JSONTests", dependencies: ["JSON"]),
        .testTarget(name: "VhostTests", dependencies: ["Vhost", "CLinux", "GuestMemory"]),
    ],
    swiftLanguageModes: [.v6]
)
