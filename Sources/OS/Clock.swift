// The clock: CLOCK_MONOTONIC in nanoseconds (through the vDSO, normally no system call).
import Glibc

/// Nanoseconds since an arbitrary fixed point (CLOCK_MONOTONIC); never goes back.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
