#!/usr/bin/env python3
"""Conformance test of the ZTM wire protocol, as an independent implementer meets it.

Written from PROTOCOL.md alone, with a general-purpose HTTP/2 library (the `h2` package) over
Python's `ssl` module; it shares no code with the project. It starts `ztm ca`, two `ztm hub`s
and a real `ztm agent` as processes on 127.0.0.1, gets certificates from the CA over HTTP and
computes endpoint ids itself, then plays endpoints against the hub: registering, heartbeats,
publishing, lists, tunnels both ways (to a service of the real agent, and from the real agent to
a service this endpoint publishes on its own reverse connection), management, every documented
error status, the GOAWAY frames the hub closes connections with, and how the hub's HTTP/2
server meets RFC 9113 for frames an agent may send it.

    python3 tests/conformance/run.py target/release/ztm

One line per check; the last line is "N passed, N failed". Exits 1 if any check failed.
"""

import hashlib
import json
import os
import queue
import secrets
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings
    import hpack
except ImportError:
    sys.exit("conformance: the h2 package is missing (pip install -r tests/conformance/requirements.txt)")

MESH = "conf"

# HTTP/2 (RFC 9113 §6, RFC 8441 §3).
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 5, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
S_ENABLE_PUSH, S_MAX_STREAMS, S_WINDOW, S_MAX_FRAME, S_MAX_HEADER_LIST = 2, 3, 4, 5, 6
S_ENABLE_CONNECT_PROTOCOL = 8
CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
         5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
         11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def code_name(code):
    return CODES.get(code, hex(code))


class CheckFailed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise CheckFailed(what)


def equal(got, want, what):
    if got != want:
        raise CheckFailed(f"{what}: got {got!r}, want {want!r}")


# ---------------------------------------------------------------------------------------------
# Identity (PROTOCOL.md, "Identity")

