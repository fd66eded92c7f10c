"""The client's pending calls, shared by the blocking (:mod:`zrpc.client`)
and the asyncio (:mod:`zrpc.aio`) client: ids, resubmission after a lost
connection, results matched to their calls, local safety deadlines.
Internal: the rules are those of ``docs/protocol.md`` and
``docs/reliability.md``.
"""

import time
from typing import Any, Dict, List, Optional

from . import errors
from ._proto import (CANCEL, FATAL, MAX_TIMEOUT_MS, NO_RETRY, NO_WAIT, PING, RESULT, SAFETY_MARGIN,
                     call_frame, encode_frame, field, name_error, pack, pong_frame, unpack,
                     valid_name)


class PendingCall:
    """A call made and not yet answered; ``sent_on`` is the connection generation it was sent on."""

    __slots__ = ("cid", "service", "method", "payload", "deadline", "flags", "sent_on", "done",
                 "outcome", "waiter", "may_have_run")

    def __init__(self, cid, service, method, payload, deadline, flags):
        self.cid = cid
        self.service = service
        self.method = method
        self.payload = payload
        self.deadline = deadline
        self.flags = flags
        self.sent_on: Optional[int] = None
        self.done = False
        self.outcome: Any = None  # ("ok", bytes) or an exception
        self.waiter: Any = None   # an asyncio future (zrpc.aio)
        #: Sent on a connection that ended (or answered ``Shutdown``) before its outcome came:
        #: a broker may have delivered it (see :meth:`CallTable.on_result`).
        self.may_have_run = False

    @property
    def no_retry(self) -> bool:
        """Whether the call was made with ``no_retry``."""
        return bool(self.flags & NO_RETRY)


#: The codes of a result that say a call never ran, and what they become for
#: a call resubmitted after a reconnection (docs/reliability.md).
MAY_HAVE_RUN = {errors.NO_SUCH_SERVICE: errors.SERVICE_GONE, errors.TIMEOUT_NO_SERVICE: errors.TIMEOUT}


#: The most a ``Call`` envelope takes besides its two names: ``[CALL, cid, service, method,
#: timeout_ms, flags]`` with a u64 id (9 bytes), str8 headers (names are at most 128 ASCII
#: bytes), a u64 timeout and flags below 256 (2 bytes) is 1 + 1 + 9 + 2 + 2 + 9 + 2 bytes.
CALL_OVERHEAD = 26


