# scripts/lib/vmm.sh: how each VMM boots a guest (POSIX sh, busybox-friendly).
# Sourced by scripts/smoke-inner and scripts/guest-run; runs where KVM works
# (inside the testbed's L1, or directly).

# vmm_supports VMM disk|net: can this VMM attach a virtio-blk disk / virtio-net TAP?
vmm_supports() {
    case "$1:$2" in
        qemu:*) return 0;;
        swiftlet:disk) return 0;;
        swiftlet:net) return 0;;
    esac
    return 1
}

# vmm_bin VMM: path of the VMM binary, empty if not available
vmm_bin() {
    case "$1" in
        qemu) command -v qemu-system-x86_64;;
        swiftlet)
            if [ -n "${TESTBED_SWIFTLET:-}" ] && [ -x "$TESTBED_SWIFTLET" ]; then echo "$TESTBED_SWIFTLET"
            else command -v swiftlet; fi;;
    esac
}

# run_vmm VMM KERNEL INITRD CMDLINE [DISK] [TAP]
# The ONE place with each VMM's command line: 1 vCPU, 512 MiB, console on
# stdio, disk as virtio-mmio virtio-blk, TAP as virtio-mmio virtio-net.
run_vmm() {
    _vmm=$1 _kernel=$2 _initrd=$3 _cmdline=$4 _disk=${5:-} _tap=${6:-}
    case "$_vmm" in
    qemu)
        set -- qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 512 -smp "${VMM_CPUS:-1}" \
            -nodefaults -no-user-config -display none -serial stdio -no-reboot \
            -kernel "$_kernel" -initrd "$_initrd" -append "$_cmdline"
        if [ -n "$_disk" ]; then
            set -- "$@" -drive "id=d0,file=$_disk,format=raw,if=none" -device virtio-blk-device,drive=d0
        fi
        if [ -n "$_tap" ]; then
            set -- "$@" -netdev "tap,id=n0,ifname=$_tap,script=no,downscript=no" -device virtio-net-device,netdev=n0
        fi
        ;;
    swiftlet)
        set -- "$(vmm_bin swiftlet)" --kernel "$_kernel" --initrd "$_initrd" --cmdline "$_cmdline" \
            --cpus "${VMM_CPUS:-1}" --memory 512M ${SWIFTLET_ARGS:-}
        if [ -n "$_disk" ]; then
            set -- "$@" --disk "path=$_disk"
        fi
        if [ -n "$_tap" ]; then
            set -- "$@" --net "tap=$_tap,vhost=off"  # QEMU's line above is vhost=off too
        fi
        ;;
    *)
        echo "run_vmm: unknown VMM $_vmm" >&2
        return 64;;
    esac
    "$@"
}

# make_tap NAME ADDR/PREFIX: TAP device with an address (only ever inside L1
# or a private network namespace, never in the machine's own namespace)
make_tap() {
    _ip=${TESTBED_IP:-/usr/sbin/ip}
    "$_ip" tuntap add dev "$1" mode tap && "$_ip" addr add "$2" dev "$1" && "$_ip" link set "$1" up
}

# in_private_netns "$0" ARGS...: in direct mode, re-exec the script in a new
# network namespace so that TAP devices never appear in the machine's own one
in_private_netns() {
    if [ "${TESTBED_MODE:-}" = direct ] && [ -z "${SWIFTLET_NETNS:-}" ]; then
        _script=$1; shift
        SWIFTLET_NETNS=1 exec unshare --net sh "$_script" "$@"
    fi
}