def endpoint_id(user, nonce):
    """The first 128 bits of SHA-256 over "ztm endpoint id\\n" + user + "\\n" + nonce, as a
    version-8 UUID (RFC 9562: version and variant bits set) in lower case."""
    digest = bytearray(hashlib.sha256(b"ztm endpoint id\n" + user.encode() + b"\n" + nonce.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


def new_nonce():
    return secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# Processes

class World:
    """The CA, the hubs and the agent, and what the checks share."""

    def __init__(self, ztm):
        self.ztm = os.path.abspath(ztm)
        self.dir = tempfile.mkdtemp(prefix="ztm-conformance-")
        self.procs = []
        self.users = {}

    def free_port(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def spawn(self, name, args):
        log = open(os.path.join(self.dir, name + ".log"), "ab")
        env = dict(os.environ, HOME=self.dir, ZTM_LOG="debug")
        p = subprocess.Popen([self.ztm] + args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                             cwd=self.dir, env=env)
        self.procs.append(p)
        return p

    @staticmethod
    def wait_port(port, within=20):
        deadline = time.time() + within
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise CheckFailed(f"nothing listens on port {port}")

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def http(self, port, method, path, body=None, timeout=10):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def start(self):
        self.ca_port = self.free_port()
        self.spawn("ca", ["ca", "--listen", f"127.0.0.1:{self.ca_port}", "--database",
                          os.path.join(self.dir, "ca.db")])
        self.wait_port(self.ca_port)
        status, pem = self.http(self.ca_port, "GET", "/api/certificates/ca")
        equal(status, 200, "CA certificate")
        self.ca_pem = pem.decode()
        for user in ["root", "alice", "bob", "carol", "dave", "erin", "frank", "gina", "hal"]:
            self.user(user)
        self.hub_port = self.free_port()
        self.spawn("hub", ["hub", "--listen", f"127.0.0.1:{self.hub_port}", "--ca",
                           f"127.0.0.1:{self.ca_port}", "--name", f"127.0.0.1:{self.hub_port}",
                           "--max-endpoints-per-user", "3"])
        self.full_port = self.free_port()
        self.spawn("hub-full", ["hub", "--listen", f"127.0.0.1:{self.full_port}", "--ca",
                                f"127.0.0.1:{self.ca_port}", "--name", f"127.0.0.1:{self.full_port}",
                                "--max-endpoints", "2"])
        self.agent_port = self.free_port()
        self.spawn("agent", ["agent", "--listen", f"127.0.0.1:{self.agent_port}", "--database",
                             os.path.join(self.dir, "agent.db")])
        self.wait_port(self.hub_port)
        self.wait_port(self.full_port)
        self.wait_port(self.agent_port)

    def user(self, name):
        if name not in self.users:
            status, key = self.http(self.ca_port, "POST", f"/api/certificates/{name}", b"")
            equal(status, 200, f"creating user {name}")
            status, cert = self.http(self.ca_port, "GET", f"/api/certificates/{name}")
            equal(status, 200, f"certificate of {name}")
            certfile = os.path.join(self.dir, f"{name}.crt")
            keyfile = os.path.join(self.dir, f"{name}.key")
            with open(certfile, "wb") as f:
                f.write(cert)
            with open(keyfile, "wb") as f:
                f.write(key)
            self.users[name] = (certfile, keyfile, cert.decode(), key.decode())
        return self.users[name]

    def tls(self, user, alpn):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.ca_pem)
        certfile, keyfile, _, _ = self.user(user)
        ctx.load_cert_chain(certfile, keyfile)
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def dial(self, user, alpn, port=None):
        """A TLS connection to the hub as `user` offering ALPN `alpn` (a list, or None)."""
        ctx = self.tls(user, alpn)
        sock = socket.create_connection(("127.0.0.1", port or self.hub_port), timeout=10)
        tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        subject = dict(x[0] for x in tls.getpeercert()["subject"])
        expect(subject.get("commonName", "").startswith("hub/"), f"the hub's certificate: {subject}")
        return tls


# ---------------------------------------------------------------------------------------------
# An HTTP/2 connection with the h2 package, driven by one thread (reads and writes)

class Closed(Exception):
    pass


class Stream:
    def __init__(self, conn, sid, headers=None):
        self.conn, self.sid = conn, sid
        self.events = queue.Queue()
        self.headers = headers  # a request's (server side)
        self.reset = None

    def next(self, timeout):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise CheckFailed(f"stream {self.sid}: nothing within {timeout} s")

    def response(self, timeout=12):
        """The response headers (a dict, ':status' as an int)."""
        while True:
            ev = self.next(timeout)
            if ev[0] == "response":
                h = dict(ev[1])
                h[":status"] = int(h[":status"])
                return h
            if ev[0] in ("reset", "closed"):
                raise CheckFailed(f"stream {self.sid} {ev[0]} before an answer: {ev[1:]}")

    def read(self, timeout=10):
        """The next data, or None at the stream's end; raises on a reset."""
        while True:
            ev = self.next(timeout)
            if ev[0] == "data":
                return ev[1]
            if ev[0] == "end":
                return None
            if ev[0] == "reset":
                self.reset = ev[1]
                raise CheckFailed(f"stream {self.sid} reset: {code_name(ev[1])}")
            if ev[0] == "closed":
                raise CheckFailed(f"stream {self.sid}: connection closed")

    def body(self, timeout=10):
        out = b""
        while True:
            chunk = self.read(timeout)
            if chunk is None:
                return out
            out += chunk

    def read_exactly(self, n, timeout=10):
        out = b""
        while len(out) < n:
            chunk = self.read(timeout)
            if chunk is None:
                raise CheckFailed(f"stream {self.sid} ended after {len(out)} of {n} bytes")
            out += chunk
        return out

    def after_answer(self, timeout=5):
        """What ends the stream after its answer: ('end',) or ('reset', code)."""
        while True:
            ev = self.next(timeout)
            if ev[0] in ("end", "reset", "closed"):
                return ev

    def send(self, data, end=False):
        self.conn.send_data(self.sid, data, end)

    def end(self):
        self.conn.send_data(self.sid, b"", True)


class Conn:
    def __init__(self, w, user, alpn="h2", server=False, settings=None, on_request=None, port=None,
                 sock=None):
        # `sock`: a connection already dialled (a reverse connection started on demand).
        self.sock = sock or w.dial(user, [alpn], port)
        self.sock.setblocking(False)
        config = h2.config.H2Configuration(client_side=not server, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        values = {S_MAX_FRAME: 16384}
        values.update(settings or {})
        self.h2.local_settings = h2.settings.Settings(client=not server, initial_values=values)
        self.lock = threading.Condition(threading.RLock())
        self.streams = {}
        self.remote = {}
        self.remote_seen = threading.Event()
        self.goaway = None  # (code, last stream id, debug text)
        self.closed = threading.Event()
        self.pings = set()
        self.on_request = on_request
        self.injected = b""
        self.outbuf = bytearray()
        self.wake_r, self.wake_w = os.pipe()
        with self.lock:
            self.h2.initiate_connection()
        threading.Thread(target=self._loop, daemon=True).start()

    # -- the I/O thread

    def _loop(self):
        try:
            while True:
                wlist = [self.sock] if self.outbuf else []
                r, _, _ = select.select([self.sock, self.wake_r], wlist, [], 0.5)
                if self.wake_r in r:
                    os.read(self.wake_r, 4096)
                while True:
                    try:
                        data = self.sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        break
                    except OSError:
                        data = b""
                    if not data:
                        return
                    with self.lock:
                        try:
                            events = self.h2.receive_data(data)
                        except h2.exceptions.ProtocolError as e:
                            self.error = e
                            events = []
                        for ev in events:
                            self._event(ev)
                        self.lock.notify_all()
                with self.lock:
                    self.outbuf += self.injected + self.h2.data_to_send()
                    self.injected = b""
                while self.outbuf:
                    try:
                        n = self.sock.send(self.outbuf[:262144])
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        break
                    del self.outbuf[:n]
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                for s in self.streams.values():
                    s.events.put(("closed",))
                self.lock.notify_all()
            self.closed.set()
            try:
                self.sock.close()
            except OSError:
                pass

    def _event(self, ev):
        E = h2.events
        if isinstance(ev, E.RemoteSettingsChanged):
            for k, v in ev.changed_settings.items():
                self.remote[int(k)] = v.new_value
            self.remote_seen.set()
        elif isinstance(ev, E.RequestReceived):
            st = Stream(self, ev.stream_id, dict(ev.headers))
            self.streams[ev.stream_id] = st
            if ev.stream_ended:
                st.events.put(("end",))
            if self.on_request:
                threading.Thread(target=self._serve, args=(st,), daemon=True).start()
        elif isinstance(ev, E.ResponseReceived):
            self.streams[ev.stream_id].events.put(("response", ev.headers))
        elif isinstance(ev, E.DataReceived):
            self.streams[ev.stream_id].events.put(("data", ev.data))
            try:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
        elif isinstance(ev, E.StreamEnded):
            self.streams[ev.stream_id].events.put(("end",))
        elif isinstance(ev, E.StreamReset):
            if ev.stream_id in self.streams:
                self.streams[ev.stream_id].events.put(("reset", ev.error_code))
        elif isinstance(ev, E.ConnectionTerminated):
            text = (ev.additional_data or b"").decode(errors="replace")
            # The first GOAWAY is the one a peer acts on: it must say why.
            if self.goaway is None:
                self.goaway = (int(ev.error_code), ev.last_stream_id, text)
        elif isinstance(ev, E.PingAckReceived):
            self.pings.add(ev.ping_data)

    def _serve(self, st):
        try:
            self.on_request(self, st)
        except (CheckFailed, h2.exceptions.H2Error, Closed, OSError):
            pass

    # -- for other threads

    def kick(self):
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def request(self, method, path, headers=(), body=b"", end=True, protocol=None, authority="ztm"):
        hdrs = [(":method", method)]
        if protocol:
            hdrs.append((":protocol", protocol))
        hdrs += [(":scheme", "https"), (":authority", authority), (":path", path)]
        hdrs += list(headers)
        with self.lock:
            sid = self.h2.get_next_available_stream_id()
            st = Stream(self, sid)
            self.streams[sid] = st
            self.h2.send_headers(sid, hdrs, end_stream=(end and not body))
        self.kick()
        if body:
            self.send_data(sid, body, end)
        return st

    def call(self, method, path, headers=(), body=b"", timeout=12):
        """One request: (status, headers, body bytes)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = [("content-type", "application/json")] + list(headers)
        st = self.request(method, path, headers, body)
        h = st.response(timeout)
        return h[":status"], h, st.body(timeout)

    def send_data(self, sid, data, end=False, within=15):
        deadline = time.time() + within
        data = bytes(data)
        while True:
            with self.lock:
                if self.closed.is_set():
                    raise Closed()
                try:
                    window = self.h2.local_flow_control_window(sid)
                    n = min(len(data), window, self.h2.max_outbound_frame_size)
                    if n > 0 or not data:
                        self.h2.send_data(sid, data[:n], end_stream=(end and n == len(data)))
                except h2.exceptions.StreamClosedError:
                    # The peer answered and reset the stream before the whole body was sent
                    # (a refusal need not read the body): its answer says why.
                    return
                if n > 0 or not data:
                    data = data[n:]
                    self.kick()
                    if not data:
                        return
                    continue
                if time.time() > deadline:
                    raise CheckFailed(f"stream {sid}: no window to send within {within} s")
                self.lock.wait(0.2)

    def respond(self, sid, status, headers=(), body=b"", end=True):
        with self.lock:
            self.h2.send_headers(sid, [(":status", str(status))] + list(headers),
                                 end_stream=(end and not body))
        self.kick()
        if body:
            self.send_data(sid, body, end)

    def respond_json(self, sid, status, value):
        self.respond(sid, status, [("content-type", "application/json")], json.dumps(value).encode())

    def raw(self, data):
        """Bytes written as they are, after what h2 has queued."""
        with self.lock:
            self.injected += self.h2.data_to_send() + data
        self.kick()

    def ping(self, within=5):
        payload = secrets.token_bytes(8)
        with self.lock:
            self.h2.ping(payload)
        self.kick()
        deadline = time.time() + within
        with self.lock:
            while payload not in self.pings:
                if self.closed.is_set() or time.time() > deadline:
                    return False
                self.lock.wait(0.1)
        return True

    def wait_goaway(self, within=10):
        """The (first) GOAWAY the hub closed the connection with: (code, last stream id, text)."""
        if not self.closed.wait(within):
            raise CheckFailed(f"the connection did not close within {within} s")
        expect(self.goaway is not None, "the connection closed without a GOAWAY")
        return self.goaway

    def close(self):
        try:
            with self.lock:
                self.h2.close_connection()
            self.kick()
            self.closed.wait(2)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


def json_of(body):
    try:
        return json.loads(body)
    except ValueError:
        raise CheckFailed(f"not JSON: {body[:200]!r}")


# ---------------------------------------------------------------------------------------------
# An endpoint of our own: control connection, registration, reverse connection

class Endpoint:
    def __init__(self, w, user, name, services=None):
        self.w, self.user, self.name = w, user, name
        self.nonce = new_nonce()
        self.id = endpoint_id(user, self.nonce)
        self.services = services or []
        self.control = None
        self.token = None
        self.reverses = []
        self.seen = []  # requests the hub sent on our reverse connections (headers)
        self.hello_answer = None  # None: the right one; else (status, body)

    def connect(self):
        self.control = Conn(self.w, self.user, "h2")
        return self.control

    def register(self, control=None, services=None, version="1"):
        control = control or self.control
        headers = [("ztm-protocol", version)] if version else []
        body = {"name": self.name, "services": self.services if services is None else services,
                "nonce": self.nonce}
        status, h, raw = control.call("POST", f"/api/endpoints/{self.id}", headers, body)
        if status == 200:
            answer = json_of(raw)
            self.token = answer["session"]
            return status, h, answer
        return status, h, json_of(raw)

    def dial_reverse(self, connect_protocol=True, token=None, handler=None):
        settings = {S_ENABLE_CONNECT_PROTOCOL: 1} if connect_protocol else {}
        tok = token or self.token

        def serve(conn, st):
            h = st.headers
            self.seen.append(h)
            if h[":method"] == "GET" and h[":path"] == "/api/hello":
                if self.hello_answer is None:
                    conn.respond_json(st.sid, 200, {"endpoint": self.id, "session": tok})
                elif self.hello_answer == "never":
                    return
                else:
                    status, body = self.hello_answer
                    conn.respond(st.sid, status, [("content-type", "application/json")], body)
                return
            (handler or self.handle)(conn, st)

        rev = Conn(self.w, self.user, "ztm-reverse", server=True, settings=settings, on_request=serve)
        self.reverses.append(rev)
        return rev

    def handle(self, conn, st):
        """Tunnels: an upper-casing echo; management: an echo of the request as JSON."""
        h = st.headers
        if h[":method"] == "CONNECT":
            conn.respond(st.sid, 200, end=False)
            while True:
                chunk = st.read(20)
                if chunk is None:
                    st.end()
                    return
                st.send(chunk.upper())
        body = st.body(10) if ":method" in h and h[":method"] in ("POST", "PUT") else b""
        if h[":path"].startswith("/api/services/html"):
            conn.respond(st.sid, 200, [("content-type", "text/html")], b"<script>alert(1)</script>")
        elif h[":path"].startswith("/api/services/slow"):
            time.sleep(12)
        else:
            conn.respond_json(st.sid, 200, {"method": h[":method"], "path": h[":path"],
                                            "headers": h, "body": body.decode(errors="replace")})


# ---------------------------------------------------------------------------------------------
# Raw frames, for what a library would not send (RFC 9113 checks)

def frame(kind, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def settings_payload(pairs):
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs)


class Raw:
    """A control connection driven frame by frame."""

    def __init__(self, w, user="carol", settings=()):
        self.sock = w.dial(user, ["h2"])
        self.sock.settimeout(0.5)
        self.buf = b""
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.hub_settings = {}
        self.eof = False
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings_payload(settings)))

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            # The hub closed the connection while we were still sending: what it said before is
            # still to be read.
            pass

    def frame(self, within=5):
        """The next frame (kind, flags, stream, payload, decoded headers), or None at the end."""
        deadline = time.time() + within
        while True:
            if len(self.buf) >= 9:
                length = struct.unpack(">I", b"\0" + self.buf[:3])[0]
                if len(self.buf) >= 9 + length:
                    kind, flags = self.buf[3], self.buf[4]
                    sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
                    payload = self.buf[9:9 + length]
                    self.buf = self.buf[9 + length:]
                    headers = None
                    if kind == HEADERS:
                        headers = dict(self.dec.decode(payload))
                    return kind, flags, sid, payload, headers
            if self.eof:
                return None
            if time.time() > deadline:
                raise CheckFailed(f"no frame within {within} s")
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data

    def until(self, pred, within=5, what="a frame"):
        """Reads frames (answering the hub's SETTINGS) until `pred` holds for one."""
        deadline = time.time() + within
        while True:
            f = self.frame(max(0.1, deadline - time.time()))
            if f is None:
                raise CheckFailed(f"the connection closed before {what}")
            kind, flags, sid, payload, _ = f
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    k, v = struct.unpack(">HI", payload[i:i + 6])
                    self.hub_settings[k] = v
                self.send(frame(SETTINGS, ACK, 0))
            if pred(f):
                return f
            if time.time() > deadline:
                raise CheckFailed(f"no {what} within {within} s")

    def settled(self):
        """Waits for the hub's SETTINGS and its ACK of ours."""
        self.until(lambda f: f[0] == SETTINGS and f[1] & ACK, what="a SETTINGS ACK")
        return self

    def headers(self, sid, hdrs, end_stream=False):
        block = self.enc.encode(hdrs)
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block))

    def goaway(self, within=5):
        f = self.until(lambda f: f[0] == GOAWAY, within, "a GOAWAY")
        last, code = struct.unpack(">II", f[3][:8])
        return code, last & 0x7FFFFFFF, f[3][8:].decode(errors="replace")

    def error(self, within=5):
        """The first RST_STREAM or GOAWAY: ('RST_STREAM'|'GOAWAY', code name, stream)."""
        f = self.until(lambda f: f[0] in (RST_STREAM, GOAWAY), within, "an RST_STREAM or a GOAWAY")
        if f[0] == RST_STREAM:
            return "RST_STREAM", code_name(struct.unpack(">I", f[3][:4])[0]), f[2]
        return "GOAWAY", code_name(struct.unpack(">I", f[3][4:8])[0]), 0

    def alive(self):
        payload = secrets.token_bytes(8)
        self.send(frame(PING, 0, 0, payload))
        f = self.until(lambda f: f[0] == PING and f[1] & ACK, what="a PING ACK")
        return f[3] == payload

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def request_headers(method, path, protocol=None):
    h = [(":method", method)]
    if protocol:
        h.append((":protocol", protocol))
    return h + [(":scheme", "https"), (":authority", "ztm"), (":path", path)]


# ---------------------------------------------------------------------------------------------
# The checks

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


class Background:
    """A check that waits for a timer of the hub, run beside the others."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.fn()
        except Exception as e:  # reported at the end
            self.error = e if isinstance(e, CheckFailed) else CheckFailed(traceback.format_exc())


def echo_server():
    """A TCP service that echoes what it reads and closes when its client does."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve(c):
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                c.sendall(data)

    def accept():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def until(within, what, fn, every=0.1):
    deadline = time.time() + within
    while True:
        got = fn()
        if got:
            return got
        if time.time() > deadline:
            raise CheckFailed(f"{what}: not within {within} s")
        time.sleep(every)


def join_agent(w):
    """The real agent joins as root and publishes an echo service."""
    _, _, cert, key = w.user("root")
    status, body = w.http(w.agent_port, "POST", f"/api/meshes/{MESH}", {
        "ca": w.ca_pem, "agent": {"name": "real", "certificate": cert, "privateKey": key},
        "bootstraps": [f"127.0.0.1:{w.hub_port}"]})
    expect(status in (200, 201), f"join: {status} {body[:300]!r}")
    status, body = w.http(w.agent_port, "GET", f"/api/meshes/{MESH}")
    w.agent_id = json_of(body)["agent"]["id"]
    w.echo_port = echo_server()
    status, body = w.http(w.agent_port, "POST",
                          f"/api/meshes/{MESH}/endpoints/{w.agent_id}/services/tcp/echo",
                          {"host": "127.0.0.1", "port": w.echo_port})
    expect(status in (200, 201), f"publish echo: {status} {body[:300]!r}")


def services_of(conn):
    status, _, body = conn.call("GET", "/api/services")
    equal(status, 200, "GET /api/services")
    return json_of(body)


@check
def tls_and_alpn(w):
    """TLS 1.3 with ALPN h2 or ztm-reverse; no ALPN and unknown ALPN are refused in the handshake."""
    for alpn in ("h2", "ztm-reverse"):
        s = w.dial("alice", [alpn])
        equal(s.selected_alpn_protocol(), alpn, "ALPN")
        equal(s.version(), "TLSv1.3", "TLS version")
        s.close()
    for offer, alert in ((["http/1.1"], "NO_APPLICATION_PROTOCOL"), (None, "ACCESS_DENIED")):
        try:
            s = w.dial("alice", offer)
            s.recv(1)
            raise CheckFailed(f"a client offering {offer} was let in")
        except ssl.SSLError as e:
            expect(alert in str(e).upper().replace(" ", "_"), f"alert for {offer}: {e}")


@check
def settings_of_the_control_connection(w):
    """The hub's SETTINGS and connection window (PROTOCOL.md, "HTTP/2 on both connections")."""
    raw = Raw(w)
    raw.settled()
    s = raw.hub_settings
    equal(s.get(S_ENABLE_CONNECT_PROTOCOL), 1, "SETTINGS_ENABLE_CONNECT_PROTOCOL")
    equal(s.get(S_WINDOW), 2 << 20, "SETTINGS_INITIAL_WINDOW_SIZE")
    equal(s.get(S_MAX_FRAME), 65536, "SETTINGS_MAX_FRAME_SIZE")
    equal(s.get(S_MAX_STREAMS), 16384, "SETTINGS_MAX_CONCURRENT_STREAMS")
    equal(s.get(S_MAX_HEADER_LIST), 16384, "SETTINGS_MAX_HEADER_LIST_SIZE")
    raw.close()
    raw = Raw(w)
    f = raw.until(lambda f: f[0] == WINDOW_UPDATE and f[2] == 0, what="a connection WINDOW_UPDATE")
    equal(struct.unpack(">I", f[3])[0] + 65535, 128 << 20, "connection window")
    raw.close()


@check
def register_heartbeat_publish_list(w):
    """Registration (with the protocol version), heartbeats, publishing, the lists."""
    ep = Endpoint(w, "alice", "py-alice", [{"protocol": "tcp", "name": "pysvc"}])
    w.alice = ep
    ep.connect()
    status, headers, answer = ep.register()
    equal(status, 200, f"registration {answer}")
    equal(headers.get("ztm-protocol"), "1", "the version in the registration answer")
    expect(answer["hub"].startswith("hub/"), f"hub name {answer}")
    expect(len(answer["session"]) > 0, "a session token")
    status, _, body = ep.control.call("POST", f"/api/endpoints/{ep.id}/heartbeat")
    equal(status, 204, f"heartbeat {body!r}")
    services = [{"protocol": "tcp", "name": "pysvc"},
                {"protocol": "tcp", "name": "private", "users": ["root"]},
                {"protocol": "udp", "name": "dns"}]
    status, _, body = ep.control.call("POST", f"/api/endpoints/{ep.id}/services", body=services)
    equal(status, 204, f"publish {body!r}")
    status, _, body = ep.control.call("GET", "/api/endpoints")
    equal(status, 200, "GET /api/endpoints")
    mine = [e for e in json_of(body) if e["id"] == ep.id]
    expect(mine and mine[0]["online"] and mine[0]["username"] == "alice", f"listed: {mine}")
    equal(mine[0]["ip"], "127.0.0.1", "own address shown to its user")
    listed = {(s["protocol"], s["name"]) for s in services_of(ep.control)
              if any(e["id"] == ep.id for e in s["endpoints"])}
    expect(("tcp", "pysvc") in listed and ("udp", "dns") in listed, f"services: {listed}")
    expect(("tcp", "private") in listed, "its owner sees a provider with a users list")
    # Another user sees neither alice's address nor a provider that does not admit it.
    dave = Conn(w, "dave")
    others = [e for e in json_of(dave.call("GET", "/api/endpoints")[2]) if e["id"] == ep.id]
    equal((others[0]["ip"], others[0]["port"]), ("", 0), "address hidden from other users")
    listed = {(s["protocol"], s["name"]) for s in services_of(dave)
              if any(e["id"] == ep.id for e in s["endpoints"])}
    expect(("tcp", "private") not in listed, "a provider that does not admit dave is not listed to him")
    expect(("tcp", "pysvc") in listed, f"services dave sees: {listed}")
    dave.close()


@check
def reverse_connection_and_hello(w):
    """The reverse connection: the hub's SETTINGS, its hello, how its requests look."""
    ep = w.alice
    rev = ep.dial_reverse()
    until(5, "the hub's hello", lambda: any(h[":path"] == "/api/hello" for h in ep.seen))
    expect(rev.remote_seen.wait(5), "SETTINGS from the hub")
    equal(rev.remote.get(S_ENABLE_PUSH), 0, "the hub sends SETTINGS_ENABLE_PUSH = 0")
    equal(rev.remote.get(S_WINDOW), 2 << 20, "SETTINGS_INITIAL_WINDOW_SIZE on the reverse connection")
    hello = [h for h in ep.seen if h[":path"] == "/api/hello"][0]
    equal((hello[":scheme"], hello[":authority"]), ("https", "ztm"), "hello pseudo-headers")


@check
def tunnel_to_the_real_agent(w):
    """CONNECT ztm-tunnel to a service of the real agent, with optimistic data."""
    ep = w.alice
    until(20, "the agent's echo service is listed",
          lambda: any(s["name"] == "echo" and any(e["id"] == w.agent_id for e in s["endpoints"])
                      for s in services_of(ep.control)))
    st = ep.control.request("CONNECT", f"/api/endpoints/{w.agent_id}/services/tcp/echo",
                            [("ztm-endpoint-user", "root")], end=False, protocol="ztm-tunnel")
    st.send(b"first bytes\n")  # before the answer
    h = st.response()
    equal(h[":status"], 200, "tunnel answer")
    equal(st.read_exactly(12), b"first bytes\n", "optimistic data echoed")
    st.send(b"x" * 200000)
    equal(st.read_exactly(200000), b"x" * 200000, "200 kB echoed")
    st.end()
    equal(st.body(), b"", "the half-close comes back as END_STREAM")


@check
def tunnel_from_the_real_agent(w):
    """The real agent's port reaches the service this endpoint publishes on its reverse
    connection: the hub's extended CONNECT and its headers."""
    ep = w.alice
    port = w.free_port()
    status, body = w.http(w.agent_port, "POST",
                          f"/api/meshes/{MESH}/endpoints/{w.agent_id}/ports/127.0.0.1/tcp/{port}",
                          {"target": {"service": "pysvc", "endpoint": ep.id}})
    expect(status in (200, 201), f"port: {status} {body[:300]!r}")

    def roundtrip():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"ping\n")
                return s.recv(100) == b"PING\n"
        except OSError:
            return False

    until(20, "a connection through the agent's port is echoed by our service", roundtrip, 0.3)
    tunnel = [h for h in ep.seen if h[":method"] == "CONNECT"][-1]
    equal(tunnel.get(":protocol"), "ztm-tunnel", ":protocol")
    equal(tunnel[":path"], "/api/services/tcp/pysvc", ":path")
    equal((tunnel[":scheme"], tunnel[":authority"]), ("https", "ztm"), ":scheme and :authority")
    equal(tunnel.get("ztm-user"), "root", "ztm-user")


@check
def management(w):
    """Forwarded management: what passes through, JSON only, statuses."""
    ep = w.alice
    root = Conn(w, "root")
    w.root = root
    status, _, body = root.call("GET", f"/api/endpoints/{w.agent_id}/manage/services")
    equal(status, 200, f"managing the real agent {body[:200]!r}")
    expect(any(s["name"] == "echo" for s in json_of(body)), f"its services: {body[:300]!r}")
    st = root.request("POST", f"/api/endpoints/{ep.id}/manage/services/tcp/x?a=1&b=2",
                      [("content-type", "application/json"), ("x-extra", "1"),
                       ("ztm-endpoint-user", "alice")], b'{"k": 1}')
    h = st.response()
    equal(h[":status"], 200, "forwarded")
    equal(h.get("content-type"), "application/json", "relayed as JSON")
    seen = json_of(st.body())
    equal(seen["path"], "/api/services/tcp/x?a=1&b=2", "path and query passed on")
    equal(seen["method"], "POST", "method")
    equal(seen["body"], '{"k": 1}', "body")
    passed = {k for k in seen["headers"] if not k.startswith(":")}
    equal(passed - {"content-length"}, {"content-type", "ztm-user"}, "headers passed on")
    equal(seen["headers"]["ztm-user"], "root", "ztm-user")
    status, _, body = root.call("GET", f"/api/endpoints/{ep.id}/manage/services/html")
    equal(status, 502, "an answer that is not JSON")
    expect(b"not JSON" in body, body)
    status, _, body = ep.control.call("GET", f"/api/endpoints/{w.agent_id}/manage/services")
    equal(status, 403, f"alice managing root's endpoint {body!r}")
    status, _, body = root.call("GET", f"/api/endpoints/{endpoint_id('nobody', new_nonce())}/manage/services")
    equal(status, 404, f"an endpoint not online {body!r}")
    status, _, body = root.call("GET", f"/api/endpoints/{ep.id}/manage/services",
                                [("ztm-endpoint-user", "dave")])
    equal(status, 404, f"known by another user {body!r}")
    expect(b"of user dave" in body, body)
    big = b"[" + b"0," * (1 << 19) + b"0]"
    st = root.request("POST", f"/api/endpoints/{ep.id}/manage/services", [("content-type", "application/json")], big)
    equal(st.response()[":status"], 413, "a management body over 1 MiB")


@check
def error_statuses_of_registration(w):
    """Every documented refusal of POST /api/endpoints/{id}, heartbeats and publishing."""
    dave = Conn(w, "dave")
    nonce = new_nonce()
    good = endpoint_id("dave", nonce)

    def register(id_, body, headers=()):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        status, _, raw = dave.call("POST", f"/api/endpoints/{id_}",
                                   [("content-type", "application/json")] + list(headers), body)
        answer = json_of(raw)
        equal(answer.get("status"), status, "the error body's status")
        return status, answer.get("message", "")

    base = {"name": "d1", "services": [], "nonce": nonce}
    cases = [
        ("upper-case id", good.upper(), base, 400),
        ("not a UUID", "not-an-id", base, 400),
        ("body not JSON", good, b"{", 400),
        ("bad name", good, dict(base, name="bad name!"), 400),
        ("name too long", good, dict(base, name="n" * 65), 400),
        ("no nonce", good, {"name": "d1", "services": []}, 400),
        ("bad nonce", good, dict(base, nonce="XYZ"), 400),
        ("unknown transport", good, dict(base, services=[{"protocol": "sctp", "name": "x"}]), 400),
        ("bad service name", good, dict(base, services=[{"protocol": "tcp", "name": "-x"}]), 400),
        ("a service twice", good, dict(base, services=[{"protocol": "tcp", "name": "x"}] * 2), 400),
        ("1,001 services", good, dict(base, services=[{"protocol": "tcp", "name": f"s{i}"} for i in range(1001)]), 400),
        ("1,001 users", good, dict(base, services=[{"protocol": "tcp", "name": "x", "users": [f"u{i}" for i in range(1001)]}]), 400),
        ("id of another user", endpoint_id("root", nonce), base, 403),
        ("body over 256 KiB", good, dict(base, pad="x" * (256 * 1024)), 413),
    ]
    for what, id_, body, want in cases:
        status, message = register(id_, body)
        equal(status, want, f"{what} ({message})")
    status, message = register(good, base, [("ztm-protocol", "2")])
    equal(status, 400, f"an unknown newer protocol version ({message})")
    expect("version 1" in message, message)
    status, h, _ = dave.call("POST", f"/api/endpoints/{good}", [("ztm-protocol", "2")], base)
    equal(h.get("ztm-protocol"), "1", "the version the hub speaks, in the refusal")
    status, h, raw = dave.call("POST", f"/api/endpoints/{good}", [("ztm-protocol", "2, 1")], base)
    equal((status, h.get("ztm-protocol")), (200, "1"), f"versions 2 and 1 offered {raw!r}")
    other = endpoint_id("dave", new_nonce())
    n2 = new_nonce()
    status, message = register(endpoint_id("dave", n2), dict(base, nonce=n2))
    equal(status, 409, f"a second id on one connection ({message})")
    for path in (f"/api/endpoints/{other}/heartbeat", f"/api/endpoints/{other}/services"):
        status, _, raw = dave.call("POST", path, body=[])
        equal(status, 404, f"{path} for an id not registered here")
        expect(b"no such session; register again" in raw, raw)
    for method, path in (("GET", "/api/nothing"), ("PUT", "/api/endpoints"),
                         ("DELETE", f"/api/endpoints/{good}"), ("PATCH", "/api/services")):
        status, _, raw = dave.call(method, path)
        equal(status, 404, f"{method} {path}")
    # The user's share of endpoints (this hub: 3 per user).
    conns = [dave]
    for i in range(3):
        c = Conn(w, "dave")
        conns.append(c)
        n = new_nonce()
        status, _, raw = c.call("POST", f"/api/endpoints/{endpoint_id('dave', n)}",
                                body={"name": f"d{i + 2}", "services": [], "nonce": n})
        equal(status, 200 if i < 2 else 429, f"endpoint {i + 2} of dave {raw!r}")
    for c in conns:
        c.close()
    # A hub that keeps 2 endpoints.
    full = []
    for i in range(3):
        c = Conn(w, "dave", port=w.full_port)
        full.append(c)
        n = new_nonce()
        status, _, raw = c.call("POST", f"/api/endpoints/{endpoint_id('dave', n)}",
                                body={"name": f"f{i}", "services": [], "nonce": n})
        equal(status, 200 if i < 2 else 503, f"endpoint {i + 1} at a full hub {raw!r}")
    expect(b"the hub is full" in raw, raw)
    for c in full:
        c.close()


@check
def error_statuses_of_tunnels(w):
    """Every documented refusal of a tunnel CONNECT; RST_STREAM(NO_ERROR) after an error."""
    dave = Conn(w, "dave")
    ep = w.alice
    ghost = endpoint_id("nobody", new_nonce())

    def tunnel(path, protocol="ztm-tunnel", headers=()):
        st = dave.request("CONNECT", path, list(headers), end=False, protocol=protocol)
        h = st.response()
        return h[":status"], h, st

    cases = [
        ("unknown :protocol", f"/api/endpoints/{ep.id}/services/tcp/pysvc", "websocket", 400),
        ("unknown transport", f"/api/endpoints/{ep.id}/services/sctp/pysvc", "ztm-tunnel", 400),
        ("no such path", "/api/tunnels/x", "ztm-tunnel", 404),
        ("endpoint not online", f"/api/endpoints/{ghost}/services/tcp/x", "ztm-tunnel", 404),
        ("no such service", f"/api/endpoints/{ep.id}/services/tcp/none", "ztm-tunnel", 404),
        ("a service that does not admit dave", f"/api/endpoints/{ep.id}/services/tcp/private", "ztm-tunnel", 403),
    ]
    for what, path, protocol, want in cases:
        status, h, st = tunnel(path, protocol)
        equal(status, want, what)
        equal(h.get("content-type"), "application/json", f"{what}: error body")
        equal(json_of(st.body())["status"], want, f"{what}: error body status")
    status, _, st = tunnel(f"/api/endpoints/{ep.id}/services/tcp/pysvc", headers=[("ztm-endpoint-user", "root")])
    equal(status, 404, "known by another user")
    # A plain CONNECT (no :protocol, no :path).
    with dave.lock:
        sid = dave.h2.get_next_available_stream_id()
        st = Stream(dave, sid)
        dave.streams[sid] = st
        dave.h2.send_headers(sid, [(":method", "CONNECT"), (":authority", "ztm:443")])
    dave.kick()
    equal(st.response()[":status"], 400, "CONNECT without :protocol")
    # Optimistic data behind a CONNECT that is refused: the error, then RST_STREAM(NO_ERROR).
    st = dave.request("CONNECT", f"/api/endpoints/{ghost}/services/tcp/x", [], end=False, protocol="ztm-tunnel")
    st.send(b"hello")
    equal(st.response()[":status"], 404, "refused tunnel")
    st.body()
    ev = st.after_answer()
    expect(ev[0] in ("reset", "end"), ev)
    if ev[0] == "reset":
        equal(code_name(ev[1]), "NO_ERROR", "RST_STREAM after the error")
    else:
        raise CheckFailed("the hub did not reset the stream the client still sends on")
    dave.close()


@check
def reregistration_on_one_connection(w):
    """Registering again on the same connection: a new token; the old reverse connection is
    closed with GOAWAY "session replaced"; a new one with the new token serves."""
    ep = Endpoint(w, "erin", "py-erin", [{"protocol": "tcp", "name": "e"}])
    w.erin = ep
    ep.connect()
    equal(ep.register()[0], 200, "registration")
    first_token = ep.token
    r1 = ep.dial_reverse()
    root = w.root
    status, _, body = root.call("GET", f"/api/endpoints/{ep.id}/manage/services")
    equal(status, 200, f"managed over the first reverse connection {body!r}")
    equal(ep.register()[0], 200, "registration again")
    expect(ep.token != first_token, "a new token")
    code, _, text = r1.wait_goaway(5)
    equal((code_name(code), text), ("NO_ERROR", "session replaced"), "GOAWAY of the old reverse")
    status, _, _ = ep.control.call("POST", f"/api/endpoints/{ep.id}/heartbeat")
    equal(status, 204, "the control connection goes on")
    # The old token is no session any more.
    stale = ep.dial_reverse(token=first_token)
    code, _, text = stale.wait_goaway(5)
    equal((code_name(code), text), ("PROTOCOL_ERROR", "bad hello: no such session"), "a stale hello")
    ep.dial_reverse()
    status, _, body = root.call("GET", f"/api/endpoints/{ep.id}/manage/services")
    equal(status, 200, f"managed over the new reverse connection {body!r}")


@check
def session_replaced_from_another_connection(w):
    """Registering the id on another connection closes the old control and reverse
    connections with GOAWAY "session replaced"."""
    ep = w.erin
    old_control, old_reverse = ep.control, ep.reverses[-1]
    ep.connect()
    equal(ep.register()[0], 200, "registration on a new connection")
    for what, conn in (("control", old_control), ("reverse", old_reverse)):
        code, _, text = conn.wait_goaway(5)
        equal((code_name(code), text), ("NO_ERROR", "session replaced"), f"GOAWAY of the old {what} connection")


@check
def reverse_without_extended_connect(w):
    """A reverse connection that does not enable extended CONNECT is closed with GOAWAY
    PROTOCOL_ERROR "extended CONNECT not enabled"; tunnels and management to the endpoint fail
    at once with 502; a reverse connection that enables it serves."""
    ep = Endpoint(w, "frank", "py-frank", [{"protocol": "tcp", "name": "f"}])
    ep.connect()
    equal(ep.register()[0], 200, "registration")
    rev = ep.dial_reverse(connect_protocol=False)
    code, _, text = rev.wait_goaway(5)
    equal((code_name(code), text), ("PROTOCOL_ERROR", "extended CONNECT not enabled"), "GOAWAY")
    root = w.root
    started = time.time()
    st = root.request("CONNECT", f"/api/endpoints/{ep.id}/services/tcp/f", [], end=False, protocol="ztm-tunnel")
    h = st.response()
    equal(h[":status"], 502, "a tunnel to it")
    expect(b"extended CONNECT" in st.body(), "the reason")
    status, _, body = root.call("GET", f"/api/endpoints/{ep.id}/manage/services")
    equal(status, 502, "management of it")
    expect(time.time() - started < 3, "refused at once, not after a wait")
    ep.dial_reverse()

    def tunnel():
        # The hub binds the new reverse connection once it has the hello's answer.
        st = root.request("CONNECT", f"/api/endpoints/{ep.id}/services/tcp/f", [], end=False,
                          protocol="ztm-tunnel")
        return st if st.response()[":status"] == 200 else None

    st = until(5, "a tunnel once the setting is there", tunnel)
    st.send(b"abc", end=True)
    equal(st.body(), b"ABC", "tunnel data")


@check
def bad_hellos(w):
    """A hello that is not 200, or not JSON, closes the reverse connection with GOAWAY
    PROTOCOL_ERROR "bad hello: ..."."""
    ep = Endpoint(w, "gina", "py-gina")
    ep.connect()
    equal(ep.register()[0], 200, "registration")
    for answer, words in (((500, b"{}"), "bad hello: answered 500"),
                          ((200, b"<html>"), "bad hello: not a JSON hello")):
        ep.hello_answer = answer
        code, _, text = ep.dial_reverse().wait_goaway(5)
        equal(code_name(code), "PROTOCOL_ERROR", "code")
        expect(text.startswith(words), f"text: {text!r}")


def read_line(sock, limit=4096):
    """One line from a TLS socket, a byte at a time (nothing after it is taken)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise CheckFailed(f"the connection closed after {line!r}")
        line += byte
        expect(len(line) <= limit, f"a line of at most {limit} bytes: {line[:80]!r}...")
    return json.loads(line)


def silent(sock, seconds):
    """Whether nothing arrives on a TLS socket for `seconds` (it blocks again after)."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
        return False
    except socket.timeout:
        return True
    finally:
        sock.settimeout(None)


def hello_on_demand(w, ep, token):
    """Dials a reverse connection started on demand and says hello: the socket, the answer."""
    sock = w.dial(ep.user, ["ztm-reverse-on-demand", "ztm-reverse"])
    equal(sock.selected_alpn_protocol(), "ztm-reverse-on-demand", "the ALPN the hub chooses")
    sock.sendall(json.dumps({"endpoint": ep.id, "session": token}).encode() + b"\n")
    return sock, read_line(sock)


@check
def reverse_connection_on_demand(w):
    """A reverse connection started on demand: bound by a hello line (refusals are answer
    lines), silent while dormant, and HTTP/2 once a request needs it, the hub's preface first."""
    ep = Endpoint(w, "hana", "py-hana")
    ep.connect()
    equal(ep.register()[0], 200, "registration")
    sock, answer = hello_on_demand(w, ep, "not-the-token")
    equal(answer, {"status": 400, "message": "bad hello: no such session"}, "a wrong token")
    sock.close()
    sock, answer = hello_on_demand(w, ep, ep.token)
    equal(answer, {"status": 200}, "the hello's answer")
    expect(silent(sock, 1), "nothing from the hub on a dormant connection (1 s)")
    st = ep.control.request("GET", f"/api/endpoints/{ep.id}/manage/services")
    r, _, _ = select.select([sock], [], [], 10)
    expect(r or sock.pending(), "the hub's first bytes once a request needs the connection")

    def serve(conn, st):
        ep.seen.append(st.headers)
        ep.handle(conn, st)

    rev = Conn(w, ep.user, server=True, settings={S_ENABLE_CONNECT_PROTOCOL: 1}, on_request=serve,
               sock=sock)
    ep.reverses.append(rev)
    h = st.response()
    equal(h[":status"], 200, "the management answer through the started connection")
    equal(json_of(st.body())["path"], "/api/services", "the request the hub forwarded")
    expect(rev.remote_seen.wait(5), "SETTINGS from the hub")
    equal(rev.remote.get(S_ENABLE_PUSH), 0, "the hub sends SETTINGS_ENABLE_PUSH = 0")


def ask_line(sock, value, limit=1 << 20):
    """Sends one request line on a control connection that carries lines; the answer line."""
    raw = value if isinstance(value, bytes) else json.dumps(value).encode() + b"\n"
    sock.sendall(raw)
    return read_line(sock, limit)


@check
def control_connection_on_demand(w):
    """A control connection that carries lines: registration, heartbeats (naming the newest
    CRL), the CRL, publishing and refusals as JSON lines; then HTTP/2 from the agent's preface
    on, with the same session."""
    ep = Endpoint(w, "ivo", "py-ivo")
    sock = w.dial(ep.user, ["ztm-control-on-demand", "h2"])
    equal(sock.selected_alpn_protocol(), "ztm-control-on-demand", "the ALPN the hub chooses")
    answer = ask_line(sock, {"op": "register", "id": ep.id, "protocol": "1", "name": ep.name,
                             "services": [], "nonce": ep.nonce})
    equal(answer["status"], 200, "registration")
    equal(answer["protocol"], "1", "the version spoken")
    ep.token = answer["session"]
    answer = ask_line(sock, {"op": "heartbeat", "id": ep.id})
    equal(answer["status"], 204, "a heartbeat")
    expect(isinstance(answer.get("crl_number"), int), f"the newest CRL's number: {answer}")
    number = answer["crl_number"]
    answer = ask_line(sock, {"op": "crl"})
    equal(answer["status"], 200, "the CRL")
    expect(answer["crl"].startswith("-----BEGIN X509 CRL-----"), "the CRL in PEM")
    equal(ask_line(sock, {"op": "crl", "after": number}), {"status": 204}, "nothing newer")
    answer = ask_line(sock, b"not json\n")
    equal(answer["status"], 400, "a line that is not a request")
    answer = ask_line(sock, {"op": "publish", "id": ep.id,
                             "services": [{"protocol": "tcp", "name": "py-ivo-web"}]})
    equal(answer, {"status": 204}, "publishing")
    expect(silent(sock, 1), "nothing unasked from the hub (1 s)")
    ep.control = Conn(w, ep.user, sock=sock)
    status, _, _ = ep.control.call("POST", f"/api/endpoints/{ep.id}/heartbeat")
    equal(status, 204, "a heartbeat over HTTP/2 on the same connection, same session")
    expect(ep.control.remote_seen.wait(5), "the hub's SETTINGS")
    equal(ep.control.remote.get(S_ENABLE_CONNECT_PROTOCOL), 1, "extended CONNECT enabled")
    status, _, raw = ep.control.call("GET", "/api/services/tcp/py-ivo-web")
    equal(status, 200, "the service published over a line")


@check
def push_promise_to_the_hub(w):
    """The hub disabled push on the reverse connection: a PUSH_PROMISE is a connection error."""
    ep = Endpoint(w, "hal", "py-hal")
    ep.connect()
    equal(ep.register()[0], 200, "registration")

    rev = ep.dial_reverse()
    until(5, "the hello", lambda: ep.seen)
    # Stream 1 is the hub's hello; a push on it (a field block of static-table entries only, so
    # that the connection's HPACK state is left as it is).
    block = bytes([0x82, 0x87, 0x84, 0x01, 0x01, 0x61])
    rev.raw(frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + block))
    code, _, _ = rev.wait_goaway(5)
    equal(code_name(code), "PROTOCOL_ERROR", "GOAWAY for a push")