class CallTable:
    """The client's pending calls, shared by the blocking and the asyncio client.

    Ids come from a counter and are never reused by one instance, so that a
    call resubmitted after a reconnect keeps its id. ``lost`` and ``frames_to_send``
    implement the resubmission rules of ``docs/protocol.md``.
    """

    def __init__(self):
        self.next_id = 1
        self.calls: Dict[int, PendingCall] = {}

    def new(self, service: str, method: str, payload: Any, timeout: Optional[float],
            no_wait: bool, no_retry: bool, max_message_size: int) -> PendingCall:
        """Registers a new call; raises for bad names, bad payloads and oversized payloads."""
        if not valid_name(service):
            raise name_error("service", service, service, method)
        if not valid_name(method):
            raise name_error("method", method, service, method)
        data = pack(payload)
        if len(data) + CALL_OVERHEAD + len(service) + len(method) > max_message_size:
            raise errors.LimitExceededError(
                "the payload of %d bytes exceeds the broker's maximum message size of %d bytes"
                % (len(data), max_message_size), service=service, method=method)
        if timeout is not None and timeout < 0:
            timeout = None  # as the original zrpc: a negative timeout waits indefinitely
        deadline = None if timeout is None or timeout * 1000 > MAX_TIMEOUT_MS else time.monotonic() + timeout
        flags = (NO_WAIT if no_wait else 0) | (NO_RETRY if no_retry else 0)
        call = PendingCall(self.next_id, service, method, data, deadline, flags)
        self.next_id += 1
        self.calls[call.cid] = call
        return call

    def finish(self, call: PendingCall, outcome: Any) -> None:
        """Records the call's outcome and forgets it."""
        if not call.done:
            call.done = True
            call.outcome = outcome
            self.calls.pop(call.cid, None)
            if call.waiter is not None and not call.waiter.done():
                call.waiter.set_result(None)

    def abandon(self, call: PendingCall, gen: int, send, outcome: Any = None) -> None:
        """Gives ``call`` up: tells the broker (``Cancel`` through ``send(frame)``) if it was sent
        on connection ``gen``, the live one (``send`` is ``None`` when there is none), and finishes
        it with ``outcome``: :class:`errors.CancelledError` unless given (the local safety
        timeout gives its :class:`errors.RPCTimeoutError`).
        """
        if call.done:
            return
        if send is not None and call.sent_on == gen:
            send(encode_frame([CANCEL, call.cid]))
        if outcome is None:
            outcome = errors.CancelledError("the call was cancelled", service=call.service, method=call.method)
        self.finish(call, outcome)

    def frame(self, call: PendingCall, gen: int, now: float) -> Optional[bytes]:
        """The ``Call`` frame for sending ``call`` on connection ``gen`` with its remaining budget.

        Finishes the call with a timeout (and returns ``None``) if no budget is left.
        """
        if call.deadline is None:
            timeout_ms = None
        else:
            left = call.deadline - now
            if left <= 0 and call.sent_on is not None:
                self.finish(call, timeout_error(call, "the deadline passed while reconnecting to zrpcd"))
                return None
            timeout_ms = max(0, int(left * 1000 + 0.5))
        call.sent_on = gen
        return call_frame(call.cid, call.service, call.method, timeout_ms, call.flags, call.payload)

    def resubmit(self, gen: int) -> List[bytes]:
        """Connection ``gen`` is up: the frames of every call waiting for a connection."""
        now = time.monotonic()
        out = []
        for call in sorted(self.calls.values(), key=lambda c: c.cid):
            if call.sent_on is None:
                f = self.frame(call, gen, now)
                if f is not None:
                    out.append(f)
        return out

    def backoff_step(self, retry_at: float) -> Optional[float]:
        """While the client waits to reconnect (at ``retry_at``, a ``time.monotonic()`` time after
        the backoff delay): fails the calls whose deadline passed, and returns how long to wait
        before looking again: until ``retry_at`` or the earliest deadline of the waiting calls,
        whichever comes first, so that no deadline is overshot. ``None``: stop waiting (it is
        time to reconnect, or no call waits any more).
        """
        now = time.monotonic()
        self.expire(now)
        if now >= retry_at or not self.calls:
            return None
        earliest = min((c.deadline for c in self.calls.values() if c.deadline is not None), default=retry_at)
        return max(0.0, min(retry_at, earliest) - now)

    def expire(self, now: float) -> None:
        """Calls whose deadline passed while they waited for a connection fail with a timeout."""
        for call in list(self.calls.values()):
            if call.deadline is not None and now >= call.deadline:
                self.finish(call, timeout_error(call, "the deadline passed while reconnecting to zrpcd"))

    def lost(self, gen: int, why: str) -> None:
        """Connection ``gen`` is gone: calls past their deadline time out, ``no_retry`` calls on it
        fail, the others wait to be resubmitted."""
        self.expire(time.monotonic())
        for call in list(self.calls.values()):
            if call.sent_on == gen and call.no_retry:
                self.finish(call, errors.DisconnectedError(
                    "connection to zrpcd lost while the no_retry call %s.%s was on the broker: %s"
                    % (call.service, call.method, why), service=call.service, method=call.method))
            elif call.sent_on is not None:
                call.sent_on = None
                call.may_have_run = True

    def on_result(self, env: list, payload: bytes) -> Optional[PendingCall]:
        """Handles a ``Result``; returns the call if it is now answered.

        A ``Shutdown`` result of a call that may be retried sends it back to
        waiting for the next broker (``sent_on = None``).
        """
        call = self.calls.get(field(env, 1))
        if call is None:
            return None
        code = field(env, 2, 0)
        if code == errors.SHUTDOWN and not call.no_retry:
            call.sent_on = None
            call.may_have_run = True
            return None
        if code:
            message = field(env, 3, "")
            if call.may_have_run and code in MAY_HAVE_RUN:
                # "No service held the name" speaks only for the broker
                # that answered: an earlier one may have delivered the call.
                code = MAY_HAVE_RUN[code]
                message += " (the call was sent before a reconnection and may have run)"
            exc = errors.from_code(code, message, call.service, call.method)
            if code == errors.REMOTE and payload and isinstance(exc, errors.RemoteError):
                # Decoded when read (a hostile service's value may be costly to
                # decode; most callers never read it).
                exc.set_encoded_value(payload)
            self.finish(call, exc)
        else:
            self.finish(call, ("ok", payload))
        return call

    def dispatch(self, frames: list, send) -> Optional[str]:
        """Handles the broker's frames for a client: results to their calls, pings answered
        through ``send(frame)``. Returns why the connection must end (``Fatal``), else ``None``.
        """
        for env, payload in frames:
            kind = env[0]
            if kind == RESULT:
                self.on_result(env, payload)
            elif kind == PING:
                send(pong_frame(field(env, 1, 0)))
            elif kind == FATAL:
                return "zrpcd sent Fatal (%s): %s" % (errors.code_name(field(env, 1, 0)), field(env, 2, ""))
        return None

    def expired(self, now: float) -> List[PendingCall]:
        """Calls whose local safety deadline (deadline + :data:`SAFETY_MARGIN`) passed."""
        return [c for c in self.calls.values()
                if c.deadline is not None and now >= c.deadline + SAFETY_MARGIN]

    def fail_all(self, exc_factory) -> None:
        """Fails every pending call with ``exc_factory(call)`` (the client was closed)."""
        for call in list(self.calls.values()):
            self.finish(call, exc_factory(call))


def timeout_error(call: PendingCall, why: str) -> errors.RPCTimeoutError:
    """The local timeout error of ``call``."""
    return errors.RPCTimeoutError("%s.%s timed out: %s" % (call.service, call.method, why),
                                  service=call.service, method=call.method)


def result_value(call: PendingCall) -> Any:
    """The decoded value of an answered call, or raises its error."""
    outcome = call.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    try:
        return unpack(outcome[1])
    except Exception as e:
        raise errors.DecodeError("%s.%s: cannot decode the result: %s" % (call.service, call.method, e),
                                 service=call.service, method=call.method) from None
