"""ZeroMQ channels between the front end and its replicas, locked down by default.

Why this module is strict: an unauthenticated ZMQ socket listening on every interface lets anyone who can
reach the port inject requests or read every prompt and completion (sglang's CVE-2026-3060 was exactly
that). So:

* On one node, every socket is an ``ipc://`` endpoint inside a private directory made by
  ``tempfile.mkdtemp`` (mode 0700): only processes of the same user can even reach the socket file.
* Over the network (``tcp://``), sockets bind to one explicit host -- loopback unless the caller names
  another -- and never to a wildcard (``0.0.0.0``, ``::``, ``*``) unless the caller opts in with
  ``allow_wildcard=True``. Ports are never guessed: we bind port 0 and read the real port back from
  ``LAST_ENDPOINT``, so there is no race with other programs picking the same number.
* Every tcp socket uses ZMQ CURVE (encryption + authentication). The front end generates a server keypair
  and a client keypair (:class:`CurveKeys`), gives workers only the client half plus the server's public key
  (:meth:`CurveKeys.for_client`), and runs a ZAP authenticator (pyzmq's ``ThreadAuthenticator``) that
  accepts a client only if its public key is one the front end handed out. Knowing the server's public key
  is not enough to connect; a plain (NULL mechanism) client is rejected during the handshake.

Topology: the front end *binds* every socket (one PUSH per replica for requests, one PULL for all
replicas' outputs) through a :class:`ChannelHub`; each replica's rank 0 *connects* (:func:`connect`) a PULL
for its requests and a PUSH for its outputs. Messages are the msgspec structs of
:mod:`flotilla.ipc.messages`, one msgpack frame each -- never pickle, so a peer can at worst send a message
that fails to decode, not run code.

A :class:`Channel` wraps one zmq socket, and zmq sockets are not thread-safe: use each channel from one
thread at a time.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import weakref
from typing import Any, Callable

import msgspec
import zmq
import zmq.auth.thread

from flotilla.errors import InvalidParameter
from flotilla.ipc.messages import encoder

logger = logging.getLogger(__name__)

#: How long :meth:`Channel.send` waits by default before giving up (see :meth:`Channel.send` for why a
#: send can wait at all). Long enough to ride out a worker that is still completing its handshake right
#: after start-up, short enough that a dead replica surfaces as an error instead of a hang.
DEFAULT_SEND_TIMEOUT_MS = 5_000

#: ZAP domain of our CURVE server sockets: the authenticator only answers for this domain, so a socket
#: that forgot to set it cannot fall back to "allow anything".
ZAP_DOMAIN = "flotilla"

#: ZMTP heartbeats: let libzmq's I/O thread (which runs without the GIL, so a busy Python thread does not
#: starve it) notice a peer that vanished without closing its connection (host down, network cut), so the
#: dead pipe is dropped and sends to it time out rather than queue forever.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000

#: A channel logs undecodable frames at most this often (a peer spraying garbage must not flood the log).
DROP_LOG_INTERVAL_S = 10.0

#: ``on_bad_frame(frame, error)``: told about each dropped frame, e.g. to fail the request it meant to carry.
BadFrameHook = Callable[[bytes, Exception], None]

_WILDCARD_HOSTS = frozenset({"*"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KINDS = {"push": zmq.PUSH, "pull": zmq.PULL}
_CHANNEL_DEFAULT: Any = object()  # send(timeout_ms=...) not given: use the channel's send_timeout_ms
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_IPC_PATH = 107


class SendTimeout(TimeoutError):
    """A send could not be handed to any peer in time: for a PUSH socket that means no peer is connected
    (the worker has not finished connecting, or it is gone)."""


# ------------------------------------------------------------------------------------------------- keys
class CurveKeys(msgspec.Struct, frozen=True):
    """CURVE keypairs for one front end and its workers, z85-encoded (40 ASCII bytes each).

    The front end keeps the whole object; workers get :meth:`for_client` (no ``server_secret``) in their
    start-up arguments, so a compromised worker cannot impersonate the front end. The repr hides the
    secrets so the keys can't leak through logs or tracebacks.
    """

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        """Fresh random keypairs (libsodium via libzmq); new ones for every front end start."""
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE support; tcp channels need it")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_client(self) -> CurveKeys:
        """A copy without the server secret: what a worker needs to connect, and nothing more."""
        return msgspec.structs.replace(self, server_secret=None)

    def __repr__(self) -> str:
        return (f"CurveKeys(server_public={self.server_public!r}, client_public={self.client_public!r}, "
                f"secrets=<redacted>)")

    __str__ = __repr__


class _AllowedClients:
    """ZAP credentials provider: accept exactly the client public keys the front end handed out."""

    def __init__(self, public_keys: set[bytes]):
        self.public_keys = public_keys  # z85-encoded

    def callback(self, domain: str, key: bytes) -> bool:
        ok = domain == ZAP_DOMAIN and key in self.public_keys
        if not ok:
            logger.warning("rejected a CURVE client with an unknown public key (domain %r)", domain)
        return ok


class EncodeError(ValueError):
    """A message could not be encoded: the fault of what was sent (never a sign the peer is gone)."""


# ------------------------------------------------------------------------------------------------- channel
class Channel:
    """One zmq PUSH or PULL socket plus the msgspec codec for what travels on it.

    ``socket`` is exposed for ``zmq.Poller`` (poll several channels at once), not for sending raw frames.
    """

    def __init__(self, socket: zmq.Socket, kind: str, name: str, decoder: msgspec.msgpack.Decoder | None,
                 *, send_timeout_ms: int | None = DEFAULT_SEND_TIMEOUT_MS,
                 own_context: zmq.Context | None = None, on_bad_frame: BadFrameHook | None = None):
        self.socket = socket
        self.kind = kind
        self.name = name
        self.send_timeout_ms = send_timeout_ms
        #: frames that failed to decode and were dropped (see :meth:`recv`)
        self.dropped = 0
        self._decoder = decoder
        self._on_bad_frame = on_bad_frame
        self._own_context = own_context  # worker side: the context exists for this channel alone
        self._closed = False
        self._drop_log_at = float("-inf")  # when a drop was last logged
        self._drops_unlogged = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, msg: Any, timeout_ms: Any = _CHANNEL_DEFAULT) -> None:
        """Encode ``msg`` (msgpack) and queue it for the peer.

        Why it can wait, and why never forever: every socket has SNDHWM 0 (unbounded queue), so while a
        peer is connected a send always succeeds at once. A PUSH with *no* connected peer has nowhere to
        queue: zmq would block indefinitely. That happens for a bound PUSH before the worker's connection
        completes its (CURVE) handshake, and after the worker died. So we wait at most ``timeout_ms``
        (default: the channel's ``send_timeout_ms``, :data:`DEFAULT_SEND_TIMEOUT_MS`) for a peer and then
        raise :class:`SendTimeout`, letting the caller re-route or mark the replica dead. ``timeout_ms=0``
        never waits; ``None`` waits forever (only for callers that detect death some other way).

        A connect-side socket (the worker's) queues even before its connection is up, so its sends
        return at once. Note that zmq drops messages queued to a peer whose connection breaks: delivery
        to a replica that dies is not guaranteed, and fault handling must not assume it.
        """
        if timeout_ms is _CHANNEL_DEFAULT:
            timeout_ms = self.send_timeout_ms
        try:
            data = encoder.encode(msg)
        except Exception as e:  # the message, not the peer: an int beyond int64, a type msgpack cannot carry
            raise EncodeError(f"channel {self.name!r}: cannot encode {type(msg).__name__}: {type(e).__name__}: "
                              f"{e}") from e
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            try:
                self.socket.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            if deadline is None:
                self.socket.poll(None, zmq.POLLOUT)
                continue
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise SendTimeout(f"channel {self.name!r}: no peer accepted a message within {timeout_ms} ms "
                                  "(is the worker connected and alive?)")
            self.socket.poll(remaining_ms, zmq.POLLOUT)

    def writable(self) -> bool:
        """A send would be taken now (for a bound PUSH: a peer is connected)."""
        return bool(self.socket.poll(0, zmq.POLLOUT))

    def recv(self, timeout_ms: int | None = None) -> Any:
        """The next decoded message, or None if none arrived within ``timeout_ms``.

        ``None`` waits forever, ``0`` only polls. Decoding uses the channel's msgspec decoder, which
        validates the message against the expected union. A frame that fails to decode (garbage bytes, an
        unknown tag, a field of the wrong type or one its struct's own validation refuses) is dropped,
        counted in :attr:`dropped`, logged (rate-limited) and handed to the channel's ``on_bad_frame``
        hook if it has one; then the wait for a good message goes on. Why never raise: one bad frame
        must not kill the loop reading the channel -- a worker's step loop or the front end's engine
        loop -- and with it every other request.
        """
        if self._decoder is None:
            raise TypeError(f"channel {self.name!r} was made without a decoder; it cannot receive")
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
                if not self.socket.poll(wait_ms, zmq.POLLIN):
                    return None
            try:
                frame = self.socket.recv(0 if deadline is None else zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                return self._decoder.decode(frame.buffer)
            except Exception as e:  # decoding is pure: whatever it raises is about this frame
                self._drop(frame.bytes, e)

    def _drop(self, data: bytes, error: Exception) -> None:
        self.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drop_log_at >= DROP_LOG_INTERVAL_S:
            logger.error("channel %r: dropped %d undecodable frame(s) (%d in all); the latest (%d bytes): "
                         "%s: %s", self.name, self._drops_unlogged, self.dropped, len(data),
                         type(error).__name__, error)
            self._drop_log_at, self._drops_unlogged = now, 0
        if self._on_bad_frame is not None:
            try:
                self._on_bad_frame(data, error)
            except Exception:
                logger.exception("channel %r: the on_bad_frame hook failed", self.name)

    def recv_many(self, timeout_ms: int | None, max_items: int | None = None) -> list[Any]:
        """Everything already queued (up to ``max_items``), waiting up to ``timeout_ms`` for the first.

        Lets a busy loop handle a burst of outputs with one wake-up instead of one per message.
        """
        first = self.recv(timeout_ms)
        if first is None:
            return []
        out = [first]
        while max_items is None or len(out) < max_items:
            msg = self.recv(0)
            if msg is None:
                break
            out.append(msg)
        return out

    def close(self) -> None:
        """Close the socket at once (LINGER 0: unsent messages are dropped, nothing waits on a dead
        peer). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.socket.close(linger=0)
        if self._own_context is not None:
            self._own_context.destroy(linger=0)
            self._own_context = None

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Channel({self.kind}, {self.name!r}{', closed' if self._closed else ''})"


def _common_options(sock: zmq.Socket, ipv6: bool) -> None:
    """Options every channel socket gets, both sides.

    * LINGER 0: closing never blocks on undeliverable messages (a dead peer must not hang shutdown).
    * SNDHWM/RCVHWM 0 (unbounded): requests and outputs must never be dropped silently -- zmq's PUSH
      blocks (and we then time out) rather than drops at the HWM, which would stall a worker's step loop
      on a slow front end. Memory is bounded by the front end's own admission control (max running +
      waiting requests), not by zmq.
    * Heartbeats and TCP keepalive: detect peers that vanished without a FIN.
    """
    sock.linger = 0
    sock.sndhwm = 0
    sock.rcvhwm = 0
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    if ipv6:
        sock.ipv6 = 1


def _check_kind(kind: str) -> int:
    try:
        return _KINDS[kind]
    except KeyError:
        raise InvalidParameter("kind", f"must be 'push' or 'pull', got {kind!r}") from None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidParameter("name", f"must match {_NAME_RE.pattern} (it becomes a file name), got {name!r}")


def _is_wildcard(host: str) -> bool:
    if host in _WILDCARD_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False  # a host name or interface name


def _is_ipv6_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False


def _tcp_host_port(address: str) -> tuple[str, str]:
    rest = address[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) == 0:
        raise InvalidParameter("address", f"expected tcp://HOST:PORT with a real port, got {address!r}")
    return host, port


# ------------------------------------------------------------------------------------------------- front end
class ChannelHub:
    """The front end's side: owns the zmq Context, the private ipc directory or the CURVE authenticator,
    and every socket it binds. Close it (or use it as a context manager) to release all of them.

    ``host=None`` and ``use_tcp=False``: ``ipc://`` endpoints in a fresh 0700 directory (single node).
    Otherwise (``use_tcp=True`` or any ``host``): ``tcp://{host or 127.0.0.1}:0`` with CURVE. A wildcard
    host (``0.0.0.0``, ``::``, ``*``) is refused unless ``allow_wildcard=True``: listening on every
    interface must be a deliberate choice. ``advertise_host`` replaces the host in the addresses handed to
    workers (needed with a wildcard bind, whose own address ``0.0.0.0`` means nothing to another node).
    """

    def __init__(self, host: str | None = None, use_tcp: bool = False, allow_wildcard: bool = False,
                 advertise_host: str | None = None, ipc_parent: str | None = None):
        self.use_tcp = bool(use_tcp or host is not None)
        if host is not None:
            if not isinstance(host, str) or not host.strip() or "/" in host or host != host.strip():
                raise InvalidParameter("host", f"expected an IP address, host or interface name, got {host!r}")
            if _is_wildcard(host) and not allow_wildcard:
                raise ValueError(
                    f"host: {host!r} listens on every network interface, exposing the engine's sockets to "
                    "anyone who can reach this machine; bind a specific address (default 127.0.0.1), or "
                    "pass allow_wildcard=True if you really mean it")
        self.allow_wildcard = allow_wildcard
        self.host = host.strip("[]") if host is not None else ("127.0.0.1" if self.use_tcp else None)
        self.advertise_host = advertise_host.strip("[]") if advertise_host else None
        self.keys: CurveKeys | None = None
        self.ipc_dir: str | None = None
        self._channels: list[Channel] = []
        self._names: set[str] = set()
        self._files: dict[int, str] = {}  # id(channel) -> its ipc socket file
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._closed = False
        self._cleanup_dir: weakref.finalize | None = None
        self.context = zmq.Context()  # private: terminating it cannot break other zmq users in-process
        try:
            if self.use_tcp:
                self.keys = CurveKeys.generate()
                self._auth = zmq.auth.thread.ThreadAuthenticator(
                    self.context, log=logging.getLogger(__name__ + ".auth"))
                self._auth.configure_curve_callback(ZAP_DOMAIN, _AllowedClients({self.keys.client_public}))
                self._auth.start()  # before any bind, so no connection is ever seen without it
            else:
                # created 0700, random, O_EXCL; inside ``ipc_parent`` (the engine's private folder) when given, else
                # named after this process so that a later start can reap it if this one is SIGKILLed
                self.ipc_dir = tempfile.mkdtemp(prefix="ipc-" if ipc_parent else f"flotilla-{os.getpid()}-",
                                                dir=ipc_parent)
                os.chmod(self.ipc_dir, stat.S_IRWXU)  # belt and braces (mkdtemp already does this)
                # If the hub is garbage-collected or the interpreter exits without close(), still remove it.
                self._cleanup_dir = weakref.finalize(self, shutil.rmtree, self.ipc_dir, ignore_errors=True)
        except BaseException:
            self.close()
            raise

    def bind(self, kind: str, name: str, decoder: msgspec.msgpack.Decoder | None = None,
             *, send_timeout_ms: int | None = DEFAULT_SEND_TIMEOUT_MS,
             on_bad_frame: BadFrameHook | None = None) -> tuple[Channel, str]:
        """Bind a new ``kind`` ("push" | "pull") socket; return it and the address workers connect to.

        ``name`` must be unique per hub (it names the ipc socket file). ``decoder`` is needed to receive
        (e.g. ``from_worker_decoder`` for the outputs PULL); a request PUSH needs none.
        """
        if self._closed:
            raise RuntimeError("ChannelHub is closed")
        zkind = _check_kind(kind)
        _check_name(name)
        if name in self._names:
            raise InvalidParameter("name", f"{name!r} is already bound on this hub")
        ipv6 = self.use_tcp and _is_ipv6_literal(self.host or "")
        sock = self.context.socket(zkind)
        try:
            _common_options(sock, ipv6)
            if self.use_tcp:
                assert self.keys is not None and self.keys.server_secret is not None
                sock.curve_server = 1
                sock.curve_secretkey = self.keys.server_secret
                sock.zap_domain = ZAP_DOMAIN.encode()
                # Refuse connections outright if no ZAP handler answers, instead of libzmq's fallback of
                # accepting any CURVE client.
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                host = f"[{self.host}]" if ipv6 else self.host
                sock.bind(f"tcp://{host}:0")
                address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                bound_host, _ = _tcp_host_port(address)
                if _is_wildcard(bound_host) and not self.allow_wildcard:
                    # A host name or interface that resolved to the wildcard address: same exposure.
                    raise InvalidParameter("host", f"{self.host!r} bound {address}, i.e. every interface; pass "
                                                   "allow_wildcard=True if you really mean it")
                if self.advertise_host:
                    _, port = _tcp_host_port(address)
                    adv = self.advertise_host
                    address = f"tcp://[{adv}]:{port}" if _is_ipv6_literal(adv) else f"tcp://{adv}:{port}"
            else:
                assert self.ipc_dir is not None
                path = os.path.join(self.ipc_dir, f"{name}.sock")
                if len(path.encode()) > _MAX_IPC_PATH:
                    raise InvalidParameter("name", f"ipc socket path {path!r} exceeds {_MAX_IPC_PATH} bytes; "
                                                   "use a shorter name or a shorter TMPDIR")
                sock.bind(f"ipc://{path}")
                address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            sock.close(linger=0)
            raise
        ch = Channel(sock, kind, name, decoder, send_timeout_ms=send_timeout_ms, on_bad_frame=on_bad_frame)
        if address.startswith("ipc://"):
            self._files[id(ch)] = address[len("ipc://"):]
        self._channels.append(ch)
        self._names.add(name)
        logger.debug("bound %s channel %r at %s", kind, name, address)
        return ch, address

    def release(self, ch: Channel) -> None:
        """Close one bound channel for good (its replica is gone) and remove its ipc socket file, so that a
        long-lived front end whose replicas restart now and then keeps one file per live replica. Its name
        stays taken. Idempotent."""
        ch.close()
        self._channels = [c for c in self._channels if c is not ch]
        path = self._files.pop(id(ch), None)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("could not remove the ipc socket file %s: %s", path, e)

    def close(self) -> None:
        """Close every bound socket, stop the authenticator, terminate the context and remove the ipc
        directory (with its socket files). Idempotent. Call it after the threads using the channels
        stopped: zmq sockets must not be closed under a thread that is using them."""
        if self._closed:
            return
        self._closed = True
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        # destroy, not term: term() blocks forever on any socket still open in the context (say a
        # monitor socket a caller forgot), and shutdown must not hang.
        self.context.destroy(linger=0)
        if self._cleanup_dir is not None:
            self._cleanup_dir()  # runs shutil.rmtree once and detaches the finalizer

    def __enter__(self) -> ChannelHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- worker
def connect(kind: str, address: str, decoder: msgspec.msgpack.Decoder | None = None,
            keys: CurveKeys | None = None, *,
            send_timeout_ms: int | None = DEFAULT_SEND_TIMEOUT_MS,
            on_bad_frame: BadFrameHook | None = None) -> Channel:
    """Worker side: connect a ``kind`` ("push" | "pull") socket to an address from :meth:`ChannelHub.bind`.

    Each channel gets its own zmq Context, created in the calling process (contexts must never cross a
    fork/spawn) and terminated by :meth:`Channel.close`. ``tcp://`` addresses require ``keys`` (from
    :meth:`CurveKeys.for_client`): there is no unencrypted tcp mode. ``ipc://`` ignores keys -- its
    protection is the 0700 directory. ``on_bad_frame``: see :meth:`Channel.recv`.
    """
    zkind = _check_kind(kind)
    if address.startswith("tcp://"):
        host, _ = _tcp_host_port(address)
        if keys is None:
            raise InvalidParameter("keys", "tcp channels are CURVE-encrypted and authenticated; pass the CurveKeys "
                                           "the front end generated (keys.for_client())")
        ipv6 = host.startswith("[")
    elif address.startswith("ipc://"):
        ipv6 = False
    else:
        raise InvalidParameter("address", f"expected an ipc:// or tcp:// address, got {address!r}")
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zkind)
    try:
        _common_options(sock, ipv6)
        if keys is not None and address.startswith("tcp://"):
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.client_public
            sock.curve_secretkey = keys.client_secret
        sock.connect(address)
    except BaseException:
        sock.close(linger=0)
        ctx.term()
        raise
    return Channel(sock, kind, address, decoder, send_timeout_ms=send_timeout_ms, own_context=ctx,
                   on_bad_frame=on_bad_frame)


__all__ = ["Channel", "ChannelHub", "CurveKeys", "EncodeError", "SendTimeout", "connect", "DEFAULT_SEND_TIMEOUT_MS"]
