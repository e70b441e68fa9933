# scripts/lib/console.sh: reading a guest's console (POSIX sh, busybox-friendly).
# Sourced by scripts/stress-inner and scripts/soak-inner.
#
# The guest's /init echoes its command ("swiftlet-guest: run CMD", and each further
# line of a multi-line CMD as it is) before running it, so a marker the command prints
# also stands in the echo. A marker counts only as a whole line of its own.

# console_has FILE LINE: does the console in FILE hold LINE as a whole line (CRs and NULs dropped)?
console_has() {
    tr -d '\r\000' < "$1" | LC_ALL=C grep -qxF -- "$2"
}

# console_output FILE: the console without the echo of the guest's command (its first
# line: the command's further lines are not told apart, so markers are whole lines),
# CRs and NULs dropped, as text whatever bytes the guest wrote
console_output() {
    tr -d '\r\000' < "$1" | LC_ALL=C grep -v '^swiftlet-guest: run '
}

# console_run FILE WORD START: the last number of the unbroken run of lines "WORD START",
# "WORD START+1", ... in the console; nothing when there is no "WORD START". Any other
# "WORD ..." line ends the run: one cut short (a VMM killed mid-line: "WORD 280" of
# 28029), one out of order.
console_run() {
    console_output "$1" | LC_ALL=C awk -v w="$2" -v s="$3" '
        !stop && $0 == w " " (s + n) { n++; next }
        index($0, w " ") == 1 { stop = 1 }
        END { if (n) print s + n - 1 }'
}

# stress_classify FILE VMM STATUS: one boot of scripts/stress-inner from its console in
# FILE and the VMM's exit status. Prints RESULT DETAIL, RESULT one of ok, hang,
# guest-crash, vmm-error, load-failed. ok needs the line "stress-load-ok" (the load's
# own verdict), the guest's "swiftlet-guest: exit status 0" and status 0.
stress_classify() {
    _f=$1
    _c=$(console_output "$_f")
    _panic=$(printf '%s\n' "$_c" | LC_ALL=C grep -m1 -o 'Kernel panic - not syncing: .*' | cut -c1-80)
    _bug=$(printf '%s\n' "$_c" | LC_ALL=C grep -m1 -E 'BUG:|general protection fault|Oops:|double fault' | cut -c1-80)
    if [ "$3" = 137 ]; then echo "hang no exit within 120 s"; return; fi
    # swiftlet stopped by SIGTERM names where its vCPUs were
    _stop=$(printf '%s\n' "$_c" | LC_ALL=C grep -m1 -o 'stopped by signal 15 .*' | sed 's/.*(\(.*\))$/\1/' | cut -c1-120)
    if [ -n "$_stop" ]; then echo "hang no exit within 120 s ($_stop)"; return; fi
    if console_has "$_f" stress-load-ok && console_has "$_f" 'swiftlet-guest: exit status 0' \
        && [ "$3" = 0 ]; then echo ok; return; fi
    if [ -n "$_panic" ]; then echo "guest-crash panic: $_panic"; return; fi
    if [ -n "$_bug" ]; then echo "guest-crash $_bug"; return; fi
    case "$2:$3" in
        swiftlet*:4) echo "guest-crash $(printf '%s\n' "$_c" | LC_ALL=C grep -m1 -o 'guest crashed.*' | cut -c1-80)"; return;;
        swiftlet*:3) echo "guest-crash reset (status 3)"; return;;
    esac
    if ! printf '%s\n' "$_c" | LC_ALL=C grep -q '^swiftlet-guest: exit status [0-9]'; then
        # QEMU with -no-reboot exits 0 on a guest reset or triple fault
        echo "guest-crash no exit marker, status $3 (reset or triple fault)"; return
    fi
    # the guest's own status reaches swiftlet's (its exit register); QEMU exits 0
    _gs=$(printf '%s\n' "$_c" | sed -n 's/^swiftlet-guest: exit status \([0-9]*\).*/\1/p' | tail -n 1)
    if [ "$3" != 0 ] && [ "$3" != "$_gs" ]; then echo "vmm-error status $3"; return; fi
    echo "load-failed guest status $_gs $(printf '%s\n' "$_c" | LC_ALL=C grep -m1 -iE 'error|fail' | cut -c1-80)"
}
