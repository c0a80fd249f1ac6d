#!/usr/bin/env python3
"""fuzz/gen-seeds.py: writes the checked-in seed corpora (fuzz/corpus/TARGET/).

Each seed is a well-formed case in the target's input format (see
fuzz/src/virtio.rs for the virtio targets), so the fuzzer starts from
requests a real driver sends and mutates from there. Rerun after changing
an input format; the output is deterministic.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

NEXT, WRITE, INDIRECT = 1, 2, 4
F_INDIRECT, F_EVENT_IDX = 1 << 28, 1 << 29
BLK_F_FLUSH, BLK_F_DISCARD, BLK_F_WRITE_ZEROES = 1 << 9, 1 << 13, 1 << 14
NET_F_CSUM, NET_F_MAC, NET_F_MRG_RXBUF, NET_F_STATUS = 1 << 0, 1 << 5, 1 << 15, 1 << 16


def queue(i):
    base = i * 0x400
    return base, base + 0x100, base + 0x200


class Mem:
    def __init__(self):
        self.b = bytearray()

    def put(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, q, i, addr, length, flags, nxt=0):
        d, _, _ = queue(q)
        self.put(d + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, q, first, descs):
        """Stores (addr, len, flags) descriptors as one chain from index first."""
        for k, (addr, length, flags) in enumerate(descs):
            last = k + 1 == len(descs)
            self.desc(q, first + k, addr, length, flags | (0 if last else NEXT), 0 if last else first + k + 1)

    def avail(self, q, heads, used_event=None):
        _, a, _ = queue(q)
        self.put(a, struct.pack("<HH", 0, len(heads)))
        for k, h in enumerate(heads):
            self.put(a + 4 + 2 * k, struct.pack("<H", h))
        if used_event is not None:
            self.put(a + 4 + 2 * 16, struct.pack("<H", used_event))


def device_input(features, rounds, opts, mem):
    """run_device's input: the harness kicks (byte % 4) + 1 times."""
    return struct.pack("<QBH", features | (1 << 32), rounds - 1, len(opts)) + bytes(opts) + bytes(mem.b)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


HDR, DATA, STATUS, TABLE = 0x900, 0x1000, 0x980, 0xa00


def blk_request(ty, sector, data_descs, features=0, opts=b"\0", extra=b""):
    m = Mem()
    m.put(HDR, struct.pack("<IIQ", ty, 0, sector))
    m.put(HDR + 16, extra)
    m.chain(0, 0, [(HDR, 16, 0)] + data_descs + [(STATUS, 1, WRITE)])
    m.avail(0, [0])
    return device_input(features, 1, opts, m)


