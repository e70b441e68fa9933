// swiftlet-datapath-bench (scripts/bench datapath): the capacity of swiftlet's own
// virtio-net queue code, without a VM.
//
// In a private network namespace it makes a two-queue TAP ("dpbench0", IFF_VNET_HDR,
// offloads on, up, 10.0.0.1/24 with the guest at 10.0.0.2) and measures, per case (direction tx or rx, frame size,
// 1 or 2 queue pairs):
//   - swiftlet: a VirtioNet over that TAP, activated with real SplitQueues in a
//     GuestMemory and an interrupt sink, its queue handler groups each served by a
//     thread that runs the loop VirtioHost's queue threads run (kicked() at start, then
//     poll the kick eventfds and completion fds; seccomp's queue filter installed). One
//     synthetic driver thread per pair plays the guest's virtio-net driver over the
//     rings: EVENT_IDX on both sides, kicks through the kick eventfd when avail_event
//     asks for one, sleeps on its interrupt eventfd. 2 pairs are enabled by the control
//     queue's VQ_PAIRS_SET, as a guest does.
//   - raw: one thread per pair doing writev / readv of the same frames with the same
//     iovecs (the same guest buffers) on the same TAP queue descriptors, nothing else.
// tx frames go into the namespace's stack through the TAP (the interface's rx_packets
// counts them). rx frames come from one UDP socket per pair in the namespace, sent to
// the guest's address through the TAP, its flow chosen so the TAP steers it to that
// pair's queue; a source blocks on its socket's send buffer, which holds fewer frames
// than the TAP queue, so the TAP drops nothing (Bench.swift, "rx sources").
//
// Frames: 1514 bytes (a 1500-byte IPv4 packet) with a checksum-offload vnet header, and
// 65214-byte GSO frames (45 segments of 1448): tx TCPV4, rx UDP_L4 (gso_size 1472).
// tx chains: 1514 is one descriptor (header + frame), 65214 an indirect table of 17
// (header + 1024 bytes, 15 pages, the rest). rx: mergeable buffers of 4096 bytes, one
// descriptor each; a raw read gets as many of them as the device gathers for one read.
//
// Output, one line per case (scripts/bench parses them):
//   case dir=tx size=1514 pairs=1 mode=swiftlet frames=N bytes=N wall_ns=N cpu_ns=N user_ns=N io_calls=N
//        polls=N kicks=N interrupts=N drops=N tap_frames=N
// cpu_ns: CPU time of the serving threads (swiftlet's queue threads, or the raw threads),
// user_ns the part of it in user mode (10 ms ticks);
// io_calls: their read- and write-class system calls (/proc/<tid>/io syscr + syscw:
// readv/writev on the TAP, eventfd reads and writes) plus io_uring_enter calls (tx
// batches, IOURing.enterCalls); polls: their poll wake-ups;
// kicks/interrupts: the device's QueueCounters (notifications, interrupts asked for);
// tap_frames: the TAP interface's own packet counter over the same interval.
import Glibc
import CLinux
import GuestMemory
import OS
import Virtio
import Devices
import Seccomp
import Synchronization

let usage = """
usage: swiftlet-datapath-bench [--millis N] [--swiftlet-first] [--seccomp on|off] [--case DIR:SIZE:PAIRS]
  Measures swiftlet's virtio-net queue code against raw readv/writev on a TAP in a
  private network namespace; N ms per case (default 1000). Needs root (or CAP_NET_ADMIN
  and CAP_SYS_ADMIN) for the namespace and the TAP.
  Status: 0 done, 64 usage, 77 no permission for the namespace or the TAP, 1 failed.
"""


// MARK: arguments

var argMillis = 1000
var swiftletFirst = false
var argSeccomp = true
/// --case DIR:SIZE:PAIRS: run only that case (for profiling one path).
var onlyCase: String?
do {
    var args = CommandLine.arguments.dropFirst()
    while let a = args.popFirst() {
        switch a {
        case "--millis":
            guard let v = args.popFirst().flatMap({ Int($0) }), v >= 10, v <= 600_000 else {
                fail(64, "--millis needs a number of milliseconds from 10 to 600000")
            }
            argMillis = v
        case "--swiftlet-first": swiftletFirst = true
        case "--case":
            guard let v = args.popFirst(), v.split(separator: ":").count == 3 else {
                fail(64, "--case needs DIR:SIZE:PAIRS, e.g. rx:1514:1 (sizes 1514 and \(gsoFrameSize))")
            }
            onlyCase = v
        case "--seccomp":
            switch args.popFirst() {
            case "on": argSeccomp = true
            case "off": argSeccomp = false
            default: fail(64, "--seccomp needs on or off")
            }
        case "-h", "--help":
            print(usage)
            exit(0)
        default:
            fail(64, "unknown argument '\(a)': see --help")
        }
    }
}

// MARK: main

pthread_key_create(&pairKey, nil)
do { world = try makeWorld(millis: argMillis, seccompOn: argSeccomp) } catch { fail(1, "cannot set up: \(error)") }
world.flowPorts = calibrateFlows()
if argSeccomp {
    Seccomp.mode = .on
    let e = Seccomp.installViolationHandler()
    if e != 0 { fail(1, "cannot install the seccomp violation handler: \(errnoText(e))") }
}
signal(SIGPIPE, SIG_IGN)
for size in [1514, gsoFrameSize] {
    for pairs in [1, 2] {
        for dir in [Direction.tx, .rx] {
            let c = Case(dir: dir, size: size, pairs: pairs)
            if let only = onlyCase, only != "\(dir):\(size):\(pairs)" { continue }
            for mode in swiftletFirst ? ["swiftlet", "raw"] : ["raw", "swiftlet"] {
                let s: Sample
                do { s = try mode == "raw" ? runRaw(c) : runSwiftlet(c) } catch {
                    fail(1, "\(mode) \(dir) \(size) \(pairs) pair(s): \(error)")
                }
                drainTap()
                print("case dir=\(dir) size=\(size) pairs=\(pairs) mode=\(mode) frames=\(s.frames) bytes=\(s.bytes) wall_ns=\(s.wallNanos) "
                      + "cpu_ns=\(s.cpuNanos) user_ns=\(s.userNanos) io_calls=\(s.ioCalls) polls=\(s.polls) kicks=\(s.kicks) "
                      + "interrupts=\(s.interrupts) drops=\(s.drops) tap_frames=\(s.tapFrames)")
                fflushStdout()
            }
        }
    }
}