# vmm_with_marks MARK TAG VMM RUN LIMIT CMD...: runs the VMM (CMD...), output in $log.
# Each time the guest prints a "MARK NAME-start" or "MARK NAME-end" line (and then
# idles 1 s), KVM's counters (kvm_counters) are read, and for swiftlet its --metrics
# are dumped (SIGUSR1) for its own KVM_RUN count, so a job's work is end - start.
# Prints per job:
#   TAG-kvm VMM RUN NAME exits=N to_vmm=N ...   (every VMM, when the counters exist;
#       for swiftlet also isr=N ack=N: its InterruptStatus reads and InterruptACK writes
#       that exited, summed over the virtio devices whose name starts with $MARKS_DEVICE,
#       all when unset)
#   TAG VMM RUN NAME EXITS                      (swiftlet's own count of KVM_RUN returns)
# Status in $rc (after LIMIT s swiftlet is stopped by SIGTERM, 143, and its stop line names
# where its vCPUs were; any other VMM is killed, 137). Starts the flight recorder
# (kvm_trace_start). Uses $scratch.
vmm_with_marks() {
    _mark=$1 _tag=$2 _vmm=$3 _run=$4 _limit=$5
    shift 5
    _m="$scratch/bench-metrics.json" _marks="$scratch/bench-marks"
    rm -f "$_m" "$_marks"
    : > "$log"  # now, not in the background job: an old log's marks must not count
    kvm_counters_mount
    kvm_trace_start
    _own=; case "$_vmm" in swiftlet*) _own=1;; esac
    if [ -n "$_own" ]; then "$@" --metrics "$_m" < /dev/null > "$log" 2>&1 &
    else "$@" < /dev/null > "$log" 2>&1 &
    fi
    _pid=$! _seen=0 _ticks=0 _grace=0
    [ -n "$_own" ] && _grace=100
    while kill -0 $_pid 2>/dev/null; do
        _n=$(grep -c "^$_mark " "$log")
        while [ "$_seen" -lt "$_n" ]; do
            _seen=$((_seen + 1))
            _name=$(tr -d '\r' < "$log" | grep "^$_mark " | sed -n "${_seen}p" | cut -d' ' -f2)
            _k=$(kvm_counters)
            _e=
            if [ -n "$_own" ]; then
                rm -f "$_m"; kill -USR1 $_pid 2>/dev/null
                _w=0; while [ ! -s "$_m" ] && [ $_w -lt 20 ]; do sleep 0.05; _w=$((_w + 1)); done
                _e=$(sed -n 's/.*"kvm_run": \([0-9]*\).*/\1/p' "$_m" 2>/dev/null)
                _k="$_k $(tr '{' '\n' < "$_m" 2>/dev/null | awk -v d="${MARKS_DEVICE:-}" '
                    /"name": / { mine = (d == "" || index($0, "\"name\": \"" d) > 0); if (!mine) next
                        if (match($0, /"interrupt_status_reads": [0-9]+/)) r += substr($0, RSTART + 26, RLENGTH - 26)
                        if (match($0, /"interrupt_acks": [0-9]+/)) a += substr($0, RSTART + 18, RLENGTH - 18) }
                    /^"queue": [0-9]+, / { if (!mine) next; q = substr($0, 10) + 0; if (q > top) top = q
                        if (match($0, /"interrupts": [0-9]+/)) irq[q] += substr($0, RSTART + 14, RLENGTH - 14) }
                    END { printf "isr=%d ack=%d", r, a; for (q = 0; q <= top; q++) if (q in irq) printf " irq_q%d=%d", q, irq[q] }')"
            fi
            echo "$_name ${_e:--} $_k" >> "$_marks"
        done
        sleep 0.1; _ticks=$((_ticks + 1))
        # at the limit swiftlet gets SIGTERM (its stop line names where its vCPUs were),
        # SIGKILL 10 s later; other VMMs SIGKILL at once
        if [ $_ticks = $((_limit * 10)) ] && [ -n "$_own" ]; then kill -TERM $_pid 2>/dev/null
        elif [ $_ticks -ge $((_limit * 10 + _grace)) ]; then kill -9 $_pid 2>/dev/null; fi
    done
    wait $_pid; rc=$?
    [ -f "$_marks" ] && awk -v run="$_run" -v tag="$_tag" -v vmm="$_vmm" '
        { split($1, p, "-"); j = p[1]
          if (p[2] == "start") { s[j] = $2; n[j] = NF; for (i = 3; i <= NF; i++) k[j, i] = $i; next }
          if (!(j in s)) next
          if ($2 != "-" && s[j] != "-" && $2 != "") print tag " " vmm " " run " " j " " ($2 - s[j])
          if (NF > 2 && NF == n[j]) {
              line = tag "-kvm " vmm " " run " " j
              for (i = 3; i <= NF; i++) { split(k[j, i], a, "="); split($i, b, "="); line = line " " a[1] "=" (b[2] - a[2]) }
              print line } }' "$_marks"
    rm -f "$_m" "$_marks"
}