def blk_seeds():
    t = "virtio_blk"
    write(t, "read", blk_request(0, 1, [(DATA, 512, WRITE)]))
    write(t, "read-two-buffers", blk_request(0, 0, [(DATA, 512, WRITE), (DATA + 0x400, 1024, WRITE)]))
    write(t, "write", blk_request(1, 2, [(DATA, 1024, 0)], BLK_F_FLUSH))
    write(t, "write-read-only", blk_request(1, 2, [(DATA, 512, 0)], 0, b"\x01"))
    write(t, "write-failing-disk", blk_request(1, 2, [(DATA, 512, 0)], 0, b"\x02"))
    write(t, "flush", blk_request(4, 0, [], BLK_F_FLUSH))
    write(t, "get-id", blk_request(8, 0, [(DATA, 20, WRITE)]))
    seg = struct.pack("<QII", 8, 8, 0)
    write(t, "discard", blk_request(11, 0, [(HDR + 16, 16, 0)], BLK_F_DISCARD, extra=seg))
    seg = struct.pack("<QII", 0, 16, 1)
    write(t, "write-zeroes-unmap", blk_request(13, 0, [(HDR + 16, 16, 0)], BLK_F_WRITE_ZEROES, extra=seg))
    # An indirect table with the whole request in it.
    m = Mem()
    m.put(HDR, struct.pack("<IIQ", 0, 0, 3))
    for k, (a, l, f) in enumerate([(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]):
        nf = NEXT if k < 2 else 0
        m.put(TABLE + 16 * k, struct.pack("<QIHH", a, l, f | nf, k + 1 if k < 2 else 0))
    m.desc(0, 0, TABLE, 48, INDIRECT)
    m.avail(0, [0])
    write(t, "indirect", device_input(F_INDIRECT, 1, b"\0", m))
    # Two requests, event index on, notified over two rounds.
    m = Mem()
    m.put(HDR, struct.pack("<IIQ", 0, 0, 0))
    m.chain(0, 0, [(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)])
    m.chain(0, 3, [(HDR, 16, 0), (DATA + 512, 512, WRITE), (STATUS + 1, 1, WRITE)])
    m.avail(0, [0, 3], used_event=1)
    write(t, "two-requests-event-idx", device_input(F_EVENT_IDX, 2, b"\0", m))


def frame(n=60):
    return bytes([0xff] * 6 + [2, 0, 0, 0, 0, 1] + [8, 0]) + bytes(range(n - 14))


def net_seeds():
    tx, rx = "virtio_net_tx", "virtio_net_rx"
    hdr = bytes(12)
    m = Mem()
    m.put(0x800, hdr + frame())
    m.chain(1, 0, [(0x800, 12 + 60, 0)])
    m.avail(1, [0])
    write(tx, "one-frame", device_input(0, 1, b"\0\0", m))
    m = Mem()
    m.put(0x800, hdr)
    m.put(0x900, frame(100))
    m.chain(1, 0, [(0x800, 12, 0), (0x900, 100, 0)])
    m.chain(1, 2, [(0x900, 60, 0)])
    m.avail(1, [0, 2])
    write(tx, "split-header-and-runt", device_input(NET_F_CSUM, 2, b"\0\x02\x01\x00", m))
    m = Mem()
    m.put(0x800, hdr + frame())
    m.chain(1, 0, [(0x800, 72, 0)])
    m.avail(1, [0])
    write(tx, "backend-fails", device_input(0, 1, b"\0\x01\x03", m))

    def rx_opts(frames, outcomes=b""):
        o = bytes([len(frames)])
        for f in frames:
            o += struct.pack("<H", len(f)) + f
        return o + bytes([len(outcomes)]) + outcomes

    m = Mem()
    m.chain(0, 0, [(0x800, 1526, WRITE)])
    m.avail(0, [0])
    write(rx, "one-buffer", device_input(NET_F_MAC | NET_F_STATUS, 1, rx_opts([hdr + frame()]), m))
    m = Mem()
    for k in range(4):
        m.chain(0, k, [(0x800 + 0x100 * k, 0x40, WRITE)])
    m.avail(0, [0, 1, 2, 3])
    write(rx, "mergeable-buffers", device_input(NET_F_MRG_RXBUF, 1, rx_opts([hdr + frame(200)]), m))
    m = Mem()
    m.chain(0, 0, [(0x800, 12, WRITE), (0x900, 0x400, WRITE)])
    m.avail(0, [0])
    write(rx, "two-frames-one-chain", device_input(0, 2, rx_opts([hdr + frame(), hdr + frame(80)]), m))
    write(rx, "no-buffers", device_input(0, 1, rx_opts([hdr + frame()]), Mem()))


def console_seeds():
    t = "virtio_console"
    m = Mem()
    m.put(0x800, b"hello from the guest\n")
    m.chain(1, 0, [(0x800, 21, 0)])
    m.avail(1, [0])
    m.chain(0, 0, [(0xc00, 64, WRITE)])
    m.avail(0, [0])
    write(t, "tx-and-rx", device_input(0, 2, b"\0host input\n", m))
    write(t, "tx-failing-output", device_input(0, 1, b"\x01", m))
    m = Mem()
    m.chain(0, 0, [(0xc00, 4, WRITE), (0xd00, 4, WRITE)])
    m.avail(0, [0])
    write(t, "rx-split-input", device_input(0, 3, b"\0" + b"abcdefghij" * 3, m))


def balloon_seeds():
    t = "virtio_balloon"
    m = Mem()
    m.put(0x8000, b"\xaa" * 0x1000)
    # Inflate: pages 8 and 9 (0x8000, 0x9000), a PFN past memory.
    m.put(0x2000, struct.pack("<III", 8, 9, 0xffffffff))
    m.chain(0, 0, [(0x2000, 12, 0)])
    m.avail(0, [0])
    write(t, "inflate", device_input(0, 1, b"\x10", m))
    # Statistics: free and total memory.
    m = Mem()
    m.put(0x2000, struct.pack("<HQHQ", 4, 1 << 20, 5, 1 << 24))
    m.chain(2, 0, [(0x2000, 20, 0)])
    m.avail(2, [0])
    write(t, "stats", device_input(0, 3, b"\0", m))
    # A free page report as Linux sends it: device-writable ranges.
    m = Mem()
    m.chain(3, 0, [(0x8000, 0x2000, WRITE), (0xc000, 0x1000, WRITE)])
    m.avail(3, [0])
    write(t, "report", device_input(0, 1, b"\0", m))


def rng_seeds():
    t = "virtio_rng"
    m = Mem()
    m.chain(0, 0, [(0x800, 64, WRITE)])
    m.chain(0, 1, [(0x900, 16, WRITE), (0xa00, 4096, WRITE)])
    m.avail(0, [0, 1])
    write(t, "two-buffers", device_input(0, 1, b"\0", m))
    write(t, "byte-limited", device_input(0, 3, b"\x01\x20\x00", m))
    write(t, "request-limited", device_input(0, 3, b"\x02\x01\x00", m))
    m = Mem()
    m.chain(0, 0, [(0x800, 64, 0)])
    m.avail(0, [0])
    write(t, "read-only-buffer", device_input(0, 1, b"\0", m))


def mmio_seeds():
    t = "virtio_mmio"

    def w(off, val):
        return struct.pack("<BHI", 2, off, val)

    def driver(queues):
        ops = w(0x70, 1) + w(0x70, 3) + w(0x24, 0) + w(0x20, 0) + w(0x24, 1) + w(0x20, 1) + w(0x70, 11)
        for q in range(queues):
            d, a, u = queue(q)
            ops += w(0x30, q) + w(0x38, 16) + w(0x80, d) + w(0x90, a) + w(0xa0, u) + w(0x44, 1)
        return ops + w(0x70, 15)

    def rd(off, width_idx=2):
        return struct.pack("<BH", (width_idx << 4) | 0, off)

    reads = b"".join(rd(o) for o in (0, 4, 8, 0xc, 0x10, 0x34, 0x60, 0x70, 0xfc)) + rd(0x100, 0) + rd(0x104, 3)
    notify = lambda q: struct.pack("<BHB", 3, 0x50, q)
    for kind, name, mem, queues in (
        (0, "block-read", blk_request(0, 1, [(DATA, 512, WRITE)])[11 + 1:], 1),
        (1, "net-tx", None, 2),
        (2, "console-tx", None, 2),
        (5, "fs-bring-up", None, 2),
    ):
        if mem is None:
            m = Mem()
            m.put(0x800, bytes(12) + frame())
            m.chain(1, 0, [(0x800, 72, 0)])
            m.avail(1, [0])
            mem = bytes(m.b)
        data = struct.pack("<BH", kind, len(mem)) + mem + bytes(8)
        data += reads + driver(queues) + notify(queues - 1) + rd(0x60) + w(0x64, 1) + w(0x70, 0) + reads
        write(t, name, data)
    # Config space writes at every width, and an out-of-window access.
    data = struct.pack("<BH", 0, 0) + bytes(8)
    for wi in range(4):
        data += struct.pack("<BHQ", (wi << 4) | 1, 0x100 + wi, 0x1122334455667788)
    data += struct.pack("<BHQ", 1, 0x1008, 5)
    write(t, "config-space", data)


def http_seeds():
    t = "http_api"
    reqs = {
        "get-root": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "pipelined": b"GET /version HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\nGET /vm/config HTTP/1.1\r\n\r\n",
        "machine-config": b'PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 44\r\n\r\n{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}',
        "boot-source": b'PUT /boot-source HTTP/1.1\r\nContent-Length: 77\r\n\r\n{"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"}',
        "drive": b'PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 95\r\n\r\n{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false}',
        "net": b'PUT /network-interfaces/eth0 HTTP/1.1\r\nContent-Length: 82\r\n\r\n{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}',
        "pause": b'PATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{"state": "Paused"}',
        "action": b'PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{"action_type": "SendCtrlAltDel"}',
        "logger": b'PUT /logger HTTP/1.1\r\nContent-Length: 19\r\n\r\n{"level": "Debug"}',
        "serial": b'PUT /serial HTTP/1.1\r\nContent-Length: 34\r\n\r\n{"serial_out_path": "/tmp/x.log"}',
        "expect-continue": b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 36\r\n\r\n{\"vcpu_count\": 1, \"mem_size_mib\": 64}",
        "http10-close": b"GET /version HTTP/1.0\r\nConnection: close\r\n\r\n",
        "chunked": b"PUT /logger HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "bad-length": b"PUT /logger HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "query": b"GET /?x=1 HTTP/1.1\r\n\r\n",
    }
    for name, r in reqs.items():
        # Content-Length values above are approximate on purpose for some;
        # the fixed ones are recomputed here.
        head, _, body = r.partition(b"\r\n\r\n")
        if b"Content-Length: " in head and name != "bad-length":
            lines = [l if not l.startswith(b"Content-Length: ") else b"Content-Length: %d" % len(body)
                     for l in head.split(b"\r\n")]
            r = b"\r\n".join(lines) + b"\r\n\r\n" + body
        write(t, name, b"\xff" + r)
    write(t, "byte-at-a-time", b"\x01" + reqs["get-root"])


def config_seeds():
    t = "config_file"
    full = {
        "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k", "initrd_path": None},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True, "is_read_only": False,
             "partuuid": "1234-01", "cache_type": "Unsafe", "io_engine": "Sync"},
            {"drive_id": "data", "path_on_host": "/data.img", "is_root_device": False, "is_read_only": True},
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False, "track_dirty_pages": False,
                           "huge_pages": "None"},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}],
        "serial": {"serial_out_path": "/tmp/serial.log"},
        "logger": {"log_path": "/tmp/log", "level": "Info", "show_level": True, "show_log_origin": False},
    }
    write(t, "full", json.dumps(full, indent=1).encode())
    write(t, "minimal", json.dumps({"boot-source": {"kernel_image_path": "/k"}}).encode())
    write(t, "unsupported", json.dumps({"boot-source": {"kernel_image_path": "/k"}, "balloon": {"amount_mib": 1},
                                        "vsock": {"guest_cid": 3, "uds_path": "/v"}}).encode())
    write(t, "huge-memory", json.dumps({"boot-source": {"kernel_image_path": "/k"},
                                        "machine-config": {"vcpu_count": 1, "mem_size_mib": 2 ** 63}}).encode())