# -- RFC 9113: frames an agent may send the hub's HTTP/2 server

@check
def rfc9113_ping_settings_unknown_frames(w):
    """PING is answered with the same payload; SETTINGS are acknowledged (unknown settings
    ignored); unknown frame types are ignored."""
    raw = Raw(w, settings=[(0x0A0A, 7)]).settled()
    expect(raw.alive(), "PING ACK with the same payload")
    raw.send(frame(0xFA, 0, 0, b"ignored") + frame(0xFB, 0xFF, 1, b"x" * 100))
    raw.send(frame(SETTINGS, 0, 0, settings_payload([(0x0B0B, 1)])))
    raw.until(lambda f: f[0] == SETTINGS and f[1] & ACK, what="the ACK of a second SETTINGS")
    expect(raw.alive(), "still alive after unknown frames")
    raw.headers(1, request_headers("GET", "/api/services"), end_stream=True)
    f = raw.until(lambda f: f[0] == HEADERS and f[2] == 1, what="the answer")
    equal(f[4][":status"], "200", "a request after all that")
    raw.close()


def violation(w, what, prepare, send, want, deviation=None):
    """Sends a violation on a fresh connection; checks the hub's error is one of `want`, or
    the `deviation` from RFC 9113 that PROTOCOL.md documents."""
    raw = Raw(w).settled()
    ctx = prepare(raw) if prepare else None
    send(raw, ctx)
    got = raw.error()
    raw.close()
    note = ""
    if deviation and got[:2] == deviation:
        note = " (a deviation from RFC 9113, documented in PROTOCOL.md)"
    else:
        expect(got[:2] in want, f"{what}: got {got[0]} {got[1]}, want one of {want}")
    print(f"      {what}: {got[0]} {got[1]}{note}")
    return got