# KVM's own work counters, the same for every VMM: in-kernel histograms (tracefs hist
# triggers) on KVM's tracepoints, which keep counting across VMs (debugfs's stats vanish
# with the VM). kvm_counters prints one line of NAME=COUNT, cumulative since
# kvm_counters_mount; kvm_counters_diff gives the work between two such lines:
#   exits      every exit of a guest vCPU to KVM (kvm_exit)
#   to_vmm     exits KVM passed on to the VMM's KVM_RUN (kvm_userspace_exit); of them
#              vmm_io and vmm_mmio (port and MMIO accesses the VMM served)
#   irq_inj    interrupts injected into the guest (kvm_inj_virq)
#   hlt ioio npf msr intr vintr cpuid  exits by reason (AMD SVM codes; npf = nested
#              page faults, MMIO served in the kernel among them), other = the rest
KVM_TRACING=${KVM_TRACING:-/sys/kernel/tracing}
kvm_counters_mount() {
    [ -d $KVM_TRACING/events/kvm ] || mount -t tracefs none $KVM_TRACING 2>/dev/null || return 0
    [ -w $KVM_TRACING/events/kvm/kvm_exit/trigger ] || return 0
    grep -q '^hist' $KVM_TRACING/events/kvm/kvm_exit/trigger 2>/dev/null && return 0
    echo 'hist:keys=exit_reason:size=512' > $KVM_TRACING/events/kvm/kvm_exit/trigger 2>/dev/null || return 0
    echo 'hist:keys=reason' > $KVM_TRACING/events/kvm/kvm_userspace_exit/trigger 2>/dev/null
    echo 'hist:keys=common_type' > $KVM_TRACING/events/kvm/kvm_inj_virq/trigger 2>/dev/null
}
kvm_counters() {
    [ -r $KVM_TRACING/events/kvm/kvm_exit/hist ] || return 0
    grep -q '^hist' $KVM_TRACING/events/kvm/kvm_exit/trigger 2>/dev/null || return 0
    { sed 's/^/E /' $KVM_TRACING/events/kvm/kvm_exit/hist
      sed 's/^/U /' $KVM_TRACING/events/kvm/kvm_userspace_exit/hist
      sed 's/^/I /' $KVM_TRACING/events/kvm/kvm_inj_virq/hist; } 2>/dev/null | awk '
        BEGIN { n[96] = "intr"; n[100] = "vintr"; n[114] = "cpuid"; n[120] = "hlt"; n[123] = "ioio"
                n[124] = "msr"; n[1024] = "npf" }
        $2 == "Hits:" { t[$1] = $3 }
        $2 == "{" { k = $4; sub(/}/, "", k); c = $NF
            if ($1 == "E") { if (k in n) e[n[k]] += c; else other += c }
            if ($1 == "U") { if (k == 2) vio += c; if (k == 6) vmmio += c } }
        END { printf "exits=%d to_vmm=%d vmm_io=%d vmm_mmio=%d irq_inj=%d", t["E"], t["U"], vio, vmmio, t["I"]
              split("hlt ioio npf msr intr vintr cpuid", o, " ")
              for (i = 1; i <= 7; i++) printf " %s=%d", o[i], e[o[i]]
              printf " other=%d\n", other }'
}
# kvm_counters_diff BEFORE AFTER: "exits=D to_vmm=D ..." (AFTER - BEFORE)
kvm_counters_diff() {
    [ -n "$1" ] && [ -n "$2" ] || { echo "unavailable"; return 0; }
    echo "$1 $2" | awk '{ n = NF / 2; for (i = 1; i <= n; i++) { split($i, a, "="); split($(i + n), b, "="); printf "%s=%d ", a[1], b[2] - a[2] } print "" }'
}