def cli_seeds():
    t = "cli_args"
    for i, (which, s) in enumerate([
        (0, "/images/root.ext4"), (0, "/images/root.ext4,ro"), (0, "base.img,ephemeral"), (0, "x,rw"),
        (1, "tap=tap0"), (1, "tap=tap0,mac=06:00:00:00:00:01"), (1, "user"),
        (1, "user,publish=8080:80,publish=2222:22,mac=02:aa:bb:cc:dd:ee"),
        (2, "512M"), (2, "1G"), (2, "4096"), (2, "1.5G"), (2, "16E"), (2, "3k"),
        (3, "06:00:00:00:00:01"), (3, "ff:FF:0:0:0:1"),
    ]):
        write(t, "seed-%02d" % i, bytes([which]) + s.encode())


def exec_seeds():
    t = "exec_proto"

    def fr(kind, payload=b""):
        return struct.pack("<BI", kind, len(payload)) + payload

    stream = (fr(0x01, struct.pack("<I", 1)) + fr(0x04) + fr(0x02, b"out\n") + fr(0x03, b"err\n") + fr(0x05)
              + fr(0x08, struct.pack("<II", 0, 0o644) + b"dir/file") + fr(0x09, b"data")
              + fr(0x0a, struct.pack("<II", 1, 0o755) + b"dir") + fr(0x07, b"no such file") + fr(0x06, b"\x03"))
    host = fr(0x81, struct.pack("<QI", 1700000000, 5)) + fr(0x82, b"input") + fr(0x83)
    write(t, "guest-stream", b"\x7f" + stream)
    write(t, "guest-stream-split", b"\x03" + stream)
    write(t, "host-stream", b"\x10" + host)
    write(t, "too-long", b"\x7f" + struct.pack("<BI", 2, 1 << 30))
    spec = b"arg=/bin/sh\0arg=-c\0arg=echo hi\0env=A=B\0cwd=/\0disk=1\0share=0:rw:/mnt/a\0share=1:ro:/mnt/b\0"
    write(t, "spec", b"\x80" + spec)