def open_stream(raw):
    """Stream 1: a registration whose body has not come yet (the hub reads it, 10 s)."""
    raw.headers(1, request_headers("POST", f"/api/endpoints/{endpoint_id('carol', new_nonce())}"))
    return 1


@check
def rfc9113_frame_size(w):
    """Frames larger than SETTINGS_MAX_FRAME_SIZE (65,536): FRAME_SIZE_ERROR. Frames of a wrong
    fixed size: FRAME_SIZE_ERROR in RFC 9113, PROTOCOL_ERROR from the hub (h2's deviation)."""
    violation(w, "DATA over 65,536 bytes", open_stream,
              lambda raw, sid: raw.send(frame(DATA, 0, sid, b"x" * 65537)),
              [("GOAWAY", "FRAME_SIZE_ERROR"), ("RST_STREAM", "FRAME_SIZE_ERROR")])
    violation(w, "HEADERS over 65,536 bytes", None,
              lambda raw, _: raw.send(frame(HEADERS, END_HEADERS, 1, b"\x00" * 65537)),
              [("GOAWAY", "FRAME_SIZE_ERROR")])
    violation(w, "PING of 7 bytes", None, lambda raw, _: raw.send(frame(PING, 0, 0, b"1234567")),
              [("GOAWAY", "FRAME_SIZE_ERROR")], deviation=("GOAWAY", "PROTOCOL_ERROR"))
    violation(w, "SETTINGS ACK with a payload", None,
              lambda raw, _: raw.send(frame(SETTINGS, ACK, 0, settings_payload([(1, 1)]))),
              [("GOAWAY", "FRAME_SIZE_ERROR")], deviation=("GOAWAY", "PROTOCOL_ERROR"))
    violation(w, "SETTINGS of 5 bytes", None, lambda raw, _: raw.send(frame(SETTINGS, 0, 0, b"12345")),
              [("GOAWAY", "FRAME_SIZE_ERROR")], deviation=("GOAWAY", "PROTOCOL_ERROR"))
    violation(w, "WINDOW_UPDATE of 3 bytes", None, lambda raw, _: raw.send(frame(WINDOW_UPDATE, 0, 0, b"123")),
              [("GOAWAY", "FRAME_SIZE_ERROR")], deviation=("GOAWAY", "PROTOCOL_ERROR"))


