#!/usr/bin/env python3
"""Writes a tiny 64-bit ELF "kernel" for swiftlet start-up measurements.

It runs on any KVM, PVM hosts included (no interrupts, no SSE): it prints
'K' on COM1, then writes SLP_TYP=5|SLP_EN to the ACPI sleep register at
0x3c0, so swiftlet ends with status 0 (powered off).
usage: tinyguest.py OUT.elf [--halt | --exit N | --debug-exit V]
--halt: print 'K' and halt for good instead of powering off (for tests that need a
running VM: the halted vCPU waits inside KVM).
--exit N: print 'K', then write N (32 bits) to the exit register at 0xd0000004.
--debug-exit V: print 'K', then write byte V to port 0xf4 (isa-debug-exit).
"""
import struct
import sys

LOAD = 0x200000
CODE = bytes([
    0x66, 0xBA, 0xF8, 0x03,   # mov dx, 0x3f8
    0xB0, 0x4B,               # mov al, 'K'
    0xEE,                     # out dx, al
    0xB0, 0x0A,               # mov al, '\n'
    0xEE,                     # out dx, al
    0x66, 0xBA, 0xC0, 0x03,   # mov dx, 0x3c0
    0xB0, 0x34,               # mov al, (5 << 2) | 0x20
    0xEE,                     # out dx, al
    0xF4,                     # hlt
    0xEB, 0xFD,               # jmp hlt
])


def elf(code):
    ehsize, phentsize = 64, 56
    off = ehsize + phentsize
    eh = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    eh += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, LOAD, ehsize, 0, 0, ehsize, phentsize, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, off, LOAD, LOAD, len(code), len(code), 0x1000)
    return eh + ph + code


POWEROFF = bytes([0x66, 0xBA, 0xC0, 0x03, 0xB0, 0x34, 0xEE])


def exit_register(n):
    # mov edx, 0xd0000004 (zero-extended into rdx); mov dword [rdx], n
    return bytes([0xBA]) + struct.pack("<I", 0xD0000004) + bytes([0xC7, 0x02]) + struct.pack("<I", n)


def debug_exit(v):
    # mov dx, 0xf4; mov al, v; out dx, al
    return bytes([0x66, 0xBA, 0xF4, 0x00, 0xB0, v, 0xEE])


if __name__ == "__main__":
    args = sys.argv[2:]
    if "--halt" in args:
        code = CODE.replace(POWEROFF, b"")
    elif "--exit" in args:
        code = CODE.replace(POWEROFF, exit_register(int(args[args.index("--exit") + 1], 0)))
    elif "--debug-exit" in args:
        code = CODE.replace(POWEROFF, debug_exit(int(args[args.index("--debug-exit") + 1], 0)))
    else:
        code = CODE
    assert code != CODE or not args
    with open(sys.argv[1], "wb") as f:
        f.write(elf(code))