VSOCK_REQUEST, VSOCK_RESPONSE, VSOCK_RST, VSOCK_SHUTDOWN, VSOCK_RW = 1, 2, 3, 4, 5
VSOCK_CREDIT_UPDATE, VSOCK_CREDIT_REQUEST = 6, 7
FIRST_LOCAL_PORT = 1 << 30


def vsock_hdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd_cnt=0, src_cid=3, dst_cid=2, ty=1):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, ty, op, flags, buf_alloc, fwd_cnt)


def vsock_input(features, script, mem):
    """fuzz/src/vsock.rs's input: features, the host script, memory."""
    return struct.pack("<QH", features | (1 << 32), len(script)) + bytes(script) + bytes(mem.b)


def vs(*ops):
    """A script: (opcode, operand bytes) pairs."""
    out = b""
    for op, args in ops:
        out += bytes([op]) + args
    return out


def vsock_seeds():
    t = "virtio_vsock"
    rx_bufs = lambda m, n: [m.chain(0, i, [(0x1000 + 0x400 * i, 0x400, WRITE)]) for i in range(n)]
    # A guest connection to a host listener on port 52, then data.
    m = Mem()
    rx_bufs(m, 2)
    m.avail(0, [0, 1])
    m.put(0x100 + 2, struct.pack("<H", 1))
    m.put(0x2000, vsock_hdr(VSOCK_REQUEST, 1000, 52))
    m.put(0x2100, vsock_hdr(VSOCK_RW, 1000, 52, 10))
    m.put(0x2200, b"hello host")
    m.chain(1, 0, [(0x2000, 44, 0)])
    m.chain(1, 1, [(0x2100, 44, 0), (0x2200, 10, 0)])
    m.avail(1, [0, 1])
    listen52 = (2, struct.pack("<I", 52))
    script = vs(listen52, (0, b"\x01"), (6, b""), (8, b"\x00"))
    write(t, "guest-connect-rw", vsock_input(0, script, m))
    # A host client's CONNECT line, the guest's RESPONSE, host data.
    m = Mem()
    rx_bufs(m, 2)
    m.avail(0, [0, 1])
    m.put(0x100 + 2, struct.pack("<H", 1))
    m.put(0x2000, vsock_hdr(VSOCK_RESPONSE, 1234, FIRST_LOCAL_PORT))
    m.chain(1, 0, [(0x2000, 44, 0)])
    m.avail(1, [0])
    script = vs((4, struct.pack("<I", 1234)), (12, b""), (0, b"\x01"), (8, b"\x00"),
                (1, b"\x00\x00"), (7, struct.pack("<HBB", 4, ord("p"), 0)), (12, b""))
    write(t, "host-connect", vsock_input(F_EVENT_IDX, script, m))
    # Credit request, shutdown both ways, then a reset, on a guest
    # connection; a packet of no connection; a bad socket type.
    m = Mem()
    rx_bufs(m, 4)
    m.avail(0, [0, 1, 2, 3])
    hdrs = [vsock_hdr(VSOCK_REQUEST, 1000, 52), vsock_hdr(VSOCK_CREDIT_REQUEST, 1000, 52),
            vsock_hdr(VSOCK_SHUTDOWN, 1000, 52, flags=3), vsock_hdr(VSOCK_RST, 1000, 52),
            vsock_hdr(VSOCK_RW, 7, 9, 0), vsock_hdr(VSOCK_REQUEST, 1, 52, ty=2)]
    for i, h in enumerate(hdrs):
        m.put(0x2000 + 0x40 * i, h)
        m.chain(1, i, [(0x2000 + 0x40 * i, 44, 0)])
    m.avail(1, list(range(len(hdrs))))
    write(t, "credit-shutdown-rst", vsock_input(0, vs(listen52, (0, b"\x01"), (6, b""), (9, b"\x00"), (12, b"")), m))
    # Host clients that send junk, half a line, or hang up; an indirect
    # receive chain; a transport reset with an event buffer.
    m = Mem()
    m.put(0x1800, struct.pack("<QIHH", 0x1000, 0x400, WRITE, 0) + struct.pack("<QIHH", 0x1400, 0x400, WRITE, 0))
    m.desc(0, 0, 0x1800, 32, INDIRECT)
    m.avail(0, [0])
    m.desc(2, 0, 0x1c00, 4, WRITE)
    m.avail(2, [0])
    script = vs((5, b"\x08CONNECT\n"), (5, b"\x04CONN"), (5, b"\x00"), (4, struct.pack("<I", 5)), (10, b"\x03"),
                (12, b""), (13, b""), (14, b""), (0, b"\x00"))
    write(t, "clients-and-reset", vsock_input(F_INDIRECT, script, m))