@check
def rfc9113_flow_control(w):
    """More DATA than the stream window (2 MiB), and a connection window over 2^31-1:
    FLOW_CONTROL_ERROR; a WINDOW_UPDATE of 0: PROTOCOL_ERROR."""
    carol = Endpoint(w, "carol", "py-carol", [{"protocol": "tcp", "name": "sink"}])
    carol.connect()
    equal(carol.register()[0], 200, "registration (no reverse connection: tunnels to it wait)")

    def overflow(raw, _):
        raw.headers(1, request_headers("CONNECT", f"/api/endpoints/{carol.id}/services/tcp/sink", "ztm-tunnel"))
        for _ in range(32):
            raw.send(frame(DATA, 0, 1, b"x" * 65536))
        raw.send(frame(DATA, 0, 1, b"x"))

    violation(w, "a stream window overrun", None, overflow,
              [("RST_STREAM", "FLOW_CONTROL_ERROR"), ("GOAWAY", "FLOW_CONTROL_ERROR")])
    violation(w, "a connection window over 2^31-1", None,
              lambda raw, _: raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF))),
              [("GOAWAY", "FLOW_CONTROL_ERROR")])
    violation(w, "WINDOW_UPDATE 0 on the connection", None,
              lambda raw, _: raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0))),
              [("GOAWAY", "PROTOCOL_ERROR")])
    violation(w, "WINDOW_UPDATE 0 on a stream", open_stream,
              lambda raw, sid: raw.send(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", 0))),
              [("RST_STREAM", "PROTOCOL_ERROR"), ("GOAWAY", "PROTOCOL_ERROR")])


@check
def rfc9113_stream_states(w):
    """DATA on an idle stream; DATA on a closed stream; HEADERS after END_STREAM; a client's
    PUSH_PROMISE; an even stream id."""
    violation(w, "DATA on an idle stream", None, lambda raw, _: raw.send(frame(DATA, 0, 5, b"x")),
              [("GOAWAY", "PROTOCOL_ERROR")])

    def closed(raw):
        raw.headers(1, request_headers("GET", "/api/services"), end_stream=True)
        raw.until(lambda f: f[0] == DATA and f[2] == 1 and f[1] & END_STREAM, what="the answer's end")
        return 1

    violation(w, "DATA on a closed stream", closed,
              lambda raw, sid: raw.send(frame(DATA, 0, sid, b"x")),
              [("GOAWAY", "STREAM_CLOSED"), ("RST_STREAM", "STREAM_CLOSED")])

    def half_closed(raw):
        # Stream 1 waits at the hub (a management request for an endpoint whose reverse
        # connection never comes: up to 10 s) after the client ended it.
        carol_id = endpoint_id("carol", new_nonce())
        raw.headers(1, request_headers("GET", f"/api/endpoints/{carol_id}/manage/services"), end_stream=True)
        return 1

    violation(w, "HEADERS after END_STREAM", half_closed,
              lambda raw, sid: raw.headers(sid, [("x-trailer", "1")], end_stream=True),
              [("RST_STREAM", "STREAM_CLOSED"), ("GOAWAY", "STREAM_CLOSED")],
              deviation=("GOAWAY", "PROTOCOL_ERROR"))
    violation(w, "PUSH_PROMISE from a client", open_stream,
              lambda raw, sid: raw.send(frame(PUSH_PROMISE, END_HEADERS, sid, struct.pack(">I", 2) + bytes([0x82, 0x87, 0x84, 0x01, 0x01, 0x61]))),
              [("GOAWAY", "PROTOCOL_ERROR")])
    violation(w, "HEADERS on an even stream", None,
              lambda raw, _: raw.headers(2, request_headers("GET", "/api/services"), end_stream=True),
              [("GOAWAY", "PROTOCOL_ERROR")])


# ---------------------------------------------------------------------------------------------

def background_checks(w):
    """Checks that wait for the hub's timers, started first and joined last."""

    def registration_timeout():
        c = Conn(w, "gina")
        code, _, text = c.wait_goaway(40)
        equal((code_name(code), text), ("NO_ERROR", "no registration within 30 s"), "GOAWAY")

    def hello_timeout():
        ep = Endpoint(w, "gina", "py-gina-slow")
        ep.connect()
        equal(ep.register()[0], 200, "registration")
        ep.hello_answer = "never"
        started = time.time()
        code, _, text = ep.dial_reverse().wait_goaway(15)
        equal(code_name(code), "PROTOCOL_ERROR", "code")
        expect(text.startswith("bad hello: no answer within 10"), f"text {text!r}")
        expect(time.time() - started >= 9, "waited for the hello")

    def body_timeout():
        c = Conn(w, "gina")
        n = new_nonce()
        st = c.request("POST", f"/api/endpoints/{endpoint_id('gina', n)}", [], b'{"name":', end=False)
        h = st.response(15)
        equal(h[":status"], 408, "a body that never ends")
        c.close()

    def far_agent_timeout():
        ep = w.alice
        st = w.root.request("GET", f"/api/endpoints/{ep.id}/manage/services/slow")
        started = time.time()
        h = st.response(15)
        equal(h[":status"], 504, "a far agent that does not answer")
        expect(7 <= time.time() - started <= 10, "within the hop's 8 s")

    def revocation():
        ep = Endpoint(w, "bob", "py-bob")
        ep.connect()
        equal(ep.register()[0], 200, "registration")
        rev = ep.dial_reverse()
        until(5, "hello", lambda: ep.seen)
        status, _ = w.http(w.ca_port, "DELETE", "/api/certificates/bob")
        equal(status, 204, "revocation at the CA")
        for what, conn in (("control", ep.control), ("reverse", rev)):
            code, _, text = conn.wait_goaway(15)
            equal((code_name(code), text), ("INADEQUATE_SECURITY", "certificate revoked"), f"GOAWAY of the {what} connection")

    return [Background("no registration within 30 s: GOAWAY", registration_timeout),
            Background("a hello not answered within 10 s: GOAWAY", hello_timeout),
            Background("a request body not sent within 10 s: 408", body_timeout),
            Background("revoked certificate: GOAWAY on both connections", revocation)], far_agent_timeout


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: run.py path/to/ztm")
    w = World(sys.argv[1])
    passed = failed = 0
    started = time.time()

    def report(name, error):
        nonlocal passed, failed
        if error is None:
            passed += 1
            print(f"ok    {name}")
        else:
            failed += 1
            print(f"FAIL  {name}: {error}")
        sys.stdout.flush()

    try:
        w.start()
        join_agent(w)
        background, far_agent_timeout = background_checks(w)
        slow = None
        for fn in CHECKS:
            doc = " ".join((fn.__doc__ or fn.__name__).split())
            name = doc.split(". ")[0].rstrip(".")
            try:
                fn(w)
                report(name, None)
            except Exception as e:
                report(name, e if isinstance(e, CheckFailed) else traceback.format_exc())
            if fn is management and slow is None:
                slow = Background("a far agent that does not answer: 504 after 8 s", far_agent_timeout)
        for b in background + ([slow] if slow else []):
            b.thread.join(60)
            report(b.name, b.error if not b.thread.is_alive() else CheckFailed("did not finish"))
    except Exception:
        report("setup", traceback.format_exc())
    finally:
        w.stop()
    if failed or os.environ.get("ZTM_KEEP_TEST_DIRS"):
        print(f"(logs in {w.dir})")
    else:
        shutil.rmtree(w.dir, ignore_errors=True)
    print(f"({time.time() - started:.0f} s)")
    print(f"conformance: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
