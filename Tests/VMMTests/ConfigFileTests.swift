import XCTest
import Glibc
import JSON
@testable import VMM

/// --config-file: Firecracker's documented configuration examples, swiftlet's extension
/// keys, the JSON path in every error, and the merge with the command line.
final class ConfigFileTests: XCTestCase {
    /// Firecracker's tests/framework/vm_config.json, the example its getting-started guide
    /// points to for --config-file (every section it has, the unused ones null).
    static let firecrackerVMConfig = #"""
    {
      "boot-source": {
        "kernel_image_path": "vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": null
      },
      "drives": [
        {
          "drive_id": "rootfs",
          "partuuid": null,
          "is_root_device": true,
          "cache_type": "Unsafe",
          "is_read_only": false,
          "path_on_host": "bionic.rootfs.ext4",
          "io_engine": "Sync",
          "rate_limiter": null,
          "socket": null
        }
      ],
      "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None"
      },
      "cpu-config": null,
      "balloon": null,
      "network-interfaces": [],
      "vsock": null,
      "logger": null,
      "metrics": null,
      "mmds-config": null,
      "entropy": null
    }
    """#

    /// The bodies of getting-started.md's API requests (boot-source, drives/rootfs,
    /// machine-config) and network-setup.md's network-interfaces/net1, as one file.
    static let firecrackerGettingStarted = #"""
    {
      "boot-source": {
        "kernel_image_path": "./hello-vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"
      },
      "drives": [
        {
          "drive_id": "rootfs",
          "path_on_host": "./hello-rootfs.ext4",
          "is_root_device": true,
          "is_read_only": false
        }
      ],
      "network-interfaces": [
        {
          "iface_id": "net1",
          "guest_mac": "06:00:AC:10:00:02",
          "host_dev_name": "tap0"
        }
      ],
      "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024
      }
    }
    """#

    func settings(_ text: String) throws -> Settings { try parseConfig(try JSON.parse(text)) }

    /// `text` is refused with exactly `message` (or a message starting with it), status 64.
    func refuse(_ text: String, _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let s = try settings(text)
            XCTFail("parsed as \(s)", file: file, line: line)
        } catch let e as SwiftletError {
            XCTAssertEqual(e.status, .usage, file: file, line: line)
            XCTAssertTrue(e.message.hasPrefix(message), "\(e.message)", file: file, line: line)
            XCTAssertFalse(e.message.contains("\n"), "one line", file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    func machine(_ s: Settings) throws -> MachineConfig {
        var s = s
        s.kernelCache = s.kernelCache ?? "none"  // no cache directory made by the tests
        return try machineConfig(s, startNanos: 0)
    }

    func testFirecrackerVMConfigExample() throws {
        let s = try settings(Self.firecrackerVMConfig)
        XCTAssertEqual(s.kernel, "vmlinux.bin")
        XCTAssertNil(s.initrd)
        XCTAssertEqual(s.cmdline, "console=ttyS0 reboot=k panic=1 pci=off")
        XCTAssertEqual(s.cpus, 2)
        XCTAssertEqual(s.memoryBytes, 1024 << 20)
        XCTAssertEqual(s.drives, [DriveSpec(id: "rootfs", options: DiskOptions(path: "bionic.rootfs.ext4"), isRoot: true)])
        XCTAssertEqual(s.nets, [])
        let c = try machine(s)
        XCTAssertEqual(c.cmdline, "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw")
        XCTAssertEqual(c.disks, [DiskOptions(path: "bionic.rootfs.ext4")])
        XCTAssertEqual(c.cpus, 2)
        XCTAssertEqual(c.memoryBytes, 1 << 30)
    }

    func testFirecrackerGettingStartedExample() throws {
        let s = try settings(Self.firecrackerGettingStarted)
        XCTAssertEqual(s.kernel, "./hello-vmlinux.bin")
        XCTAssertEqual(s.nets, [NetSpec(id: "net1", options: NetOptions(tap: "tap0", mac: [0x06, 0, 0xAC, 0x10, 0, 0x02]))])
        let c = try machine(s)
        XCTAssertEqual(c.nets.first?.macAddress(index: 0), [0x06, 0, 0xAC, 0x10, 0, 0x02])
        XCTAssertEqual(c.disks.map(\.readOnly), [false])
    }

    func testMinimalAndDefaults() throws {
        let s = try settings(#"{"boot-source": {"kernel_image_path": "k"}}"#)
        let c = try machine(s)
        XCTAssertEqual(c.cmdline, MachineConfig.defaultCmdline, "swiftlet's default command line, not Firecracker's")
        XCTAssertEqual(c.cpus, 1)
        XCTAssertEqual(c.memoryBytes, 512 << 20)
        XCTAssertEqual(c.serial, .stdio)
        XCTAssertTrue(c.disks.isEmpty && c.nets.isEmpty)
        XCTAssertEqual(try settings("{}"), Settings(), "every section is optional in the file")
    }

    func testRootDevice() throws {
        let text = #"""
        {"boot-source": {"kernel_image_path": "k", "boot_args": "console=ttyS0 quiet -- uname -a"},
         "drives": [
           {"drive_id": "data", "path_on_host": "data.img", "is_root_device": false},
           {"drive_id": "rootfs", "path_on_host": "root.ext4", "is_root_device": true, "is_read_only": true}
         ]}
        """#
        let s = try settings(text)
        XCTAssertEqual(s.drives?.map(\.id), ["rootfs", "data"], "the root device goes first: it is /dev/vda")
        let c = try machine(s)
        XCTAssertEqual(c.disks.map(\.path), ["root.ext4", "data.img"])
        XCTAssertEqual(c.cmdline, "console=ttyS0 quiet root=/dev/vda ro -- uname -a", "before the guest's command")
        let p = try settings(#"{"drives": [{"drive_id": "r", "path_on_host": "x", "is_root_device": true, "partuuid": "0eaa91a0-01"}]}"#)
        XCTAssertEqual(rootDeviceParameters(p.drives!), ["root=PARTUUID=0eaa91a0-01", "rw"])
        let none = try settings(#"{"drives": [{"drive_id": "d", "path_on_host": "x", "is_root_device": false}]}"#)
        XCTAssertEqual(rootDeviceParameters(none.drives!), [])
    }

    func testExtensionKeys() throws {
        let text = #"""
        {"boot-source": {"kernel_image_path": "k"},
         "drives": [{"drive_id": "scratch", "path_on_host": "s.img", "is_root_device": false,
                     "num_queues": 4, "direct": true, "serial": "CI-SCRATCH"}],
         "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "swtap0", "queues": 2, "offload": false, "mtu": 9000}],
         "swiftlet": {"serial": "file=/tmp/console.log", "log_level": "info", "timeout": "1.5m", "metrics": "m.json",
                      "isa_debug_exit": true, "virtio_discovery": "cmdline", "virtio_irq": "irqfd",
                      "kernel_decompress": false, "kernel_cache": "none"}}
        """#
        let s = try settings(text)
        XCTAssertEqual(s.drives?.first?.options, DiskOptions(path: "s.img", numQueues: 4, direct: true, serial: "CI-SCRATCH"))
        XCTAssertEqual(s.nets?.first?.options, NetOptions(tap: "swtap0", queues: 2, offload: false, mtu: 9000))
        XCTAssertEqual(s.serial, .file("/tmp/console.log"))
        XCTAssertEqual(s.logLevel, .info)
        XCTAssertEqual(s.timeoutNanos, 90_000_000_000)
        XCTAssertEqual(s.metrics, "m.json")
        XCTAssertEqual(s.isaDebugExit, true)
        XCTAssertEqual(s.virtioDiscovery, .cmdline)
        XCTAssertEqual(s.virtioIrq, .irqfd)
        XCTAssertEqual(s.kernelDecompress, false)
        XCTAssertEqual(s.kernelCache, "none")
        let c = try machine(s)
        XCTAssertEqual(c.timeoutNanos, 90_000_000_000)
        XCTAssertTrue(c.isaDebugExit)
        XCTAssertFalse(c.decompressKernel)
        XCTAssertNil(c.kernelCacheDir)
        // null is "not given".
        let n = try settings(#"{"swiftlet": {"serial": null, "timeout": null, "metrics": null}, "drives": [{"drive_id": "d", "path_on_host": "x", "is_root_device": false, "serial": null, "num_queues": null}]}"#)
        XCTAssertNil(n.serial)
        XCTAssertNil(n.timeoutNanos)
        XCTAssertEqual(n.drives?.first?.options, DiskOptions(path: "x"))
    }

    func testErrorsNameTheJSONPath() {
        let drive = #""drive_id": "d", "path_on_host": "x", "is_root_device": false"#
        let cases: [(String, String)] = [
            (#"{"drives": [{"# + drive + #"}, {"drive_id": "b", "is_root_device": false}]}"#,
             "drives[1].path_on_host: missing: give the disk image file"),
            (#"{"drives": [{"drive_id": "b", "path_on_host": "x"}]}"#, "drives[0].is_root_device: missing:"),
            (#"{"drives": [{"path_on_host": "x", "is_root_device": true}]}"#, "drives[0].drive_id: missing:"),
            (#"{"drives": [{"# + drive + #", "bogus": 1}]}"#, "drives[0].bogus: unknown key: a drive takes drive_id, path_on_host,"),
            (#"{"drives": [{"# + drive + #", "is_read_only": "yes"}]}"#, "drives[0].is_read_only: expected true or false, got a string"),
            (#"{"drives": [{"# + drive + #", "num_queues": 9}]}"#, "drives[0].num_queues: 9 is out of range: give 1 to 8 queues"),
            (#"{"drives": [{"# + drive + #", "serial": "123456789012345678901"}]}"#, "drives[0].serial: '123456789012345678901' is 21 bytes"),
            (#"{"drives": [{"drive_id": "d", "is_root_device": false, "path_on_host": "a\u0000b"}]}"#, "drives[0].path_on_host: contains a NUL character"),
            (#"{"drives": [{"# + drive + #"}, {"# + drive + #"}]}"#, "drives[1].drive_id: 'd' is also drives[0]'s drive_id"),
            (#"{"drives": [{"drive_id": "a", "path_on_host": "x", "is_root_device": true}, {"drive_id": "b", "path_on_host": "y", "is_root_device": true}]}"#,
             "drives[1].is_root_device: drives[0] is the root device already"),
            (#"{"drives": [{"drive_id": "root-fs", "path_on_host": "x", "is_root_device": true}]}"#, "drives[0].drive_id: 'root-fs' is not a valid id"),
            (#"{"drives": [{"# + drive + #", "io_engine": "Async"}]}"#, "drives[0].io_engine: Async (io_uring) is not supported"),
            (#"{"drives": [{"# + drive + #", "cache_type": "None"}]}"#, "drives[0].cache_type: 'None' is not valid: use Unsafe or Writeback"),
            (#"{"drives": [{"# + drive + #", "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}]}"#,
             "drives[0].rate_limiter: rate limiters are not supported by swiftlet: leave it out or set it to null"),
            (#"{"drives": [{"drive_id": "v", "socket": "/tmp/vhost.sock", "is_root_device": false}]}"#, "drives[0].socket: vhost-user drives are not supported"),
            (#"{"drives": {}}"#, "drives: expected an array, got an object"),
            (#"{"drives": [7]}"#, "drives[0]: expected an object, got a number"),
            (#"{"bogus": 1}"#, "bogus: unknown key: the configuration takes boot-source, drives, network-interfaces, machine-config, entropy and vsock, and swiftlet's swiftlet"),
            (#"[]"#, "the configuration: expected an object, got an array"),
            (#"{"boot-source": {}}"#, "boot-source.kernel_image_path: missing: give the guest kernel"),
            (#"{"boot-source": {"kernel_image_path": null}}"#, "boot-source.kernel_image_path: expected a string, got null"),
            (#"{"boot-source": {"kernel_image_path": ""}}"#, "boot-source.kernel_image_path: is empty"),
            (#"{"boot-source": {"kernel_image_path": "k", "boot_args": 1}}"#, "boot-source.boot_args: expected a string, got a number"),
            (#"{"boot-source": {"kernel_image_path": "k", "kernel": "k"}}"#, "boot-source.kernel: unknown key"),
            (#"{"machine-config": {"vcpu_count": 1}}"#, "machine-config.mem_size_mib: missing: give the guest's memory in MiB"),
            (#"{"machine-config": {"mem_size_mib": 512}}"#, "machine-config.vcpu_count: missing:"),
            (#"{"machine-config": {"vcpu_count": "2", "mem_size_mib": 512}}"#, "machine-config.vcpu_count: expected an integer, got a string"),
            (#"{"machine-config": {"vcpu_count": 2.0, "mem_size_mib": 512}}"#, "machine-config.vcpu_count: 2.0 is not an integer"),
            (#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 5.12e2}}"#, "machine-config.mem_size_mib: 5.12e2 is not an integer"),
            (#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 512}}"#, "machine-config.vcpu_count: 0 is out of range: give 1 to 4096 vCPUs"),
            (#"{"machine-config": {"vcpu_count": -1, "mem_size_mib": 512}}"#, "machine-config.vcpu_count: -1 is out of range"),
            (#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 99999999999999999999999999999}}"#,
             "machine-config.mem_size_mib: 99999999999999999999... is out of range: give 64 to 1048576 MiB"),
            (#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}"#, "machine-config.mem_size_mib: 32 is out of range"),
            (#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": true}}"#, "machine-config.smt: true is not supported"),
            (#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "huge_pages": "2M"}}"#, "machine-config.huge_pages: 2M is not supported"),
            (#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "cpu_template": "T2"}}"#, "machine-config.cpu_template: CPU templates are not supported"),
            (#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "ht_enabled": false}}"#, "machine-config.ht_enabled: unknown key"),
            (#"{"network-interfaces": [{"iface_id": "eth0"}]}"#, "network-interfaces[0].host_dev_name: missing:"),
            (#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}]}"#,
             "network-interfaces[0].guest_mac: 01:00:5e:00:00:01 is a multicast address"),
            (#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap/0"}]}"#, "network-interfaces[0].host_dev_name: 'tap/0' is not a valid interface name"),
            (#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t"}, {"iface_id": "b", "host_dev_name": "t"}]}"#,
             "network-interfaces[1].host_dev_name: TAP t is also network-interfaces[0]'s"),
            (#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "mtu": 67}]}"#, "network-interfaces[0].mtu: 67 is out of range: give 68 to 65535 bytes"),
            (#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "rx_rate_limiter": {}}]}"#, "network-interfaces[0].rx_rate_limiter: rate limiters"),
            (#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "allow_mmds_requests": true}]}"#, "network-interfaces[0].allow_mmds_requests: unknown key"),
            (#"{"vsock": {"guest_cid": 3, "uds_path": "./v.sock"}}"#, "vsock.uds_path: swiftlet's vsock is the host kernel's vhost-vsock"),
            (#"{"balloon": {"amount_mib": 0, "deflate_on_oom": false}}"#, "balloon: not supported by swiftlet"),
            (#"{"logger": {"log_path": "fc.log", "level": "Debug"}}"#, "logger: not supported by swiftlet"),
            (#"{"pmem": [{"id": "p", "path_on_host": "x"}]}"#, "pmem: not supported by swiftlet"),
            (#"{"swiftlet": {"serial": "tty"}}"#, "swiftlet.serial: 'tty' is not valid: use none, stdio or file=PATH"),
            (#"{"swiftlet": {"timeout": "0"}}"#, "swiftlet.timeout: '0' is zero"),
            (#"{"swiftlet": {"timeout": 30}}"#, "swiftlet.timeout: expected a string, got a number"),
            (#"{"swiftlet": {"log_level": "loud"}}"#, "swiftlet.log_level: 'loud' is not valid"),
            (#"{"swiftlet": {"memory": "1G"}}"#, "swiftlet.memory: unknown key: swiftlet takes serial, log_level,"),
            (#"{"swiftlet": {"metrics": ""}}"#, "swiftlet.metrics: is empty"),
        ]
        for (text, message) in cases { refuse(text, message) }
    }

    func testNullSectionsAreNotConfigured() throws {
        let s = try settings(#"{"vsock": null, "balloon": null, "pmem": [], "logger": null, "boot-source": null, "drives": null}"#)
        XCTAssertEqual(s, Settings())
    }

    func testFlagsReplaceTheFileValues() throws {
        let file = try settings(Self.firecrackerGettingStarted)
        var flags = Settings()
        flags.cpus = 4
        flags.cmdline = "console=ttyS0 -- true"
        flags.drives = [DriveSpec(id: "disk0", options: DiskOptions(path: "other.img"))]
        let s = flags.over(file)
        XCTAssertEqual(s.cpus, 4)
        XCTAssertEqual(s.memoryBytes, 1024 << 20, "not given on the command line: the file's")
        XCTAssertEqual(s.kernel, "./hello-vmlinux.bin")
        XCTAssertEqual(s.drives?.map(\.id), ["disk0"], "--disk replaces the whole list")
        XCTAssertEqual(s.nets?.map(\.id), ["net1"])
        let c = try machine(s)
        XCTAssertEqual(c.cmdline, "console=ttyS0 -- true", "no root device left: no root=")
        XCTAssertEqual(Settings().over(file), file)
        XCTAssertEqual(file.over(Settings()), file)
    }

    /// --print-config's document read back as a configuration gives the same settings.
    func testEffectiveConfigRoundTrip() throws {
        var s = try settings(Self.firecrackerVMConfig)
        s.nets = [NetSpec(id: "net0", options: NetOptions(tap: "tap0")), NetSpec(id: "net1", options: NetOptions(tap: "tap1", queues: 2, mtu: 9000))]
        s.timeoutNanos = 1_500_000_000
        s.serial = .file("con.log")
        let text = try effectiveConfigText(s)
        let back = try settings(text)
        XCTAssertEqual(back.kernel, s.kernel)
        XCTAssertEqual(back.cmdline, s.cmdline)
        XCTAssertEqual(back.drives, s.drives)
        XCTAssertEqual(back.nets?.map(\.options.tap), ["tap0", "tap1"])
        XCTAssertEqual(back.nets?.map { $0.options.macAddress(index: 0) }, [[0x52, 0x54, 0, 0x12, 0x34, 0x56], [0x52, 0x54, 0, 0x12, 0x34, 0x57]],
                       "the default MACs are written out")
        XCTAssertEqual(back.timeoutNanos, 1_500_000_000)
        XCTAssertEqual(back.serial, .file("con.log"))
        XCTAssertEqual(try effectiveConfigText(back), text, "a fixed point")
        XCTAssertTrue(text.contains("\"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off\""), "boot_args as given, root= added at start-up")
        XCTAssertTrue(text.contains("\"timeout\": \"1.5s\""))
        // Every --virtio-irq mode is written out by name and read back.
        for mode in [VirtioInterruptMode.line, .irqfd, .edge] {
            var m = s
            m.virtioIrq = mode
            let t = try effectiveConfigText(m)
            XCTAssertTrue(t.contains("\"virtio_irq\": \"\(mode.name)\""), "\(mode)")
            XCTAssertEqual(try settings(t).virtioIrq, mode)
        }
        XCTAssertThrowsError(try settings(#"{"swiftlet": {"virtio_irq": "Edge"}}"#))
        XCTAssertThrowsError(try effectiveConfigText(Settings())) { e in
            XCTAssertTrue((e as? SwiftletError)?.message.contains("no kernel given") ?? false)
        }
        var odd = s
        odd.memoryBytes = (512 << 20) + 4096
        XCTAssertThrowsError(try effectiveConfigText(odd))
    }

    func testDurationText() {
        XCTAssertEqual(durationText(90_000_000_000), "90s")
        XCTAssertEqual(durationText(1_500_000_000), "1.5s")
        XCTAssertEqual(durationText(1), "0.000000001s")
        for n: UInt64 in [1, 999, 1_000_000_001, 86_400_000_000_000, maximumDurationNanos] {
            XCTAssertEqual(try parseDuration(durationText(n)), n)
        }
    }

    func testReadConfigFile() throws {
        let dir = FileManagerless.tempDir()
        defer { _ = rmdirRecursive(dir) }
        func status(_ path: String) -> ExitStatus? {
            do { _ = try readConfigFile(path); return nil } catch let e as SwiftletError { return e.status } catch { return nil }
        }
        XCTAssertEqual(status(dir + "/nope.json"), .missingInput)
        XCTAssertEqual(status(dir), .missingInput)
        XCTAssertEqual(status(""), .usage)
        let big = dir + "/big.json"
        let f = fopen(big, "w")!
        let block = [UInt8](repeating: 0x20, count: 65536)
        for _ in 0..<17 { _ = block.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) } }
        fclose(f)
        XCTAssertEqual(status(big), .usage)
        let ok = dir + "/vm.json"
        let g = fopen(ok, "w")!
        fputs(Self.firecrackerVMConfig, g)
        fclose(g)
        XCTAssertEqual(try loadConfigFile(ok).kernel, "vmlinux.bin")
        let bad = dir + "/bad.json"
        let h = fopen(bad, "w")!
        fputs("{\"drives\": [}", h)
        fclose(h)
        XCTAssertThrowsError(try loadConfigFile(bad)) { e in
            let s = e as? SwiftletError
            XCTAssertEqual(s?.status, .usage)
            XCTAssertTrue(s?.message.hasPrefix("--config-file \(bad): invalid JSON at byte 12 (line 1, column 13): ") ?? false, "\(e)")
        }
    }
}

/// Scratch directories without Foundation.
enum FileManagerless {
    static func tempDir() -> String {
        var template = Array("/tmp/swiftlet-config-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }
}

func rmdirRecursive(_ dir: String) -> Int32 {
    guard let d = opendir(dir) else { return -1 }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name == "." || name == ".." { continue }
        unlink(dir + "/" + name)
    }
    closedir(d)
    return rmdir(dir)
}