def fs_input(features, opts, script, mem=b""):
    """virtio_fs's input: driver features, the rig's options (tag choice,
    backend features, answers), the script (4-byte steps), memory."""
    assert len(script) % 4 == 0
    return (struct.pack("<QH", features | (1 << 32), len(opts)) + opts
            + struct.pack("<B", len(script) // 4) + script + mem)


def fs_seeds():
    t = "virtio_fs"
    backend = struct.pack("<BQ", 0, (1 << 32) | F_INDIRECT | F_EVENT_IDX)
    step = lambda op, arg, extra=b"": struct.pack("<BB", op, arg) + extra.ljust(2, b"\0")
    # Bring-up, the backend's used signals on both queues, kicks, a reset
    # and a second bring-up, a signal after it.
    script = step(1, 1) + step(0, 1) + step(1, 0) + step(2, 0, struct.pack("<H", 0)) + step(1, 1)
    write(t, "bring-up-and-reset", fs_input(F_EVENT_IDX, backend, script))
    # The backend refuses SET_MEM_TABLE, then the first queue's start.
    write(t, "refused-mem-table", fs_input(0, backend + b"\0\1", step(1, 0) + step(2, 0)))
    write(t, "refused-queue-start", fs_input(0, backend + b"\0\0\1", step(1, 1) + step(2, 0)))
    # Rings past the end of memory (0x10000) and far away; size 0 and 1024.
    hostile = step(4, 0) + struct.pack("<H", 16) + struct.pack("<IB", 0xfff0, 0) * 3
    hostile += struct.pack("<H", 1024) + struct.pack("<IB", 0x100, 0) + struct.pack("<IB", 0, 2) + struct.pack("<IB", 0x200, 0)
    hostile = hostile.ljust((len(hostile) + 3) // 4 * 4, b"\0")
    write(t, "rings-outside-memory", fs_input(0, backend, hostile + step(1, 0)))
    # The backend hangs up while the device runs, then a reset.
    write(t, "backend-hangs-up", fs_input(0, backend, step(3, 0) + step(1, 1) + step(2, 0)))


# virtio_pci: fuzz_targets/virtio_pci.rs's operations (op byte: low nibble
# what, high nibble the width index into 1, 2, 4, 8, 3, 0).
PCI_SLOT = 1
W1, W2, W4, W8 = 0x00, 0x10, 0x20, 0x30
# capsule_fuzz::virtio::pci::common::REGISTERS indices.
(C_DFS, C_DF, C_DRFS, C_DRF, C_CFG_VEC, C_NUMQ, C_STATUS, C_GEN, C_QSEL, C_QSIZE, C_QVEC,
 C_QEN, C_QNOTIFY, C_QDESC, C_QDESC_LO, C_QDESC_HI, C_QDRV, C_QDRV_LO, C_QDRV_HI,
 C_QDEV, C_QDEV_LO, C_QDEV_HI) = range(22)
MSIX_CAP, PCI_CFG_CAP = 0x84, 0x90


def p_conf_rd(reg, w=W4, slot=PCI_SLOT):
    return struct.pack("<BBB", w | 0, slot, reg)


def p_conf_wr(reg, val, w=W4, slot=PCI_SLOT):
    return struct.pack("<BBBQ", w | 1, slot, reg, val)


def p_port_rd(port, w=W4):
    return struct.pack("<BB", w | 2, port - 0xcf6)


def p_port_wr(port, val, w=W4):
    return struct.pack("<BBQ", w | 3, port - 0xcf6, val)


def p_ecam_rd(slot, reg, w=W4, function=0):
    return struct.pack("<BBH", w | 4, slot | function << 2, reg)


def p_ecam_wr(slot, reg, val, w=W4):
    return struct.pack("<BBHQ", w | 5, slot, reg, val)


def p_bar_rd(off, w=W4):
    return struct.pack("<BH", w | 6, off)


def p_bar_wr(off, val, w=W4):
    return struct.pack("<BHQ", w | 7, off, val)


def p_common(idx, val):
    return struct.pack("<BBQ", 8, idx, val)


def p_vector(v, addr=0xfee00000, data=0x30, masked=0):
    return struct.pack("<BBQIB", 9, v, addr, data + v, masked)


def p_msix_control(byte):
    return struct.pack("<BB", 10, byte)


def p_cfg(offset, length_idx=2, write=None, ecam=False, w=W4):
    flags = length_idx << 2 | (0x20 if ecam else 0) | (0x40 if write is not None else 0)
    out = struct.pack("<BBH", w | 11, flags, offset)
    return out + (struct.pack("<I", write) if write is not None else b"")


def p_notify(q):
    return struct.pack("<BB", 12, q)


def p_poke(addr, data):
    return struct.pack("<BHB", 13, addr, len(data)) + data


def p_ack():
    return struct.pack("<BB", 14, 0)


def p_reset():
    return struct.pack("<BB", 14, 1)


def p_compare(slot, reg, w=W4):
    return struct.pack("<BBBB", w | 14, 3, slot, reg)


def pci_input(kind, mem, ops, bring_up=None, opts=bytes(8)):
    data = struct.pack("<BH", kind, len(mem)) + mem + opts.ljust(8, b"\0")
    if bring_up is None:
        data += b"\0"
    else:
        data += struct.pack("<BQ", 1, bring_up)
    return data + ops


def pci_driver(queues, features=0):
    """A driver's bring-up by hand, as Linux's virtio_pci_modern does it:
    the identity, the capability list, BAR sizing, decoding on, MSI-X,
    negotiation, vectors, queues, DRIVER_OK."""
    ops = p_conf_rd(0x00) + p_conf_rd(0x08) + p_conf_rd(0x2c) + p_conf_rd(0x34, W1)
    for cap in (0x40, 0x50, 0x60, 0x70, MSIX_CAP, PCI_CFG_CAP):
        ops += p_conf_rd(cap, W2) + p_conf_rd(cap + 3, W1) + p_conf_rd(cap + 8) + p_conf_rd(cap + 12)
    ops += p_conf_wr(0x10, 0xffffffff) + p_conf_rd(0x10) + p_conf_wr(0x10, 0xe0000000) + p_conf_rd(0x10)
    ops += p_conf_wr(0x04, 0x0006, W2)
    ops += p_conf_wr(MSIX_CAP + 2, 0xc000, W2)
    for v in range(queues + 1):
        ops += p_vector(v)
    ops += p_conf_wr(MSIX_CAP + 2, 0x8000, W2)
    ops += p_common(C_STATUS, 0) + p_common(C_STATUS, 1) + p_common(C_STATUS, 3)
    ops += p_common(C_DFS, 0) + p_bar_rd(0x04) + p_common(C_DFS, 1) + p_bar_rd(0x04)
    ops += p_common(C_DRFS, 0) + p_common(C_DRF, features & 0xffffffff)
    ops += p_common(C_DRFS, 1) + p_common(C_DRF, (features >> 32) | 1)
    ops += p_common(C_STATUS, 11) + p_bar_rd(0x14, W1)
    ops += p_common(C_CFG_VEC, 0) + p_bar_rd(0x10, W2) + p_bar_rd(0x12, W2)
    for q in range(queues):
        d, a, u = queue(q)
        ops += p_common(C_QSEL, q) + p_bar_rd(0x18, W2) + p_common(C_QSIZE, 16) + p_common(C_QVEC, q + 1)
        ops += p_common(C_QDESC_LO, d) + p_common(C_QDESC_HI, 0) + p_common(C_QDRV_LO, a)
        ops += p_common(C_QDRV_HI, 0) + p_common(C_QDEV_LO, u) + p_common(C_QDEV_HI, 0)
        ops += p_bar_rd(0x1e, W2) + p_common(C_QEN, 1)
    return ops + p_common(C_STATUS, 15)


def pci_seeds():
    t = "virtio_pci"
    blk_mem = blk_request(0, 1, [(DATA, 512, WRITE)])[11 + 1:]
    m = Mem()
    m.put(0x800, bytes(12) + frame())
    m.chain(1, 0, [(0x800, 72, 0)])
    m.avail(1, [0])
    tx_mem = bytes(m.b)
    look = (p_bar_rd(0x1000, W1) + p_bar_rd(0x2000) + p_bar_rd(0x2004, W2) + p_bar_rd(0x4000, W8)
            + p_bar_rd(0x4008) + p_bar_rd(0x400c) + p_bar_rd(0x5000, W8) + p_bar_rd(0x14, W1))
    # The harness's bring-up, then a request, interrupts taken, the BAR read.
    write(t, "block-read", pci_input(0, blk_mem, p_notify(0) + p_ack() + look, bring_up=0))
    write(t, "net-tx", pci_input(1, tx_mem, p_notify(1) + p_ack() + look, bring_up=0))
    # A driver's bring-up by hand, for each device type, then a kick, the
    # interrupt taken through the ISR, a reset.
    for kind, name, mem, queues in ((0, "block", blk_mem, 1), (1, "net", tx_mem, 2), (2, "console", tx_mem, 2),
                                    (3, "balloon", b"", 4), (4, "rng", b"", 1), (5, "fs", b"", 2)):
        ops = pci_driver(queues) + p_notify(queues - 1) + p_bar_rd(0x1000, W1) + p_ack() + look + p_reset()
        write(t, "driver-" + name, pci_input(kind, mem, ops))
    # The vectors masked (per vector, then the function): pending bits,
    # then unmasked.
    ops = (p_vector(1, masked=1) + p_notify(0) + p_bar_rd(0x5000, W8) + p_vector(1)
           + p_msix_control(0xc0) + p_notify(0) + p_bar_rd(0x5000) + p_msix_control(0x80) + p_ack())
    write(t, "masked-vectors", pci_input(0, blk_mem, ops, bring_up=0))
    # Both mechanisms over bus 0: the host bridge, the function, absent
    # slots and functions, the extended space; the raw ports.
    ops = b""
    for slot in range(4):
        ops += p_conf_rd(0, slot=slot) + p_ecam_rd(slot, 0) + p_compare(slot, 0x08)
    ops += p_ecam_rd(PCI_SLOT, 0x100) + p_ecam_rd(PCI_SLOT, 0xffc) + p_ecam_rd(PCI_SLOT, 0, function=1)
    ops += p_ecam_rd(PCI_SLOT, 0x0a, W2) + p_ecam_rd(PCI_SLOT, 0x0b, W1) + p_ecam_rd(PCI_SLOT, 0x01, W4)
    ops += p_ecam_wr(PCI_SLOT, 0x10, 0xffffffff) + p_ecam_rd(PCI_SLOT, 0x10) + p_ecam_wr(PCI_SLOT, 0x10, 0xe0000000)
    ops += p_port_wr(0xcf8, 0x80000800) + p_port_rd(0xcfc) + p_port_rd(0xcfe, W2) + p_port_rd(0xcf8)
    ops += p_port_wr(0xcfb, 1, W1) + p_port_wr(0xcf8, 0x00000800) + p_port_rd(0xcfc)
    ops += p_port_wr(0xcf8, 0x80010800) + p_port_rd(0xcfc)
    write(t, "config-mechanisms", pci_input(4, b"", ops))
    # The PCI_CFG window: device features, the status, a notification and
    # the MSI-X table through it; a window past the BAR.
    ops = (p_cfg(0x04) + p_cfg(0x14, 0, write=1) + p_cfg(0x14, 0, ecam=True) + p_cfg(0x3000, 1, write=0)
           + p_cfg(0x4000, 2, write=0xfee00000) + p_cfg(0x4000) + p_cfg(0x7ffe, 2) + p_cfg(0x1000, 0, ecam=True))
    write(t, "pci-cfg-window", pci_input(0, blk_mem, ops, bring_up=0))
    # Every width at the start of each structure, and past the BAR.
    ops = b""
    for off in (0x0, 0x14, 0x1000, 0x2000, 0x3000, 0x4000, 0x4004, 0x5000, 0x7ff8, 0x8000):
        for w in range(6):
            ops += p_bar_rd(off, w << 4) + p_bar_wr(off, 0x0101010101010101, w << 4)
    write(t, "bar-widths", pci_input(3, b"", ops, bring_up=0))


def elf64(segments, sections=(), entry=None, notes=None):
    """A little-endian x86-64 ELF: segments (offset, paddr, data, memsz),
    sections (name, type, data, link), placed after the headers at their
    offsets (segments) or appended (sections), then the section headers."""
    phdrs = list(segments)
    if notes is not None:
        phdrs.append(("note", notes))
    phnum = len(phdrs)
    body = bytearray(64 + 56 * phnum)
    ph = b""
    for p in phdrs:
        if p[0] == "note":
            off = len(body)
            body += p[1]
            ph += struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(p[1]), len(p[1]), 4)
            continue
        off, paddr, data, memsz = p
        if len(body) < off:
            body += bytes(off - len(body))
        body[off:off + len(data)] = data
        ph += struct.pack("<IIQQQQQQ", 1, 7, off, paddr | 0xffffffff80000000, paddr, len(data), memsz, 0x1000)
    body[64:64 + len(ph)] = ph
    names = bytearray(b"\0")
    heads = [bytes(64)]
    for name, kind, data, link in list(sections) + [(".shstrtab", 3, None, 0)]:
        at = len(names)
        names += name.encode() + b"\0"
        if data is None:
            data = bytes(names)
        off = len(body)
        body += data
        heads.append(struct.pack("<IIQQQQIIQQ", at, kind, 0, 0, off, len(data), link, 0, 1, 24 if kind == 2 else 0))
    shoff = len(body)
    for h in heads:
        body += h
    first = segments[0][1] if segments else 0x100000
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry if entry is not None else first, 64, shoff, 0, 64, 56,
                        phnum, 64, len(heads), len(heads) - 1)
    body[:64] = ehdr
    return bytes(body)


def symtab(names):
    strtab = b"\0"
    syms = bytes(24)
    for n in names:
        syms += struct.pack("<IBBHQQ", len(strtab), 0x12, 0, 1, 0xffffffff81000000, 16)
        strtab += n.encode() + b"\0"
    return syms, strtab


def ikconfig(text):
    import gzip
    return b"IKCFG_ST" + gzip.compress(text.encode(), mtime=0) + b"IKCFG_ED"


def bzimage(payload, version=b"6.1.0-fuzz (capsule@seed) #1 SMP", setup_sects=1):
    """A bzImage (boot protocol 2.15): the setup header, then the payload
    in the protected-mode part."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1f1] = setup_sects
    setup[0x1fe:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = struct.pack("<H", 0x020f)
    setup[0x211] = 0x01  # LOADED_HIGH
    setup[0x214:0x218] = struct.pack("<I", 0x100000)
    setup[0x20e:0x210] = struct.pack("<H", 0x300 - 0x200)
    setup[0x300:0x300 + len(version) + 1] = version + b"\0"
    # The payload after a small stub in the protected-mode part.
    stub = b"\x90" * 16
    setup[0x248:0x250] = struct.pack("<II", len(stub), len(payload))
    return bytes(setup) + stub + payload


def lz4_legacy(data):
    """LZ4's legacy frame with one literals-only block."""
    n = len(data)
    token = min(n, 15) << 4
    block = bytes([token])
    if n >= 15:
        rest = n - 15
        block += b"\xff" * (rest // 255) + bytes([rest % 255])
    block += data
    return struct.pack("<I", 0x184C2102) + struct.pack("<I", len(block)) + block + struct.pack("<I", n)


def zstd_raw(data):
    """A zstd frame of one raw block (single segment, 2-byte content size)."""
    assert 256 <= len(data) < 65536 + 256
    return (struct.pack("<IB", 0xFD2FB528, 0x60) + struct.pack("<H", len(data) - 256)
            + struct.pack("<I", 1 | (len(data) << 3))[:3] + data)


def kernel_seeds():
    t = "kernel_image"
    MAP, DOCTOR = 1, 2
    text = b"\x90" * 0x60 + b"\xf4"  # nops, hlt
    pci_syms = ["start_kernel", "acpi_init", "pci_bus_type", "pci_msi_enabled", "virtio_pci_modern_probe"]
    syms, strs = symtab(pci_syms)
    banner = b"Linux version 6.1.0-fuzz (capsule@seed) #1 SMP\0"
    # A vmlinux with its symbol table: one segment that maps (file offset
    # and address agree modulo 4 KiB, above 1 MiB).
    vmlinux = elf64([(0x100, 0x100100, text, 0x2000)],
                    [(".text", 1, text, 0), (".symtab", 2, syms, 3), (".strtab", 3, strs, 0)])
    write(t, "elf-symtab", bytes([MAP | DOCTOR]) + vmlinux)
    # No symbol table: the embedded configuration in .rodata, a banner.
    config = "CONFIG_64BIT=y\nCONFIG_ACPI=y\nCONFIG_PCI=y\nCONFIG_PCI_MSI=y\nCONFIG_VIRTIO_PCI=y\n"
    rodata = banner + ikconfig(config)
    with_config = elf64([(0x100, 0x100100, text, 0x1000)], [(".text", 1, text, 0), (".rodata", 1, rodata, 0)])
    write(t, "elf-ikconfig", bytes([MAP | DOCTOR]) + with_config)
    no_acpi = elf64([(0x100, 0x100100, text, 0x1000)],
                    [(".rodata", 1, ikconfig("CONFIG_64BIT=y\n# CONFIG_ACPI is not set\nCONFIG_VIRTIO_PCI=m\n"), 0)])
    write(t, "elf-ikconfig-no-acpi", bytes([MAP]) + no_acpi)
    # Two segments a page apart, a bss; entry in the second.
    two = elf64([(0x80, 0x100080, text, 0x80 + len(text)), (0x1100, 0x102100, text[:32], 0x3000)],
                [(".symtab", 2, *symtab(["acpi_init"])[:1], 2), (".strtab", 3, symtab(["acpi_init"])[1], 0)],
                entry=0x102100)
    write(t, "elf-two-segments", bytes([MAP]) + two)
    # Segments that cannot be mapped page for page (offset and address
    # disagree; two in one page): the copy loads them.
    write(t, "elf-unmappable", bytes([MAP]) + elf64([(0x100, 0x100200, text, 0x100), (0x200, 0x100300, text, 0x100)]))
    # A PVH entry note, as Linux's vmlinux has.
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    write(t, "elf-pvh-note", bytes([MAP]) + elf64([(0x100, 0x100100, text, 0x1000)], notes=note))
    # bzImages: the vmlinux with its configuration as the payload, stored
    # as it is and compressed in each way `capsule doctor` reads.
    import gzip
    import lzma
    payload = with_config
    write(t, "bzimage-gzip", bytes([DOCTOR]) + bzimage(gzip.compress(payload, mtime=0)))
    write(t, "bzimage-xz", bytes([DOCTOR]) + bzimage(lzma.compress(payload, format=lzma.FORMAT_XZ,
                                                                  check=lzma.CHECK_CRC32)))
    write(t, "bzimage-zstd", bytes([DOCTOR]) + bzimage(zstd_raw(payload)))
    write(t, "bzimage-lz4", bytes([DOCTOR]) + bzimage(lz4_legacy(payload)))
    write(t, "bzimage-none", bytes([MAP | DOCTOR]) + bzimage(payload))
    # Empty LZ4 blocks, then the vmlinux: each block used to cost doctor
    # 8 MiB of zeroing (src/doctor/kernel.rs, lz4_legacy).
    empty = struct.pack("<I", 0x184C2102) + (struct.pack("<I", 1) + b"\0") * 1000
    write(t, "bzimage-lz4-empty-blocks", bytes([DOCTOR]) + bzimage(empty + lz4_legacy(payload)[4:]))
    write(t, "not-a-kernel", bytes([MAP | DOCTOR]) + b"MZ\x90\0 not a kernel" + bytes(64))


blk_seeds()
net_seeds()
console_seeds()
balloon_seeds()
rng_seeds()
mmio_seeds()
http_seeds()
config_seeds()
cli_seeds()
exec_seeds()
vsock_seeds()
fs_seeds()
pci_seeds()
kernel_seeds()