# A flight recorder in L1: KVM's tracepoints kvm_exit, kvm_entry, kvm_inj_virq,
# kvm_inj_exception and kvm_userspace_exit into a 1 MiB per-CPU ring, restarted by
# kvm_trace_start before each boot; kvm_trace_tail NAME prints the last 16 events of a
# vCPU thread that shut down and the last 40 of all after a boot that failed, so a triple
# fault shows the guest RIP and reason of the shutdown exit and what KVM injected just
# before it (SVM resets the vCPU on a shutdown, so the VMM cannot read that state itself). Only in the testbed's L1 (a host's own tracing is
# left alone); both do nothing where tracefs is not writable.
kvm_trace_start() {
    [ "${TESTBED_MODE:-}" = l1 ] || return 0
    [ -d $KVM_TRACING/events/kvm ] || mount -t tracefs none $KVM_TRACING 2>/dev/null
    [ -w $KVM_TRACING/events/kvm/kvm_exit/enable ] || return 0
    echo 0 > $KVM_TRACING/tracing_on
    echo 1024 > $KVM_TRACING/buffer_size_kb
    for _e in kvm_exit kvm_entry kvm_inj_virq kvm_inj_exception kvm_userspace_exit; do
        echo 1 > $KVM_TRACING/events/kvm/$_e/enable
    done
    echo > $KVM_TRACING/trace
    echo 1 > $KVM_TRACING/tracing_on
}
kvm_trace_tail() {
    [ "${TESTBED_MODE:-}" = l1 ] || return 0
    [ -r $KVM_TRACING/trace ] && [ -w $KVM_TRACING/tracing_on ] || return 0
    echo 0 > $KVM_TRACING/tracing_on
    _tr=${scratch:-/tmp}/kvm-trace.txt
    grep -v '^#' $KVM_TRACING/trace > "$_tr"
    # first the vCPU thread that shut down (a triple fault), whose own events the other
    # vCPUs' may have pushed out of the last 40
    _who=$(grep 'KVM_EXIT_SHUTDOWN' "$_tr" | tail -n 1 | awk '{ print $1 }')
    if [ -n "$_who" ]; then
        echo "--- last KVM events of $_who, which shut down ($1, L1 tracefs):"
        awk -v w="$_who" '$1 == w' "$_tr" | tail -n 16 | cut -c1-200
    fi
    echo "--- last KVM events of $1 (L1 tracefs):"
    tail -n 40 "$_tr" | cut -c1-200
    rm -f "$_tr"
}

# kvm_trace_lost_paging: prints the evidence when L1's trace shows a guest whose paging
# state was lost below its VMM, in one of two ways:
#   - a vCPU that shut down (a triple fault) while an event was being delivered (a page
#     fault, a double fault, an interrupt: intr_info valid) at the very kernel address
#     KVM had just entered it at: the guest ran no instruction between the world switch
#     and the fault, so its IDT, stack or page tables were unreachable from the start;
#   - a vCPU whose page-table walk (npf with bit 33 of info1) reads a guest physical
#     address at or above 4 GiB, where none of the testbed's guests (512 MiB) has RAM or
#     devices: its page table root is not its own (a hung guest's stop line shows such a
#     root directly; QEMU's guests hang the same way and print none).
# The evidence is those events (at most 2 lines); nothing when there is none.
kvm_trace_lost_paging() {
    [ "${TESTBED_MODE:-}" = l1 ] && [ -r $KVM_TRACING/trace ] || return 0
    grep -v '^#' $KVM_TRACING/trace | awk '
        / kvm_entry: vcpu / { v = $0; sub(/.*kvm_entry: vcpu /, "", v); split(v, a, /[, ]+/)
            if (a[2] == "rip") { entry[a[1]] = a[3]; line[a[1]] = $0 } }
        / kvm_exit: vcpu [0-9]+ reason / { v = $0; sub(/.*kvm_exit: vcpu /, "", v); n = split(v, a, / +/)
            ii = ""; i1 = ""; i2 = ""
            for (i = 1; i < n; i++) { if (a[i] == "intr_info") ii = a[i + 1]; if (a[i] == "info1") i1 = a[i + 1]; if (a[i] == "info2") i2 = a[i + 1] }
            if (a[3] == "shutdown" && a[4] == "rip" && a[5] ~ /^0xffff/ && ("x" entry[a[1]]) == ("x" a[5]) \
                && length(ii) == 10 && substr(ii, 1, 3) == "0x8" && !shown) {
                print "  " line[a[1]]; print "  " $0; shown = 1 }
            if (a[3] == "npf" && length(i1) == 18 && length(i2) == 18 && substr(i1, 10, 1) ~ /[2367abef]/ \
                && substr(i2, 3, 8) != "00000000" && !walk) {
                print "  " $0; walk = 1 } }' | cut -c1-220
}

# paging_lost CONSOLE: status 0 when a failed run's guest lost its paging state below its
# VMM: a page table root outside guest RAM on swiftlet's stop line in CONSOLE, or L1's
# trace showing it (kvm_trace_lost_paging, whose evidence it prints).
paging_lost() {
    _ev=$(kvm_trace_lost_paging)
    [ -n "$_ev" ] && printf '%s\n' "$_ev"
    [ -n "$_ev" ] || grep -q 'page table root 0x[0-9a-f]* outside guest RAM' "$1" 2>/dev/null
}

# paging_lost_say LINE CONSOLE: when paging_lost says so, LINE and the evidence; status 0
# then, 1 otherwise.
paging_lost_say() {
    _pl=$(paging_lost "$2") && { echo "$1"; [ -z "$_pl" ] || printf '%s\n' "$_pl"; }
}

# paging_lost_line VMM RUN CONSOLE: for a failed benchmark run, "bench-lost VMM RUN" and
# the evidence when paging_lost says so.
paging_lost_line() {
    paging_lost_say "bench-lost $1 $2" "$3"
    return 0
}

# again_if_root_lost RUN ARGS...: RUN ARGS (which leave swiftlet's output in $out and its
# status in $rc), and once more when the guest lost its paging state below swiftlet: a
# vCPU's page table root outside guest RAM on swiftlet's stop line (a hung guest), or,
# for a triple fault, L1's trace showing it (kvm_trace_lost_paging). swiftlet writes CR3 only before the first KVM_RUN, and a guest
# kernel that loaded such a root itself would fault in its own context-switch code, not
# anywhere else: that state comes from the nested KVM below swiftlet. The repeat is
# announced by a "testbed:" line (the test suite turns it into a warning) with the lost
# boot's registers and KVM events; a second loss stands as the result.
again_if_root_lost() {
    "$@"
    [ $rc != 0 ] || return 0
    if grep -q 'page table root 0x[0-9a-f]* outside guest RAM' "$out"; then
        echo "testbed: guest page tables lost below swiftlet during ${current:-start-up}; booting it once more:"
        tr -d '\r' < "$out" | grep 'stopped at rip' | sed 's/^/  /'
    elif grep -q 'guest crashed: triple fault' "$out" && _lf=$(kvm_trace_lost_paging) && [ -n "$_lf" ]; then
        echo "testbed: guest faulted at the address it was entered at, below swiftlet, during ${current:-start-up}; booting it once more:"
        tr -d '\r' < "$out" | grep 'guest crashed: triple fault' | sed 's/^/  /'
        printf '%s\n' "$_lf"
    else
        return 0
    fi
    kvm_trace_tail "${current:-start-up}"
    "$@"
}
